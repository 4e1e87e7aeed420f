"""Attention over an encoder's annotations: Bahdanau et al.'s additive score and Luong et al.'s global scores.

Bahdanau, Cho & Bengio 2014, "Neural machine translation by jointly learning to align and translate"
(the query is the decoder's previous state s_{t-1}, the annotations h_j = [->h_j; <-h_j] of a
bidirectional encoder):

    e_tj   = v_a^T tanh(W_a s_{t-1} + U_a h_j)                          "bahdanau"

Luong, Pham & Manning 2015, "Effective approaches to attention-based neural machine translation",
section 3.1, global attention (the query is the decoder's current top hidden state h_t, the
memory the encoder's top hidden states h̄_s):

    score(h_t, h̄_s) = h_t^T h̄_s                                         "dot"
                    = h_t^T W_a h̄_s                                     "general"
                    = v_a^T tanh(W_a [h_t; h̄_s])                        "concat"

Then, for every kind, over the real source positions j (padding masked, below):

    alpha_tj = exp(e_tj) / sum_k exp(e_tk);     c_t = sum_j alpha_tj h_j

The part of each score that depends on the source alone is computed ONCE per source by
``project_keys`` (U_a h_j; W_a h̄_s; the h̄_s block of concat's W_a), so a decoder step costs one
[B, Q] x [Q, A] product plus the [B, S, A] reduction. Luong's concat W_a [h_t; h̄_s] is written
W_q h_t + W_k h̄_s (W_a = [W_q, W_k]), which is Bahdanau's form with the current state as query.

Masking: scores at padded positions are -inf before the softmax, so they get weight exactly 0
and extra padding changes nothing; a row with no real position (an empty source) gets all-zero
weights and c_t = 0 instead of NaN, in the values and in the gradients.

Params are plain dicts of weights in math layout [out, in] (no biases, as in both papers'
equations): "bahdanau" and "concat" {"w_query": [A, Q], "w_key": [A, M], "v": [A]},
"general" {"w_key": [Q, M]}, "dot" none ({}). Shapes: query [B, Q], memory (values) [B, S, M],
keys [B, S, A] (A = Q for dot and general), mask [B, S] bool, weights [B, S], context [B, M].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rnn_jax import initializers
from rnn_jax.cells import linear

KINDS = ("bahdanau", "dot", "general", "concat")
LUONG = ("dot", "general", "concat")
ADDITIVE = ("bahdanau", "concat")


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"attention: unknown kind {kind!r}; expected one of {KINDS}")


def init(kind: str, key, query_size: int, memory_size: int, attention_size: int, dtype=jnp.float32) -> dict:
  """Score params of ``kind`` (module docstring), each weight ~ U(+-1/sqrt(fan_in)).

  query_size Q, memory_size M, attention_size A (used by the additive kinds only). "dot"
  needs Q == M and has no params.
  """
  check_kind(kind)
  if kind == "dot":
    if query_size != memory_size:
      raise ValueError(f"attention: dot scores need query_size == memory_size, got {query_size} and "
                       f"{memory_size}")
    return {}
  if kind == "general":
    return {"w_key": initializers.uniform(memory_size ** -0.5)(key, (query_size, memory_size), dtype)}
  key_q, key_k, key_v = jax.random.split(key, 3)
  fan_in = query_size + memory_size   # W_a [q; h] reads both
  return {"w_query": initializers.uniform(fan_in ** -0.5)(key_q, (attention_size, query_size), dtype),
          "w_key": initializers.uniform(fan_in ** -0.5)(key_k, (attention_size, memory_size), dtype),
          "v": initializers.uniform(attention_size ** -0.5)(key_v, (attention_size,), dtype)}


def project_keys(kind: str, params: dict, memory: jax.Array) -> jax.Array:
  """The source-only part of the score, once per source: memory [B, S, M] -> keys [B, S, A].

    bahdanau, concat: U_a h_j (W_k h̄_s);   general: W_a h̄_s;   dot: h̄_s itself
  """
  check_kind(kind)
  if kind == "dot":
    return memory
  return linear(memory, params["w_key"])


def scores(kind: str, params: dict, query: jax.Array, keys: jax.Array) -> jax.Array:
  """Unnormalised scores e_tj: query [B, Q], keys [B, S, A] (from ``project_keys``) -> [B, S].

    bahdanau, concat: v_a^T tanh(W_q q + k_j);   dot, general: q^T k_j
  """
  check_kind(kind)
  if kind in ADDITIVE:
    hidden = jnp.tanh(linear(query, params["w_query"])[:, None, :] + keys)   # [B, S, A]
    return linear(hidden, params["v"][None, :])[..., 0]
  return jnp.einsum("bq,bsq->bs", query, keys)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """alpha_j = exp(e_j) / sum_{k real} exp(e_k) over the last axis, 0 where mask is False.

  scores, mask: [..., S]. Masked scores are -inf before the softmax; the shift by the row's
  maximum is constant (its gradient is exactly zero), and an all-masked row gives zeros, never
  NaN, forward and backward.
  """
  scores = jnp.where(mask, scores, -jnp.inf)
  shift = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, jnp.zeros((), scores.dtype))
  exponentials = jnp.where(mask, jnp.exp(jnp.where(mask, scores - shift, 0.0)), 0.0)
  total = jnp.sum(exponentials, axis=-1, keepdims=True)
  return exponentials / jnp.where(total > 0, total, jnp.ones((), total.dtype))


def attend(kind: str, params: dict, query: jax.Array, keys: jax.Array, memory: jax.Array,
           mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One attention read: (c_t [B, M], alpha_t [B, S]) for query [B, Q], keys [B, S, A],
  memory [B, S, M] and mask [B, S] (True at real source positions).

    alpha_t = masked_softmax(scores(query, keys), mask);   c_t = sum_j alpha_tj h_j
  """
  weights = masked_softmax(scores(kind, params, query, keys), mask)
  return jnp.einsum("bs,bsm->bm", weights, memory), weights


def plot_attention(path: str, samples, title: str, *, columns: int = 2) -> str:
  """Heat maps of alignments, one panel per sample, as in Bahdanau et al. 2014, figure 3.

  samples: (source tokens [S], output tokens [T], weights [T, S], panel title) tuples; row t
  holds the weights alpha_tj read while emitting output token t, column j is source token j.
  Source tokens on the x axis, output tokens on the y axis, one shared colour scale 0..1 with
  its colourbar. Saved with ``plots.save_figure``; returns ``path``.
  """
  import textwrap  # pylint: disable=import-outside-toplevel

  import numpy as np  # pylint: disable=import-outside-toplevel
  from rnn_jax import plots  # pylint: disable=import-outside-toplevel
  samples = list(samples)
  if not samples:
    raise ValueError("plot_attention: no samples to draw")
  plt = plots._pyplot()  # pylint: disable=protected-access
  columns = max(1, min(columns, plots.MAX_COLUMNS, len(samples)))
  rows = -(-len(samples) // columns)
  width = max(0.32 * max(len(s[0]) for s in samples), 2.6) + 1.2
  height = max(0.27 * max(len(s[1]) for s in samples), 2.2) + 1.6
  fig = plt.figure(figsize=(width * columns + 1.0, height * rows + 0.5))
  grid = fig.add_gridspec(rows, columns + 1, width_ratios=[1.0] * columns + [0.05])
  flat = [fig.add_subplot(grid[row, column]) for row in range(rows) for column in range(columns)]
  image = None
  for axis, (source, output, weights, panel_title) in zip(flat, samples):
    weights = np.asarray(weights, np.float64)
    if weights.shape != (len(output), len(source)):
      raise ValueError(f"plot_attention: weights have shape {weights.shape}, expected "
                       f"({len(output)}, {len(source)}) (output tokens, source tokens)")
    image = axis.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    axis.set_xticks(range(len(source)), source, rotation=90, fontsize=8)
    axis.set_yticks(range(len(output)), output, fontsize=8)
    axis.set_xlabel("source token")
    axis.set_ylabel("output token")
    # A title wider than its panel would run into the next one: wrap it to the panel's width.
    axis.set_title(textwrap.fill(panel_title, max(30, int(width * 11))), fontsize=9)
  for axis in flat[len(samples):]:
    axis.set_visible(False)
  fig.suptitle(title, fontsize=11)
  fig.colorbar(image, cax=fig.add_subplot(grid[:, -1]), label=r"attention weight $\alpha_{tj}$")
  return plots.save_figure(fig, path)
