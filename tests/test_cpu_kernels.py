"""The fused CPU kernels (rnn_jax.lstm_kernel, gru_kernel, elman_kernel): same numbers as the
lax.scan path, used where they apply.

Every check runs the same model with the kernel and with ``jax.grad`` through
``lax.scan`` (``grad="autodiff"``), which tests/test_bptt.py, test_torch_parity.py
and test_flax_parity.py tie to numpy, PyTorch and Flax, and the forward calls are
checked against the equations in numpy. H is a multiple of the vector width (16
floats with AVX-512) so that the kernels run. The kernels cut N rows into blocks of at most 6
rows, as even as they can be (13 = 5 + 4 + 4, 7 = 4 + 3, 32 = 6 + 6 + 5 + 5 + 5 + 5); the
numpy checks run every block height from 1 to 6, and the lengths include 0 and T.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, StackedRNN, bptt, elman_kernel, gru_kernel, lstm_kernel, rnn, run_cell
from rnn_jax.sequence import ScanOptions
from rnn_jax.cells import ACTIVATIONS, LSTMState

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler to build the kernel with")

B, T, F = 5, 6, 3
LENGTHS = np.array([6, 2, 0, 5, 1])


@pytest.fixture(autouse=True)
def _kernel_on():
  lstm_kernel.set_enabled(True)
  yield
  lstm_kernel.set_enabled(True)


def _hidden_sizes():
  width = lstm_kernel.vector_width()
  return (2 * width, 3 * width)


def _inputs(H, dtype=jnp.float32, seed=0, batch=B):
  cell = LSTM(H, forget_bias=1.0)
  key_p, key_x, key_h, key_c = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = jax.tree_util.tree_map(lambda p: p.astype(dtype), cell.init(key_p, F))
  xs = jax.random.normal(key_x, (batch, T, F), dtype)
  carry = LSTMState(h=0.5 * jax.random.normal(key_h, (batch, H), dtype),
                    c=0.5 * jax.random.normal(key_c, (batch, H), dtype))
  return cell, params, xs, carry


def _loss(cell, params, carry, xs, lengths, backward):
  """Both directions, every output and the final carries, with uneven weights."""
  total = 0.0
  for reverse in (False, True):
    final, ys = rnn(cell, params, xs, lengths, initial_carry=carry, reverse=reverse,
                    options=ScanOptions(grad=backward))
    weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
    total += jnp.sum(weights * ys ** 2) + jnp.sum(jnp.sin(3.0 * final.h)) + jnp.sum(jnp.sin(2.0 * final.c))
  return total


def test_kernel_is_built_and_runs_the_default_lstm_path():
  assert lstm_kernel.available(), lstm_kernel.unavailable_reason()
  cell, params, xs, carry = _inputs(_hidden_sizes()[0])
  text = jax.jit(jax.grad(lambda p: _loss(cell, p, carry, xs, LENGTHS, "auto"))).lower(params).as_text()
  assert lstm_kernel.FORWARD_TARGET in text and lstm_kernel.BACKWARD_TARGET in text


@pytest.mark.parametrize("which, batch", [(0, B), (1, B), (1, 13)])
def test_loss_and_gradients_equal_autodiff_through_scan(which, batch):
  cell, params, xs, carry = _inputs(_hidden_sizes()[which], batch=batch)
  lengths = np.resize(LENGTHS, batch)
  grad = jax.jit(jax.value_and_grad(_loss, argnums=(1, 2, 3)), static_argnums=(0, 5))
  loss_kernel, grads_kernel = grad(cell, params, carry, xs, lengths, "manual")
  loss_scan, grads_scan = grad(cell, params, carry, xs, lengths, "autodiff")
  np.testing.assert_allclose(loss_kernel, loss_scan, rtol=1e-6)
  for kernel_leaf, scan_leaf in zip(jax.tree_util.tree_leaves(grads_kernel), jax.tree_util.tree_leaves(grads_scan)):
    scale = float(jnp.max(jnp.abs(scan_leaf)))
    assert float(jnp.max(jnp.abs(kernel_leaf - scan_leaf))) <= 1e-5 * max(scale, 1.0)


def _numpy_lstm(a, w_hh, h, c, mask, reverse):
  """The forward equations in numpy, float64: a [T, N, 4H] -> hs, cs [T, N, H]."""
  sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))
  hs, cs = np.zeros(a.shape[:2] + h.shape[-1:]), np.zeros(a.shape[:2] + h.shape[-1:])
  for t in (reversed(range(a.shape[0])) if reverse else range(a.shape[0])):
    i, f, g, o = np.split(a[t] + h @ w_hh.T, 4, axis=-1)
    c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h_new = sigmoid(o) * np.tanh(c_new)
    valid = mask[t][:, None]
    h, c = np.where(valid, h_new, h), np.where(valid, c_new, c)
    hs[t], cs[t] = h, c
  return hs, cs


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 7, 32])
def test_forward_equals_the_equations_in_numpy(reverse, batch):
  """Blocks of 1, 2, 4 + 3, and 6 + 6 + 5 + 5 + 5 + 5 rows: every block height."""
  H = _hidden_sizes()[1]
  rng = np.random.default_rng(1)
  a = rng.normal(size=(T, batch, 4 * H)).astype(np.float32)
  w_hh = (0.3 * rng.normal(size=(4 * H, H))).astype(np.float32)
  h0, c0 = rng.normal(size=(2, batch, H)).astype(np.float32)
  mask = np.arange(T)[:, None] < np.resize(LENGTHS, batch)[None, :]
  hs, cs, gates = lstm_kernel.lstm_forward(jnp.asarray(a), jnp.asarray(w_hh), jnp.asarray(h0), jnp.asarray(c0),
                                           jnp.asarray(mask), reverse=reverse)
  hs_ref, cs_ref = _numpy_lstm(a.astype(np.float64), w_hh.astype(np.float64), h0, c0, mask, reverse)
  np.testing.assert_allclose(hs, hs_ref, atol=2e-6)
  np.testing.assert_allclose(cs, cs_ref, atol=5e-6)
  assert gates.shape == (T, batch, 4 * H)
  hs_only, c_last, none = lstm_kernel.lstm_forward(jnp.asarray(a), jnp.asarray(w_hh), jnp.asarray(h0),
                                                   jnp.asarray(c0), jnp.asarray(mask), reverse=reverse,
                                                   save_gates=False)
  np.testing.assert_array_equal(hs_only, hs)  # inference: hs and the final cell state alone
  np.testing.assert_array_equal(c_last, cs[0 if reverse else -1])
  assert none is None


def test_activations_saturate_at_large_inputs_and_pass_nan_on():
  """A pre-activation of +-1e4 saturates the gates exactly (sigmoid 0 or 1, tanh -1 or 1, no inf or
  nan from the exponential), and a nan in a_t reaches h_t: a diverging run shows nan, not a clamp."""
  width = lstm_kernel.vector_width()
  H, N = width, 2
  zeros = jnp.zeros((N, H), jnp.float32)
  for sign in (1.0, -1.0):
    a = jnp.full((1, N, 4 * H), sign * 1e4, jnp.float32)
    hs, cs, gates = lstm_kernel.lstm_forward(a, jnp.zeros((4 * H, H)), zeros, zeros)
    expected = np.tile(np.repeat([0.5 + sign / 2, 0.5 + sign / 2, sign, 0.5 + sign / 2], H), (N, 1))
    np.testing.assert_array_equal(gates[0], expected)
    np.testing.assert_allclose(hs[0], np.tanh(1.0) if sign > 0 else 0.0, rtol=1e-6)
    h_gru, _ = gru_kernel.gru_forward(a[..., :3 * H], jnp.zeros((3 * H, H)), jnp.zeros((H,)), zeros)
    np.testing.assert_array_equal(h_gru[0], np.zeros((N, H)) if sign > 0 else -np.ones((N, H)))
    h_elman = elman_kernel.elman_forward(a[..., :H], jnp.zeros((H, H)), zeros)
    np.testing.assert_array_equal(h_elman[0], sign * np.ones((N, H)))
  a = jnp.zeros((2, N, 4 * H), jnp.float32).at[0, 0, 0].set(jnp.nan)
  hs, _, _ = lstm_kernel.lstm_forward(a, jnp.ones((4 * H, H)), zeros, zeros)
  assert np.isnan(hs[0, 0, 0]) and np.all(np.isnan(hs[1, 0])) and not np.any(np.isnan(hs[:, 1]))
  h_gru, _ = gru_kernel.gru_forward(a[..., :3 * H], jnp.ones((3 * H, H)), jnp.zeros((H,)), zeros)
  assert np.isnan(h_gru[0, 0, 0]) and not np.any(np.isnan(h_gru[:, 1]))
  h_elman = elman_kernel.elman_forward(a[..., :H], jnp.ones((H, H)), zeros)
  assert np.isnan(h_elman[0, 0, 0]) and np.all(np.isnan(h_elman[1, 0])) and not np.any(np.isnan(h_elman[:, 1]))


def test_several_batch_axes_and_vmap():
  """a: [T, 2, 3, 4H] runs as N = 6 rows; vmap over the kernel equals a loop over the mapped axis."""
  H = _hidden_sizes()[0]
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(T, 2, 3, 4 * H)), jnp.float32)
  w_hh = jnp.asarray(0.3 * rng.normal(size=(4 * H, H)), jnp.float32)
  zeros = jnp.zeros((2, 3, H), jnp.float32)
  hs, cs, _ = lstm_kernel.lstm_forward(a, w_hh, zeros, zeros)
  flat, _, _ = lstm_kernel.lstm_forward(a.reshape(T, 6, 4 * H), w_hh, zeros.reshape(6, H), zeros.reshape(6, H))
  np.testing.assert_array_equal(hs.reshape(T, 6, H), flat)

  cell = LSTM(H)
  params = cell.init(jax.random.PRNGKey(0), F)
  xs = jnp.asarray(rng.normal(size=(4, B, T, F)), jnp.float32)
  per_group = lambda x: jnp.sum(rnn(cell, params, x, LENGTHS)[1] ** 2)
  mapped = jax.vmap(jax.grad(lambda p, x: jnp.sum(rnn(cell, p, x, LENGTHS)[1] ** 2)), in_axes=(None, 0))(params, xs)
  for g in range(4):
    looped = jax.grad(lambda p: jnp.sum(rnn(cell, p, xs[g], LENGTHS)[1] ** 2))(params)
    for m, l in zip(jax.tree_util.tree_leaves(mapped), jax.tree_util.tree_leaves(looped)):
      np.testing.assert_allclose(m[g], l, atol=1e-5)
  assert np.isfinite(float(per_group(xs[0])))


def test_vmap_of_run_cell_is_one_kernel_call_and_equals_scan():
  """vmap folds the mapped axis into the kernel's rows (one call, not one per example); with the
  weights mapped too (an ensemble), it runs one call per member. Both equal the scan path."""
  H = _hidden_sizes()[0]
  cell = LSTM(H)
  params = cell.init(jax.random.PRNGKey(0), F)
  xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, F))

  def loss(p, x, length):
    carry, ys = run_cell(cell, p, x, length)
    return jnp.sum(ys ** 2) + jnp.sum(carry.c ** 2)

  batch_loss = lambda p: jax.vmap(loss, (None, 0, 0))(p, xs, LENGTHS).sum()
  text = jax.jit(jax.grad(batch_loss)).lower(params).as_text()
  assert text.count(lstm_kernel.FORWARD_TARGET) == 1 and text.count(lstm_kernel.BACKWARD_TARGET) == 1
  grads_kernel = jax.grad(batch_loss)(params)
  ensemble = jax.vmap(lambda key: cell.init(key, F))(jax.random.split(jax.random.PRNGKey(2), 3))
  ensemble_kernel = jax.vmap(lambda p: rnn(cell, p, xs, LENGTHS)[1])(ensemble)
  lstm_kernel.set_enabled(False)
  grads_scan = jax.grad(batch_loss)(params)
  ensemble_scan = jax.vmap(lambda p: rnn(cell, p, xs, LENGTHS)[1])(ensemble)
  for k, s in zip(jax.tree_util.tree_leaves(grads_kernel), jax.tree_util.tree_leaves(grads_scan)):
    np.testing.assert_allclose(k, s, atol=1e-5)
  np.testing.assert_allclose(ensemble_kernel, ensemble_scan, atol=1e-5)


def test_stacked_bidirectional_lstm_uses_the_kernel_and_matches_scan():
  H = _hidden_sizes()[0]
  model = StackedRNN(LSTM(H), num_layers=2, bidirectional=True)
  params = model.init(jax.random.PRNGKey(3), F)
  xs = jax.random.normal(jax.random.PRNGKey(4), (B, T, F))
  loss = lambda p, backward: jnp.sum(jnp.tanh(
      dataclasses.replace(model, scan=ScanOptions(grad=backward))(p, xs, LENGTHS)[1]))
  text = jax.jit(jax.grad(loss), static_argnums=1).lower(params, "auto").as_text()
  assert text.count(lstm_kernel.BACKWARD_TARGET) >= 4
  grads_kernel = jax.grad(loss)(params, "auto")
  grads_scan = jax.grad(loss)(params, "autodiff")
  for k, s in zip(jax.tree_util.tree_leaves(grads_kernel), jax.tree_util.tree_leaves(grads_scan)):
    np.testing.assert_allclose(k, s, atol=1e-5)


def test_kernel_is_skipped_where_it_does_not_apply():
  """Switched off, not float32, or H not a multiple of the vector width: the lax.scan path, no custom call."""
  H = _hidden_sizes()[0]
  cell, params, xs, carry = _inputs(H)
  lower = lambda c, p, x, h0: jax.jit(lambda p: _loss(c, p, h0, x, LENGTHS, "auto")).lower(p).as_text()
  lstm_kernel.set_enabled(False)
  assert lstm_kernel.FORWARD_TARGET not in lower(cell, params, xs, carry)
  lstm_kernel.set_enabled(True)
  odd_cell, odd_params, odd_xs, odd_carry = _inputs(H + 1)
  assert lstm_kernel.FORWARD_TARGET not in lower(odd_cell, odd_params, odd_xs, odd_carry)
  assert bptt.kernel_choice(cell, params, xs, carry).kernel == "lstm_cpu"
  half = lambda x: x.astype(jnp.bfloat16)
  assert bptt.kernel_choice(cell, {"w_hh": half(params["w_hh"])}, half(xs), LSTMState(half(carry.h), half(carry.c))).kernel is None


def test_wrong_shapes_are_refused_with_names():
  H = _hidden_sizes()[0]
  a = jnp.zeros((T, B, 4 * H), jnp.float32)
  zeros = jnp.zeros((B, H), jnp.float32)
  with pytest.raises(Exception, match=r"W_hh has shape \[%d, %d\], expected \[%d, %d\]" % (4 * H, H + 1, 4 * H, H)):
    jax.block_until_ready(lstm_kernel.lstm_forward(a, jnp.zeros((4 * H, H + 1), jnp.float32), zeros, zeros))


def test_failed_build_warns_and_falls_back_to_scan(tmp_path):
  """No working compiler: a RuntimeWarning names each failure, kernel_choice gives the reason, the
  LSTM still trains through lax.scan and the GRU and Elman cells run there."""
  script = textwrap.dedent("""
      import warnings
      import jax, jax.numpy as jnp
      from rnn_jax import GRU, LSTM, Elman, bptt, elman_kernel, gru_kernel, lstm_kernel, rnn
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cell in (LSTM(32), GRU(32), Elman(32)):
          params = cell.init(jax.random.PRNGKey(0), 3)
          xs = jnp.ones((2, 4, 3))
          carry = jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, (2,) + c.shape),
                                         cell.initial_carry(params))
          choice = bptt.kernel_choice(cell, params, xs, carry)
          assert choice.kernel is None and "unavailable" in choice.reason, choice
          if isinstance(cell, LSTM):
            grads = jax.grad(lambda p: jnp.sum(rnn(cell, p, xs)[1]))(params)
            assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
          assert bool(jnp.all(jnp.isfinite(rnn(cell, params, xs)[1])))
      for module in (lstm_kernel, gru_kernel, elman_kernel):
        assert not module.LIBRARY.available()
        assert "failed" in module.LIBRARY.unavailable_reason()
      messages = [str(w.message) for w in caught]
      assert sum("kernel is unavailable" in m for m in messages) == 3, messages
      print("fell back")
  """)
  env = {**os.environ, "CXX": "false", "RNN_JAX_KERNEL_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "fell back" in done.stdout


def test_empty_sequence_keeps_the_carry():
  """T = 0 stays on lax.scan: hs is [0, B, H] and the final carry is the initial one."""
  H = _hidden_sizes()[0]
  cell, params, _, carry = _inputs(H)
  final, hs = bptt.manual_scan(cell, params, jnp.zeros((0, B, 4 * H), jnp.float32), carry)
  assert hs.shape == (0, B, H)
  np.testing.assert_array_equal(final.h, carry.h)
  np.testing.assert_array_equal(final.c, carry.c)


# ---- GRU and Elman -----------------------------------------------------------------

RECURRENT_CELLS = {
    "gru": lambda H: GRU(H),
    "gru_reset_before": lambda H: GRU(H, reset_after=False),
    **{f"elman_{name}": (lambda H, name=name: Elman(H, activation=name)) for name in ACTIVATIONS},
}
SIGMOID = lambda v: 1.0 / (1.0 + np.exp(-v))
NUMPY_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0.0), "sigmoid": SIGMOID,
                     "identity": lambda v: v}


def _numpy_gru(a, w_hh, b_hn, h0, mask, reverse, reset_after, d_hs, dh_last):
  """The GRU equations in numpy, float64, a [T, N, 3H] (b included): the forward hs [T, N, H] and,
  for dL/dhs = d_hs and dL/dh_T = dh_last, the backward (da [T, N, 3H], du_n [T, N, H], dL/dh0)."""
  H = h0.shape[-1]
  order = list(reversed(range(a.shape[0]))) if reverse else list(range(a.shape[0]))
  hs, saved, h = np.zeros(a.shape[:2] + (H,)), {}, h0
  for t in order:
    a_r, a_z, a_n = np.split(a[t], 3, axis=-1)
    u_r, u_z, u_n = np.split(h @ w_hh.T, 3, axis=-1)
    r, z = SIGMOID(a_r + u_r), SIGMOID(a_z + u_z)
    n = np.tanh(a_n + r * (u_n + b_hn)) if reset_after else np.tanh(a_n + (r * h) @ w_hh[2 * H:].T + b_hn)
    saved[t] = (r, z, n, u_n + b_hn, h)
    h = np.where(mask[t][:, None], (1.0 - z) * n + z * h, h)
    hs[t] = h
  da, du_n, dh = np.zeros(a.shape), np.zeros(hs.shape), dh_last
  for t in reversed(order):
    r, z, n, s, h_prev = saved[t]
    dh_t = dh + d_hs[t]
    da_z = dh_t * (h_prev - n) * z * (1.0 - z)
    da_n = dh_t * (1.0 - z) * (1.0 - n * n)
    if reset_after:
      da_r, du = da_n * s * r * (1.0 - r), da_n * r
      dh_prev = z * dh_t + np.concatenate([da_r, da_z, du], axis=-1) @ w_hh
    else:
      e = da_n @ w_hh[2 * H:]
      da_r, du = e * h_prev * r * (1.0 - r), da_n
      dh_prev = z * dh_t + r * e + np.concatenate([da_r, da_z], axis=-1) @ w_hh[:2 * H]
    valid = mask[t][:, None]
    da[t] = np.where(valid, np.concatenate([da_r, da_z, da_n], axis=-1), 0.0)
    du_n[t] = np.where(valid, du, 0.0)
    dh = np.where(valid, dh_prev, dh_t)
  return hs, (da, du_n, dh)


def _numpy_elman(a, w_hh, h0, mask, reverse, activation, d_hs, dh_last):
  """The Elman equations in numpy, float64, a [T, N, H] (b included): the forward hs and the
  backward (dz = dL/da [T, N, H], dL/dh0)."""
  derivative = {"tanh": lambda h: 1.0 - h * h, "relu": lambda h: (h > 0).astype(h.dtype),
                "sigmoid": lambda h: h * (1.0 - h), "identity": np.ones_like}[activation]
  order = list(reversed(range(a.shape[0]))) if reverse else list(range(a.shape[0]))
  hs, h = np.zeros(a.shape), h0
  for t in order:
    h = np.where(mask[t][:, None], NUMPY_ACTIVATIONS[activation](a[t] + h @ w_hh.T), h)
    hs[t] = h
  dz, dh = np.zeros(a.shape), dh_last
  for t in reversed(order):
    dh_t = dh + d_hs[t]
    valid = mask[t][:, None]
    dz[t] = np.where(valid, dh_t * derivative(hs[t]), 0.0)
    dh = np.where(valid, dz[t] @ w_hh, dh_t)
  return hs, (dz, dh)


def _gru_and_elman_cases():
  """(H, N, reverse, variant) for the numpy checks: every variant in both directions, each batch
  block height of at most 6 rows (batches 32, 5, 4, 3, 2, 7 and 1: blocks of 6 and 5, 5, 4, 3, 2,
  4 and 3, and 1) and H of 3 and 11 vectors (groups of 1-4 vectors of units), about one call per
  case."""
  width = lstm_kernel.vector_width()
  variants = [("gru", True), ("gru", False)] + [("elman", name) for name in ACTIVATIONS]
  batches = (32, 5, 4, 3, 2, 7, 1)
  cases = []
  for i, (variant, reverse) in enumerate((v, r) for v in variants for r in (False, True)):
    cases.append((3 * width, batches[i % len(batches)], reverse, variant))
  cases += [(11 * width, 7, True, ("gru", True)), (11 * width, 8, False, ("gru", False)),
            (11 * width, 9, False, ("elman", "tanh"))]
  return cases


def test_gru_and_elman_kernels_equal_the_equations_in_numpy():
  """Forward and backward calls of both GRU variants and every Elman activation against numpy:
  masks with lengths 0..T, both directions, every block height; without saved gates
  (inference) the GRU's hs is the same."""
  assert set(NUMPY_ACTIVATIONS) == set(ACTIVATIONS)
  rng = np.random.default_rng(5)
  f64 = lambda x: np.asarray(x, np.float64)
  for H, batch, reverse, (kind, option) in _gru_and_elman_cases():
    label = f"{kind} {option} H={H} N={batch} reverse={reverse}"
    G = 3 * H if kind == "gru" else H
    mask = np.arange(T)[:, None] < np.resize(LENGTHS, batch)[None, :]
    a = rng.normal(size=(T, batch, G)).astype(np.float32)
    w_hh = (0.3 * rng.normal(size=(G, H)) / np.sqrt(H / 16)).astype(np.float32)
    b, b_hn = rng.normal(size=G).astype(np.float32), rng.normal(size=H).astype(np.float32)
    h0, dh_last = rng.normal(size=(2, batch, H)).astype(np.float32)
    d_hs = rng.normal(size=(T, batch, H)).astype(np.float32)
    as_jax = lambda *xs: [jnp.asarray(x) for x in xs]
    if kind == "gru":
      hs, gates = gru_kernel.gru_forward(*as_jax(a, w_hh, b_hn, h0, mask), bias=jnp.asarray(b), reverse=reverse,
                                         reset_after=option)
      hs_only, none = gru_kernel.gru_forward(*as_jax(a, w_hh, b_hn, h0, mask), bias=jnp.asarray(b),
                                             reverse=reverse, reset_after=option, save_gates=False)
      np.testing.assert_array_equal(hs_only, hs, err_msg=label)
      assert none is None and gates.shape == (T, batch, gru_kernel.saved_gates(option) * H)
      da, du_n, dh0 = gru_kernel.gru_backward(gates, hs, *as_jax(h0, w_hh, d_hs, dh_last, mask), reverse=reverse,
                                              reset_after=option)
      hs_ref, (da_ref, du_ref, dh0_ref) = _numpy_gru(f64(a + b), f64(w_hh), f64(b_hn), f64(h0), mask, reverse,
                                                     option, f64(d_hs), f64(dh_last))
      outputs, references = (hs, da, dh0) + ((du_n,) if option else ()), (hs_ref, da_ref, dh0_ref, du_ref)
      assert (du_n is None) == (not option)
    else:
      hs = elman_kernel.elman_forward(*as_jax(a, w_hh, h0, mask), bias=jnp.asarray(b), reverse=reverse,
                                      activation=option)
      dz, dh0 = elman_kernel.elman_backward(hs, *as_jax(w_hh, d_hs, dh_last, mask), reverse=reverse,
                                            activation=option)
      hs_ref, (dz_ref, dh0_ref) = _numpy_elman(f64(a + b), f64(w_hh), f64(h0), mask, reverse, option, f64(d_hs),
                                               f64(dh_last))
      outputs, references = (hs, dz, dh0), (hs_ref, dz_ref, dh0_ref)
    for output, reference in zip(outputs, references):
      scale = max(1.0, float(np.abs(reference).max()))  # relu and identity grow past 1
      np.testing.assert_allclose(output, reference, atol=5e-6 * scale, err_msg=label)


def _recurrent_inputs(cell, seed=0, batch=B):
  key_p, key_x, key_h = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = cell.init(key_p, F)
  xs = jax.random.normal(key_x, (batch, T, F))
  carry = 0.5 * jax.random.normal(key_h, (batch, cell.hidden_size))
  return params, xs, carry


def _recurrent_loss(cell, params, carry, xs, lengths, backward, batches):
  """Both directions over sub-batches of the given sizes (row-block remainders), every output and
  the final carries, with uneven weights."""
  total, start = 0.0, 0
  for size in batches:
    part = slice(start, start + size)
    start += size
    for reverse in (False, True):
      final, ys = rnn(cell, params, xs[part], lengths[part], initial_carry=carry[part], reverse=reverse,
                      options=ScanOptions(grad=backward))
      weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
      total += jnp.sum(weights * ys ** 2) + jnp.sum(jnp.sin(3.0 * final))
  return total


def _assert_gradients_match(cell, hidden_multiple, batches):
  cell = cell(hidden_multiple * lstm_kernel.vector_width())
  batch = sum(batches)
  params, xs, carry = _recurrent_inputs(cell, batch=batch)
  lengths = np.resize(LENGTHS, batch)
  assert bptt.kernel_choice(cell, params, xs, carry).kernel is not None
  grad = jax.jit(jax.value_and_grad(_recurrent_loss, argnums=(1, 2, 3)), static_argnums=(0, 5, 6))
  loss_kernel, grads_kernel = grad(cell, params, carry, xs, lengths, "manual", batches)
  loss_scan, grads_scan = grad(cell, params, carry, xs, lengths, "autodiff", batches)
  np.testing.assert_allclose(loss_kernel, loss_scan, rtol=1e-5, atol=1e-5)  # float32 sums of ~10^4 terms
  for kernel_leaf, scan_leaf in zip(jax.tree_util.tree_leaves(grads_kernel), jax.tree_util.tree_leaves(grads_scan)):
    scale = float(jnp.max(jnp.abs(scan_leaf)))
    assert float(jnp.max(jnp.abs(kernel_leaf - scan_leaf))) <= 1e-5 * max(scale, 1.0)


@pytest.mark.parametrize("name", ["gru", "gru_reset_before", "elman_tanh"])
def test_gru_and_elman_gradients_equal_autodiff_through_scan(name):
  """Loss and every gradient (params, initial carry) to 1e-5, lengths 0..T, both directions, 13 rows
  (blocks of 5, 4 and 4); the other activations' backward is checked against numpy above."""
  _assert_gradients_match(RECURRENT_CELLS[name], 3, (13,))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECURRENT_CELLS))
@pytest.mark.parametrize("hidden_multiple", [2, 11, 16])
def test_gru_and_elman_gradients_for_every_row_and_vector_remainder(name, hidden_multiple):
  _assert_gradients_match(RECURRENT_CELLS[name], hidden_multiple, (12, 5, 4, 3, 2, 1))


def test_gru_and_elman_kernels_run_by_default_and_vmap_to_one_call():
  """The default path of a vmapped run_cell is one forward and one backward call (the mapped axis
  joins the rows), for both GRU variants and the Elman cell; its gradients equal the scan path's."""
  width = lstm_kernel.vector_width()
  for cell in (GRU(2 * width), GRU(2 * width, reset_after=False), Elman(2 * width)):
    module = gru_kernel if isinstance(cell, GRU) else elman_kernel
    params, xs, _ = _recurrent_inputs(cell)

    def loss(p, x, length):
      final, ys = run_cell(cell, p, x, length)
      return jnp.sum(ys ** 2) + jnp.sum(jnp.sin(final))

    batch_loss = lambda p: jax.vmap(loss, (None, 0, 0))(p, xs, LENGTHS).sum()
    text = jax.jit(jax.grad(batch_loss)).lower(params).as_text()
    assert text.count(module.FORWARD_TARGET) == 1 and text.count(module.BACKWARD_TARGET) == 1, cell
    if cell.reset_after if isinstance(cell, GRU) else False:
      grads_kernel = jax.grad(batch_loss)(params)
      lstm_kernel.set_enabled(False)
      grads_scan = jax.grad(batch_loss)(params)
      lstm_kernel.set_enabled(True)
      for k, s in zip(jax.tree_util.tree_leaves(grads_kernel), jax.tree_util.tree_leaves(grads_scan)):
        np.testing.assert_allclose(k, s, atol=1e-5)


def test_inference_runs_the_forward_calls_without_saved_gates():
  """Without a gradient every kernel runs its forward call alone, saving no gates (the Elman forward
  saves nothing in either case); a gradient saves them."""
  width = lstm_kernel.vector_width()
  for cell, module in ((LSTM(width), lstm_kernel), (GRU(width), gru_kernel),
                       (GRU(width, reset_after=False), gru_kernel), (Elman(width), elman_kernel)):
    params = cell.init(jax.random.PRNGKey(0), F)
    xs = jnp.ones((B, T, F))
    forward = lambda p: jnp.sum(rnn(cell, p, xs, LENGTHS)[1])
    inference = jax.jit(forward).lower(params).as_text()
    training = jax.jit(jax.grad(forward)).lower(params).as_text()
    assert inference.count(module.FORWARD_TARGET) == 1 and module.BACKWARD_TARGET not in inference
    assert module.BACKWARD_TARGET in training
    if module is not elman_kernel:
      assert "save_gates = 0" in inference and "save_gates = 1" in training, cell


def test_kernel_choice_says_why_gru_and_elman_stay_on_scan():
  width = lstm_kernel.vector_width()
  gru = GRU(2 * width)
  params, xs, carry = _recurrent_inputs(gru, batch=B)
  assert bptt.kernel_choice(gru, params, xs, carry) == ("gru_cpu", "float32 GRU (reset_after) on CPU")
  odd = GRU(2 * width + 1)
  odd_params, odd_xs, odd_carry = _recurrent_inputs(odd, batch=B)
  assert f"multiple of {width}" in bptt.kernel_choice(odd, odd_params, odd_xs, odd_carry).reason
  half = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), tree)
  assert "float32 only" in bptt.kernel_choice(gru, half(params), half(xs), half(carry)).reason
  assert "dtype='bfloat16'" in bptt.kernel_choice(GRU(2 * width, dtype="bfloat16"), params, xs, carry).reason

  class Leaky(Elman):
    def recurrence_saving(self, params, h_prev, a_t):
      h_t, _, saved = super().recurrence_saving(params, h_prev, a_t)
      h_t = 0.5 * (h_t + h_prev)
      return h_t, h_t, saved

  leaky = Leaky(2 * width)
  choice = bptt.kernel_choice(leaky, leaky.init(jax.random.PRNGKey(0), F), xs, carry)
  assert choice.kernel is None and "redefines the Elman recurrence" in choice.reason
  lstm_kernel.set_enabled(False)
  assert "switched off" in bptt.kernel_choice(gru, params, xs, carry).reason


def test_forward_mode_through_the_gru_and_elman_kernel_paths():
  """jax.jvp goes through the default path (the kernels give way to the scan under forward mode)
  and equals the autodiff path."""
  for cell in (GRU(lstm_kernel.vector_width()), Elman(lstm_kernel.vector_width())):
    params, xs, _ = _recurrent_inputs(cell, batch=2)
    loss = lambda p, backward: jnp.sum(jnp.tanh(
        rnn(cell, p, xs, LENGTHS[:2], options=ScanOptions(grad=backward))[1]))
    tangent_auto = jax.jvp(lambda p: loss(p, "auto"), (params,), (params,))[1]
    tangent_ref = jax.jvp(lambda p: loss(p, "autodiff"), (params,), (params,))[1]
    np.testing.assert_allclose(float(tangent_auto), float(tangent_ref), rtol=1e-5)


@pytest.mark.slow
def test_stacked_bidirectional_gru_uses_the_kernel_and_matches_scan():
  H = _hidden_sizes()[0]
  model = StackedRNN(GRU(H, reset_after=False), num_layers=2, bidirectional=True)
  params = model.init(jax.random.PRNGKey(3), F)
  xs = jax.random.normal(jax.random.PRNGKey(4), (B, T, F))
  loss = lambda p, backward: jnp.sum(jnp.tanh(
      dataclasses.replace(model, scan=ScanOptions(grad=backward))(p, xs, LENGTHS)[1]))
  text = jax.jit(jax.grad(loss), static_argnums=1).lower(params, "auto").as_text()
  assert text.count(gru_kernel.BACKWARD_TARGET) >= 4
  grads_kernel = jax.grad(loss)(params, "auto")
  grads_scan = jax.grad(loss)(params, "autodiff")
  for k, s in zip(jax.tree_util.tree_leaves(grads_kernel), jax.tree_util.tree_leaves(grads_scan)):
    np.testing.assert_allclose(k, s, atol=1e-5)


def test_gru_and_elman_wrong_shapes_are_refused_with_names():
  H = _hidden_sizes()[0]
  zeros = jnp.zeros((B, H), jnp.float32)
  with pytest.raises(Exception, match=r"gru kernel: b_hn has shape \[%d\], expected \[%d\]" % (H + 1, H)):
    jax.block_until_ready(gru_kernel.gru_forward(jnp.zeros((T, B, 3 * H)), jnp.zeros((3 * H, H)),
                                                 jnp.zeros((H + 1,)), zeros))
  expected = r"elman kernel: W_hh has shape \[%d, %d\], expected \[%d, %d\]" % (H, 2 * H, H, H)
  with pytest.raises(Exception, match=expected):
    jax.block_until_ready(elman_kernel.elman_forward(jnp.zeros((T, B, H)), jnp.zeros((H, 2 * H)), zeros))
  with pytest.raises(ValueError, match="activation must be one of"):
    elman_kernel.elman_forward(jnp.zeros((T, B, H)), jnp.zeros((H, H)), zeros, activation="softplus")


def test_weight_gradients_of_the_lstm_kernel_are_one_matmul():
  """Under the LSTM kernel, dW_hh and dW_xh come from ONE matmul of da with [h_(t-1), x_t]
  (``bptt.projected_manual_scan``); the GRU (whose dW_hn reads du_n), the Elman cell (where it
  measured slower) and the peephole LSTM keep two."""
  H = _hidden_sizes()[0]
  for cell in (LSTM(H),):
    params = cell.init(jax.random.PRNGKey(0), F)
    xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, F))
    assert bptt.fuses_input_gradient(cell, params, jnp.swapaxes(xs, 0, 1), cell.initial_carry(params))
    loss = lambda p, x: jnp.sum(jnp.sin(rnn(cell, p, x, LENGTHS)[1]))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile().as_text()
    shapes = re.findall(r"= f32\[([0-9,]+)\]\{[0-9,]+\} dot\(", compiled)
    assert sum(shape in (f"{H + F},{cell.num_gates * H}", f"{cell.num_gates * H},{H + F}") for shape in shapes) == 1, shapes
  elman = Elman(H)
  assert not bptt.fuses_input_gradient(elman, elman.init(jax.random.PRNGKey(0), F), jnp.zeros((T, B, F)),
                                       jnp.zeros((B, H)))
  gru = GRU(H)
  gru_params = gru.init(jax.random.PRNGKey(0), F)
  assert not bptt.fuses_input_gradient(gru, gru_params, jnp.zeros((T, B, F)), jnp.zeros((B, H)))
  assert not bptt.fuses_input_gradient(LSTM(H, peephole=True), LSTM(H, peephole=True).init(jax.random.PRNGKey(0), F),
                                       jnp.zeros((T, B, F)), LSTMState(jnp.zeros((B, H)), jnp.zeros((B, H))))


def _entry_instructions(compiled_text: str) -> dict:
  """{name: line} for the instructions of the compiled module's entry computation."""
  entry = compiled_text.split("\nENTRY ", 1)[1].split("\n}", 1)[0]
  found = {}
  for line in entry.splitlines()[1:]:
    match = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = ", line)
    if match:
      found[match.group(1)] = line
  return found


def _operands(line: str) -> list:
  return re.findall(r"(%[\w.\-]+)", line.split(" = ", 1)[1])


def _is_copy_of_hidden_states(line: str, rows: int, H: int) -> bool:
  """A copy or transpose (alone, or a loop fusion named for one) whose f32 result is hs again,
  [rows, H] or [B, T, H] in some memory order: a change of layout and nothing else. (The GRU's
  and LSTM's weight gradients transpose h to [H, rows] on purpose: bptt.sum_outer.)"""
  name, op = line.split(" = ", 1)
  match = re.match(r"\s*f32\[([0-9,]*)\]\{[0-9,]*\} ([\w-]+)\(", op)
  if match is None:
    return False
  dims = [int(d) for d in match.group(1).split(",") if d]
  if not dims or dims[-1] != H or int(np.prod(dims)) != rows * H:
    return False
  opcode = match.group(2)
  return opcode in ("copy", "transpose") or (opcode == "fusion" and "kind=kLoop" in op
                                              and re.search(r"copy|transpose", name) is not None)


@pytest.mark.parametrize("make_cell", [LSTM, GRU, Elman], ids=["lstm", "gru", "elman"])
def test_hidden_states_reach_the_read_out_without_a_copy(make_cell):
  """The kernels' hs result feeds the batch-major read-out, and the read-out's cotangent feeds
  the backward call, through bitcasts only: no copy or transpose of the whole of hs [B, T, H]
  in between (a custom operand layout once left one on each side of the kernel)."""
  H, V = _hidden_sizes()[0], 7
  cell = make_cell(H)
  params = {"rnn": cell.init(jax.random.PRNGKey(0), F), "w": jax.random.normal(jax.random.PRNGKey(1), (V, H))}
  xs = jax.random.normal(jax.random.PRNGKey(2), (B, T, F))
  logits = lambda p: rnn(cell, p["rnn"], xs)[1] @ p["w"].T
  for mode, function in (("infer", logits), ("train", jax.grad(lambda p: jnp.sum(jnp.sin(logits(p)))))):
    found = _entry_instructions(jax.jit(function).lower(params).compile().as_text())
    kernels = {name: line for name, line in found.items() if 'custom_call_target="rnn_jax_' in line}
    forward = [name for name, line in kernels.items() if "_forward" in line]
    assert len(forward) == 1, (mode, list(kernels))
    # hs: the forward call itself (one result) or its tuple element 0, then any bitcasts.
    hs = set(forward) | {name for name, line in found.items()
                         if " get-tuple-element(" in line and _operands(line)[0] == forward[0] and "index=0" in line}
    grew = True
    while grew:
      more = {name for name, line in found.items() if " bitcast(" in line and _operands(line)[0] in hs}
      grew = not more <= hs
      hs |= more
    for name, line in found.items():
      if name not in hs and set(_operands(line)) & (hs - set(forward)):
        assert not _is_copy_of_hidden_states(line, B * T, H), (mode, line)
    if mode == "train":
      backward = [line for line in kernels.values() if "_backward" in line]
      assert len(backward) == 1
      d_hs_index = 2 if isinstance(cell, Elman) else 4
      producer = _operands(backward[0])[d_hs_index]
      while " bitcast(" in found[producer]:
        producer = _operands(found[producer])[0]
      assert not _is_copy_of_hidden_states(found[producer], B * T, H), found[producer]
