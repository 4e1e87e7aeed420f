"""Hand-derived backpropagation through time (``jax.custom_vjp``), with backward rules registered per cell.

``manual_scan`` runs a cell's recurrence over precomputed input projections a_t = W_xh x_t + b,
as ``sequence.scan_recurrence`` does, and replaces JAX's automatic transpose of the scan by the
cell's own backward equations:

* the forward scan runs the cell's ``recurrence_saving`` and keeps what its rule reads (the
  activated gates, not the pre-activations);
* the backward scan carries ONLY the state gradients (dh, and dc for the LSTM) and emits the
  gate-pre-activation gradients da_t;
* after the scan, dW_hh = sum_t du_t h_{t-1}^T is ONE matmul over all T (and B) steps, and da
  (all t) is returned as the cotangent of a, so the caller's autodiff of the hoisted input
  projection computes dW_xh = sum_t da_t x_t^T as one matmul too.

Shapes: a: [T, ..., G*H] with any leading batch axes after time (usually time-major
[T, B, G*H]); the carry has the same batch axes ([..., H], or an ``LSTMState`` of two); mask:
[T, ...] bool, True on real steps. On masked steps the carry is held (carry_t = carry_{t-1}) and
hs_t is the held hidden state.

Adding a cell's backward pass is one ``register(CellType, BackwardRule(...))`` call: the rule
names the params the recurrence reads besides a_t, derives one step backward, and forms the
weight gradients after the scan. Registered here: Elman (every activation), the plain LSTM, the
LSTM with peepholes, and the GRU (both ``reset_after`` variants). ``supports(cell)`` is a lookup.

Fused kernels. ``kernel_choice`` decides ONCE, at trace time, whether a fused C++ kernel runs
the recurrence (on CPU in float32: the plain LSTM, ``rnn_jax.lstm_kernel``; the GRU in both
variants, ``rnn_jax.gru_kernel``; the Elman cell with any activation, ``rnn_jax.elman_kernel``)
and says why not when it does not; the decision travels as a static argument of the custom VJP.
Without a gradient (inference) the kernels' forward calls save no gates.

Forward mode. ``jax.jvp`` cannot pass a ``custom_vjp``, and the kernel has no derivative of its
own: under forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) the scan
falls back to the autodiff path and the kernel to the scan, so every derivative works.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rnn_jax import elman_kernel, gru_kernel, lstm_kernel
from rnn_jax import mesh as mesh_lib
from rnn_jax.cells import (ACTIVATIONS, GRU, LSTM, Cell, Elman, LSTMState, Params, TransposedWeight,
                           _check_features, linear, linear_transposed)


# ---------------------------------------------------------------------------
# Backward rules, registered per cell type
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BackwardRule:
  """The hand-derived backward pass of one cell type.

  recurrent_params(cell) -> names of the params the recurrence reads besides a_t (W_hh, ...).
  applies(cell) -> None if the rule covers this cell's options, else the reason it does not.
  step(cell, weights, dcarry_t, saved_t, carry_{t-1}, carry_t) -> (dcarry_{t-1}, da_t, extra_t):
    one step backward; dcarry_t already includes dL/dh_t of this step's output; extra_t is any
    per-step value the weight gradients need besides da_t (None if none), stacked by the scan.
  weight_gradients(cell, weights, da, extra, previous, carries, saved) -> {name: gradient}:
    the gradients of ``recurrent_params`` after the scan (da, extra, saved stacked over T;
    previous = carry_{t-1} and carries = carry_t for every t).
  """
  recurrent_params: Callable[[Cell], tuple]
  applies: Callable[[Cell], Optional[str]]
  step: Callable[..., tuple]
  weight_gradients: Callable[..., dict]


_RULES: dict[type, BackwardRule] = {}


def register(cell_type: type, rule: BackwardRule) -> None:
  """Give ``cell_type`` (and its subclasses without a rule of their own) a hand-derived backward pass."""
  _RULES[cell_type] = rule


def rule_for(cell: Cell) -> Optional[BackwardRule]:
  """The registered rule of the cell's type (or nearest base type), or None."""
  for klass in type(cell).__mro__:
    if klass in _RULES:
      return _RULES[klass]
  return None


def unsupported_reason(cell: Cell) -> Optional[str]:
  """None if ``manual_scan`` has a hand-derived backward for this cell, else a sentence saying why not."""
  rule = rule_for(cell)
  if rule is None:
    return f"{cell.name}: no hand-derived backward rule is registered for {type(cell).__name__}"
  return rule.applies(cell)


def supports(cell: Cell) -> bool:
  """True if a registered rule covers this cell's options."""
  return unsupported_reason(cell) is None


# ---- matmul helpers (math layout W: [out, in]) --------------------------------

def sum_outer(delta: jax.Array, v: jax.Array, compute_dtype, out_dtype) -> jax.Array:
  """sum over all leading (time and batch) axes of delta v^T: [..., out], [..., in] -> [out, in].

  This is the single matmul that gives dW = sum_t delta_t v_t^T after the scan. On the CPU, where
  delta is the wider factor (out > in: the gate blocks of an LSTM or GRU against h_{t-1}), it is
  formed as (v^T delta)^T: XLA:CPU copies the narrow v [T B, in] into the matmul's layout instead
  of delta [T B, out], and a barrier keeps XLA from folding the transpose back into the dot, which
  gives delta^T v, a dot with the long axis leading both operands that XLA:CPU runs on its slower
  Eigen path (AMD EPYC, 2 cores, B=32, T=128: the LSTM layer's gradient 35.6 -> 29.0 ms at H=256 and
  101.5 -> 91.3 ms at H=512; the GRU's 2-5% faster). Where out <= in (the Elman cell) the plain
  form measured faster.
  """
  lead = tuple(range(delta.ndim - 1))
  if compute_dtype is not None:
    delta, v = delta.astype(compute_dtype), v.astype(compute_dtype)
  contract = ((lead, lead), ((), ()))
  if delta.shape[-1] > v.shape[-1] and jax.default_backend() == "cpu":
    transposed = jax.lax.dot_general(v, delta, contract, preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(transposed).T.astype(out_dtype)
  return jax.lax.dot_general(delta, v, contract, preferred_element_type=out_dtype).astype(out_dtype)


def _sum_leading(x: jax.Array, dtype) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(x.ndim - 1))).astype(dtype)


def _hold(valid, new, old):
  """where(valid, new, old) leaf by leaf; valid: [...] broadcast over the feature axis."""
  if valid is None:
    return new
  return jax.tree_util.tree_map(lambda n, o: jnp.where(valid[..., None], n, o), new, old)


def activation_derivative(activation: str, h: jax.Array) -> jax.Array:
  """f'(z) written as a function of h = f(z)."""
  if activation == "tanh":
    return 1.0 - h * h
  if activation == "sigmoid":
    return h * (1.0 - h)
  if activation == "relu":
    return (h > 0).astype(h.dtype)
  return jnp.ones_like(h)


def _w_hh_gradient(cell, weights, da, extra, previous, carries, saved) -> dict:
  """dW_hh = sum_t da_t h_{t-1}^T (Elman, plain LSTM)."""
  del extra, carries, saved
  w_hh = weights["w_hh"]
  return {"w_hh": sum_outer(da, cell.hidden(previous), cell.dtype, w_hh.dtype)}


# ---- Elman ------------------------------------------------------------------------

def _elman_step(cell: Elman, weights: Params, dh, saved, h_prev, h_t):
  """dz_t = dh_t * f'(z_t);  dh_{t-1} = W_hh^T dz_t."""
  del saved, h_prev
  dz = dh * activation_derivative(cell.activation, h_t)
  return linear_transposed(dz, weights["w_hh"], cell.dtype), dz, None


register(Elman, BackwardRule(recurrent_params=lambda cell: ("w_hh",), applies=lambda cell: None,
                             step=_elman_step, weight_gradients=_w_hh_gradient))


# ---- LSTM, plain and with peepholes -------------------------------------------------

def _lstm_options(cell: LSTM) -> list[str]:
  return [name for name, on in (("layer_norm", cell.layer_norm), ("proj_size", cell.proj_size is not None))
          if on]


def _lstm_applies(cell: LSTM) -> Optional[str]:
  options = _lstm_options(cell)
  if options:
    return f"lstm: the hand-derived backward covers the plain and the peephole LSTM, got options {options}"
  return None


def _lstm_step(cell: LSTM, weights: Params, dcarry, saved, carry_prev, carry_t):
  """LSTM step backward (Graves 2012, ch. 4.6, with the torch gate order), peepholes included.

    da_o = dh * tanh(c_t) * o (1 - o)
    dc   = dc_{t+1 -> t} + dh * o * (1 - tanh^2(c_t)) + da_o p_o
    da_i = dc * g * i (1 - i);   da_f = dc * c_{t-1} * f (1 - f);   da_g = dc * i * (1 - g^2)
    dh_{t-1} = W_hh^T da_t;      dc_{t-1} = dc * f + da_i p_i + da_f p_f
  (p = 0 without peepholes.)
  """
  dh, dc = dcarry
  i, f, g, o = saved
  tanh_c = jnp.tanh(carry_t.c)
  da_o = dh * tanh_c * o * (1.0 - o)
  dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
  if cell.peephole:
    dc = dc + da_o * weights["p_o"]
  da_i, da_f, da_g = dc * g * i * (1.0 - i), dc * carry_prev.c * f * (1.0 - f), dc * i * (1.0 - g * g)
  da = jnp.concatenate([da_i, da_f, da_g, da_o], axis=-1)
  dh_prev = linear_transposed(da, weights["w_hh"], cell.dtype)
  dc_prev = dc * f
  if cell.peephole:
    dc_prev = dc_prev + da_i * weights["p_i"] + da_f * weights["p_f"]
  return LSTMState(h=dh_prev, c=dc_prev), da, None


def _lstm_gradients(cell: LSTM, weights, da, extra, previous, carries, saved) -> dict:
  """dW_hh = sum_t da_t h_{t-1}^T; with peepholes dp_i = sum da_i c_{t-1}, dp_f = sum da_f c_{t-1},
  dp_o = sum da_o c_t (sums over every leading axis)."""
  gradients = _w_hh_gradient(cell, weights, da, extra, previous, carries, saved)
  if cell.peephole:
    da_i, da_f, _, da_o = jnp.split(da, 4, axis=-1)
    dtype = weights["p_i"].dtype
    gradients.update(p_i=_sum_leading(da_i * previous.c, dtype), p_f=_sum_leading(da_f * previous.c, dtype),
                     p_o=_sum_leading(da_o * carries.c, dtype))
  return gradients


register(LSTM, BackwardRule(
    recurrent_params=lambda cell: ("w_hh", "p_i", "p_f", "p_o") if cell.peephole else ("w_hh",),
    applies=_lstm_applies, step=_lstm_step, weight_gradients=_lstm_gradients))


# ---- GRU ------------------------------------------------------------------------------

def _gru_step(cell: GRU, weights: Params, dh, saved, h_prev, h_t):
  """GRU step backward.

    dn = dh (1 - z);  dz = dh (h_{t-1} - n);  da_n = dn (1 - n^2);  da_z = dz z (1 - z)
    reset_after:  da_r = da_n s r (1 - r);  du = (da_r, da_z, da_n r)
                  dh_{t-1} = z dh + W_hh^T du
    otherwise:    e = W_hn^T da_n;  da_r = e h_{t-1} r (1 - r);  du = (da_r, da_z, da_n)
                  dh_{t-1} = z dh + r e + W_h[rz]^T (da_r, da_z)
  The cotangent du_t of u_t = W_hh h_{t-1} equals da_t except in the n block of the
  reset_after GRU, which is returned alone as the extra (du_n = da_n r, [..., H]).
  """
  del h_t
  H = cell.hidden_size
  r, z, n = saved[:3]
  dn = dh * (1.0 - z)
  da_z = dh * (h_prev - n) * z * (1.0 - z)
  da_n = dn * (1.0 - n * n)
  w_hh = weights["w_hh"]
  if cell.reset_after:
    s = saved[3]
    da_r = da_n * s * r * (1.0 - r)
    du_n = da_n * r
    du = jnp.concatenate([da_r, da_z, du_n], axis=-1)
    dh_prev = dh * z + linear_transposed(du, w_hh, cell.dtype)
  else:
    e = linear_transposed(da_n, w_hh[2 * H:], cell.dtype)
    da_r = e * h_prev * r * (1.0 - r)
    du_n = None
    dh_prev = (dh * z + r * e
               + linear_transposed(jnp.concatenate([da_r, da_z], axis=-1), w_hh[:2 * H], cell.dtype))
  da = jnp.concatenate([da_r, da_z, da_n], axis=-1)
  return dh_prev, da, du_n


def _gru_gradients(cell: GRU, weights, da, du_n, previous, carries, saved) -> dict:
  """dW_hh = sum_t du_t h_{t-1}^T (reset-before: the n block pairs with r h_{t-1}); db_hn = sum du_n.

  The (r, z) rows and the n rows are two matmuls, so du = (da_r, da_z, du_n) is never
  assembled: that concatenation and its transpose cost two [T, B, 3H] copies per step of training.
  """
  del carries
  H = cell.hidden_size
  du_n = da[..., 2 * H:] if du_n is None else du_n
  h_prev, w_hh = previous, weights["w_hh"]
  h_n = h_prev if cell.reset_after else saved[0] * h_prev
  d_w_hh = jnp.concatenate([sum_outer(da[..., :2 * H], h_prev, cell.dtype, w_hh.dtype),
                            sum_outer(du_n, h_n, cell.dtype, w_hh.dtype)], axis=0)
  return {"w_hh": d_w_hh, "b_hn": _sum_leading(du_n, weights["b_hn"].dtype)}


register(GRU, BackwardRule(recurrent_params=lambda cell: ("w_hh", "b_hn"), applies=lambda cell: None,
                           step=_gru_step, weight_gradients=_gru_gradients))


# ---------------------------------------------------------------------------
# The kernel decision
# ---------------------------------------------------------------------------

class KernelChoice(NamedTuple):
  """Whether a fused kernel runs a recurrence: ``kernel`` its name (None: lax.scan), and why not."""
  kernel: Optional[str]
  reason: str


KERNELS = {"lstm_cpu": (LSTM, lstm_kernel), "gru_cpu": (GRU, gru_kernel), "elman_cpu": (Elman, elman_kernel)}
"""Every fused kernel by name: (the cell type whose equations it runs, its module)."""


def _kernel_options_reason(cell: Cell) -> Optional[str]:
  """Why the cell's options fall outside its kernel's equations, or None."""
  if isinstance(cell, LSTM) and (cell.peephole or _lstm_options(cell)):
    return "lstm: the fused kernel runs the plain LSTM only (no peephole, layer_norm or proj_size)"
  if isinstance(cell, Elman) and cell.activation not in elman_kernel.ACTIVATION_CODES:
    return f"elman: the fused kernel has no activation {cell.activation!r}"
  return None


def _kernel_description(cell: Cell) -> str:
  if isinstance(cell, GRU):
    return f"float32 GRU ({'reset_after' if cell.reset_after else 'reset_before'}) on CPU"
  if isinstance(cell, Elman):
    return f"float32 {cell.activation} Elman on CPU"
  return "plain float32 LSTM on CPU"


def kernel_choice(cell: Cell, params: Params, a: jax.Array, carry) -> KernelChoice:
  """The ONE decision, at trace time, of whether a fused kernel runs this recurrence.

  a: [T, ..., G*H] the input projections (or the inputs, for the dtype check); carry: the
  initial carry with a's batch axes. A kernel of ``KERNELS`` runs a cell whose type's
  equations it implements (a subclass that redefines the recurrence keeps lax.scan), with
  options it covers, no compute dtype, T > 0, on the CPU backend, and where its library is
  built, H is a multiple of the vector width and every array is float32.
  """
  name = next((name for name, (base, _) in KERNELS.items() if isinstance(cell, base)), None)
  if name is None:
    return KernelChoice(None, f"{cell.name}: no fused kernel for {type(cell).__name__}")
  base, module = KERNELS[name]
  klass = type(cell)
  if klass.recurrence_saving is not base.recurrence_saving or klass.recurrence is not Cell.recurrence:
    return KernelChoice(None, f"{cell.name}: {klass.__name__} redefines the {base.__name__} recurrence, "
                        f"which the fused kernel does not run")
  reason = _kernel_options_reason(cell)
  if reason is not None:
    return KernelChoice(None, reason)
  if cell.dtype is not None:
    return KernelChoice(None, f"{cell.name}: the fused kernel computes in float32, not dtype={cell.dtype!r}")
  if a.shape[0] == 0:
    return KernelChoice(None, f"{cell.name}: an empty sequence (T = 0) stays on lax.scan")
  if jax.default_backend() != "cpu":
    return KernelChoice(None, f"{cell.name}: the fused kernel is for CPU, the backend is "
                        f"{jax.default_backend()}")
  devices = mesh_lib.partitioned_devices()
  if devices > 1:
    return KernelChoice(None, f"{cell.name}: traced for a mesh of {devices} devices; the fused kernel has no "
                        f"partitioning rule (XLA would run it whole on every device), lax.scan is split")
  recurrent = [params[key] for key in rule_for(cell).recurrent_params(cell)]
  reason = module.LIBRARY.why_not(cell.hidden_size, a, *recurrent, *jax.tree_util.tree_leaves(carry))
  if reason is not None:
    return KernelChoice(None, reason)
  return KernelChoice(name, _kernel_description(cell))


def kernel_adds_bias(cell: Cell, params: Params, xs: jax.Array, carry) -> bool:
  """True if the fused kernel will run this layer and can add b while it reads a_t, so that the
  caller leaves b out of a = W_xh x + b and passes it as ``input_bias``."""
  name = kernel_choice(cell, params, xs, carry).kernel
  if name is None:
    return False
  return KERNELS[name][1].LIBRARY.applies(cell.hidden_size, params["w_xh"], cell.projection_bias(params))


def step_kernel_choice(cell: Cell, params: Params, x_t: jax.Array, carry) -> KernelChoice:
  """Whether a fused kernel runs ONE step x_t -> (carry_t, h_t) (decoding, sampling, generation),
  its input projection included (``lstm_kernel.lstm_step``, ``gru_kernel.gru_step``,
  ``elman_kernel.elman_step``): where ``kernel_choice`` would run the cell's recurrence, and the
  cell keeps ``Cell.step`` and its type's input projection; else the reason it does not."""
  choice = kernel_choice(cell, params, x_t[None], carry)
  if choice.kernel is None:
    return choice
  base, module = KERNELS[choice.kernel]
  klass = type(cell)
  if klass.step is not Cell.step or klass.input_projection is not base.input_projection:
    return KernelChoice(None, f"{cell.name}: {klass.__name__} redefines the {base.__name__} step or input "
                        f"projection, which the fused step does not run")
  reason = module.LIBRARY.why_not(cell.hidden_size, params["w_xh"], params["b"])  # x_t was checked as a
  if reason is not None:
    return KernelChoice(None, reason)
  return KernelChoice(choice.kernel, choice.reason + ", one decoding step")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _kernel_step(kernel: str, cell: Cell, params: Params, carry, x_t: jax.Array):
  """(carry_t, h_t) of one step from the fused kernel ``kernel``."""
  if kernel == "lstm_cpu":
    h_t, c_t = lstm_kernel.lstm_step(x_t, params["w_xh"], params["w_hh"], params["b"], carry.h, carry.c)
    return LSTMState(h_t, c_t), h_t
  if kernel == "gru_cpu":
    h_t = gru_kernel.gru_step(x_t, params["w_xh"], params["w_hh"], params["b"], params["b_hn"], carry,
                              reset_after=cell.reset_after)
  else:
    h_t = elman_kernel.elman_step(x_t, params["w_xh"], params["w_hh"], params["b"], carry,
                                  activation=cell.activation)
  return h_t, h_t


@_kernel_step.defjvp
def _kernel_step_jvp(kernel, cell, primals, tangents):
  """Differentiated (forward mode, and reverse mode through JAX's transpose of this rule), the
  step is the cell's own equations in XLA, ``cell.recurrence(params, carry,
  cell.input_projection(params, x_t))``, values included: a gradient costs what it cost without
  the kernel, and only undifferentiated steps (decoding) run the kernel."""
  del kernel
  reference = lambda params, carry, x_t: cell.recurrence(params, carry, cell.input_projection(params, x_t))
  return jax.jvp(reference, primals, tangents)


def fused_step(cell: Cell, params: Params, carry, x_t: jax.Array):
  """(carry_t, h_t) of one step from the fused kernel where ``step_kernel_choice`` picks one, else None
  (``Cell.step`` then runs the cell's equations in XLA)."""
  kernel = step_kernel_choice(cell, params, x_t, carry).kernel
  if kernel is None:
    return None
  _check_features(cell.name, "x", x_t, params["w_xh"].shape[1])
  return _kernel_step(kernel, cell, params, carry, x_t)


# ---------------------------------------------------------------------------
# The scans
# ---------------------------------------------------------------------------

def split_gates(a: jax.Array, hidden_size: int):
  """[T, ..., G*H] -> a tuple of G gate blocks [T, ..., H] (a itself when G = 1).

  Scans read the input projections through this split and ``join_gates``: XLA:CPU
  vectorises an elementwise fusion badly when it slices a gate block out of the
  per-step dynamic slice of one stacked [T, B, G*H] array, and well when each block
  is its own array. The split is one copy before the scan; inside the body the
  simplifier forwards each joined block straight to its gate, so nothing is joined
  at run time (LSTM forward scan, B=32 T=128 H=256 on 2 CPU cores: 25.6 -> 15.9 ms).
  A projection whose width is not a multiple of H (a deep-transition cell's first layer,
  D_1 units) stays whole.
  """
  if a.shape[-1] == hidden_size or a.shape[-1] % hidden_size:
    return a
  return tuple(jnp.split(a, a.shape[-1] // hidden_size, axis=-1))


def join_gates(a_t):
  """The inverse of ``split_gates`` for one step: G blocks [..., H] -> [..., G*H]."""
  return jnp.concatenate(a_t, axis=-1) if isinstance(a_t, tuple) else a_t


class Operands(NamedTuple):
  """What the recurrence reads besides a and the carry: the cell's recurrent weights by name and
  an optional input bias [G*H] that is added to every a_t."""
  weights: dict
  input_bias: Any


def _final_carry(carries, reverse: bool):
  return jax.tree_util.tree_map(lambda x: x[0 if reverse else -1], carries)


def _is_forward_mode_error(error: Exception) -> bool:
  """True for the errors JAX raises when forward mode meets the kernel's FFI call."""
  text = str(error)
  return "cannot be differentiated" in text or "forward-mode" in text or "Differentiation rule" in text


def _kernel_forward(kernel: str, cell, operands: Operands, a, carry, mask, reverse: bool, save: bool):
  """(final carry, carries [T, ...], saved) from the fused kernel; saved is what its backward reads:
  the gates as one [T, ..., k*H] array (or None when not saved), () for the Elman cell. Without
  save (inference) the LSTM's carries hold hs alone (c=None): only the final c_T is computed."""
  w_hh, bias = operands.weights["w_hh"], operands.input_bias
  if kernel == "lstm_cpu":
    hs, cs, saved = lstm_kernel.lstm_forward(a, w_hh, carry.h, carry.c, mask, bias=bias, reverse=reverse,
                                             save_gates=save)
    if not save:
      return LSTMState(h=_final_carry(hs, reverse), c=cs), LSTMState(h=hs, c=None), None
    carries = LSTMState(h=hs, c=cs)
  elif kernel == "gru_cpu":
    carries, saved = gru_kernel.gru_forward(a, w_hh, operands.weights["b_hn"], carry, mask, bias=bias,
                                            reverse=reverse, reset_after=cell.reset_after, save_gates=save)
  else:
    carries, saved = elman_kernel.elman_forward(a, w_hh, carry, mask, bias=bias, reverse=reverse,
                                                activation=cell.activation), ()
  return _final_carry(carries, reverse), carries, saved


def _scan_forward(cell, reverse, unroll, operands: Operands, a, carry, mask, save: bool):
  """The forward steps in lax.scan; returns (final carry, carries [T, ...], saved [T, ...] or None)."""
  if operands.input_bias is not None:
    a = a + operands.input_bias
  # W_hh^T is materialised once, before the loop, so the in-loop product is a plain
  # [B, H] x [H, G*H] matmul; the barrier keeps XLA from folding the transpose back into
  # the dot. XLA:CPU runs that form 25-35% faster than W_hh with its last axis contracted
  # at these shapes (train step, B=32 T=128: LSTM -4-5%, GRU -6-10%, Elman -10-17%).
  weights = {**operands.weights, "w_hh": TransposedWeight(jax.lax.optimization_barrier(operands.weights["w_hh"].T))}

  def body(carry_prev, inputs):
    a_t, valid_t = inputs
    carry_t, _, saved_t = cell.recurrence_saving(weights, carry_prev, join_gates(a_t))
    carry_t = _hold(valid_t, carry_t, carry_prev)
    return carry_t, ((carry_t, saved_t) if save else carry_t)

  final, stacked = jax.lax.scan(body, carry, (split_gates(a, cell.hidden_size), mask), reverse=reverse,
                                unroll=unroll)
  return (final, *stacked) if save else (final, stacked, None)


def _forward(cell, reverse, unroll, kernel, operands, a, carry, mask, save: bool):
  """(final carry, carries [T, ...], saved or None) from the chosen kernel, or from lax.scan; without
  save only the hidden part of the carries is kept."""
  if kernel is not None:
    try:
      return _kernel_forward(kernel, cell, operands, a, carry, mask, reverse, save)
    except (NotImplementedError, TypeError, ValueError) as error:  # forward-mode differentiation of the kernel
      if not _is_forward_mode_error(error):
        raise
  return _scan_forward(cell, reverse, unroll, operands, a, carry, mask, save)


def _shift_previous(initial, stacked, reverse: bool):
  """carry_{t-1} for every t: [initial, stacked[:-1]] (or [stacked[1:], initial] when reversed)."""
  def shift(first, seq):
    if seq.shape[0] == 0:  # T = 0: no step, no previous carry
      return seq
    if reverse:
      return jnp.concatenate([seq[1:], first[None]], axis=0)
    return jnp.concatenate([first[None], seq[:-1]], axis=0)
  return jax.tree_util.tree_map(shift, initial, stacked)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _manual(cell, reverse, unroll, kernel, operands, a, carry, mask):
  final, carries, _ = _forward(cell, reverse, unroll, kernel, operands, a, carry, mask, save=False)
  return final, cell.hidden(carries)


def _manual_fwd(cell, reverse, unroll, kernel, operands, a, carry, mask):
  final, carries, saved = _forward(cell, reverse, unroll, kernel, operands, a, carry, mask, save=True)
  return (final, cell.hidden(carries)), (operands, carry, mask, carries, saved)


def _kernel_backward(kernel: str, cell, operands, saved, carries, carry_0, d_hs, d_carry_T, mask, reverse):
  """(da, extra, d_carry_0) from the fused kernel's backward call; saved as ``_kernel_forward`` returns it
  (or the scan's tuple of gate blocks, joined here into the kernel's layout)."""
  w_hh = operands.weights["w_hh"]
  if isinstance(saved, tuple) and saved:
    saved = jnp.concatenate(saved, axis=-1)
  if kernel == "lstm_cpu":
    da, dh_0, dc_0 = lstm_kernel.lstm_backward(saved, carries.c, carry_0.c, w_hh, d_hs, d_carry_T.h,
                                               d_carry_T.c, mask, reverse=reverse)
    return da, None, LSTMState(h=dh_0, c=dc_0)
  if kernel == "gru_cpu":
    return gru_kernel.gru_backward(saved, carries, carry_0, w_hh, d_hs, d_carry_T, mask, reverse=reverse,
                                   reset_after=cell.reset_after)
  da, dh_0 = elman_kernel.elman_backward(carries, w_hh, d_hs, d_carry_T, mask, reverse=reverse,
                                         activation=cell.activation)
  return da, None, dh_0


def _scan_backward(cell, rule, unroll, operands, saved, previous, carries, d_hs, d_carry_T, mask, reverse):
  def body(dcarry, inputs):
    d_h_out, saved_t, prev_t, carry_t, valid_t = inputs
    dcarry = cell.with_hidden(dcarry, cell.hidden(dcarry) + d_h_out)
    dcarry_prev, da, extra = rule.step(cell, operands.weights, dcarry, saved_t, prev_t, carry_t)
    if valid_t is not None:
      dcarry_prev = _hold(valid_t, dcarry_prev, dcarry)
      da, extra = _hold(valid_t, (da, extra), jax.tree_util.tree_map(jnp.zeros_like, (da, extra)))
    return dcarry_prev, (da, extra)

  d_carry_0, (da, extra) = jax.lax.scan(body, d_carry_T, (d_hs, saved, previous, carries, mask),
                                        reverse=not reverse, unroll=unroll)
  return da, extra, d_carry_0


def _backward_recurrence(cell, reverse, unroll, kernel, residuals, cotangents):
  """(da, extra, d_carry_0, previous, saved) of the backward pass through the recurrence (the kernel's
  backward call, or the rule's scan), before any weight gradient is formed."""
  operands, carry_0, mask, carries, saved = residuals
  d_carry_T, d_hs = cotangents
  rule = rule_for(cell)
  previous = _shift_previous(carry_0, carries, reverse)
  result = None
  if kernel is not None:
    try:
      result = _kernel_backward(kernel, cell, operands, saved, carries, carry_0, d_hs, d_carry_T, mask,
                                reverse)
    except (NotImplementedError, TypeError, ValueError) as error:  # a second derivative through the kernel
      if not _is_forward_mode_error(error):
        raise
  if not isinstance(saved, tuple):  # a kernel's [T, ..., k*H] gates, as the rules read them: k blocks of H
    saved = tuple(jnp.split(saved, saved.shape[-1] // cell.hidden_size, axis=-1))
  if result is None:
    result = _scan_backward(cell, rule, unroll, operands, saved, previous, carries, d_hs, d_carry_T, mask,
                            reverse)
  da, extra, d_carry_0 = result
  return da, extra, d_carry_0, previous, saved


def _input_bias_gradient(operands: Operands, da):
  return None if operands.input_bias is None else _sum_leading(da, operands.input_bias.dtype)


def _manual_bwd(cell, reverse, unroll, kernel, residuals, cotangents):
  operands, carries = residuals[0], residuals[3]
  da, extra, d_carry_0, previous, saved = _backward_recurrence(cell, reverse, unroll, kernel, residuals, cotangents)
  d_weights = rule_for(cell).weight_gradients(cell, operands.weights, da, extra, previous, carries, saved)
  return Operands(d_weights, _input_bias_gradient(operands, da)), da, d_carry_0, None


_manual.defvjp(_manual_fwd, _manual_bwd)


# The input projection under the same VJP. After the backward recurrence, dW_hh = sum_t da_t h_{t-1}^T
# and dW_xh = sum_t da_t x_t^T share their left factor; as ONE matmul of da with [h_{t-1}, x_t]
# (LSTM train step, B=32, T=128, H=256: 11.8 ms for both against 10.7 + 3.8 ms apart, with the
# transpose of da they shared), they need the projection inside the custom VJP, where autodiff
# would form dW_xh on its own. Used for the plain LSTM (``fuses_input_gradient``).

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _projected(cell, reverse, unroll, kernel, operands, w_xh, xs, carry, mask):
  return _manual(cell, reverse, unroll, kernel, operands, linear(xs, w_xh, cell.dtype), carry, mask)


def _projected_fwd(cell, reverse, unroll, kernel, operands, w_xh, xs, carry, mask):
  out, residuals = _manual_fwd(cell, reverse, unroll, kernel, operands, linear(xs, w_xh, cell.dtype), carry, mask)
  return out, (residuals, w_xh, xs)


def _projected_bwd(cell, reverse, unroll, kernel, saved_inputs, cotangents):
  residuals, w_xh, xs = saved_inputs
  operands = residuals[0]
  da, _, d_carry_0, previous, _ = _backward_recurrence(cell, reverse, unroll, kernel, residuals, cotangents)
  w_hh = operands.weights["w_hh"]
  H = w_hh.shape[1]
  inputs = jnp.concatenate([cell.hidden(previous), xs.astype(da.dtype)], axis=-1)
  joint = sum_outer(da, inputs, cell.dtype, w_hh.dtype)  # [4H, H + F]: da is the wider factor
  d_x = linear_transposed(da, w_xh, cell.dtype).astype(xs.dtype)
  d_operands = Operands({"w_hh": joint[:, :H]}, _input_bias_gradient(operands, da))
  return d_operands, joint[:, H:].astype(w_xh.dtype), d_x, d_carry_0, None


_projected.defvjp(_projected_fwd, _projected_bwd)


def fuses_input_gradient(cell: Cell, params: Params, xs: jax.Array, carry) -> bool:
  """True where ``projected_manual_scan`` runs this layer: the LSTM kernel runs the recurrence
  (``kernel_choice``: the plain ``LSTM`` itself, whose dW_hh = sum_t da_t h_{t-1}^T and whose
  input projection is a plain W_xh x_t) and adds b. For the Elman cell (G = 1) da is as narrow as
  [h_{t-1}, x_t], and the joint matmul measured 5-10% slower than the two apart (B=32, T=128,
  H=256 / 512); the GRU's dW_hn reads du_n, not da."""
  if type(cell) is not LSTM or cell.peephole:
    return False
  return kernel_adds_bias(cell, params, xs, carry)


def projected_manual_scan(cell: Cell, params: Params, xs: jax.Array, carry, mask=None, *, reverse: bool = False,
                          unroll: int = 1):
  """``manual_scan`` over a = W_xh xs (b added by the kernel), with the projection under the same
  custom VJP so that the backward forms dW_hh and dW_xh as one matmul; where
  ``fuses_input_gradient`` is True. xs: [T, ..., F]. Returns (final carry, hs [T, ..., H])."""
  _check_features(cell.name, "x", xs, params["w_xh"].shape[1])
  rule = rule_for(cell)
  operands = Operands({name: params[name] for name in rule.recurrent_params(cell)}, cell.projection_bias(params))
  kernel = kernel_choice(cell, params, xs, carry).kernel
  fallback = lambda: manual_scan(cell, params, cell.input_projection(params, xs, bias=False), carry, mask,
                                 reverse=reverse, unroll=unroll, input_bias=operands.input_bias)
  return _custom_vjp_or(fallback, lambda: _projected(cell, reverse, unroll, kernel, operands, params["w_xh"], xs,
                                                     carry, mask), operands, params["w_xh"], xs, carry)


def _custom_vjp_or(fallback, call, *trees):
  """call() (a custom VJP), or fallback() (jax's own derivative) under forward-mode differentiation
  of ``trees``, which ``jax.jvp`` / ``jacfwd`` cannot pass through a custom VJP."""
  if _under_forward_mode(*trees):
    return fallback()
  try:
    return call()
  except TypeError as error:
    if "forward-mode" not in str(error):
      raise
    return fallback()


def _under_forward_mode(*trees) -> bool:
  """True if forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) is the innermost one
  applied to these values. Under ``jit`` the tangent of a custom VJP is staged and fails only
  when compiled, so the fallback to jax's own derivative is chosen here, while tracing; a vmap
  (``BatchTracer``) is looked through, reverse mode (``LinearizeTracer``) keeps the custom VJP."""
  from jax._src.interpreters import ad  # pylint: disable=import-outside-toplevel
  for leaf in jax.tree_util.tree_leaves(trees):
    while isinstance(leaf, jax.core.Tracer):
      if isinstance(leaf, ad.JVPTracer):
        return True
      if isinstance(leaf, ad.LinearizeTracer):
        break
      leaf = getattr(leaf, "val", None)
  return False


def _autodiff_scan(cell, operands: Operands, a, carry, mask, reverse: bool, unroll: int):
  """The same recurrence with jax's own derivative (the fallback under forward mode)."""
  final, carries, _ = _scan_forward(cell, reverse, unroll, operands, a, carry, mask, save=False)
  return final, cell.hidden(carries)


def manual_scan(cell: Cell, params: Params, a: jax.Array, carry, mask=None, *,
                reverse: bool = False, unroll: int = 1, input_bias=None):
  """The cell's recurrence over a: [T, ..., G*H] with its hand-derived backward pass.

    carry_t, h_t = recurrence(carry_{t-1}, a_t)    where mask_t (else carry held)

  Args:
    cell: a cell for which ``supports(cell)`` is True.
    params: the cell's params (only its recurrent params, W_hh and the like, are read here;
      the input projection a = W_xh x + b is the caller's, so its gradient flows through the
      caller's autodiff from da).
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
    raise ValueError(reason + "; use grad='autodiff' (or 'auto')")
  rule = rule_for(cell)
  operands = Operands({name: params[name] for name in rule.recurrent_params(cell)}, input_bias)
  kernel = kernel_choice(cell, params, a, carry).kernel
  return _custom_vjp_or(lambda: _autodiff_scan(cell, operands, a, carry, mask, reverse, unroll),
                        lambda: _manual(cell, reverse, unroll, kernel, operands, a, carry, mask), operands, a, carry)
