"""LSTM, GRU (reset after) and Elman equal flax.linen's LSTMCell, GRUCell and SimpleCell.

The weight mapping is ``rnn_jax.interop.to_flax`` / ``from_flax`` (their docstrings have it).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, interop, rnn

B, T, F, H = 3, 6, 5, 4
LENGTHS = np.array([6, 3, 1])


def mapping(cell, flax_name):
  """(to_flax, from_flax) for one cell, from rnn_jax.interop."""
  def from_flax(flax_params):
    mapped_cell, params = interop.from_flax(flax_name, flax_params)
    assert mapped_cell.hidden_size == cell.hidden_size and type(mapped_cell) is type(cell)
    return params
  return (lambda params: interop.to_flax(cell, params)), from_flax


def case(cell, flax_cls):
  return (cell, flax_cls, *mapping(cell, flax_cls.__name__))


CASES = {
    "lstm": case(LSTM(H), nn.LSTMCell),
    "gru": case(GRU(H, reset_after=True), nn.GRUCell),
    "elman": case(Elman(H), nn.SimpleCell),
}


def flax_carry(name, carry):
  return interop.to_flax_carry(CASES[name][0], carry)


def our_carry(name, flax_carry_value):
  return interop.from_flax_carry(CASES[name][0], flax_carry_value)


def assert_trees_close(a, b, atol):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=0), a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mapping_round_trips(name):
  cell, flax_cls, to_flax, from_flax = CASES[name]
  params = cell.init(jax.random.key(0), F)
  assert_trees_close(from_flax(to_flax(params)), params, atol=0)
  flax_cell = flax_cls(features=H)
  carry = flax_cell.initialize_carry(jax.random.key(2), (F,))
  flax_params = flax_cell.init(jax.random.key(1), carry, jnp.ones(F))["params"]
  assert jax.tree_util.tree_structure(to_flax(from_flax(flax_params))) == \
      jax.tree_util.tree_structure(flax_params)
  assert_trees_close(to_flax(from_flax(flax_params)), flax_params, atol=0)


@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-5), (np.float64, 1e-10)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_flax_cell_step_by_step(name, dtype, atol):
  """Our params mapped into flax: every output and carry equal over a whole sequence."""
  cell, flax_cls, to_flax, _ = CASES[name]
  with jax.enable_x64(dtype == np.float64):
    rng = np.random.default_rng(3)
    params = {k: jnp.asarray(rng.normal(scale=0.5, size=v.shape), dtype)
              for k, v in cell.init(jax.random.key(0), F).items()}
    xs = jnp.asarray(rng.normal(size=(B, T, F)), dtype)
    flax_cell = flax_cls(features=H, param_dtype=dtype)
    carry = flax_carry(name, jax.tree_util.tree_map(
        lambda v: jnp.zeros((B,) + v.shape, dtype), cell.initial_carry(params)))
    flax_ys = []
    for t in range(T):
      carry, y = flax_cell.apply({"params": to_flax(params)}, carry, xs[:, t])
      flax_ys.append(y)
    final, ys = rnn(cell, params, xs)
    assert ys.dtype == dtype
    np.testing.assert_allclose(ys, jnp.stack(flax_ys, axis=1), atol=atol, rtol=0)
    assert_trees_close(final, our_carry(name, carry), atol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_flax_rnn_with_lengths_and_flax_init(name):
  """flax-initialised params mapped to ours; flax.linen.RNN with seq_lengths, forward and reversed."""
  cell, flax_cls, _, from_flax = CASES[name]
  rng = np.random.default_rng(4)
  xs = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
  lengths = jnp.asarray(LENGTHS)
  for reverse in (False, True):
    flax_rnn = nn.RNN(flax_cls(features=H), return_carry=True, reverse=reverse, keep_order=True)
    variables = flax_rnn.init(jax.random.key(5), xs, seq_lengths=lengths)
    flax_final, flax_ys = flax_rnn.apply(variables, xs, seq_lengths=lengths)
    params = from_flax(variables["params"]["cell"])
    final, ys = rnn(cell, params, xs, lengths, reverse=reverse)
    real = (np.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    np.testing.assert_allclose(np.where(real, ys, 0), np.where(real, flax_ys, 0), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.where(real, 0, ys), 0)
    assert_trees_close(final, our_carry(name, flax_final), atol=1e-5)
