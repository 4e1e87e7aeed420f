"""The fused CPU LSTM recurrence (``csrc/lstm_cpu.cc``), called through the XLA FFI.

XLA:CPU runs a scanned LSTM step as a dozen small thunks (a dot, the gate fusions, the writes of
the saved gates), and their dispatch costs more than the arithmetic at B=32, H=256
(docs/performance.md). The kernel runs the whole recurrence in one call per direction of BPTT,
the CPU counterpart of a cuDNN RNN layer, with the same equations as ``cells.LSTM``:

  forward:   (i, f, g, o) = a_t + b + W_hh h_{t-1};  c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);
             h_t = sigma(o) tanh(c_t)
  backward:  da_t and (dh_{t-1}, dc_{t-1}) from (dh_t, dc_t) and the saved gates

The input projection a = W_xh x and the weight gradients stay in XLA as one matmul each over all
steps. Under ``vmap`` the mapped axis joins the kernel's batch rows, so a vmapped cell still
makes one call. Building and loading: ``rnn_jax.kernel_build``; when the kernel runs:
``rnn_jax.bptt.kernel_choice``.

The kernel is float32 only and needs H to be a multiple of the vector width (16 with AVX-512, 8
with AVX2). It has no derivative of its own; forward-mode and second derivatives fall back to
the scan path (``rnn_jax.bptt``).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax.kernel_build import KernelLibrary, enabled, mask_operand, rows_batched, set_enabled

FORWARD_TARGET = "rnn_jax_lstm_forward"
BACKWARD_TARGET = "rnn_jax_lstm_backward"
LIBRARY = KernelLibrary("lstm_cpu", {FORWARD_TARGET: "RnnJaxLstmForward", BACKWARD_TARGET: "RnnJaxLstmBackward"})
# hs and dL/dhs ([T, N, H]) are handed over batch-major ([N, T, H] in memory): rnn()'s read-out runs
# batch-major, so XLA needs no transpose there. a stays time-major: XLA transposes the small
# inputs x before the projection, so a = W_xh x arrives time-major and goes in as it is.
BATCH_MAJOR = (1, 0, 2)

__all__ = ["BACKWARD_TARGET", "FORWARD_TARGET", "LIBRARY", "applies", "available", "enabled", "lstm_backward",
           "lstm_forward", "set_enabled", "unavailable_reason", "vector_width"]


def available() -> bool:
  """True if kernels are switched on and this one is built (building it on first call)."""
  return LIBRARY.available()


def unavailable_reason() -> Optional[str]:
  """Why ``available()`` is False, or None."""
  return LIBRARY.unavailable_reason()


def vector_width() -> int:
  """Floats per SIMD vector in the built kernel; H must be a multiple of it."""
  library = LIBRARY.require()
  library.rnn_jax_vector_width.restype = ctypes.c_int64
  return int(library.rnn_jax_vector_width())


def applies(hidden_size: int, *arrays) -> bool:
  """True if the kernel can run this LSTM: switched on, built, float32 and H a multiple of the vector width."""
  return why_not(hidden_size, *arrays) is None


def why_not(hidden_size: int, *arrays) -> Optional[str]:
  """None if the kernel can run this LSTM, else the reason it cannot."""
  if not available():
    return f"lstm_cpu kernel unavailable: {unavailable_reason()}"
  width = vector_width()
  if hidden_size % width != 0:
    return f"lstm_cpu kernel needs H to be a multiple of {width}, got H={hidden_size}"
  dtypes = sorted({str(jnp.result_type(x)) for x in arrays} - {"float32"})
  if dtypes:
    return f"lstm_cpu kernel is float32 only, got {dtypes}"
  return None


def _forward_call(a, w_hh, bias, h0, c0, mask, **attributes):
  """The forward FFI call on rows N: a [T, N, 4H] -> hs, cs [T, N, H], gates [T, N, 4H] (or [0])."""
  T, N, G = a.shape
  gates_shape = (T, N, G) if attributes["save_gates"] else (0,)
  call = jax.ffi.ffi_call(
      FORWARD_TARGET,
      (jax.ShapeDtypeStruct((T, N, G // 4), jnp.float32), jax.ShapeDtypeStruct((T, N, G // 4), jnp.float32),
       jax.ShapeDtypeStruct(gates_shape, jnp.float32)),
      output_layouts=(BATCH_MAJOR, None, None))
  return call(a, w_hh, bias, h0, c0, mask, **attributes)


def _backward_call(gates, cs, c0, w_hh, d_hs, dh_last, dc_last, mask, **attributes):
  """The backward FFI call on rows N: -> da [T, N, 4H], dL/dh0 and dL/dc0 [N, H]."""
  T, N, H = cs.shape
  call = jax.ffi.ffi_call(
      BACKWARD_TARGET,
      (jax.ShapeDtypeStruct((T, N, 4 * H), jnp.float32), jax.ShapeDtypeStruct((N, H), jnp.float32),
       jax.ShapeDtypeStruct((N, H), jnp.float32)),
      input_layouts=(None, None, None, None, BATCH_MAJOR, None, None, None))
  return call(gates, cs, c0, w_hh, d_hs, dh_last, dc_last, mask, **attributes)


def lstm_forward(a, w_hh, h0, c0, mask=None, *, bias=None, reverse: bool = False, save_gates: bool = True):
  """The LSTM recurrence over precomputed input projections, in one kernel call.

  Args:
    a: [T, ..., 4H] float32, a_t = W_xh x_t (+ b) (gate order i, f, g, o).
    w_hh: [4H, H].
    h0, c0: [..., H], the initial carry.
    mask: optional [T, ...] bool, True on real steps (the carry is held elsewhere).
    bias: optional [4H], added to every a_t inside the kernel (sparing XLA a pass over a).
    reverse: run t = T-1, ..., 0.
    save_gates: also return the activated gates, for ``lstm_backward``.
  Returns:
    (hs [T, ..., H], cs [T, ..., H], gates [T, ..., 4H] or None).
  """
  LIBRARY.require()
  T, G = a.shape[0], a.shape[-1]
  H = G // 4
  batch_shape = a.shape[1:-1]
  N = int(np.prod(batch_shape, dtype=np.int64))
  mask_array, use_mask = mask_operand(mask, T, N)
  bias = jnp.zeros((G,), jnp.float32) if bias is None else bias
  kernel = functools.partial(_forward_call, reverse=int(reverse), save_gates=int(save_gates), use_mask=use_mask)
  kernel = rows_batched(kernel, (1, None, None, 0, 0, 1 if use_mask else None),
                         (1, 1, 1 if save_gates else None))
  hs, cs, gates = kernel(a.reshape(T, N, G), w_hh, bias, h0.reshape(N, H), c0.reshape(N, H), mask_array)
  unflatten = lambda x: x.reshape((T,) + batch_shape + x.shape[-1:])
  return unflatten(hs), unflatten(cs), (unflatten(gates) if save_gates else None)


def lstm_backward(gates, cs, c0, w_hh, d_hs, dh_last, dc_last, mask=None, *, reverse: bool = False):
  """The LSTM's backward recurrence in one kernel call: da for every step and the carry gradients.

  Args:
    gates: [T, ..., 4H], the activated gates saved by ``lstm_forward``.
    cs: [T, ..., H], the cell states; c0: [..., H].
    w_hh: [4H, H].
    d_hs: [T, ..., H], dL/dhs; dh_last, dc_last: [..., H], dL/d(final carry).
    mask, reverse: as in the forward call.
  Returns:
    (da [T, ..., 4H], dL/dh0 [..., H], dL/dc0 [..., H]).
  """
  LIBRARY.require()
  T, H = cs.shape[0], cs.shape[-1]
  batch_shape = cs.shape[1:-1]
  N = int(np.prod(batch_shape, dtype=np.int64))
  mask_array, use_mask = mask_operand(mask, T, N)
  kernel = functools.partial(_backward_call, reverse=int(reverse), use_mask=use_mask)
  kernel = rows_batched(kernel, (1, 1, 0, None, 1, 0, 0, 1 if use_mask else None), (1, 0, 0))
  da, dh0, dc0 = kernel(gates.reshape(T, N, 4 * H), cs.reshape(T, N, H), c0.reshape(N, H), w_hh,
                        d_hs.reshape(T, N, H), dh_last.reshape(N, H), dc_last.reshape(N, H), mask_array)
  return (da.reshape((T,) + batch_shape + (4 * H,)), dh0.reshape(batch_shape + (H,)),
          dc0.reshape(batch_shape + (H,)))
