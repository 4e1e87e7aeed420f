"""The fused decoding steps (``lstm_kernel.lstm_step``, ``gru_kernel.gru_step``,
``elman_kernel.elman_step``, routed by ``bptt.fused_step`` from ``Cell.step``): each cell's
equations in float64 numpy, the same derivatives as XLA's step, any batch axes, and the weight
packing done once outside a decoding loop.

The kernels cut N rows into even blocks of at most 6: batches of 13, 6, 5 and 1 rows run blocks
of 5 + 4 + 4, 6, 5 and 1 rows; F = 7 input features is not a multiple of anything the kernels
block by.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, bptt, kernel_build, lstm_kernel, polyphonic
from rnn_jax.cells import ACTIVATIONS, LSTMState

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler to build the kernel with")

F = 7


class ScaledInputGRU(GRU):
  """A GRU whose input projection reads 2 x_t: a subclass the fused step must leave to XLA."""

  def input_projection(self, params, xs, *, bias=True):
    return super().input_projection(params, 2 * xs, bias=bias)


@pytest.fixture(autouse=True)
def _kernel_on():
  lstm_kernel.set_enabled(True)
  yield
  lstm_kernel.set_enabled(True)


def _setup(batch=(5,), hidden_multiple=2, seed=0):
  H = hidden_multiple * lstm_kernel.vector_width()
  cell = LSTM(H, forget_bias=1.0)
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = cell.init(keys[0], F)
  params = {**params, "b": params["b"] + 0.3 * jax.random.normal(keys[3], params["b"].shape)}
  x = jax.random.normal(keys[1], batch + (F,))
  h, c = 0.7 * jax.random.normal(keys[2], (2,) + batch + (H,))
  return cell, params, LSTMState(h, c), x


def _numpy_step(params, carry, x):
  """The LSTM step in float64 numpy: gates i, f, g, o = W_xh x + W_hh h + b."""
  w_xh, w_hh, b = (np.asarray(params[k], np.float64) for k in ("w_xh", "w_hh", "b"))
  h, c = np.asarray(carry.h, np.float64), np.asarray(carry.c, np.float64)
  z = np.asarray(x, np.float64) @ w_xh.T + h @ w_hh.T + b
  i, f, g, o = np.split(z, 4, axis=-1)
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  c_t = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
  return sigmoid(o) * np.tanh(c_t), c_t


def _xla_step(cell, params, carry, x):
  return cell.recurrence(params, carry, cell.input_projection(params, x))


@pytest.mark.parametrize("rows,hidden_multiple", [(13, 2), (6, 1), (5, 3), (1, 1)])
def test_step_equals_the_equations_in_numpy(rows, hidden_multiple):
  cell, params, carry, x = _setup((rows,), hidden_multiple)
  assert bptt.step_kernel_choice(cell, params, x, carry).kernel == "lstm_cpu"
  new_carry, h_t = cell.step(params, carry, x)
  h_ref, c_ref = _numpy_step(params, carry, x)
  np.testing.assert_allclose(h_t, h_ref, atol=2e-6)
  np.testing.assert_allclose(new_carry.h, h_ref, atol=2e-6)
  np.testing.assert_allclose(new_carry.c, c_ref, atol=2e-6)
  assert "rnn_jax_lstm_step" in jax.jit(cell.step).lower(params, carry, x).as_text()


def test_unbatched_and_several_batch_axes_and_vmap():
  cell, params, carry, x = _setup((2, 3))
  h_ref, c_ref = _numpy_step(params, carry, x)
  new_carry, h_t = cell.step(params, carry, x)
  assert h_t.shape == (2, 3, cell.hidden_size)
  np.testing.assert_allclose(new_carry.c, c_ref, atol=2e-6)
  one, h_one = cell.step(params, LSTMState(carry.h[1, 2], carry.c[1, 2]), x[1, 2])
  assert h_one.shape == (cell.hidden_size,)
  np.testing.assert_allclose(h_one, h_ref[1, 2], atol=2e-6)
  mapped = jax.jit(jax.vmap(cell.step, in_axes=(None, 0, 0)))
  _, h_mapped = mapped(params, carry, x)
  np.testing.assert_allclose(h_mapped, h_ref, atol=2e-6)
  assert mapped.lower(params, carry, x).as_text().count("rnn_jax_lstm_step") == 1  # vmap folds into rows


def test_gradients_and_forward_mode_are_those_of_the_xla_step():
  cell, params, carry, x = _setup((5,))

  def loss(step):
    def value(params, carry, x):
      new_carry, h_t = step(params, carry, x)
      return jnp.sum(jnp.sin(h_t) * jnp.arange(h_t.shape[-1])) + jnp.sum(new_carry.c ** 2)
    return value

  fused = jax.grad(loss(cell.step), argnums=(0, 1, 2))(params, carry, x)
  reference = jax.grad(loss(lambda *a: _xla_step(cell, *a)), argnums=(0, 1, 2))(params, carry, x)
  for got, want in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  tangents = jax.tree_util.tree_map(jnp.ones_like, (params, carry, x))
  _, fused_tangent = jax.jvp(cell.step, (params, carry, x), tangents)
  _, reference_tangent = jax.jvp(lambda *a: _xla_step(cell, *a), (params, carry, x), tangents)
  for got, want in zip(jax.tree_util.tree_leaves(fused_tangent), jax.tree_util.tree_leaves(reference_tangent)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gradient_of_a_decoding_loop_matches_float64_finite_differences():
  """A 4-step loop that feeds each h_t back as the next input (F = H), in float64 finite
  differences against the fused float32 steps' gradient of W_hh."""
  H = lstm_kernel.vector_width()
  cell = LSTM(H)
  params = cell.init(jax.random.PRNGKey(3), H)
  start = LSTMState(*(0.5 * jax.random.normal(jax.random.PRNGKey(4), (2, 3, H))))

  def loss(w_hh, step_params, dtype):
    p = {**{k: v.astype(dtype) for k, v in step_params.items()}, "w_hh": w_hh.astype(dtype)}
    carry, x = LSTMState(start.h.astype(dtype), start.c.astype(dtype)), start.h.astype(dtype)
    for _ in range(4):
      carry, x = cell.step(p, carry, x)
    return jnp.sum(x ** 2)

  grad = jax.grad(loss)(params["w_hh"], params, jnp.float32)
  with jax.enable_x64(True):
    w = np.asarray(params["w_hh"], np.float64)
    rng = np.random.default_rng(0)
    for _ in range(3):
      direction = rng.normal(size=w.shape)
      eps = 1e-6
      numeric = (loss(jnp.asarray(w + eps * direction), params, jnp.float64)
                 - loss(jnp.asarray(w - eps * direction), params, jnp.float64)) / (2 * eps)
      np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(numeric), rtol=2e-4)


def test_weights_are_packed_once_outside_a_decoding_loop():
  cell, params, carry, x = _setup((5,))

  @jax.jit
  def decode(params, carry, x):
    def body(state, _):
      carry, x = state
      carry, h_t = cell.step(params, carry, x)
      return (carry, h_t[:, :F]), h_t
    return jax.lax.scan(body, (carry, x), None, length=6)[1]

  compiled = decode.lower(params, carry, x).compile().as_text()
  bodies = [c for c in compiled.split("\n\n") if "rnn_jax_lstm_step" in c and "while" not in c.split("\n")[0]]
  assert bodies, "the step call is in a while body"
  assert not any("transpose" in body for body in bodies), "the gate panels are rebuilt every step"
  hs = decode(params, carry, x)
  reference_carry, reference_x = carry, x
  for t in range(6):
    reference_carry, h_t = _xla_step(cell, params, reference_carry, reference_x)
    reference_x = h_t[:, :F]
    np.testing.assert_allclose(hs[t], h_t, atol=1e-5)


@pytest.mark.parametrize("gates,gates_per_pass", [(4, 4), (4, 2), (3, 2), (1, 2)])
def test_gate_panels_layout_and_exact_values(gates, gates_per_pass):
  """Each unit vector's panel holds its gates group after group (the kernel's passes), and inside a
  group k-major with the group's gates interleaved; the packing is bit-exact."""
  width = lstm_kernel.vector_width()
  H, K = 2 * width, 5
  w = np.arange(gates * H * K, dtype=np.float32).reshape(gates * H, K)
  w[0, 0], w[1, 0], w[2, 0], w[3, 0] = np.inf, np.nan, 1e-45, -0.0
  panels = np.asarray(kernel_build.gate_panels(jnp.asarray(w), gates, width, gates_per_pass))
  assert panels.shape == (H // width, gates * K * width)
  for v in range(H // width):
    for q in range(gates):
      first = q - q % gates_per_pass
      n = min(gates_per_pass, gates - first)
      for k in range(K):
        start = (first * K + k * n + q - first) * width
        np.testing.assert_array_equal(panels[v, start:start + width], w[q * H + v * width:q * H + (v + 1) * width, k])
  assert np.array_equal(panels.view(np.uint32)[0, :4], w[:4, 0].view(np.uint32))  # inf, nan, denormal, -0
  assert lstm_kernel.LIBRARY.gates_per_pass() == (4 if width == 16 else 2)
  np.testing.assert_array_equal(lstm_kernel.LIBRARY.gate_panels(jnp.asarray(w), gates),
                                kernel_build.gate_panels(jnp.asarray(w), gates, width, lstm_kernel.LIBRARY.gates_per_pass()))


def test_where_the_fused_step_does_not_run_it_says_why_and_xla_steps():
  cell, params, carry, x = _setup((5,))
  peephole = LSTM(cell.hidden_size, peephole=True)
  peephole_params = peephole.init(jax.random.PRNGKey(1), F)
  assert "plain LSTM" in bptt.step_kernel_choice(peephole, peephole_params, x, carry).reason
  scaled = ScaledInputGRU(cell.hidden_size)
  scaled_params = scaled.init(jax.random.PRNGKey(1), F)
  assert "redefines the GRU step or input projection" in bptt.step_kernel_choice(
      scaled, scaled_params, x, carry.h).reason
  _, h_scaled = scaled.step(scaled_params, carry.h, x)
  np.testing.assert_allclose(h_scaled, _numpy_gru_step(scaled_params, carry.h, 2 * x, True), atol=2e-6)
  assert "float32" in bptt.step_kernel_choice(cell, params, x.astype(jnp.float16), carry).reason
  odd = LSTM(cell.hidden_size + 1)
  odd_params = odd.init(jax.random.PRNGKey(1), F)
  odd_carry = LSTMState(jnp.zeros((5, odd.hidden_size)), jnp.zeros((5, odd.hidden_size)))
  assert "multiple of" in bptt.step_kernel_choice(odd, odd_params, x, odd_carry).reason
  assert "rnn_jax_lstm_step" not in jax.jit(odd.step).lower(odd_params, odd_carry, x).as_text()
  lstm_kernel.set_enabled(False)
  assert "switched off" in bptt.step_kernel_choice(cell, params, x, carry).reason
  _, h_t = cell.step(params, carry, x)
  np.testing.assert_allclose(h_t, _numpy_step(params, carry, x)[0], atol=2e-6)


def test_wrong_input_width_is_a_one_line_error():
  cell, params, carry, x = _setup((5,))
  with pytest.raises(ValueError, match=r"^lstm: x has 6 features, params expect 7$"):
    cell.step(params, carry, x[:, :6])


def test_generated_frames_are_bernoulli_draws_of_each_step():
  """FrameModel.generate draws every frame's uniforms before its loop; the frames are those of
  jax.random.bernoulli with each step's key, step by step."""
  model = polyphonic.FrameModel(LSTM(lstm_kernel.vector_width()), num_pitches=12)
  params = model.init(jax.random.PRNGKey(0))
  seed = jnp.zeros((3, 12)).at[:, 4].set(1.0)
  key = jax.random.PRNGKey(7)
  frames = np.asarray(model.generate(params, seed, 9, key))
  stack = model.rnn
  carries, _ = stack.step(params["rnn"], stack.initial_carries(params["rnn"], 3), jnp.zeros_like(seed))
  previous, expected = seed, [seed]
  for step_key in jax.random.split(key, 8):
    carries, h = stack.step(params["rnn"], carries, previous)
    previous = jax.random.bernoulli(step_key, jax.nn.sigmoid(model.readout(params, h))).astype(jnp.float32)
    expected.append(previous)
  np.testing.assert_array_equal(frames, np.swapaxes(np.stack(expected), 0, 1))
  assert 0 < frames[:, 1:].sum() < frames[:, 1:].size


def _numpy_gru_step(params, h, x, reset_after):
  w_xh, w_hh, b, b_hn = (np.asarray(params[k], np.float64) for k in ("w_xh", "w_hh", "b", "b_hn"))
  h, H = np.asarray(h, np.float64), w_hh.shape[1]
  a_r, a_z, a_n = np.split(np.asarray(x, np.float64) @ w_xh.T + b, 3, axis=-1)
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  r = sigmoid(a_r + h @ w_hh[:H].T)
  z = sigmoid(a_z + h @ w_hh[H:2 * H].T)
  if reset_after:
    n = np.tanh(a_n + r * (h @ w_hh[2 * H:].T + b_hn))
  else:
    n = np.tanh(a_n + (r * h) @ w_hh[2 * H:].T + b_hn)
  return (1 - z) * n + z * h


NUMPY_ACTIVATIONS = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
                     "identity": lambda v: v}


def _gru_or_elman(cell, rows, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = cell.init(keys[0], F)
  params = {**params, "b": params["b"] + 0.3 * jax.random.normal(keys[3], params["b"].shape)}
  return params, 0.7 * jax.random.normal(keys[2], (rows, cell.hidden_size)), jax.random.normal(keys[1], (rows, F))


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("rows,hidden_multiple", [(13, 2), (6, 1), (5, 3)])
def test_gru_step_equals_the_equations_in_numpy(reset_after, rows, hidden_multiple):
  cell = GRU(hidden_multiple * lstm_kernel.vector_width(), reset_after=reset_after)
  params, h, x = _gru_or_elman(cell, rows)
  assert bptt.step_kernel_choice(cell, params, x, h).kernel == "gru_cpu"
  h_t, y_t = cell.step(params, h, x)
  np.testing.assert_allclose(h_t, _numpy_gru_step(params, h, x, reset_after), atol=2e-6)
  np.testing.assert_array_equal(h_t, y_t)
  assert "rnn_jax_gru_step" in jax.jit(cell.step).lower(params, h, x).as_text()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_elman_step_equals_the_equations_in_numpy_with_every_activation(activation):
  cell = Elman(2 * lstm_kernel.vector_width(), activation=activation)
  params, h, x = _gru_or_elman(cell, 13)
  assert bptt.step_kernel_choice(cell, params, x, h).kernel == "elman_cpu"
  h_t, _ = cell.step(params, h, x)
  w_xh, w_hh, b = (np.asarray(params[k], np.float64) for k in ("w_xh", "w_hh", "b"))
  expected = NUMPY_ACTIVATIONS[activation](np.asarray(x, np.float64) @ w_xh.T + np.asarray(h, np.float64) @ w_hh.T + b)
  np.testing.assert_allclose(h_t, expected, atol=2e-6, rtol=1e-6)
  assert "rnn_jax_elman_step" in jax.jit(cell.step).lower(params, h, x).as_text()


@pytest.mark.parametrize("cell", [GRU(32, reset_after=False), GRU(32), Elman(32, activation="relu", readout_size=5)],
                         ids=["gru_reset_before", "gru", "elman_readout"])
def test_gru_and_elman_steps_vmap_differentiate_and_pack_once(cell):
  params, h, x = _gru_or_elman(cell, 5, seed=2)
  reference = lambda p, h, x: cell.recurrence(p, h, cell.input_projection(p, x))
  _, y_t = cell.step(params, h, x)
  np.testing.assert_allclose(y_t, cell.output(params, reference(params, h, x)[1]), atol=2e-6)
  _, h_mapped = jax.vmap(cell.step, in_axes=(None, 0, 0))(params, h, x)
  np.testing.assert_allclose(h_mapped, y_t, atol=2e-6)
  loss = lambda step: lambda p, h, x: jnp.sum(jnp.sin(step(p, h, x)[1]))
  fused = jax.grad(loss(cell.step), argnums=(0, 1, 2))(params, h, x)
  expected = jax.grad(loss(lambda p, h, x: (None, cell.output(p, reference(p, h, x)[1]))), argnums=(0, 1, 2))(params, h, x)
  for got, want in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  @jax.jit
  def decode(params, h, x):
    def body(h, _):
      h, _ = cell.step(params, h, x)
      return h, h
    return jax.lax.scan(body, h, None, length=4)[1]

  compiled = decode.lower(params, h, x).compile().as_text()
  bodies = [c for c in compiled.split("\n\n") if "_step\"" in c and "custom_call_target" in c]
  assert bodies and not any("transpose" in body for body in bodies)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampled_tokens_are_categorical_draws_of_each_step(temperature, top_k):
  """lm.sample draws every token's Gumbel noise before its loop; the tokens are those of
  jax.random.categorical with each step's key, step by step."""
  from rnn_jax import lm
  model = lm.LanguageModel(cell=GRU(lstm_kernel.vector_width()), vocab_size=30, embed_size=8)
  params = model.init(jax.random.PRNGKey(0))
  prime = np.array([[1, 2, 3], [4, 5, 6]])
  key = jax.random.PRNGKey(9)
  tokens = lm.sample(model, params, prime, 12, key, temperature=temperature, top_k=top_k)
  logits, carries = model(params, {"inputs": jnp.asarray(prime)})
  logits, expected = logits[:, -1], []
  for key_t in jax.random.split(key, 12):
    token = jax.random.categorical(key_t, lm._filter_logits(logits, temperature, top_k), axis=-1)
    carries, logits = model.next_token_logits(params, carries, token)
    expected.append(token)
  np.testing.assert_array_equal(tokens, np.stack(expected, axis=1))
  assert len(set(tokens.ravel().tolist())) > 3
