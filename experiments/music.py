"""Polyphonic music: Bach chorales as piano rolls, NLL per time step, and a generated chorale.

  python experiments/music.py --workdir=/tmp/music                  # tanh, GRU and LSTM, one table
  python experiments/music.py --cells=lstm --workdir=/tmp/music_lstm
  python experiments/music.py --smoke --workdir=/tmp/smoke          # seconds, same code path

Sequence modelling: each frame (88 piano keys, one per quarter note) is predicted from the
frames before it with independent sigmoid outputs (rnn_jax.polyphonic.FrameModel); the
score is the negative log-likelihood per time step on held-out chorales, in nats, as in
Chung et al. 2014 (JSB test NLL: tanh 9.10, GRU 8.54, LSTM 8.67). Our chorales come from
music21 with our own 60/20/20 split (rnn_jax.data.chorales), not the JSB split, so the
figures are comparable in kind but not number for number.

One-to-many generation: the cell with the best validation NLL starts from --seed_chord and
samples --generate_frames frames, written as generated.mid and generated.png.

Outputs in --workdir: results.json (the table), metrics.jsonl (all cells, with a "cell"
field), comparison.png, generated.mid, generated.png, and one sub-directory per cell with
its metrics.jsonl, results.json, curves.png and checkpoints (last --keep plus the best).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rnn_jax import cells, runtime, train
from rnn_jax.checkpoint import CheckpointManager
from rnn_jax.data import chorales
from rnn_jax.polyphonic import FrameModel

CHUNG_2014_JSB_TEST_NLL = {"elman": 9.10, "gru": 8.54, "lstm": 8.67}

FLAGS = flags.FLAGS
flags.DEFINE_list("cells", ["elman", "gru", "lstm"], "Cells to train and compare (elman = tanh RNN).")
flags.DEFINE_list("hidden_sizes", ["80", "44", "36"], "Hidden size per cell of --cells (default: about "
                  "21k parameters each).")
flags.DEFINE_integer("num_layers", 1, "Stacked RNN layers.")
flags.DEFINE_float("dropout", 0.0, "Dropout between stacked layers.")
flags.DEFINE_integer("batch_size", 16, "Chorales per training batch.")
flags.DEFINE_integer("steps", 5000, "Training steps per cell.")
train.define_optimizer_flags(learning_rate=5e-3, clip=1.0)
flags.DEFINE_integer("eval_every", 500, "Steps between validations.")
flags.DEFINE_integer("log_every", 50, "Steps between train log lines.")
flags.DEFINE_integer("keep", 2, "Checkpoints kept per cell (plus the best).")
flags.DEFINE_list("seed_chord", ["48", "55", "64", "72"], "MIDI pitches of the chord that starts the "
                  "generated chorale (default C3 G3 E4 C5).")
flags.DEFINE_integer("generate_frames", 64, "Frames (quarter notes) of the generated chorale.")
flags.DEFINE_integer("seed", 0, "Seed of the init, the batch order and the sampling.")
flags.DEFINE_string("data_dir", None, "Cache directory of the parsed chorales (default ~/.cache/rnn_jax).")
flags.DEFINE_string("workdir", "/tmp/rnn_jax/music", "Output directory.")
flags.DEFINE_bool("resume", False, "Continue each cell from its latest checkpoint in --workdir.")
flags.DEFINE_bool("smoke", False, "Seconds-long run of the same code path on 15 chorales.")

SMOKE_CHORALES = 15


def parse_settings() -> tuple[dict, np.ndarray]:
  """{cell: hidden size} and the seed chord as a multi-hot frame [88]; UsageError on bad flags."""
  unknown = [c for c in FLAGS.cells if c not in ("elman", "gru", "lstm")]
  if unknown or not FLAGS.cells:
    raise app.UsageError(f"--cells: unknown {unknown}; expected a list from ['elman', 'gru', 'lstm']")
  if len(FLAGS.hidden_sizes) != len(FLAGS.cells):
    raise app.UsageError(f"--hidden_sizes has {len(FLAGS.hidden_sizes)} entries, expected one per cell "
                         f"of --cells ({len(FLAGS.cells)})")
  try:
    sizes = {cell: int(size) for cell, size in zip(FLAGS.cells, FLAGS.hidden_sizes)}
    pitches = [int(p) for p in FLAGS.seed_chord]
  except ValueError as error:
    raise app.UsageError(f"--hidden_sizes and --seed_chord must be integers: {error}") from error
  bad = [p for p in pitches if not chorales.LOWEST_MIDI <= p < chorales.LOWEST_MIDI + chorales.NUM_PITCHES]
  if bad or not pitches:
    raise app.UsageError(f"--seed_chord: MIDI pitches must lie in [{chorales.LOWEST_MIDI}, "
                         f"{chorales.LOWEST_MIDI + chorales.NUM_PITCHES - 1}], got {FLAGS.seed_chord}")
  if any(size < 1 for size in sizes.values()) or FLAGS.steps < 1 or FLAGS.batch_size < 1:
    raise app.UsageError("--hidden_sizes, --steps and --batch_size must be positive")
  seed_frame = np.zeros((chorales.NUM_PITCHES,), np.float32)
  seed_frame[np.asarray(pitches) - chorales.LOWEST_MIDI] = 1.0
  return sizes, seed_frame


def nll_per_step(nll_fn, params, rolls, batch_size: int) -> float:
  """NLL per time step over every frame of ``rolls`` (frame-weighted over batches), in nats."""
  total = frames = 0.0
  ordered = sorted(rolls, key=len)
  for start in range(0, len(ordered), batch_size):
    batch = chorales.batch_rolls(ordered[start:start + batch_size], pad_multiple=16)
    count = float(np.sum(batch["lengths"]))
    total += float(nll_fn(params, jnp.asarray(batch["frames"]), jnp.asarray(batch["lengths"]))) * count
    frames += count
  return total / frames


def train_cell(cell: str, hidden_size: int, splits, config: dict) -> dict:
  """Train (or resume) one cell; returns its best-checkpoint valid and test NLL per time step."""
  model = FrameModel(cells.make_cell(cell, hidden_size), num_pitches=chorales.NUM_PITCHES,
                     num_layers=FLAGS.num_layers, dropout=FLAGS.dropout)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(FLAGS.seed))
  optimizer = train.optimizer_from_flags()
  state = train.create_train_state(model.init(init_key), optimizer, train_key)
  num_params = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
  batch_size = min(FLAGS.batch_size, len(splits["train"]))
  stream = chorales.RollBatches(splits["train"], batch_size, seed=FLAGS.seed)
  run = train.RunDir(os.path.join(FLAGS.workdir, cell), {**config, "cell": cell, "hidden_size": hidden_size,
                                                          "num_params": num_params})
  checkpoints = CheckpointManager(run.path("checkpoints"), keep=FLAGS.keep, best_metric="nll")
  state, start_step = train.resume_or_refuse(checkpoints, state, run, FLAGS.resume, stream, label=cell)

  def loss_fn(params, batch, rng):
    return model.nll(params, batch["frames"], batch["lengths"], train=True, dropout_key=rng), {}

  train_step = train.make_train_step(loss_fn, optimizer)
  nll_fn = jax.jit(lambda params, frames, lengths: model.nll(params, frames, lengths))
  frames_per_step = batch_size * float(np.mean([len(r) for r in splits["train"]]))
  started = time.time()
  outcome = train.fit(state, train_step, stream, num_steps=FLAGS.steps, run=run, start_step=start_step,
                      evaluate=lambda s: {"nll": nll_per_step(nll_fn, s.params, splits["valid"], batch_size)},
                      eval_every=FLAGS.eval_every, checkpoints=checkpoints, checkpoint_every=FLAGS.eval_every,
                      best_metric="nll", log_every=min(FLAGS.log_every, FLAGS.steps),
                      tokens_per_step=frames_per_step, progress=not FLAGS.smoke)
  best_step = checkpoints.best_step()
  best_state, _ = checkpoints.restore(state, step=best_step)
  result = {"cell": cell, "hidden_size": hidden_size, "num_params": num_params, "best_step": best_step,
            "steps": outcome.step, "train_seconds_this_process": time.time() - started}
  for split in ("train", "valid", "test"):
    result[f"{split}_nll"] = nll_per_step(nll_fn, best_state.params, splits[split], batch_size)
  result["chung_2014_jsb_test_nll"] = CHUNG_2014_JSB_TEST_NLL[cell]
  run.log(outcome.step, "test", test_nll=result["test_nll"])
  run.finish(result)
  checkpoints.close()
  return {**result, "model": model, "params": best_state.params}


def piano_roll_png(roll: np.ndarray, path: str, title: str) -> str:
  """Pitch (MIDI) against time (quarter notes), one dark cell per sounding note."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  sounding = np.where(roll.any(axis=0))[0]
  low, high = (sounding.min(), sounding.max()) if sounding.size else (27, 60)
  low, high = max(low - 3, 0), min(high + 3, chorales.NUM_PITCHES - 1)
  fig, axis = plt.subplots(figsize=(8, 3.5))
  axis.imshow(roll[:, low:high + 1].T, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
              extent=(0, roll.shape[0], low + chorales.LOWEST_MIDI - 0.5, high + chorales.LOWEST_MIDI + 0.5))
  axis.set_xlabel("time (quarter notes)")
  axis.set_ylabel("MIDI pitch")
  axis.set_title(title)
  return train.save_figure(fig, path)


def format_table(rows) -> str:
  lines = [f"{'cell':<8} {'H':>4} {'params':>7} {'train':>7} {'valid':>7} {'test':>7} "
           f"{'Chung 2014 JSB test':>20}"]
  for row in rows:
    lines.append(f"{row['cell']:<8} {row['hidden_size']:>4} {row['num_params']:>7} {row['train_nll']:>7.3f} "
                 f"{row['valid_nll']:>7.3f} {row['test_nll']:>7.3f} {row['chung_2014_jsb_test_nll']:>20.2f}")
  return "\n".join(lines) + "\n(NLL per time step in nats; our music21 split differs from the JSB split)"


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if FLAGS.smoke:
    FLAGS.hidden_sizes = ["8"] * len(FLAGS.cells)
    FLAGS.batch_size, FLAGS.eval_every, FLAGS.log_every, FLAGS.generate_frames = 4, 4, 4, 16
    if not FLAGS["steps"].present:
      FLAGS.steps = 8
  sizes, seed_frame = parse_settings()
  config = train.script_flag_values()
  run = train.RunDir(FLAGS.workdir, config)
  splits, titles = chorales.load_chorales(FLAGS.data_dir, limit=SMOKE_CHORALES if FLAGS.smoke else None,
                                          progress=True)
  counts = {split: len(rolls) for split, rolls in splits.items()}
  frames = {split: int(sum(len(r) for r in rolls)) for split, rolls in splits.items()}
  logging.info("chorales: %s pieces, %s frames (train/valid/test)", counts, frames)
  rows = [train_cell(cell, sizes[cell], splits, {**config, "chorales": counts, "frames": frames})
          for cell in FLAGS.cells]
  train.merge_run_metrics(FLAGS.workdir, FLAGS.cells, run.metrics_path)

  best = min(rows, key=lambda row: row["valid_nll"])
  generated = best["model"].generate(best["params"], jnp.asarray(seed_frame), FLAGS.generate_frames,
                                     jax.random.PRNGKey(FLAGS.seed + 1))
  generated = np.asarray(generated).astype(np.uint8)
  midi_path = chorales.roll_to_score(generated).write("midi", fp=run.path("generated.mid"))
  png_path = piano_roll_png(generated, run.path("generated.png"),
                            f"generated by {best['cell']} from chord {','.join(FLAGS.seed_chord)}")
  np.save(run.path("generated.npy"), generated)
  table = format_table(rows)
  print(table)
  run.write_text("table.txt", table + "\n")
  train.plot_runs(FLAGS.workdir, FLAGS.cells, "nll", ylabel="validation NLL per time step (nats)",
                  title="Bach chorales (music21)")
  results = {"cells": [{k: v for k, v in row.items() if k not in ("model", "params")} for row in rows],
             "chorales": counts, "frames": frames,
             "split": "music21 Riemenschneider order, index % 5: 3 -> valid, 4 -> test, else train",
             "published": {"source": "Chung et al. 2014 (arXiv:1412.3555), JSB Chorales test NLL "
                                     "per time step",
                           "test_nll": CHUNG_2014_JSB_TEST_NLL,
                           "note": "JSB split of Boulanger-Lewandowski et al. 2012; ours differs"},
             "generated": {"cell": best["cell"], "frames": int(generated.shape[0]),
                           "mean_notes_per_frame": float(generated.sum(axis=1).mean()),
                           "midi": str(midi_path), "png": png_path}}
  for row in rows:
    results[f"{row['cell']}_test_nll"] = row["test_nll"]
  run.finish(results, plot=False)


if __name__ == "__main__":
  app.run(main)
