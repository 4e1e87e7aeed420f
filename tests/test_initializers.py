"""Initialisers: the numbers each one promises (bounds, singular values, spectral radius)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, initializers


@pytest.mark.parametrize("gain", [1.0, 0.5, 1.7])
def test_orthogonal_blocks_have_all_singular_values_equal_to_gain(gain):
  H, gates = 6, 4
  w = np.asarray(initializers.orthogonal(gain)(jax.random.key(0), (gates * H, H), jnp.float32))
  assert w.shape == (gates * H, H)
  for block in np.split(w, gates):
    np.testing.assert_allclose(np.linalg.svd(block, compute_uv=False), gain, atol=1e-5)
  # The gate blocks are independent draws, not copies.
  assert not np.allclose(w[:H], w[H:2 * H])


def test_orthogonal_rejects_non_square_blocks():
  expected = r"orthogonal: shape \(7, 3\) is not a stack of square \[H, H\] blocks"
  with pytest.raises(ValueError, match=expected):
    initializers.orthogonal()(jax.random.key(0), (7, 3), jnp.float32)


def test_identity_is_gain_times_eye_per_gate_block():
  w = np.asarray(initializers.identity(0.9)(jax.random.key(0), (3 * 4, 4), jnp.float32))
  np.testing.assert_array_equal(w, np.tile(0.9 * np.eye(4, dtype=np.float32), (3, 1)))
  cell = Elman(5, activation="relu", recurrent_init="identity")  # IRNN (Le et al. 2015)
  np.testing.assert_array_equal(cell.init(jax.random.key(1), 2)["w_hh"], np.eye(5))


@pytest.mark.parametrize("base, target", [("torch", 0.9), ("glorot", 1.5), ("orthogonal", 0.5)])
def test_spectral_radius_rescaling_hits_the_target(base, target):
  H = 8
  init = initializers.with_spectral_radius(initializers.recurrent_initializer(base, H), target)
  w = np.asarray(init(jax.random.key(3), (2 * H, H), jnp.float32), np.float64)
  for block in np.split(w, 2):
    np.testing.assert_allclose(np.max(np.abs(np.linalg.eigvals(block))), target, rtol=1e-5)
  # Through a cell's hyper-parameters too.
  params = LSTM(H, recurrent_init=base, spectral_radius=target).init(jax.random.key(4), 3)
  for block in np.split(np.asarray(params["w_hh"], np.float64), 4):
    assert initializers.spectral_radius(block) == pytest.approx(target, rel=1e-5)


def test_spectral_radius_of_a_known_matrix_and_zero_matrix_error():
  # Eigenvalues of [[0, 2], [-2, 0]] are +-2i: radius 2 although the matrix is skew.
  assert initializers.spectral_radius(np.array([[0.0, 2.0], [-2.0, 0.0]])) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="spectral radius 0"):
    initializers.scale_to_spectral_radius(np.zeros((3, 3)), 1.0)
  with pytest.raises(ValueError, match=r"expected a square \[H, H\] matrix, got shape \(2, 3\)"):
    initializers.spectral_radius(np.zeros((2, 3)))


def test_glorot_uniform_bounds_and_spread():
  shape = (40, 24)   # [out, in]
  bound = np.sqrt(6.0 / (40 + 24))
  w = np.asarray(initializers.glorot_uniform(jax.random.key(5), shape, jnp.float32))
  assert w.shape == shape and np.abs(w).max() <= bound
  assert np.abs(w).max() > 0.95 * bound                       # fills the interval
  np.testing.assert_allclose(w.var(), bound ** 2 / 3, rtol=0.1)  # variance of U(-a, a) is a^2 / 3


def test_torch_default_bounds_for_every_cell_param():
  H = 16
  bound = 1.0 / np.sqrt(H)
  for cell in (Elman(H, readout_size=5), LSTM(H, peephole=True), GRU(H)):
    params = cell.init(jax.random.key(6), 7)
    for name, value in params.items():
      value = np.asarray(value)
      assert np.abs(value).max() <= bound, name
      assert np.abs(value).max() > 0.5 * bound, name           # not all zeros or tiny
  w = np.asarray(initializers.torch_default(H)(jax.random.key(7), (64, 64), jnp.float32))
  np.testing.assert_allclose(w.var(), bound ** 2 / 3, rtol=0.1)


def test_init_is_deterministic_and_param_dtype_is_respected():
  cell = GRU(4, param_dtype="bfloat16")
  first, second = cell.init(jax.random.key(8), 3), cell.init(jax.random.key(8), 3)
  for name in first:
    assert first[name].dtype == jnp.bfloat16
    np.testing.assert_array_equal(first[name], second[name])
  other = cell.init(jax.random.key(9), 3)
  assert not np.array_equal(first["w_hh"], other["w_hh"])


def test_unknown_recurrent_initialiser():
  with pytest.raises(ValueError, match=r"unknown recurrent initialiser 'he'; expected one of \('torch'"):
    initializers.recurrent_initializer("he", 4)
