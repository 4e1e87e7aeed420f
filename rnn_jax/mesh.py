"""Data parallelism on JAX's own engine: a device mesh, the batch split over it, the rest replicated.

  mesh = make_mesh(num_devices=0)                # every local device on one "data" axis
  state = replicate(state, mesh)                 # params and optimiser state on every device
  batch = shard_batch(batch, mesh)               # the leading (batch) axis split over "data"

``jax.jit`` then runs the train step as one program over the mesh: each device holds B / n
examples, the gradient is all-reduced by XLA, and every device applies the same update
(Shardy partitions the step from the input shardings). A scan-based RNN shards the batch,
never the time axis; the truncated-BPTT carry is split with its streams because it has a
leading batch axis too.

Randomness does not depend on the device count: keys are replicated and JAX's partitionable
threefry draws the same bits for a sharded array as for the whole one, so a run on 8 devices
follows the 1-device trajectory up to the order of floating-point reductions.

On a CPU, ``JAX_NUM_CPU_DEVICES=8`` (set before JAX starts) gives 8 devices in one process.

Several processes (hosts): ``initialize_distributed`` runs ``jax.distributed.initialize`` before
anything else touches JAX (auto-detected on Cloud TPU, Slurm and Open MPI; an explicit
coordinator address, process count and index elsewhere; gloo collectives between CPU
processes). The mesh then spans every process's devices, ordered by process, and each process
places only the rows of the global batch that its own devices hold
(``jax.make_array_from_callback``). Every process assembles the same global batch on the host,
from the same in-memory dataset and the same stream position, so the padding and the order of
a batch never depend on the process count. Only process 0 (``is_primary``) writes run files.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


class ProcessGroupError(RuntimeError):
  """The processes of a multi-process run could not join, or one of them could not go on."""


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                           auto: bool = False, timeout_s: int = 300) -> bool:
  """Join a multi-process run through ``jax.distributed.initialize``; returns whether it did.

  Call it first, before any JAX computation. ``coordinator_address`` ("host:port" of process 0),
  ``num_processes`` and ``process_id`` name the run explicitly (two plain hosts, or several
  processes on one machine); ``auto=True`` with none of them lets JAX detect a Cloud TPU slice,
  a Slurm allocation or an Open MPI launch. With neither, this is a single-process run and
  nothing happens. Processes on CPUs exchange gradients through gloo collectives.
  """
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if not (explicit or auto):
    return False
  if explicit:
    missing = [name for name, given in (("coordinator_address", bool(coordinator_address)),
                                        ("num_processes", num_processes > 0),
                                        ("process_id", process_id >= 0)) if not given]
    if missing:
      raise ValueError(f"a multi-process run needs coordinator_address, num_processes and process_id "
                       f"together; missing {', '.join(missing)} (or use auto detection on TPU, Slurm, MPI)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes})")
    if ":" not in coordinator_address:
      raise ValueError(f"coordinator_address={coordinator_address!r} must be host:port of process 0")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if explicit:
      jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id,
                                 initialization_timeout=timeout_s)
    else:
      jax.distributed.initialize(initialization_timeout=timeout_s)
  except (RuntimeError, ValueError) as error:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ProcessGroupError(f"jax.distributed.initialize failed: {message}") from error
  return True


def is_primary() -> bool:
  """True in process 0, the one process that writes results, plots and logs."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier ``name`` (nothing to wait for in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def broadcast_from_primary(value: int) -> int:
  """Process 0's integer ``value``, on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh ("data",) over the first ``num_devices`` local devices of every process (0: all).

  In a multi-process run the mesh spans all processes, process 0's devices first, so the
  data axis has num_devices x process_count entries.
  """
  local = jax.local_devices()
  if num_devices < 0:
    raise ValueError(f"num_devices must be >= 0 (0 uses all {len(local)}), got {num_devices}")
  if num_devices > len(local):
    raise ValueError(f"num_devices={num_devices} asks for more devices than the {len(local)} this "
                     f"process has ({jax.default_backend()})")
  per_process = num_devices or len(local)
  chosen = []
  for process in range(jax.process_count()):
    owned = sorted((d for d in jax.devices() if d.process_index == process), key=lambda d: d.id)
    if len(owned) < per_process:
      raise ValueError(f"process {process} has {len(owned)} devices, fewer than num_devices={per_process}")
    chosen.extend(owned[:per_process])
  return Mesh(np.asarray(chosen), (DATA,))


def describe(mesh: Mesh) -> dict:
  """The mesh for results.json: its axis sizes and device kinds."""
  return {"axes": {name: int(size) for name, size in mesh.shape.items()},
          "devices": [str(d) for d in mesh.devices.flat], "process_count": jax.process_count()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA))


def _place(value, sharding: NamedSharding):
  """``value`` (the same global array in every process) as a jax.Array with ``sharding``; each
  process transfers only the blocks its own devices hold."""
  if jax.process_count() == 1:
    return jax.device_put(value, sharding)
  if isinstance(value, jax.Array) and value.sharding == sharding:
    return value
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of ``tree`` copied to every device of the mesh."""
  whole = replicated(mesh)
  return jax.tree_util.tree_map(lambda leaf: _place(leaf, whole), tree)


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raise ValueError unless the batch splits evenly over the mesh's data axis."""
  devices = mesh.shape[DATA]
  if batch_size % devices:
    raise ValueError(f"{what}={batch_size} does not split over {devices} devices; use a multiple of {devices} "
                     f"(or num_devices that divides it)")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Every array leaf with a leading batch axis split over "data"; scalars replicated.

  Raises ValueError naming the leaf when its batch axis does not divide by the device count.
  """
  devices = mesh.shape[DATA]
  data, whole = batch_sharded(mesh), replicated(mesh)

  def place(path, leaf):
    if np.ndim(leaf) == 0:
      return _place(leaf, whole)
    if np.shape(leaf)[0] % devices:
      name = jax.tree_util.keystr(path)
      raise ValueError(f"batch{name} has {np.shape(leaf)[0]} rows, which do not split over {devices} devices")
    return _place(leaf, data)

  return jax.tree_util.tree_map_with_path(place, batch)


class ShardedStream:
  """A stream whose batches are placed on the mesh (batch axis split, scalars replicated)."""

  def __init__(self, stream, mesh: Optional[Mesh]):
    self.stream, self.mesh = stream, mesh

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.stream)
    return batch if self.mesh is None else shard_batch(batch, self.mesh)

  def position(self) -> dict:
    return self.stream.position()

  def seek(self, position: dict) -> None:
    self.stream.seek(position)


_PARTITIONED_DEVICES = contextvars.ContextVar("rnn_jax_partitioned_devices", default=1)


@contextlib.contextmanager
def partitioned_over(mesh: Mesh) -> Iterator[Mesh]:
  """Within this context, functions traced for ``mesh`` know they will be split over its devices.

  The fused CPU kernels have no partitioning rule, so XLA would run each of them whole on every
  device of a mesh; ``rnn_jax.bptt.kernel_choice`` reads ``partitioned_devices()`` and keeps a
  recurrence on ``lax.scan``, which XLA partitions, when it is above 1. The training recipe
  traces its train and evaluation steps inside this context.
  """
  token = _PARTITIONED_DEVICES.set(int(mesh.size))
  try:
    yield mesh
  finally:
    _PARTITIONED_DEVICES.reset(token)


def partitioned_devices() -> int:
  """The device count of the mesh that functions traced now will be split over (1: none)."""
  return _PARTITIONED_DEVICES.get()


def mesh_of(tree: Any) -> Optional[Mesh]:
  """The mesh the leaves of ``tree`` are placed on with a data axis (None for unplaced arrays)."""
  for leaf in jax.tree_util.tree_leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and DATA in sharding.mesh.shape:
      return sharding.mesh
  return None


def place_batch(batch: Any, mesh: Mesh) -> Any:
  """``shard_batch`` when every array leaf's rows split over the mesh, else the batch replicated.

  Evaluation batches (a ragged last batch, a single prompt) need not divide by the device
  count; those run replicated, with the same result.
  """
  devices = mesh.shape[DATA]
  leaves = [leaf for leaf in jax.tree_util.tree_leaves(batch) if np.ndim(leaf) > 0]
  if leaves and all(np.shape(leaf)[0] % devices == 0 for leaf in leaves):
    return shard_batch(batch, mesh)
  return replicate(batch, mesh)


def to_host(tree: Any) -> Any:
  """The leaves of ``tree`` as host numpy arrays, gathering blocks held by other processes."""
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return leaf
  return jax.tree_util.tree_map(fetch, tree)


def data_parallel(function):
  """``function(params, *batch)`` with its batch split over the mesh that ``params`` live on.

  For a jitted forward or evaluation function: when ``params`` are replicated over a mesh
  (as the training recipe leaves them), every array argument after ``params`` is placed with
  ``place_batch``, so evaluation is sharded like training; outputs held by other processes
  are gathered (``to_host``). Params on one device, or no mesh, call ``function`` unchanged.
  """
  def wrapped(params, *batch):
    mesh = mesh_of(params)
    if mesh is None or mesh.size == 1:
      return function(params, *batch)
    with partitioned_over(mesh):
      return to_host(function(params, *place_batch(batch, mesh)))

  wrapped.__wrapped__ = function
  wrapped.__doc__ = function.__doc__
  return wrapped
