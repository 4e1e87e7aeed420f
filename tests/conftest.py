"""Shared fixtures: experiments run in this process, through the same path as their command line."""

import atexit
import dataclasses
import importlib
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _share_compilations_within_the_run() -> None:
  """JAX's persistent compilation cache in a fresh directory for this test run, removed at its end.

  Many tests compile the same XLA programs again (the same model rebuilt by another test, a resumed
  run, an experiment's subprocess); a cache hit skips XLA's compiler. The environment variables
  reach the pytest-xdist workers and every subprocess, and an already set JAX_COMPILATION_CACHE_DIR
  is left alone. Each run starts empty, so a run's time is what a fresh machine sees.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  directory = tempfile.mkdtemp(prefix="rnn_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_share_compilations_within_the_run()


@dataclasses.dataclass
class CommandResult:
  """Exit code and captured output of one experiment command line."""
  code: int
  out: str
  err: str


def experiment_module(name: str):
  """The module experiments/<name>.py."""
  return importlib.import_module(f"experiments.{name}")


@pytest.fixture
def run_experiment(capsys):
  """run_experiment("char_lm", "--smoke", "--workdir=...") -> CommandResult(code, out, err).

  Parses the flags exactly as the script does (rnn_jax's experiments.common.run) and runs it
  in-process, without a progress bar.
  """
  from experiments import common

  def call(name: str, *argv: str) -> CommandResult:
    capsys.readouterr()
    code = common.run(experiment_module(name).EXPERIMENT, ["--progress=false", *argv])
    captured = capsys.readouterr()
    return CommandResult(code, captured.out, captured.err)

  return call
