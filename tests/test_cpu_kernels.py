"""The fused CPU LSTM kernel (rnn_jax.lstm_kernel): same numbers as the lax.scan path, used where it applies.

Every check runs the same model with the kernel and with ``jax.grad`` through
``lax.scan`` (``grad="autodiff"``), which tests/test_bptt.py, test_torch_parity.py
and test_flax_parity.py tie to numpy, PyTorch and Flax. H is a multiple of the
vector width (16 floats with AVX-512) so that the kernel runs; B = 5 leaves a
remainder after the kernel's blocks of 4 rows, and the lengths include 0 and T.
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import LSTM, StackedRNN, bptt, lstm_kernel, rnn, run_cell
from rnn_jax.sequence import ScanOptions
from rnn_jax.cells import LSTMState

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
@pytest.mark.parametrize("batch", [5, 13])
def test_forward_equals_the_equations_in_numpy(reverse, batch):
  """batch 13 = two full blocks of 6 rows and one row left over; 5 is a block of 5 rows only."""
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
  """No working compiler: a RuntimeWarning names the failure, and the LSTM still trains through lax.scan."""
  script = textwrap.dedent("""
      import warnings
      import jax, jax.numpy as jnp
      from rnn_jax import LSTM, lstm_kernel, rnn
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cell = LSTM(32)
        params = cell.init(jax.random.PRNGKey(0), 3)
        grads = jax.grad(lambda p: jnp.sum(rnn(cell, p, jnp.ones((2, 4, 3)))[1]))(params)
      assert not lstm_kernel.available()
      assert "failed" in lstm_kernel.unavailable_reason()
      assert any("kernel is unavailable" in str(w.message) for w in caught), [str(w.message) for w in caught]
      assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
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
