"""Parallel-in-time evaluation (rnn_jax.parallel) equals sequential lax.scan evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, rnn
from rnn_jax import parallel

B, T, F, H = 3, 40, 5, 6
LENGTHS = jnp.array([40, 17, 0])


def _data(dtype=jnp.float32):
  xs = jax.random.normal(jax.random.PRNGKey(3), (B, T, F), dtype)
  h0 = 0.5 * jax.random.normal(jax.random.PRNGKey(4), (B, H), dtype)
  return xs, h0


@pytest.mark.parametrize("cell", [parallel.MinGRU(H), parallel.MinLSTM(H), parallel.MinGRU(H, candidate="g")],
                         ids=["mingru", "minlstm", "mingru_g"])
def test_min_rnn_associative_scan_equals_sequential(cell):
  xs, h0 = _data()
  params = cell.init(jax.random.PRNGKey(0), F)
  final_seq, ys_seq = rnn(cell, params, xs, LENGTHS, initial_carry=h0)
  final_par, ys_par = parallel.parallel_rnn(cell, params, xs, LENGTHS, initial_carry=h0)
  np.testing.assert_allclose(np.asarray(ys_par), np.asarray(ys_seq), atol=1e-5)
  np.testing.assert_allclose(np.asarray(final_par), np.asarray(final_seq), atol=1e-5)
  # the empty sequence keeps its initial state; padded outputs are zero
  np.testing.assert_allclose(np.asarray(final_par[2]), np.asarray(h0[2]), atol=1e-7)
  assert float(jnp.max(jnp.abs(ys_par[1, 17:]))) == 0.0


def test_min_gru_trains_through_parallel_scan():
  """Gradients through the associative scan equal those through the sequential scan."""
  cell = parallel.MinLSTM(H)
  xs, _ = _data()
  params = cell.init(jax.random.PRNGKey(0), F)
  seq = jax.grad(lambda p: jnp.sum(rnn(cell, p, xs, LENGTHS)[1] ** 2))(params)
  par = jax.grad(lambda p: jnp.sum(parallel.parallel_rnn(cell, p, xs, LENGTHS)[1] ** 2))(params)
  for name in params:
    np.testing.assert_allclose(np.asarray(par[name]), np.asarray(seq[name]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 15 s of breadth
def test_linear_recurrence_diagonal_and_full_equal_a_loop():
  key_a, key_b, key_h = jax.random.split(jax.random.PRNGKey(1), 3)
  diag = jax.random.uniform(key_a, (T, 2, H), minval=-1.0, maxval=1.0)
  full = 0.3 * jax.random.normal(key_a, (T, 2, H, H))
  offsets = jax.random.normal(key_b, (T, 2, H))
  h0 = jax.random.normal(key_h, (2, H))
  for coefficients in (diag, full):
    expected, h = [], np.asarray(h0, np.float64)
    for t in range(T):
      a_t = np.asarray(coefficients[t], np.float64)
      h = (a_t @ h[..., None])[..., 0] if a_t.ndim == 3 else a_t * h
      h = h + np.asarray(offsets[t], np.float64)
      expected.append(h)
    got = parallel.linear_recurrence(coefficients, offsets, h0)
    np.testing.assert_allclose(np.asarray(got), np.stack(expected), rtol=1e-4, atol=1e-4)


DEER_CELLS = {"elman_tanh": Elman(H), "elman_relu": Elman(H, activation="relu"), "gru": GRU(H),
              "gru_reset_before": GRU(H, reset_after=False)}


@pytest.mark.parametrize("name", sorted(DEER_CELLS))
def test_jacobian_diagonal_equals_jacfwd(name):
  cell = DEER_CELLS[name]
  params = cell.init(jax.random.PRNGKey(0), F)
  h_prev = jax.random.normal(jax.random.PRNGKey(5), (H,))
  a_t = jax.random.normal(jax.random.PRNGKey(6), (cell.num_gates * H,))
  full = jax.jacfwd(lambda h: cell.recurrence(params, h, a_t)[0])(h_prev)
  diagonal = parallel.recurrence_jacobian_diagonal(cell, params, h_prev, a_t)
  np.testing.assert_allclose(np.asarray(diagonal), np.diagonal(np.asarray(full)), atol=1e-6)


@pytest.mark.parametrize("name,quasi", [(name, True) for name in sorted(DEER_CELLS)]
                         + [("elman_tanh", False), ("gru", False)])
def test_deer_equals_sequential(name, quasi):
  cell = DEER_CELLS[name]
  xs, h0 = _data()
  params = cell.init(jax.random.PRNGKey(0), F)
  final_seq, ys_seq = rnn(cell, params, xs, LENGTHS, initial_carry=h0)
  (final, ys), info = jax.jit(lambda p, x: parallel.deer_rnn(cell, p, x, LENGTHS, initial_carry=h0,
                                                             quasi=quasi))(params, xs)
  assert bool(info.converged) and not bool(info.fell_back)
  assert 1 < int(info.iterations) < T  # Newton needed several iterations, far fewer than T
  np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_seq), atol=1e-4)
  np.testing.assert_allclose(np.asarray(final), np.asarray(final_seq), atol=1e-4)


def test_deer_float64_reaches_tight_tolerance():
  with jax.enable_x64(True):
    cell = GRU(H, param_dtype="float64")
    xs, h0 = _data(jnp.float64)
    params = cell.init(jax.random.PRNGKey(0), F)
    (_, ys), info = parallel.deer_rnn(cell, params, xs, LENGTHS, initial_carry=h0)
    ys_seq = rnn(cell, params, xs, LENGTHS, initial_carry=h0)[1]
    assert bool(info.converged)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_seq), atol=1e-9)


def test_deer_iteration_cap_falls_back_to_sequential():
  cell = Elman(H)
  xs, h0 = _data()
  params = cell.init(jax.random.PRNGKey(0), F)
  ys_seq = rnn(cell, params, xs, LENGTHS, initial_carry=h0)[1]
  (_, ys), info = parallel.deer_rnn(cell, params, xs, LENGTHS, initial_carry=h0, max_iterations=2)
  assert int(info.iterations) == 2 and not bool(info.converged) and bool(info.fell_back)
  np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_seq), atol=1e-6)
  (_, ys_raw), info_raw = parallel.deer_rnn(cell, params, xs, LENGTHS, initial_carry=h0, max_iterations=2,
                                            fallback=False)
  assert not bool(info_raw.fell_back)
  assert float(jnp.max(jnp.abs(ys_raw - ys_seq))) > 1e-3  # two iterations alone are not enough


def test_parallel_rejects_cells_it_cannot_evaluate():
  xs, _ = _data()
  with pytest.raises(ValueError, match="elman and gru"):
    lstm = LSTM(H)
    parallel.deer_rnn(lstm, lstm.init(jax.random.PRNGKey(0), F), xs)
  with pytest.raises(ValueError, match="MinGRU or MinLSTM"):
    elman = Elman(H)
    parallel.parallel_rnn(elman, elman.init(jax.random.PRNGKey(0), F), xs)
  with pytest.raises(ValueError, match="max_iterations"):
    elman = Elman(H)
    parallel.deer_rnn(elman, elman.init(jax.random.PRNGKey(0), F), xs, max_iterations=0)


def test_min_cells_run_in_every_layer_of_the_sequence_api():
  """minGRU and minLSTM are cells: bidirectional StackedRNN and the Flax CellLayer run them."""
  from rnn_jax import StackedRNN, make_cell
  from rnn_jax.flax_modules import CellLayer
  xs = jax.random.normal(jax.random.key(0), (2, 6, 3))
  lengths = jnp.array([6, 2])
  for name in ("mingru", "minlstm"):
    cell = make_cell(name, 4)
    stack = StackedRNN(cell, num_layers=2, bidirectional=True)
    _, ys = stack(stack.init(jax.random.key(1), 3), xs, lengths)
    assert ys.shape == (2, 6, 8) and float(jnp.abs(ys[1, 2:]).max()) == 0.0
    layer = CellLayer(cell)
    variables = layer.init(jax.random.key(2), xs, lengths)
    np.testing.assert_allclose(layer.apply(variables, xs, lengths)[1],
                               rnn(cell, dict(variables["params"]), xs, lengths)[1], atol=1e-6)
