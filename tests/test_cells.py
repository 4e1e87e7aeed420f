"""Each cell equals a numpy reference written from its equations, over a whole padded batch.

The references below are written from the equations in the papers (and the
cells' docstrings), in plain numpy float64 with explicit loops over examples and
time; they share no code with rnn_jax. Params are random (not the init values),
so layer-norm gains, peepholes and read-outs are all exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, LSTMState, rnn

B, T, F = 3, 5, 4
LENGTHS = np.array([5, 2, 0])


def np_sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


NP_ACTIVATIONS = {
    "tanh": np.tanh,
    "relu": lambda v: np.maximum(v, 0.0),
    "sigmoid": np_sigmoid,
    "identity": lambda v: v,
}


def np_layer_norm(v, gain, bias=0.0, eps=1e-5):
  """gain * (v - mean) / sqrt(var + eps) + bias over the whole vector (Ba et al. 2016)."""
  return gain * (v - v.mean()) / np.sqrt(v.var() + eps) + bias


def reference_elman_step(p, h_prev, x, activation):
  """h_t = f(W_xh x_t + W_hh h_{t-1} + b); y_t = W_hy h_t + b_y (if a read-out exists)."""
  h = NP_ACTIVATIONS[activation](p["w_xh"] @ x + p["w_hh"] @ h_prev + p["b"])
  y = p["w_hy"] @ h + p["b_y"] if "w_hy" in p else h
  return h, y


def reference_lstm_step(p, carry, x, peephole, layer_norm, proj):
  """LSTM with PyTorch gate order i, f, g, o; optional peepholes, layer norm and LSTMP projection."""
  h_prev, c_prev = carry
  H = c_prev.shape[0]
  input_part, recurrent_part = p["w_xh"] @ x, p["w_hh"] @ h_prev
  if layer_norm:
    input_part = np_layer_norm(input_part, p["ln_x"])
    recurrent_part = np_layer_norm(recurrent_part, p["ln_h"])
  pre = input_part + recurrent_part + p["b"]
  i, f, g, o = pre[:H], pre[H:2 * H], pre[2 * H:3 * H], pre[3 * H:]
  if peephole:
    i = i + p["p_i"] * c_prev
    f = f + p["p_f"] * c_prev
  c = np_sigmoid(f) * c_prev + np_sigmoid(i) * np.tanh(g)
  if peephole:
    o = o + p["p_o"] * c
  c_read = np_layer_norm(c, p["ln_c"], p["ln_c_bias"]) if layer_norm else c
  h = np_sigmoid(o) * np.tanh(c_read)
  if proj:
    h = p["w_hr"] @ h
  return (h, c), h


def reference_gru_step(p, h_prev, x, reset_after):
  """GRU, gate order r, z, n; reset after (cuDNN) or before (Cho et al. 2014) the W_hn product."""
  H = h_prev.shape[0]
  w_xr, w_xz, w_xn = p["w_xh"][:H], p["w_xh"][H:2 * H], p["w_xh"][2 * H:]
  w_hr, w_hz, w_hn = p["w_hh"][:H], p["w_hh"][H:2 * H], p["w_hh"][2 * H:]
  b_r, b_z, b_n = p["b"][:H], p["b"][H:2 * H], p["b"][2 * H:]
  r = np_sigmoid(w_xr @ x + w_hr @ h_prev + b_r)
  z = np_sigmoid(w_xz @ x + w_hz @ h_prev + b_z)
  if reset_after:
    n = np.tanh(w_xn @ x + b_n + r * (w_hn @ h_prev + p["b_hn"]))
  else:
    n = np.tanh(w_xn @ x + b_n + w_hn @ (r * h_prev) + p["b_hn"])
  h = (1.0 - z) * n + z * h_prev
  return h, h


def reference_step(cell):
  """The numpy step for a cell's hyper-parameters: (params, carry, x) -> (carry, y)."""
  if isinstance(cell, Elman):
    return lambda p, carry, x: reference_elman_step(p, carry, x, cell.activation)
  if isinstance(cell, LSTM):
    return lambda p, carry, x: reference_lstm_step(
        p, carry, x, cell.peephole, cell.layer_norm, cell.proj_size is not None)
  return lambda p, carry, x: reference_gru_step(p, carry, x, cell.reset_after)


def reference_rnn(step, params, initial_carries, xs, lengths, output_size):
  """Loop over examples b and steps t < L_b; y_t = 0 and the carry is frozen after L_b."""
  finals, ys = [], np.zeros(xs.shape[:2] + (output_size,))
  for b in range(xs.shape[0]):
    carry = initial_carries[b]
    for t in range(lengths[b]):
      carry, ys[b, t] = step(params, carry, xs[b, t])
    finals.append(carry)
  return finals, ys


CELLS = {
    "elman_tanh": Elman(3, activation="tanh"),
    "elman_relu": Elman(3, activation="relu"),
    "elman_sigmoid": Elman(3, activation="sigmoid"),
    "elman_identity": Elman(3, activation="identity"),
    "elman_tanh_readout": Elman(3, readout_size=4),
    "elman_relu_readout": Elman(3, activation="relu", readout_size=2),
    "lstm": LSTM(4),
    "lstm_forget_bias": LSTM(4, forget_bias=1.0),
    "lstm_peephole": LSTM(4, peephole=True),
    "lstm_layer_norm": LSTM(4, layer_norm=True),
    "lstm_proj": LSTM(4, proj_size=2),
    "lstm_all": LSTM(4, forget_bias=1.0, peephole=True, layer_norm=True, proj_size=3),
    "gru_reset_after": GRU(3, reset_after=True),
    "gru_reset_before": GRU(3, reset_after=False),
}


def random_params(cell, seed, scale=0.6):
  """Params with the layout of ``cell.init`` but random values (gains and biases included)."""
  layout = cell.init(jax.random.key(seed), F)
  rng = np.random.default_rng(seed)
  return {name: rng.normal(scale=scale, size=value.shape) for name, value in layout.items()}


def random_carries(cell, rng):
  """A random initial carry per example: numpy list for the reference, batched pytree for rnn."""
  H, P = cell.hidden_size, cell.state_size
  if isinstance(cell, LSTM):
    h, c = rng.normal(size=(B, P)), rng.normal(size=(B, H))
    return [(h[b], c[b]) for b in range(B)], (h, c)
  h = rng.normal(size=(B, H))
  return list(h), h


def assert_carry_close(cell, got, expected_list, atol):
  if isinstance(cell, LSTM):
    assert isinstance(got, LSTMState)
    np.testing.assert_allclose(np.asarray(got.h), np.stack([e[0] for e in expected_list]), atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(got.c), np.stack([e[1] for e in expected_list]), atol=atol, rtol=0)
  else:
    np.testing.assert_allclose(np.asarray(got), np.stack(expected_list), atol=atol, rtol=0)


def check_against_reference(cell, dtype, atol, seed):
  rng = np.random.default_rng(seed + 100)
  params64 = random_params(cell, seed)
  xs64 = rng.normal(size=(B, T, F))
  carries_np, carries_batched = random_carries(cell, rng)
  if dtype == np.float32:
    # The reference runs in float64 on the float32-rounded values the library sees.
    params64 = {k: v.astype(np.float32).astype(np.float64) for k, v in params64.items()}
    xs64 = xs64.astype(np.float32).astype(np.float64)
    carries_batched = jax.tree_util.tree_map(lambda v: v.astype(np.float32), carries_batched)
    carries_np = jax.tree_util.tree_map(lambda v: v.astype(np.float32).astype(np.float64), carries_np)
  expected_finals, expected_ys = reference_rnn(
      reference_step(cell), params64, carries_np, xs64, LENGTHS, cell.output_size)

  params = {k: jnp.asarray(v, dtype) for k, v in params64.items()}
  initial = carries_batched
  if isinstance(cell, LSTM):
    initial = LSTMState(h=jnp.asarray(initial[0], dtype), c=jnp.asarray(initial[1], dtype))
  else:
    initial = jnp.asarray(initial, dtype)
  final, ys = rnn(cell, params, jnp.asarray(xs64, dtype), jnp.asarray(LENGTHS), initial_carry=initial)
  assert ys.dtype == dtype and ys.shape == (B, T, cell.output_size)
  np.testing.assert_allclose(np.asarray(ys), expected_ys, atol=atol, rtol=0)
  assert_carry_close(cell, final, expected_finals, atol)

  # One step through ``cell.step`` equals the reference step too.
  first_carry = jax.tree_util.tree_map(lambda v: v[0], initial)
  carry_1, y_1 = cell.step(params, first_carry, jnp.asarray(xs64[0, 0], dtype))
  expected_carry_1, expected_y_1 = reference_step(cell)(params64, carries_np[0], xs64[0, 0])
  np.testing.assert_allclose(np.asarray(y_1), expected_y_1, atol=atol, rtol=0)
  assert_carry_close(cell, jax.tree_util.tree_map(lambda v: v[None], carry_1), [expected_carry_1], atol)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_matches_numpy_reference_float64(name):
  with jax.enable_x64(True):
    check_against_reference(CELLS[name], np.float64, atol=1e-10, seed=sorted(CELLS).index(name))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cell_matches_numpy_reference_float32(name):
  check_against_reference(CELLS[name], np.float32, atol=1e-5, seed=sorted(CELLS).index(name))


def test_worked_example_hello():
  """The char-RNN worked example (Karpathy 2015) on vocabulary {h, e, l, o}: one-hot x, 3 hidden units, W_xh: 3x4, W_hy: 4x3.

  Step 1 reads "h" = [1, 0, 0, 0] from h_0 = 0, so W_hh drops out:
    W_xh x = first column of W_xh = [0.5, -1.0, 0.0]
    h_1 = tanh([0.5, -1.0, 0.0] + b) = tanh([0.5, -0.5, 0.25]) = [0.462117, -0.462117, 0.244919]
    y_1 = W_hy h_1 + b_y = [h1_0, h1_1, h1_2, h1_0 + h1_1 + h1_2 + 0.1]
        = [0.462117, -0.462117, 0.244919, 0.344919]
  Step 2 reads "e" = [0, 1, 0, 0]:
    W_xh x = second column = [0.0, 1.0, 0.5];  W_hh h_1 = 0.5 * h_1 (W_hh = 0.5 I)
    h_2 = tanh([0.0, 1.0, 0.5] + [0.231059, -0.231059, 0.122459] + [0.0, 0.5, 0.25])
        = tanh([0.231059, 1.268941, 0.872459]) = [0.227033, 0.853510, 0.702622]
  """
  vocab = "helo"
  one_hot = np.eye(4, dtype=np.float32)
  cell = Elman(3, readout_size=4)
  params = {
      "w_xh": jnp.array([[0.5, 0.0, 0.3, -0.2],
                         [-1.0, 1.0, 0.0, 0.1],
                         [0.0, 0.5, -0.4, 0.2]]),
      "w_hh": 0.5 * jnp.eye(3),
      "b": jnp.array([0.0, 0.5, 0.25]),
      "w_hy": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]),
      "b_y": jnp.array([0.0, 0.0, 0.0, 0.1]),
  }
  assert params["w_xh"].shape == (3, 4)
  h_0 = cell.initial_carry(params)
  np.testing.assert_array_equal(h_0, np.zeros(3))
  h_1, y_1 = cell.step(params, h_0, jnp.asarray(one_hot[vocab.index("h")]))
  np.testing.assert_allclose(h_1, [0.462117, -0.462117, 0.244919], atol=1e-6)
  np.testing.assert_allclose(y_1, [0.462117, -0.462117, 0.244919, 0.344919], atol=1e-6)
  h_2, _ = cell.step(params, h_1, jnp.asarray(one_hot[vocab.index("e")]))
  np.testing.assert_allclose(h_2, [0.227033, 0.853510, 0.702622], atol=1e-6)
  # The same two steps through the sequence layer on the string "he".
  xs = jnp.asarray(one_hot[[vocab.index(c) for c in "he"]])[None]
  final, ys = rnn(cell, params, xs)
  np.testing.assert_allclose(ys[0, 0], y_1, atol=1e-7)
  np.testing.assert_allclose(final[0], h_2, atol=1e-7)


def test_forget_bias_adds_one_to_the_f_block_only():
  H = 4
  plain = LSTM(H).init(jax.random.key(0), 3)
  biased = LSTM(H, forget_bias=1.0).init(jax.random.key(0), 3)
  difference = np.asarray(biased["b"] - plain["b"])
  np.testing.assert_allclose(difference, np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)], atol=1e-6)
  np.testing.assert_array_equal(biased["w_xh"], plain["w_xh"])


@pytest.mark.parametrize("cell, expected", [
    (Elman(3), {"w_xh": (3, 5), "w_hh": (3, 3), "b": (3,)}),
    (Elman(3, readout_size=7), {"w_xh": (3, 5), "w_hh": (3, 3), "b": (3,), "w_hy": (7, 3), "b_y": (7,)}),
    (LSTM(4, peephole=True, layer_norm=True, proj_size=2),
     {"w_xh": (16, 5), "w_hh": (16, 2), "b": (16,), "p_i": (4,), "p_f": (4,), "p_o": (4,),
      "ln_x": (16,), "ln_h": (16,), "ln_c": (4,), "ln_c_bias": (4,), "w_hr": (2, 4)}),
    (GRU(3), {"w_xh": (9, 5), "w_hh": (9, 3), "b": (9,), "b_hn": (3,)}),
])
def test_param_names_and_shapes(cell, expected):
  params = cell.init(jax.random.key(1), 5)
  assert {name: tuple(value.shape) for name, value in params.items()} == expected
  assert all(value.dtype == jnp.float32 for value in params.values())
