"""Bad-input audit: run every known bad input through the public API and the scripts, and sort each
outcome into "error" (a one-line message of a user-error type), "correct" (accepted, with the
right result), "silent" (accepted, with a wrong result), "crash" (another exception, or a
message of many lines) or "skipped" (this machine cannot exercise it, e.g. a read-only
directory for root).

  python tools/input_audit.py            # the table of every case, in markdown
  python tools/input_audit.py --fast     # only the cases that need no training run

A case is a function that either raises or returns a verdict string for a result it checked.
The test suite runs the fast cases (tests/test_input_audit.py) and requires no silent result
and no crash.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import USER_ERRORS  # noqa: E402  (the errors the scripts report in one line)

CASES: list[tuple[str, str, bool, Callable]] = []  # (area, description, fast, function)


def case(area: str, description: str, fast: bool = True):
  def register(function):
    CASES.append((area, description, fast, function))
    return function
  return register


class Correct(Exception):
  """Raised by a case whose input is accepted and whose result was checked to be right."""


class Skipped(Exception):
  """Raised by a case this machine cannot exercise (say why)."""


def correct(why: str):
  raise Correct(why)


def skipped(why: str):
  raise Skipped(why)


# ---------------------------------------------------------------------------
# The sequence API
# ---------------------------------------------------------------------------

def _lstm(hidden=4, features=3):
  from rnn_jax import LSTM
  cell = LSTM(hidden)
  return cell, cell.init(jax.random.key(0), features)


@case("sequence", "rnn: x with the wrong feature count (scan path)")
def _():
  from rnn_jax import rnn
  cell, params = _lstm()
  rnn(cell, params, jnp.ones((2, 5, 4)))


@case("sequence", "rnn / run_cell / StackedRNN: wrong feature count on the fused-kernel path (H=16)")
def _():
  from rnn_jax import StackedRNN, rnn, run_cell
  cell, params = _lstm(16, 8)
  for call in (lambda: rnn(cell, params, jnp.ones((2, 5, 9))), lambda: run_cell(cell, params, jnp.ones((5, 9))),
               lambda: StackedRNN(cell)({"layer_0": {"forward": params}}, jnp.ones((2, 5, 9)))):
    try:
      call()
    except ValueError:
      continue
    return "silent: accepted"
  raise ValueError("all three refuse: lstm: x has 9 features, params expect 8")


for _length in (9, -1, 2.5):
  @case("sequence", f"run_cell: concrete length {_length!r} with T=5")
  def _(length=_length):
    from rnn_jax import run_cell
    cell, params = _lstm()
    run_cell(cell, params, jnp.ones((5, 3)), length)


@case("sequence", "run_cell: length an array of shape [T]")
def _():
  from rnn_jax import run_cell
  cell, params = _lstm()
  run_cell(cell, params, jnp.ones((5, 3)), jnp.arange(5))


@case("sequence", "rnn: lengths above T")
def _():
  from rnn_jax import rnn
  cell, params = _lstm()
  rnn(cell, params, jnp.ones((2, 5, 3)), np.array([6, 2]))


@case("sequence", "rnn: negative lengths")
def _():
  from rnn_jax import rnn
  cell, params = _lstm()
  rnn(cell, params, jnp.ones((2, 5, 3)), np.array([-1, 2]))


@case("sequence", "rnn: float lengths")
def _():
  from rnn_jax import rnn
  cell, params = _lstm()
  rnn(cell, params, jnp.ones((2, 5, 3)), jnp.array([1.0, 2.0]))


@case("sequence", "rnn: lengths of the wrong batch size")
def _():
  from rnn_jax import rnn
  cell, params = _lstm()
  rnn(cell, params, jnp.ones((2, 5, 3)), jnp.array([1, 2, 3]))


@case("sequence", "rnn: xs of rank 2")
def _():
  from rnn_jax import rnn
  cell, params = _lstm()
  rnn(cell, params, jnp.ones((5, 3)))


@case("sequence", "rnn: params of another cell type (GRU cell, LSTM params)")
def _():
  from rnn_jax import GRU, rnn
  _, params = _lstm()
  rnn(GRU(4), params, jnp.ones((2, 5, 3)))


@case("sequence", "rnn: params of another size")
def _():
  from rnn_jax import LSTM, rnn
  _, params = _lstm()
  rnn(LSTM(5), params, jnp.ones((2, 5, 3)))


@case("sequence", "rnn: params with an extra key")
def _():
  from rnn_jax import rnn
  cell, params = _lstm()
  rnn(cell, {**params, "extra": jnp.ones(2)}, jnp.ones((2, 5, 3)))


@case("sequence", "rnn: an initial carry of the wrong shape")
def _():
  from rnn_jax import LSTMState, rnn
  cell, params = _lstm()
  rnn(cell, params, jnp.ones((2, 5, 3)), initial_carry=LSTMState(jnp.zeros(5), jnp.zeros(4)))


@case("sequence", "bidirectional: an unknown merge")
def _():
  from rnn_jax import bidirectional
  cell, params = _lstm()
  bidirectional(cell, params, params, jnp.ones((2, 5, 3)), merge="mean")


@case("sequence", "StackedRNN(num_layers=1.5)")
def _():
  from rnn_jax import StackedRNN
  cell, _ = _lstm()
  StackedRNN(cell, num_layers=1.5)


@case("sequence", "StackedRNN(num_layers=0)")
def _():
  from rnn_jax import StackedRNN
  cell, _ = _lstm()
  StackedRNN(cell, num_layers=0)


@case("sequence", "StackedRNN(dropout=1.0)")
def _():
  from rnn_jax import StackedRNN
  cell, _ = _lstm()
  StackedRNN(cell, dropout=1.0)


@case("sequence", "StackedRNN: train=True with dropout and no rng")
def _():
  from rnn_jax import StackedRNN
  cell, _ = _lstm()
  stack = StackedRNN(cell, num_layers=2, dropout=0.5)
  stack(stack.init(jax.random.key(0), 3), jnp.ones((2, 5, 3)), train=True)


@case("cells", "LSTM(hidden_size=0)")
def _():
  from rnn_jax import LSTM
  LSTM(0)


@case("cells", "LSTM(hidden_size=2.5)")
def _():
  from rnn_jax import LSTM
  LSTM(2.5)


@case("cells", "Elman(activation='gelu')")
def _():
  from rnn_jax import Elman
  Elman(4, activation="gelu")


@case("cells", "make_cell('transformer')")
def _():
  from rnn_jax import make_cell
  make_cell("transformer", 4)


@case("cells", "cell.init with input_size=0")
def _():
  cell, _ = _lstm()
  cell.init(jax.random.key(0), 0)


# ---------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------

@case("ids", "embed: a concrete id >= V")
def _():
  from rnn_jax import layers
  layers.embed({"table": jnp.ones((4, 3))}, jnp.array([0, 4]))


@case("ids", "embed: a concrete negative id")
def _():
  from rnn_jax import layers
  layers.embed({"table": jnp.ones((4, 3))}, jnp.array([-1, 2]))


@case("ids", "embed under jit: ids -1 and V (documented: NaN rows, never another token's row)")
def _():
  from rnn_jax import layers
  rows = jax.jit(layers.embed)({"table": jnp.arange(12.0).reshape(4, 3)}, jnp.array([1, -1, 4]))
  if np.all(np.isnan(rows[1])) and np.all(np.isnan(rows[2])) and np.array_equal(rows[0], [3.0, 4.0, 5.0]):
    correct("NaN rows for the bad ids, as documented; the good id's row is exact")
  return "silent: a bad id gave a finite row"


@case("ids", "embed: float ids")
def _():
  from rnn_jax import layers
  layers.embed({"table": jnp.ones((4, 3))}, jnp.array([0.0, 1.0]))


# ---------------------------------------------------------------------------
# Experiment scripts (flags, data, workdirs)
# ---------------------------------------------------------------------------

def _script(name: str, *argv: str) -> tuple[int, str]:
  """Run experiments/<name>.py in this process, as its command line would; returns (exit code, stderr)."""
  import importlib
  from experiments import common
  module = importlib.import_module(f"experiments.{name}")
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = common.run(module.EXPERIMENT, ["--progress=false", *argv])
  return code, err.getvalue()


def _expect_error(name: str, *argv: str):
  code, err = _script(name, *argv)
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("W", "I0", "E0"))]
  if code == 2 and len(lines) == 1:
    raise ValueError(lines[0])
  if code == 0:
    return "silent: exit code 0"
  raise RuntimeError(f"exit code {code}, stderr: {err[-300:]}")


_TMP = tempfile.mkdtemp(prefix="rnn_jax_audit_")


def _tmp(name: str) -> str:
  return os.path.join(_TMP, name)


@case("scripts", "--hidden_size=0")
def _():
  return _expect_error("char_lm", "--hidden_size=0", f"--workdir={_tmp('h0')}")


@case("scripts", "--smoke --hidden_size=0 --batch_size=-1 (smoke must not replace them)")
def _():
  return _expect_error("char_lm", "--smoke", "--hidden_size=0", "--batch_size=-1", f"--workdir={_tmp('sm')}")


@case("scripts", "--hidden_size=2.5")
def _():
  return _expect_error("char_lm", "--hidden_size=2.5", f"--workdir={_tmp('h25')}")


@case("scripts", "an unknown flag --hidden=8")
def _():
  return _expect_error("char_lm", "--hidden=8", f"--workdir={_tmp('unk')}")


@case("scripts", "--cell=transformer")
def _():
  return _expect_error("char_lm", "--cell=transformer", f"--workdir={_tmp('cell')}")


@case("scripts", "--dataset=file: a missing file")
def _():
  return _expect_error("char_lm", "--smoke", f"--dataset=file:{_tmp('missing.txt')}", f"--workdir={_tmp('m')}")


@case("scripts", "--dataset=file: a binary file")
def _():
  path = _tmp("binary.bin")
  with open(path, "wb") as handle:
    handle.write(bytes(range(256)) * 64)
  return _expect_error("char_lm", "--smoke", f"--dataset=file:{path}", f"--workdir={_tmp('bin')}")


@case("scripts", "--dataset=file: Latin-1 text (not UTF-8)")
def _():
  path = _tmp("latin1.txt")
  with open(path, "wb") as handle:
    handle.write(("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n" * 400).encode("latin-1"))
  return _expect_error("char_lm", "--smoke", f"--dataset=file:{path}", f"--workdir={_tmp('lat')}")


@case("scripts", "--dataset=file: an empty file")
def _():
  path = _tmp("empty.txt")
  open(path, "w").close()
  return _expect_error("char_lm", "--smoke", f"--dataset=file:{path}", f"--workdir={_tmp('empty')}")


@case("scripts", "--workdir on a read-only directory")
def _():
  path = _tmp("readonly")
  os.makedirs(path, exist_ok=True)
  os.chmod(path, 0o500)
  try:
    if os.access(path, os.W_OK):  # root ignores the mode bits
      skipped("this user can write to any directory (root), so a read-only one cannot be made")
    return _expect_error("char_lm", "--smoke", f"--workdir={path}")
  finally:
    os.chmod(path, 0o700)


@case("scripts", "--workdir names a file")
def _():
  path = _tmp("a_file")
  open(path, "w").close()
  return _expect_error("char_lm", "--smoke", f"--workdir={path}")


@case("scripts", "--overwrite on a directory that holds no run")
def _():
  path = _tmp("not_a_run")
  os.makedirs(path, exist_ok=True)
  open(os.path.join(path, "notes.txt"), "w").close()
  os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
  return _expect_error("char_lm", "--smoke", "--overwrite", f"--workdir={path}")


@case("scripts", "--resume --overwrite together")
def _():
  return _expect_error("char_lm", "--smoke", "--resume", "--overwrite", f"--workdir={_tmp('ro')}")


@case("scripts", "a workdir held by another live process")
def _():
  import subprocess
  from rnn_jax.rundir import LOCK_NAME
  path = _tmp("busy")
  os.makedirs(path, exist_ok=True)
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    with open(os.path.join(path, LOCK_NAME), "w") as handle:
      json.dump({"pid": sleeper.pid, "host": os.uname().nodename}, handle)
    return _expect_error("char_lm", "--smoke", f"--workdir={path}")
  finally:
    sleeper.kill()
    sleeper.wait()


@case("scripts", "a batch that does not split over the devices (--num_devices above the count)")
def _():
  return _expect_error("char_lm", "--smoke", f"--num_devices={jax.local_device_count() + 1}",
                       f"--workdir={_tmp('dev')}")


@case("scripts", "--steps=0 (documented: train --epochs; the log says how many steps)", fast=False)
def _():
  code, err = _script("char_lm", "--smoke", "--steps=0", "--epochs=0.01", f"--workdir={_tmp('steps0')}")
  if code == 0:
    correct("trains config.epochs and logs 'steps=0, so the run trains ... steps'")
  return f"crash: exit code {code}"


def _trained(name: str) -> str:
  path = _tmp(name)
  if not os.path.exists(os.path.join(path, "results.json")):
    code, err = _script("char_lm", "--smoke", "--steps=4", "--eval_every=2", f"--workdir={path}")
    assert code == 0, err
  return path


@case("scripts", "an existing run without --resume or --overwrite", fast=False)
def _():
  return _expect_error("char_lm", "--smoke", "--steps=4", f"--workdir={_trained('done')}")


@case("scripts", "--resume changing a fixed field (--hidden_size)", fast=False)
def _():
  return _expect_error("char_lm", "--resume", "--hidden_size=64", f"--workdir={_trained('done')}")


@case("scripts", "--resume after the dataset file changed in place (same size, two letters swapped)", fast=False)
def _():
  text_path = _tmp("corpus.txt")
  with open(text_path, "w") as handle:
    handle.write("the quick brown fox jumps over the lazy dog\n" * 300)
  path = _tmp("data_changed")
  code, err = _script("char_lm", "--smoke", "--steps=4", "--eval_every=2", f"--dataset=file:{text_path}",
                      f"--workdir={path}")
  assert code == 0, err
  with open(text_path, "r+") as handle:
    handle.seek(4)
    handle.write("uq")
  return _expect_error("char_lm", "--resume", "--steps=6", f"--workdir={path}")


def _corrupt_and_resume(name: str, damage: Callable[[str], None]):
  source = _trained("done")
  path = _tmp(name)
  shutil.rmtree(path, ignore_errors=True)
  shutil.copytree(source, path)
  os.remove(os.path.join(path, "results.json"))
  steps = sorted(int(s) for s in os.listdir(os.path.join(path, "checkpoints")) if s.isdigit())
  step_dir = os.path.join(path, "checkpoints", str(steps[-1]))
  data = max((os.path.join(root, f) for root, _, files in os.walk(step_dir) for f in files
              if "rnn_jax_checksums" not in f), key=os.path.getsize)
  damage(data)
  return _expect_error("char_lm", "--resume", "--steps=6", f"--workdir={path}")


@case("checkpoints", "64 bytes overwritten inside a checkpoint's data file", fast=False)
def _():
  def overwrite(path):
    with open(path, "r+b") as handle:
      handle.seek(os.path.getsize(path) // 2)
      handle.write(b"\xff" * 64)
  return _corrupt_and_resume("corrupt", overwrite)


@case("checkpoints", "a truncated checkpoint data file", fast=False)
def _():
  return _corrupt_and_resume("truncated", lambda path: os.truncate(path, os.path.getsize(path) // 2))


@case("checkpoints", "an emptied checkpoint data file", fast=False)
def _():
  return _corrupt_and_resume("emptied", lambda path: os.truncate(path, 0))


@case("checkpoints", "load_run on a directory without a trained model")
def _():
  from rnn_jax import load_run
  path = _tmp("nothing")
  os.makedirs(path, exist_ok=True)
  load_run(path)


# ---------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------

@case("interop", "a torch file holding a pickled object that runs code when loaded")
def _():
  try:
    import torch
  except ImportError:
    skipped("torch is not installed")
  from rnn_jax import interop
  marker = _tmp("pwned")

  class Payload:
    def __reduce__(self):
      return (open, (marker, "w"))

  path = _tmp("evil.pt")
  torch.save({"weight_ih_l0": Payload()}, path)
  try:
    interop.load_torch(path)
  finally:
    if os.path.exists(marker):
      return "silent: the payload ran"  # noqa: B012  (a payload that ran outranks any error)
  return "silent: the payload was accepted"


# ---------------------------------------------------------------------------
# Running the cases
# ---------------------------------------------------------------------------

def outcome(function) -> tuple[str, str]:
  """(verdict, message): verdict is error, correct, skipped, silent or crash."""
  try:
    returned = function()
  except Correct as why:
    return "correct", str(why)
  except Skipped as why:
    return "skipped", str(why)
  except USER_ERRORS as error:
    text = str(error)
    if "\n" in text.strip():
      return "crash", f"{type(error).__name__} of {len(text.splitlines())} lines: {text.splitlines()[0]}"
    return "error", f"{type(error).__name__}: {text}"
  except Exception as error:  # noqa: BLE001
    return "crash", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
  if isinstance(returned, str) and returned.startswith("silent"):
    return "silent", returned
  return "silent", f"accepted without an error ({returned!r})"


def audit(fast_only: bool = False) -> list[dict]:
  rows = []
  for area, description, fast, function in CASES:
    if fast_only and not fast:
      continue
    verdict, message = outcome(function)
    rows.append({"area": area, "case": description, "verdict": verdict, "message": message})
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| # | area | case | outcome | message |", "| --- | --- | --- | --- | --- |"]
  for index, row in enumerate(rows, 1):
    message = row["message"].replace("|", "\\|")
    lines.append(f"| {index} | {row['area']} | {row['case']} | {row['verdict']} | {message} |")
  counts = {v: sum(r["verdict"] == v for r in rows) for v in ("error", "correct", "skipped", "silent", "crash")}
  lines.append("")
  lines.append(", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(rows)} cases")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--fast", action="store_true", help="Only the cases that need no training run.")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  try:
    rows = audit(args.fast)
  finally:
    shutil.rmtree(_TMP, ignore_errors=True)
  print(markdown(rows))
  return 1 if any(r["verdict"] in ("silent", "crash") for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
