"""Word-level Penn Treebank language model: Zaremba, Sutskever & Vinyals (2014), "small" and friends.

  python experiments/word_lm.py --workdir=/tmp/word_lm_small            # the "small" run (CPU: hours)
  python experiments/word_lm.py --preset=medium --workdir=...            # accelerators
  python experiments/word_lm.py --workdir=/tmp/word_lm_small --resume    # continue a killed run
  python experiments/word_lm.py --smoke --workdir=/tmp/smoke             # seconds, same code path

Presets (Zaremba et al. 2014, Table 1; valid / test perplexity):
  small : 2x200 LSTM, T 20, B 20, SGD lr 1, clip 5, 13 epochs, lr x0.5 after epoch 4, U(+-0.1), no dropout
          -> 120.7 / 114.5
  medium: 2x650, T 35, dropout 0.5, 39 epochs, lr x0.8 after epoch 6, U(+-0.05)   -> 86.2 / 82.7
  large : 2x1500, T 35, dropout 0.65, clip 10, 55 epochs, lr /1.15 after epoch 14, U(+-0.04) -> 82.2 / 78.4
The loss is summed over the T steps and averaged over the batch, as in their code.
Writes results.json (test_perplexity, valid_perplexity, ...), metrics.jsonl, curves.png, checkpoints/.
"""

from absl import app, flags, logging

from rnn_jax import runtime
from rnn_jax.data import load_corpus
from rnn_jax.lm_train import LMConfig, train_lm

PRESETS = {
    "small": dict(hidden=200, layers=2, seq_len=20, batch=20, lr=1.0, clip=5.0, epochs=13,
                  decay_start_epoch=4, decay_rate=0.5, init_scale=0.1, dropout=0.0),
    "medium": dict(hidden=650, layers=2, seq_len=35, batch=20, lr=1.0, clip=5.0, epochs=39,
                   decay_start_epoch=6, decay_rate=0.8, init_scale=0.05, dropout=0.5),
    "large": dict(hidden=1500, layers=2, seq_len=35, batch=20, lr=1.0, clip=10.0, epochs=55,
                  decay_start_epoch=14, decay_rate=1 / 1.15, init_scale=0.04, dropout=0.65),
}
PUBLISHED = {"small": (120.7, 114.5), "medium": (86.2, 82.7), "large": (82.2, 78.4)}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "small", list(PRESETS), "Zaremba et al. (2014) configuration.")
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics.jsonl, results.json).")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("smoke", False, "A seconds-long run of the same code path (tiny model, 30 steps).")
flags.DEFINE_integer("seed", 0, "Random seed (init, dropout).")
flags.DEFINE_float("epochs", None, "Override the preset's number of epochs.")
flags.DEFINE_integer("steps", 0, "If > 0, train this many steps instead of --epochs.")
flags.DEFINE_integer("eval_every", 0, "Steps between validations (0: once per epoch).")
flags.DEFINE_integer("log_every", 100, "Steps between train-metric log lines.")
flags.DEFINE_bool("progress", True, "Show the tqdm progress bar.")


def make_config() -> LMConfig:
  preset = dict(PRESETS[FLAGS.preset])
  if FLAGS.epochs is not None:
    preset["epochs"] = FLAGS.epochs
  config = LMConfig(dataset="ptb_word", cell="lstm", optimizer="sgd", schedule="step", reduction="sum",
                    clip_mode="norm", steps=FLAGS.steps, eval_every=FLAGS.eval_every, checkpoint_every=500,
                    log_every=FLAGS.log_every, seed=FLAGS.seed, **preset)
  if FLAGS.smoke:
    config.hidden, config.steps, config.eval_every, config.log_every = 16, 30, 15, 10
    config.eval_tokens = 2000
  return config


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (e.g. --workdir=/tmp/word_lm_small)")
  config = make_config()
  corpus = load_corpus("ptb_word")
  logging.info("corpus: %s", corpus.summary())
  published = PUBLISHED[FLAGS.preset]
  outcome = train_lm(config, corpus, FLAGS.workdir, resume=FLAGS.resume, progress=FLAGS.progress,
                     extra_config={"experiment": "word_lm", "preset": FLAGS.preset, "smoke": FLAGS.smoke,
                                   "published_valid_perplexity": published[0],
                                   "published_test_perplexity": published[1]})
  results = outcome.results
  print(f"word_lm {FLAGS.preset}: valid perplexity {results['valid_perplexity']:.1f}, "
        f"test perplexity {results['test_perplexity']:.1f} "
        f"(published {published[0]} / {published[1]}) after {results['epochs']:.2f} epochs")


if __name__ == "__main__":
  app.run(main)
