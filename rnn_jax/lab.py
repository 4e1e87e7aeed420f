"""The gradient lab: cures for vanishing and exploding gradients compared on long-range tasks.

Models (``MODEL_NAMES``), all with hidden size H and a dense read-out W_hy:

  tanh             h_t = tanh(W_xh x_t + W_hh h_{t-1} + b), PyTorch default init U(+-1/sqrt(H))
  tanh_orthogonal  the same with an orthogonal W_hh (Saxe et al. 2014)
  irnn             h_t = relu(W_xh x_t + W_hh h_{t-1} + b), W_hh = I (Le, Jaitly & Hinton 2015)
  lstm             LSTM with forget-gate bias b_f (1 by default: Gers et al. 2000; Jozefowicz et al. 2015)
  gru              GRU (Cho et al. 2014)
  esn              a fixed reservoir (rnn_jax.esn) with a closed-form ridge read-out: no BPTT

Tasks (``TaskSpec``) and what "solved" means, judged on the validation set:

  adding   y = W_hy h_T, MSE;                 solved: MSE < 0.01 (baseline 0.167)
  copy     o_t = W_hy h_t at every step, CE;  solved: all 10 answer symbols right on >= 99% of
           sequences (without memory: 8^-10 of them; the memoryless CE is 10 log 8 / (T + 20))
  digits   o = W_hy h_64, CE over 10 classes; solved: accuracy >= ``target`` (0.9 by default)

Data (``task_data``): adding and copy draw fresh training batches from a key for every step and
hold out a validation and a test set of ``eval_sequences`` sequences each; digits split
scikit-learn's 1797 images into train / valid / test (64 / 16 / 20 %).

Gradient models train through the one recipe ``rnn_jax.train.train_and_test`` (``train_model``):
early stop at the first evaluation where the task is solved on the validation set, the best
checkpoint on the validation metric tested at the end. Every step's gradient global norm
||g||_2 (before clipping) is recorded by a ``diagnostics.GradientMonitor`` that taps the
gradient inside the loss function.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from rnn_jax import cells, diagnostics, esn, layers, losses, plots, tasks
from rnn_jax.config import TrainingConfig, field
from rnn_jax.rundir import RunDir, latest_checkpoint_step, load_run, read_json, read_metrics, to_python
from rnn_jax.sequence import rnn, run_cell
from rnn_jax.train import make_eval_step, train_and_test

MODEL_NAMES = ("tanh", "tanh_orthogonal", "irnn", "lstm", "gru", "esn")
TASK_NAMES = ("adding", "copy", "digits", "permuted_digits")


def make_model_cell(name: str, hidden_size: int, forget_bias: float = 1.0):
  """The recurrent cell of a gradient-trained model by its lab name (see the module docstring).

  ``forget_bias`` is the LSTM's initial forget-gate bias b_f: at init f = sigma(b_f), so a memory
  decays like sigma(b_f)^lag (0.73^lag for b_f = 1, 0.95^lag for b_f = 3).
  """
  if name in MODEL_NAMES and name != "esn":
    return cells.make_cell(name, hidden_size, **({"forget_bias": forget_bias} if name == "lstm" else {}))
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

  @property
  def mode(self) -> str:
    """"min" if a lower metric is better (mse), else "max"."""
    return "min" if self.metric == "mse" else "max"

  def is_solved(self, value) -> bool:
    if value is None:
      return False
    value = float(value)
    if not math.isfinite(value):
      return False
    return value < self.target if self.metric == "mse" else value >= self.target


def make_task(name: str, length: int = 0, digits_target: float = 0.9) -> TaskSpec:
  """The TaskSpec of a task; ``length`` is T for adding and copy (ignored for digits)."""
  if name == "adding":
    return TaskSpec(name, length, 2, 1, "mse", tasks.ADDING_SOLVED_MSE, tasks.adding_baseline_mse())
  if name == "copy":
    # Without memory each answer symbol is a guess among 8, so all 10 are right with probability 8^-10.
    return TaskSpec(name, length, tasks.COPY_VOCAB, tasks.COPY_VOCAB, "answer_accuracy", 0.99,
                    float(tasks.COPY_NUM_SYMBOLS) ** -tasks.COPY_LENGTH)
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
class TaskModel:
  """A recurrent cell and a dense read-out for one task; ``rnn_jax.load_run`` rebuilds it.

    model = TaskModel(make_model_cell("gru", 64), make_task("adding", 100))
    params = model.init(key)                     # {"rnn": cell params, "head": {w: [O, H], b: [O]}}
    outputs = model(params, xs)                  # xs [B, T, F] -> see ``readout_outputs``
  """
  cell: Any
  task: TaskSpec

  def init(self, key) -> dict:
    return init_model(self.cell, self.task, key)

  def __call__(self, params: dict, xs: jax.Array) -> jax.Array:
    return model_outputs(self.cell, self.task, params, xs)


@dataclasses.dataclass(frozen=True)
class CellModel:
  """One cell over inputs of a fixed size F, so that ``init(key)`` needs no other argument.

    init(key) = cell.init(key, input_size);   model(params, xs [T, F]) -> (h_T, y: [T, O])

  The smallest model a run directory can describe (model.json) and ``rnn_jax.load_run`` rebuild,
  e.g. an Elman cell with its own read-out (``readout_size``).
  """
  cell: Any
  input_size: int

  def init(self, key) -> dict:
    return self.cell.init(key, self.input_size)

  def __call__(self, params: dict, xs: jax.Array):
    return run_cell(self.cell, params, xs)


@dataclasses.dataclass(frozen=True)
class LabConfig(TrainingConfig):
  """The settings of a gradient-trained lab run: the cell size and the cures.

  The cures: clip (0 = off) and clip_mode from the shared vocabulary, l1 / l2 penalties on W_hh,
  the LSTM's forget-gate bias, and the recurrent initialisation (the model name).
  """
  hidden_size: int = field(64, "Hidden size H of every gradient-trained model.", minimum=1, fixed=True)
  lstm_forget_bias: float = field(1.0, "Initial forget-gate bias b_f of the LSTM.", fixed=True)
  l1: float = field(0.0, "L1 penalty on the recurrent weights W_hh only.", minimum=0.0)
  l2: float = field(0.0, "L2 penalty on the recurrent weights W_hh only.", minimum=0.0)
  eval_sequences: int = field(500, "Sequences in each of the validation and test sets (adding, copy).",
                              minimum=1, fixed=True)
  steps: int = field(1000, "Step budget of every gradient-trained run (it stops earlier when solved).",
                     minimum=1)
  epochs: float = field(1.0, "Not used: every run has a step budget (the generated tasks have no epochs).",
                        minimum=0.0)
  eval_every: int = field(100, "Steps between validations (and solved checks); 0 validates at the end "
                          "(digits: once per pass over the training images).", minimum=0)
  learning_rate: float = 1e-2
  clip: float = 1.0
  batch_size: int = 50


@dataclasses.dataclass
class TaskData:
  """A task's data: a fresh training stream per run, validation, test and ESN-training batches.

  batch_size: B of the training batches. batches_per_epoch: training batches per pass over a
  fixed training set (digits); 0 for the endless generated tasks (adding, copy).
  """
  task: TaskSpec
  make_stream: Callable[[], Any]
  valid: tasks.Batch
  test: tasks.Batch
  esn_train: tasks.Batch
  batch_size: int
  batches_per_epoch: int = 0


def task_data(task: TaskSpec, key, *, batch_size: int, eval_sequences: int = 500,
              esn_train_sequences: int = 2000, valid_fraction: float = 0.2) -> TaskData:
  """The data of ``task`` drawn from ``key`` (the same key gives the same data).

  adding / copy: training batch i = generate(fold_in(key_stream, i), batch_size, T); the
  validation and test sets hold ``eval_sequences`` sequences each and the ESN read-out is fitted
  on ``esn_train_sequences``. digits: ``tasks.digits`` (20 % test), then the first
  ``valid_fraction`` of the training part is held out for validation; the ESN fits on the rest.
  """
  key_stream, key_esn, key_valid, key_test, key_split, key_perm = jax.random.split(key, 6)
  if task.name in ("adding", "copy"):
    # One compiled program per batch shape instead of one per random op (the same numbers).
    generate = jax.jit(tasks.adding_problem if task.name == "adding" else tasks.copy_task,
                       static_argnums=(1, 2))
    return TaskData(
        task=task,
        make_stream=lambda: tasks.GeneratedStream(lambda k: generate(k, batch_size, task.length), key_stream),
        valid=generate(key_valid, eval_sequences, task.length),
        test=generate(key_test, eval_sequences, task.length),
        esn_train=generate(key_esn, esn_train_sequences, task.length), batch_size=batch_size)
  split = tasks.digits(key_split, permuted=task.name == "permuted_digits", permutation_key=key_perm)
  num_valid = int(round(valid_fraction * len(split.train_xs)))
  train_xs, train_labels = split.train_xs[num_valid:], split.train_labels[num_valid:]
  if not 0 < batch_size <= len(train_xs):
    raise ValueError(f"batch_size must be in [1, {len(train_xs)}] (the digits training images), "
                     f"got {batch_size}")
  return TaskData(
      task=task, make_stream=lambda: tasks.ArrayStream(train_xs, train_labels, batch_size, key_stream),
      valid=tasks.Batch(split.train_xs[:num_valid], split.train_labels[:num_valid]),
      test=tasks.Batch(split.test_xs, split.test_labels), esn_train=tasks.Batch(train_xs, train_labels),
      batch_size=batch_size, batches_per_epoch=len(train_xs) // batch_size)


def _saved_outcome(run: RunDir, config) -> Optional[dict]:
  """The outcome of a finished run being resumed with an unchanged config, else None."""
  if not run.resuming or not os.path.exists(run.path("results.json")):
    return None
  saved = read_json(run.path("results.json"))
  if saved.get("config") != to_python(config):
    return None
  norms_path = run.path("grad_norms.json")
  norms = read_json(norms_path)["grad_norms"] if os.path.exists(norms_path) else []
  params = None if saved.get("diverged") else load_run(run.workdir).params
  keep = {k: v for k, v in saved.items() if k not in ("experiment", "config", "wall_time_s", "device")}
  return {**keep, "params": params, "grad_norms": [float(v) for v in norms]}


def train_model(cell, data: TaskData, config: LabConfig, run: RunDir, key, *, params=None,
                progress: bool = True, exploding_threshold: Optional[float] = None) -> dict:
  """Train ``cell`` + read-out on ``data.task`` through ``train_and_test``; finishes ``run``.

    loss = task loss + lambda1 ||W_hh||_1 + lambda2 ||W_hh||_2^2       (losses.recurrent_penalty)

  Evaluates on the validation set every ``eval_every`` steps and stops at the first evaluation
  where the task counts as solved (else after ``config.steps``); the best checkpoint on the
  validation metric is evaluated on the validation and test sets. Every step's ||g|| (before
  clipping) is recorded; an exploding event is ||g|| > ``exploding_threshold`` (default: the
  norm-clip threshold; only non-finite norms count when there is none) or non-finite. A
  non-finite training loss ends the run, reported as diverged at the first non-finite ||g||.

  params: the initial params (default: ``TaskModel(cell, data.task).init(key)``).

  Resuming a run that finished with the same config returns its saved outcome (the params from
  its best checkpoint) instead of training again.

  Returns {"solved", "steps", "steps_to_solve", "diverged", "best_step", "valid_<metric>",
  "test_<metric>", "valid", "test" (every metric of each split), "gradient" (the monitor's
  summary), "train_wall_s", "grad_norms" (||g|| of every step), "params" (best; None if diverged)};
  results.json holds all but the last two, grad_norms.json the per-step norms (from step
  ``first_step``: a run resumed after an interrupt records the norms of the steps it ran).
  """
  task = data.task
  model = TaskModel(cell, task)
  run.save_model(model, best_metric=task.metric, best_mode=task.mode)
  saved = _saved_outcome(run, config)
  if saved is not None:
    return saved
  if exploding_threshold is None and config.clip_mode == "norm" and config.clip > 0:
    exploding_threshold = config.clip
  monitor = diagnostics.GradientMonitor(exploding_threshold, until_non_finite=True)
  start_step = (latest_checkpoint_step(run.workdir) or 0) if run.resuming else 0
  loss_metric = "mse" if task.metric == "mse" else "cross_entropy"

  def loss_fn(params, batch, rng):
    del rng
    loss, metrics = task_metrics(task, model(params, batch.xs), batch.targets)
    aux = {k: v for k, v in metrics.items() if k != loss_metric}     # "loss" already holds it
    return loss + losses.recurrent_penalty(params, config.l1, config.l2), aux

  eval_step = make_eval_step(lambda params, batch, rng: task_metrics(task, model(params, batch.xs),
                                                                      batch.targets))
  batches = {"valid": data.valid, "test": data.test}

  def evaluate(params, split):
    _, metrics = eval_step(params, batches[split])
    return {k: float(v) for k, v in metrics.items()}

  stream = data.make_stream()
  start = time.time()
  diverged, outcome = False, None
  try:
    outcome = train_and_test(
        run, config, params=model.init(key) if params is None else params,
        loss_fn=monitor.watch(loss_fn, start_step), stream=stream,
        steps_per_epoch=data.batches_per_epoch or config.steps, evaluate=evaluate, best_metric=task.metric,
        best_mode=task.mode, splits=("valid", "test"),
        tokens_per_step=data.batch_size * data.valid.xs.shape[1],
        stop_when=lambda metrics: task.is_solved(metrics[task.metric]), progress=progress)
  except FloatingPointError:
    diverged = True
  jax.effects_barrier()                          # every tapped ||g|| has been recorded
  gradient = monitor.summary()
  if diverged:
    steps = gradient["first_non_finite_step"] or start_step + gradient["steps"]
    valid, test, best_step, params = {}, {}, None, None
  else:
    steps, best_step, params = outcome.step, outcome.best_step, outcome.params
    valid = {k[len("valid_"):]: v for k, v in outcome.results.items() if k.startswith("valid_")}
    test = {k[len("test_"):]: v for k, v in outcome.results.items() if k.startswith("test_")}
  solved = task.is_solved(valid.get(task.metric))
  summary = {
      "task": task.name, "T": task.length, "solved": solved, "steps": steps,
      "steps_to_solve": steps if solved else None, "diverged": diverged, "best_step": best_step,
      f"valid_{task.metric}": valid.get(task.metric), f"test_{task.metric}": test.get(task.metric),
      "valid": valid, "test": test, "gradient": gradient, "train_wall_s": time.time() - start,
      "resumed_from_step": start_step,
  }
  run.write_json("grad_norms.json", {"first_step": start_step + 1, "grad_norms": monitor.norms})
  run.finish(summary)
  return {**summary, "grad_norms": list(monitor.norms), "params": params}


METRIC_LABELS = {"loss": "training loss (task loss + penalty)", "mse": "mean squared error",
                 "answer_accuracy": "sequences copied exactly (fraction)", "accuracy": "accuracy (fraction)",
                 "cross_entropy": "cross-entropy (nats)", "grad_norm": "gradient norm ||g||_2"}


def plot_training(run: RunDir, title: str, task: TaskSpec) -> Optional[str]:
  """curves.png of one training run: the training loss, the task's validation metric with the
  solved threshold as a labelled line, and ||g||. None if the run logged too few points to draw
  a curve (e.g. it diverged at once)."""
  if not plots.curve_metrics(read_metrics(run.workdir), ["loss", task.metric]):
    return None
  reference = {task.metric: (task.target, f"solved: {task.metric} {'<' if task.mode == 'min' else '>='} "
                                          f"{task.target:g}")}
  return plots.plot_run(run.workdir, title, metrics=["loss", task.metric, "grad_norm"], reference=reference,
                        labels=METRIC_LABELS)


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
                key, test_batch: Optional[tasks.Batch] = None) -> dict:
  """Fit an ESN read-out in closed form on ``train_batch`` and score it on ``eval_batch``.

    z = [1; x_T; h_T] (final read-outs) or z_t = [1; x_t; h_t] (copy, every step)
    W_hy = ridge(Z, D) with D the targets (one-hot for classification); o = W_hy z

  Classification scores are linear, not probabilities, so only the task's accuracy (or MSE)
  is reported. Returns {"solved" (on ``eval_batch``), "<metric>", "test_<metric>" (if
  ``test_batch`` is given), "fit_wall_s"}.
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

  def score(batch) -> float:
    outputs = features(batch.xs) @ w_hy.T
    if task.metric == "mse":
      return float(jnp.mean(jnp.square(outputs[:, 0] - batch.targets)))
    if task.readout == "per_step":
      answers = jnp.argmax(outputs[:, -tasks.COPY_LENGTH:], -1) == batch.targets[:, -tasks.COPY_LENGTH:]
      return float(jnp.mean(jnp.all(answers, axis=-1)))
    return float(jnp.mean(jnp.argmax(outputs, -1) == batch.targets))

  value = score(eval_batch)
  outcome = {"solved": task.is_solved(value), task.metric: value}
  if test_batch is not None:
    outcome[f"test_{task.metric}"] = score(test_batch)
  outcome["fit_wall_s"] = time.time() - start
  return outcome
