"""Shared fixtures: experiments run in this process, through the same path as their command line."""

import dataclasses
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


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
