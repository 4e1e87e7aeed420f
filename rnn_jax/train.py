"""Training: jitted steps, truncated BPTT, the fit loop and the one training recipe.

The recipe every gradient-trained experiment runs (``train_and_test``)::

  run = RunDir(workdir, "char_lm", config, resume=resume)            # rnn_jax.rundir
  outcome = train_and_test(run, config, params=model.init(key), loss_fn=loss_fn, stream=stream,
                           steps_per_epoch=stream.windows_per_epoch, evaluate=evaluate,
                           best_metric="loss")
  run.finish({**outcome.results, ...})

It resumes from the run's latest checkpoint (or starts fresh), builds the optax chain and the
schedule from the config (``rnn_jax.optim``), fits with logging, evaluation and checkpoints,
restores the best checkpoint and evaluates it on every split.

``loss_fn(params, batch, rng) -> (loss, aux)`` is the only model-specific code. ``aux`` is a
dict: scalar entries become metrics; other entries (e.g. the truncated-BPTT carry, see
``make_tbptt_step``) are passed through untouched.

Truncated BPTT (Williams & Peng 1990): every k1 steps, back-propagate k2 steps. Here
k1 = k2 = T (the window length): a window of T tokens is one forward and one backward pass;
its final carry starts the next window under ``stop_gradient``, so the state flows across
windows but gradients stop at the window boundary. The carry is reset to zeros at the start
of every epoch (the batch's ``reset`` flag).

Interrupts: SIGINT and SIGTERM during ``fit`` finish the current step, save a checkpoint at
it and raise ``Interrupted``; the run continues from there when resumed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rnn_jax import mesh as mesh_lib
from rnn_jax import optim
from rnn_jax.checkpoint import CheckpointManager
from rnn_jax.rundir import RunDir


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
  """Jitted ``eval_step(params, batch) -> (loss, aux)``, deterministic (a fixed dummy key).

  With params replicated over a mesh (``train_and_test`` leaves them so), the batch is split
  over its devices as in training (``rnn_jax.mesh.data_parallel``)."""

  def eval_step(params, batch):
    return loss_fn(params, batch, jax.random.PRNGKey(0))

  return mesh_lib.data_parallel(jax.jit(eval_step))


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


class Stream(Protocol):
  """A resumable batch source: ``next(stream)`` gives a batch; ``position()`` is JSON-able
  and ``seek(position)`` returns to it (used for exact resume)."""

  def __next__(self): ...
  def position(self) -> dict: ...
  def seek(self, position: dict) -> None: ...


def _mean_metrics(history: list[dict]) -> dict:
  """Average each scalar metric over the logged steps (fetched from the device once)."""
  keys = [k for k, v in history[0].items() if np.ndim(v) == 0]
  history = jax.device_get([{k: h[k] for k in keys} for h in history])
  return {k: float(np.mean([h[k] for h in history])) for k in keys}


@dataclasses.dataclass
class FitResult:
  """What ``fit`` returns: the final loop state, the last logged train and eval metrics, the step."""
  state: Any
  step: int
  train: dict
  eval: dict


# ---------------------------------------------------------------------------
# Console: a progress bar that log lines never share
# ---------------------------------------------------------------------------

class _BarStream:
  """A file-like stream that prints through ``tqdm.write``, so log lines go above the bar."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    from tqdm import tqdm
    text = text.rstrip("\n")
    if text:
      tqdm.write(text, file=self.stream)

  def flush(self) -> None:
    self.stream.flush()


@contextlib.contextmanager
def progress_bar(total: int, initial: int = 0, *, enabled: bool = True, desc: str = ""):
  """A tqdm bar on stderr while absl log lines are routed through ``tqdm.write``.

  Every log line is printed on its own line above the bar and the bar is redrawn below it,
  so the two never share a terminal line. When stderr is not a terminal (a log file, a
  pipe) there is no bar: the log lines alone show the progress.
  """
  from tqdm import tqdm
  enabled = enabled and sys.stderr.isatty()
  handler = logging.get_absl_handler().python_handler
  previous = handler.stream
  handler.stream = _BarStream(previous if previous is not None else sys.stderr)
  bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, mininterval=0.5, miniters=1,
             desc=desc, file=sys.stderr, leave=False)
  try:
    yield bar
  finally:
    bar.close()
    handler.stream = previous


# ---------------------------------------------------------------------------
# Interrupts
# ---------------------------------------------------------------------------

class Interrupted(Exception):
  """Training stopped by SIGINT or SIGTERM after saving a checkpoint at ``step``."""

  def __init__(self, signal_number: int, step: int, workdir: str):
    self.signal_number, self.step, self.workdir = signal_number, step, workdir
    name = signal.Signals(signal_number).name
    super().__init__(f"{name} at step {step}: checkpoint saved in {workdir}")


@contextlib.contextmanager
def _catch_signals():
  """Record SIGINT / SIGTERM instead of dying; a second signal gets the previous handler."""
  caught: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield caught
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

  def handler(number, frame):
    caught.append(number)
    for s, h in previous.items():
      signal.signal(s, h)

  for s in previous:
    signal.signal(s, handler)
  try:
    yield caught
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


# ---------------------------------------------------------------------------
# The fit loop
# ---------------------------------------------------------------------------

def fit(state, step_fn, stream: Stream, *, num_steps: int, run: RunDir, start_step: int = 0,
        evaluate: Optional[Callable[[Any], dict]] = None, eval_every: int = 0,
        checkpoints: Optional[CheckpointManager] = None, checkpoint_every: int = 0,
        best_metric: Optional[str] = None, log_every: int = 50, tokens_per_step: Optional[int] = None,
        train_summary: Optional[Callable[[dict], dict]] = None, progress: bool = True,
        stop_when: Optional[Callable[[dict], bool]] = None) -> FitResult:
  """Run ``step_fn`` from ``start_step`` to ``num_steps`` with logging, evaluation and checkpoints.

  Each step: ``state, metrics = step_fn(state, next(stream))``. Every ``log_every`` steps the
  mean of the scalar metrics (optionally mapped by ``train_summary``, e.g. to add bpc) is
  logged to metrics.jsonl as split "train" and shown on the progress bar with tokens/s
  (``tokens_per_step`` tokens per step). Every ``eval_every`` steps and at the end,
  ``evaluate(state)`` returns a dict logged as split "valid". A checkpoint (the state and the
  stream position) is saved every ``checkpoint_every`` steps, after every evaluation (ranked
  on ``best_metric``) and at the end.

  Early stop: ``stop_when(eval_metrics)`` is asked after every evaluation; if it returns True
  the run stops there (after that step's checkpoint) and ``FitResult.step`` is that step.

  SIGINT / SIGTERM: the current step finishes, a checkpoint is saved at it and ``Interrupted``
  is raised.
  """
  if num_steps < start_step:
    raise ValueError(f"fit: num_steps={num_steps} is before the resumed step {start_step}")
  history: list[dict] = []
  last_train, last_eval = {}, {}
  tick, tick_step = time.time(), start_step
  step = start_step

  def checkpoint(step, eval_metrics):
    if checkpoints is not None:
      metrics = ({best_metric: float(eval_metrics[best_metric])}
                 if best_metric and best_metric in eval_metrics else None)
      checkpoints.save(step, state, extra={"data": stream.position(), "step": step}, metrics=metrics)

  with _catch_signals() as caught, progress_bar(num_steps, start_step, enabled=progress and run.primary,
                                                desc=run.label) as bar:
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
          raise FloatingPointError(f"{run.label}: non-finite training metrics at step {step}: {summary}; "
                                   f"lower the learning rate or enable clipping (or check that the batch's "
                                   f"token ids lie in the vocabulary)")
        last_train = run.log(step, "train", **summary)
        postfix = {"loss": f"{summary['loss']:.4g}"}
        if tokens_per_step:
          postfix["tokens/s"] = f"{summary['tokens_per_s']:.0f}"
        bar.set_postfix(postfix, refresh=False)
      evaluated = False
      if evaluate is not None and ((eval_every and step % eval_every == 0) or step == num_steps):
        last_eval = run.log(step, "valid", **evaluate(state))
        evaluated = True
      if (checkpoint_every and step % checkpoint_every == 0) or evaluated or step == num_steps:
        checkpoint(step, last_eval if evaluated else {})
      if caught:
        checkpoint(step, {})
        raise Interrupted(caught[0], step, run.workdir)
      if evaluated and stop_when is not None and stop_when(last_eval):
        break
  return FitResult(state=state, step=step, train=last_train, eval=last_eval)


# ---------------------------------------------------------------------------
# The training recipe
# ---------------------------------------------------------------------------

def planned_steps(config, steps_per_epoch: int) -> int:
  """config.steps, or config.epochs full passes of ``steps_per_epoch`` steps when steps is 0."""
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
  return config.steps or max(1, int(round(config.epochs * steps_per_epoch)))


@dataclasses.dataclass
class TrainOutcome:
  """What ``train_and_test`` returns.

  results: {"<split>_<metric>": value} of the best checkpoint on every split, plus "steps",
  "epochs", "best_step", "resumed_from_step" and "final_train" (the last train log record).
  """
  params: Any
  state: Any
  results: dict
  step: int
  best_step: Optional[int]
  start_step: int
  num_steps: int


def _params_of(state):
  return state["train"].params if isinstance(state, dict) else state.params


def train_and_test(run: RunDir, config, *, params, loss_fn: LossFn, stream: Stream, steps_per_epoch: int,
                   evaluate: Callable[[Any, str], dict], best_metric: str, best_mode: str = "min",
                   carry=None, splits: Sequence[str] = ("valid", "test"),
                   tokens_per_step: Optional[int] = None,
                   train_summary: Optional[Callable[[dict], dict]] = None,
                   stop_when: Optional[Callable[[dict], bool]] = None,
                   progress: bool = True) -> TrainOutcome:
  """The one training recipe: resume or start -> fit -> restore the best -> evaluate every split.

  config: a ``rnn_jax.config.TrainingConfig`` (optimiser, schedule, clip, steps or epochs,
  eval_every, checkpoint_every, keep, log_every, seed). params: the initial params.
  evaluate(params, split) -> {metric: value} for "valid" during training and for every split
  of ``splits`` at the end; ``best_metric`` of its "valid" result ranks checkpoints
  (``best_mode`` "min" or "max"). carry: the initial truncated-BPTT carry, for a stream of
  windows (see ``make_tbptt_step``); None for independent batches.

  Data parallelism (``rnn_jax.mesh``): the batch (and the truncated-BPTT carry) is split over
  ``config.num_devices`` local devices (0: all), params and optimiser state are replicated,
  and results["mesh"] records the mesh. Evaluation runs replicated on the mesh.

  Resuming (``run.resuming``): the latest checkpoint's state and stream position are
  restored onto this run's mesh, so the trajectory is the uninterrupted one, also when the
  checkpoint was saved on another number of devices. If the planned number of steps
  changed, training is extended (or shortened) with a logged note, and a cosine schedule
  decays from its value at the resume step to 0 at the new end instead of jumping.
  """
  num_steps = planned_steps(config, steps_per_epoch)
  if not config.steps:
    logging.info("%s: steps=0, so the run trains %g epochs of %d steps = %d steps", run.label, config.epochs,
                 steps_per_epoch, num_steps)
  mesh = mesh_lib.make_mesh(config.num_devices)
  mesh_lib.check_divisible(config.batch_size, mesh)
  checkpoints = CheckpointManager(run.path("checkpoints"), keep=config.keep, best_metric=best_metric,
                                  best_mode=best_mode)
  fallback = run.options.checkpoint_fallback  # a corrupt latest step: resume from the newest good one
  start_step = (checkpoints.resume_step(fallback=fallback) or 0) if run.resuming else 0
  if num_steps < start_step:
    raise ValueError(f"steps: the run is already at step {start_step}, after the {num_steps} now asked for")
  meta = run.meta
  notes = []
  planned = meta.get("planned_steps") or num_steps
  horizons = [list(h) for h in meta.get("schedule_horizons", [])]
  last_total = horizons[-1][1] if horizons else planned
  if start_step and num_steps != last_total:
    notes.append(f"training {'extended' if num_steps > last_total else 'shortened'} from {last_total} "
                 f"to {num_steps} steps")
    if config.schedule == "cosine":
      horizons.append([start_step, num_steps])
      notes.append(f"the cosine schedule decays from its step-{start_step} rate to 0 at step {num_steps}")
      if start_step >= last_total:
        logging.warning("%s: the cosine schedule reached 0 at step %d, so the added steps train with "
                        "learning rate 0; start a new run with more steps instead", run.label, last_total)
  run.meta.update(planned_steps=planned, schedule_horizons=horizons, num_steps=num_steps,
                  steps_per_epoch=steps_per_epoch)
  run.write_meta()
  schedule, optimizer = optim.from_config(config, steps_per_epoch=steps_per_epoch, total_steps=planned,
                                          horizons=horizons)
  train_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  state = mesh_lib.replicate(create_train_state(params, optimizer, train_key), mesh)
  step_fn = make_train_step(loss_fn, optimizer, schedule)
  if carry is not None:
    state = {"train": state, "carry": mesh_lib.shard_batch(carry, mesh)}
    step_fn = make_tbptt_step(step_fn)
  if start_step:  # restored onto this run's mesh, whatever the device count it was saved from
    state, extra = checkpoints.restore(state, step=start_step)
    stream.seek(extra["data"])
    run.mark_resume(start_step, notes)
  stream = mesh_lib.ShardedStream(stream, mesh)
  eval_every = config.eval_every or steps_per_epoch
  with mesh_lib.partitioned_over(mesh):  # the steps are traced for the mesh (no unpartitioned kernels)
    outcome = fit(state, step_fn, stream, num_steps=num_steps, run=run, start_step=start_step,
                  evaluate=lambda s: evaluate(_params_of(s), "valid"), eval_every=eval_every,
                  checkpoints=checkpoints, checkpoint_every=config.checkpoint_every, best_metric=best_metric,
                  log_every=min(config.log_every, num_steps), tokens_per_step=tokens_per_step,
                  train_summary=train_summary, progress=progress, stop_when=stop_when)
  best_step = checkpoints.best_step()
  best_state = outcome.state
  if best_step is not None and best_step != outcome.step:
    best_state, _ = checkpoints.restore(outcome.state, step=best_step)
  best_params = _params_of(best_state)
  results = {}
  for split in splits:
    metrics = evaluate(best_params, split)
    results.update({f"{split}_{k}": v for k, v in metrics.items()})
    if split != "valid":  # the figures of the best checkpoint, logged at its step
      run.log(best_step if best_step is not None else outcome.step, split, **metrics)
  results.update(steps=outcome.step, epochs=outcome.step / steps_per_epoch, best_step=best_step,
                 resumed_from_step=start_step, final_train=outcome.train, mesh=mesh_lib.describe(mesh))
  checkpoints.close()
  return TrainOutcome(params=best_params, state=outcome.state, results=results, step=outcome.step,
                      best_step=best_step, start_step=start_step, num_steps=num_steps)
