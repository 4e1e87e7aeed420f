"""Word-level Penn Treebank language model: Zaremba, Sutskever & Vinyals (2014), "small" and friends.

  python experiments/word_lm.py                              # the "small" run (CPU: hours)
  python experiments/word_lm.py --preset=medium              # accelerators
  python experiments/word_lm.py --resume                     # continue a stopped run exactly
  python experiments/word_lm.py --smoke                      # seconds, same code path
  python experiments/word_lm.py --sample --prime="the company"

Presets (Zaremba et al. 2014, Table 1; valid / test perplexity):
  small : 2x200 LSTM, T 20, B 20, SGD lr 1, clip 5, 13 epochs, lr x0.5 after epoch 4, U(+-0.1), no dropout
          -> 120.7 / 114.5
  medium: 2x650, T 35, dropout 0.5, 39 epochs, lr x0.8 after epoch 6, U(+-0.05)   -> 86.2 / 82.7
  large : 2x1500, T 35, dropout 0.65, clip 10, 55 epochs, lr /1.15 after epoch 14, U(+-0.04) -> 82.2 / 78.4
The default config is "small". The loss is summed over the T steps and averaged over the batch, as
in their code.

Deep RNNs (Pascanu, Gulcehre, Cho & Bengio 2013, arXiv:1312.6026): --cell=dts_rnn (a deep
transition with a shortcut, --transition_sizes), --output_layer_sizes (a deep output); both
together are their DOT(S)-RNN, test perplexity 107.5, and --cell=elman --num_layers=2 their
sRNN, 110.0 (the presets pascanu2013_srnn / _dts / _dots; drawn beside those models' curves).
The Zaremba et al. rows are drawn for LSTMs only. Writes results.json (valid_perplexity, test_perplexity, the published pair),
metrics.jsonl, curves.png, model.json, vocab.json and checkpoints/ under --workdir.
"""

import dataclasses

if __package__:
  from experiments import char_lm, common
else:  # run as a script: experiments/ is on sys.path
  import char_lm
  import common
from rnn_jax.lm_train import LMConfig, train_lm

PUBLISHED = {"small": (120.7, 114.5), "medium": (86.2, 82.7), "large": (82.2, 78.4)}
# Pascanu et al. 2013, PTB-word test perplexity (their validation figures are not reproduced here).
PASCANU2013 = {"srnn": 110.0, "dots": 107.5}


@dataclasses.dataclass(frozen=True)
class Config(LMConfig):
  """word_lm: Zaremba et al.'s "small" 2x200 LSTM on PTB words, SGD with a step schedule."""
  dataset: str = "ptb_word"
  hidden_size: int = 200
  num_layers: int = 2
  seq_len: int = 20
  batch_size: int = 20
  optimizer: str = "sgd"
  learning_rate: float = 1.0
  schedule: str = "step"
  decay_start_epoch: int = 4
  decay_rate: float = 0.5
  clip: float = 5.0
  epochs: float = 13.0
  init_scale: float = 0.1
  reduction: str = "sum"
  checkpoint_every: int = 500
  log_every: int = 100

_PASCANU2013_TRAINING = dict(optimizer="adam", learning_rate=1e-3, schedule="cosine", warmup_steps=200, clip=1.0,
                             reduction="mean", epochs=10.0, seq_len=35, init_scale=0.0)

PRESETS = {
    "small": {},
    "medium": dict(hidden_size=650, seq_len=35, epochs=39.0, decay_start_epoch=6, decay_rate=0.8,
                   init_scale=0.05, dropout=0.5),
    "large": dict(hidden_size=1500, seq_len=35, clip=10.0, epochs=55.0, decay_start_epoch=14,
                  decay_rate=1 / 1.15, init_scale=0.04, dropout=0.65),
    # Pascanu et al. 2013's PTB-word comparison. The paper's unit counts and training could NOT be
    # checked against its text here, so these sizes are ours: a 2x400 tanh sRNN (embed 400, 8.65M
    # parameters, most of them in E and W_hy), DT(S) with one 400-unit transition layer (exactly the
    # sRNN's count) and DOT(S) with a 385-unit deep output (+0.05%; lm_train.count_params); Adam 1e-3,
    # mean loss over T, clip 1, 10 epochs, no dropout.
    "pascanu2013_srnn": dict(cell="elman", num_layers=2, hidden_size=400, embed_size=400, **_PASCANU2013_TRAINING),
    "pascanu2013_dts": dict(cell="dts_rnn", num_layers=1, hidden_size=400, embed_size=400, **_PASCANU2013_TRAINING),
    "pascanu2013_dots": dict(cell="dts_rnn", num_layers=1, hidden_size=400, embed_size=400,
                             output_layer_sizes=(385,), **_PASCANU2013_TRAINING),
}
SMOKE = dict(hidden_size=16, steps=30, eval_every=15, log_every=10, eval_tokens=2000)


def published_for(config: Config) -> tuple:
  """(name, valid, test) of the Zaremba et al. row with this config's sizes (an LSTM), or None."""
  if config.cell != "lstm":
    return None
  for name, values in PRESETS.items():
    if name.startswith("pascanu2013"):
      continue
    merged = dataclasses.replace(Config(), **values)
    if (merged.hidden_size, merged.dropout, merged.seq_len) == (config.hidden_size, config.dropout,
                                                                config.seq_len):
      return (name, *PUBLISHED[name])
  return None


def pascanu_for(config: Config):
  """("srnn" or "dots", test perplexity) of Pascanu et al. 2013 for an sRNN (2 tanh layers) or a
  DOT(S)-RNN (dts_rnn with a deep output), or None."""
  if config.cell == "dts_rnn" and config.output_layer_sizes:
    return "dots", PASCANU2013["dots"]
  if config.cell in ("elman", "tanh") and config.num_layers == 2 and not config.output_layer_sizes:
    return "srnn", PASCANU2013["srnn"]
  return None


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train the word LM into ``workdir`` and return results.json's content."""
  published = published_for(config)
  reference = ({"perplexity": (published[1], f"Zaremba et al. 2014 {published[0]}, valid {published[1]}")}
               if published else None)
  deep = pascanu_for(config)
  if deep:
    label = {"srnn": "sRNN", "dots": "DOT(S)-RNN"}[deep[0]]
    reference = {"perplexity": (deep[1], f"{label}, Pascanu et al. 2013, test {deep[1]}")}
  outcome = train_lm(config, workdir, options or common.RunOptions(), experiment="word_lm",
                     reference=reference)
  extra = {}
  if published:
    extra = {"published_row": published[0], "published_valid_perplexity": published[1],
             "published_test_perplexity": published[2], "published_source": "Zaremba et al. 2014, Table 1"}
  if deep:
    extra = {"published_row": deep[0], "published_test_perplexity": deep[1],
             "published_source": "Pascanu et al. 2013 (arXiv:1312.6026)"}
  results = outcome.run.finish({**outcome.results, **extra})
  against = f" (published {published[1]} / {published[2]})" if published else ""
  if deep:
    against = f" (Pascanu et al. 2013: test {deep[1]})"
  print(f"word_lm: valid perplexity {results['valid_perplexity']:.1f}, test perplexity "
        f"{results['test_perplexity']:.1f}{against} after {results['epochs']:.2f} epochs")
  return results


EXPERIMENT = common.Experiment("word_lm", Config, train_and_evaluate, PRESETS, SMOKE, __doc__,
                               define_flags=char_lm.define_sampling_flags, infer=char_lm.sample_mode)

if __name__ == "__main__":
  common.main(EXPERIMENT)
