"""The plain LSTM layer through cuDNN on a GPU (``jax.experimental.rnn``).

On a GPU a ``lax.scan`` LSTM launches a handful of kernels per time step; cuDNN's RNN
primitive runs the whole layer, forward and backward, as a few persistent kernels. ``rnn``
hands a layer to it when ``reason(...)`` is None, that is for

    (i, f, g, o) = W_xh x_t + W_hh h_{t-1} + b;  c_t = f * c_{t-1} + i * g;  h_t = o * tanh(c_t)

exactly ``cells.LSTM`` without peephole, layer norm or projection, in float32 with no compute
dtype, read forwards, on the GPU backend, with ``grad="auto"`` and no remat, outside a
partitioned mesh and outside vmap, and unless ``RNN_JAX_CUDNN=0``. (``run_cell``, the
per-example API that vmap maps, never takes the route; a ``vmap`` of an already jitted
function that calls ``rnn`` cannot be seen at trace time: set ``RNN_JAX_CUDNN=0`` for it.) Everywhere else the layer keeps rnn_jax's own
scan and hand-derived backward pass.

The weights map one to one (our params are PyTorch's layout and gate order, which is cuDNN's):
cuDNN's flat vector is (W_ih [4H, F], W_hh [4H, H], b_ih [4H], b_hh [4H]) for one layer and
direction (``jax.experimental.rnn.unpack_lstm_weights``); ``pack_weights`` writes W_xh, W_hh,
b and zeros for b_hh, so the gradient of b is cuDNN's gradient of b_ih. Lengths follow the
contract of ``rnn_jax.sequence``: outputs past a sequence's length are zero and its final carry
is the state after its last step (a length of 0 keeps the initial carry).

Whether this is faster than the scan is a property of the GPU, measured by
``python experiments/benchmark.py --preset=gpu_check`` (rnn_jax, routed here, against
rnn_jax_scan, the same with ``RNN_JAX_CUDNN=0``, and jax_cudnn called directly).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

from rnn_jax import mesh as mesh_lib
from rnn_jax.cells import LSTM, Cell, LSTMState, Params

ENVIRONMENT_SWITCH = "RNN_JAX_CUDNN"


def _backend() -> str:
  return jax.default_backend()


def _experimental_lstm():
  """jax.experimental.rnn.lstm: (x, h_0, c_0, weights, seq_lengths, input_size, hidden_size,
  num_layers, dropout, bidirectional) -> (y, h_n, c_n)."""
  from jax.experimental.rnn import lstm
  return lstm


def _library_reason() -> Optional[str]:
  """Why jax.experimental.rnn cannot run here, or None."""
  try:
    from jax._src.lib import gpu_rnn  # what jax.experimental.rnn lowers through
  except ImportError as error:  # pragma: no cover - a jaxlib without the module
    return f"jax.experimental.rnn's cuDNN bindings are not importable ({error})"
  if not hasattr(gpu_rnn, "compute_rnn_workspace_reserve_space_sizes"):
    return "this jaxlib has no cuDNN RNN support (jax._src.lib.gpu_rnn lacks its workspace query)"
  return None


def reason(cell: Cell, params: Params, xs: jax.Array, *, reverse: bool, grad: str, remat_chunk: int,
           backend: Optional[str] = None) -> Optional[str]:
  """Why this layer does NOT go through cuDNN, or None when it does (decided at trace time).

    cell, params: the layer; xs: [T, B, F] or [B, T, F] (only dtype and T are read).
  """
  if os.environ.get(ENVIRONMENT_SWITCH, "1") == "0":
    return f"{ENVIRONMENT_SWITCH}=0"
  backend = backend or _backend()
  if backend != "gpu":
    return f"cuDNN is for the GPU backend, the backend is {backend}"
  if type(cell) is not LSTM:
    return f"{cell.name}: cuDNN runs the plain LSTM only, not {type(cell).__name__}"
  if cell.peephole or cell.layer_norm or cell.proj_size is not None:
    return "lstm: cuDNN runs the plain LSTM only (no peephole, layer_norm or proj_size)"
  if cell.dtype is not None:
    return f"lstm: the cuDNN path computes in float32, not dtype={cell.dtype!r}"
  if set(params) != {"w_xh", "w_hh", "b"}:
    return f"lstm: params {sorted(params)} are not the plain LSTM's w_xh, w_hh, b"
  arrays = [xs, params["w_xh"], params["w_hh"], params["b"]]
  if any(jnp.dtype(a.dtype) != jnp.float32 for a in arrays):
    return "lstm: the cuDNN path takes float32 inputs and params only"
  if reverse:
    return "lstm: a reversed layer keeps the padding-aware scan"
  if grad != "auto":
    return f"lstm: grad={grad!r} asks for rnn_jax's own gradient"
  if remat_chunk:
    return "lstm: remat_chunk is a property of the scan"
  if xs.shape[0] == 0 or xs.shape[1] == 0:
    return "lstm: an empty batch or sequence stays on lax.scan"
  devices = mesh_lib.partitioned_devices()
  if devices > 1:
    return f"lstm: traced for a mesh of {devices} devices; cuDNN's call has no partitioning rule"
  if _under_vmap(*arrays):
    return "lstm: traced under vmap; cuDNN's call has no batching rule (run_cell is the per-example API)"
  return _library_reason()


def _under_vmap(*arrays) -> bool:
  """True if any array is a tracer of jax.vmap (seen when rnn is traced inside vmap)."""
  from jax._src.interpreters import batching
  return any(isinstance(a, batching.BatchTracer) for a in arrays)


def pack_weights(params: Params) -> jax.Array:
  """cuDNN's flat weight vector of one layer and direction: [W_ih ; W_hh ; b_ih ; b_hh] raveled.

    w_xh [4H, F] -> W_ih, w_hh [4H, H] -> W_hh, b [4H] -> b_ih, zeros [4H] -> b_hh
  """
  w_xh, w_hh, b = params["w_xh"], params["w_hh"], params["b"]
  return jnp.concatenate([w_xh.reshape(-1), w_hh.reshape(-1), b, jnp.zeros_like(b)])


def lstm_layer(params: Params, xs: jax.Array, carry: LSTMState, lengths):
  """One LSTM layer through cuDNN: xs [B, T, F], carry (h [B, H], c [B, H]), lengths [B] or None
  -> (final carry, hs [B, T, H]) with rnn_jax's padding contract."""
  lstm = _experimental_lstm()
  B, T, F = xs.shape
  H = params["w_hh"].shape[1]
  seq_lengths = (jnp.full((B,), T, jnp.int32) if lengths is None
                 else jnp.asarray(lengths).astype(jnp.int32))
  # cuDNN needs a length of at least 1; a length of 0 keeps the initial carry below.
  run_lengths = jnp.maximum(seq_lengths, 1)
  hs, h_n, c_n = lstm(xs, carry.h[None], carry.c[None], pack_weights(params), run_lengths,
                      input_size=F, hidden_size=H, num_layers=1, dropout=0.0, bidirectional=False)
  h, c = h_n[0], c_n[0]
  if lengths is not None:
    empty = (seq_lengths == 0)[:, None]
    h, c = jnp.where(empty, carry.h, h), jnp.where(empty, carry.c, c)
    mask = jnp.arange(T)[None, :, None] < seq_lengths[:, None, None]
    hs = jnp.where(mask, hs, jnp.zeros((), hs.dtype))
  return LSTMState(h, c), hs
