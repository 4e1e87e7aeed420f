"""The seeds' worked example: a character RNN that learns to complete "hell" with "o".

Vocabulary {h, e, l, o}, one-hot inputs x_t: [4], 3 hidden units, a tanh Elman cell
with a read-out:

  h_t = tanh(W_xh x_t + W_hh h_{t-1} + b)      W_xh: [3, 4], W_hh: [3, 3], b: [3]
  y_t = W_hy h_t + b_y                          W_hy: [4, 3], b_y: [4]
  p_t = softmax(y_t)                            the distribution of the next character

Input "hell", targets "ello". The script prints the forward pass step by step
(W_xh x_t, then W_hh h_{t-1} + b, then tanh, then W_hy h_t, then softmax), trains
with back-propagation through time (jax.grad through the scanned sequence, the
engine's clipped optimiser) until every step predicts its next character with
probability >= --min_probability, so that after "hell" the most likely character
is "o", and shows the probabilities before and after training.

  python experiments/hello.py --workdir=/tmp/hello

Outputs in --workdir: forward_before.txt, forward_after.txt, probabilities.png,
metrics.jsonl, results.json and checkpoints/ (--resume continues).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rnn_jax import losses, runtime, train
from rnn_jax.cells import Elman
from rnn_jax.checkpoint import CheckpointManager
from rnn_jax.sequence import run_cell

FLAGS = flags.FLAGS
flags.DEFINE_string("text", "hello", "The training word: input text[:-1], targets text[1:].")
flags.DEFINE_integer("hidden_size", 3, "Hidden units (3 in the seed).")
flags.DEFINE_enum("optimizer", "adam", train.OPTIMIZERS, "Optimiser.")
flags.DEFINE_float("learning_rate", 0.05, "Learning rate.")
flags.DEFINE_float("clip", 5.0, "Gradient-norm clipping threshold (0 disables).")
flags.DEFINE_float("min_probability", 0.9, "Train until every target char has at least this probability.")
flags.DEFINE_integer("check_every", 10, "Steps between checks of the predictions (and checkpoints).")
flags.DEFINE_integer("max_steps", 2000, "Give up after this many steps.")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights.")
flags.DEFINE_string("workdir", "/tmp/rnn_jax/hello", "Output directory.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("smoke", False, "At most 10 steps (the same code path; usually not yet learned).")


class Vocabulary4:
  """The characters of the training word in order of first appearance: "hello" -> h, e, l, o."""

  def __init__(self, text: str):
    if len(text) < 2:
      raise ValueError(f"--text must have at least 2 characters (an input and a target), got {text!r}")
    self.chars = list(dict.fromkeys(text))

  def one_hot(self, text: str) -> np.ndarray:
    """x_t = e_{index(c_t)}: [T, V] float32."""
    return np.eye(len(self.chars), dtype=np.float32)[[self.chars.index(c) for c in text]]


class RepeatBatch:
  """The one training example, every step (a resumable stream with no position)."""

  def __init__(self, batch):
    self.batch = batch

  def __next__(self):
    return self.batch

  def position(self) -> dict:
    return {}

  def seek(self, position: dict) -> None:
    del position


def forward_trace(cell: Elman, params, vocab: Vocabulary4, text: str) -> tuple[str, np.ndarray]:
  """The forward pass of ``text`` written out step by step; returns (the text, p: [T, V]).

  Each stage is computed from the params with NumPy and checked against the cell's own
  ``step`` (they must agree to float32 rounding).
  """
  w_xh, w_hh, b, w_hy, b_y = (np.asarray(params[k], np.float64) for k in ("w_xh", "w_hh", "b", "w_hy", "b_y"))
  fmt = lambda v: "[" + ", ".join(f"{x:+.4f}" for x in np.ravel(v)) + "]"
  lines = [f"vocabulary {vocab.chars} (one-hot), input {text!r}, hidden size {w_hh.shape[0]}",
           f"W_xh = {np.round(w_xh, 4).tolist()}", f"W_hh = {np.round(w_hh, 4).tolist()}",
           f"b = {fmt(b)}", f"W_hy = {np.round(w_hy, 4).tolist()}", f"b_y = {fmt(b_y)}", ""]
  h = np.zeros(w_hh.shape[0])
  carry = cell.initial_carry(params)
  probabilities = []
  for t, char in enumerate(text):
    x = vocab.one_hot(char)[0]
    input_term = w_xh @ x
    recurrent_term = w_hh @ h + b
    h = np.tanh(input_term + recurrent_term)
    y = w_hy @ h + b_y
    p = np.exp(y - y.max()) / np.exp(y - y.max()).sum()
    carry, cell_y = cell.step(params, carry, jnp.asarray(x))
    if not np.allclose(cell_y, y, atol=1e-5):
      raise AssertionError(f"step {t}: the written-out y_t {y} differs from the cell's {cell_y}")
    probabilities.append(p)
    lines += [f"t={t}  x_t = '{char}' = {fmt(x)}",
              f"  W_xh x_t              = {fmt(input_term)}",
              f"  W_hh h_(t-1) + b      = {fmt(recurrent_term)}",
              f"  h_t = tanh(sum)       = {fmt(h)}",
              f"  y_t = W_hy h_t + b_y  = {fmt(y)}",
              "  p_t = softmax(y_t)    = " + ", ".join(f"{c}:{q:.3f}" for c, q in zip(vocab.chars, p)),
              f"  predicted next char   = '{vocab.chars[int(p.argmax())]}'", ""]
  return "\n".join(lines), np.array(probabilities)


def plot_probabilities(path: str, vocab: Vocabulary4, text: str, before: np.ndarray, after: np.ndarray):
  """Two heat maps of p_t over the vocabulary, before and after training."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
  panels = ((axes[0], before, "before training"), (axes[1], after, "after training"))
  for axis, probabilities, title in panels:
    image = axis.imshow(probabilities.T, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(text)), [f"after '{c}'" for c in text], fontsize=8)
    axis.set_yticks(range(len(vocab.chars)), vocab.chars)
    axis.set_title(title)
    for t in range(len(text)):
      for v in range(len(vocab.chars)):
        axis.text(t, v, f"{probabilities[t, v]:.2f}", ha="center", va="center", fontsize=7, color="w")
  fig.colorbar(image, ax=axes, shrink=0.8)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  vocab = Vocabulary4(FLAGS.text)
  inputs, targets = FLAGS.text[:-1], FLAGS.text[1:]
  run = train.RunDir(FLAGS.workdir, train.script_flag_values())
  cell = Elman(FLAGS.hidden_size, activation="tanh", readout_size=len(vocab.chars))
  params = cell.init(jax.random.PRNGKey(FLAGS.seed), len(vocab.chars))
  xs = jnp.asarray(vocab.one_hot(inputs))
  target_ids = jnp.asarray([vocab.chars.index(c) for c in targets], jnp.int32)

  def loss_fn(params, batch, rng):
    """L = sum_t -log p_t[y_t]: BPTT is jax.grad of this through the scan."""
    del rng
    _, logits = run_cell(cell, params, batch["xs"])
    loss = losses.cross_entropy(logits, batch["targets"], reduction="sum")
    return loss, {"accuracy": losses.accuracy(logits, batch["targets"])}

  optimizer = train.make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, clip=FLAGS.clip or None)
  state = train.create_train_state(params, optimizer, jax.random.PRNGKey(FLAGS.seed))
  checkpoints = CheckpointManager(run.path("checkpoints"), keep=2)
  state, step = train.resume_or_refuse(checkpoints, state, run, FLAGS.resume)

  trace_before, before = forward_trace(cell, params, vocab, inputs)
  print("=== forward pass with the initial weights ===\n" + trace_before)
  run.write_text("forward_before.txt", trace_before)

  batch = {"xs": xs, "targets": target_ids}
  train_step = train.make_train_step(loss_fn, optimizer)
  stream = RepeatBatch(batch)
  max_steps = 10 if FLAGS.smoke else FLAGS.max_steps

  def predictions(state) -> str:
    _, logits = run_cell(cell, state.params, xs)
    return "".join(vocab.chars[i] for i in np.asarray(jnp.argmax(logits, axis=-1)))

  def learned(state) -> bool:
    """Every step predicts its target, each with probability >= --min_probability."""
    _, logits = run_cell(cell, state.params, xs)
    target_probability = jnp.take_along_axis(jax.nn.softmax(logits), target_ids[:, None], axis=-1)
    return predictions(state) == targets and float(target_probability.min()) >= FLAGS.min_probability

  def evaluate(state) -> dict:
    loss, aux = loss_fn(state.params, batch, None)
    return {"loss": float(loss), "accuracy": float(aux["accuracy"])}

  while not learned(state) and step < max_steps:
    result = train.fit(state, train_step, stream, num_steps=min(step + FLAGS.check_every, max_steps),
                       run=run, start_step=step, evaluate=evaluate, checkpoints=checkpoints,
                       log_every=FLAGS.check_every, progress=False)
    state, step = result.state, result.step
  success = learned(state)

  trace_after, after = forward_trace(cell, state.params, vocab, inputs)
  print(f"=== forward pass after {step} steps of BPTT ===\n" + trace_after)
  run.write_text("forward_after.txt", trace_after)
  plot_probabilities(run.path("probabilities.png"), vocab, inputs, before, after)
  last = vocab.chars.index(targets[-1])
  summary = (f"after {inputs!r} the model predicts {predictions(state)[-1]!r}: "
             f"p({targets[-1]!r}) = {before[-1, last]:.3f} before training, {after[-1, last]:.3f} after "
             f"{step} steps; predicted continuations {predictions(state)!r} (targets {targets!r})")
  print(summary)
  run.finish({"learned": success, "steps": step, "predicted": predictions(state), "targets": targets,
              "probabilities_before": {c: before[:, i] for i, c in enumerate(vocab.chars)},
              "probabilities_after": {c: after[:, i] for i, c in enumerate(vocab.chars)},
              f"p_last_{targets[-1]}_before": float(before[-1, last]),
              f"p_last_{targets[-1]}_after": float(after[-1, last]), "summary": summary})
  checkpoints.close()
  if not success and not FLAGS.smoke:
    raise SystemExit(f"hello: not learned after {step} steps; raise --max_steps or --learning_rate")


if __name__ == "__main__":
  app.run(main)
