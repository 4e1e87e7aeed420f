"""LSTM, GRU (reset after) and Elman equal flax.linen's LSTMCell, GRUCell and SimpleCell.

Weight-name mapping (ours use math layout [out, in], gate blocks stacked in
PyTorch's order; flax keeps one Dense per gate with kernel [in, out]):

  LSTM  w_xh[k*H:(k+1)*H]  <->  i{k}.kernel.T       k = i, f, g, o
        w_hh[k*H:(k+1)*H]  <->  h{k}.kernel.T
        b[k*H:(k+1)*H]     <->  h{k}.bias           (flax's input Dense has no bias)
        carry (h, c)       <->  flax carry (c, h)
  GRU   w_xh / w_hh blocks <->  i{k}.kernel.T / h{k}.kernel.T   k = r, z, n
        b = [b_r, b_z, b_n] <-> ir.bias, iz.bias, in.bias;  b_hn <-> hn.bias
  Elman w_xh <-> i.kernel.T,  w_hh <-> h.kernel.T,  b <-> i.bias
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, LSTMState, rnn

B, T, F, H = 3, 6, 5, 4
LENGTHS = np.array([6, 3, 1])
LSTM_GATES, GRU_GATES = "ifgo", "rzn"


def lstm_to_flax(params):
  """Our LSTM params -> flax.linen.LSTMCell params."""
  flax_params = {}
  for k, gate in enumerate(LSTM_GATES):
    rows = slice(k * H, (k + 1) * H)
    flax_params[f"i{gate}"] = {"kernel": params["w_xh"][rows].T}
    flax_params[f"h{gate}"] = {"kernel": params["w_hh"][rows].T, "bias": params["b"][rows]}
  return flax_params


def lstm_from_flax(flax_params):
  """flax.linen.LSTMCell params -> our LSTM params."""
  return {
      "w_xh": jnp.concatenate([flax_params[f"i{g}"]["kernel"].T for g in LSTM_GATES]),
      "w_hh": jnp.concatenate([flax_params[f"h{g}"]["kernel"].T for g in LSTM_GATES]),
      "b": jnp.concatenate([flax_params[f"h{g}"]["bias"] for g in LSTM_GATES]),
  }


def gru_to_flax(params):
  """Our GRU(reset_after=True) params -> flax.linen.GRUCell params."""
  flax_params = {}
  for k, gate in enumerate(GRU_GATES):
    rows = slice(k * H, (k + 1) * H)
    flax_params[f"i{gate}"] = {"kernel": params["w_xh"][rows].T, "bias": params["b"][rows]}
    flax_params[f"h{gate}"] = {"kernel": params["w_hh"][rows].T}
  flax_params["hn"]["bias"] = params["b_hn"]
  return flax_params


def gru_from_flax(flax_params):
  """flax.linen.GRUCell params -> our GRU(reset_after=True) params."""
  return {
      "w_xh": jnp.concatenate([flax_params[f"i{g}"]["kernel"].T for g in GRU_GATES]),
      "w_hh": jnp.concatenate([flax_params[f"h{g}"]["kernel"].T for g in GRU_GATES]),
      "b": jnp.concatenate([flax_params[f"i{g}"]["bias"] for g in GRU_GATES]),
      "b_hn": flax_params["hn"]["bias"],
  }


def elman_to_flax(params):
  """Our Elman(tanh) params -> flax.linen.SimpleCell params."""
  return {"i": {"kernel": params["w_xh"].T, "bias": params["b"]}, "h": {"kernel": params["w_hh"].T}}


def elman_from_flax(flax_params):
  """flax.linen.SimpleCell params -> our Elman(tanh) params."""
  return {"w_xh": flax_params["i"]["kernel"].T, "w_hh": flax_params["h"]["kernel"].T,
          "b": flax_params["i"]["bias"]}


CASES = {
    "lstm": (LSTM(H), nn.LSTMCell, lstm_to_flax, lstm_from_flax),
    "gru": (GRU(H, reset_after=True), nn.GRUCell, gru_to_flax, gru_from_flax),
    "elman": (Elman(H), nn.SimpleCell, elman_to_flax, elman_from_flax),
}


def flax_carry(name, carry):
  return (carry.c, carry.h) if name == "lstm" else carry


def our_carry(name, flax_carry_value):
  return LSTMState(h=flax_carry_value[1], c=flax_carry_value[0]) if name == "lstm" else flax_carry_value


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
