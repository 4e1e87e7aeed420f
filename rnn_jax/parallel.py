"""Parallel-in-time evaluation: minGRU/minLSTM with an associative scan, DEER and quasi-DEER.

A recurrence whose state enters linearly,

    h_t = A_t * h_{t-1} + b_t        (A_t diagonal [H] or a full matrix [H, H])

is solved for all t at once by ``jax.lax.associative_scan`` over the pairs
(A_t, b_t) with the associative composition

    (A_1, b_1) o (A_2, b_2) = (A_2 A_1, A_2 b_1 + b_2),

in O(log T) depth instead of T sequential steps.

* minGRU and minLSTM (Feng et al. 2024, "Were RNNs all we needed?") drop the
  recurrent weights from the gates, so their recurrence is linear exactly; they
  are cells in the usual contract (``init``/``recurrence``/``step``) so the
  sequential reference is ``rnn_jax.sequence.rnn``.
* DEER (Lim et al. 2023) evaluates a NONLINEAR recurrence h_t = f(h_{t-1}, a_t)
  (here the Elman and GRU cells) by Newton's method on the whole trajectory:
  linearise every step at the current guess h^(k),

      h_t^(k+1) = f(h_{t-1}^(k), a_t) + J_t (h_{t-1}^(k+1) - h_{t-1}^(k)),  J_t = df/dh_{t-1},

  and solve that linear recurrence with the associative scan. Quasi-DEER
  (Gonzalez et al. 2024) keeps only diag(J_t) (hand-derived below), so each
  iteration costs O(T H) memory instead of O(T H^2). Iterations stop when
  max |h^(k+1) - h^(k)| <= tol or after ``max_iterations``; if they did not
  converge (or produced a non-finite value) the result falls back to the
  sequential scan, so the returned trajectory always equals sequential evaluation
  within the tolerance. Both are forward (inference) evaluators; train through
  ``rnn_jax.sequence.rnn``.

Shapes: xs [B, T, F] batch-major (as ``rnn``); the scans run time-major inside.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import bptt, initializers
from rnn_jax.cells import GRU, Cell, Elman, MinGRU, MinLSTM, Params, linear
from rnn_jax.sequence import ScanOptions, check_batch, rnn

# ---- linear recurrences by associative scan ------------------------------------------

def linear_recurrence(coefficients: jax.Array, offsets: jax.Array, h0: jax.Array) -> jax.Array:
  """Solve h_t = A_t h_{t-1} + b_t for t = 0..T-1 with h_{-1} = h0, all t at once.

  Args:
    coefficients: A, [T, ..., H] (diagonal) or [T, ..., H, H] (full matrices).
    offsets: b, [T, ..., H].
    h0: [..., H].
  Returns:
    hs: [T, ..., H].
  """
  full = coefficients.ndim == offsets.ndim + 1
  if full:
    first = offsets[0] + jnp.einsum("...ij,...j->...i", coefficients[0], h0)

    def combine(earlier, later):
      a_1, b_1 = earlier
      a_2, b_2 = later
      return a_2 @ a_1, jnp.einsum("...ij,...j->...i", a_2, b_1) + b_2
  else:
    first = offsets[0] + coefficients[0] * h0

    def combine(earlier, later):
      a_1, b_1 = earlier
      a_2, b_2 = later
      return a_2 * a_1, a_2 * b_1 + b_2
  offsets = offsets.at[0].set(first)
  return jax.lax.associative_scan(combine, (coefficients, offsets), axis=0)[1]


def _masked_coefficients(coefficients, offsets, mask):
  """On padded steps (mask False) use A = 1 (or I), b = 0, so the state is held."""
  if mask is None:
    return coefficients, offsets
  valid = mask[..., None]
  if coefficients.ndim == offsets.ndim + 1:
    eye = jnp.eye(coefficients.shape[-1], dtype=coefficients.dtype)
    coefficients = jnp.where(valid[..., None], coefficients, eye)
  else:
    coefficients = jnp.where(valid, coefficients, jnp.ones((), coefficients.dtype))
  return coefficients, jnp.where(valid, offsets, jnp.zeros((), offsets.dtype))


def _time_major_inputs(cell: Cell, params: Params, xs, lengths, initial_carry):
  """(a: [T, B, G*H], mask [T, B] or None, h0 [B, H]) from batch-major xs [B, T, F]."""
  B, T = check_batch(cell.name, xs, lengths)
  a = cell.input_projection(params, jnp.swapaxes(xs, 0, 1))
  mask = None if lengths is None else jnp.arange(T)[:, None] < jnp.asarray(lengths)[None, :]
  h0 = cell.initial_carry(params) if initial_carry is None else initial_carry
  return a, mask, jnp.broadcast_to(h0, (B, cell.hidden_size)).astype(a.dtype)


def _batch_major_outputs(hs, mask):
  """ys [B, T, H] with y_t = 0 on padded steps; final state = hs at each example's last real step."""
  final = hs[-1]
  if mask is not None:
    hs = jnp.where(mask[..., None], hs, jnp.zeros((), hs.dtype))
  return final, jnp.swapaxes(hs, 0, 1)


def parallel_rnn(cell: MinGRU, params: Params, xs: jax.Array, lengths=None, *, initial_carry=None):
  """minGRU / minLSTM over a batch with one associative scan over time.

    h_t = A_t * h_{t-1} + b_t  solved for all t (held on padded steps t >= L)

  Args:
    xs: [B, T, F]; lengths: optional [B]; initial_carry: optional [H] or [B, H].
  Returns:
    (h at each example's last real step [B, H], ys [B, T, H] with y_t = 0 for t >= L),
    equal to ``rnn(cell, params, xs, lengths)``.
  """
  if not isinstance(cell, MinGRU):
    raise ValueError(f"parallel_rnn: needs a MinGRU or MinLSTM cell (a linear recurrence), got {cell.name}; "
                     "use deer_rnn for nonlinear cells")
  a, mask, h0 = _time_major_inputs(cell, params, xs, lengths, initial_carry)
  coefficients, offsets = _masked_coefficients(*cell.linear_coefficients(a), mask)
  return _batch_major_outputs(linear_recurrence(coefficients, offsets, h0), mask)


# ---- DEER / quasi-DEER --------------------------------------------------------------

class DeerInfo(NamedTuple):
  """iterations: Newton iterations run; converged: max change <= tol within the cap;
  max_change: the last max |h^(k+1) - h^(k)|; fell_back: the sequential scan was used."""
  iterations: jax.Array
  converged: jax.Array
  max_change: jax.Array
  fell_back: jax.Array


def recurrence_jacobian_diagonal(cell: Cell, params: Params, h_prev: jax.Array, a_t: jax.Array) -> jax.Array:
  """diag(dh_t / dh_{t-1}) of the Elman or GRU recurrence, hand-derived: [..., H].

    Elman:  h = f(a + W h'):  d_i = f'(z_i) W_ii
    GRU (reset_after):   s = W_n h' + b_hn; n = tanh(a_n + r s); h = (1 - z) n + z h'
      d_i = z_i + (h'_i - n_i) z_i (1 - z_i) W^z_ii
            + (1 - z_i)(1 - n_i^2)(r_i W^n_ii + s_i r_i (1 - r_i) W^r_ii)
    GRU (reset before):  n = tanh(a_n + W_n (r * h') + b_hn); every r_j depends on h'_i, so
      d_i = z_i + (h'_i - n_i) z_i (1 - z_i) W^z_ii
            + (1 - z_i)(1 - n_i^2)(W^n_ii r_i + sum_j W^n_ij W^r_ji h'_j r_j (1 - r_j))
  """
  H = cell.hidden_size
  w_hh = params["w_hh"]
  if isinstance(cell, Elman):
    h_t = cell.recurrence(params, h_prev, a_t)[0]
    return bptt.activation_derivative(cell.activation, h_t) * jnp.diagonal(w_hh)
  if not isinstance(cell, GRU):
    raise ValueError(f"quasi-DEER: no Jacobian diagonal for cell {cell.name}; expected elman or gru")
  diag_r, diag_z, diag_n = (jnp.diagonal(w_hh[k * H:(k + 1) * H]) for k in range(3))
  _, _, gates = cell.recurrence_saving(params, h_prev, a_t)  # (r, z, n[, s]), each [..., H]
  r, z, n = gates[:3]
  if cell.reset_after:
    s = gates[3]
    dn = (1.0 - n * n) * (r * diag_n + s * r * (1.0 - r) * diag_r)
  else:
    cross = w_hh[2 * H:] * w_hh[:H].T  # (W^n o W^r^T)_ij = W^n_ij W^r_ji
    dn = (1.0 - n * n) * (diag_n * r + linear(h_prev * r * (1.0 - r), cross, cell.dtype))
  return z + (h_prev - n) * z * (1.0 - z) * diag_z + (1.0 - z) * dn


def _default_tolerance(dtype) -> float:
  return 1e-10 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def deer_rnn(cell: Cell, params: Params, xs: jax.Array, lengths=None, *, initial_carry=None,
             quasi: bool = True, tol: Optional[float] = None, max_iterations: int = 100,
             fallback: bool = True):
  """Evaluate an Elman or GRU layer by (quasi-)DEER Newton iterations over the whole trajectory.

    h^(0) = 0;  repeat:  h_{t-1} := h^(k)_{t-1} (h_{-1} = h0),  J_t = df/dh at h_{t-1}
                         h^(k+1)_t = J_t h^(k+1)_{t-1} + f(h_{t-1}, a_t) - J_t h_{t-1}   (associative scan)
    until max |h^(k+1) - h^(k)| <= tol or k = max_iterations; then, if not converged
    (or not finite) and fallback, the sequential scan.

  Args:
    cell: Elman or GRU (quasi=True uses the hand-derived Jacobian diagonal; quasi=False
      the full [H, H] Jacobian from jax.jacfwd, O(T H^2) memory).
    xs: [B, T, F]; lengths: optional [B]; initial_carry: optional [H] or [B, H].
    tol: convergence threshold on the max change (default 1e-5 float32, 1e-10 float64).
    max_iterations: Newton iteration cap (at most T are ever needed: step t is exact after t+1).
    fallback: evaluate sequentially when the iterations did not converge.
  Returns:
    ((final h [B, H], ys [B, T, H]) as ``rnn`` returns them, DeerInfo).
  """
  if not isinstance(cell, (Elman, GRU)):
    raise ValueError(f"deer_rnn: supports the elman and gru cells, got {cell.name}")
  if max_iterations < 1:
    raise ValueError(f"deer_rnn: max_iterations must be >= 1, got {max_iterations}")
  a, mask, h0 = _time_major_inputs(cell, params, xs, lengths, initial_carry)
  tol = _default_tolerance(a.dtype) if tol is None else float(tol)

  def step(h_prev, a_t):
    return cell.recurrence(params, h_prev, a_t)[0]

  if quasi:
    def jacobian(h_prev, a_t):
      return recurrence_jacobian_diagonal(cell, params, h_prev, a_t)
  else:
    per_example = jax.jacfwd(lambda h, a_t: cell.recurrence(params, h, a_t)[0])
    jacobian = jax.vmap(jax.vmap(per_example))

  def newton(hs):
    previous = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    values = step(previous, a)
    coefficients = jacobian(previous, a)
    if quasi:
      offsets = values - coefficients * previous
    else:
      offsets = values - jnp.einsum("...ij,...j->...i", coefficients, previous)
    coefficients, offsets = _masked_coefficients(coefficients, offsets, mask)
    return linear_recurrence(coefficients, offsets, h0)

  def keep_going(state):
    _, iteration, change = state
    return (iteration < max_iterations) & (change > tol)

  def iterate(state):
    hs, iteration, _ = state
    new = newton(hs)
    change = jnp.max(jnp.abs(new - hs))
    change = jnp.where(jnp.isfinite(change), change, jnp.inf)
    # a non-finite trajectory stops the loop (iteration jumps to the cap) and falls back
    iteration = jnp.where(jnp.isfinite(change), iteration + 1, max_iterations)
    return new, iteration, change

  start = (jnp.zeros_like(a[..., :cell.hidden_size]), jnp.asarray(0), jnp.asarray(jnp.inf, a.dtype))
  hs, iterations, change = jax.lax.while_loop(keep_going, iterate, start)
  converged = change <= tol
  use_sequential = jnp.logical_and(jnp.logical_not(converged), fallback)

  def from_newton(_):
    return _batch_major_outputs(hs, mask)

  def from_sequential(_):
    return rnn(cell, params, xs, lengths, initial_carry=h0, options=ScanOptions(grad="autodiff"))

  final, ys = jax.lax.cond(use_sequential, from_sequential, from_newton, None)
  return (final, ys), DeerInfo(iterations, converged, change, use_sequential)


# ---- benchmark cases (used by experiments/benchmark.py --sweep=parallel) -------------

@dataclasses.dataclass
class BenchmarkCase:
  """A jitted sequential and parallel evaluation of the same layer on the same inputs."""
  sequential: Callable[[], Any]
  parallel: Callable[[], Any]
  hidden: Callable[[Any], jax.Array]
  info: Callable[[Any], dict]


def benchmark_case(model: str, *, batch: int, seq_len: int, hidden: int, input_size: int, key) -> BenchmarkCase:
  """Sequential lax.scan vs parallel evaluation for "mingru", "minlstm", "elman_deer" or "gru_deer"."""
  cells = {"mingru": MinGRU(hidden), "minlstm": MinLSTM(hidden), "elman_deer": Elman(hidden),
           "gru_deer": GRU(hidden)}
  if model not in cells:
    raise ValueError(f"benchmark_case: unknown model {model!r}; expected one of {tuple(cells)}")
  cell = cells[model]
  key_params, key_x = jax.random.split(key)
  params = cell.init(key_params, input_size)
  xs = jax.random.normal(key_x, (batch, seq_len, input_size))
  sequential = jax.jit(lambda p, x: rnn(cell, p, x)[1])
  if isinstance(cell, MinGRU):
    parallel = jax.jit(lambda p, x: parallel_rnn(cell, p, x)[1])
    return BenchmarkCase(lambda: sequential(params, xs), lambda: parallel(params, xs),
                         lambda out: out, lambda out: {})
  deer = jax.jit(lambda p, x: deer_rnn(cell, p, x))

  def info(out):
    details = out[1]
    return {"iterations": int(details.iterations), "converged": bool(details.converged),
            "fell_back": bool(details.fell_back)}

  return BenchmarkCase(lambda: sequential(params, xs), lambda: deer(params, xs),
                       lambda out: out if not isinstance(out, tuple) else out[0][1], info)
