"""A recurrent language model and its sampler.

    x_t = E[w_t]                                   embedding, E: [V, D]
    h_t^(1..L) = StackedRNN(dropout(x_t))          any cell (Elman, LSTM, GRU), L layers
    o_t = W_hy dropout(h_t^(L)) + b_y              logits over the V tokens
    o_t = W_hy phi(V_k ... phi(V_1 dropout(h_t^(L)) + c_1) ... + c_k) + b_y   with a deep output
    p(w_{t+1} | w_<=t) = softmax(o_t)

Dropout (rate p, train only) sits on the non-recurrent connections, as in Zaremba et al. (2014):
on the embeddings, between layers (inside StackedRNN) and before the read-out. The recurrent
connection takes recurrent dropout (Gal & Ghahramani 2016), zoneout (Krueger et al. 2017) and
DropConnect on W_hh (AWD-LSTM, Merity et al. 2017), all off by default (``rnn_jax.regularizers``).
Params: {"embedding": {"table": [V, D]}, "rnn": StackedRNN params, "readout": {"w": [V, H], "b": [V]}}.

The deep RNNs of Pascanu, Gulcehre, Cho & Bengio 2013 ("How to construct deep recurrent neural
networks", arXiv:1312.6026) are this model with a deep-transition cell (``dt_rnn``, ``dts_rnn``,
``rnn_jax.deep_transition``) and/or ``output_layer_sizes`` (the deep output, DO): DOT(S)-RNN =
a ``dts_rnn`` cell + a deep output; sRNN = ``num_layers=2`` Elman layers. A deep output adds
"hidden_1" .. "hidden_k" ({w: [D_j, D_(j-1)], b: [D_j]}) to "readout", whose "w" is then [V, D_k].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import initializers, layers
from rnn_jax.cells import Cell
from rnn_jax.losses import cross_entropy, recurrent_penalty, token_nll
from rnn_jax.sequence import ScanOptions, StackedRNN


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """Embedding -> StackedRNN -> dropout -> dense logits (hashable: a static jit argument).

  Attributes:
    cell: the recurrent cell hyper-parameters (hidden size H).
    vocab_size: V.
    embed_size: D (Zaremba et al. use D = H).
    num_layers: L.
    dropout: p on embeddings, between layers and before the read-out (train only).
    init_scale: if set, EVERY parameter is drawn from U(-init_scale, init_scale)
      (Zaremba et al.: 0.1 small, 0.05 medium, 0.04 large); otherwise each part's own default.
    scan: how the recurrence is scanned and differentiated (``ScanOptions``: unroll, grad, remat).
    recurrent_dropout, zoneout, zoneout_cell, weight_dropout: the stack's regularisers of the
      recurrent connection (``StackedRNN``); one mask per window and example for recurrent dropout,
      per window for DropConnect, per step for zoneout (whose expectation evaluation and sampling use).
    embedding_dropout: rate of whole word types dropped from the embedding, one mask per window
      (Gal & Ghahramani 2016; ``rnn_jax.regularizers.embedding_dropout``; train only).
    output_layer_sizes: D_1 .. D_k of the read-out's intermediate layers (the deep output of
      Pascanu et al. 2013, ``layers.deep_output``); () is the plain read-out W_hy h_t + b_y.
    output_activation: phi of those layers, one of ``layers.OUTPUT_ACTIVATIONS``.
  """
  cell: Cell
  vocab_size: int
  embed_size: int
  num_layers: int = 1
  dropout: float = 0.0
  init_scale: Optional[float] = None
  scan: ScanOptions = ScanOptions()
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  zoneout_cell: float = 0.0
  weight_dropout: float = 0.0
  embedding_dropout: float = 0.0
  output_layer_sizes: tuple[int, ...] = ()
  output_activation: str = "tanh"

  @property
  def body(self) -> layers.TokenRNN:
    """Embedding -> dropout -> StackedRNN, shared with the classifier and the tagger."""
    return layers.TokenRNN(self.vocab_size, self.embed_size, self.stack, self.dropout,
                           embedding_dropout=self.embedding_dropout)

  def __post_init__(self):
    self.body  # checks vocab_size, embed_size and dropout
    object.__setattr__(self, "output_layer_sizes", layers.check_deep_output(
        "LanguageModel", self.output_layer_sizes, self.output_activation))

  @property
  def stack(self) -> StackedRNN:
    return StackedRNN(self.cell, num_layers=self.num_layers, dropout=self.dropout, scan=self.scan,
                      recurrent_dropout=self.recurrent_dropout, zoneout=self.zoneout,
                      zoneout_cell=self.zoneout_cell, weight_dropout=self.weight_dropout)

  def init(self, key) -> dict:
    """Params {"embedding", "rnn", "readout": {w: [V, H], b: [V]}} (with a deep output also
    readout["hidden_j"], and w: [V, D_k]); with ``init_scale`` every leaf ~ U(-init_scale, init_scale)."""
    key_embed, key_rnn, key_out = jax.random.split(key, 3)
    params = {**self.body.init(key_embed, key_rnn),
              "readout": layers.deep_output_init(key_out, self.stack.output_size, self.vocab_size,
                                                 self.output_layer_sizes)}
    if self.init_scale is not None:
      leaves, treedef = jax.tree_util.tree_flatten(params)
      keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
      init = initializers.uniform(self.init_scale)
      params = jax.tree_util.tree_unflatten(
          treedef, [init(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])
    return params

  def initial_carries(self, params: dict, batch_size: int) -> tuple:
    """Zero carries for every layer with a leading batch axis B."""
    return self.stack.initial_carries(params["rnn"], batch_size)

  def __call__(self, params: dict, batch: dict, *, train: bool = False, rng=None):
    """Logits for a batch of token windows: (logits [B, T, V], final carries).

    batch: {"inputs": [B, T] int ids in [0, V) (checked when concrete), optional "carry"
    (per-layer carries with a leading B axis; zeros if absent), optional "lengths" [B]}.
    The final carries start the next window in truncated BPTT. train: apply dropout (needs rng).
    """
    inputs = batch["inputs"]
    if inputs.ndim != 2:
      raise ValueError(f"LanguageModel: inputs must be [B, T] token ids, got shape {tuple(inputs.shape)}")
    output = self.body(params, inputs, batch.get("lengths"), initial_carries=batch.get("carry"),
                       train=train, rng=rng)
    hs = self.body.output_dropout(output, output.hs)
    return self.readout(params, hs), output.carries

  def readout(self, params: dict, h: jax.Array) -> jax.Array:
    """o_t from h_t: [..., H] -> [..., V] (``layers.deep_output``; ``layers.dense`` without layers)."""
    return layers.deep_output(params["readout"], h, self.output_activation, self.cell.dtype)

  def next_token_logits(self, params: dict, carries: tuple, tokens: jax.Array):
    """One step of generation: tokens [B] -> (carries, logits [B, V]) through ``StackedRNN.step``."""
    x = layers.embed(params["embedding"], tokens)
    carries, h = self.stack.step(params["rnn"], carries, x)
    return carries, self.readout(params, h)

  def num_params(self, params: dict) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def make_loss_fn(model: LanguageModel, *, train: bool = True, reduction: str = "sum",
                 l1: float = 0.0, l2: float = 0.0):
  """``loss_fn(params, batch, rng) -> (loss, aux)`` for ``train.make_train_step``/``make_tbptt_step``.

  batch: inputs, targets [B, T]; optional carry (per-layer, leading B), mask [B, T], lengths [B].
    loss = cross_entropy(logits, targets, mask, reduction) + recurrent_penalty(l1, l2)
  aux: carry (final carries), nats (mean nats per scored token), nll_sum, tokens (for exact
  aggregation over many windows).
  """

  def loss_fn(params, batch, rng):
    mask = batch.get("mask")
    logits, carries = model(params, batch, train=train, rng=rng)
    loss = cross_entropy(logits, batch["targets"], mask, reduction=reduction)
    if l1 or l2:
      loss = loss + recurrent_penalty(params, l1, l2)
    nll = token_nll(logits, batch["targets"])
    weights = jnp.ones_like(nll) if mask is None else mask.astype(nll.dtype)
    nll_sum, tokens = jnp.sum(nll * weights), jnp.sum(weights)
    return loss, {"carry": carries, "nats": nll_sum / jnp.maximum(tokens, 1.0),
                  "nll_sum": nll_sum, "tokens": tokens}

  return loss_fn


def evaluate_stream(model: LanguageModel, eval_step, params, windows) -> dict:
  """Exact mean nats per token over all windows of a stream (``data.eval_windows``), carrying
  the state from window to window: returns {"nats", "tokens"}."""
  carry = None
  nll_sum, tokens = 0.0, 0.0
  for batch in windows:
    if carry is None:
      carry = model.initial_carries(params, batch["inputs"].shape[0])
    _, aux = eval_step(params, {**batch, "carry": carry})
    carry = aux["carry"]
    nll_sum += float(aux["nll_sum"])
    tokens += float(aux["tokens"])
  if tokens == 0:
    raise ValueError("evaluate_stream: no tokens were scored; the evaluation split is empty")
  return {"nats": nll_sum / tokens, "tokens": tokens}


def _filter_logits(logits, temperature: float, top_k: int):
  """logits / temperature with all but the top_k largest set to -inf (top_k = 0: keep all)."""
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("model", "length", "top_k"))
def _sample_tokens(model: LanguageModel, params, carries, last_logits, key, length: int,
                   temperature, top_k: int):
  def body(state, noise_t):
    carries, logits = state
    token = jnp.argmax(_filter_logits(logits, temperature, top_k) + noise_t, axis=-1)
    carries, next_logits = model.next_token_logits(params, carries, token)
    return (carries, next_logits), token

  # jax.random.categorical(key_t, logits) is argmax(logits + Gumbel noise drawn with key_t) (the
  # Gumbel-max trick, and jax's own definition, so the tokens are the same): the noise of every
  # step comes from one vectorised call before the loop instead of one small threefry loop per token.
  keys = jax.random.split(key, length)
  noise = jax.vmap(lambda key_t: jax.random.gumbel(key_t, last_logits.shape, last_logits.dtype))(keys)
  _, tokens = jax.lax.scan(body, (carries, last_logits), noise)
  return tokens.T


def sample(model: LanguageModel, params, prime_ids, length: int, key, *, temperature: float = 1.0,
           top_k: int = 0) -> np.ndarray:
  """One-to-many generation: read ``prime_ids`` then draw ``length`` tokens.

    w_{t+1} ~ softmax(top_k(o_t) / temperature),   o_t = the model's logits after w_<=t

  The prime is read in one jitted call and the ``length`` draws run in one jitted
  ``lax.scan`` (no host round trip per token; compiled once per model, length and top_k).

  Args:
    prime_ids: [P] ids (P >= 1) that condition the sample, or [B, P] for B samples drawn
      together (row b conditions sample b).
    length: number of tokens to draw.
    temperature: > 0; < 1 sharpens, > 1 flattens the distribution.
    top_k: sample among the k most likely tokens only (0: all V).
  Returns:
    np.int32 [length] (or [B, length] for a [B, P] prime), the drawn ids (the prime not included).
  """
  prime = np.asarray(prime_ids, dtype=np.int32)
  batched = prime.ndim == 2
  if prime.ndim > 2:
    raise ValueError(f"sample: prime_ids must be [P] or [B, P] token ids, got shape {prime.shape}")
  prime = prime if batched else prime.reshape(1, -1)
  if prime.size == 0:
    raise ValueError("sample: the prime is empty; give at least one token")
  if not temperature > 0:
    raise ValueError(f"sample: temperature must be > 0, got {temperature}")
  if not 0 <= top_k <= model.vocab_size:
    raise ValueError(f"sample: top_k must be in [0, {model.vocab_size}], got {top_k}")
  if length < 1:
    raise ValueError(f"sample: length must be >= 1, got {length}")
  layers.check_token_ids(prime, model.vocab_size, "sample: prime ids")
  logits, carries = jax.jit(model)(params, {"inputs": jnp.asarray(prime)})
  tokens = _sample_tokens(model, params, carries, logits[:, -1], key, length,
                          jnp.float32(temperature), top_k)
  return np.asarray(tokens) if batched else np.asarray(tokens[0])
