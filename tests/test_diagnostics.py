"""Gradient-flow diagnostics: exact Jacobians through the scan, spectra, exploding-event counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, diagnostics
from rnn_jax.sequence import run_cell


def _linear_rnn(w_hh):
  cell = cells.Elman(2, activation="identity", param_dtype="float64")
  params = cell.init(jax.random.key(0), 3)
  params["w_hh"] = jnp.asarray(w_hh, params["w_hh"].dtype)
  return cell, params


def test_linear_rnn_jacobians_are_powers_of_w_hh():
  with jax.enable_x64(True):
    w_hh = np.array([[0.9, 0.4], [-0.3, 0.7]])
    cell, params = _linear_rnn(w_hh)
    T = 12
    xs = jax.random.normal(jax.random.key(1), (T, 3), jnp.float64)
    jacobians = diagnostics.state_jacobians(cell, params, xs)
    assert jacobians.shape == (T, 2, 2)
    for k in range(T):                      # J[k] = dh_T/dh_{k+1} = W_hh^(T-1-k)
      np.testing.assert_allclose(jacobians[k], np.linalg.matrix_power(w_hh, T - 1 - k), atol=1e-12)
    spectral = diagnostics.jacobian_norms_by_lag(cell, params, xs)
    frobenius = diagnostics.jacobian_norms_by_lag(cell, params, xs, norm="frobenius")
    for lag in range(T):
      power = np.linalg.matrix_power(w_hh, lag)
      assert abs(float(spectral[lag]) - np.linalg.norm(power, 2)) < 1e-12
      assert abs(float(frobenius[lag]) - np.linalg.norm(power, "fro")) < 1e-12


def test_linear_rnn_loss_gradient_is_transposed_power_times_final_state():
  with jax.enable_x64(True):
    w_hh = np.array([[1.1, 0.2], [0.0, 0.5]])
    cell, params = _linear_rnn(w_hh)
    xs = jax.random.normal(jax.random.key(2), (1, 9, 3), jnp.float64)
    norms = diagnostics.loss_gradient_norms_by_lag(cell, params, xs, lambda hs: 0.5 * jnp.sum(hs[:, -1] ** 2))
    _, hs = run_cell(cell, params, xs[0])
    h_T = np.asarray(hs[-1])
    for lag in range(9):                    # dL/dh_k = (W_hh^(T-k))^T h_T
      expected = np.linalg.norm(np.linalg.matrix_power(w_hh, lag).T @ h_T)
      assert abs(float(norms[lag]) - expected) < 1e-10


@pytest.mark.parametrize("cell", [cells.LSTM(5), cells.GRU(5)], ids=lambda c: c.name)
def test_jacobians_match_restarting_the_scan_from_h_k(cell):
  params = cell.init(jax.random.key(3), 2)
  xs = jax.random.normal(jax.random.key(4), (8, 2))
  jacobians = diagnostics.state_jacobians(cell, params, xs)
  carries = []
  carry = cell.initial_carry(params)
  for t in range(8):
    carry, _ = cell.step(params, carry, xs[t])
    carries.append(carry)
  for k in (0, 5):                        # restart after step k+1 and differentiate h_T by h_{k+1}
    def final_hidden(h, k=k):
      start = diagnostics.add_to_hidden(cell, carries[k], h - cell.hidden(carries[k]))
      final, _ = run_cell(cell, params, xs[k + 1:], initial_carry=start)
      return cell.hidden(final)
    expected = jax.jacrev(final_hidden)(cell.hidden(carries[k]))
    np.testing.assert_allclose(jacobians[k], expected, rtol=1e-4, atol=1e-6)


def test_batched_norms_are_the_geometric_mean_over_examples():
  cell = cells.GRU(4)
  params = cell.init(jax.random.key(5), 2)
  xs = jax.random.normal(jax.random.key(6), (2, 10, 2))
  per_example = np.stack([diagnostics.jacobian_norms_by_lag(cell, params, x) for x in xs])
  batched = diagnostics.jacobian_norms_by_lag(cell, params, xs)
  np.testing.assert_allclose(batched, np.exp(np.log(per_example).mean(0)), rtol=1e-5)
  assert abs(float(batched[0]) - 1.0) < 1e-6         # lag 0: ||I||_2 = 1


def test_recurrent_spectrum_of_orthogonal_and_rescaled_weights():
  lstm = cells.LSTM(6, recurrent_init="orthogonal", recurrent_gain=0.5)
  spectrum = diagnostics.recurrent_spectrum(lstm.init(jax.random.key(0), 3)["w_hh"])
  assert spectrum.singular_values.shape == (4, 6)
  np.testing.assert_allclose(spectrum.singular_values, 0.5, rtol=1e-5)
  np.testing.assert_allclose(spectrum.spectral_radius, 0.5, rtol=1e-5)
  elman = cells.Elman(16, spectral_radius=1.5)
  radius = diagnostics.recurrent_spectrum(elman.init(jax.random.key(1), 2)["w_hh"]).spectral_radius
  np.testing.assert_allclose(radius, [1.5], rtol=1e-5)
  with pytest.raises(ValueError, match="square"):
    diagnostics.recurrent_spectrum(np.zeros((5, 3)))


def test_gradient_monitor_counts_norms_above_threshold_and_non_finite():
  monitor = diagnostics.GradientMonitor(threshold=5.0)
  flags = [monitor.record(step, norm) for step, norm in enumerate([1.0, 10.0, math.nan, 3.0, math.inf])]
  assert flags == [False, True, True, False, True]
  summary = monitor.summary()
  assert summary["exploding_events"] == 3 and summary["non_finite_events"] == 2
  assert summary["first_non_finite_step"] == 2 and summary["max_grad_norm"] == 10.0
  unclipped = diagnostics.GradientMonitor(threshold=None)
  for step, norm in enumerate([1e6, math.nan]):
    unclipped.record(step, norm)
  assert unclipped.exploding_count == 1
  with pytest.raises(ValueError, match="threshold"):
    diagnostics.GradientMonitor(threshold=0.0)
