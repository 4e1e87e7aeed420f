"""Masked sequence losses and the metrics derived from them.

All losses are in nats. Shapes: logits [..., T, V] (a leading batch axis B is
usual), integer targets [..., T], and an optional bool mask [..., T] that is True
on real tokens (padding contributes nothing).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax.layers import check_token_ids

REDUCTIONS = ("sum", "mean")


def _check_shapes(name: str, logits, targets, mask) -> None:
  if logits.ndim < 2:
    raise ValueError(f"{name}: logits must have shape [..., T, V], got {tuple(logits.shape)}")
  if tuple(targets.shape) != tuple(logits.shape[:-1]):
    raise ValueError(f"{name}: targets have shape {tuple(targets.shape)}, expected logits.shape[:-1] = "
                     f"{tuple(logits.shape[:-1])}")
  if mask is not None and tuple(mask.shape) != tuple(targets.shape):
    raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, expected the targets' shape "
                     f"{tuple(targets.shape)}")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-step negative log-likelihood -log softmax(logits_t)[y_t]: [..., T, V], [..., T] -> [..., T].

  Computed as logsumexp(logits_t) - logits_t[y_t] in float32 (or wider) for stability.
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return log_z - picked


def cross_entropy(logits: jax.Array, targets: jax.Array, mask=None, reduction: str = "sum") -> jax.Array:
  """Masked softmax cross-entropy of a sequence model, in nats.

    l_t = -log p(y_t | x_<=t) = logsumexp(o_t) - o_t[y_t],   o_t = W_hy h_t + b_y

  reduction="sum":  L = mean over the batch of sum_t m_t l_t (the loss summed over time, as in Zaremba et al. 2014;
                    with no batch axis the sum over time itself).
  reduction="mean": L = sum_{b,t} m_t l_t / sum_{b,t} m_t, the per-token average (0 if no token is real).

  Args:
    logits: [..., T, V].
    targets: [..., T] integer ids in [0, V); checked on the host when concrete.
    mask: optional [..., T] bool, True on real steps.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"cross_entropy: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
  _check_shapes("cross_entropy", logits, targets, mask)
  check_token_ids(targets, logits.shape[-1], "cross_entropy: targets")
  nll = token_nll(logits, targets)
  weights = jnp.ones_like(nll) if mask is None else mask.astype(nll.dtype)
  if reduction == "mean":
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  per_sequence = jnp.sum(nll * weights, axis=-1)
  return jnp.mean(per_sequence)


def sigmoid_nll(logits: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Negative log-likelihood of multi-hot frames (e.g. piano rolls), averaged per real time step.

    l_t = -sum_k [ y_tk log sigma(o_tk) + (1 - y_tk) log(1 - sigma(o_tk)) ]
    L = sum_t m_t l_t / sum_t m_t

  Args:
    logits: [..., T, K] one independent Bernoulli per pitch k.
    targets: [..., T, K] in {0, 1} (any float/int/bool dtype).
    mask: optional [..., T] bool, True on real frames.
  """
  if tuple(logits.shape) != tuple(targets.shape):
    raise ValueError(f"sigmoid_nll: targets have shape {tuple(targets.shape)}, expected the logits' shape "
                     f"{tuple(logits.shape)}")
  if mask is not None and tuple(mask.shape) != tuple(logits.shape[:-1]):
    raise ValueError(f"sigmoid_nll: mask has shape {tuple(mask.shape)}, expected {tuple(logits.shape[:-1])}")
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  targets = targets.astype(logits.dtype)
  # -log sigma(o) = softplus(-o); -log(1 - sigma(o)) = softplus(o)
  per_pitch = targets * jax.nn.softplus(-logits) + (1.0 - targets) * jax.nn.softplus(logits)
  per_frame = jnp.sum(per_pitch, axis=-1)
  weights = jnp.ones_like(per_frame) if mask is None else mask.astype(per_frame.dtype)
  return jnp.sum(per_frame * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def bits_per_char(nats_per_char):
  """bpc = nats / ln 2 for a per-character cross-entropy in nats."""
  return nats_per_char / math.log(2.0)


def perplexity(nats_per_token):
  """ppl = exp(nats per token)."""
  if isinstance(nats_per_token, (float, int, np.floating)):
    return float(math.exp(nats_per_token))
  return jnp.exp(nats_per_token)


def accuracy(logits: jax.Array, targets: jax.Array, mask=None) -> jax.Array:
  """Fraction of real steps where argmax_v o_t[v] == y_t: [..., T, V], [..., T] -> scalar."""
  _check_shapes("accuracy", logits, targets, mask)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  weights = jnp.ones_like(correct) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def recurrent_penalty(params, l1: float = 0.0, l2: float = 0.0) -> jax.Array:
  """Omega = lambda1 sum |W_hh| + lambda2 sum W_hh^2 over every leaf whose key is "w_hh".

  Only recurrent weights are penalised (input, output and embedding weights are not).
  Add it to the data loss inside a loss function.
  """
  total = jnp.zeros((), jnp.float32)
  if not l1 and not l2:
    return total
  found = False
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    last = path[-1]
    key = getattr(last, "key", getattr(last, "name", None))
    if key == "w_hh":
      found = True
      total = total + l1 * jnp.sum(jnp.abs(leaf)) + l2 * jnp.sum(jnp.square(leaf))
  if not found:
    raise ValueError("recurrent_penalty: params hold no 'w_hh' leaf; nothing to penalise")
  return total
