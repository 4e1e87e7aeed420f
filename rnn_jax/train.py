"""Training engine: optax chains, schedules, recurrent penalties, jitted steps and a thin run loop.

The pieces, in the order an experiment uses them::

  schedule  = make_schedule("step", 1.0, steps_per_epoch=n, decay_start_epoch=4, decay_rate=0.5)
  optimizer = make_optimizer("sgd", schedule, clip=5.0)               # clipping inside the chain
  state     = create_train_state(params, optimizer, key)              # params, opt_state, step, rng
  train_step = make_train_step(loss_fn, optimizer)         # jitted (state, batch) -> (state, metrics)
  run = RunDir(workdir, config)                                       # metrics.jsonl, results.json, curves
  state, summary = fit(state, train_step, stream, num_steps=..., run=run, evaluate=..., checkpoints=...)

``loss_fn(params, batch, rng) -> (loss, aux)`` is the only model-specific code.
``aux`` is a dict: scalar entries become metrics; other entries (e.g. the
truncated-BPTT carry, see ``make_tbptt_step``) are passed through untouched.

Truncated BPTT (Williams & Peng 1990): every k1 steps, back-propagate k2 steps.
Here k1 = k2 = T (the window length): a window of T tokens is one forward and one
backward pass; its final carry starts the next window under ``stop_gradient``, so
the state flows across windows but gradients stop at the window boundary. The
carry is reset to zeros at the start of every epoch (the batch's ``reset`` flag).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
CLIP_MODES = ("norm", "value")


# ---------------------------------------------------------------------------
# Schedules and optimisers
# ---------------------------------------------------------------------------

def make_schedule(kind: str, learning_rate: float, *, steps_per_epoch: Optional[int] = None,
                  decay_start_epoch: Optional[int] = None, decay_rate: Optional[float] = None,
                  warmup_steps: int = 0, total_steps: Optional[int] = None) -> optax.Schedule:
  """A learning-rate schedule eta(step).

  constant: eta(s) = lr.
  step:     Zaremba et al. (2014): the rate is constant for the first ``decay_start_epoch``
            epochs, then multiplied by ``decay_rate`` after every further epoch:
              epoch e = s // steps_per_epoch (0-based),
              eta(s) = lr * decay_rate ** max(0, e + 1 - decay_start_epoch).
            (small: lr 1, decay_start_epoch 4, decay_rate 0.5 -> epochs 1-4 at 1, epoch 5 at 0.5, ...)
  cosine:   linear warmup from 0 to lr over ``warmup_steps``, then cosine decay to 0 at
            ``total_steps``: eta(s) = lr/2 (1 + cos(pi (s - w) / (S - w))).
  """
  if learning_rate <= 0 or not math.isfinite(learning_rate):
    raise ValueError(f"make_schedule: learning_rate must be a positive number, got {learning_rate}")
  if kind == "constant":
    return optax.constant_schedule(learning_rate)
  if kind == "step":
    if not steps_per_epoch or steps_per_epoch <= 0:
      raise ValueError(f"make_schedule('step'): steps_per_epoch must be a positive int, "
                       f"got {steps_per_epoch}")
    if decay_start_epoch is None or decay_start_epoch < 0:
      raise ValueError(f"make_schedule('step'): decay_start_epoch must be >= 0, got {decay_start_epoch}")
    if decay_rate is None or not 0.0 < decay_rate <= 1.0:
      raise ValueError(f"make_schedule('step'): decay_rate must be in (0, 1], got {decay_rate}")

    def step_schedule(step):
      epoch = jnp.asarray(step) // steps_per_epoch
      exponent = jnp.maximum(0, epoch + 1 - decay_start_epoch)
      return learning_rate * jnp.power(decay_rate, exponent.astype(jnp.float32))
    return step_schedule
  if kind == "cosine":
    if not total_steps or total_steps <= warmup_steps:
      raise ValueError(f"make_schedule('cosine'): total_steps must exceed warmup_steps={warmup_steps}, "
                       f"got {total_steps}")
    if warmup_steps < 0:
      raise ValueError(f"make_schedule('cosine'): warmup_steps must be >= 0, got {warmup_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=0.0)
  raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


def make_optimizer(name: str, learning_rate, *, clip: Optional[float] = None, clip_mode: str = "norm",
                   momentum: float = 0.9, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """An optax chain: [clip] -> optimiser (with ``learning_rate`` a float or a schedule).

  clip_mode "norm":  g <- g * min(1, clip / ||g||_2), ||g|| the global norm over all leaves
                     (Pascanu et al. 2013; Zaremba et al. 2014 use clip = 5).
  clip_mode "value": g <- clamp(g, -clip, clip) elementwise.
  Optimisers: sgd, momentum (heavy ball, ``momentum``), adam, adamw (decoupled ``weight_decay``),
  rmsprop. ``weight_decay`` > 0 with other optimisers adds the coupled L2 term wd * theta to g.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  if clip_mode not in CLIP_MODES:
    raise ValueError(f"unknown clip_mode {clip_mode!r}; expected one of {CLIP_MODES}")
  if clip is not None and not clip > 0:
    raise ValueError(f"clip must be a positive number or None (no clipping), got {clip}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate}")
  chain = []
  if clip is not None:
    chain.append(optax.clip_by_global_norm(clip) if clip_mode == "norm" else optax.clip(clip))
  if weight_decay and name != "adamw":
    chain.append(optax.add_decayed_weights(weight_decay))
  if name == "sgd":
    chain.append(optax.sgd(learning_rate))
  elif name == "momentum":
    chain.append(optax.sgd(learning_rate, momentum=momentum))
  elif name == "adam":
    chain.append(optax.adam(learning_rate))
  elif name == "adamw":
    chain.append(optax.adamw(learning_rate, weight_decay=weight_decay))
  elif name == "rmsprop":
    chain.append(optax.rmsprop(learning_rate))
  return optax.chain(*chain)



def _calling_module_name(depth: int = 2) -> str:
  """The module name absl files a flag under: the caller's, with __main__ as sys.argv[0]."""
  name = sys._getframe(depth).f_globals.get("__name__", "")
  return sys.argv[0] if name == "__main__" else name


def define_optimizer_flags(*, learning_rate: float, clip: float, optimizer: str = "adam") -> None:
  """Define the --optimizer, --learning_rate, --clip and --clip_mode flags of a training script.

  The defaults are the script's own; ``optimizer_from_flags`` builds the chain they describe.
  The flags are filed under the calling script, so ``script_flag_values`` records them.
  """
  module = _calling_module_name()
  flags.DEFINE_enum("optimizer", optimizer, OPTIMIZERS, "Optimiser.", module_name=module)
  flags.DEFINE_float("learning_rate", learning_rate, "Learning rate.", module_name=module)
  flags.DEFINE_float("clip", clip, "Gradient clipping threshold (0 disables).", module_name=module)
  flags.DEFINE_enum("clip_mode", "norm", CLIP_MODES, "Clip the global norm or each value.", module_name=module)


def script_flag_values() -> dict:
  """{name: value} of every flag the running script (sys.argv[0]) defines: the config of results.json."""
  return {flag.name: flag.value for flag in flags.FLAGS.get_key_flags_for_module(sys.argv[0])}


def optimizer_from_flags() -> optax.GradientTransformation:
  """``make_optimizer`` from the flags ``define_optimizer_flags`` defined (--clip=0: no clipping)."""
  values = flags.FLAGS
  return make_optimizer(values.optimizer, values.learning_rate, clip=values.clip or None,
                        clip_mode=values.clip_mode)


def recurrent_penalty(params, l1: float = 0.0, l2: float = 0.0) -> jax.Array:
  """Omega = lambda1 sum |W_hh| + lambda2 sum W_hh^2 over every leaf whose key is "w_hh".

  Only recurrent weights are penalised (input, output and embedding weights are not).
  Add it to the data loss inside ``loss_fn``.
  """
  total = jnp.zeros((), jnp.float32)
  if not l1 and not l2:
    return total
  found = False
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    last = path[-1]
    key = getattr(last, "key", getattr(last, "name", None))
    if key == "w_hh":
      found = True
      total = total + l1 * jnp.sum(jnp.abs(leaf)) + l2 * jnp.sum(jnp.square(leaf))
  if not found:
    raise ValueError("recurrent_penalty: params hold no 'w_hh' leaf; nothing to penalise")
  return total


# ---------------------------------------------------------------------------
# Train state and jitted steps
# ---------------------------------------------------------------------------

class TrainState(NamedTuple):
  """Everything that determines the rest of a run: params, optimiser state, step and RNG key.

  A NamedTuple, hence a pytree: it can be jitted, checkpointed and compared leaf by leaf.
  """
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def create_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
  """TrainState(params, optimizer.init(params), step=0, rng)."""
  return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                    rng=jnp.asarray(rng))


LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: Optional[optax.Schedule] = None):
  """Jitted ``train_step(state, batch) -> (state, metrics)``.

    rng, rng_t = split(state.rng)
    (loss, aux), g = value_and_grad(loss_fn)(params, batch, rng_t)
    params <- params + optimizer.update(g)          (clipping happens inside the chain)

  metrics: loss, grad_norm (the global norm ||g||_2 BEFORE clipping), learning_rate
  (if ``schedule`` is given, the rate used at this step) and every aux entry.
  """

  def train_step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return TrainState(params, opt_state, state.step + 1, rng), metrics

  return jax.jit(train_step)


def make_eval_step(loss_fn: LossFn):
  """Jitted ``eval_step(params, batch) -> (loss, aux)``, deterministic (a fixed dummy key)."""

  def eval_step(params, batch):
    return loss_fn(params, batch, jax.random.PRNGKey(0))

  return jax.jit(eval_step)


def reset_carry(carry, reset):
  """carry <- 0 where ``reset`` (a scalar bool) else carry: the epoch-start reset of truncated BPTT."""
  return jax.tree_util.tree_map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), carry)


def make_tbptt_step(train_step):
  """Wrap a ``train_step`` for truncated BPTT over a stream of windows.

  The loop state is ``{"train": TrainState, "carry": carry}``. For each window:

    carry = 0 if batch["reset"] else carry                (reset at each epoch start)
    state, metrics = train_step(state, {**batch, "carry": carry})
    carry = stop_gradient(metrics.pop("carry"))           (the window's final state)

  so ``loss_fn`` must read ``batch["carry"]`` and return its final carry as ``aux["carry"]``.
  """

  def tbptt_step(loop_state, batch):
    carry = reset_carry(loop_state["carry"], batch["reset"])
    state, metrics = train_step(loop_state["train"], {**batch, "carry": carry})
    metrics = dict(metrics)
    new_carry = jax.lax.stop_gradient(metrics.pop("carry"))
    return {"train": state, "carry": new_carry}, metrics

  return jax.jit(tbptt_step)


# ---------------------------------------------------------------------------
# Run directory: metrics.jsonl, results.json, curves
# ---------------------------------------------------------------------------

def device_info() -> dict:
  """The JAX backend and devices this process runs on, for results.json."""
  devices = jax.devices()
  return {
      "backend": jax.default_backend(),
      "devices": [str(d.device_kind) for d in devices],
      "device_count": len(devices),
      "host": platform.node(),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
  }


def _to_python(value):
  """JSON-able python scalars/lists from numpy/jax values (NaN and inf become strings)."""
  if isinstance(value, dict):
    return {str(k): _to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_python(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    array = np.asarray(value)
    value = array.item() if array.ndim == 0 else array.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def write_results(workdir: str, metrics: dict, config: dict, wall_time: float) -> str:
  """Write <workdir>/results.json = {metrics..., "config", "wall_time_s", "device"}; returns its path.

  Written to a temporary file and renamed, so a crash never leaves a half-written results.json.
  """
  os.makedirs(workdir, exist_ok=True)
  payload = {**_to_python(metrics), "config": _to_python(config), "wall_time_s": float(wall_time),
             "device": device_info()}
  path = os.path.join(workdir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def read_metrics(workdir: str) -> list[dict]:
  """The records of <workdir>/metrics.jsonl (a torn last line from a killed run is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def save_figure(fig, path: str, dpi: int = 100) -> str:
  """Lay out, save as PNG, close, and return ``path`` (the experiments' one way to write a plot)."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def plot_curves(workdir: str, keys: Optional[list[str]] = None, filename: str = "curves.png") -> str:
  """Plot metrics.jsonl as one panel per metric, one line per split (train, valid, ...), vs step.

  A "<split>_" prefix is dropped (valid_bpc in a "valid" record is plotted as bpc), so the
  train and valid curves of one metric share a panel. keys: the metrics to plot; default
  every metric that appears in at least one non-train record, or all train metrics if
  there is no evaluation. Returns the PNG's path.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_metrics(workdir)
  if not records:
    raise ValueError(f"plot_curves: {workdir}/metrics.jsonl has no records to plot")
  skip = {"step", "split", "time_s", "epoch"}

  def metrics_of(record):
    """{metric: value} with a "<split>_" prefix removed, so valid_bpc and train bpc share a panel."""
    split = record.get("split", "train")
    out = {}
    for k, v in record.items():
      if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool):
        out[k[len(split) + 1:] if k.startswith(split + "_") else k] = v
    return out

  points_of = [(r.get("split", "train"), r["step"], metrics_of(r)) for r in records]
  if keys is None:
    eval_keys = set().union(*[m.keys() for split, _, m in points_of if split != "train"])
    keys = sorted(eval_keys or set().union(*[m.keys() for _, _, m in points_of]))
  if not keys:
    raise ValueError(f"plot_curves: no numeric metrics in {workdir}/metrics.jsonl")
  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
  splits = sorted({split for split, _, _ in points_of}, key=lambda name: (name != "train", name))
  for axis, key in zip(axes[0], keys):
    for split in splits:
      points = [(step, m[key]) for name, step, m in points_of if name == split and key in m]
      if points:
        steps, values = zip(*points)
        axis.plot(steps, values, marker="." if len(points) < 30 else None, label=split)
    axis.set_xlabel("step")
    axis.set_title(key)
    axis.legend()
  return save_figure(fig, os.path.join(workdir, filename))


def merge_run_metrics(workdir: str, runs: list[str], path: str) -> str:
  """Concatenate <workdir>/<run>/metrics.jsonl of several runs into ``path``, each record
  tagged {"run": name}; written through a temporary file and renamed. Returns ``path``."""
  tmp = path + ".tmp"
  with open(tmp, "w") as handle:
    for name in runs:
      for record in read_metrics(os.path.join(workdir, name)):
        handle.write(json.dumps({"run": name, **record}) + "\n")
  os.replace(tmp, path)
  return path


def plot_runs(workdir: str, runs: list[str], metric: str, *, ylabel: str, title: str,
              split: str = "valid", filename: str = "comparison.png") -> str:
  """One line per run of ``metric`` from <workdir>/<run>/metrics.jsonl records of ``split``,
  against step, saved as <workdir>/<filename>. Returns the PNG's path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axis = plt.subplots(figsize=(5.5, 3.8))
  for name in runs:
    points = [(r["step"], r[metric]) for r in read_metrics(os.path.join(workdir, name))
              if r.get("split") == split and metric in r]
    if points:
      axis.plot(*zip(*points), marker="o", label=name)
  axis.set_xlabel("step")
  axis.set_ylabel(ylabel)
  axis.set_title(title)
  axis.legend()
  return save_figure(fig, os.path.join(workdir, filename))


class RunDir:
  """An experiment's output directory: metrics.jsonl, results.json, curves.png, texts.

  Usage::

    run = RunDir(workdir, config=flags_dict)    # creates the directory
    run.log(step, "train", loss=..., bpc=...)   # one JSON line + an absl log line
    run.write_text("samples.txt", text)
    run.finish({"test_bpc": ...})               # results.json (+ wall time, device) and curves.png

  A resumed run appends to the same metrics.jsonl; ``truncate_after(step)`` drops records
  logged after the checkpoint being resumed so the file matches the restored trajectory.
  """

  def __init__(self, workdir: str, config: Optional[dict] = None):
    if not workdir:
      raise ValueError("RunDir: workdir must be a non-empty path")
    self.workdir = os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.config = dict(config or {})
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    self.start_time = time.time()

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def log(self, step: int, split: str, **metrics) -> dict:
    """Append {"step", "split", "time_s", **metrics} to metrics.jsonl and log it with absl."""
    record = {"step": int(step), "split": split, "time_s": round(time.time() - self.start_time, 3),
              **_to_python(metrics)}
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in record.items() if k not in ("step", "split", "time_s"))
    logging.info("step %d [%s] %s", step, split, shown)
    return record

  def truncate_after(self, step: int) -> None:
    """Keep only metrics.jsonl records with step <= ``step`` (before resuming from ``step``)."""
    records = [r for r in read_metrics(self.workdir) if r.get("step", 0) <= step]
    tmp = self.metrics_path + ".tmp"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.metrics_path)

  def write_text(self, name: str, text: str) -> str:
    path = self.path(name)
    with open(path, "w") as f:
      f.write(text)
    return path

  def finish(self, metrics: dict, plot: bool = True, wall_time: Optional[float] = None) -> str:
    """results.json (metrics, config, wall time since construction, device) and curves.png."""
    wall = time.time() - self.start_time if wall_time is None else wall_time
    path = write_results(self.workdir, metrics, self.config, wall)
    if plot and read_metrics(self.workdir):
      plot_curves(self.workdir)
    return path


# ---------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------

class Stream(Protocol):
  """A resumable batch source: ``next(stream)`` gives a batch; ``position()`` is JSON-able
  and ``seek(position)`` returns to it (used for exact resume)."""

  def __next__(self): ...
  def position(self) -> dict: ...
  def seek(self, position: dict) -> None: ...


def _mean_metrics(history: list[dict]) -> dict:
  """Average each scalar metric over the logged steps (fetched from the device once)."""
  history = jax.device_get(history)
  keys = [k for k, v in history[0].items() if np.ndim(v) == 0]
  return {k: float(np.mean([h[k] for h in history])) for k in keys}


@dataclasses.dataclass
class FitResult:
  """What ``fit`` returns: the final loop state, the last logged train and eval metrics, the step."""
  state: Any
  step: int
  train: dict
  eval: dict


def resume_or_refuse(checkpoints, state, run: "RunDir", resume: bool, stream=None, label: str = ""):
  """Continue from the latest checkpoint with --resume; refuse to overwrite one without it.

  Returns (state, start_step): the restored state and its step (the data stream is moved to
  its saved position and metrics.jsonl cut after that step), or (state, 0) with no checkpoint.
  Raises FileExistsError when checkpoints exist and ``resume`` is False; nothing is touched.
  """
  if checkpoints.latest_step() is None:
    return state, 0
  if not resume:
    raise FileExistsError(f"{checkpoints.directory} already holds checkpoints; pass --resume to continue "
                          "them or choose a fresh --workdir (nothing was overwritten)")
  state, extra = checkpoints.restore(state)
  start_step = int(extra["step"])
  if stream is not None:
    stream.seek(extra["data"])
  run.truncate_after(start_step)
  logging.info("%sresumed from step %d", f"{label}: " if label else "", start_step)
  return state, start_step

def fit(state, step_fn, stream: Stream, *, num_steps: int, run: RunDir, start_step: int = 0,
        evaluate: Optional[Callable[[Any], dict]] = None, eval_every: int = 0,
        checkpoints=None, checkpoint_every: int = 0, best_metric: Optional[str] = None,
        log_every: int = 50, tokens_per_step: Optional[int] = None,
        train_summary: Optional[Callable[[dict], dict]] = None,
        progress: bool = True, stop_when: Optional[Callable[[dict], bool]] = None) -> FitResult:
  """Run ``step_fn`` from ``start_step`` to ``num_steps`` with logging, evaluation and checkpoints.

  Each step: ``state, metrics = step_fn(state, next(stream))``. Every ``log_every`` steps the
  mean of the scalar metrics (optionally mapped by ``train_summary``, e.g. to add bpc) is
  logged to metrics.jsonl as split "train" and shown on the tqdm bar with tokens/s
  (``tokens_per_step`` tokens per step). Every ``eval_every`` steps and at the end,
  ``evaluate(state)`` returns a dict logged as split "valid". Every ``checkpoint_every`` steps
  and at the end, ``checkpoints.save(step, state, extra={"data": stream.position()},
  metrics=eval metrics)`` keeps the last N and the best on ``best_metric``; a checkpoint is also
  saved after every evaluation and at the end.

  Early stop: ``stop_when(eval_metrics)`` is asked after every evaluation; if it returns True
  the run stops there (after that step's checkpoint) and ``FitResult.step`` is that step
  (e.g. the step at which a task counts as solved).

  Resume: restore ``state`` and ``data`` with ``checkpoints.restore`` first, ``stream.seek`` to
  the saved position and pass ``start_step``; the trajectory is then the uninterrupted one.
  """
  if num_steps < start_step:
    raise ValueError(f"fit: num_steps={num_steps} is before the resumed step {start_step}")
  from tqdm import tqdm

  bar = tqdm(total=num_steps, initial=start_step, disable=not progress, dynamic_ncols=True,
             mininterval=1.0)
  history: list[dict] = []
  last_train, last_eval = {}, {}
  tick, tick_step = time.time(), start_step
  step = start_step

  def checkpoint(step, eval_metrics):
    if checkpoints is not None:
      metrics = ({best_metric: float(eval_metrics[best_metric])}
                 if best_metric and best_metric in eval_metrics else None)
      checkpoints.save(step, state, extra={"data": stream.position(), "step": step}, metrics=metrics)

  while step < num_steps:
    state, metrics = step_fn(state, next(stream))
    step += 1
    history.append(metrics)
    bar.update(1)
    if step % max(log_every, 1) == 0 or step == num_steps:
      summary = _mean_metrics(history)
      history = []
      if train_summary is not None:
        summary = train_summary(summary)
      elapsed = max(time.time() - tick, 1e-9)
      if tokens_per_step:
        summary["tokens_per_s"] = tokens_per_step * (step - tick_step) / elapsed
      tick, tick_step = time.time(), step
      if not all(math.isfinite(v) for v in summary.values()):
        run.log(step, "train", **summary)
        raise FloatingPointError(f"fit: non-finite training metrics at step {step}: {summary}; "
                                 f"lower the learning rate or enable clipping")
      last_train = run.log(step, "train", **summary)
      postfix = {"loss": f"{summary['loss']:.4g}"}
      if tokens_per_step:
        postfix["tok/s"] = f"{summary['tokens_per_s']:.0f}"
      bar.set_postfix(postfix)
    evaluated = False
    if evaluate is not None and ((eval_every and step % eval_every == 0) or step == num_steps):
      last_eval = run.log(step, "valid", **evaluate(state))
      evaluated = True
    if (checkpoint_every and step % checkpoint_every == 0) or evaluated or step == num_steps:
      checkpoint(step, last_eval if evaluated else {})
    if evaluated and stop_when is not None and stop_when(last_eval):
      break
  bar.close()
  return FitResult(state=state, step=step, train=last_train, eval=last_eval)
