"""The fused CPU Elman recurrence (``csrc/elman_cpu.cc``), called through the XLA FFI.

The Elman counterpart of ``rnn_jax.lstm_kernel`` (same design, shared C++ in
``csrc/rnn_cpu.h``), with the equations of ``cells.Elman`` for every activation f:

  forward:   h_t = f(a_t + b + W_hh h_{t-1})       (h_t = h_{t-1} on masked steps)
  backward:  dz_t = (dh_{t+1 -> t} + dL/dhs_t) f'(z_t);  dh_{t-1} = W_hh^T dz_t

f'(z_t) is read off h_t (1 - h^2, [h > 0], h (1 - h), 1), so the forward saves nothing beyond hs
and the inference call is the training call. The input projection a = W_xh x and the weight
gradient dW_hh = sum_t dz_t h_{t-1}^T stay in XLA, one matmul each over all steps; under
``vmap`` the mapped axis joins the kernel's batch rows. When the kernel runs:
``rnn_jax.bptt.kernel_choice``.

Float32 only; H must be a multiple of the vector width (16 with AVX-512, 8 with AVX2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rnn_jax import kernel_build
from rnn_jax.kernel_build import KernelLibrary, batch_rows, mask_operand, rows_batched, swap_time_and_rows

FORWARD_TARGET = "rnn_jax_elman_forward"
BACKWARD_TARGET = "rnn_jax_elman_backward"
STEP_TARGET = "rnn_jax_elman_step"
LIBRARY = KernelLibrary("elman_cpu", {FORWARD_TARGET: "RnnJaxElmanForward", BACKWARD_TARGET: "RnnJaxElmanBackward",
                                      STEP_TARGET: "RnnJaxElmanStep"})
ACTIVATION_CODES = {"tanh": 0, "relu": 1, "sigmoid": 2, "identity": 3}
"""The activations the kernel runs (every one of ``cells.ACTIVATIONS``), by their code in the C++."""

__all__ = ["ACTIVATION_CODES", "BACKWARD_TARGET", "FORWARD_TARGET", "LIBRARY", "STEP_TARGET", "elman_backward",
           "elman_forward", "elman_step"]


def _code(activation: str) -> int:
  if activation not in ACTIVATION_CODES:
    raise ValueError(f"elman kernel: activation must be one of {tuple(ACTIVATION_CODES)}, got {activation!r}")
  return ACTIVATION_CODES[activation]


def _forward_call(a, w_hh, bias, h0, mask, **attributes):
  """The forward FFI call on rows N: a [T, N, H] -> hs [T, N, H]."""
  T, N, H = a.shape
  call = jax.ffi.ffi_call(FORWARD_TARGET, jax.ShapeDtypeStruct((N, T, H), jnp.float32))
  return (swap_time_and_rows(call(a, w_hh, bias, h0, mask, **attributes)),)


def _backward_call(hs, w_hh, d_hs, dh_last, mask, **attributes):
  """The backward FFI call on rows N: -> dz [T, N, H], dL/dh0 [N, H]."""
  call = jax.ffi.ffi_call(
      BACKWARD_TARGET,
      (jax.ShapeDtypeStruct(hs.shape, jnp.float32), jax.ShapeDtypeStruct(dh_last.shape, jnp.float32)))
  return call(swap_time_and_rows(hs), w_hh, swap_time_and_rows(d_hs), dh_last, mask, **attributes)


def elman_forward(a, w_hh, h0, mask=None, *, bias=None, reverse: bool = False, activation: str = "tanh"):
  """The Elman recurrence over precomputed input projections, in one kernel call.

  Args:
    a: [T, ..., H] float32, a_t = W_xh x_t (+ b).
    w_hh: [H, H].
    h0: [..., H], the initial carry.
    mask: optional [T, ...] bool, True on real steps (the carry is held elsewhere).
    bias: optional [H], added to every a_t inside the kernel.
    reverse: run t = T-1, ..., 0.
    activation: f, one of ``ACTIVATION_CODES``.
  Returns:
    hs [T, ..., H], the (held) hidden states.
  """
  LIBRARY.require()
  T, H = a.shape[0], a.shape[-1]
  batch_shape, N = batch_rows(a.shape)
  mask_array, use_mask = mask_operand(mask, T, N)
  bias = jnp.zeros((H,), jnp.float32) if bias is None else bias
  kernel = functools.partial(_forward_call, reverse=int(reverse), use_mask=use_mask,
                             activation=_code(activation))
  kernel = rows_batched(kernel, (1, None, None, 0, 1 if use_mask else None), (1,))
  (hs,) = kernel(a.reshape(T, N, H), w_hh, bias, h0.reshape(N, H), mask_array)
  return hs.reshape(a.shape)


def elman_backward(hs, w_hh, d_hs, dh_last, mask=None, *, reverse: bool = False, activation: str = "tanh"):
  """The Elman backward recurrence in one kernel call: dz = dL/da for every step and dL/dh0.

  Args:
    hs: [T, ..., H], the hidden states of ``elman_forward``.
    w_hh: [H, H].
    d_hs: [T, ..., H], dL/dhs; dh_last: [..., H], dL/d(final carry).
    mask, reverse, activation: as in the forward call.
  Returns:
    (dz [T, ..., H], dL/dh0 [..., H]).
  """
  LIBRARY.require()
  T, H = hs.shape[0], hs.shape[-1]
  batch_shape, N = batch_rows(hs.shape)
  mask_array, use_mask = mask_operand(mask, T, N)
  kernel = functools.partial(_backward_call, reverse=int(reverse), use_mask=use_mask,
                             activation=_code(activation))
  kernel = rows_batched(kernel, (1, None, 1, 0, 1 if use_mask else None), (1, 0))
  dz, dh0 = kernel(hs.reshape(T, N, H), w_hh, d_hs.reshape(T, N, H), dh_last.reshape(N, H), mask_array)
  return dz.reshape(hs.shape), dh0.reshape(batch_shape + (H,))


def _step_call(x, w_xh_panels, w_hh_panels, bias, h, *, activation):
  """The step FFI call on rows N: x [N, F], h [N, H] -> (h_t,)."""
  call = jax.ffi.ffi_call(STEP_TARGET, (jax.ShapeDtypeStruct(h.shape, jnp.float32),))
  return call(x, w_xh_panels, w_hh_panels, bias, h, activation=activation)


@functools.lru_cache(maxsize=len(ACTIVATION_CODES))
def _step_rows(code: int):
  return rows_batched(functools.partial(_step_call, activation=code), (0, None, None, None, 0), (0,))


def elman_step(x, w_xh, w_hh, bias, h, *, activation: str = "tanh"):
  """One decoding step of the Elman cell in one kernel call, the input projection included:

    h_t = f(W_xh x_t + W_hh h_{t-1} + b)

  Args:
    x: [..., F] float32, x_t; h: [..., H] (the same leading axes, or none).
    w_xh: [H, F]; w_hh: [H, H]; bias: [H]. Packed here; inside a decoding loop XLA packs them
      once, outside it (``kernel_build.gate_panels``).
    activation: f, one of ``ACTIVATION_CODES``.
  Returns:
    h_t [..., H]. It has no derivative of its own (``bptt.fused_step`` gives it XLA's).
  """
  LIBRARY.require()
  weights = (LIBRARY.gate_panels(w_xh, 1), LIBRARY.gate_panels(w_hh, 1), bias)
  return kernel_build.step_on_rows(_step_rows(_code(activation)), x, weights, (h,))[0]
