"""Echo state network: reservoir construction, the closed-form ridge read-out, generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import esn, initializers


def _numpy_states(params, xs, leak):
  """h_t = (1 - a) h_{t-1} + a tanh(W_xh x_t + W_hh h_{t-1} + b), written out in numpy."""
  w_xh, w_hh, b = (np.asarray(params[k]) for k in ("w_xh", "w_hh", "b"))
  h = np.zeros(w_hh.shape[0])
  states = []
  for x in np.asarray(xs):
    h = (1 - leak) * h + leak * np.tanh(w_xh @ x + w_hh @ h + b)
    states.append(h)
  return np.stack(states)


def test_reservoir_has_the_requested_spectral_radius_and_density():
  reservoir = esn.Reservoir(200, spectral_radius=0.8, density=0.05, input_scaling=0.3, bias_scaling=0.1)
  params = reservoir.init(jax.random.key(0), 3)
  assert abs(initializers.spectral_radius(params["w_hh"]) - 0.8) < 1e-5
  assert 0.04 < float(jnp.mean(params["w_hh"] != 0)) < 0.06
  assert float(jnp.max(jnp.abs(params["w_xh"]))) <= 0.3 and float(jnp.max(jnp.abs(params["b"]))) <= 0.1
  with pytest.raises(ValueError, match="leak_rate"):
    esn.Reservoir(10, leak_rate=0.0)
  with pytest.raises(ValueError, match="density"):
    esn.Reservoir(10, density=1.5)


def test_ridge_readout_equals_numpy_ridge_on_reservoir_states():
  with jax.enable_x64(True):
    reservoir = esn.Reservoir(30, spectral_radius=0.9, density=0.3, bias_scaling=0.2, leak_rate=0.6,
                              param_dtype="float64")
    model = esn.ESN(reservoir, washout=20, ridge=1e-3)
    params = reservoir.init(jax.random.key(1), 2)
    xs = jax.random.normal(jax.random.key(2), (150, 2), jnp.float64)
    targets = jnp.stack([jnp.roll(xs[:, 0], 3), xs[:, 1] ** 2], axis=1)
    w_hy, last, hs = model.fit(params, xs, targets)
    states = _numpy_states(params, xs, 0.6)
    np.testing.assert_allclose(hs, states, atol=1e-12)
    np.testing.assert_allclose(last, states[-1], atol=1e-12)
    z = np.concatenate([np.ones((150, 1)), np.asarray(xs), states], axis=1)[20:]
    y = np.asarray(targets)[20:]
    expected = np.linalg.solve(z.T @ z + 1e-3 * np.eye(z.shape[1]), z.T @ y).T
    assert w_hy.shape == (2, 1 + 2 + 30)
    np.testing.assert_allclose(w_hy, expected, rtol=1e-8, atol=1e-10)
    # lambda = 0 with a full-rank design is ordinary least squares
    w_ols = esn.ridge_readout(jnp.asarray(z), jnp.asarray(y), 0.0)
    np.testing.assert_allclose(w_ols, np.linalg.lstsq(z, y, rcond=None)[0].T, rtol=1e-6, atol=1e-8)


def test_generation_feeds_each_output_back_as_the_next_input():
  with jax.enable_x64(True):
    reservoir = esn.Reservoir(50, spectral_radius=0.9, param_dtype="float64")
    model = esn.ESN(reservoir, washout=50, ridge=1e-8)
    params = reservoir.init(jax.random.key(3), 1)
    wave = jnp.sin(0.2 * jnp.arange(400, dtype=jnp.float64))[:, None]
    w_hy, last, _ = model.fit(params, wave[:-1], wave[1:])
    ys = model.generate(params, w_hy, last, wave[-2], 30)
    h, x, manual = np.asarray(last), np.asarray(wave[-2]), []
    for _ in range(30):
      y = np.asarray(w_hy) @ np.concatenate([[1.0], x, h])
      manual.append(y)
      h = np.tanh(np.asarray(params["w_xh"]) @ y + np.asarray(params["w_hh"]) @ h + np.asarray(params["b"]))
      x = y
    np.testing.assert_allclose(ys, np.stack(manual), atol=1e-10)
    future = np.sin(0.2 * np.arange(399, 429))[:, None]      # ys[i] predicts step 399 + i
    assert esn.nrmse(ys, future, variance=0.5) < 1e-3


def test_fit_rejects_a_washout_longer_than_the_data():
  reservoir = esn.Reservoir(8)
  params = reservoir.init(jax.random.key(0), 1)
  with pytest.raises(ValueError, match="longer than the washout"):
    esn.ESN(reservoir, washout=20).fit(params, jnp.zeros((10, 1)), jnp.zeros((10, 1)))


def test_reservoir_params_are_checked_against_its_size():
  reservoir = esn.Reservoir(8)
  params = reservoir.init(jax.random.key(0), 2)
  reservoir.check_params(params)
  with pytest.raises(ValueError, match=r"w_hh has shape \(4, 8\), expected \(8, 8\)"):
    reservoir.check_params({**params, "w_hh": params["w_hh"][:4]})
  with pytest.raises(ValueError, match=r"missing \['b', 'w_hh'\]"):
    reservoir.check_params({"w_xh": params["w_xh"]})


def test_a_reservoir_is_a_cell_that_runs_in_every_layer():
  """The reservoir in rnn, a bidirectional StackedRNN and the Flax CellLayer, named in the registry."""
  from rnn_jax import StackedRNN, make_cell, rnn
  from rnn_jax.flax_modules import CellLayer
  reservoir = make_cell("reservoir", 6, spectral_radius=0.8, leak_rate=0.5)
  assert isinstance(reservoir, esn.Reservoir)
  params = reservoir.init(jax.random.key(1), 3)
  xs = jax.random.normal(jax.random.key(2), (2, 5, 3))
  lengths = jnp.array([5, 3])
  _, ys = rnn(reservoir, params, xs, lengths)
  for t in range(5):  # h_t = (1 - a) h_{t-1} + a tanh(W_xh x_t + W_hh h_{t-1} + b), by hand for example 0
    h = (np.zeros(6) if t == 0 else h)
    h = 0.5 * h + 0.5 * np.tanh(np.asarray(params["w_xh"]) @ np.asarray(xs[0, t]) + np.asarray(params["w_hh"]) @ h
                                + np.asarray(params["b"]))
    np.testing.assert_allclose(ys[0, t], h, atol=1e-5)
  assert float(jnp.abs(ys[1, 3:]).max()) == 0.0
  stack = StackedRNN(reservoir, num_layers=2, bidirectional=True)
  assert stack(stack.init(jax.random.key(3), 3), xs, lengths)[1].shape == (2, 5, 12)
  layer = CellLayer(reservoir)
  variables = layer.init(jax.random.key(4), xs, lengths)
  assert layer.apply(variables, xs, lengths)[1].shape == (2, 5, 6)
