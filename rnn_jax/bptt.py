"""Hand-derived backpropagation through time (``jax.custom_vjp``) for Elman, LSTM and GRU.

``fused_scan`` runs the same recurrence as ``sequence.scan_recurrence`` over
precomputed input projections a_t = W_xh x_t + b, and replaces JAX's automatic
transpose of the scan by the seeds' backward equations, written out below:

* the forward scan saves the activated gates (not the pre-activations);
* the backward scan carries ONLY the state gradients (dh, and dc for the LSTM)
  and emits the gate-pre-activation gradients da_t;
* after the scan, dW_hh = sum_t du_t h_{t-1}^T is ONE matmul over all T (and B)
  steps, and da (all t) is returned as the cotangent of a, so the caller's
  autodiff of the hoisted input projection computes dW_xh = sum_t da_t x_t^T
  as one matmul too.

Shapes: a: [T, ..., G*H] with any leading batch axes after time (usually
time-major [T, B, G*H]); the carry has the same batch axes ([..., H], or an
``LSTMState`` of two); mask: [T, ...] bool, True on real steps. On masked steps the
carry is held (carry_t = carry_{t-1}) and hs_t is the held hidden state.

Supported cells: Elman (every activation), plain LSTM (no peephole, no layer norm,
no projection) and GRU (both ``reset_after`` variants). ``supports(cell)`` says
whether a cell is covered; the other LSTM options use ``jax.grad`` through
``lax.scan`` instead (``backward="auto"`` in ``rnn_jax.sequence`` does that).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from rnn_jax import cpu_kernels
from rnn_jax.cells import ACTIVATIONS, GRU, LSTM, Cell, Elman, LSTMState, Params, linear


def supports(cell: Cell) -> bool:
  """True if ``fused_scan`` has a hand-derived backward pass for this cell's options."""
  if isinstance(cell, LSTM):
    return not (cell.peephole or cell.layer_norm or cell.proj_size is not None)
  return isinstance(cell, (Elman, GRU))


def unsupported_reason(cell: Cell) -> Optional[str]:
  """None if supported, else a sentence naming the option that has no fused backward."""
  if supports(cell):
    return None
  if isinstance(cell, LSTM):
    options = [name for name, on in (("peephole", cell.peephole), ("layer_norm", cell.layer_norm),
                                     ("proj_size", cell.proj_size is not None)) if on]
    return f"lstm: the fused backward covers the plain LSTM only, got options {options}"
  return f"{cell.name}: no fused backward for cell type {type(cell).__name__}"


def _recurrent_param_names(cell: Cell) -> tuple[str, ...]:
  """The params the recurrence reads besides a_t: W_hh (and the GRU's b_hn)."""
  return ("w_hh", "b_hn") if isinstance(cell, GRU) else ("w_hh",)


# ---- matmul helpers (math layout W: [out, in]) --------------------------------

def _back_through_weight(delta: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
  """W^T delta: delta [..., out], w [out, in] -> [..., in] (the gradient of v in W v)."""
  accumulate = None
  if compute_dtype is not None:
    accumulate = w.dtype
    delta, w = delta.astype(compute_dtype), w.astype(compute_dtype)
  return jax.lax.dot_general(delta, w, (((delta.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=accumulate)


def _times_weight(v: jax.Array, rec: Params, compute_dtype, rows=None) -> jax.Array:
  """W_hh[rows] v: v [..., H] -> [..., len(rows)], from rec["w_hh_t"] = W_hh^T [H, G*H]
  when the forward scan materialised it, else from W_hh itself."""
  if "w_hh_t" not in rec:
    w = rec["w_hh"] if rows is None else rec["w_hh"][rows]
    return linear(v, w, compute_dtype)
  # v W_hh^T contracts v with W_hh^T's first axis: the same product as _back_through_weight's.
  return _back_through_weight(v, rec["w_hh_t"] if rows is None else rec["w_hh_t"][:, rows], compute_dtype)


def _sum_outer(delta: jax.Array, v: jax.Array, compute_dtype, out_dtype) -> jax.Array:
  """sum over all leading (time and batch) axes of delta v^T: [..., out], [..., in] -> [out, in].

  This is the single matmul that gives dW = sum_t delta_t v_t^T after the scan.
  """
  lead = tuple(range(delta.ndim - 1))
  if compute_dtype is not None:
    delta, v = delta.astype(compute_dtype), v.astype(compute_dtype)
  return jax.lax.dot_general(delta, v, ((lead, lead), ((), ())),
                             preferred_element_type=out_dtype).astype(out_dtype)


def _hold(valid, new, old):
  """where(valid, new, old) leaf by leaf; valid: [...] broadcast over the feature axis."""
  if valid is None:
    return new
  return jax.tree_util.tree_map(lambda n, o: jnp.where(valid[..., None], n, o), new, old)


# ---- forward steps: (recurrent params, carry_{t-1}, a_t) -> (carry_t, saved_t) --------------

def _elman_forward(cell: Elman, rec: Params, h_prev, a_t):
  """h_t = f(a_t + W_hh h_{t-1}); nothing beyond h_t is saved (f' is a function of h_t)."""
  h_t = ACTIVATIONS[cell.activation](a_t + _times_weight(h_prev, rec, cell.dtype))
  return h_t, ()


def _lstm_forward(cell: LSTM, rec: Params, carry, a_t):
  """(i, f, g, o) = a_t + W_hh h_{t-1}; c_t = sigma(f) c_{t-1} + sigma(i) tanh(g); h_t = sigma(o) tanh(c_t).

  Saves the activated gates (sigma(i), sigma(f), tanh(g), sigma(o)), each [..., H].
  """
  h_prev, c_prev = carry
  recurrent = jnp.split(_times_weight(h_prev, rec, cell.dtype), 4, axis=-1)
  i, f, g, o = (a + u for a, u in zip(jnp.split(a_t, 4, axis=-1), recurrent))
  i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
  c_t = f * c_prev + i * g
  h_t = o * jnp.tanh(c_t)
  return LSTMState(h=h_t, c=c_t), (i, f, g, o)


def gru_forward_step(cell: GRU, rec: Params, h_prev, a_t):
  """GRU step; saves r, z, n and, with reset_after, s = W_hn h_{t-1} + b_hn (each [..., H]).

    reset_after:  n = tanh(a_n + r * s)            s = W_hn h_{t-1} + b_hn
    otherwise:    n = tanh(a_n + W_hn (r * h_{t-1}) + b_hn)
    h_t = (1 - z) * n + z * h_{t-1}
  """
  H = cell.hidden_size
  a_r, a_z, a_n = jnp.split(a_t, 3, axis=-1)
  if cell.reset_after:
    u_r, u_z, u_n = jnp.split(_times_weight(h_prev, rec, cell.dtype), 3, axis=-1)
    r, z = jax.nn.sigmoid(a_r + u_r), jax.nn.sigmoid(a_z + u_z)
    s = u_n + rec["b_hn"]
    n = jnp.tanh(a_n + r * s)
    saved = (r, z, n, s)
  else:
    u_r, u_z = jnp.split(_times_weight(h_prev, rec, cell.dtype, slice(0, 2 * H)), 2, axis=-1)
    r, z = jax.nn.sigmoid(a_r + u_r), jax.nn.sigmoid(a_z + u_z)
    n = jnp.tanh(a_n + _times_weight(r * h_prev, rec, cell.dtype, slice(2 * H, 3 * H)) + rec["b_hn"])
    saved = (r, z, n)
  h_t = (1.0 - z) * n + z * h_prev
  return h_t, saved


# ---- backward steps: (dcarry_t, saved_t, carry_{t-1}, carry_t) -> (dcarry_{t-1}, da_t, du_n_t) -------
# da_t is the cotangent of a_t. The cotangent du_t of the recurrent pre-activation
# u_t = W_hh h_{t-1} equals da_t except in the n block of the reset_after GRU, which is
# returned alone (du_n_t = da_n r, [..., H]; None for the other cells) so the scan
# stacks [G*H + H] instead of [2 G*H] per step.

def activation_derivative(activation: str, h: jax.Array) -> jax.Array:
  """f'(z) written as a function of h = f(z)."""
  if activation == "tanh":
    return 1.0 - h * h
  if activation == "sigmoid":
    return h * (1.0 - h)
  if activation == "relu":
    return (h > 0).astype(h.dtype)
  return jnp.ones_like(h)


def _elman_backward(cell: Elman, rec: Params, dh, saved, h_prev, h_t):
  """dz_t = dh_t * f'(z_t);  dh_{t-1} = W_hh^T dz_t."""
  del saved, h_prev
  dz = dh * activation_derivative(cell.activation, h_t)
  return _back_through_weight(dz, rec["w_hh"], cell.dtype), dz, None


def _lstm_backward(cell: LSTM, rec: Params, dcarry, saved, carry_prev, carry_t):
  """LSTM step backward (Graves 2012, ch. 4.6, with the torch gate order).

    dc = dc_{t+1 -> t} + dh * o * (1 - tanh^2(c_t))
    da_i = dc * g * i (1 - i);   da_f = dc * c_{t-1} * f (1 - f)
    da_g = dc * i * (1 - g^2);   da_o = dh * tanh(c_t) * o (1 - o)
    dh_{t-1} = W_hh^T da_t;      dc_{t-1} = dc * f
  """
  dh, dc = dcarry
  i, f, g, o = saved
  tanh_c = jnp.tanh(carry_t.c)
  dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
  da = jnp.concatenate([dc * g * i * (1.0 - i), dc * carry_prev.c * f * (1.0 - f),
                        dc * i * (1.0 - g * g), dh * tanh_c * o * (1.0 - o)], axis=-1)
  dh_prev = _back_through_weight(da, rec["w_hh"], cell.dtype)
  return LSTMState(h=dh_prev, c=dc * f), da, None


def _gru_backward(cell: GRU, rec: Params, dh, saved, h_prev, h_t):
  """GRU step backward.

    dn = dh (1 - z);  dz = dh (h_{t-1} - n);  da_n = dn (1 - n^2);  da_z = dz z (1 - z)
    reset_after:  da_r = da_n s r (1 - r);  du = (da_r, da_z, da_n r)
                  dh_{t-1} = z dh + W_hh^T du
    otherwise:    e = W_hn^T da_n;  da_r = e h_{t-1} r (1 - r);  du = (da_r, da_z, da_n)
                  dh_{t-1} = z dh + r e + W_h[rz]^T (da_r, da_z)
  """
  del h_t
  H = cell.hidden_size
  r, z, n = saved[:3]
  dn = dh * (1.0 - z)
  da_z = dh * (h_prev - n) * z * (1.0 - z)
  da_n = dn * (1.0 - n * n)
  w_hh = rec["w_hh"]
  if cell.reset_after:
    s = saved[3]
    da_r = da_n * s * r * (1.0 - r)
    du_n = da_n * r
    du = jnp.concatenate([da_r, da_z, du_n], axis=-1)
    dh_prev = dh * z + _back_through_weight(du, w_hh, cell.dtype)
  else:
    e = _back_through_weight(da_n, w_hh[2 * H:], cell.dtype)
    da_r = e * h_prev * r * (1.0 - r)
    du_n = None
    dh_prev = (dh * z + r * e
               + _back_through_weight(jnp.concatenate([da_r, da_z], axis=-1), w_hh[:2 * H], cell.dtype))
  da = jnp.concatenate([da_r, da_z, da_n], axis=-1)
  return dh_prev, da, du_n


def _steps(cell: Cell):
  if isinstance(cell, LSTM):
    return _lstm_forward, _lstm_backward
  if isinstance(cell, GRU):
    return gru_forward_step, _gru_backward
  return _elman_forward, _elman_backward


# ---- the scans ------------------------------------------------------------------

def split_gates(a: jax.Array, hidden_size: int):
  """[T, ..., G*H] -> a tuple of G gate blocks [T, ..., H] (a itself when G = 1).

  Scans read the input projections through this split and ``join_gates``: XLA:CPU
  vectorises an elementwise fusion badly when it slices a gate block out of the
  per-step dynamic slice of one stacked [T, B, G*H] array, and well when each block
  is its own array. The split is one copy before the scan; inside the body the
  simplifier forwards each joined block straight to its gate, so nothing is joined
  at run time (LSTM forward scan, B=32 T=128 H=256 on 2 CPU cores: 25.6 -> 15.9 ms).
  """
  if a.shape[-1] == hidden_size:
    return a
  return tuple(jnp.split(a, a.shape[-1] // hidden_size, axis=-1))


def join_gates(a_t):
  """The inverse of ``split_gates`` for one step: G blocks [..., H] -> [..., G*H]."""
  return jnp.concatenate(a_t, axis=-1) if isinstance(a_t, tuple) else a_t


def _hidden(carry):
  return carry.h if isinstance(carry, LSTMState) else carry


def _uses_cpu_kernel(cell: Cell, rec: Params, a: jax.Array, carry) -> bool:
  """True if the plain float32 LSTM runs in ``cpu_kernels`` (on CPU, when it is built) instead of lax.scan.

  An empty sequence (T = 0) stays on lax.scan, which returns the carry unchanged and hs [0, ..., H].
  """
  return (isinstance(cell, LSTM) and supports(cell) and cell.dtype is None and a.shape[0] > 0
          and jax.default_backend() == "cpu"
          and cpu_kernels.applies(cell.hidden_size, a, rec["w_hh"], carry.h, carry.c))


def kernel_adds_bias(cell: Cell, params: Params, xs: jax.Array, carry) -> bool:
  """True if ``fused_scan`` will run this layer in the CPU LSTM kernel, so that the caller can
  leave b out of a = W_xh x + b and pass it as ``input_bias`` (plain LSTM, float32 x, W_xh, b)."""
  return (_uses_cpu_kernel(cell, params, xs, carry)
          and cpu_kernels.applies(cell.hidden_size, params["w_xh"], params["b"]))


def _final_carry(carries, reverse: bool):
  return jax.tree_util.tree_map(lambda x: x[0 if reverse else -1], carries)


def _forward_scan(cell, reverse, unroll, rec, a, carry, mask, save: bool):
  """Scan the forward steps; returns (final carry, carries [T, ...], saved gates [T, ...] or None).

  The saved gates are a tuple of G blocks [T, ..., H] from the scan, or one [T, ..., 4H]
  array from the CPU LSTM kernel.
  """
  if _uses_cpu_kernel(cell, rec, a, carry):
    hs, cs, gates = cpu_kernels.lstm_forward(a, rec["w_hh"], carry.h, carry.c, mask,
                                             bias=rec.get("input_bias"), reverse=reverse, save_gates=save)
    carries = LSTMState(h=hs, c=cs)
    return _final_carry(carries, reverse), carries, gates
  if "input_bias" in rec:
    a = a + rec["input_bias"]
  forward_step = _steps(cell)[0]
  # W_hh^T is materialised once, before the loop, so the in-loop product is a plain
  # [B, H] x [H, G*H] matmul; the barrier keeps XLA from folding the transpose back into
  # the dot. XLA:CPU runs that form 25-35% faster than W_hh with its last axis contracted
  # at these shapes (train step, B=32 T=128: LSTM -4-5%, GRU -6-10%, Elman -10-17%).
  rec = {**rec, "w_hh_t": jax.lax.optimization_barrier(rec["w_hh"].T)}

  def body(carry_prev, inputs):
    a_t, valid_t = inputs
    carry_t, saved_t = forward_step(cell, rec, carry_prev, join_gates(a_t))
    carry_t = _hold(valid_t, carry_t, carry_prev)
    return carry_t, ((carry_t, saved_t) if save else carry_t)

  carry, stacked = jax.lax.scan(body, carry, (split_gates(a, cell.hidden_size), mask),
                                reverse=reverse, unroll=unroll)
  if save:
    return carry, stacked[0], stacked[1]
  return carry, stacked, None


def _shift_previous(initial, stacked, reverse: bool):
  """carry_{t-1} for every t: [initial, stacked[:-1]] (or [stacked[1:], initial] when reversed)."""
  def shift(first, seq):
    if reverse:
      return jnp.concatenate([seq[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], seq[:-1]], axis=0)
  return jax.tree_util.tree_map(shift, initial, stacked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(cell, reverse, unroll, rec, a, carry, mask):
  carry_T, carries, _ = _forward_scan(cell, reverse, unroll, rec, a, carry, mask, save=False)
  return carry_T, _hidden(carries)


def _fused_fwd(cell, reverse, unroll, rec, a, carry, mask):
  carry_T, carries, saved = _forward_scan(cell, reverse, unroll, rec, a, carry, mask, save=True)
  return (carry_T, _hidden(carries)), (rec, carry, mask, carries, saved)


def _fused_bwd(cell, reverse, unroll, residuals, cotangents):
  rec, carry_0, mask, carries, saved = residuals
  d_carry_T, d_hs = cotangents
  previous = _shift_previous(carry_0, carries, reverse)
  if not isinstance(saved, tuple):  # the CPU LSTM kernel's [T, ..., 4H] gates
    da, dh_0, dc_0 = cpu_kernels.lstm_backward(saved, carries.c, carry_0.c, rec["w_hh"], d_hs, d_carry_T.h,
                                               d_carry_T.c, mask, reverse=reverse)
    d_rec = {"w_hh": _sum_outer(da, previous.h, cell.dtype, rec["w_hh"].dtype)}
    return _with_input_bias_gradient(d_rec, rec, da), da, LSTMState(h=dh_0, c=dc_0), None
  backward_step = _steps(cell)[1]
  is_lstm = isinstance(cell, LSTM)

  def body(dcarry, inputs):
    d_h_out, saved_t, prev_t, carry_t, valid_t = inputs
    if is_lstm:
      dcarry = LSTMState(h=dcarry.h + d_h_out, c=dcarry.c)
    else:
      dcarry = dcarry + d_h_out
    dcarry_prev, da, du_n = backward_step(cell, rec, dcarry, saved_t, prev_t, carry_t)
    if valid_t is not None:
      dcarry_prev = _hold(valid_t, dcarry_prev, dcarry)
      da, du_n = _hold(valid_t, (da, du_n), jax.tree_util.tree_map(jnp.zeros_like, (da, du_n)))
    return dcarry_prev, (da, du_n)

  d_carry_0, deltas = jax.lax.scan(body, d_carry_T, (d_hs, saved, previous, carries, mask),
                                   reverse=not reverse, unroll=unroll)
  da, du_n = deltas
  du = da if du_n is None else jnp.concatenate([da[..., :2 * cell.hidden_size], du_n], axis=-1)
  h_prev = _hidden(previous)
  w_hh = rec["w_hh"]
  if isinstance(cell, GRU) and not cell.reset_after:
    H = cell.hidden_size
    r = saved[0]
    d_w_hh = jnp.concatenate([
        _sum_outer(du[..., :2 * H], h_prev, cell.dtype, w_hh.dtype),
        _sum_outer(du[..., 2 * H:], r * h_prev, cell.dtype, w_hh.dtype)], axis=0)
  else:
    d_w_hh = _sum_outer(du, h_prev, cell.dtype, w_hh.dtype)
  d_rec = {"w_hh": d_w_hh}
  if isinstance(cell, GRU):
    H = cell.hidden_size
    d_rec["b_hn"] = jnp.sum(du[..., 2 * H:], axis=tuple(range(du.ndim - 1))).astype(rec["b_hn"].dtype)
  return _with_input_bias_gradient(d_rec, rec, da), da, d_carry_0, None


def _with_input_bias_gradient(d_rec, rec, da):
  """d input_bias = sum_t da_t (over every leading axis), when the bias came in separately."""
  if "input_bias" in rec:
    d_rec["input_bias"] = jnp.sum(da, axis=tuple(range(da.ndim - 1))).astype(rec["input_bias"].dtype)
  return d_rec


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_scan(cell: Cell, params: Params, a: jax.Array, carry, mask=None, *,
               reverse: bool = False, unroll: int = 1, input_bias=None):
  """The cell's recurrence over a: [T, ..., G*H] with the hand-derived backward pass.

    carry_t, h_t = recurrence(carry_{t-1}, a_t)    where mask_t (else carry held)

  Args:
    cell: a cell for which ``supports(cell)`` is True.
    params: the cell's params (only W_hh, and b_hn for the GRU, are read here;
      the input projection a = W_xh x + b is the caller's, so its gradient
      flows through the caller's autodiff from da).
    a: [T, ..., G*H], the input projections, time on axis 0.
    carry: the initial carry with the batch axes of a ([..., H] or LSTMState).
    mask: optional [T, ...] bool, True on real steps.
    reverse: scan t = T-1, ..., 0.
    unroll: ``lax.scan`` unroll for both the forward and the backward scan.
    input_bias: optional [G*H] added to every a_t (a then holds W_xh x alone). The CPU LSTM
      kernel adds it while reading a_t; elsewhere it is added before the scan.
  Returns:
    (final carry, hs: [T, ..., H]) with hs_t the (held) hidden state after step t.
  """
  reason = unsupported_reason(cell)
  if reason is not None:
    raise ValueError(reason + "; use backward='autodiff' (or 'auto')")
  rec = {name: params[name] for name in _recurrent_param_names(cell)}
  if input_bias is not None:
    rec["input_bias"] = input_bias
  return _fused(cell, reverse, unroll, rec, a, carry, mask)
