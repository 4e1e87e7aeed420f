"""The fused CPU LSTM recurrence (``csrc/lstm_cpu.cc``), called through the XLA FFI.

XLA:CPU runs a scanned LSTM step as a dozen small thunks (a dot, the gate fusions, the writes of
the saved gates), and their dispatch costs more than the arithmetic at B=32, H=256
(docs/performance.md). The kernel runs the whole recurrence in one call per direction of BPTT,
the CPU counterpart of a cuDNN RNN layer, with the same equations as ``cells.LSTM``:

  forward:   (i, f, g, o) = a_t + b + W_hh h_{t-1};  c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);
             h_t = sigma(o) tanh(c_t)
  backward:  da_t and (dh_{t-1}, dc_{t-1}) from (dh_t, dc_t) and the saved gates

The input projection a = W_xh x and the weight gradients stay in XLA as one matmul each over all
steps. Without a gradient (inference) the forward call runs with ``save_gates=False`` and writes
only hs and the final cell state (the steps keep c in two [N, H] buffers). Under ``vmap`` the
mapped axis joins the kernel's batch rows, so a vmapped cell still makes one call. Building and
loading: ``rnn_jax.kernel_build``; when the kernel runs: ``rnn_jax.bptt.kernel_choice``.

The kernel is float32 only and needs H to be a multiple of the vector width (16 with AVX-512, 8
with AVX2). It has no derivative of its own; forward-mode and second derivatives fall back to
the scan path (``rnn_jax.bptt``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rnn_jax import kernel_build
from rnn_jax.kernel_build import (KernelLibrary, batch_rows, enabled, mask_operand, rows_batched, set_enabled,
                                  swap_time_and_rows)

FORWARD_TARGET = "rnn_jax_lstm_forward"
BACKWARD_TARGET = "rnn_jax_lstm_backward"
STEP_TARGET = "rnn_jax_lstm_step"
LIBRARY = KernelLibrary("lstm_cpu", {FORWARD_TARGET: "RnnJaxLstmForward", BACKWARD_TARGET: "RnnJaxLstmBackward",
                                     STEP_TARGET: "RnnJaxLstmStep"})

__all__ = ["BACKWARD_TARGET", "FORWARD_TARGET", "LIBRARY", "STEP_TARGET", "applies", "available", "enabled",
           "lstm_backward", "lstm_forward", "lstm_step", "set_enabled", "unavailable_reason",
           "vector_width", "why_not"]


available = LIBRARY.available          # switched on and built (building it on first call)
unavailable_reason = LIBRARY.unavailable_reason  # why ``available()`` is False, or None
vector_width = LIBRARY.vector_width    # floats per SIMD vector; H must be a multiple of it
why_not = LIBRARY.why_not              # (H, *arrays) -> None if the kernel can run, else the reason
applies = LIBRARY.applies              # (H, *arrays) -> why_not(...) is None


def _forward_call(a, w_hh, bias, h0, c0, mask, **attributes):
  """The forward FFI call on rows N: a [T, N, 4H] -> hs [T, N, H], cs [T, N, H] and gates [T, N, 4H]
  (without save_gates: c_T [N, H] and [0])."""
  T, N, G = a.shape
  save = attributes["save_gates"]
  cells_shape, gates_shape = ((T, N, G // 4), (T, N, G)) if save else ((N, G // 4), (0,))
  call = jax.ffi.ffi_call(
      FORWARD_TARGET,
      (jax.ShapeDtypeStruct((N, T, G // 4), jnp.float32), jax.ShapeDtypeStruct(cells_shape, jnp.float32),
       jax.ShapeDtypeStruct(gates_shape, jnp.float32)))
  hs, cs, gates = call(a, w_hh, bias, h0, c0, mask, **attributes)
  return swap_time_and_rows(hs), cs, gates


def _backward_call(gates, cs, c0, w_hh, d_hs, dh_last, dc_last, mask, **attributes):
  """The backward FFI call on rows N: -> da [T, N, 4H], dL/dh0 and dL/dc0 [N, H]."""
  T, N, H = cs.shape
  call = jax.ffi.ffi_call(
      BACKWARD_TARGET,
      (jax.ShapeDtypeStruct((T, N, 4 * H), jnp.float32), jax.ShapeDtypeStruct((N, H), jnp.float32),
       jax.ShapeDtypeStruct((N, H), jnp.float32)))
  return call(gates, cs, c0, w_hh, swap_time_and_rows(d_hs), dh_last, dc_last, mask, **attributes)


def lstm_forward(a, w_hh, h0, c0, mask=None, *, bias=None, reverse: bool = False, save_gates: bool = True):
  """The LSTM recurrence over precomputed input projections, in one kernel call.

  Args:
    a: [T, ..., 4H] float32, a_t = W_xh x_t (+ b) (gate order i, f, g, o).
    w_hh: [4H, H].
    h0, c0: [..., H], the initial carry.
    mask: optional [T, ...] bool, True on real steps (the carry is held elsewhere).
    bias: optional [4H], added to every a_t inside the kernel (sparing XLA a pass over a).
    reverse: run t = T-1, ..., 0.
    save_gates: also return the activated gates and every cell state, for ``lstm_backward``.
  Returns:
    (hs [T, ..., H], cs [T, ..., H], gates [T, ..., 4H]); without save_gates (inference)
    (hs [T, ..., H], the final cell state c_T [..., H], None).
  """
  LIBRARY.require()
  T, G = a.shape[0], a.shape[-1]
  H = G // 4
  batch_shape, N = batch_rows(a.shape)
  mask_array, use_mask = mask_operand(mask, T, N)
  bias = jnp.zeros((G,), jnp.float32) if bias is None else bias
  kernel = functools.partial(_forward_call, reverse=int(reverse), save_gates=int(save_gates), use_mask=use_mask)
  kernel = rows_batched(kernel, (1, None, None, 0, 0, 1 if use_mask else None),
                         (1, 1 if save_gates else 0, 1 if save_gates else None))
  hs, cs, gates = kernel(a.reshape(T, N, G), w_hh, bias, h0.reshape(N, H), c0.reshape(N, H), mask_array)
  unflatten = lambda x: x.reshape((T,) + batch_shape + x.shape[-1:])
  if not save_gates:
    return unflatten(hs), cs.reshape(batch_shape + (H,)), None
  return unflatten(hs), unflatten(cs), unflatten(gates)


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
  batch_shape, N = batch_rows(cs.shape)
  mask_array, use_mask = mask_operand(mask, T, N)
  kernel = functools.partial(_backward_call, reverse=int(reverse), use_mask=use_mask)
  kernel = rows_batched(kernel, (1, 1, 0, None, 1, 0, 0, 1 if use_mask else None), (1, 0, 0))
  da, dh0, dc0 = kernel(gates.reshape(T, N, 4 * H), cs.reshape(T, N, H), c0.reshape(N, H), w_hh,
                        d_hs.reshape(T, N, H), dh_last.reshape(N, H), dc_last.reshape(N, H), mask_array)
  return (da.reshape((T,) + batch_shape + (4 * H,)), dh0.reshape(batch_shape + (H,)),
          dc0.reshape(batch_shape + (H,)))


def _step_call(x, w_xh_panels, w_hh_panels, bias, h, c):
  """The step FFI call on rows N: x [N, F], h, c [N, H] -> (h_t, c_t)."""
  out = jax.ShapeDtypeStruct(h.shape, jnp.float32)
  return jax.ffi.ffi_call(STEP_TARGET, (out, out))(x, w_xh_panels, w_hh_panels, bias, h, c)


_step_rows = rows_batched(_step_call, (0, None, None, None, 0, 0), (0, 0))


def lstm_step(x, w_xh, w_hh, bias, h, c):
  """One decoding step of the plain LSTM in one kernel call, the input projection included.

    (i, f, g, o) = W_xh x_t + W_hh h_{t-1} + b;  c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);  h_t = sigma(o) tanh(c_t)

  Args:
    x: [..., F] float32, x_t; h, c: [..., H], the carry (the same leading axes, or none).
    w_xh: [4H, F]; w_hh: [4H, H]; bias: [4H]. Packed here (``kernel_build.gate_panels``): inside a
      decoding loop XLA packs them once, outside it.
  Returns:
    (h_t, c_t), each [..., H]. It has no derivative of its own (``bptt.fused_step`` gives it XLA's).
  """
  LIBRARY.require()
  weights = (LIBRARY.gate_panels(w_xh, 4), LIBRARY.gate_panels(w_hh, 4), bias)
  return kernel_build.step_on_rows(_step_rows, x, weights, (h, c))
