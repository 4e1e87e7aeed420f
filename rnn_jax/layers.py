"""Building blocks shared by every model: embeddings, dense read-outs, id checks, and ``TokenRNN``
(embedding -> dropout -> stacked RNN), the body of the language model, classifier and tagger.

Params are plain dicts, weights in math layout [out, in] like the cells.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import initializers
from rnn_jax.cells import ACTIVATIONS, linear
from rnn_jax import regularizers
from rnn_jax.sequence import dropout as _dropout

_EMBEDDING_DROPOUT_STREAM = 0x6D62   # fold_in constant of TokenRNN's embedding-dropout key


def check_token_ids(ids, vocab_size: int, what: str = "token ids") -> None:
  """Raise ValueError unless every id is an integer in [0, vocab_size).

  A JAX gather cannot raise: an id >= V reads NaN and a negative id wraps to the end of the
  table. So ids are checked on the host before any lookup. Traced ids (inside jit) cannot be
  checked here; ``embed`` then turns every out-of-range id into a NaN row, so a bad batch
  makes the loss non-finite instead of silently wrong. The training streams check their
  batches before they enter the jitted step.
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
  """x_t = E[id_t]: ids [...] -> [..., D], after checking 0 <= id < V.

  Under jit (traced ids) an id outside [0, V) gives a row of NaN, never another token's row.
  """
  table = params["table"]
  check_token_ids(ids, table.shape[0])
  ids = jnp.asarray(ids)
  valid = (ids >= 0) & (ids < table.shape[0])
  rows = jnp.take(table, jnp.where(valid, ids, 0), axis=0)
  return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, table.dtype))


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


OUTPUT_ACTIVATIONS = tuple(ACTIVATIONS)


def check_deep_output(owner: str, layer_sizes, activation: str) -> tuple:
  """The deep output's layer sizes as a tuple (hashable), after checking them and the activation.

  Raises ValueError naming ``owner`` for sizes that are not a tuple (or list) of positive integers
  and for an activation outside ``OUTPUT_ACTIVATIONS``.
  """
  sizes = tuple(layer_sizes) if isinstance(layer_sizes, list) else layer_sizes
  if (not isinstance(sizes, tuple)
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in sizes)):
    raise ValueError(f"{owner}: output_layer_sizes must be a tuple of positive integers (the deep output's "
                     f"layers), got {layer_sizes!r}")
  if activation not in OUTPUT_ACTIVATIONS:
    raise ValueError(f"{owner}: unknown output_activation {activation!r}; expected one of {OUTPUT_ACTIVATIONS}")
  return sizes


def deep_output_init(key, in_size: int, out_size: int, layer_sizes: tuple = (), dtype=jnp.float32) -> dict:
  """A read-out with ``len(layer_sizes)`` intermediate layers (DO-RNN, Pascanu et al. 2013).

  {"hidden_1": {w: [D_1, I], b: [D_1]}, ..., "hidden_k": {w: [D_k, D_(k-1)], b: [D_k]},
   "w": [O, D_k], "b": [O]}, each layer ~ U(+-1/sqrt(fan_in)) (PyTorch's Linear). With no
  intermediate layer it is exactly ``dense_init(key, in_size, out_size)``, so a plain read-out
  keeps its params and its initial values.
  """
  sizes = tuple(int(size) for size in layer_sizes)
  if any(size < 1 for size in sizes):
    raise ValueError(f"deep_output_init: layer_sizes must be positive, got {tuple(layer_sizes)}")
  if not sizes:
    return dense_init(key, in_size, out_size, dtype=dtype)
  keys = jax.random.split(key, len(sizes) + 1)
  widths = (in_size,) + sizes
  params = {f"hidden_{k}": dense_init(keys[k - 1], widths[k - 1], widths[k], dtype=dtype)
            for k in range(1, len(sizes) + 1)}
  params.update(dense_init(keys[-1], sizes[-1], out_size, dtype=dtype))
  return params


def deep_output(params: dict, h: jax.Array, activation: str = "tanh", compute_dtype: str | None = None) -> jax.Array:
  """The deep read-out y_t = W_hy phi(V_k ... phi(V_1 h_t + c_1) ... + c_k) + b_y: [..., I] -> [..., O].

  Pascanu et al. 2013 (arXiv:1312.6026), the deep hidden-to-output function of the DO-RNN:
  y_t = psi(V_L phi_{L-1}(V_{L-1} ... phi_1(V_1 h_t))), here with biases and without the final
  non-linearity psi (the model's loss applies the sigmoid or softmax to these logits).
  params as ``deep_output_init`` makes them; with no "hidden_k" entries it is ``dense``.
  phi = ``activation``, one of "tanh", "relu", "sigmoid", "identity".
  """
  if activation not in OUTPUT_ACTIVATIONS:
    raise ValueError(f"deep_output: unknown activation {activation!r}; expected one of {OUTPUT_ACTIVATIONS}")
  phi = ACTIVATIONS[activation]
  layer = 1
  while f"hidden_{layer}" in params:
    h = phi(dense(params[f"hidden_{layer}"], h, compute_dtype))
    layer += 1
  return dense(params, h, compute_dtype)


class TokenRNNOutput(NamedTuple):
  """What ``TokenRNN`` returns: each layer's final carry, the top layer's h_t [B, T, O], and the
  key for the model's own dropout after the RNN (None when dropout is off)."""
  carries: tuple
  hs: jax.Array
  output_rng: Optional[jax.Array]


@dataclasses.dataclass(frozen=True)
class TokenRNN:
  """The body the language model, the classifier and the tagger share.

    x_t = dropout(m[w_t] E[w_t])          E: [V, D]  (embedding; both dropouts on training only)
    h_t^(1..L) = StackedRNN(x_t)          any cell, L layers, (bi)directional, dropout between layers

  m is embedding dropout's mask over word types (``rnn_jax.regularizers.embedding_dropout``, rate
  ``embedding_dropout``; m = 1 when it is 0), one draw per forward pass.

  Params {"embedding": {"table": [V, D]}, "rnn": StackedRNN params}; the model adds its own
  "readout". ``output_dropout`` applies the same rate after the RNN (Zaremba et al. 2014 put
  dropout on every non-recurrent connection).
  """
  vocab_size: int
  embed_size: int
  stack: Any
  dropout: float = 0.0
  embedding_dropout: float = 0.0

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f"TokenRNN: vocab_size must be >= 2, got {self.vocab_size}")
    if self.embed_size < 1:
      raise ValueError(f"TokenRNN: embed_size must be >= 1, got {self.embed_size}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"TokenRNN: dropout must be in [0, 1), got {self.dropout}")
    if not 0.0 <= self.embedding_dropout < 1.0:
      raise ValueError(f"TokenRNN: embedding_dropout must be in [0, 1), got {self.embedding_dropout}")

  def init(self, key_embed, key_rnn) -> dict:
    """{"embedding": E from key_embed, "rnn": the stack's params from key_rnn}."""
    return {"embedding": embedding_init(key_embed, self.vocab_size, self.embed_size),
            "rnn": self.stack.init(key_rnn, self.embed_size)}

  def __call__(self, params: dict, ids: jax.Array, lengths=None, *, initial_carries=None, train: bool = False,
               rng=None) -> TokenRNNOutput:
    """ids [B, T] in [0, V) (checked when concrete) -> TokenRNNOutput(carries, hs [B, T, O], output_rng)."""
    if ids.ndim != 2:
      raise ValueError(f"TokenRNN: ids must have shape [B, T], got {tuple(ids.shape)}")
    use_dropout = train and self.dropout > 0.0
    drop_words = train and self.embedding_dropout > 0.0
    if (use_dropout or drop_words) and rng is None:
      raise ValueError("train=True with dropout or embedding_dropout > 0 needs an rng key")
    keys = jax.random.split(rng, 3) if use_dropout else (None, None, None)
    xs = embed(params["embedding"], ids)
    if drop_words:  # its own stream, so that the other masks are those of embedding_dropout = 0
      xs = regularizers.embedding_dropout(jax.random.fold_in(rng, _EMBEDDING_DROPOUT_STREAM),
                                          self.embedding_dropout, xs, ids, self.vocab_size)
    if use_dropout:
      xs = _dropout(keys[0], self.dropout, xs)
    # Without dropout the key still goes to the stack, whose recurrent regularisers may use it.
    carries, hs = self.stack(params["rnn"], xs, lengths, train=train, rng=keys[1] if use_dropout else rng,
                             initial_carries=initial_carries)
    return TokenRNNOutput(carries, hs, keys[2])

  def output_dropout(self, output: TokenRNNOutput, x: jax.Array) -> jax.Array:
    """x after the model's dropout past the RNN (identity when off)."""
    if output.output_rng is None:
      return x
    return _dropout(output.output_rng, self.dropout, x)
