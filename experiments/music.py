"""Polyphonic music: Bach chorales as piano rolls, NLL per time step of tanh, GRU and LSTM RNNs.

  python experiments/music.py                                       # tanh, GRU and LSTM, one table
  python experiments/music.py --cells=lstm --workdir=runs/music_lstm
  python experiments/music.py --preset=deep_transition --workdir=runs/music_dt   # tanh, DT-, DT(S)-RNN
  python experiments/music.py --cells=dts_rnn --output_layer_sizes=59 --workdir=runs/music_dots   # DOT(S)
  python experiments/music.py --cells=gru,lstm --hidden_size=64 --equal_params=false
  python experiments/music.py --smoke --workdir=/tmp/smoke          # seconds, same code path
  python experiments/music.py --workdir=runs/music --generate --seed_chord=50,57,62,66

Sequence modelling (Boulanger-Lewandowski et al. 2012; Chung et al. 2014, section 4): each
frame x_t in {0, 1}^88 (the piano keys sounding on a quarter-note beat) is predicted from
the frames before it with independent sigmoid outputs (rnn_jax.polyphonic.FrameModel),

    h_t = RNN(x_{t-1}, h_{t-1}),   p(x_t | x_<t) = prod_k sigma(o_tk)^x_tk (1 - sigma(o_tk))^(1 - x_tk),

trained and scored by the negative log-likelihood per time step, in nats. Each cell of
``cells`` is trained in its own sub-directory through the one training recipe; the best
checkpoint on validation NLL is tested.

Initial output bias (output_bias_init): by default b_y starts at each key's log-odds of
sounding in the training frames (polyphonic.marginal_log_odds; the prior initialisation of
Lin et al. 2017), so training starts at the marginal model's NLL (~11.6 nats) instead of
sigma(o) = 1/2 on all 88 keys (~61 nats). From the U(+-1/sqrt(fan_in)) draw (torch), the
first steps push every logit down by saturating the hidden units, and the models start slower
or, with a deep output, stay on the marginal model (docs/results.md, music). From the marginal
bias every model of the comparison reached its best validation NLL within 900 steps of Adam
at 2e-3 to 1e-2 and overfitted after, hence 2,000 steps with an evaluation every 100.

Sizes: Chung et al. 2014 compare cells of about equal parameter count. With
equal_params (the default) the LSTM has hidden_size units and every other cell the largest
hidden size whose model has no more parameters than that LSTM's
(rnn_jax.polyphonic.equal_parameter_sizes: hidden_size 36 gives tanh 81, GRU 43 and LSTM 36
units, about 21k parameters each); with equal_params=false every cell has hidden_size units.

Deep RNNs (Pascanu et al. 2013, arXiv:1312.6026): the cells dt_rnn (a deep transition, an MLP
from (x_t, h_{t-1}) to h_t) and dts_rnn (DT(S): plus a shortcut from h_{t-1} into the last
transition layer) are rnn_jax.deep_transition.DeepTransition; transition_sizes sets their
intermediate layers (empty: one layer of the cell's hidden size). output_layer_sizes gives
every model a deep output o_t = W_hy tanh(V h_t + c) + b_y (the DO-RNN), so dts_rnn with
output_layer_sizes is the DOT(S)-RNN, and elman with num_layers=2 the stacked sRNN. No
published figure is drawn for the deep cells (see docs/results.md).

Reference: Chung et al. 2014 (arXiv:1412.3555), JSB Chorales test NLL per time step: tanh
9.10, GRU 8.54, LSTM 8.67, drawn as dashed lines and stored in results.json. Our chorales
come from music21 with our own 60/20/20 split (rnn_jax.data.chorales), not the JSB split, so
the figures are comparable in kind but not number for number.

One-to-many generation: the cell with the best validation NLL starts from seed_chord and
samples generate_frames frames, x_{t+1} ~ Bernoulli(sigma(o_{t+1})), written as
generated.mid, generated.npy and generated.png. --generate redoes this from the run
directory alone.

Outputs in --workdir: config.json, results.json (the table), metrics.jsonl (every cell's
records with a "cell" field), table.txt, comparison.png, generated.{mid,npy,png}, and one
sub-directory per cell with its config.json, metrics.jsonl, results.json, curves.png,
model.json and checkpoints/.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import cells, load_run, plots, polyphonic
from rnn_jax.config import RecurrentRegularizerConfig, TrainingConfig, field
from rnn_jax.data import chorales
from rnn_jax.polyphonic import FrameModel
from rnn_jax.rundir import RunDir, RunOptions, read_json, read_metrics
from rnn_jax.train import train_and_test

CELL_NAMES = ("elman", "gru", "lstm")
DEEP_CELL_NAMES = ("dt_rnn", "dts_rnn")   # Pascanu et al. 2013: DT-RNN and DT(S)-RNN
CELL_CHOICES = CELL_NAMES + DEEP_CELL_NAMES
CHUNG_2014_JSB_TEST_NLL = {"elman": 9.10, "gru": 8.54, "lstm": 8.67}
CHUNG_2014_SOURCE = "Chung et al. 2014 (arXiv:1412.3555), JSB Chorales test NLL per time step"
SPLIT_RULE = "music21 Riemenschneider order, index % 5: 3 -> valid, 4 -> test, else train"
HIGHEST_MIDI = chorales.LOWEST_MIDI + chorales.NUM_PITCHES - 1
OUTPUT_BIAS_INITS = ("marginal", "torch")


@dataclasses.dataclass(frozen=True)
class Config(TrainingConfig, RecurrentRegularizerConfig):
  """music: tanh, GRU and LSTM frame models on the Bach chorales with Adam and clipping."""
  cells: tuple[str, ...] = field(CELL_NAMES, "Cells to train and compare (elman is the tanh RNN; dt_rnn and "
                                 "dts_rnn the deep-transition RNNs of Pascanu et al. 2013).",
                                 choices=CELL_CHOICES, fixed=True)
  hidden_size: int = field(36, "Hidden size H of the LSTM, and of every cell when equal_params is false.",
                           minimum=1, fixed=True)
  equal_params: bool = field(True, "Give each other cell the largest hidden size with no more parameters "
                             "than the LSTM with hidden_size units (Chung et al. 2014 compare equal sizes).",
                             fixed=True)
  num_layers: int = field(1, "Stacked RNN layers.", minimum=1, fixed=True)
  transition_sizes: tuple[int, ...] = field((), "Sizes of the intermediate transition layers of dt_rnn and "
                                            "dts_rnn; empty: one layer of the cell's hidden size.",
                                            minimum=1, fixed=True)
  output_layer_sizes: tuple[int, ...] = field((), "Sizes of the intermediate tanh layers of a deep output "
                                              "between h_t and the sigmoid outputs (DO-RNN, Pascanu et al. "
                                              "2013); empty: o_t = W_hy h_t + b_y.", minimum=1, fixed=True)
  dropout: float = field(0.0, "Dropout between stacked layers (training only).", minimum=0.0, maximum=0.99)
  output_bias_init: str = field("marginal", "Initial output bias b_y: marginal sets sigma(b_y) to each key's "
                                "frequency in the training frames (polyphonic.marginal_log_odds); torch "
                                "draws it from U(+-1/sqrt(fan_in)) like the weights.",
                                choices=OUTPUT_BIAS_INITS, fixed=True)
  num_chorales: int = field(0, "Chorales read, in catalogue order; 0 reads all 371.", minimum=0, fixed=True)
  data_dir: str = field("", "Cache directory of the parsed chorales; empty: $RNN_JAX_CACHE or "
                        "~/.cache/rnn_jax.")
  seed_chord: tuple[int, ...] = field((48, 55, 64, 72), "MIDI pitches of the chord that starts the generated "
                                      "chorale (C3 G3 E4 C5).", minimum=chorales.LOWEST_MIDI,
                                      maximum=HIGHEST_MIDI)
  generate_frames: int = field(64, "Frames (quarter notes) of the generated chorale.", minimum=1)
  batch_size: int = 16
  steps: int = 2000
  learning_rate: float = 5e-3
  clip: float = 1.0
  eval_every: int = 100

  def validate(self) -> None:
    super().validate()
    if not self.cells:
      raise ValueError(f"cells must name at least one cell of {list(CELL_CHOICES)}")
    if len(set(self.cells)) != len(self.cells):
      raise ValueError(f"cells lists a cell twice: {list(self.cells)}")
    if not self.seed_chord:
      raise ValueError("seed_chord must hold at least one MIDI pitch")


PRESETS = {
    # The comparison of Chung et al. 2014 spelled out (today's defaults): one layer, ~21k parameters each.
    "chung2014": dict(cells=CELL_NAMES, hidden_size=36, equal_params=True, num_layers=1, steps=2000),
    # The tanh RNN against the deep-transition RNNs of Pascanu et al. 2013 at the same budget (~21k
    # parameters, the LSTM of 36 units); not the paper's sizes or training.
    "deep_transition": dict(cells=("elman", "dt_rnn", "dts_rnn"), hidden_size=36, equal_params=True,
                            num_layers=1, steps=2000),
}
SMOKE = dict(hidden_size=8, batch_size=4, steps=8, eval_every=4, log_every=4, generate_frames=16,
             num_chorales=15)


def chord_frame(pitches) -> np.ndarray:
  """MIDI pitches -> a multi-hot frame [88] (pitch p sets key p - 21)."""
  pitches = [int(p) for p in pitches]
  bad = [p for p in pitches if not chorales.LOWEST_MIDI <= p <= HIGHEST_MIDI]
  if bad or not pitches:
    raise ValueError(f"seed_chord: MIDI pitches must lie in [{chorales.LOWEST_MIDI}, {HIGHEST_MIDI}], "
                     f"got {pitches}")
  frame = np.zeros((chorales.NUM_PITCHES,), np.float32)
  frame[np.asarray(pitches) - chorales.LOWEST_MIDI] = 1.0
  return frame


def chung_2014_figure(config: Config, cell: str):
  """Chung et al. 2014's JSB test NLL for ``cell``, or None where their model is not ours: the
  deep-transition cells, a stacked network (num_layers > 1) or a deep output."""
  if config.num_layers > 1 or config.output_layer_sizes:
    return None
  return CHUNG_2014_JSB_TEST_NLL.get(cell)


def cell_options(config: Config, cell: str) -> dict:
  """The hyper-parameters ``config`` gives ``cell`` beyond its registry preset (transition_sizes)."""
  if cell in DEEP_CELL_NAMES and config.transition_sizes:
    return {"transition_sizes": tuple(config.transition_sizes)}
  return {}


def architecture(config: Config, cell: str, hidden_size: int) -> str:
  """A short description for titles: "1x59, transition 59, deep output 50"."""
  parts = [f"{config.num_layers}x{hidden_size}"]
  if cell in DEEP_CELL_NAMES:
    parts.append("transition " + ",".join(str(s) for s in (config.transition_sizes or (hidden_size,))))
  if config.output_layer_sizes:
    parts.append("deep output " + ",".join(str(s) for s in config.output_layer_sizes))
  return ", ".join(parts)


def train_cell(run: RunDir, config: Config, cell: str, hidden_size: int, splits, options: RunOptions) -> dict:
  """Train (or resume) one cell in <workdir>/<cell>; returns its row of the table."""
  child = run.child(cell, config, label=f"music {cell}")
  model = FrameModel(cells.make_cell(cell, hidden_size, **cell_options(config, cell)),
                     num_pitches=chorales.NUM_PITCHES, num_layers=config.num_layers, dropout=config.dropout,
                     output_layer_sizes=tuple(config.output_layer_sizes), **config.regularizer_options())
  child.save_model(model, best_metric="nll", best_mode="min", cell=cell, hidden_size=hidden_size)
  output_bias = (polyphonic.marginal_log_odds(splits["train"], chorales.NUM_PITCHES)
                 if config.output_bias_init == "marginal" else None)
  params = model.init(jax.random.PRNGKey(config.seed), output_bias=output_bias)
  num_params = polyphonic.count_params(model)
  stream = chorales.RollBatches(splits["train"], config.batch_size, seed=config.seed)
  logging.info("music %s: H=%d, %d params", cell, hidden_size, num_params)

  def loss_fn(params, batch, rng):
    return model.nll(params, batch["frames"], batch["lengths"], train=True, rng=rng), {}

  def evaluate(params, split):
    return {"nll": polyphonic.nll_per_step(model, params, splits[split], config.batch_size)}

  frames_per_step = int(config.batch_size * np.mean([len(r) for r in splits["train"]]))
  steps_per_epoch = max(1, len(splits["train"]) // config.batch_size)
  outcome = train_and_test(child, config, params=params, loss_fn=loss_fn, stream=stream,
                           steps_per_epoch=steps_per_epoch, evaluate=evaluate, best_metric="nll",
                           tokens_per_step=frames_per_step, progress=options.progress)
  published = chung_2014_figure(config, cell)
  row = {"cell": cell, "hidden_size": hidden_size, "num_params": num_params, "best_step": outcome.best_step,
         "steps": outcome.step,
         "train_nll": polyphonic.nll_per_step(model, outcome.params, splits["train"], config.batch_size),
         "valid_nll": outcome.results["valid_nll"], "test_nll": outcome.results["test_nll"],
         "chung_2014_jsb_test_nll": published}
  reference = {} if published is None else {"nll": (published, f"Chung et al. 2014 JSB test ({published:.2f})")}
  plots.plot_run(child.workdir, f"music {cell}: {architecture(config, cell, hidden_size)} ({num_params} params) "
                 f"on Bach chorales", metrics=["loss", "nll"],
                 labels={"loss": "training NLL per time step (nats)",
                         "nll": "held-out NLL per time step (nats)"},
                 reference=reference, final={"test NLL": row["test_nll"]})
  child.finish({**outcome.results, **row})
  return row


def format_table(rows) -> str:
  lines = [f"{'cell':<8} {'H':>4} {'params':>7} {'train':>7} {'valid':>7} {'test':>7} "
           f"{'Chung 2014 JSB test':>20}"]
  for row in rows:
    published = row["chung_2014_jsb_test_nll"]
    published = "-" if published is None else f"{published:.2f}"
    lines.append(f"{row['cell']:<8} {row['hidden_size']:>4} {row['num_params']:>7} {row['train_nll']:>7.3f} "
                 f"{row['valid_nll']:>7.3f} {row['test_nll']:>7.3f} {published:>20}")
  return "\n".join(lines) + "\n(NLL per time step in nats; our music21 split differs from the JSB split)"


def write_generated(workdir: str, cell: str, seed_chord, num_frames: int, seed: int) -> dict:
  """Sample a chorale from the best checkpoint of <workdir>/<cell>, from that run directory alone.

  Writes generated.mid, generated.npy and generated.png in ``workdir``; returns their summary.
  """
  seed_frame = chord_frame(seed_chord)
  loaded = load_run(os.path.join(workdir, cell))
  generated = loaded.model.generate(loaded.params, jnp.asarray(seed_frame), num_frames,
                                    jax.random.PRNGKey(seed + 1))
  generated = np.asarray(generated).astype(np.uint8)
  midi_path = chorales.roll_to_score(generated).write("midi", fp=os.path.join(workdir, "generated.mid"))
  np.save(os.path.join(workdir, "generated.npy"), generated)
  hidden = loaded.extra.get("hidden_size", "?")
  png_path = chorales.plot_piano_roll(
      generated, os.path.join(workdir, "generated.png"),
      f"music: {num_frames} quarter notes sampled from {cell} (H={hidden}, step {loaded.step}), "
      f"seed chord MIDI {','.join(str(int(p)) for p in seed_chord)}")
  return {"cell": cell, "step": loaded.step, "frames": int(generated.shape[0]),
          "seed_chord": [int(p) for p in seed_chord],
          "mean_notes_per_frame": float(generated.sum(axis=1).mean()), "midi": str(midi_path),
          "png": png_path}


def merge_metrics(run: RunDir, names) -> None:
  """<workdir>/metrics.jsonl: every cell's records, each with a "cell" field."""
  lines = [json.dumps({**record, "cell": name}) for name in names
           for record in read_metrics(os.path.join(run.workdir, name))]
  run.write_text("metrics.jsonl", "\n".join(lines) + "\n")


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train and compare every cell of ``config.cells`` in ``workdir``; returns results.json's content."""
  options = options or RunOptions()
  if config.equal_params:
    sizes = polyphonic.equal_parameter_sizes(config.cells, config.hidden_size,
                                             num_pitches=chorales.NUM_PITCHES, num_layers=config.num_layers,
                                             output_layer_sizes=tuple(config.output_layer_sizes),
                                             cell_options={cell: cell_options(config, cell)
                                                           for cell in config.cells})
  else:
    sizes = {cell: config.hidden_size for cell in config.cells}
  run = RunDir(workdir, "music", config, options, label="music")
  splits, _ = chorales.load_chorales(config.data_dir or None, limit=config.num_chorales or None,
                                     progress=True)
  for split, rolls in splits.items():
    run.check_data(f"chorales {split}", rolls)
  if config.batch_size > len(splits["train"]):
    raise ValueError(f"batch_size={config.batch_size} exceeds the {len(splits['train'])} training chorales")
  counts = {split: len(rolls) for split, rolls in splits.items()}
  frames = {split: int(sum(len(r) for r in rolls)) for split, rolls in splits.items()}
  logging.info("music: chorales %s, frames %s (train/valid/test), hidden sizes %s", counts, frames, sizes)
  rows = [train_cell(run, config, cell, sizes[cell], splits, options) for cell in config.cells]
  merge_metrics(run, config.cells)

  best = min(rows, key=lambda row: row["valid_nll"])
  generated = write_generated(run.workdir, best["cell"], config.seed_chord, config.generate_frames,
                              config.seed)
  table = format_table(rows)
  print(table)
  run.write_text("table.txt", table + "\n")
  parameters = sorted({row["num_params"] for row in rows})
  counted = f"{parameters[0]}" if len(parameters) == 1 else f"{parameters[0]}-{parameters[-1]}"
  title = (f"music: Bach chorales ({counts['train']} train chorales), "
           + ", ".join(f"{row['cell']} H={row['hidden_size']}" for row in rows) + f" ({counted} params)")
  if config.output_layer_sizes:
    title += ", deep output " + ",".join(str(size) for size in config.output_layer_sizes)
  plots.plot_comparison(
      {row["cell"]: run.path(row["cell"]) for row in rows}, ["nll"], title, run.path("comparison.png"),
      labels={"loss": "training NLL per time step (nats)", "nll": "validation NLL per time step (nats)"},
      reference={"nll": {row["cell"]: (row["chung_2014_jsb_test_nll"],
                                       f"{row['cell']}: Chung et al. 2014 JSB test "
                                       f"{row['chung_2014_jsb_test_nll']:.2f}") for row in rows
                         if row["chung_2014_jsb_test_nll"] is not None}},
      final={row["cell"]: f"test {row['test_nll']:.3f}" for row in rows})
  results = {"cells": rows, "chorales": counts, "frames": frames, "split": SPLIT_RULE,
             "published": {"source": CHUNG_2014_SOURCE, "test_nll": CHUNG_2014_JSB_TEST_NLL,
                           "note": "JSB split of Boulanger-Lewandowski et al. 2012; ours differs"},
             "generated": generated}
  for row in rows:
    results.update({f"{row['cell']}_{split}_nll": row[f"{split}_nll"] for split in ("valid", "test")})
  return run.finish(results)


# ---------------------------------------------------------------------------
# --generate: a chorale from a trained run directory alone
# ---------------------------------------------------------------------------

def define_generate_flags(flag_values) -> None:
  flags.DEFINE_bool("generate", False, "Only sample a chorale from the cell with the best validation NLL in "
                    "--workdir (with --seed_chord, --generate_frames and --seed).", flag_values=flag_values)


def generate_mode(flag_values, workdir: str) -> bool:
  if not flag_values.generate:
    return False
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} holds no finished music run (train into it first)")
  rows = read_json(path)["cells"]
  best = min(rows, key=lambda row: row["valid_nll"])["cell"]
  summary = write_generated(workdir, best, [int(p) for p in flag_values.seed_chord],
                            flag_values.generate_frames, flag_values.seed)
  print(f"music: {summary['frames']} frames sampled from {best} (step {summary['step']}), "
        f"{summary['mean_notes_per_frame']:.2f} notes per frame: {summary['midi']}, {summary['png']}")
  return True


EXPERIMENT = common.Experiment("music", Config, train_and_evaluate, PRESETS, SMOKE, __doc__,
                               define_flags=define_generate_flags, infer=generate_mode)

if __name__ == "__main__":
  common.main(EXPERIMENT)
