"""Elman, LSTM (with LSTMP) and GRU equal torch.nn.RNN, LSTM and GRU with copied weights.

Multi-layer stacks run through ``StackedRNN``, bidirectional layers through its
padding-aware backward direction, and variable lengths are fed to torch through
``pack_padded_sequence``. Skipped without torch.

Weights are copied with ``rnn_jax.interop.from_torch`` (its docstring has the mapping).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, StackedRNN, interop

torch = pytest.importorskip("torch")

B, T, F, H = 4, 6, 3, 5
LENGTHS = np.array([6, 2, 4, 1])


def stacked_params_from_torch(module, stack):
  """StackedRNN params from a torch module, checking that from_torch describes the same stack."""
  layer, params = interop.from_torch(module, cell=stack.cell)
  assert layer == stack
  return params


def make_pair(kind, num_layers, bidirectional, proj_size=0, nonlinearity="tanh"):
  """A float64 torch module and the matching StackedRNN."""
  torch.manual_seed(0)
  common = dict(input_size=F, hidden_size=H, num_layers=num_layers, bidirectional=bidirectional,
                batch_first=True)
  if kind == "elman":
    module = torch.nn.RNN(nonlinearity=nonlinearity, **common)
    cell = Elman(H, activation=nonlinearity)
  elif kind == "lstm":
    module = torch.nn.LSTM(proj_size=proj_size, **common)
    cell = LSTM(H, proj_size=proj_size or None)
  else:
    module = torch.nn.GRU(**common)
    cell = GRU(H, reset_after=True)
  return module.double(), StackedRNN(cell, num_layers=num_layers, bidirectional=bidirectional)


def run_torch(module, xs, lengths):
  """Packed torch run: outputs [B, T, D*P] zero-padded, h_n [L*D, B, P] (and c_n)."""
  packed = torch.nn.utils.rnn.pack_padded_sequence(
      torch.from_numpy(xs), torch.from_numpy(lengths), batch_first=True, enforce_sorted=False)
  out, state = module(packed)
  out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
  h_n, c_n = state if isinstance(state, tuple) else (state, None)
  to_np = lambda v: None if v is None else v.detach().numpy()
  return out.detach().numpy(), to_np(h_n), to_np(c_n)


def check_final_carries(finals, h_n, c_n, num_layers, bidirectional):
  """Our per-layer carries against torch's h_n[l*D + d] (and c_n)."""
  for layer in range(num_layers):
    carries = finals[layer] if bidirectional else (finals[layer],)
    for direction, carry in enumerate(carries):
      index = layer * (2 if bidirectional else 1) + direction
      if c_n is None:
        np.testing.assert_allclose(carry, h_n[index], atol=1e-10, rtol=0)
      else:
        np.testing.assert_allclose(carry.h, h_n[index], atol=1e-10, rtol=0)
        np.testing.assert_allclose(carry.c, c_n[index], atol=1e-10, rtol=0)


CASES = [
    ("elman", dict(nonlinearity="tanh")),
    ("elman", dict(nonlinearity="relu")),
    ("lstm", {}),
    ("lstm", dict(proj_size=3)),
    ("gru", {}),
]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind, options", CASES, ids=["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"])
def test_two_layers_packed_variable_lengths_float64(kind, options, bidirectional):
  module, stack = make_pair(kind, num_layers=2, bidirectional=bidirectional, **options)
  xs = np.random.default_rng(1).normal(size=(B, T, F))
  out, h_n, c_n = run_torch(module, xs, LENGTHS)
  with jax.enable_x64(True):
    params = stacked_params_from_torch(module, stack)
    finals, ys = stack(params, jnp.asarray(xs), jnp.asarray(LENGTHS))
    assert ys.shape == out.shape == (B, T, stack.output_size)
    np.testing.assert_allclose(ys, out, atol=1e-10, rtol=0)   # real steps equal, zeros after
    check_final_carries(finals, h_n, c_n, 2, bidirectional)


@pytest.mark.parametrize("kind", ["elman", "lstm", "gru"])
def test_single_layer_full_length_float32(kind):
  """Unpacked float32 batch: ours at float32 within 1e-5 of torch."""
  module, stack = make_pair(kind, num_layers=1, bidirectional=False)
  module = module.float()
  xs = np.random.default_rng(2).normal(size=(B, T, F)).astype(np.float32)
  out, state = module(torch.from_numpy(xs))
  h_n = (state[0] if isinstance(state, tuple) else state).detach().numpy()
  params = stacked_params_from_torch(module, stack)
  finals, ys = stack(params, jnp.asarray(xs))
  assert ys.dtype == jnp.float32
  np.testing.assert_allclose(ys, out.detach().numpy(), atol=1e-5, rtol=0)
  hidden = finals[0].h if kind == "lstm" else finals[0]
  np.testing.assert_allclose(hidden, h_n[0], atol=1e-5, rtol=0)
