"""Checkpoints with orbax-checkpoint: keep the last N plus the best, resume exactly.

A checkpoint at step s is the directory ``<dir>/<s>/`` with two items:

* ``state``: any pytree of arrays (a TrainState, or {"train": TrainState, "carry": ...} for
  truncated BPTT), saved with orbax's StandardSave;
* ``extra``: a JSON dict (data position, epoch, step, config) for everything that is not an array.

Atomicity: orbax writes into ``<s>.orbax-checkpoint-tmp-*`` and renames it to ``<s>`` only when
every file is written, so a process killed while saving leaves a tmp directory that is never
listed as a step; ``restore`` then picks the previous complete checkpoint. Nothing earlier is
deleted before a new checkpoint is complete.

Restoring into a target checks the saved tree against the target (same leaves, same shapes and
dtypes) and raises ``CheckpointMismatchError`` naming every difference, so a checkpoint of
another architecture cannot be loaded silently. A checkpoint that cannot be read raises
``CorruptCheckpointError`` naming the step directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.checkpoint_managers import preservation_policy as preservation


class CheckpointError(RuntimeError):
  """Base class of checkpoint errors."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint directory exists but cannot be read."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's tree (names, shapes, dtypes) differs from the target's."""


def _path_name(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _leaf_signature(leaf) -> tuple:
  shape = tuple(getattr(leaf, "shape", ()))
  dtype = getattr(leaf, "dtype", None)
  return shape, (str(np.dtype(dtype)) if dtype is not None else None)


def describe_tree(tree) -> dict[str, tuple]:
  """{"params/layer_0/forward/w_hh": (shape, dtype), ...} for every leaf of ``tree``."""
  return {_path_name(path): _leaf_signature(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_differences(saved: dict[str, tuple], target: dict[str, tuple], limit: int = 12) -> list[str]:
  """Human-readable differences between two ``describe_tree`` results."""
  lines = []
  for name in sorted(set(saved) - set(target)):
    lines.append(f"  only in the checkpoint: {name} {saved[name][0]}")
  for name in sorted(set(target) - set(saved)):
    lines.append(f"  only in the model:      {name} {target[name][0]}")
  for name in sorted(set(saved) & set(target)):
    (s_shape, s_dtype), (t_shape, t_dtype) = saved[name], target[name]
    if s_shape != t_shape:
      lines.append(f"  {name}: checkpoint shape {s_shape}, model shape {t_shape}")
    elif s_dtype and t_dtype and s_dtype != t_dtype:
      lines.append(f"  {name}: checkpoint dtype {s_dtype}, model dtype {t_dtype}")
  if len(lines) > limit:
    lines = lines[:limit] + [f"  ... and {len(lines) - limit} more"]
  return lines


def _metadata_signature(metadata_tree) -> dict[str, tuple]:
  """describe_tree for orbax's saved metadata (ArrayMetadata leaves with shape/dtype)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(metadata_tree)[0]:
    out[_path_name(path)] = _leaf_signature(leaf)
  return out


class _DropOrbaxInfo:
  """absl-handler filter: orbax logs every file operation at INFO (and warns on every save made
  between evaluations that it has no metric to rank); keep its other warnings and errors."""

  def filter(self, record) -> bool:
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= 30 and "did not provide metrics" not in str(record.msg)


def quiet_orbax_logs() -> None:
  """Hide orbax's INFO chatter from the absl log (idempotent)."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
    handler.addFilter(_DropOrbaxInfo())


CHECKSUMS = "rnn_jax_checksums.json"


def _file_digests(step_dir: str) -> dict[str, str]:
  """{relative path: sha256} of every file of a checkpoint step but the checksum file itself."""
  digests = {}
  for root, _, files in os.walk(step_dir):
    for name in sorted(files):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative.startswith(CHECKSUMS):
        continue
      digest = hashlib.sha256()
      with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
          digest.update(block)
      digests[relative] = digest.hexdigest()
  return digests


def _write_checksums(step_dir: str) -> None:
  path = os.path.join(step_dir, CHECKSUMS)
  digests = _file_digests(step_dir)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as handle:
    json.dump(digests, handle, indent=1, sort_keys=True)
  os.replace(tmp, path)


def verify_checksums(step_dir: str) -> None:
  """Raise CorruptCheckpointError if a file of the step changed, vanished or appeared since it was
  saved (its sha256 differs from the one recorded at save time). Steps saved without checksums
  are not checked."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return
  try:
    with open(path) as handle:
      saved = json.load(handle)
  except (OSError, ValueError) as error:
    raise CorruptCheckpointError(f"checkpoint {step_dir}: its checksum file is unreadable ({error}); delete "
                                 f"the step to fall back to an earlier checkpoint") from None
  now = _file_digests(step_dir)
  changed = sorted(name for name in saved if now.get(name) != saved[name])
  if changed:
    raise CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: {len(changed)} file(s) differ from what was "
                                 f"saved ({', '.join(changed[:3])}); delete the step to fall back to an earlier "
                                 f"checkpoint")


class CheckpointManager:
  """Save every so often, keep the last ``keep`` checkpoints plus the best on a validation metric.

    manager = CheckpointManager(workdir + "/checkpoints", keep=2, best_metric="valid_loss")
    manager.save(step, state, extra={"data": stream.position()}, metrics={"valid_loss": 1.3})
    state, extra = manager.restore(target_state)          # latest complete checkpoint
    state, extra = manager.restore(target_state, step=manager.best_step())

  ``best_mode`` is "min" (loss, bpc, perplexity) or "max" (accuracy). Checkpoints saved
  without metrics are kept only while they are among the last ``keep``.
  """

  def __init__(self, directory: str, keep: int = 2, best_metric: Optional[str] = None,
               best_mode: str = "min"):
    if keep < 1:
      raise ValueError(f"CheckpointManager: keep must be >= 1, got {keep}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"CheckpointManager: best_mode must be 'min' or 'max', got {best_mode!r}")
    quiet_orbax_logs()
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    policies = [preservation.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      best_fn = lambda metrics: metrics[best_metric]
      policies.append(preservation.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=1,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=False,
        preservation_policy=preservation.AnyPreservationPolicy(policies), create=True)
    # Handlers are registered up front so a fresh process can read metadata before any save.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})

  # ---- queries -------------------------------------------------------------
  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints (tmp directories of interrupted saves are not listed)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """The kept step with the best ``best_metric`` (the latest step if no metric is tracked)."""
    self._manager.reload()
    return self._manager.best_step()

  # ---- save / restore ------------------------------------------------------
  def save(self, step: int, state, extra: Optional[dict] = None, metrics: Optional[dict] = None) -> None:
    """Save ``state`` (pytree of arrays) and ``extra`` (JSON-able dict) as step ``step``.

    ``metrics`` (e.g. {"valid_loss": 1.3}) rank the checkpoint for best-keeping. Saving a step
    that already exists is skipped (the existing checkpoint is kept).
    """
    extra = json.loads(json.dumps(extra or {}))  # fail early if not JSON-able
    if step in self.all_steps():
      return
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise ValueError(f"CheckpointManager.save: metrics lack the best metric {self.best_metric!r}: "
                       f"{sorted(metrics)}")
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
        metrics=metrics, force=True)
    self._manager.wait_until_finished()
    step_dir = os.path.join(self.directory, str(step))
    if os.path.isdir(step_dir):
      _write_checksums(step_dir)

  def check_compatible(self, step: int, target) -> None:
    """Raise CheckpointMismatchError if step's saved tree differs from ``target``'s."""
    step_dir = os.path.join(self.directory, str(step))
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as error:  # orbax raises several types for unreadable metadata
      raise CorruptCheckpointError(
          f"checkpoint {step_dir} is unreadable ({type(error).__name__}: {error}); delete it to fall "
          f"back to an earlier checkpoint, or start a fresh workdir") from error
    if metadata is None:
      raise CorruptCheckpointError(f"checkpoint {step_dir} has no readable 'state' item; delete it to "
                                   f"fall back to an earlier checkpoint, or start a fresh workdir")
    tree = getattr(metadata, "tree", metadata)
    differences = tree_differences(_metadata_signature(tree), describe_tree(target))
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint {step_dir} does not match the model being restored (different architecture or "
          f"settings?):\n" + "\n".join(differences) +
          "\nUse the settings the checkpoint was trained with, or a fresh workdir.")

  def restore(self, target, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restore (state, extra) from ``step`` (default: the latest complete checkpoint).

    ``target`` is a state with the right structure, shapes and dtypes (e.g. freshly
    initialised); the restored arrays replace its leaves exactly (bit for bit).
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
    verify_checksums(os.path.join(self.directory, str(step)))
    self.check_compatible(step, target)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    except Exception as error:
      raise CorruptCheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} could not be read "
          f"({type(error).__name__}: {error}); delete it to fall back to an earlier checkpoint, "
          f"or start a fresh workdir") from error
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                         jax.tree_util.tree_leaves(restored["state"]))
    return state, dict(restored["extra"] or {})

  def restore_raw(self, step: int) -> tuple[Any, dict]:
    """(state, extra) of ``step`` as saved, as nested dicts of arrays, with no target tree."""
    step_dir = os.path.join(self.directory, str(step))
    verify_checksums(step_dir)
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), extra=ocp.args.JsonRestore()))
    except Exception as error:
      raise CorruptCheckpointError(
          f"checkpoint {step_dir} could not be read ({type(error).__name__}: {error}); delete it to fall "
          f"back to an earlier checkpoint") from error
    return restored["state"], dict(restored["extra"] or {})

  def check_tree(self, step: int, tree, target) -> None:
    """Raise CheckpointMismatchError if ``tree`` (restored from ``step``) differs from ``target``."""
    differences = tree_differences(describe_tree(tree), describe_tree(target))
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint {os.path.join(self.directory, str(step))} does not match the model:\n"
          + "\n".join(differences))

  def close(self) -> None:
    self._manager.close()
