"""The gradient lab: the seeds' cures compared on long-range tasks.

Models (``MODEL_NAMES``), all with hidden size H and a dense read-out W_hy:

  tanh             h_t = tanh(W_xh x_t + W_hh h_{t-1} + b), PyTorch default init U(+-1/sqrt(H))
  tanh_orthogonal  the same with an orthogonal W_hh (Saxe et al. 2014)
  irnn             h_t = relu(W_xh x_t + W_hh h_{t-1} + b), W_hh = I (Le, Jaitly & Hinton 2015)
  lstm             LSTM with forget-gate bias b_f (1 by default: Gers et al. 2000; Jozefowicz et al. 2015)
  gru              GRU (Cho et al. 2014)
  esn              a fixed reservoir (rnn_jax.esn) with a closed-form ridge read-out: no BPTT

Tasks (``TaskSpec``) and what "solved" means:

  adding   y = W_hy h_T, MSE;                 solved: MSE < 0.01 (baseline 0.167)
  copy     o_t = W_hy h_t at every step, CE;  solved: all 10 answer symbols right on >= 99% of steps
           (the memoryless baseline CE is 10 log 8 / (T + 20))
  digits   o = W_hy h_64, CE over 10 classes; solved: test accuracy >= ``target`` (0.9 by default)

Gradient models are trained with rnn_jax.train (optax chain with clipping, jitted steps, the run
loop with its early stop when solved); every step's gradient global norm goes to a
``diagnostics.GradientMonitor``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp

from rnn_jax import cells, diagnostics, esn, layers, losses, tasks, train
from rnn_jax.sequence import rnn, run_cell

MODEL_NAMES = ("tanh", "tanh_orthogonal", "irnn", "lstm", "gru", "esn")
TASK_NAMES = ("adding", "copy", "digits", "permuted_digits")


def make_model_cell(name: str, hidden_size: int, forget_bias: float = 1.0):
  """The recurrent cell of a gradient-trained model by its lab name (see the module docstring).

  ``forget_bias`` is the LSTM's initial forget-gate bias b_f: at init f = sigma(b_f), so a memory
  decays like sigma(b_f)^lag (0.73^lag for b_f = 1, 0.95^lag for b_f = 3).
  """
  if name == "tanh":
    return cells.Elman(hidden_size, activation="tanh")
  if name == "tanh_orthogonal":
    return cells.Elman(hidden_size, activation="tanh", recurrent_init="orthogonal")
  if name == "irnn":
    return cells.Elman(hidden_size, activation="relu", recurrent_init="identity")
  if name == "lstm":
    return cells.LSTM(hidden_size, forget_bias=forget_bias)
  if name == "gru":
    return cells.GRU(hidden_size)
  raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES[:-1]} (or 'esn', which has no cell)")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A long-range task: its kind of read-out, sizes, metric, solved threshold and baseline.

  Attributes:
    name: "adding", "copy", "digits" or "permuted_digits".
    length: T (adding), the delay T (copy; sequences are T + 20 long) or 64 (digits).
    input_size, output_size: F and the read-out size O.
    metric: the eval metric that decides "solved": "mse", "answer_accuracy" or "accuracy".
    target: solved when mse < target, or when an accuracy >= target.
    baseline: the metric's value without memory (for the table).
  """
  name: str
  length: int
  input_size: int
  output_size: int
  metric: str
  target: float
  baseline: float

  @property
  def readout(self) -> str:
    """"final" (from h_T) or "per_step" (from every h_t)."""
    return "per_step" if self.name == "copy" else "final"

  def is_solved(self, value) -> bool:
    value = float(value)
    if not math.isfinite(value):
      return False
    return value < self.target if self.metric == "mse" else value >= self.target


def make_task(name: str, length: int = 0, digits_target: float = 0.9) -> TaskSpec:
  """The TaskSpec of a task; ``length`` is T for adding and copy (ignored for digits)."""
  if name == "adding":
    return TaskSpec(name, length, 2, 1, "mse", tasks.ADDING_SOLVED_MSE, tasks.adding_baseline_mse())
  if name == "copy":
    return TaskSpec(name, length, tasks.COPY_VOCAB, tasks.COPY_VOCAB, "answer_accuracy", 0.99,
                    1.0 / tasks.COPY_NUM_SYMBOLS)
  if name in ("digits", "permuted_digits"):
    return TaskSpec(name, 64, 1, 10, "accuracy", digits_target, 0.1)
  raise ValueError(f"unknown task {name!r}; expected one of {TASK_NAMES}")


def init_model(cell, task: TaskSpec, key) -> dict:
  """Params {"rnn": cell params, "head": dense read-out [O, H]}."""
  key_rnn, key_head = jax.random.split(key)
  return {"rnn": cell.init(key_rnn, task.input_size),
          "head": layers.dense_init(key_head, cell.output_size, task.output_size)}


def readout_outputs(task: TaskSpec, head: dict, hs: jax.Array) -> jax.Array:
  """hs [B, T, H] -> predictions W_hy h_T + b_y: [B] (adding), logits [B, T, O] (copy), [B, O] (digits)."""
  if task.readout == "per_step":
    return layers.dense(head, hs)
  out = layers.dense(head, hs[:, -1])
  return out[:, 0] if task.metric == "mse" else out


def model_outputs(cell, task: TaskSpec, params: dict, xs: jax.Array) -> jax.Array:
  """xs [B, T, F] -> the task's outputs (see ``readout_outputs``) through the cell and read-out."""
  _, hs = rnn(cell, params["rnn"], xs)
  return readout_outputs(task, params["head"], hs)


def loss_of_hidden(task: TaskSpec, head: dict, targets: jax.Array):
  """The task loss as a function of the hidden states, hs [B, T, H] -> L (for diagnostics)."""

  def loss(hs):
    return task_metrics(task, readout_outputs(task, head, hs), targets)[0]

  return loss


def task_metrics(task: TaskSpec, outputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict]:
  """(loss, metrics) of a task's outputs.

  adding:  loss = mse = mean_b (y_b - d_b)^2
  copy:    loss = cross_entropy = mean over b, t of -log p(d_bt); answer_accuracy = fraction of
           sequences whose 10 answer steps are all right
  digits:  loss = cross_entropy over 10 classes; accuracy
  """
  if task.metric == "mse":
    mse = jnp.mean(jnp.square(outputs - targets))
    return mse, {"mse": mse}
  if task.readout == "per_step":
    cross_entropy = losses.cross_entropy(outputs, targets, reduction="mean")
    answers = jnp.argmax(outputs[:, -tasks.COPY_LENGTH:], -1) == targets[:, -tasks.COPY_LENGTH:]
    return cross_entropy, {"cross_entropy": cross_entropy,
                           "answer_accuracy": jnp.mean(jnp.all(answers, axis=-1).astype(jnp.float32))}
  cross_entropy = losses.cross_entropy(outputs[:, None], targets[:, None], reduction="mean")
  accuracy = jnp.mean((jnp.argmax(outputs, -1) == targets).astype(jnp.float32))
  return cross_entropy, {"cross_entropy": cross_entropy, "accuracy": accuracy}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings of one gradient-trained run (the cures: clip, clip_mode, l1/l2 on W_hh).

  clip=None trains without clipping; ``exploding_threshold`` sets the ||g|| that counts as an
  exploding event (default: the clip threshold).
  """
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  clip: Optional[float] = 1.0
  clip_mode: str = "norm"
  l1: float = 0.0
  l2: float = 0.0
  steps: int = 1000
  eval_every: int = 100
  log_every: int = 50
  exploding_threshold: Optional[float] = None

  @property
  def event_threshold(self) -> Optional[float]:
    """||g|| above which a step is an exploding event: ``exploding_threshold``, else the norm-clip
    threshold, else None (only non-finite norms count)."""
    if self.exploding_threshold is not None:
      return self.exploding_threshold
    return self.clip if self.clip_mode == "norm" else None


def train_model(cell, task: TaskSpec, stream, eval_batch: tasks.Batch, config: TrainConfig,
                run: train.RunDir, key, progress: bool = True) -> dict:
  """Train ``cell`` + read-out on ``task`` with rnn_jax.train until solved or ``config.steps``.

  Loss: task loss + lambda1 ||W_hh||_1 + lambda2 ||W_hh||_2^2 (train.recurrent_penalty).
  Evaluates on ``eval_batch`` every ``eval_every`` steps and stops at the first evaluation
  where the task counts as solved. Every step's ||g|| (before clipping) is recorded; an
  exploding event is ||g|| > clip or non-finite. A non-finite training loss ends the run
  (reported as diverged).

  Returns {"solved", "steps", "steps_to_solve", "diverged", "best_<metric>", "final_<metric>",
  "final_eval", "gradient": monitor summary, "grad_norms": ||g|| of every step, "train_wall_s",
  "params": the trained params (None if diverged)}.
  """
  params = init_model(cell, task, key)

  def loss_fn(params, batch, rng):
    del rng
    loss, metrics = task_metrics(task, model_outputs(cell, task, params, batch.xs), batch.targets)
    return loss + train.recurrent_penalty(params, config.l1, config.l2), metrics

  optimizer = train.make_optimizer(config.optimizer, config.learning_rate, clip=config.clip,
                                   clip_mode=config.clip_mode)
  state = train.create_train_state(params, optimizer, key)
  train_step = train.make_train_step(loss_fn, optimizer)
  eval_step = train.make_eval_step(loss_fn)
  monitor = diagnostics.GradientMonitor(config.event_threshold)
  history = []

  def monitored_step(state, batch):
    state, metrics = train_step(state, batch)
    monitor.record(int(state.step), metrics["grad_norm"])
    return state, metrics

  def evaluate(state):
    _, metrics = eval_step(state.params, eval_batch)
    metrics = {k: float(v) for k, v in metrics.items()}
    history.append(metrics[task.metric])
    return metrics

  T = eval_batch.xs.shape[1]
  start = time.time()
  diverged, final_eval, steps, trained = False, {}, 0, None
  try:
    result = train.fit(state, monitored_step, stream, num_steps=config.steps, run=run, evaluate=evaluate,
                       eval_every=config.eval_every, log_every=config.log_every,
                       tokens_per_step=stream_batch_size(stream) * T, progress=progress,
                       stop_when=lambda metrics: task.is_solved(metrics[task.metric]))
    final_eval, steps, trained = result.eval, result.step, result.state.params
  except FloatingPointError:
    diverged, steps = True, len(monitor.norms)
  finite = [v for v in history if math.isfinite(v)]
  best = (min(finite) if task.metric == "mse" else max(finite)) if finite else None
  solved = bool(final_eval) and task.is_solved(final_eval[task.metric])
  return {
      "solved": solved, "steps": steps, "steps_to_solve": steps if solved else None, "diverged": diverged,
      f"best_{task.metric}": best, f"final_{task.metric}": final_eval.get(task.metric),
      "final_eval": {k: v for k, v in final_eval.items() if k not in ("step", "split", "time_s")},
      "gradient": monitor.summary(), "grad_norms": list(monitor.norms), "train_wall_s": time.time() - start,
      "params": trained,
  }


def stream_batch_size(stream) -> int:
  """B of the batches a stream yields (peeked from its generator or its arrays)."""
  if isinstance(stream, tasks.ArrayStream):
    return stream.batch_size
  return int(stream.make_batch(jax.random.key(0)).xs.shape[0])


@dataclasses.dataclass(frozen=True)
class ESNConfig:
  """Reservoir and read-out settings of the ESN baseline (rnn_jax.esn)."""
  hidden_size: int = 400
  spectral_radius: float = 0.95
  density: float = 0.1
  input_scaling: float = 1.0
  bias_scaling: float = 0.1
  leak_rate: float = 1.0
  ridge: float = 1e-4


def esn_on_task(task: TaskSpec, train_batch: tasks.Batch, eval_batch: tasks.Batch, config: ESNConfig,
                key) -> dict:
  """Fit an ESN read-out in closed form on ``train_batch`` and score it on ``eval_batch``.

    z = [1; x_T; h_T] (final read-outs) or z_t = [1; x_t; h_t] (copy, every step)
    W_hy = ridge(Z, D) with D the targets (one-hot for classification); o = W_hy z

  Classification scores are linear, not probabilities, so only the task's accuracy (or MSE)
  is reported. Returns {"solved", "<metric>", "fit_wall_s"}.
  """
  reservoir = esn.Reservoir(config.hidden_size, spectral_radius=config.spectral_radius,
                            density=config.density, input_scaling=config.input_scaling,
                            bias_scaling=config.bias_scaling, leak_rate=config.leak_rate)
  params = reservoir.init(key, task.input_size)
  start = time.time()

  @jax.jit
  def features(xs):
    _, hs = jax.vmap(lambda x: run_cell(reservoir, params, x))(xs)
    z = esn.readout_features(xs, hs)
    return z if task.readout == "per_step" else z[:, -1]

  def design(batch):
    z = features(batch.xs)
    if task.metric == "mse":
      return z, batch.targets[:, None]
    one_hot = jax.nn.one_hot(batch.targets, task.output_size)
    return z.reshape(-1, z.shape[-1]), one_hot.reshape(-1, task.output_size)

  z_train, d_train = design(train_batch)
  w_hy = esn.ridge_readout(z_train, d_train, config.ridge)
  z_eval = features(eval_batch.xs)
  outputs = z_eval @ w_hy.T
  if task.metric == "mse":
    value = float(jnp.mean(jnp.square(outputs[:, 0] - eval_batch.targets)))
  elif task.readout == "per_step":
    answers = jnp.argmax(outputs[:, -tasks.COPY_LENGTH:], -1) == eval_batch.targets[:, -tasks.COPY_LENGTH:]
    value = float(jnp.mean(jnp.all(answers, axis=-1)))
  else:
    value = float(jnp.mean(jnp.argmax(outputs, -1) == eval_batch.targets))
  return {"solved": task.is_solved(value), task.metric: value, "fit_wall_s": time.time() - start}
