"""The main job: a character-level language model on real text, with samples.

  python experiments/char_lm.py                                      # PTB characters, ~2 min on 2 cores
  python experiments/char_lm.py --dataset=shakespeare                # the Gutenberg plays and poems
  python experiments/char_lm.py --dataset=file:my.txt                # any UTF-8 text file
  python experiments/char_lm.py --preset=ptb_lstm                    # a longer run aimed at published bpc
  python experiments/char_lm.py --resume                             # continue a stopped run exactly
  python experiments/char_lm.py --sample --prime="the company " --temperature=0.7
  python experiments/char_lm.py --cell=dts_rnn --hidden_size=224 --output_layer_sizes=224   # DOT(S)-RNN

Reports validation and test bits per character (bpc = nats / ln 2, every character including
spaces and line ends) of the best checkpoint, prints samples and writes config.json,
metrics.jsonl, results.json, curves.png, samples.txt, model.json, vocab.json and checkpoints/
under --workdir. Published PTB-char figures: 1.41 bpc for an Elman RNN (Mikolov et al. 2012),
1.24 for a large LSTM with dynamic evaluation (Graves 2013, Table 1 lists 1.32 without).

Deep RNNs (Pascanu, Gulcehre, Cho & Bengio 2013, "How to construct deep recurrent neural
networks", arXiv:1312.6026): --cell=dt_rnn / dts_rnn is a deep transition (--transition_sizes
sets its intermediate layers, default one of hidden_size units), --output_layer_sizes a deep
output (DO); dts_rnn with a deep output is their DOT(S)-RNN, --cell=elman --num_layers=2 their
sRNN. Their PTB-char test figures, drawn for those models: sRNN 1.41, DOT(S)-RNN 1.39 bpc.
"""

import dataclasses
import os

import jax
from absl import flags

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import load_run
from rnn_jax.lm_train import LMConfig, sample_from_run, train_lm

REFERENCE = {"bpc": (1.41, "Elman RNN, Mikolov et al. 2012 (1.41)")}
# Pascanu et al. 2013, PTB-char test bpc of the stacked RNN and of the DOT(S)-RNN.
PASCANU2013 = {"srnn": {"bpc": (1.41, "sRNN, Pascanu et al. 2013 (1.41)")},
               "dots": {"bpc": (1.39, "DOT(S)-RNN, Pascanu et al. 2013 (1.39)")}}


@dataclasses.dataclass(frozen=True)
class Config(LMConfig):
  """char_lm: an LSTM on PTB characters with Adam and a cosine schedule."""
  embed_size: int = 64
  learning_rate: float = 6e-3
  schedule: str = "cosine"
  warmup_steps: int = 50
  clip: float = 1.0
  seq_len: int = 50
  steps: int = 8000
  eval_every: int = 2000


PRESETS = {
    "ptb_rnn": dict(cell="elman", hidden_size=1000, embed_size=64, learning_rate=1e-3, batch_size=64,
                    seq_len=100, steps=30000, warmup_steps=500),
    "ptb_lstm": dict(hidden_size=1000, embed_size=128, num_layers=2, dropout=0.25, learning_rate=2e-3,
                     batch_size=64, seq_len=150, steps=40000, warmup_steps=1000),
    # Pascanu et al. 2013's PTB-char comparison at a published scale. The paper's own unit counts
    # and training (SGD) could NOT be checked against its text here, so these sizes are ours: the
    # sRNN of Mikolov-scale 2x1000 units (3.12M parameters) and DT(S) / DOT(S) networks of the same
    # count (lm_train.count_params; DT(S) with one 1000-unit transition layer has exactly the sRNN's
    # count, DOT(S) 870 units everywhere is +0.4%); the training is the ptb_rnn recipe (Adam).
    "pascanu2013_srnn": dict(cell="elman", num_layers=2, hidden_size=1000, embed_size=64, learning_rate=1e-3,
                             batch_size=64, seq_len=100, steps=30000, warmup_steps=500),
    "pascanu2013_dts": dict(cell="dts_rnn", hidden_size=1000, embed_size=64, learning_rate=1e-3,
                            batch_size=64, seq_len=100, steps=30000, warmup_steps=500),
    "pascanu2013_dots": dict(cell="dts_rnn", hidden_size=870, output_layer_sizes=(870,), embed_size=64,
                             learning_rate=1e-3, batch_size=64, seq_len=100, steps=30000, warmup_steps=500),
}
SMOKE = dict(hidden_size=32, embed_size=16, batch_size=8, seq_len=32, steps=20, eval_every=10, log_every=5,
             eval_tokens=3000, warmup_steps=2)


def define_sampling_flags(flag_values):
  """The flags of --sample, which draws from a trained run instead of training."""
  flags.DEFINE_bool("sample", False, "Only sample from the best checkpoint in --workdir.",
                    flag_values=flag_values)
  flags.DEFINE_string("prime", "the ", "Text the samples start from.", flag_values=flag_values)
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature (> 0).", flag_values=flag_values)
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).", flag_values=flag_values)
  flags.DEFINE_integer("num_samples", 2, "Samples to draw.", flag_values=flag_values)
  flags.DEFINE_integer("sample_length", 400, "Tokens drawn per sample.", flag_values=flag_values)


def write_samples(workdir: str, prime: str, length: int, *, temperature: float, top_k: int,
                  num_samples: int, seed: int) -> str:
  """Draw samples from the run in ``workdir``, print them and save them as samples.txt."""
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  loaded = load_run(workdir)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), num_samples)
  texts = [sample_from_run(loaded, prime, length=length, key=key, temperature=temperature, top_k=top_k)
           for key in keys]
  text = (f"# {num_samples} samples from step {loaded.step}, temperature {temperature}, top_k {top_k}, "
          f"prime {prime!r}\n" + "\n\n----\n\n".join(texts))
  print(text)
  with open(os.path.join(workdir, "samples.txt"), "w") as handle:
    handle.write(text + "\n")
  return text


def sample_mode(flag_values, workdir: str) -> bool:
  if not flag_values.sample:
    return False
  write_samples(workdir, flag_values.prime, flag_values.sample_length, temperature=flag_values.temperature,
                top_k=flag_values.top_k, num_samples=flag_values.num_samples, seed=flag_values.seed)
  return True


def reference_for(config: Config) -> dict:
  """The published PTB-char figure for ``config``'s architecture: Pascanu et al. 2013's DOT(S)-RNN
  (dts_rnn with a deep output) or sRNN (Elman, 2 layers), otherwise Mikolov et al. 2012's Elman RNN."""
  if config.cell == "dts_rnn" and config.output_layer_sizes:
    return PASCANU2013["dots"]
  if config.cell in ("elman", "tanh") and config.num_layers == 2 and not config.output_layer_sizes:
    return PASCANU2013["srnn"]
  return REFERENCE


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train the character LM into ``workdir``, sample from it, and return results.json's content."""
  reference = reference_for(config)
  outcome = train_lm(config, workdir, options or common.RunOptions(), experiment="char_lm",
                     reference=reference if config.dataset == "ptb_char" else None)
  results = outcome.run.finish({**outcome.results, "published_test_bpc": reference["bpc"][0],
                                "published_source": reference["bpc"][1]})
  write_samples(workdir, "the ", 400, temperature=0.8, top_k=0, num_samples=2,
                seed=config.seed)
  print(f"char_lm {config.cell} on {config.dataset}: valid {results['valid_bpc']:.3f} bpc, test "
        f"{results['test_bpc']:.3f} bpc (best step {results['best_step']} of {results['steps']})")
  return results


EXPERIMENT = common.Experiment("char_lm", Config, train_and_evaluate, PRESETS, SMOKE, __doc__,
                               define_flags=define_sampling_flags, infer=sample_mode)

if __name__ == "__main__":
  common.main(EXPERIMENT)
