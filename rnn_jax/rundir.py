"""The run directory: one self-contained folder per training run.

  <workdir>/config.json     the experiment, its resolved config, preset, smoke, resumes
  <workdir>/metrics.jsonl   one JSON record per log line: {"step", "split", "time_s", metrics...}
  <workdir>/results.json    final metrics + the same config + wall time + devices
  <workdir>/model.json      the model's hyper-parameters (``describe``), for ``load_run``
  <workdir>/vocab.json      the vocabulary, if the model reads tokens
  <workdir>/checkpoints/    orbax checkpoints (``rnn_jax.checkpoint``)
  <workdir>/*.png           plots (``rnn_jax.plots``)

Opening a directory that already holds a run raises ``RunExistsError`` unless ``resume`` (continue
it, keeping its architecture and data) or ``overwrite`` (delete it and start again) is given.
Every file is written to a temporary name and renamed, so a crash never leaves a torn
config.json or results.json; a torn last line of metrics.jsonl is skipped when read.

``load_run(workdir)`` rebuilds the trained model, its best params and its vocabulary from
these files alone, so inference needs neither the training data nor the experiment's code.

In a multi-process run (``rnn_jax.mesh.initialize_distributed``) every process opens the
RunDir, but only process 0 checks, locks and writes the directory; the others wait for it,
then read its config.json, so all processes agree on whether the run resumes and on its
schedule. The workdir must be on a filesystem every process sees, as orbax requires.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import importlib
import json
import math
import os
import platform
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from rnn_jax import config as config_lib
from rnn_jax import mesh as mesh_lib


class RunExistsError(ValueError):
  """The workdir holds a run and neither resume nor overwrite was asked for."""


def device_info() -> dict:
  """The JAX backend and devices this process runs on, for results.json."""
  devices = jax.devices()
  return {
      "backend": jax.default_backend(),
      "devices": [str(d.device_kind) for d in devices],
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "host": platform.node(),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
  }


def to_python(value):
  """JSON-able python scalars/lists from numpy/jax values (NaN and inf become strings)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return to_python(config_lib.to_dict(value))
  if isinstance(value, dict):
    return {str(k): to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    array = np.asarray(value)
    value = array.item() if array.ndim == 0 else array.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def write_json(path: str, payload) -> str:
  """Write ``payload`` as indented JSON through a temporary file and a rename; returns ``path``."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as handle:
    json.dump(to_python(payload), handle, indent=2, sort_keys=True)
    handle.write("\n")
  os.replace(tmp, path)
  return path


def read_json(path: str) -> dict:
  with open(path) as handle:
    return json.load(handle)


def read_metrics(workdir: str) -> list[dict]:
  """The records of <workdir>/metrics.jsonl (a torn last line from a killed run is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as handle:
    for line in handle:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def holds_run(workdir: str) -> bool:
  """True if ``workdir`` holds a run's config, metrics, results or checkpoints."""
  if not os.path.isdir(workdir):
    return False
  names = set(os.listdir(workdir))
  return bool(names & {"config.json", "metrics.jsonl", "results.json", "checkpoints"})


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The step of the newest complete checkpoint under <workdir>/checkpoints, without orbax."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  return max(steps) if steps else None


def _format(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


LOCK_NAME = ".lock"
_held_locks: set = set()


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _take_lock(workdir: str) -> None:
  """Mark ``workdir`` as used by this process (<workdir>/.lock holds the pid and host).

  Another live process on this host holding it raises RunExistsError; a lock left by a process
  of this host that died (a kill -9) is taken over; a lock from another host (a shared
  filesystem) is refused, naming the host, since its holder's liveness cannot be checked from
  here; this process may reopen its own workdir.
  """
  path = os.path.join(workdir, LOCK_NAME)
  mine = {"pid": os.getpid(), "host": platform.node()}
  try:  # the common case, a free workdir: create the lock atomically
    with open(path, "x") as handle:
      json.dump(mine, handle)
  except FileExistsError:
    try:
      holder = read_json(path)
    except (OSError, ValueError):
      holder = None
    if holder and holder != mine and holder.get("host") == mine["host"] and _process_alive(int(holder["pid"])):
      raise RunExistsError(f"{workdir} is in use by another process (pid {holder['pid']}); wait for it to "
                           f"end or stop it (two runs in one workdir would overwrite each other)") from None
    if holder and holder.get("host") not in (None, mine["host"]):  # its liveness cannot be checked from here
      raise RunExistsError(f"{workdir} is locked by pid {holder.get('pid')} on host {holder['host']}; if that "
                           f"process has ended, delete {path} and run again") from None
    if holder != mine:  # left by a process that is gone
      write_json(path, mine)
  _held_locks.add(os.path.abspath(workdir))


def _release_lock(workdir: str) -> None:
  path = os.path.join(workdir, LOCK_NAME)
  try:
    if read_json(path).get("pid") == os.getpid():
      os.remove(path)
  except (OSError, ValueError):
    pass
  _held_locks.discard(os.path.abspath(workdir))


@atexit.register
def _release_all_locks() -> None:
  for workdir in list(_held_locks):
    _release_lock(workdir)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How to open a run directory and how to show the run, apart from its config.

  resume: continue the run in the workdir (its architecture and data are kept);
  overwrite: delete the run in the workdir and start again; progress: show a progress bar;
  tensorboard: also write TensorBoard event files; preset, smoke: recorded in config.json;
  checkpoint_fallback: on resume, if the latest checkpoint is corrupt, continue from the newest
  step that verifies (the bad one is moved aside, not deleted) instead of refusing.
  """
  resume: bool = False
  overwrite: bool = False
  progress: bool = True
  tensorboard: bool = False
  preset: Optional[str] = None
  smoke: bool = False
  checkpoint_fallback: bool = False


class RunDir:
  """An experiment's run directory (see the module docstring).

    run = RunDir(workdir, "char_lm", config, RunOptions(resume=True), label="char_lm lstm")
    run.log(step, "train", loss=1.2, bpc=1.7)       # metrics.jsonl + one console line
    run.finish({"test_bpc": 1.57})                  # results.json

  ``label`` names the run in every console line. ``tensorboard=True`` also writes TensorBoard
  event files under <workdir>/tensorboard (needs ``tensorboardX``).
  """

  def __init__(self, workdir: str, experiment: str, config=None, options: RunOptions = RunOptions(), *,
               label: Optional[str] = None):
    resume, overwrite = options.resume, options.overwrite
    self.options = options
    if not workdir:
      raise ValueError("workdir must be a non-empty path")
    if resume and overwrite:
      raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    self.workdir = os.path.abspath(workdir)
    self.experiment = experiment
    self.label = label or experiment
    self.config = config
    self.start_time = time.time()
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    self.resuming = False
    self.meta = {"experiment": experiment, "config": to_python(config) if config is not None else {},
                 "preset": options.preset, "smoke": options.smoke, "schedule_horizons": [], "resumes": []}
    self.primary = mesh_lib.is_primary()
    self._tensorboard = None
    if self.primary:
      try:
        self._open(config, resume, overwrite)
      except BaseException:
        mesh_lib.broadcast_from_primary(0)
        raise
      mesh_lib.broadcast_from_primary(2 if self.resuming else 1)
    else:  # process 0 opens the directory; the others follow what it wrote
      opened = mesh_lib.broadcast_from_primary(0)
      if not opened:
        raise mesh_lib.ProcessGroupError(f"process 0 could not open the run in {self.workdir}; its log "
                                         f"says why")
      self.resuming = opened == 2
      self.meta = read_json(self.path("config.json"))

  def _open(self, config, resume: bool, overwrite: bool) -> None:
    """Process 0's part of opening: create, lock, refuse or resume, write config.json."""
    experiment, options = self.experiment, self.options
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise NotADirectoryError(f"the workdir {self.workdir} is a file, not a directory; choose another workdir")
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as error:
      kinds = {errno.EACCES: PermissionError, errno.EPERM: PermissionError, errno.EROFS: PermissionError,
               errno.ENOTDIR: NotADirectoryError, errno.EEXIST: NotADirectoryError}
      raise kinds.get(error.errno, OSError)(f"cannot create the workdir {self.workdir}: {error.strerror}; "
                                            f"choose another workdir") from None
    if not os.access(self.workdir, os.W_OK):
      raise PermissionError(f"the workdir {self.workdir} is not writable; choose another workdir")
    _take_lock(self.workdir)  # another live process in this workdir is refused before anything changes
    existing = holds_run(self.workdir)
    if existing and overwrite:
      self._remove_old_run()
      existing = False
    if existing and not resume:
      _release_lock(self.workdir)
      step = latest_checkpoint_step(self.workdir)
      at = f", latest checkpoint at step {step}" if step is not None else ""
      raise RunExistsError(f"{self.workdir} already holds a run{at}; continue it with resume=True or "
                           f"replace it with overwrite=True (nothing was changed)")
    config_path = self.path("config.json")
    if existing and os.path.exists(config_path):
      saved = read_json(config_path)
      if saved.get("experiment") not in (None, experiment):
        raise RunExistsError(f"{self.workdir} holds a run of {saved['experiment']!r}, not {experiment!r}; "
                             f"choose another workdir")
      if config is not None:
        config_lib.resumed(type(config), saved.get("config", {}), {
            k: v for k, v in config_lib.to_dict(config).items()
            if to_python(v) != saved.get("config", {}).get(k)})
      self.meta = {**self.meta, **{k: v for k, v in saved.items() if k not in ("experiment", "config")}}
    self.resuming = bool(existing and resume)
    if resume and not existing:
      logging.info("%s: nothing to resume in %s; starting a new run", self.label, self.workdir)
    if options.tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise ImportError("tensorboard=True needs tensorboardX: pip install tensorboardX") from None
      self._tensorboard = SummaryWriter(self.path("tensorboard"))
    self.write_meta()

  # ---- files -------------------------------------------------------------------
  def _remove_old_run(self) -> None:
    """Delete an earlier run's files (only a directory that holds a run is ever emptied)."""
    if not os.path.exists(self.path("config.json")) and latest_checkpoint_step(self.workdir) is None:
      raise RunExistsError(f"{self.workdir} has files but no config.json of a run; refusing to delete "
                           f"them to overwrite it: choose another workdir")
    for name in os.listdir(self.workdir):
      if name == LOCK_NAME:
        continue
      target = self.path(name)
      if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
      else:
        os.remove(target)
    logging.info("%s: overwrite removed the earlier run in %s", self.label, self.workdir)

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def write_meta(self) -> str:
    """config.json: the experiment, its resolved config, preset, smoke, schedule horizons, resumes."""
    return self.write_json("config.json", self.meta)

  def write_text(self, name: str, text: str) -> str:
    """<workdir>/<name> written through a temporary file and a rename (process 0 only)."""
    path = self.path(name)
    if not self.primary:
      return path
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
      handle.write(text)
    os.replace(tmp, path)
    return path

  def write_json(self, name: str, payload) -> str:
    """<workdir>/<name> as JSON through a temporary file and a rename (process 0 only)."""
    if not self.primary:
      return self.path(name)
    return write_json(self.path(name), payload)

  def child(self, name: str, config=None, label: Optional[str] = None) -> "RunDir":
    """A run directory <workdir>/<name> for one of several runs of this experiment (one per cell)."""
    options = dataclasses.replace(self.options, resume=self.resuming, overwrite=False)
    return RunDir(self.path(name), self.experiment, config if config is not None else self.config, options,
                  label=label or f"{self.label} {name}")

  def check_data(self, name: str, *data) -> str:
    """Record a content hash of one dataset (or split) the run reads, and refuse a changed one on resume.

    ``data`` is the data itself: texts, token lists, id or frame arrays, lists of them
    (``rnn_jax.data.fingerprint``); ``name`` says which dataset and split it is ("ptb_char valid").
    config.json keeps {"data": {name: sha256}}; a resumed run whose ``name`` now hashes differently
    raises ValueError naming it, since the checkpoint was trained on other data. Returns the sha256.
    """
    from rnn_jax.data.fingerprint import fingerprint  # pylint: disable=import-outside-toplevel
    digest = fingerprint(*data)
    saved = self.meta.get("data", {}).get(name)
    if self.resuming and saved is not None and saved != digest:
      _release_lock(self.workdir)
      raise ValueError(f"the data {name!r} changed since the run in {self.workdir} was saved (sha256 "
                       f"{saved[:12]}... then, {digest[:12]}... now); resume with the original data or start "
                       f"a new run")
    self.meta["data"] = {**self.meta.get("data", {}), name: digest}
    self.write_meta()
    return digest

  def check_vocabulary(self, tokens, name: str = "vocab.json") -> None:
    """Refuse, on resume, a vocabulary other than the one saved in <workdir>/<name> (the first id that
    differs is named: the checkpoint's ids would mean other tokens), and record its hash
    (``check_data(name, tokens)``)."""
    tokens = [str(token) for token in tokens]
    path = self.path(name)
    if self.resuming and os.path.exists(path):
      saved = [str(token) for token in read_json(path).get("tokens", [])]
      if saved != tokens:
        first = next((i for i, (a, b) in enumerate(zip(saved, tokens)) if a != b), min(len(saved), len(tokens)))
        then = repr(saved[first]) if first < len(saved) else "absent"
        now = repr(tokens[first]) if first < len(tokens) else "absent"
        _release_lock(self.workdir)
        raise ValueError(f"the vocabulary ({name}) changed since the run in {self.workdir} was saved: "
                         f"{len(saved)} tokens then, {len(tokens)} now, id {first} was {then} and is {now}; "
                         f"the checkpoint's ids would mean other tokens: resume with the original data or "
                         f"start a new run")
    self.check_data(name, tokens)

  # ---- metrics -------------------------------------------------------------------
  def log(self, step: int, split: str, **metrics) -> dict:
    """Append {"step", "split", "time_s", **metrics} to metrics.jsonl and log one line naming the run."""
    record = {"step": int(step), "split": split, "time_s": round(time.time() - self.start_time, 3),
              **to_python(metrics)}
    if not self.primary:
      return record
    with open(self.metrics_path, "a") as handle:
      handle.write(json.dumps(record) + "\n")
    shown = " ".join(f"{k}={_format(v)}" for k, v in record.items() if k not in ("step", "split", "time_s"))
    logging.info("%s step %d [%s] %s", self.label, step, split, shown)
    if self._tensorboard is not None:
      for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tensorboard.add_scalar(f"{split}/{key}", value, step)
      self._tensorboard.flush()
    return record

  def mark_resume(self, step: int, notes: Optional[list] = None) -> None:
    """Before continuing from the checkpoint at ``step``: drop the records logged after it (and
    the test figures of a finished run) and append a {"split": "resume"} record (plots draw it
    as a marker)."""
    if not self.primary:
      self.meta["resumes"] = [*self.meta["resumes"], {"step": int(step), "changes": list(notes or [])}]
      return
    records = [r for r in read_metrics(self.workdir)
               if r.get("step", 0) <= step and r.get("split") not in ("test",)]
    tmp = f"{self.metrics_path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
      for record in records:
        handle.write(json.dumps(record) + "\n")
      handle.write(json.dumps({"step": int(step), "split": "resume", "time_s": 0.0}) + "\n")
    os.replace(tmp, self.metrics_path)
    self.meta["resumes"] = [*self.meta["resumes"], {"step": int(step), "changes": list(notes or [])}]
    self.write_meta()
    logging.info("%s: resumed from step %d%s", self.label, step,
                 f" ({'; '.join(notes)})" if notes else "")

  def finish(self, results: dict, wall_time: Optional[float] = None) -> dict:
    """results.json = {results..., "experiment", "config", "wall_time_s", "device"}; returns it."""
    wall = time.time() - self.start_time if wall_time is None else wall_time
    payload = {**to_python(results), "experiment": self.experiment, "config": self.meta["config"],
               "wall_time_s": float(wall), "device": device_info()}
    self.write_json("results.json", payload)
    if self._tensorboard is not None:
      self._tensorboard.close()
    _release_lock(self.workdir)
    return payload

  # ---- what inference needs ----------------------------------------------------------
  def save_model(self, model, vocab=None, **extra) -> None:
    """model.json (the model's hyper-parameters) and vocab.json (its tokens), for ``load_run``.

    A resumed run's vocabulary must be the saved one (``check_vocabulary``)."""
    if vocab is not None:
      tokens = list(getattr(vocab, "tokens", vocab))
      self.check_vocabulary(tokens)
    self.write_json("model.json", {"model": describe(model), **extra})
    if vocab is not None:
      self.write_json("vocab.json", {"tokens": tokens})


# ---------------------------------------------------------------------------
# Model descriptions: frozen dataclasses of rnn_jax <-> JSON
# ---------------------------------------------------------------------------

def describe(value):
  """A JSON-able description of a model: rnn_jax dataclasses become {"type": "module.Class", fields}."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    cls = type(value)
    return {"type": f"{cls.__module__}.{cls.__qualname__}",
            "fields": {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)
                       if f.init}}
  if isinstance(value, (list, tuple)):
    return [describe(v) for v in value]
  if isinstance(value, dict):
    return {str(k): describe(v) for k, v in value.items()}
  if isinstance(value, (np.generic,)):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"describe: cannot describe {type(value).__name__} {value!r} as JSON")


def build(description):
  """The object ``describe`` described; only classes defined inside rnn_jax are built."""
  if isinstance(description, dict) and set(description) == {"type", "fields"}:
    module_name, _, class_name = description["type"].rpartition(".")
    if not (module_name == "rnn_jax" or module_name.startswith("rnn_jax.")):
      raise ValueError(f"model.json names {description['type']!r}; only rnn_jax classes are loaded")
    try:
      cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
      raise ValueError(f"model.json names {description['type']!r}, which rnn_jax does not define") from None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__.startswith("rnn_jax")):
      raise ValueError(f"model.json names {description['type']!r}, which is not an rnn_jax dataclass; only "
                       f"those are built")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(description["fields"]) - set(fields))
    if unknown:
      raise ValueError(f"model.json gives {description['type']!r} unknown fields {unknown}")
    values = {}
    for name, value in description["fields"].items():
      built = build(value)
      if isinstance(built, list) and "tuple" in str(fields[name].type).lower():
        built = tuple(built)
      values[name] = built
    return cls(**values)
  if isinstance(description, list):
    return [build(v) for v in description]
  if isinstance(description, dict):
    return {k: build(v) for k, v in description.items()}
  return description


@dataclasses.dataclass
class LoadedRun:
  """What ``load_run`` returns."""
  model: Any
  params: Any
  vocab: Any
  config: dict
  step: int
  workdir: str
  extra: dict


def _find_params(state):
  """The params of a restored train state ({"params"} or {"train": {"params"}})."""
  if isinstance(state, dict):
    if "params" in state:
      return state["params"]
    if "train" in state:
      return _find_params(state["train"])
  raise ValueError("the checkpoint holds no params")


def load_run(workdir: str, which: str = "best") -> LoadedRun:
  """The trained model of a run directory: (model, params, vocab, config, step).

  which: "best" (the best checkpoint on the validation metric) or "latest". The params are
  checked against the shapes ``model.init`` gives, so a mismatched checkpoint fails clearly.
  """
  from rnn_jax.checkpoint import CheckpointManager
  from rnn_jax.data.vocab import Vocabulary

  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  workdir = os.path.abspath(workdir)
  model_path = os.path.join(workdir, "model.json")
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"{model_path} not found: {workdir} holds no trained model "
                            f"(train into it first)")
  saved = read_json(model_path)
  model = build(saved["model"])
  vocab = None
  vocab_path = os.path.join(workdir, "vocab.json")
  if os.path.exists(vocab_path):
    vocab = Vocabulary(read_json(vocab_path)["tokens"])
  meta = read_json(os.path.join(workdir, "config.json")) if os.path.exists(
      os.path.join(workdir, "config.json")) else {}
  checkpoints = CheckpointManager(os.path.join(workdir, "checkpoints"), best_metric=saved.get("best_metric"),
                                  best_mode=saved.get("best_mode", "min"))
  step = checkpoints.best_step() if which == "best" else checkpoints.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train into {workdir} first")
  state, _ = checkpoints.restore_raw(step)
  params = _find_params(state)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  checkpoints.check_tree(step, params, expected)
  params = jax.tree_util.tree_map(lambda x, e: jax.numpy.asarray(x, e.dtype), params, expected)
  return LoadedRun(model=model, params=params, vocab=vocab, config=meta.get("config", {}), step=step,
                   workdir=workdir, extra={k: v for k, v in saved.items() if k != "model"})
