"""rnn_jax: exact, fast recurrent networks in JAX.

Cells are pure functions of (params, carry, x_t); ``rnn_jax.sequence`` scans them
over time with variable lengths, padding-aware reversal, bidirectional and
stacked layers. ``load_run(workdir)`` reloads a
trained run for inference. See README.md and docs/.
"""

from rnn_jax import initializers
from rnn_jax.cells import GRU, LSTM, Cell, Elman, LSTMState, make_cell
from rnn_jax.rundir import LoadedRun, RunOptions, load_run
from rnn_jax.sequence import StackedRNN, bidirectional, rnn, run_cell

__version__ = "0.1.0"

__all__ = [
    "Cell", "Elman", "GRU", "LSTM", "LSTMState", "StackedRNN", "bidirectional",
    "LoadedRun", "RunOptions", "initializers", "load_run", "make_cell", "rnn", "run_cell",
]
