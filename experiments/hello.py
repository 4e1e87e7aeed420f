"""The worked example: a character RNN that learns to complete "hell" with "o".

Vocabulary {h, e, l, o}, one-hot inputs x_t: [4], 3 hidden units, a tanh Elman cell
with a read-out:

  h_t = tanh(W_xh x_t + W_hh h_{t-1} + b)      W_xh: [3, 4], W_hh: [3, 3], b: [3]
  y_t = W_hy h_t + b_y                          W_hy: [4, 3], b_y: [4]
  p_t = softmax(y_t)                            the distribution of the next character

Input "hell", targets "ello"; the loss is L = sum_t -log p_t[target_t]. The script prints
the forward pass step by step (W_xh x_t, then W_hh h_{t-1} + b, then tanh, then W_hy h_t,
then softmax), trains with back-propagation through time (jax.grad through the scanned
sequence, Adam with the gradient norm clipped at 5) until every step gives its target
character a probability >= min_probability (checked every eval_every steps), so that after
"hell" the most likely character is "o", and shows the probabilities before and after.

  python experiments/hello.py                                   # learns in about 30 steps
  python experiments/hello.py --text=abcab --hidden_size=4      # another word
  python experiments/hello.py --smoke                           # 10 steps, usually not yet learned

The word is the only data, so the "valid" evaluation is the training word itself. Outputs
in --workdir: forward_before.txt, forward_after.txt, probabilities.png, curves.png,
config.json, metrics.jsonl, results.json, model.json, vocab.json and checkpoints/
(--resume continues; ``rnn_jax.load_run`` reloads the trained model).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import losses, plots
from rnn_jax.cells import Elman
from rnn_jax.config import TrainingConfig, field
from rnn_jax.lab import CellModel
from rnn_jax.rundir import RunDir, RunOptions, read_metrics
from rnn_jax.train import train_and_test


@dataclasses.dataclass(frozen=True)
class Config(TrainingConfig):
  """hello: a tanh Elman RNN trained by BPTT on one word until it predicts every next character."""
  text: str = field("hello", "The training word: inputs text[:-1], targets text[1:].", fixed=True)
  hidden_size: int = field(3, "Hidden units H of the tanh Elman cell.", minimum=1, fixed=True)
  min_probability: float = field(0.9, "Stop when every target character has at least this probability.",
                                 minimum=0.0, maximum=1.0)
  batch_size: int = field(1, "Sequences per batch: the one training word.", minimum=1, maximum=1, fixed=True)
  steps: int = field(2000, "Give up after this many steps; training stops as soon as the word is learned.",
                     minimum=1)
  epochs: float = field(1.0, "Not used: the run has a step budget (one step is one pass over the word).",
                        minimum=0.0)
  eval_every: int = field(10, "Steps between checks of the predictions (and checkpoints); 0 checks every "
                          "step.", minimum=0)
  learning_rate: float = 0.05
  clip: float = 5.0
  log_every: int = 5

  def validate(self) -> None:
    super().validate()
    if len(self.text) < 2:
      raise ValueError(f"text must have at least 2 characters (an input and a target), got {self.text!r}")


PRESETS = {}
SMOKE = dict(steps=10)


class CharVocabulary:
  """The characters of the training word in order of first appearance: "hello" -> h, e, l, o."""

  def __init__(self, text: str):
    self.tokens = list(dict.fromkeys(text))

  def ids(self, text: str) -> np.ndarray:
    return np.asarray([self.tokens.index(c) for c in text], np.int32)

  def one_hot(self, text: str) -> np.ndarray:
    """x_t = e_{index(c_t)}: [T, V] float32."""
    return np.eye(len(self.tokens), dtype=np.float32)[self.ids(text)]


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


def forward_trace(cell: Elman, params, vocab: CharVocabulary, text: str) -> tuple[str, np.ndarray]:
  """The forward pass of ``text`` written out step by step; returns (the text, p: [T, V]).

  Each stage is computed from the params with NumPy and checked against the cell's own
  ``step`` (they must agree to float32 rounding).
  """
  w_xh, w_hh, b, w_hy, b_y = (np.asarray(params[k], np.float64) for k in ("w_xh", "w_hh", "b", "w_hy", "b_y"))
  fmt = lambda v: "[" + ", ".join(f"{x:+.4f}" for x in np.ravel(v)) + "]"
  lines = [f"vocabulary {vocab.tokens} (one-hot), input {text!r}, hidden size {w_hh.shape[0]}",
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
              "  p_t = softmax(y_t)    = " + ", ".join(f"{c}:{q:.3f}" for c, q in zip(vocab.tokens, p)),
              f"  predicted next char   = '{vocab.tokens[int(p.argmax())]}'", ""]
  return "\n".join(lines), np.array(probabilities)


def plot_probabilities(path: str, title: str, vocab: CharVocabulary, text: str, before: np.ndarray,
                       after: np.ndarray, steps: int) -> str:
  """Two heat maps of p_t over the vocabulary (rows: next character, columns: the character read)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.6), gridspec_kw={"width_ratios": [1, 1, 0.05]})
  panels = ((axes[0], before, "at initialisation"), (axes[1], after, f"after {steps} steps of BPTT"))
  for axis, probabilities, name in panels:
    image = axis.imshow(probabilities.T, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(text)), [f"'{c}'" for c in text])
    axis.set_yticks(range(len(vocab.tokens)), [f"'{c}'" for c in vocab.tokens])
    axis.set_xlabel("character read at step t")
    axis.set_ylabel("next character")
    axis.set_title(name, fontsize=10)
    for t in range(len(text)):
      for v in range(len(vocab.tokens)):
        value = probabilities[t, v]
        axis.text(t, v, f"{value:.2f}", ha="center", va="center", fontsize=8,
                  color="black" if value > 0.6 else "white")
  fig.colorbar(image, cax=axes[2], label="p(next character)")
  fig.suptitle(title, fontsize=11)
  return plots.save_figure(fig, path)


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train the word into ``workdir`` until learned (or ``config.steps``); returns results.json's content.

  Raises ValueError if the word is not learned within ``config.steps`` (except in a smoke run).
  """
  options = options or RunOptions()
  vocab = CharVocabulary(config.text)
  inputs, targets = config.text[:-1], config.text[1:]
  label = f"hello {config.hidden_size}-unit tanh RNN"
  run = RunDir(workdir, "hello", config, options, label=label)
  run.check_data("text", config.text)  # the vocabulary via save_model
  cell = Elman(config.hidden_size, activation="tanh", readout_size=len(vocab.tokens))
  model = CellModel(cell, len(vocab.tokens))
  run.save_model(model, vocab.tokens, best_metric="min_target_probability", best_mode="max")
  params = model.init(jax.random.PRNGKey(config.seed))
  batch = {"xs": jnp.asarray(vocab.one_hot(inputs)), "targets": jnp.asarray(vocab.ids(targets))}

  def loss_fn(params, batch, rng):
    """L = sum_t -log p_t[y_t]: BPTT is jax.grad of this through the scan."""
    del rng
    _, logits = model(params, batch["xs"])
    loss = losses.cross_entropy(logits, batch["targets"], reduction="sum")
    return loss, {"accuracy": losses.accuracy(logits, batch["targets"])}

  @jax.jit
  def measure(params):
    loss, aux = loss_fn(params, batch, None)
    _, logits = model(params, batch["xs"])
    p_target = jnp.take_along_axis(jax.nn.softmax(logits), batch["targets"][:, None], axis=-1)[:, 0]
    return {"loss": loss, "accuracy": aux["accuracy"], "min_target_probability": jnp.min(p_target)}

  def evaluate(params, split):
    del split  # the training word is the only data
    return {k: float(v) for k, v in measure(params).items()}

  def learned(metrics) -> bool:
    """Every step predicts its target, each with probability >= min_probability."""
    return metrics["accuracy"] == 1.0 and metrics["min_target_probability"] >= config.min_probability

  trace_before, before = forward_trace(cell, params, vocab, inputs)
  print("=== forward pass with the initial weights ===\n" + trace_before)
  run.write_text("forward_before.txt", trace_before)
  outcome = train_and_test(run, config, params=params, loss_fn=loss_fn, stream=RepeatBatch(batch),
                           steps_per_epoch=1, evaluate=evaluate, best_metric="min_target_probability",
                           best_mode="max", splits=("valid",), stop_when=learned, progress=options.progress)
  trained = outcome.params
  steps = outcome.best_step or outcome.step          # the step of the params shown (the best checkpoint)
  final = {k[len("valid_"):]: v for k, v in outcome.results.items() if k.startswith("valid_")}
  success = learned(final)
  trace_after, after = forward_trace(cell, trained, vocab, inputs)
  print(f"=== forward pass after {steps} steps of BPTT ===\n" + trace_after)
  run.write_text("forward_after.txt", trace_after)
  predicted = "".join(vocab.tokens[i] for i in after.argmax(axis=-1))
  last = vocab.tokens.index(targets[-1])
  title = (f"hello: {config.hidden_size}-unit tanh RNN on {config.text!r}, {config.optimizer} lr "
           f"{config.learning_rate:g}, clip {config.clip:g}")
  plot_probabilities(run.path("probabilities.png"), f"{title}: p(next character)", vocab, inputs, before,
                     after, steps)
  if plots.curve_metrics(read_metrics(run.workdir)):
    plots.plot_run(run.workdir, title, metrics=["loss", "min_target_probability", "grad_norm"],
                   reference={"min_target_probability": (config.min_probability,
                                                         f"stop at {config.min_probability:g}")},
                   labels={"loss": "sum_t -log p_t[target] (nats)",
                           "min_target_probability": "min_t p_t[target]", "grad_norm": "gradient norm ||g||"},
                   final={f"p('{targets[-1]}' after '{inputs}')": float(after[-1, last])})
  summary = (f"after {inputs!r} the model predicts {predicted[-1]!r}: "
             f"p({targets[-1]!r}) = {before[-1, last]:.3f} before training, {after[-1, last]:.3f} after "
             f"{steps} steps; predicted continuations {predicted!r} (targets {targets!r})")
  print(summary)
  results = run.finish({
      **outcome.results, "learned": success, "predicted": predicted, "targets": targets,
      "probabilities_before": {c: before[:, i] for i, c in enumerate(vocab.tokens)},
      "probabilities_after": {c: after[:, i] for i, c in enumerate(vocab.tokens)},
      f"p_last_{targets[-1]}_before": float(before[-1, last]),
      f"p_last_{targets[-1]}_after": float(after[-1, last]), "summary": summary})
  if not success and not options.smoke:
    raise ValueError(f"not learned after {outcome.step} steps (min target probability "
                     f"{final['min_target_probability']:.3f} < min_probability {config.min_probability:g}); "
                     f"raise steps or learning_rate")
  return results


EXPERIMENT = common.Experiment("hello", Config, train_and_evaluate, PRESETS, SMOKE, __doc__)

if __name__ == "__main__":
  common.main(EXPERIMENT)
