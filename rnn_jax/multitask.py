"""Multi-task sequence-to-sequence learning: named encoders and decoders shared between tasks.

Luong, Le, Sutskever, Vinyals & Kaiser 2015, "Multi-task sequence to sequence learning"
(arXiv:1511.06114). A task maps sequences of one kind to sequences of another with one of the
model's encoders and one of its decoders; tasks that name the same encoder (or decoder) share
its parameters. The paper's three settings are three task registries:

  one-to-many:   one encoder, several decoders        en->es translation + en->en autoencoder
  many-to-one:   several encoders, one decoder        en->es translation + es->es autoencoder
  many-to-many:  several encoders and decoders        en->es + en->en + es->es

Composition. A task (encoder e, decoder d) IS the ``rnn_jax.seq2seq.Seq2Seq`` of the shared
architecture with V_x = |vocabulary of e| and V_y = |vocabulary of d|, whose params are
``Seq2Seq.join_params(params["encoders"][e], params["decoders"][d])``. The encoder side is
e(x_t), RNN_enc (and Cho's W_c of c = tanh(W_c h_S + b_c)); the decoder side is e(y_t), RNN_dec,
the read-out W_hy and whatever joins the two (bridge W_s, attention scores): see
``Seq2Seq.split_params``. So the equations of every task are those of ``Seq2Seq``, written once:

  p_k(y | x) = Seq2Seq_{e_k, d_k}(x, y),     L_k = -1/N sum_t log p_k(y_t | y_<t, x)   (per token)

Mixing (Luong et al. mix the tasks by ratio per minibatch): training step n trains ONE task,
drawn with probability alpha_k = w_k / sum_j w_j from its mixing weight w_k, and takes that
task's next minibatch. The draw is u_n ~ U[0, 1) from numpy's PCG64 seeded with (seed, n), and
the task is the k with A_{k-1} <= u_n < A_k (A_k = alpha_1 + .. + alpha_k), so a task of weight
0 is never drawn, the sequence is reproducible from the seed, and resuming at step n needs n
alone (``MultiTaskBatches.position``). The step's gradient is that of L_k: it reaches only the
encoder and decoder of task k (the others get exact zeros); a shared piece is updated by every
task that uses it, each in its own steps.

Shapes: as ``Seq2Seq`` (source [B, S], targets [B, T]); a ``TaskBatch`` adds the task index, a
scalar int32, which selects the task's loss with ``lax.switch`` inside one jitted step.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax.seq2seq import Batch, Seq2Seq

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Component:
  """A named encoder or decoder: ``name`` and the size of its vocabulary (V_x or V_y)."""
  name: str
  vocab_size: int


@dataclasses.dataclass(frozen=True)
class Task:
  """A task of the registry: its ``name``, the encoder and decoder it composes, its mixing weight w_k >= 0."""
  name: str
  encoder: str
  decoder: str
  weight: float = 1.0


class TaskBatch(NamedTuple):
  """A training minibatch of one task: ``task`` its index in the registry (int32 scalar), ``batch``
  the teacher-forcing ``seq2seq.Batch``."""
  task: np.ndarray
  batch: Batch


def _check_name(kind: str, name) -> None:
  if not isinstance(name, str) or not NAME_PATTERN.match(name):
    raise ValueError(f"multitask: {kind} name {name!r} must match {NAME_PATTERN.pattern} "
                     f"(lower-case letters, digits, _)")


def mixing_probabilities(weights: Sequence[float]) -> np.ndarray:
  """alpha_k = w_k / sum_j w_j for weights w [K]; ValueError on a negative, non-finite or all-zero w."""
  weights = [float(w) for w in weights]
  if not weights:
    raise ValueError("multitask: no tasks to mix; expected at least one task weight")
  for index, w in enumerate(weights):
    if not math.isfinite(w) or w < 0:
      raise ValueError(f"multitask: mixing weight {index} is {w}; expected a finite number >= 0")
  total = sum(weights)
  if total <= 0:
    raise ValueError(f"multitask: the mixing weights {weights} sum to 0; expected at least one > 0")
  return np.asarray(weights, np.float64) / total


def draw_task(probabilities: np.ndarray, seed: int, draw: int) -> int:
  """The task of draw n: the k with A_{k-1} <= u_n < A_k, u_n ~ U[0, 1) from PCG64((seed, n)).

  probabilities: alpha [K] (``mixing_probabilities``); A_k their cumulative sums, A_K set to 1.
  A task with alpha_k = 0 has an empty interval and is never drawn.
  """
  cumulative = np.cumsum(probabilities)
  cumulative[-1] = 1.0
  u = np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, int(draw)])).random()
  return int(np.searchsorted(cumulative, u, side="right"))


@dataclasses.dataclass(frozen=True)
class MultiTaskSeq2Seq:
  """Named encoders and decoders of one ``Seq2Seq`` architecture, composed by a task registry.

  Attributes:
    architecture: the shared Seq2Seq hyper-parameters (kind, cell, E, layers, attention, special
      ids); its vocabulary sizes are replaced by each encoder's and decoder's own.
    encoders, decoders: the named components, each with its vocabulary size.
    tasks: the registry; every task names one encoder and one decoder, every component is used
      by some task, and the weights are >= 0 with a positive sum.

  Params: {"encoders": {name: encoder side}, "decoders": {name: decoder side}}, the sides of
  ``Seq2Seq.split_params``.
  """
  architecture: Seq2Seq
  encoders: tuple[Component, ...]
  decoders: tuple[Component, ...]
  tasks: tuple[Task, ...]

  def __post_init__(self):
    if not self.tasks:
      raise ValueError("multitask: the task registry is empty; expected at least one Task")
    for kind, items in (("encoder", self.encoders), ("decoder", self.decoders), ("task", self.tasks)):
      names = [item.name for item in items]
      for name in names:
        _check_name(kind, name)
      duplicates = sorted({n for n in names if names.count(n) > 1})
      if duplicates:
        raise ValueError(f"multitask: {kind} names {duplicates} are given more than once; names must be unique")
    for component in self.encoders + self.decoders:
      if int(component.vocab_size) <= 0:
        raise ValueError(f"multitask: {component.name!r} has vocab_size {component.vocab_size}; expected > 0")
    encoders, decoders = {e.name for e in self.encoders}, {d.name for d in self.decoders}
    for task in self.tasks:
      if task.encoder not in encoders:
        raise ValueError(f"multitask: task {task.name!r} names encoder {task.encoder!r}; the encoders are "
                         f"{sorted(encoders)}")
      if task.decoder not in decoders:
        raise ValueError(f"multitask: task {task.name!r} names decoder {task.decoder!r}; the decoders are "
                         f"{sorted(decoders)}")
    unused = sorted((encoders - {t.encoder for t in self.tasks}) | (decoders - {t.decoder for t in self.tasks}))
    if unused:
      raise ValueError(f"multitask: {unused} are used by no task; every encoder and decoder needs a task")
    for decoder in self.decoders:
      for name in ("bos_id", "eos_id", "pad_id"):
        if not 0 <= getattr(self.architecture, name) < decoder.vocab_size:
          raise ValueError(f"multitask: {name}={getattr(self.architecture, name)} lies outside decoder "
                           f"{decoder.name!r}'s vocabulary of {decoder.vocab_size}")
    mixing_probabilities([t.weight for t in self.tasks])

  # ---- the registry --------------------------------------------------------------
  @property
  def task_names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.tasks)

  @property
  def probabilities(self) -> np.ndarray:
    """alpha_k = w_k / sum_j w_j, in registry order."""
    return mixing_probabilities([t.weight for t in self.tasks])

  def task(self, name: str) -> Task:
    for task in self.tasks:
      if task.name == name:
        return task
    raise ValueError(f"multitask: unknown task {name!r}; the tasks are {list(self.task_names)}")

  def task_index(self, name: str) -> int:
    return self.task_names.index(self.task(name).name)

  def _vocab_size(self, components, name: str) -> int:
    return next(c.vocab_size for c in components if c.name == name)

  def task_model(self, name: str) -> Seq2Seq:
    """The Seq2Seq of a task: the architecture with V_x of its encoder and V_y of its decoder."""
    task = self.task(name)
    return dataclasses.replace(self.architecture,
                               source_vocab_size=self._vocab_size(self.encoders, task.encoder),
                               target_vocab_size=self._vocab_size(self.decoders, task.decoder))

  def task_params(self, params: dict, name: str) -> dict:
    """The task's Seq2Seq params: its encoder's side joined with its decoder's side (no copy)."""
    task = self.task(name)
    return Seq2Seq.join_params(params["encoders"][task.encoder], params["decoders"][task.decoder])

  def check_vocabularies(self, name: str, source_vocab_size: int, target_vocab_size: int) -> None:
    """ValueError unless the task's data vocabularies have its encoder's and decoder's sizes."""
    model = self.task_model(name)
    task = self.task(name)
    for side, component, expected, given in (("source", task.encoder, model.source_vocab_size, source_vocab_size),
                                             ("target", task.decoder, model.target_vocab_size, target_vocab_size)):
      if int(given) != expected:
        raise ValueError(f"multitask: task {name!r} has a {side} vocabulary of {given} tokens but its "
                         f"{'encoder' if side == 'source' else 'decoder'} {component!r} has {expected}")

  # ---- params --------------------------------------------------------------------
  def init(self, key) -> dict:
    """{"encoders": {name: ...}, "decoders": {name: ...}}; component i of each kind from fold_in(key, .).

    Each side is the matching half of ``Seq2Seq.init`` of a model with that component's vocabulary
    (encoder i: fold_in(key, i); decoder j: fold_in(key, 1000 + j)).
    """
    encoders, decoders = {}, {}
    for index, component in enumerate(self.encoders):
      model = dataclasses.replace(self.architecture, source_vocab_size=component.vocab_size)
      encoders[component.name] = model.split_params(model.init(jax.random.fold_in(key, index)))[0]
    for index, component in enumerate(self.decoders):
      model = dataclasses.replace(self.architecture, target_vocab_size=component.vocab_size)
      decoders[component.name] = model.split_params(model.init(jax.random.fold_in(key, 1000 + index)))[1]
    return {"encoders": encoders, "decoders": decoders}

  # ---- forward and losses ----------------------------------------------------------
  def __call__(self, params: dict, batch: Batch, *, task: str, train: bool = False, rng=None) -> jax.Array:
    """Teacher forcing of one task: the logits of every target step -> [B, T, V_y of its decoder]."""
    return self.task_model(task)(self.task_params(params, task), batch, train=train, rng=rng)

  def task_loss(self, params: dict, batch: Batch, *, task: str, train: bool = False, rng=None,
                reduction: str = "mean") -> jax.Array:
    """L_k: the task's Seq2Seq cross-entropy (nats per target token for reduction "mean")."""
    return self.task_model(task).loss(self.task_params(params, task), batch, train=train, rng=rng,
                                      reduction=reduction)

  def loss(self, params: dict, batch: TaskBatch, *, train: bool = False, rng=None) -> jax.Array:
    """L_k of the batch's task k (``TaskBatch.task``, traced or concrete), chosen by ``lax.switch``.

    Only the chosen branch runs, and its gradient reaches only task k's encoder and decoder.
    """
    branches = [lambda p, b, r, name=name: self.task_loss(p, b, task=name, train=train, rng=r)
                for name in self.task_names]
    index = jnp.asarray(batch.task, jnp.int32)
    return jax.lax.switch(jnp.clip(index, 0, len(branches) - 1), branches, params, batch.batch, rng)


def make_loss_fn(model: MultiTaskSeq2Seq):
  """``loss_fn(params, batch, rng) -> (L_k, aux)`` for ``rnn_jax.train.train_and_test``.

  aux per task k: "<k>_share" = 1 if the batch is task k's else 0, and "<k>_loss_sum" = L_k times
  that indicator; averaged over logged steps their ratio is task k's mean training loss
  (``per_task_summary``).
  """

  def loss_fn(params, batch: TaskBatch, rng):
    loss = model.loss(params, batch, train=True, rng=rng)
    aux = {}
    for index, name in enumerate(model.task_names):
      chosen = (jnp.asarray(batch.task) == index).astype(jnp.float32)
      aux[f"{name}_share"] = chosen
      aux[f"{name}_loss_sum"] = loss * chosen
    return loss, aux

  return loss_fn


def per_task_summary(task_names: Sequence[str]):
  """``train_summary`` for the recipe: "<k>_loss" = mean of "<k>_loss_sum" / mean of "<k>_share"
  (task k's mean training loss over the logged steps; omitted when it drew no step), "<k>_share"
  kept (the fraction of those steps that trained task k); the sums dropped."""

  def summary(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if not k.endswith("_loss_sum")}
    for name in task_names:
      share = metrics.get(f"{name}_share", 0.0)
      if share > 0:
        out[f"{name}_loss"] = metrics[f"{name}_loss_sum"] / share
    return out

  return summary


class MultiTaskBatches:
  """An endless, resumable stream of ``TaskBatch``: draw n picks a task (``draw_task``), whose own
  stream gives the batch.

  streams: {task name: a resumable stream of ``seq2seq.Batch`` (e.g. ``data.translation.PairBatches``)}
  for every task of ``model``. position() = {"draws": n, "tasks": {name: that stream's position}},
  so seek() continues exactly: the next task and each task's next batch. ``counts`` is the number
  of batches each task has drawn.
  """

  def __init__(self, model: MultiTaskSeq2Seq, streams: Mapping, *, seed: int = 0):
    missing = sorted(set(model.task_names) - set(streams))
    extra = sorted(set(streams) - set(model.task_names))
    if missing or extra:
      raise ValueError(f"MultiTaskBatches: streams for tasks {sorted(streams)}; expected exactly "
                       f"{list(model.task_names)}")
    self.names = model.task_names
    self.probabilities = model.probabilities
    self.streams = dict(streams)
    self.seed = int(seed)
    self.draws = 0
    self.counts = {name: 0 for name in self.names}

  def __iter__(self):
    return self

  def __next__(self) -> TaskBatch:
    index = draw_task(self.probabilities, self.seed, self.draws)
    self.draws += 1
    name = self.names[index]
    self.counts[name] += 1
    return TaskBatch(np.asarray(index, np.int32), next(self.streams[name]))

  def position(self) -> dict:
    return {"draws": self.draws, "counts": dict(self.counts),
            "tasks": {name: stream.position() for name, stream in self.streams.items()}}

  def seek(self, position: dict) -> None:
    if set(position.get("tasks", {})) != set(self.names):
      raise ValueError(f"MultiTaskBatches: the saved position has tasks {sorted(position.get('tasks', {}))}; "
                       f"this stream has {list(self.names)}")
    self.draws = int(position["draws"])
    self.counts = {name: int(position.get("counts", {}).get(name, 0)) for name in self.names}
    for name, stream in self.streams.items():
      stream.seek(position["tasks"][name])


def task_frequencies(model: MultiTaskSeq2Seq, seed: int, num_draws: int, start: int = 0) -> dict:
  """The fraction of draws start .. start + num_draws - 1 that pick each task (for checking alpha)."""
  counts = np.zeros(len(model.tasks))
  for draw in range(start, start + num_draws):
    counts[draw_task(model.probabilities, seed, draw)] += 1
  return {name: float(c / max(num_draws, 1)) for name, c in zip(model.task_names, counts)}


def shared_components(model: MultiTaskSeq2Seq) -> dict:
  """{"encoders": {name: [tasks]}, "decoders": {name: [tasks]}}: which tasks share each component."""
  return {"encoders": {e.name: [t.name for t in model.tasks if t.encoder == e.name] for e in model.encoders},
          "decoders": {d.name: [t.name for t in model.tasks if t.decoder == d.name] for d in model.decoders}}


def setting_of(model: MultiTaskSeq2Seq) -> str:
  """"single-task", "one-to-many", "many-to-one" or "many-to-many" (Luong et al.'s settings) of the tasks
  with a positive weight."""
  active = [t for t in model.tasks if t.weight > 0]
  encoders, decoders = {t.encoder for t in active}, {t.decoder for t in active}
  if len(active) == 1:
    return "single-task"
  if len(encoders) == 1:
    return "one-to-many"
  if len(decoders) == 1:
    return "many-to-one"
  return "many-to-many"

