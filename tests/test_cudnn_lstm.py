"""The cuDNN route of the plain LSTM (rnn_jax.cudnn_lstm), checked on the CPU.

No GPU runs here, so the route is exercised with jax.experimental.rnn's own reference equations
(``lstm_ref`` over ``unpack_lstm_weights``) in place of its cuDNN call: the weight packing, the
padding contract, the carries and the gradients of ``rnn`` through the route must equal rnn_jax's
own scan. The decision's reasons are checked for each option that keeps the scan.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import rnn as jax_rnn

from rnn_jax import cudnn_lstm
from rnn_jax.cells import GRU, LSTM, LSTMState
from rnn_jax.sequence import StackedRNN, rnn

B, T, F, H = 4, 7, 5, 8


def _reference_lstm(calls):
  def lstm(x, h_0, c_0, weights, seq_lengths, input_size, hidden_size, num_layers, dropout, bidirectional):
    calls.append(x.shape)
    w_ih, w_hh, b_ih, b_hh = jax_rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers,
                                                         bidirectional)
    return jax_rnn.lstm_ref(x, h_0, c_0, w_ih, w_hh, b_ih, b_hh, seq_lengths, input_size, hidden_size,
                            num_layers, dropout, bidirectional)
  return lstm


@pytest.fixture
def on_a_gpu(monkeypatch):
  """cudnn_lstm believes it is on a GPU with cuDNN, whose LSTM is jax's reference; returns the calls."""
  calls = []
  monkeypatch.setattr(cudnn_lstm, "_backend", lambda: "gpu")
  monkeypatch.setattr(cudnn_lstm, "_library_reason", lambda: None)
  monkeypatch.setattr(cudnn_lstm, "_experimental_lstm", lambda: _reference_lstm(calls))
  return calls


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  cell = LSTM(H)
  params = cell.init(jax.random.PRNGKey(seed), F)
  xs = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
  carry = LSTMState(jnp.asarray(rng.normal(size=(B, H)), jnp.float32),
                    jnp.asarray(rng.normal(size=(B, H)), jnp.float32))
  lengths = jnp.asarray([T, 3, 0, 5], jnp.int32)
  return cell, params, xs, carry, lengths


def test_packed_weights_unpack_to_our_matrices_in_cudnn_layout():
  cell, params, xs, carry, lengths = _problem()
  flat = cudnn_lstm.pack_weights(params)
  assert flat.shape == (jax_rnn.get_num_params_in_lstm(F, H, 1, False),)
  w_ih, w_hh, b_ih, b_hh = jax_rnn.unpack_lstm_weights(flat, F, H, 1, False)
  np.testing.assert_array_equal(w_ih[0], params["w_xh"])
  np.testing.assert_array_equal(w_hh[0], params["w_hh"])
  np.testing.assert_array_equal(b_ih[0], params["b"])
  np.testing.assert_array_equal(b_hh[0], np.zeros(4 * H))


def test_rnn_through_the_route_equals_the_scan_in_values_carries_and_gradients(on_a_gpu, monkeypatch):
  cell, params, xs, carry, lengths = _problem(1)

  def loss(params, xs, carry, time_major):
    inputs = jnp.swapaxes(xs, 0, 1) if time_major else xs
    final, ys = rnn(cell, params, inputs, lengths, initial_carry=carry, time_major=time_major)
    ys = jnp.swapaxes(ys, 0, 1) if time_major else ys
    weights = jnp.arange(1.0, 1.0 + ys.size).reshape(ys.shape) / ys.size
    return jnp.sum(ys * weights) + jnp.sum(final.h * 0.3) + jnp.sum(final.c * 0.7), (final, ys)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  for time_major in (False, True):
    (value, (final, ys)), grads = grad(params, xs, carry, time_major)
    assert len(on_a_gpu) == 1, "the route did not run"
    on_a_gpu.clear()
    with monkeypatch.context() as off:
      off.setenv(cudnn_lstm.ENVIRONMENT_SWITCH, "0")
      (value_scan, (final_scan, ys_scan)), grads_scan = jax.jit(
          jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)(params, xs, carry, time_major)
    assert not on_a_gpu
    np.testing.assert_allclose(value, value_scan, rtol=1e-5)
    np.testing.assert_allclose(ys, ys_scan, atol=1e-5)
    assert np.all(np.asarray(ys)[1, 3:] == 0) and np.all(np.asarray(ys)[2] == 0)   # zero past each length
    np.testing.assert_allclose(final.h[2], carry.h[2])                              # length 0 keeps the carry
    np.testing.assert_allclose(final.c, final_scan.c, atol=1e-5)
    for ours, theirs in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_scan)):
      np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_bidirectional_layer_routes_its_forward_direction_and_keeps_the_reverse_one(on_a_gpu, monkeypatch):
  cell, params, xs, carry, lengths = _problem(2)
  stack = StackedRNN(cell, bidirectional=True)
  stack_params = stack.init(jax.random.PRNGKey(3), F)
  _, ys = stack(stack_params, xs, lengths)
  assert len(on_a_gpu) == 1                          # the forward direction only
  monkeypatch.setenv(cudnn_lstm.ENVIRONMENT_SWITCH, "0")
  _, ys_scan = stack(stack_params, xs, lengths)
  np.testing.assert_allclose(ys, ys_scan, atol=1e-5)


@pytest.mark.parametrize("change,expected", [
    (dict(cell=LSTM(H, peephole=True)), "plain LSTM only"),
    (dict(cell=LSTM(H, dtype="bfloat16")), "computes in float32"),
    (dict(cell=GRU(H)), "not GRU"),
    (dict(reverse=True), "padding-aware scan"),
    (dict(grad="manual"), "rnn_jax's own gradient"),
    (dict(remat_chunk=4), "remat_chunk"),
    (dict(backend="cpu"), "the backend is cpu"),
])
def test_the_decision_names_why_a_layer_keeps_the_scan(on_a_gpu, change, expected):
  cell, params, xs, _, _ = _problem()
  arguments = dict(cell=cell, reverse=False, grad="auto", remat_chunk=0, backend=None) | change
  layer = arguments.pop("cell")
  layer_params = layer.init(jax.random.PRNGKey(0), F)
  assert expected in cudnn_lstm.reason(layer, layer_params, xs, **arguments)
  assert cudnn_lstm.reason(cell, params, xs, reverse=False, grad="auto", remat_chunk=0) is None


def test_the_switch_a_mesh_and_a_cpu_jaxlib_keep_the_scan(on_a_gpu, monkeypatch):
  cell, params, xs, _, _ = _problem()
  reasons = []
  jax.vmap(lambda x: reasons.append(cudnn_lstm.reason(cell, params, x, reverse=False, grad="auto",
                                                      remat_chunk=0)) or x)(xs[None])
  assert "under vmap" in reasons[0]
  monkeypatch.setattr(cudnn_lstm.mesh_lib, "partitioned_devices", lambda: 8)
  assert "mesh of 8 devices" in cudnn_lstm.reason(cell, params, xs, reverse=False, grad="auto", remat_chunk=0)
  monkeypatch.undo()
  monkeypatch.setenv(cudnn_lstm.ENVIRONMENT_SWITCH, "0")
  assert cudnn_lstm.reason(cell, params, xs, reverse=False, grad="auto", remat_chunk=0) == "RNN_JAX_CUDNN=0"
  monkeypatch.delenv(cudnn_lstm.ENVIRONMENT_SWITCH)



@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU-only jaxlib")
def test_a_cpu_machine_keeps_the_scan_and_says_why():
  cell, params, xs, _, _ = _problem()
  assert "the backend is cpu" in cudnn_lstm.reason(cell, params, xs, reverse=False, grad="auto", remat_chunk=0)
  assert "no cuDNN RNN support" in cudnn_lstm._library_reason()
