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
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh ("data",) over the first ``num_devices`` local devices (0: all of them)."""
  devices = jax.local_devices()
  if num_devices < 0:
    raise ValueError(f"num_devices must be >= 0 (0 uses all {len(devices)}), got {num_devices}")
  if num_devices > len(devices):
    raise ValueError(f"num_devices={num_devices} asks for more devices than the {len(devices)} this "
                     f"process has ({jax.default_backend()})")
  chosen = devices[:num_devices or len(devices)]
  return Mesh(np.asarray(chosen), (DATA,))


def describe(mesh: Mesh) -> dict:
  """The mesh for results.json: its axis sizes and device kinds."""
  return {"axes": {name: int(size) for name, size in mesh.shape.items()},
          "devices": [str(d) for d in mesh.devices.flat]}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of ``tree`` copied to every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


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
      return jax.device_put(leaf, whole)
    if np.shape(leaf)[0] % devices:
      name = jax.tree_util.keystr(path)
      raise ValueError(f"batch{name} has {np.shape(leaf)[0]} rows, which do not split over {devices} devices")
    return jax.device_put(leaf, data)

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
