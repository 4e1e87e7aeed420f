"""The fused CPU GRU recurrence (``csrc/gru_cpu.cc``), called through the XLA FFI.

The GRU counterpart of ``rnn_jax.lstm_kernel`` (same design, shared C++ in ``csrc/rnn_cpu.h``),
with the equations of ``cells.GRU`` (gate order r, z, n) in both variants:

  reset_after (default):  (u_r, u_z, u_n) = W_hh h_{t-1};  r = sigma(a_r + b_r + u_r);  z likewise
                          s = u_n + b_hn;  n = tanh(a_n + b_n + r s);  h_t = (1 - z) n + z h_{t-1}
  reset_before:           n = tanh(a_n + b_n + W_hn (r h_{t-1}) + b_hn)   (two dependent products a step)
  backward:               da_t (and du_n = da_n r for reset_after) and dh_{t-1} from dh_t and the saved gates

Saved for the backward: (r, z, n, s) [T, ..., 4H] (reset_after) or (r, z, n) [T, ..., 3H]; without a
gradient (inference) the forward call runs with ``save_gates=False`` and writes hs alone. The
input projection a = W_xh x and the weight gradients (dW_hh, db_hn) stay in XLA, one matmul each
over all steps; under ``vmap`` the mapped axis joins the kernel's batch rows. When the kernel
runs: ``rnn_jax.bptt.kernel_choice``.

Float32 only; H must be a multiple of the vector width (16 with AVX-512, 8 with AVX2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rnn_jax import kernel_build
from rnn_jax.kernel_build import KernelLibrary, batch_rows, mask_operand, rows_batched, swap_time_and_rows

FORWARD_TARGET = "rnn_jax_gru_forward"
BACKWARD_TARGET = "rnn_jax_gru_backward"
STEP_TARGET = "rnn_jax_gru_step"
LIBRARY = KernelLibrary("gru_cpu", {FORWARD_TARGET: "RnnJaxGruForward", BACKWARD_TARGET: "RnnJaxGruBackward",
                                    STEP_TARGET: "RnnJaxGruStep"})

__all__ = ["BACKWARD_TARGET", "FORWARD_TARGET", "LIBRARY", "STEP_TARGET", "gru_backward", "gru_forward",
           "gru_step", "recurrent_panels", "saved_gates"]


def saved_gates(reset_after: bool) -> int:
  """Gate blocks of H the forward saves per step: (r, z, n, s) or (r, z, n)."""
  return 4 if reset_after else 3


def _forward_call(a, w_hh, bias, b_hn, h0, mask, **attributes):
  """The forward FFI call on rows N: a [T, N, 3H] -> hs [T, N, H], gates [T, N, 4H | 3H] (or [0])."""
  T, N, G = a.shape
  H = G // 3
  gates_shape = (T, N, saved_gates(attributes["reset_after"]) * H) if attributes["save_gates"] else (0,)
  call = jax.ffi.ffi_call(
      FORWARD_TARGET,
      (jax.ShapeDtypeStruct((N, T, H), jnp.float32), jax.ShapeDtypeStruct(gates_shape, jnp.float32)))
  hs, gates = call(a, w_hh, bias, b_hn, h0, mask, **attributes)
  return swap_time_and_rows(hs), gates


def _backward_call(gates, hs, h0, w_hh, d_hs, dh_last, mask, **attributes):
  """The backward FFI call on rows N: -> da [T, N, 3H], du_n [T, N, H] (or [0]), dL/dh0 [N, H]."""
  T, N, H = hs.shape
  du_shape = (T, N, H) if attributes["reset_after"] else (0,)
  call = jax.ffi.ffi_call(
      BACKWARD_TARGET,
      (jax.ShapeDtypeStruct((T, N, 3 * H), jnp.float32), jax.ShapeDtypeStruct(du_shape, jnp.float32),
       jax.ShapeDtypeStruct((N, H), jnp.float32)))
  return call(gates, swap_time_and_rows(hs), h0, w_hh, swap_time_and_rows(d_hs), dh_last, mask, **attributes)


def gru_forward(a, w_hh, b_hn, h0, mask=None, *, bias=None, reverse: bool = False, reset_after: bool = True,
                save_gates: bool = True):
  """The GRU recurrence over precomputed input projections, in one kernel call.

  Args:
    a: [T, ..., 3H] float32, a_t = W_xh x_t (+ b) (gate order r, z, n).
    w_hh: [3H, H]; b_hn: [H].
    h0: [..., H], the initial carry.
    mask: optional [T, ...] bool, True on real steps (the carry is held elsewhere).
    bias: optional [3H], added to every a_t inside the kernel.
    reverse: run t = T-1, ..., 0.
    reset_after: the reset gate multiplies W_hn h_{t-1} + b_hn (True) or h_{t-1} (False).
    save_gates: also return the gates, for ``gru_backward``.
  Returns:
    (hs [T, ..., H], gates [T, ..., 4H or 3H] or None).
  """
  LIBRARY.require()
  T, G = a.shape[0], a.shape[-1]
  H = G // 3
  batch_shape, N = batch_rows(a.shape)
  mask_array, use_mask = mask_operand(mask, T, N)
  bias = jnp.zeros((G,), jnp.float32) if bias is None else bias
  kernel = functools.partial(_forward_call, reverse=int(reverse), save_gates=int(save_gates),
                             use_mask=use_mask, reset_after=int(reset_after))
  kernel = rows_batched(kernel, (1, None, None, None, 0, 1 if use_mask else None),
                        (1, 1 if save_gates else None))
  hs, gates = kernel(a.reshape(T, N, G), w_hh, bias, b_hn, h0.reshape(N, H), mask_array)
  unflatten = lambda x: x.reshape((T,) + batch_shape + x.shape[-1:])
  return unflatten(hs), (unflatten(gates) if save_gates else None)


def gru_backward(gates, hs, h0, w_hh, d_hs, dh_last, mask=None, *, reverse: bool = False,
                 reset_after: bool = True):
  """The GRU's backward recurrence in one kernel call.

  Args:
    gates: [T, ..., 4H or 3H], saved by ``gru_forward``.
    hs: [T, ..., H], the hidden states; h0: [..., H].
    w_hh: [3H, H].
    d_hs: [T, ..., H], dL/dhs; dh_last: [..., H], dL/d(final carry).
    mask, reverse, reset_after: as in the forward call.
  Returns:
    (da [T, ..., 3H], du_n [T, ..., H] (reset_after; None otherwise), dL/dh0 [..., H]), with
    du_n = da_n r the n block of the cotangent of W_hh h_{t-1}.
  """
  LIBRARY.require()
  T, H = hs.shape[0], hs.shape[-1]
  batch_shape, N = batch_rows(hs.shape)
  mask_array, use_mask = mask_operand(mask, T, N)
  kernel = functools.partial(_backward_call, reverse=int(reverse), use_mask=use_mask,
                             reset_after=int(reset_after))
  kernel = rows_batched(kernel, (1, 1, 0, None, 1, 0, 1 if use_mask else None),
                        (1, 1 if reset_after else None, 0))
  da, du_n, dh0 = kernel(gates.reshape(T, N, gates.shape[-1]), hs.reshape(T, N, H), h0.reshape(N, H), w_hh,
                         d_hs.reshape(T, N, H), dh_last.reshape(N, H), mask_array)
  unflatten = lambda x: x.reshape((T,) + batch_shape + x.shape[-1:])
  return unflatten(da), (unflatten(du_n) if reset_after else None), dh0.reshape(batch_shape + (H,))


def recurrent_panels(w_hh: jax.Array, reset_after: bool) -> jax.Array:
  """W_hh [3H, H] packed as the forward call packs it, flat [3H H]: the gate panels of (r, z, n)
  (reset_after), or those of (r, z) followed by those of n (reset_before, whose W_hn product
  waits for r h_{t-1})."""
  if reset_after:
    return LIBRARY.gate_panels(w_hh, 3).reshape(-1)
  H = w_hh.shape[1]
  return jnp.concatenate([LIBRARY.gate_panels(w_hh[:2 * H], 2).reshape(-1),
                          LIBRARY.gate_panels(w_hh[2 * H:], 1).reshape(-1)])


def _step_call(x, w_xh_panels, w_hh_panels, bias, b_hn, h, *, reset_after):
  """The step FFI call on rows N: x [N, F], h [N, H] -> (h_t,)."""
  call = jax.ffi.ffi_call(STEP_TARGET, (jax.ShapeDtypeStruct(h.shape, jnp.float32),))
  return call(x, w_xh_panels, w_hh_panels, bias, b_hn, h, reset_after=int(reset_after))


@functools.lru_cache(maxsize=2)
def _step_rows(reset_after: bool):
  return rows_batched(functools.partial(_step_call, reset_after=reset_after), (0, None, None, None, None, 0), (0,))


def gru_step(x, w_xh, w_hh, bias, b_hn, h, *, reset_after: bool = True):
  """One decoding step of the GRU in one kernel call, the input projection included (``cells.GRU``'s
  equations, either reset variant, from a_t = W_xh x_t + b).

  Args:
    x: [..., F] float32, x_t; h: [..., H] (the same leading axes, or none).
    w_xh: [3H, F]; w_hh: [3H, H]; bias: [3H]; b_hn: [H]. Packed here; inside a decoding loop
      XLA packs them once, outside it (``kernel_build.gate_panels``).
  Returns:
    h_t [..., H]. It has no derivative of its own (``bptt.fused_step`` gives it XLA's).
  """
  LIBRARY.require()
  weights = (LIBRARY.gate_panels(w_xh, 3), recurrent_panels(w_hh, reset_after), bias, b_hn)
  return kernel_build.step_on_rows(_step_rows(bool(reset_after)), x, weights, (h,))[0]
