"""Non-recurrent building blocks shared by every model: embeddings, dense read-outs, id checks.

Params are plain dicts, weights in math layout [out, in] like the cells.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import initializers
from rnn_jax.cells import linear


def check_token_ids(ids, vocab_size: int, what: str = "token ids") -> None:
  """Raise ValueError unless every id is an integer in [0, vocab_size).

  JAX clamps out-of-range gather indices silently, so ids are checked on the host
  before any lookup. Traced ids (inside jit) cannot be checked here; check the
  batch before it enters the jitted step.
  """
  if isinstance(ids, jax.core.Tracer):
    return
  values = np.asarray(ids)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
  if values.size == 0:
    return
  low, high = int(values.min()), int(values.max())
  if low < 0 or high >= vocab_size:
    raise ValueError(f"{what} must lie in [0, {vocab_size}) (vocabulary size {vocab_size}), "
                     f"got min {low} and max {high}")


def embedding_init(key, vocab_size: int, embed_size: int, scale: float = 0.1,
                   dtype=jnp.float32) -> dict:
  """Embedding table E: [V, D] ~ U(-scale, scale); the row E[v] is token v's vector."""
  return {"table": initializers.uniform(scale)(key, (vocab_size, embed_size), dtype)}


def embed(params: dict, ids) -> jax.Array:
  """x_t = E[id_t]: ids [...] -> [..., D], after checking 0 <= id < V."""
  check_token_ids(ids, params["table"].shape[0])
  return jnp.take(params["table"], ids, axis=0)


def dense_init(key, in_size: int, out_size: int, scale: float | None = None,
               dtype=jnp.float32) -> dict:
  """Dense read-out {w: [O, I], b: [O]} ~ U(-s, s), s = scale or 1/sqrt(I) (PyTorch's Linear)."""
  scale = 1.0 / np.sqrt(in_size) if scale is None else scale
  key_w, key_b = jax.random.split(key)
  init = initializers.uniform(scale)
  return {"w": init(key_w, (out_size, in_size), dtype), "b": init(key_b, (out_size,), dtype)}


def dense(params: dict, h: jax.Array, compute_dtype: str | None = None) -> jax.Array:
  """y = W h + b for h: [..., I] -> [..., O] (e.g. logits = W_hy h_t + b_y)."""
  if h.shape[-1] != params["w"].shape[1]:
    raise ValueError(f"dense: input has {h.shape[-1]} features, params expect {params['w'].shape[1]}")
  return linear(h, params["w"], compute_dtype) + params["b"]
