"""Echo state networks (Jaeger 2001; Jaeger & Haas 2004): a fixed random reservoir and a ridge read-out.

Only the read-out is trained, in closed form, so no gradient flows through time at all:
the ESN sidesteps vanishing and exploding gradients (Jaeger 2001).

    h_t = (1 - alpha) h_{t-1} + alpha tanh(W_xh x_t + W_hh h_{t-1} + b)     reservoir, fixed
    y_t = W_hy z_t,   z_t = [1; x_t; h_t]                                    read-out, trained

    W_hy = Y^T Z (Z^T Z + lambda I)^-1      ridge regression over the steps after the washout

The reservoir follows the cell contract of ``rnn_jax.cells`` (init, initial_carry,
input_projection, recurrence, output, step), so it runs through ``rnn_jax.sequence``
and ``rnn_jax.diagnostics`` like any other cell.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import initializers
from rnn_jax.cells import Params, Reservoir, linear
from rnn_jax.sequence import run_cell


def readout_features(xs: jax.Array, hs: jax.Array, use_input: bool = True) -> jax.Array:
  """z_t = [1; x_t; h_t] (or [1; h_t]): xs [..., T, F], hs [..., T, H] -> [..., T, 1+F+H]."""
  ones = jnp.ones(hs.shape[:-1] + (1,), hs.dtype)
  parts = [ones, xs.astype(hs.dtype), hs] if use_input else [ones, hs]
  return jnp.concatenate(parts, axis=-1)


def ridge_readout(features: jax.Array, targets: jax.Array, ridge: float) -> jax.Array:
  """Closed-form ridge regression W_hy = Y^T Z (Z^T Z + lambda I)^-1.

  Solved as the symmetric system (Z^T Z + lambda I) W_hy^T = Z^T Y.

  Args:
    features: Z: [N, D] (rows are time steps after the washout).
    targets: Y: [N, O].
    ridge: lambda >= 0 (every weight, the bias included, is penalised).
  Returns:
    W_hy: [O, D].
  """
  if features.ndim != 2 or targets.ndim != 2 or features.shape[0] != targets.shape[0]:
    raise ValueError(f"ridge_readout: expected features [N, D] and targets [N, O] with the same N, got "
                     f"{tuple(features.shape)} and {tuple(targets.shape)}")
  if ridge < 0:
    raise ValueError(f"ridge_readout: ridge must be >= 0, got {ridge}")
  gram = features.T @ features + ridge * jnp.eye(features.shape[1], dtype=features.dtype)
  return jnp.linalg.solve(gram, features.T @ targets.astype(features.dtype)).T


@dataclasses.dataclass(frozen=True)
class ESN:
  """An echo state network: a ``Reservoir``, a washout and a ridge read-out.

  Attributes:
    reservoir: the fixed reservoir.
    washout: the number of initial steps whose states are discarded before the fit.
    ridge: lambda of the read-out regression.
    use_input: include x_t in the read-out features z_t = [1; x_t; h_t].
  """
  reservoir: Reservoir
  washout: int = 100
  ridge: float = 1e-8
  use_input: bool = True

  def __post_init__(self):
    if self.washout < 0:
      raise ValueError(f"ESN: washout must be >= 0, got {self.washout}")
    if self.ridge < 0:
      raise ValueError(f"ESN: ridge must be >= 0, got {self.ridge}")

  def states(self, params: Params, xs: jax.Array, initial_carry=None):
    """Drive the reservoir: xs [T, F] -> (h_T, hs [T, H])."""
    return run_cell(self.reservoir, params, xs, initial_carry=initial_carry)

  def fit(self, params: Params, xs: jax.Array, targets: jax.Array, initial_carry=None):
    """Teacher-forced fit of the read-out on one sequence.

    Args:
      xs: [T, F] inputs; targets: [T, O] desired outputs y_t for each step.
    Returns:
      (W_hy: [O, D], h_T the final reservoir state, hs [T, H]).
    """
    if xs.ndim != 2 or targets.ndim != 2 or xs.shape[0] != targets.shape[0]:
      raise ValueError(f"ESN.fit: expected xs [T, F] and targets [T, O] with the same T, got "
                       f"{tuple(xs.shape)} and {tuple(targets.shape)}")
    if xs.shape[0] <= self.washout:
      raise ValueError(f"ESN.fit: the sequence has {xs.shape[0]} steps, it must be longer than the "
                       f"washout ({self.washout})")
    last, hs = self.states(params, xs, initial_carry)
    features = readout_features(xs, hs, self.use_input)[self.washout:]
    return ridge_readout(features, targets[self.washout:], self.ridge), last, hs

  def predict(self, w_hy: jax.Array, xs: jax.Array, hs: jax.Array) -> jax.Array:
    """y_t = W_hy z_t for every step: xs [..., T, F], hs [..., T, H] -> [..., T, O]."""
    return readout_features(xs, hs, self.use_input) @ w_hy.T

  def generate(self, params: Params, w_hy: jax.Array, carry: jax.Array, x_last: jax.Array,
               steps: int) -> jax.Array:
    """Autonomous generation: each output is fed back as the next input (needs O == F).

      y_1 = W_hy [1; x_last; h]                  h = ``carry``, the state that has read x_last
      h_{i+1} = reservoir(h_i, y_i);  y_{i+1} = W_hy [1; y_i; h_{i+1}]

    so ys[i] is the prediction i + 1 steps after x_last.

    Args:
      carry: [H] the reservoir state after reading x_last (e.g. the end of teacher forcing).
      x_last: [F] the last observed input.
      steps: the number of outputs to generate.
    Returns:
      ys: [steps, O].
    """
    if w_hy.shape[0] != x_last.shape[-1]:
      raise ValueError(f"ESN.generate: read-out has {w_hy.shape[0]} outputs, but feeding them back needs "
                       f"{x_last.shape[-1]} (the input size)")

    def body(state, _):
      h_t, x_t = state
      y_t = self.predict(w_hy, x_t[None], h_t[None])[0]
      h_next, _ = self.reservoir.step(params, h_t, y_t)
      return (h_next, y_t), y_t

    _, ys = jax.lax.scan(body, (carry, x_last), None, length=steps)
    return ys


def nrmse(prediction, target, variance: Optional[float] = None) -> float:
  """Normalised root mean square error sqrt(mean((y - d)^2) / sigma^2), sigma^2 = Var(target) unless given."""
  prediction, target = np.asarray(prediction, np.float64), np.asarray(target, np.float64)
  if prediction.shape != target.shape:
    raise ValueError(f"nrmse: prediction shape {prediction.shape} != target shape {target.shape}")
  variance = float(np.var(target)) if variance is None else variance
  return float(np.sqrt(np.mean((prediction - target) ** 2) / variance))
