"""rnn_jax: exact, fast recurrent networks in JAX.

Cells are pure functions of (params, carry, x_t); ``rnn_jax.sequence`` scans them over time
with variable lengths, padding-aware reversal, bidirectional and stacked layers.
``load_run(workdir)`` reloads a trained run for inference. Every submodule is reachable as an
attribute (``rnn_jax.runtime``, ``rnn_jax.interop``, ...) and is imported on first use, so
``import rnn_jax`` loads neither Flax nor matplotlib. See README.md and docs/.
"""

import importlib

from rnn_jax import runtime as _runtime

_runtime.apply_at_import()  # glibc malloc settings against XLA:CPU's per-call page faults (rnn_jax/runtime.py)

from rnn_jax import initializers  # pylint: disable=wrong-import-position
from rnn_jax import deep_transition  # registers "dt_rnn" and "dts_rnn" before CELL_NAMES is read below
from rnn_jax.cells import (CELL_NAMES, GRU, LSTM, Cell, Elman, LSTMState, MinGRU, MinLSTM, make_cell,
                           register_cell)
from rnn_jax.rundir import LoadedRun, RunOptions, load_run
from rnn_jax.sequence import ScanOptions, StackedRNN, bidirectional, rnn, run_cell

__version__ = "0.1.0"

SUBMODULES = (
    "attention", "bptt", "cells", "checkpoint", "classifier", "config", "crf", "data", "deep_transition",
    "diagnostics", "elman_kernel", "esn", "flax_modules", "gru_kernel", "initializers", "interop", "kernel_build",
    "lab", "launch", "layers", "lm", "lm_train", "losses", "lstm_kernel", "mesh", "metrics", "optim", "parallel", "plots", "polyphonic",
    "predict", "regularizers", "rundir", "runtime", "seq2seq", "sequence", "tagger", "tasks", "train",
)

__all__ = [
    "CELL_NAMES", "Cell", "Elman", "GRU", "LSTM", "LSTMState", "LoadedRun", "MinGRU", "MinLSTM", "RunOptions",
    "ScanOptions", "StackedRNN", "bidirectional", "initializers", "load_run", "make_cell", "register_cell",
    "rnn", "run_cell", *SUBMODULES,
]


def __getattr__(name: str):
  """``rnn_jax.<submodule>`` imports the submodule on first access."""
  if name in SUBMODULES:
    return importlib.import_module(f"rnn_jax.{name}")
  raise AttributeError(f"module 'rnn_jax' has no attribute {name!r}")
