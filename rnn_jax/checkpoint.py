"""Checkpoints with orbax-checkpoint: keep the last N plus the best, resume exactly, fail clearly.

A checkpoint at step s is the directory ``<dir>/<s>/`` with two orbax items and a manifest:

* ``state``: any pytree of arrays (a TrainState, or {"train": TrainState, "carry": ...} for
  truncated BPTT), saved with orbax's StandardSave;
* ``extra``: a JSON dict (data position, epoch, step, config) for everything that is not an array;
* ``rnn_jax_checksums.json``: the sha256 and size of every other file of the step, written last.

A save is complete only once its manifest is written. Its order:

1. the state is checked: a NaN or an infinity in any floating leaf (params, optimiser
   moments) refuses the save (``NonFiniteStateError``, naming the first such leaf), so a
   diverged state never replaces a good checkpoint;
2. orbax writes both items into ``<s>.orbax-checkpoint-tmp-*`` and renames it to ``<s>``;
3. the manifest is written to a temporary name, synced and renamed into ``<s>``;
4. only then are old steps removed (the last ``keep`` plus the best are kept), each renamed
   to ``<s>.removing`` first, so that no step is ever seen half deleted.

A process killed at any point therefore leaves the previous checkpoints as they were, plus
either an orbax tmp directory or a step directory without its manifest (the ``extra`` item
records that this version writes manifests). Neither is listed: ``latest_step`` skips them
with a logged warning and a resume starts from the newest complete step. A later save of the
same step replaces the unfinished directory, as orbax replaces its own tmp directory. Steps
written before manifests existed (no manifest, no such record) are still accepted, unverified.

A save that fails (a full disk, a read-only or forbidden directory) removes what it wrote
itself and raises ``CheckpointSaveError``, one line naming the directory, the cause and what
to do; the earlier checkpoints are untouched.

Reading. Every listed step is checked cheaply (its manifest parses, every file has the size
it was saved with, orbax's small JSON files parse), and a restore also compares every
file's sha256 with the manifest. A step that fails raises ``CorruptCheckpointError``, one
line naming the step directory, what is wrong (an emptied manifest, a truncated or changed
file, an unreadable orbax file) and the newest earlier step that verifies. A step found
corrupt is never deleted. With ``resume_step(fallback=True)`` (the run option ``checkpoint_fallback``)
a corrupt latest step is moved aside (``<s>.corrupt-<time>``) and the run resumes from the
newest step that verifies, with a logged warning naming both steps.

A failed read of a step saved before manifests existed (nothing checks its bytes beforehand)
leaves TensorStore reads in flight after orbax has closed its event loop; their "Event loop is
closed" callbacks, which would print a dozen tracebacks after the one-line error, are dropped
(``_drop_stray_read_callbacks``), and nothing else is.

Restoring into a target checks the saved tree against the target (same leaves, same shapes and
dtypes) and raises ``CheckpointMismatchError`` naming every difference, so a checkpoint of
another architecture cannot be loaded silently.

In a multi-process run only process 0 writes and moves files (the manifest, set-aside
steps); every process calls ``save`` and ``restore``.
"""

from __future__ import annotations

import errno as errno_lib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from rnn_jax import mesh as mesh_lib


class CheckpointError(RuntimeError):
  """Base class of checkpoint errors."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint directory exists but cannot be read, or its bytes changed since it was saved."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's tree (names, shapes, dtypes) differs from the target's."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (``errno``: the OS error number, ``path``: where)."""

  def __init__(self, message: str, errno: Optional[int] = None, path: Optional[str] = None):
    super().__init__(message)
    self.errno, self.path = errno, path


class NonFiniteStateError(CheckpointError, FloatingPointError):
  """The state to save holds a NaN or an infinity; it was not saved."""


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
  between evaluations that it has no metric to rank); keep its other warnings and errors, but
  not the traceback it logs for a write that failed with an OS error (``save`` raises that error
  as one line, CheckpointSaveError)."""

  def filter(self, record) -> bool:
    if "orbax" not in record.pathname:
      return True
    failed_write = record.exc_info and isinstance(record.exc_info[1], OSError)
    if failed_write and "raised an exception" in str(record.msg):
      return False
    return record.levelno >= 30 and "did not provide metrics" not in str(record.msg)


def quiet_orbax_logs() -> None:
  """Hide orbax's INFO chatter from the absl log (idempotent); on the "absl" logger itself, so
  that it holds whichever handler prints (absl's under ``app.run``, Python's otherwise)."""
  import logging as python_logging
  logger = python_logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxInfo) for f in logger.filters):
    logger.addFilter(_DropOrbaxInfo())


# ---------------------------------------------------------------------------
# The manifest: sha256 and size of every file of a step, written last
# ---------------------------------------------------------------------------

CHECKSUMS = "rnn_jax_checksums.json"
WRITER_KEY = "_rnn_jax_checkpoint"  # in every step's ``extra``: this step gets a manifest when complete
_ORBAX_JSON = ("_CHECKPOINT_METADATA", os.path.join("metrics", "metrics"), os.path.join("extra", "metadata"))


def _file_digests(step_dir: str) -> dict[str, dict]:
  """{relative path: {"sha256", "size"}} of every file of a step but the manifest (and its tmp)."""
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
      digests[relative] = {"sha256": digest.hexdigest(), "size": os.path.getsize(path)}
  return digests


def _fsync_directory(path: str) -> None:
  try:
    descriptor = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(descriptor)
  except OSError:
    pass
  finally:
    os.close(descriptor)


def _write_checksums(step_dir: str) -> None:
  """Write the manifest through a synced temporary file and a rename: it exists whole or not at all."""
  path = os.path.join(step_dir, CHECKSUMS)
  payload = {"format": 2, "files": _file_digests(step_dir)}
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as handle:
      json.dump(payload, handle, indent=1, sort_keys=True)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise
  _fsync_directory(step_dir)


def _read_manifest(path: str) -> dict[str, tuple[str, Optional[int]]]:
  """{relative path: (sha256, size or None)}; raises ValueError naming what is wrong."""
  with open(path, "rb") as handle:
    raw = handle.read()
  if not raw.strip():
    raise ValueError(f"its checksum manifest {CHECKSUMS} is empty")
  try:
    saved = json.loads(raw)
  except ValueError:
    raise ValueError(f"its checksum manifest {CHECKSUMS} is not valid JSON ({len(raw)} bytes)") from None
  if isinstance(saved, dict) and saved.get("format") == 2 and isinstance(saved.get("files"), dict):
    return {name: (entry["sha256"], entry["size"]) for name, entry in saved["files"].items()}
  if isinstance(saved, dict) and all(isinstance(v, str) for v in saved.values()):
    return {name: (digest, None) for name, digest in saved.items()}  # format 1: sha256 only
  raise ValueError(f"its checksum manifest {CHECKSUMS} has an unknown layout")


def _inspect(step_dir: str) -> tuple[str, str]:
  """(status, what is wrong) of a finalised step directory, without reading the arrays.

  status: "complete" (a manifest whose files all exist with their saved sizes), "legacy"
  (saved before manifests existed), "unfinished" (its save stopped before the manifest was
  written) or "corrupt".
  """
  manifest = os.path.join(step_dir, CHECKSUMS)
  if os.path.exists(manifest):
    try:
      files = _read_manifest(manifest)
    except (OSError, ValueError, KeyError, TypeError) as error:
      return "corrupt", str(error)
    problems = []
    for name, (_, size) in sorted(files.items()):
      path = os.path.join(step_dir, name)
      if not os.path.exists(path):
        problems.append(f"{name} is missing")
      elif size is not None and os.path.getsize(path) != size:
        now = os.path.getsize(path)
        problems.append(f"{name} has {now} of its {size} bytes ({'emptied' if now == 0 else 'truncated'})"
                        if now < size else f"{name} has {now} bytes, {size} were saved")
    if problems:
      more = f" and {len(problems) - 1} more file(s)" if len(problems) > 1 else ""
      return "corrupt", problems[0] + more
    status = "complete"
  else:
    try:
      with open(os.path.join(step_dir, "extra", "metadata")) as handle:
        extra = json.load(handle)
    except (OSError, ValueError):
      return "corrupt", "it has no checksum manifest and its extra/metadata is unreadable"
    if isinstance(extra, dict) and WRITER_KEY in extra:
      return "unfinished", "its save stopped before the checksum manifest was written"
    status = "legacy"
  for name in _ORBAX_JSON:  # what orbax parses when it lists steps
    path = os.path.join(step_dir, name)
    if os.path.exists(path):
      try:
        with open(path) as handle:
          json.load(handle)
      except (OSError, ValueError):
        size = os.path.getsize(path)
        return "corrupt", f"{name} is not valid JSON" + (" (emptied)" if size == 0 else f" ({size} bytes)")
  return status, ""


def _stamp(step_dir: str) -> tuple:
  """(name, size, mtime) of every file of a step: what changes if a file is written to."""
  stamp = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      info = os.stat(os.path.join(root, name))
      stamp.append((os.path.relpath(os.path.join(root, name), step_dir), info.st_size, info.st_mtime_ns))
  return tuple(sorted(stamp))


def verify_checksums(step_dir: str) -> None:
  """Raise CorruptCheckpointError if a file of the step changed, vanished or was cut since it was
  saved (its sha256 or size differs from the manifest's). Steps saved before manifests existed
  are not checked."""
  status, problem = _inspect(step_dir)
  if status == "corrupt":
    raise CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: {problem}")
  if status == "unfinished":
    raise CorruptCheckpointError(f"checkpoint {step_dir} is incomplete: {problem}")
  if status == "legacy":
    return
  saved = _read_manifest(os.path.join(step_dir, CHECKSUMS))
  now = _file_digests(step_dir)
  changed = sorted(name for name in saved if name not in now or now[name]["sha256"] != saved[name][0])
  if changed:
    raise CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: {len(changed)} file(s) differ from what "
                                 f"was saved ({', '.join(changed[:3])})")


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------

def _summarise(error: BaseException, root: str, limit: int = 240) -> str:
  """One line of an orbax / TensorStore error: its first line, without the tensorstore_spec dump;
  a cut file is named relative to ``root`` (the step directory)."""
  text = str(error) or type(error).__name__
  text = re.split(r"\s*\[(?:tensorstore_spec|source locations)=", text)[0]
  text = " ".join(part.strip() for part in text.splitlines() if part.strip())
  match = re.search(r"Requested byte range \[\d+, (\d+)\) is not valid for value of size (\d+)", text)
  files = re.findall(r'local file "([^"]+)"', text)
  if match:
    name = os.path.relpath(files[-1], root) if files else "a data file"
    return f"{name} has {match.group(2)} of its {match.group(1)} bytes (truncated)"
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(error).__name__}: {text}"


def _os_error(error: BaseException) -> tuple[Optional[int], Optional[str]]:
  """(errno, path) of the OS error behind ``error`` (its cause chain, or the text of a
  TensorStore error), or (None, None)."""
  seen = set()
  current: Optional[BaseException] = error
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno:
      return current.errno, current.filename
    text = str(current)
    for number in (errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EROFS, errno_lib.EACCES, errno_lib.EPERM):
      if os.strerror(number) in text:
        files = re.findall(r'(?:local )?file "([^"]+)"', text)
        return number, (files[-1] if files else None)
    current = current.__cause__ or current.__context__
  return None, None


_SAVE_ADVICE = {
    errno_lib.ENOSPC: "the disk is full at {path} (no space left on device); free space there or choose "
                      "another workdir",
    errno_lib.EDQUOT: "the disk quota is exceeded at {path}; free space there or choose another workdir",
    errno_lib.EROFS: "the file system at {path} is read-only; choose a writable workdir",
    errno_lib.EACCES: "permission denied at {path}; make it writable or choose another workdir",
    errno_lib.EPERM: "operation not permitted at {path}; make it writable or choose another workdir",
}


# ---------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------

def _host_blocks(leaf):
  """The values of ``leaf`` this process holds, as NumPy arrays."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return [np.asarray(shard.data) for shard in leaf.addressable_shards]
  return [np.asarray(leaf)]


def non_finite_leaves(tree) -> list[tuple[str, int, int, int]]:
  """[(leaf name, NaN count, inf count, size)] of every floating leaf holding a NaN or an infinity."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      if not isinstance(leaf, float):
        continue
      dtype = np.float64
    if not jax.dtypes.issubdtype(dtype, np.inexact):
      continue
    blocks = _host_blocks(leaf)
    if all(np.isfinite(b).all() for b in blocks):
      continue
    nan = sum(int(np.isnan(b).sum()) for b in blocks)
    inf = sum(int(np.isinf(b).sum()) for b in blocks)
    bad.append((_path_name(path), nan, inf, int(np.size(leaf))))
  return bad


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------

class _CompleteSteps:
  """An orbax step NameFormat that lists only the steps ``accept(path)`` allows, so that orbax
  never parses an unfinished or corrupt step (its listing fails on one unreadable JSON file)."""

  def __init__(self, inner, accept):
    self._inner, self._accept = inner, accept

  def build_name(self, step: int) -> str:
    return self._inner.build_name(step)

  def find_all(self, base_path):
    return [metadata for metadata in self._inner.find_all(base_path) if self._accept(str(metadata.path))]

  def find_step(self, base_path, step: int):
    metadata = self._inner.find_step(base_path, step)
    if not self._accept(str(metadata.path)):
      raise ValueError(f"step {step} in {base_path} is not a complete checkpoint")
    return metadata

  def __getattr__(self, name):
    return getattr(self._inner, name)


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
    self.keep = keep
    self.best_metric = best_metric
    self._warned: set = set()
    self._verified: dict[int, tuple] = {}
    best_fn = (lambda metrics: metrics[best_metric]) if best_metric else None
    # Old steps are removed here, after the new step's manifest (orbax would remove them as soon
    # as its own part of the save is done), so orbax keeps everything.
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=False, create=True,
        step_name_format=_CompleteSteps(ocp.step.standard_name_format(), self._orbax_may_list))
    # Handlers are registered up front so a fresh process can read metadata before any save.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})

  # ---- listing -------------------------------------------------------------
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _orbax_may_list(self, path: str) -> bool:
    return _inspect(path)[0] in ("complete", "legacy")

  def _scan(self) -> dict[int, tuple[str, str]]:
    """{step: (status, problem)} of every finalised step directory (see ``_inspect``)."""
    if not os.path.isdir(self.directory):
      return {}
    found = {}
    for name in os.listdir(self.directory):
      if re.fullmatch(r"0|[1-9]\d*", name) and os.path.isdir(os.path.join(self.directory, name)):
        found[int(name)] = _inspect(os.path.join(self.directory, name))
    return found

  def _warn_once(self, step: int, status: str, problem: str, consequence: str) -> None:
    if (step, status) not in self._warned:
      self._warned.add((step, status))
      logging.warning("checkpoint %s is %s (%s); %s", self._step_dir(step), status, problem, consequence)

  def all_steps(self) -> list[int]:
    """Steps whose save completed: steps of unfinished saves (an orbax tmp directory, a step
    without its manifest) are not listed. A step damaged since it was saved is listed, so that
    restoring it fails clearly instead of silently resuming from an earlier one."""
    steps = []
    for step, (status, problem) in sorted(self._scan().items()):
      if status == "unfinished":
        self._warn_once(step, status, problem, "it is not listed: the newest complete step is the latest")
      else:
        steps.append(step)
    return steps

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    """The kept step with the best ``best_metric`` (the latest step if no metric is tracked),
    among the steps whose files are readable."""
    for step, (status, problem) in self._scan().items():
      if status == "corrupt":
        self._warn_once(step, status, problem, "it is not ranked for the best checkpoint")
    self._manager.reload()
    return self._manager.best_step()

  # ---- verification --------------------------------------------------------
  def _problem(self, step: int) -> Optional[str]:
    """What is wrong with ``step`` (None if it verifies: its sizes and sha256 match the manifest)."""
    step_dir = self._step_dir(step)
    stamp = _stamp(step_dir)
    if stamp and self._verified.get(step) == stamp:  # verified, and no file changed since
      return None
    status, problem = _inspect(step_dir) if os.path.isdir(step_dir) else ("corrupt", "it does not exist")
    if status in ("corrupt", "unfinished"):
      return problem
    try:
      verify_checksums(step_dir)
    except CorruptCheckpointError as error:
      return str(error).split(" is corrupt: ", 1)[-1]
    except OSError as error:
      return f"a file is unreadable ({error.strerror}: {error.filename})"
    self._verified[step] = stamp
    return None

  def _newest_good(self, before: int) -> Optional[int]:
    for step in reversed(self.all_steps()):
      if step < before and self._problem(step) is None:
        return step
    return None

  def _corrupt(self, step: int, problem: str) -> CorruptCheckpointError:
    """The one-line error for a corrupt ``step``, offering the newest earlier step that verifies."""
    step_dir = self._step_dir(step)
    good = self._newest_good(before=step)
    if good is None:
      advice = "no earlier step verifies: start again in a fresh workdir"
    else:
      advice = (f"step {good} is the newest earlier step that verifies: resume with checkpoint_fallback=True "
                f"to continue from it, or delete {step_dir}")
    return CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: {problem}; {advice}")

  def _unreadable(self, step: int, error: BaseException) -> CorruptCheckpointError:
    return self._corrupt(step, f"it could not be read ({_summarise(error, self._step_dir(step))})")

  def _set_aside(self, step: int, why: str) -> str:
    """Rename ``<step>/`` to ``<step>.<why>-<time>`` (never deleted: it may be inspected)."""
    source = self._step_dir(step)
    target = f"{source}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while os.path.exists(target):
      target = f"{source}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
      suffix += 1
    if mesh_lib.is_primary():
      os.replace(source, target)
    mesh_lib.barrier(f"rnn_jax checkpoint set aside {step}")
    self._verified.pop(step, None)
    self._manager.reload()
    return target

  def resume_step(self, fallback: bool = False) -> Optional[int]:
    """The step a resumed run continues from: the latest one, after checking that it verifies.

    A corrupt latest step raises CorruptCheckpointError naming it and the newest earlier step
    that verifies; with ``fallback`` it is moved aside (with every newer bad step) and that
    earlier step is returned, with a logged warning naming both. None if there is no step.
    """
    steps = self.all_steps()
    if not steps:
      return None
    latest = steps[-1]
    problem = self._problem(latest)
    if problem is None:
      return latest
    if not fallback:
      raise self._corrupt(latest, problem)
    good = self._newest_good(before=latest)
    if good is None:
      raise self._corrupt(latest, problem)
    moved = [self._set_aside(step, "corrupt") for step in steps if step > good]
    logging.warning("checkpoint step %d is corrupt (%s); falling back to step %d, the newest step that "
                    "verifies (checkpoint_fallback); the bad step is kept as %s", latest, problem, good,
                    ", ".join(moved))
    return good

  # ---- save ------------------------------------------------------------------
  def save(self, step: int, state, extra: Optional[dict] = None, metrics: Optional[dict] = None) -> None:
    """Save ``state`` (pytree of arrays) and ``extra`` (JSON-able dict) as step ``step``.

    ``metrics`` (e.g. {"valid_loss": 1.3}) rank the checkpoint for best-keeping. Saving a step
    that already exists is skipped (the existing checkpoint is kept). A state holding a NaN or
    an infinity raises NonFiniteStateError; a failed write raises CheckpointSaveError; in both
    cases the earlier checkpoints are untouched and no partial step is left listed.
    """
    step = int(step)
    extra = json.loads(json.dumps(extra or {}))  # fail early if not JSON-able
    found = self._scan()
    if found.get(step, ("",))[0] in ("complete", "legacy"):
      return
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      raise ValueError(f"CheckpointManager.save: metrics lack the best metric {self.best_metric!r}: "
                       f"{sorted(metrics)}")
    latest = max((s for s, (status, _) in found.items() if status in ("complete", "legacy")), default=None)
    kept = (f"the earlier checkpoints are kept (latest: step {latest})" if latest is not None
            else "no earlier checkpoint exists")
    bad = non_finite_leaves(state)
    if bad:
      name, nan, inf, size = bad[0]
      values = " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "inf")) if count)
      more = f"; {len(bad)} leaves in all are non-finite" if len(bad) > 1 else ""
      raise NonFiniteStateError(
          f"checkpoint step {step} not saved: the state holds non-finite values ({name}: {values} of {size} "
          f"values{more}); {kept}; lower the learning rate or enable clipping, then resume")
    if step in found:  # an unfinished or corrupt directory of this step is in the way
      status, problem = found[step]
      if status == "unfinished":  # as orbax does with its own unfinished tmp directory of a step
        if mesh_lib.is_primary():
          shutil.rmtree(self._step_dir(step))
        mesh_lib.barrier(f"rnn_jax checkpoint replace {step}")
        self._manager.reload()
        logging.info("checkpoint %s was unfinished (%s); replaced by this save", self._step_dir(step),
                     problem)
      else:
        moved = self._set_aside(step, status)
        logging.warning("checkpoint %s was %s (%s); moved aside to %s before saving step %d again",
                        self._step_dir(step), status, problem, moved, step)
    before = set(os.listdir(self.directory)) if os.path.isdir(self.directory) else set()
    threads = set(threading.enumerate())
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          extra=ocp.args.JsonSave({**extra, WRITER_KEY: {"manifest": CHECKSUMS}})),
          metrics=metrics, force=True)
      self._manager.wait_until_finished()
      step_dir = self._step_dir(step)
      if not os.path.isdir(step_dir):
        raise CheckpointSaveError(f"checkpoint step {step}: orbax finished without writing {step_dir}")
      if mesh_lib.is_primary():  # one writer; the others wait for it
        _write_checksums(step_dir)
      mesh_lib.barrier(f"rnn_jax checkpoint {step}")
    except Exception as error:
      self._discard(step, before, threads)
      number, path = _os_error(error)
      if number is None:
        raise
      advice = _SAVE_ADVICE.get(number, f"the write failed at {{path}} ({os.strerror(number)}); check the "
                                        f"disk or choose another workdir")
      raise CheckpointSaveError(f"checkpoint step {step} not saved: {advice.format(path=self.directory)}; "
                                f"{kept}", errno=number, path=path or self.directory) from error
    self._remove_old_steps()

  def _discard(self, step: int, before: set, threads: set) -> None:
    """Remove what a failed save of ``step`` wrote (its tmp or step directory), nothing else,
    once the writer threads orbax started for it have stopped (at most 30 s)."""
    deadline = time.time() + 30
    for thread in set(threading.enumerate()) - threads:
      if thread is not threading.current_thread() and thread.is_alive():  # (a thread not yet started: skip)
        thread.join(timeout=max(0.0, deadline - time.time()))
    if mesh_lib.is_primary() and os.path.isdir(self.directory):
      for name in set(os.listdir(self.directory)) - before:
        if name == str(step) or name.startswith(f"{step}.orbax-checkpoint-tmp"):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    try:
      self._manager.reload()
    except Exception:  # the listing is rebuilt on the next call anyway
      pass

  def _remove_old_steps(self) -> None:
    """Keep the last ``keep`` complete steps plus the best; unfinished and corrupt steps are
    never removed here. A step is first renamed to ``<s>.removing`` (it vanishes at once, so a
    kill during the removal leaves no half-deleted step), then deleted; what a killed removal
    left is deleted on the next one. A step that cannot be removed is kept, with a warning."""
    self._manager.reload()
    steps = sorted(self._manager.all_steps())
    keep = set(steps[-self.keep:])
    if self.best_metric:
      best = self._manager.best_step()
      if best is not None:
        keep.add(best)
    doomed = [step for step in steps if step not in keep]
    if mesh_lib.is_primary():
      for step in doomed:
        self._verified.pop(step, None)
        try:
          os.replace(self._step_dir(step), f"{self._step_dir(step)}.removing")
        except OSError as error:  # the new step is complete: training goes on
          logging.warning("could not remove the old checkpoint %s (%s); it is kept", self._step_dir(step),
                          error.strerror)
      for name in os.listdir(self.directory):
        if re.fullmatch(r"\d+\.removing", name):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    if doomed:
      mesh_lib.barrier("rnn_jax checkpoint removal")
      self._manager.reload()

  # ---- restore ---------------------------------------------------------------
  def check_compatible(self, step: int, target) -> None:
    """Raise CheckpointMismatchError if step's saved tree differs from ``target``'s."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
    except Exception as error:  # orbax raises several types for unreadable metadata
      raise self._unreadable(step, error) from error
    if metadata is None:
      raise self._corrupt(step, "it has no readable 'state' item")
    tree = getattr(metadata, "tree", metadata)
    differences = tree_differences(_metadata_signature(tree), describe_tree(target))
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint {self._step_dir(step)} does not match the model being restored (different "
          f"architecture or settings?):\n" + "\n".join(differences) +
          "\nUse the settings the checkpoint was trained with, or a fresh workdir.")

  def _checked_step(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
    problem = self._problem(step)
    if problem is not None:
      raise self._corrupt(step, problem)
    self._manager.reload()
    return step

  def restore(self, target, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restore (state, extra) from ``step`` (default: the latest complete checkpoint).

    ``target`` is a state with the right structure, shapes and dtypes (e.g. freshly
    initialised); the restored arrays replace its leaves exactly (bit for bit).
    """
    step = self._checked_step(step)
    self.check_compatible(step, target)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    _drop_stray_read_callbacks()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    except Exception as error:
      raise self._unreadable(step, error) from error
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                         jax.tree_util.tree_leaves(restored["state"]))
    return state, _user_extra(restored["extra"])

  def restore_raw(self, step: int) -> tuple[Any, dict]:
    """(state, extra) of ``step`` as saved, as nested dicts of arrays, with no target tree."""
    step = self._checked_step(step)
    _drop_stray_read_callbacks()
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), extra=ocp.args.JsonRestore()))
    except Exception as error:
      raise self._unreadable(step, error) from error
    return restored["state"], _user_extra(restored["extra"])

  def check_tree(self, step: int, tree, target) -> None:
    """Raise CheckpointMismatchError if ``tree`` (restored from ``step``) differs from ``target``."""
    differences = tree_differences(describe_tree(tree), describe_tree(target))
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint {self._step_dir(step)} does not match the model:\n" + "\n".join(differences))

  def close(self) -> None:
    self._manager.close()


def _is_closed_loop_callback(unraisable) -> bool:
  """True for asyncio's RuntimeError('Event loop is closed') raised by ``call_soon_threadsafe``:
  what a TensorStore read still in flight reports when it finishes after the event loop of a
  failed orbax restore has closed."""
  error, trace = unraisable.exc_value, unraisable.exc_traceback
  if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
    return False
  while trace is not None and trace.tb_next is not None:
    trace = trace.tb_next
  return trace is not None and trace.tb_frame.f_code.co_name == "_check_closed"


_stray_callbacks_dropped = False
_stray_callbacks_lock = threading.Lock()


def _drop_stray_read_callbacks() -> None:
  """From the first restore on, drop the "Event loop is closed" callbacks of TensorStore reads
  that outlive a failed orbax restore (``_is_closed_loop_callback``); every other unraisable
  exception still goes to the hook that was in place. Idempotent.

  When one read of a step fails (a truncated file of a step saved before manifests existed, which
  nothing can check beforehand), orbax closes its event loop while TensorStore still reads the
  other arrays. Each of those reads then reports an unraisable RuntimeError on stderr, up to a
  dozen tracebacks after the one-line error, saying nothing about the checkpoint; they may come
  at any moment after the restore has returned, so the filter stays for the process.
  """
  global _stray_callbacks_dropped
  with _stray_callbacks_lock:
    if _stray_callbacks_dropped:
      return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
      if not _is_closed_loop_callback(unraisable):
        previous(unraisable)

    sys.unraisablehook = hook
    _stray_callbacks_dropped = True


def _user_extra(extra) -> dict:
  return {k: v for k, v in dict(extra or {}).items() if k != WRITER_KEY}
