"""Gradient flow through time: exact Jacobian norms, W_hh spectra and exploding-gradient events.

Backpropagation through time multiplies Jacobians (Pascanu, Mikolov & Bengio 2013):

    dL/dh_k = sum_{t >= k} dL_t/dh_t  dh_t/dh_k,     dh_T/dh_k = prod_{t=k+1..T} dh_t/dh_{t-1}

and for an Elman RNN dh_t/dh_{t-1} = diag(f'(.)) W_hh, so the norms shrink (vanish) or
grow (explode) geometrically with the lag T - k, at a rate set by the singular values of W_hh.

Everything here is computed exactly with JAX autodiff through the same ``lax.scan`` that
``rnn_jax.sequence`` uses, for any cell (Elman, LSTM, GRU, or a reservoir) and any params:
a zero perturbation delta_k is added to the hidden state after every step,

    carry_k = recurrence(carry_{k-1}, a_k);   h_k <- h_k + delta_k,

so that d(anything)/d delta_k = d(anything)/dh_k, the total derivative through all later steps.
Sequences are unpadded here (every step is real).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax


NORMS = ("spectral", "frobenius")


def add_to_hidden(cell, carry, delta: jax.Array):
  """carry with its hidden state h replaced by h + delta (an LSTM's c is left untouched)."""
  return cell.with_hidden(carry, cell.hidden(carry) + delta)


def perturbed_hidden_states(cell, params, xs: jax.Array, deltas: jax.Array, initial_carry=None):
  """Run ``cell`` over one sequence with h_k <- h_k + delta_k after each step.

    a = W_xh xs + b;   carry_k = recurrence(carry_{k-1}, a_k);   h_k += delta_k

  Args:
    xs: [T, F] one example;  deltas: [T, S] with S the cell's state size (zeros in use).
  Returns:
    hs: [T, S], the (perturbed) hidden states h_1 .. h_T.
  """
  if xs.ndim != 2:
    raise ValueError(f"{cell.name}: diagnostics expect xs of shape [T, F] for one example, got {tuple(xs.shape)}")
  if deltas.shape != (xs.shape[0], cell.state_size):
    raise ValueError(f"{cell.name}: deltas must have shape {(xs.shape[0], cell.state_size)}, got {tuple(deltas.shape)}")
  carry = cell.initial_carry(params) if initial_carry is None else initial_carry
  a = cell.input_projection(params, xs)

  def body(carry, inputs):
    a_t, delta_t = inputs
    carry, _ = cell.recurrence(params, carry, a_t)
    carry = add_to_hidden(cell, carry, delta_t)
    return carry, cell.hidden(carry)

  _, hs = jax.lax.scan(body, carry, (a, deltas))
  return hs


def matrix_norms(matrices: jax.Array, norm: str = "spectral") -> jax.Array:
  """||M_k|| for a stack [K, m, n] -> [K]: largest singular value, or the Frobenius norm."""
  if norm == "spectral":
    return jnp.linalg.svd(matrices, compute_uv=False)[..., 0]
  if norm == "frobenius":
    return jnp.sqrt(jnp.sum(jnp.square(matrices), axis=(-2, -1)))
  raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


@functools.partial(jax.jit, static_argnames=("cell",))
def state_jacobians(cell, params, xs: jax.Array, initial_carry=None) -> jax.Array:
  """All Jacobians dh_T/dh_k of one sequence, exact, by reverse-mode through the scan.

    J[k] = dh_T / dh_{k+1},  k = 0..T-1   (so J[T-1] = I and the lag of J[k] is T-1-k)

  Args:
    xs: [T, F] one example.
  Returns:
    J: [T, S, S] with S the state size; J[k] has the layout [out h_T, in h_{k+1}].
  """
  deltas = jnp.zeros((xs.shape[0], cell.state_size), xs.dtype)

  def last_hidden(deltas):
    return perturbed_hidden_states(cell, params, xs, deltas, initial_carry)[-1]

  jacobian = jax.jacrev(last_hidden)(deltas)       # [S_out, T, S_in]
  return jnp.transpose(jacobian, (1, 0, 2))


@functools.partial(jax.jit, static_argnames=("cell", "norm"))
def jacobian_norms_by_lag(cell, params, xs: jax.Array, norm: str = "spectral",
                          initial_carry=None) -> jax.Array:
  """||dh_T/dh_k|| against the lag T - k, for one sequence or averaged over a batch.

  Args:
    xs: [T, F] one example, or [B, T, F] a batch (the norms are averaged over B in log space,
      i.e. the geometric mean, which is what decays geometrically with the lag).
    norm: "spectral" (largest singular value) or "frobenius".
  Returns:
    norms: [T]; norms[lag] = ||dh_T/dh_{T-lag}||, lag = 0..T-1 (norms[0] = ||I||).
  """
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
  if xs.ndim not in (2, 3):
    raise ValueError(f"{cell.name}: xs must have shape [T, F] or [B, T, F], got {tuple(xs.shape)}")

  def one(x):
    return matrix_norms(state_jacobians(cell, params, x, initial_carry), norm)[::-1]

  if xs.ndim == 2:
    return one(xs)
  norms = jax.lax.map(one, xs)
  return jnp.exp(jnp.mean(jnp.log(norms), axis=0))


def loss_gradient_norms_by_lag(cell, params, xs: jax.Array,
                               loss_of_hidden: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """||dL/dh_k|| against the lag T - k, the total derivative through all later steps.

    dL/dh_k = dL/dh_k|_direct + dL/dh_{k+1} dh_{k+1}/dh_k

  Args:
    xs: [B, T, F] a batch.
    loss_of_hidden: hs [B, T, S] -> scalar loss L (a read-out and its params live in the closure).
  Returns:
    norms: [T]; norms[lag] = ||dL/dh_{T-lag}|| taken over the [B, S] slice of step T - lag.
  """
  if xs.ndim != 3:
    raise ValueError(f"{cell.name}: xs must have shape [B, T, F], got {tuple(xs.shape)}")
  deltas = jnp.zeros((xs.shape[0], xs.shape[1], cell.state_size), xs.dtype)

  def loss(deltas):
    hs = jax.vmap(lambda x, d: perturbed_hidden_states(cell, params, x, d))(xs, deltas)
    return loss_of_hidden(hs)

  grads = jax.grad(loss)(deltas)                    # [B, T, S]
  norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=(0, 2)))
  return norms[::-1]


class Spectrum(NamedTuple):
  """Singular values [G, S] (descending) and spectral radii [G] of each square gate block of W_hh."""
  singular_values: np.ndarray
  spectral_radius: np.ndarray


def recurrent_spectrum(w_hh) -> Spectrum:
  """Singular values and spectral radius rho = max |lambda| of each [S, S] gate block of W_hh.

  W_hh: [G*S, S] holds G square blocks (Elman G=1; GRU r, z, n G=3; LSTM i, f, g, o G=4).
  Computed on the host in float64.
  """
  w = np.asarray(w_hh, dtype=np.float64)
  if w.ndim != 2 or w.shape[0] % w.shape[1]:
    raise ValueError(f"recurrent_spectrum: W_hh must be a stack of square [S, S] blocks, got shape {w.shape}")
  blocks = w.reshape(w.shape[0] // w.shape[1], w.shape[1], w.shape[1])
  singular_values = np.linalg.svd(blocks, compute_uv=False)
  radii = np.max(np.abs(np.linalg.eigvals(blocks)), axis=-1)
  return Spectrum(singular_values=singular_values, spectral_radius=radii)


def is_exploding(grad_norm, threshold: Optional[float]) -> bool:
  """An exploding-gradient event: ||g|| is not finite, or ||g|| > threshold (when one is set)."""
  value = float(grad_norm)
  if not math.isfinite(value):
    return True
  return threshold is not None and value > threshold


def tap_gradient_norm(tree, callback: Callable[[jax.Array], None]):
  """``tree`` unchanged, with ``callback(||g||_2)`` called on the host when gradients flow back.

  An identity with a custom VJP: the forward pass returns ``tree``; the backward pass receives
  the cotangent g = dL/d tree, calls ``callback`` with its global norm
  ||g||_2 = sqrt(sum over leaves of sum g^2) (through ``jax.debug.callback``, so it works under
  ``jit``) and passes g on untouched. Applied to the params at the top of a loss function, g is
  the full gradient of that loss, before any clipping in the optimiser. Forward-only
  evaluations never call ``callback``.
  """

  @jax.custom_vjp
  def identity(tree):
    return tree

  def forward(tree):
    return tree, None

  def backward(_, cotangent):
    jax.debug.callback(callback, optax.global_norm(cotangent))   # the norm train steps log
    return (cotangent,)

  identity.defvjp(forward, backward)
  return identity(tree)


class GradientMonitor:
  """Records the per-step gradient global norm ||g||_2 and counts exploding events.

  An event is a step where ||g|| is non-finite or above ``threshold`` (the clip threshold;
  None counts only non-finite norms). The norm is taken before clipping.

  ``until_non_finite``: ignore every step after the first non-finite norm (from there on the
  params are no longer finite, so later norms say nothing about the dynamics).

  ``watch(loss_fn)`` wraps a loss function ``(params, batch, rng) -> (loss, aux)`` so that
  every gradient step taken through it is recorded (``tap_gradient_norm``), whatever loop
  runs the steps.
  """

  def __init__(self, threshold: Optional[float] = None, *, until_non_finite: bool = False):
    if threshold is not None and not threshold > 0:
      raise ValueError(f"GradientMonitor: threshold must be positive or None, got {threshold}")
    self.threshold = threshold
    self.until_non_finite = until_non_finite
    self.norms: list[float] = []
    self.exploding_steps: list[int] = []
    self.non_finite_steps: list[int] = []
    self.next_step = 1

  def watch(self, loss_fn: Callable, start_step: int = 0) -> Callable:
    """``loss_fn`` with its params tapped: step start_step + 1, + 2, ... are recorded in order."""
    self.next_step = start_step + 1

    def record_next(norm) -> None:
      self.record(self.next_step, norm)
      self.next_step += 1

    def watched(params, *args, **kwargs):
      return loss_fn(tap_gradient_norm(params, record_next), *args, **kwargs)

    return watched

  def record(self, step: int, grad_norm) -> bool:
    """Add step's ||g||; returns True if it is an exploding event."""
    value = float(grad_norm)
    if self.until_non_finite and self.non_finite_steps:
      return False
    self.norms.append(value)
    exploding = is_exploding(value, self.threshold)
    if exploding:
      self.exploding_steps.append(int(step))
    if not math.isfinite(value):
      self.non_finite_steps.append(int(step))
    return exploding

  @property
  def exploding_count(self) -> int:
    return len(self.exploding_steps)

  def summary(self) -> dict:
    """{steps, exploding_events, non_finite_events, first_non_finite_step, max/median grad norm (finite)}."""
    finite = [v for v in self.norms if math.isfinite(v)]
    return {
        "steps": len(self.norms),
        "clip_threshold": self.threshold,
        "exploding_events": self.exploding_count,
        "non_finite_events": len(self.non_finite_steps),
        "first_non_finite_step": self.non_finite_steps[0] if self.non_finite_steps else None,
        "max_grad_norm": max(finite) if finite else None,
        "median_grad_norm": float(np.median(finite)) if finite else None,
    }
