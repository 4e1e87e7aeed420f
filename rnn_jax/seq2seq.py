"""Encoder-decoder RNNs (many-to-many with T_x != T_y): teacher forcing, greedy and beam decoding.

Two models, one class (``Seq2Seq``), chosen by ``kind``:

"cho" (Cho et al. 2014, "Learning phrase representations using RNN encoder-decoder"):
    h_t   = RNN_enc(x_t, h_{t-1})                           encoder over x_1 .. x_S
    c     = tanh(W_c h_S + b_c)                             the context vector, [C]
    s_0   = tanh(W_s c + b_s)                               decoder initial state (per layer)
    s_t   = RNN_dec([e(y_{t-1}); c], s_{t-1})               c conditions EVERY decoder step
    o_t   = W_hy [s_t; e(y_{t-1}); c] + b_y                 ... and the output layer
  (the paper's maxout read-out is replaced by this linear read-out of the same three inputs).

"sutskever" (Sutskever et al. 2014, "Sequence to sequence learning with neural networks"):
    h_t   = RNN_enc(x_t, h_{t-1})                           over the REVERSED source x_S .. x_1
    c     = h_S (all layers' final carries, LSTM cell states included)
    s_0   = c;   s_t = RNN_dec(e(y_{t-1}), s_{t-1});   o_t = W_hy s_t + b_y

Attention (``attention``; ``rnn_jax.attention`` holds the score functions): instead of one
fixed c, every decoder step reads c_t = sum_j alpha_tj h_j, a softmax-weighted average of the
encoder's top-layer outputs h_j (the annotations), padded source positions masked out.

"bahdanau" (Bahdanau, Cho & Bengio 2014, "Neural machine translation by jointly learning to
align and translate", RNNsearch): the encoder is bidirectional, h_j = [->h_j; <-h_j], and
    e_tj  = v_a^T tanh(W_a s_{t-1} + U_a h_j)               s_{t-1}: the top decoder layer's state
    s_t   = RNN_dec([e(y_{t-1}); c_t], s_{t-1})
    o_t   = W_o [s_t; e(y_{t-1}); c_t] + b_o                (paper's eq. 4; linear, not maxout)
  With kind "cho" the decoder starts from the backward encoder state through a tanh layer, as in
  the paper's s_0 = tanh(W_s <-h_1) (plus a bias, one W_s per layer l reading layer l's <-h_1);
  with kind "sutskever" it starts from the backward final carries themselves.

"dot", "general", "concat" (Luong, Pham & Manning 2015, "Effective approaches to
attention-based neural machine translation", global attention): a unidirectional encoder (the
source reversed for kind "sutskever", as in the paper), the decoder starts as ``kind`` says
("sutskever": the encoder's final carries; "cho": s_0^(l) = tanh(W_s^(l) h_S^(l) + b)), and
    h_t   = RNN_dec(x_t, h_{t-1}),  x_t = [e(y_{t-1}); h~_{t-1}] (input feeding, h~_0 = 0) or e(y_{t-1})
    score = h_t^T h̄_s  |  h_t^T W_a h̄_s  |  v_a^T tanh(W_a [h_t; h̄_s])      (dot | general | concat)
    h~_t  = tanh(W_c [c_t; h_t]);   o_t = W_s h~_t + b_s
  (h_t: the top decoder layer's output; c_t attends with the CURRENT h_t.)

Both: p(y_t | y_<t, x) = softmax(o_t). Training is teacher forcing: the decoder reads
the gold y_{t-1} (y_0 = <bos>) and predicts y_t, ending with <eos>; the loss is the
masked cross-entropy over real target steps.

Inference: ``decode_sources`` decodes many sources in length-sorted batches (greedy, or
beam search with beam_size > 1), ``corpus_loss`` is the teacher-forced cross-entropy of a
whole split, and ``translate(load_run(workdir), sentences)`` translates raw text with a
trained run directory alone (its model.json and source/target vocabulary files).

Params split into an encoder side (e(x_t), RNN_enc, Cho's W_c) and a decoder side (the rest), whose
shapes depend on V_x and on V_y alone (``split_params`` / ``join_params``); ``rnn_jax.multitask``
composes tasks from shared sides.

Shapes: source ids [B, S], source lengths [B]; target inputs/outputs [B, T], target
lengths [B]. Variable lengths go through ``rnn_jax.sequence`` (padded steps leave the
state untouched, so h_S is the state at each source's true end). Token ids are
validated before any gather when they are concrete (outside jit).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import attention as attention_lib
from rnn_jax import layers, losses, mesh
from rnn_jax.cells import Cell, linear
from rnn_jax.sequence import StackedRNN
from rnn_jax.sequence import dropout as dropout_layer

KINDS = ("cho", "sutskever")
ATTENTIONS = ("",) + attention_lib.KINDS   # "": no attention (one fixed context)
NEG_INF = -1e9
# The params groups of ``Seq2Seq.init``: those that read the source alone (the encoder side) and the rest.
ENCODER_PARAMS = ("source_embedding", "encoder", "context")
DECODER_PARAMS = ("target_embedding", "decoder", "readout", "bridge", "attention", "attentional")


class Encoded(NamedTuple):
  """The encoder's summary of a batch.

  initial_carries: per-layer decoder initial carries, leaves [B, ...]; context: c [B, C] (Cho
  without attention) or None. With attention: memory, the annotations h_j [B, S, M] (in the
  order the encoder read them: reversed for a reversed source); keys, their projection for the
  score [B, S, A] (``attention.project_keys``); mask [B, S], True at real source positions.
  """
  initial_carries: tuple
  context: Optional[jax.Array]
  memory: Optional[jax.Array] = None
  keys: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None


class DecoderState(NamedTuple):
  """What a decoder step carries: per-layer carries, and Luong's input feed h~_{t-1} [B, O]
  (None unless ``input_feeding``)."""
  carries: tuple
  feed: Optional[jax.Array] = None


class Batch(NamedTuple):
  """A teacher-forcing batch of int32 arrays.

  source [B, S], source_lengths [B]; target_inputs [B, T] = (<bos>, y_1, .., y_{L-1}),
  target_outputs [B, T] = (y_1, .., y_{L-1}, <eos>), target_lengths [B] = L (target tokens + 1).
  """
  source: np.ndarray
  source_lengths: np.ndarray
  target_inputs: np.ndarray
  target_outputs: np.ndarray
  target_lengths: np.ndarray


def reverse_padded(ids: jax.Array, lengths: jax.Array, pad_id: int = 0) -> jax.Array:
  """Reverse each row's first L tokens and keep the padding at the end.

    out[b, t] = ids[b, L_b - 1 - t]  for t < L_b;   pad_id otherwise        ids: [B, S], lengths: [B]
  """
  positions = jnp.arange(ids.shape[1])[None, :]
  source_positions = lengths[:, None] - 1 - positions
  valid = positions < lengths[:, None]
  gathered = jnp.take_along_axis(ids, jnp.clip(source_positions, 0, ids.shape[1] - 1), axis=1)
  return jnp.where(valid, gathered, jnp.asarray(pad_id, ids.dtype))


def _round_up(value: int, multiple: int) -> int:
  return int(-(-value // multiple) * multiple)


def make_batch(sources, targets, bos_id: int, eos_id: int, pad_id: int = 0, pad_multiple: int = 1) -> Batch:
  """Pad lists of id sequences into a teacher-forcing ``Batch`` (see its docstring).

  Widths S and T are the longest source and target (+1) rounded up to ``pad_multiple``,
  so a jitted step compiles once per width rather than once per batch. Raises
  ValueError on an empty batch, mismatched sizes or an empty source.
  """
  if len(sources) != len(targets):
    raise ValueError(f"seq2seq: {len(sources)} sources but {len(targets)} targets")
  if not sources:
    raise ValueError("seq2seq: empty batch")
  source_lengths = np.asarray([len(s) for s in sources], np.int32)
  if source_lengths.min() == 0:
    raise ValueError("seq2seq: a source sequence is empty; every source needs at least one token")
  target_lengths = np.asarray([len(t) + 1 for t in targets], np.int32)
  if pad_multiple < 1:
    raise ValueError(f"seq2seq: pad_multiple must be >= 1, got {pad_multiple}")
  B = len(sources)
  S, T = _round_up(source_lengths.max(), pad_multiple), _round_up(target_lengths.max(), pad_multiple)
  source = np.full((B, S), pad_id, np.int32)
  inputs = np.full((B, T), pad_id, np.int32)
  outputs = np.full((B, T), pad_id, np.int32)
  for b, (s, t) in enumerate(zip(sources, targets)):
    source[b, :len(s)] = s
    inputs[b, :len(t) + 1] = [bos_id, *t]
    outputs[b, :len(t) + 1] = [*t, eos_id]
  return Batch(source, source_lengths, inputs, outputs, target_lengths)


@dataclasses.dataclass(frozen=True)
class Seq2Seq:
  """Encoder-decoder hyper-parameters (hashable: usable as a static jit argument).

  Attributes:
    kind: "cho" or "sutskever" (see the module docstring).
    cell: the recurrent cell of encoder and decoder (e.g. GRU for Cho, LSTM for Sutskever).
    source_vocab_size, target_vocab_size: V_x and V_y.
    embed_size: E, the size of e(x_t) and e(y_t).
    num_layers: stacked layers in encoder and decoder.
    context_size: C, the size of Cho's c (default: the cell's state size).
    dropout: between stacked layers, training only.
    reverse_source: read the source backwards (default: True for "sutskever", False for "cho").
    bos_id, eos_id, pad_id: special target ids (pad_id also pads sources).
    attention: "" (none: one fixed context), "bahdanau", "dot", "general" or "concat" (see the
      module docstring).
    input_feeding: Luong attention only: feed h~_{t-1} into the next decoder input.
    attention_size: A, the hidden size of the additive scores (bahdanau, concat); default: the
      cell's state size.
  """
  kind: str
  cell: Cell
  source_vocab_size: int
  target_vocab_size: int
  embed_size: int = 64
  num_layers: int = 1
  context_size: Optional[int] = None
  dropout: float = 0.0
  reverse_source: Optional[bool] = None
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 0
  attention: str = ""
  input_feeding: bool = False
  attention_size: Optional[int] = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"seq2seq: unknown kind {self.kind!r}; expected one of {KINDS}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"seq2seq: unknown attention {self.attention!r}; expected one of {ATTENTIONS}")
    if self.input_feeding and self.attention not in attention_lib.LUONG:
      raise ValueError(f"seq2seq: input_feeding applies to Luong attention {attention_lib.LUONG}, "
                       f"got attention={self.attention!r}")
    if self.attention and self.context_size is not None:
      raise ValueError(f"seq2seq: context_size sizes the fixed context of a model without attention; "
                       f"attention={self.attention!r} has none")
    if self.attention_size is not None and int(self.attention_size) <= 0:
      raise ValueError(f"seq2seq: attention_size must be positive, got {self.attention_size}")
    for name in ("source_vocab_size", "target_vocab_size", "embed_size", "num_layers"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"seq2seq: {name} must be positive, got {getattr(self, name)}")
    for name in ("bos_id", "eos_id", "pad_id"):
      if not 0 <= getattr(self, name) < self.target_vocab_size:
        raise ValueError(f"seq2seq: {name}={getattr(self, name)} must lie in [0, {self.target_vocab_size})")

  # ---- structure -----------------------------------------------------------
  @property
  def reversed_source(self) -> bool:
    return self.kind == "sutskever" if self.reverse_source is None else self.reverse_source

  @property
  def state_size(self) -> int:
    return self.cell.state_size

  @property
  def context_width(self) -> int:
    return self.context_size or self.state_size

  @property
  def encoder(self) -> StackedRNN:
    """Bidirectional for Bahdanau attention (h_j = [->h_j; <-h_j]), else forward only."""
    return StackedRNN(self.cell, num_layers=self.num_layers, dropout=self.dropout,
                      bidirectional=self.attention == "bahdanau")

  @property
  def decoder(self) -> StackedRNN:
    return StackedRNN(self.cell, num_layers=self.num_layers, dropout=self.dropout)

  @property
  def memory_size(self) -> int:
    """M, the size of an annotation h_j: the encoder's top-layer output (2 O when bidirectional)."""
    return self.encoder.output_size

  @property
  def query_size(self) -> int:
    """Q: the decoder state s_{t-1} (Bahdanau) or the top decoder output h_t (Luong)."""
    return self.state_size if self.attention == "bahdanau" else self.cell.output_size

  @property
  def decoder_input_size(self) -> int:
    if self.attention == "bahdanau":
      return self.embed_size + self.memory_size
    if self.attention:
      return self.embed_size + (self.cell.output_size if self.input_feeding else 0)
    return self.embed_size + (self.context_width if self.kind == "cho" else 0)

  @property
  def readout_input_size(self) -> int:
    if self.attention == "bahdanau":
      return self.cell.output_size + self.embed_size + self.memory_size
    if self.attention:
      return self.cell.output_size   # h~_t
    if self.kind == "cho":
      return self.cell.output_size + self.embed_size + self.context_width
    return self.cell.output_size

  def init(self, key) -> dict:
    """Params: embeddings, encoder/decoder StackedRNN params, read-out (+ Cho's W_c and W_s per layer).

    With attention: "attention" (the score's weights, none for dot), "bridge" (W_s per layer, kind
    "cho") and, for Luong, "attentional" {"w": W_c [O, M + O]}.
    """
    if self.attention:
      return self._init_attention(key)
    keys = jax.random.split(key, 6)
    params = self._shared_params(keys)
    if self.kind == "cho":
      bridge_keys = jax.random.split(keys[5], self.num_layers + 1)
      params["context"] = layers.dense_init(bridge_keys[0], self.state_size, self.context_width)
      params["bridge"] = [layers.dense_init(k, self.context_width, self.state_size) for k in bridge_keys[1:]]
    return params

  def _shared_params(self, keys) -> dict:
    """Embeddings, encoder, decoder and read-out, from keys[0..4] (the rest is per decoder kind)."""
    return {
        "source_embedding": layers.embedding_init(keys[0], self.source_vocab_size, self.embed_size),
        "target_embedding": layers.embedding_init(keys[1], self.target_vocab_size, self.embed_size),
        "encoder": self.encoder.init(keys[2], self.embed_size),
        "decoder": self.decoder.init(keys[3], self.decoder_input_size),
        "readout": layers.dense_init(keys[4], self.readout_input_size, self.target_vocab_size),
    }

  def split_params(self, params: dict) -> tuple[dict, dict]:
    """(encoder side, decoder side) of a params dict; ``join_params`` is its inverse.

    The encoder side reads the source alone: "source_embedding" e(x_t), "encoder" (RNN_enc) and,
    for Cho without attention, "context" (W_c of c = tanh(W_c h_S + b_c)); everything else (target
    embedding, RNN_dec, read-out W_hy, bridge W_s, attention scores, Luong's W_c) is the decoder
    side. The encoder side's shapes depend on V_x only, the decoder side's on V_y only, so one side
    can be shared by every model that has the same sizes otherwise.
    """
    unknown = sorted(set(params) - set(ENCODER_PARAMS) - set(DECODER_PARAMS))
    if unknown:
      raise ValueError(f"seq2seq: params hold unknown groups {unknown}; expected some of "
                       f"{ENCODER_PARAMS + DECODER_PARAMS}")
    return ({k: v for k, v in params.items() if k in ENCODER_PARAMS},
            {k: v for k, v in params.items() if k not in ENCODER_PARAMS})

  @staticmethod
  def join_params(encoder_params: dict, decoder_params: dict) -> dict:
    """One params dict from an encoder side and a decoder side (``split_params``' inverse)."""
    clash = sorted(set(encoder_params) & set(decoder_params))
    if clash or set(encoder_params) - set(ENCODER_PARAMS):
      raise ValueError(f"seq2seq: encoder params {sorted(encoder_params)} and decoder params "
                       f"{sorted(decoder_params)} must split as {ENCODER_PARAMS} / the rest")
    return {**encoder_params, **decoder_params}

  def _init_attention(self, key) -> dict:
    keys = jax.random.split(key, 8)
    params = self._shared_params(keys)
    scores = attention_lib.init(self.attention, keys[5], self.query_size, self.memory_size,
                                self.attention_size or self.state_size)
    if scores:
      params["attention"] = scores
    if self.kind == "cho":
      params["bridge"] = [layers.dense_init(k, self.state_size, self.state_size)
                          for k in jax.random.split(keys[6], self.num_layers)]
    if self.attention in attention_lib.LUONG:
      width = self.memory_size + self.cell.output_size
      params["attentional"] = {"w": layers.dense_init(keys[7], width, self.cell.output_size)["w"]}
    return params

  # ---- encoder ---------------------------------------------------------------
  def encode(self, params: dict, source: jax.Array, source_lengths: jax.Array, *, train: bool = False,
             rng=None) -> Encoded:
    """Read the source and build the decoder's start: source [B, S], lengths [B] -> ``Encoded``."""
    if source.ndim != 2:
      raise ValueError(f"seq2seq: source must have shape [B, S], got {tuple(source.shape)}")
    layers.check_token_ids(source, self.source_vocab_size, "seq2seq: source ids")
    if self.reversed_source:
      source = reverse_padded(source, source_lengths, self.pad_id)
    xs = layers.embed(params["source_embedding"], source)
    final_carries, outputs = self.encoder(params["encoder"], xs, source_lengths, train=train,
                                          rng=rng)
    if self.attention:
      return self._encode_attention(params, final_carries, outputs, source_lengths)
    if self.kind == "sutskever":
      return Encoded(tuple(final_carries), None)
    top_hidden = jax.vmap(self.cell.hidden)(final_carries[-1])
    context = jnp.tanh(layers.dense(params["context"], top_hidden))
    carries = []
    for layer in range(self.num_layers):
      start = jnp.tanh(layers.dense(params["bridge"][layer], context))
      zeros = self.cell.initial_carry(params["decoder"][f"layer_{layer}"]["forward"])
      batched = jax.tree_util.tree_map(lambda z: jnp.broadcast_to(z, start.shape[:1] + z.shape), zeros)
      carries.append(self.cell.with_hidden(batched, start))
    return Encoded(tuple(carries), context)

  def _encode_attention(self, params: dict, final_carries, outputs: jax.Array, lengths: jax.Array) -> Encoded:
    """The memory h_j = outputs [B, S, M], its keys and mask, and the decoder's start.

    Each layer's summary is its final carry, or its backward direction's (<-h_1, the state after
    reading x_1) when the encoder is bidirectional. "sutskever" starts from the summaries;
    "cho" from s_0^(l) = tanh(W_s^(l) h^(l) + b^(l)), h^(l) the summary's hidden state (an LSTM's
    cell state starts at 0).
    """
    summaries = [carry[1] if self.encoder.bidirectional else carry for carry in final_carries]
    if self.kind == "sutskever":
      carries = summaries
    else:
      carries = []
      for layer, summary in enumerate(summaries):
        start = jnp.tanh(layers.dense(params["bridge"][layer], jax.vmap(self.cell.hidden)(summary)))
        carries.append(self.cell.with_hidden(jax.tree_util.tree_map(jnp.zeros_like, summary), start))
    mask = jnp.arange(outputs.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
    keys = attention_lib.project_keys(self.attention, params.get("attention", {}), outputs)
    return Encoded(tuple(carries), None, outputs, keys, mask)

  # ---- decoder ---------------------------------------------------------------
  def _decoder_inputs(self, embedded: jax.Array, context: Optional[jax.Array]) -> jax.Array:
    """x_t = [e(y_{t-1}); c] for Cho, e(y_{t-1}) for Sutskever: embedded [B, (T,) E]."""
    if self.kind != "cho":
      return embedded
    if embedded.ndim == 3:
      context = jnp.broadcast_to(context[:, None, :], embedded.shape[:2] + context.shape[-1:])
    return jnp.concatenate([embedded, context], axis=-1)

  def _readout(self, params: dict, hidden: jax.Array, embedded: jax.Array, context) -> jax.Array:
    """o_t = W_hy [s_t; e(y_{t-1}); c] + b_y (Cho) or W_hy s_t + b_y (Sutskever)."""
    if self.kind == "cho":
      hidden = self._decoder_inputs(jnp.concatenate([hidden, embedded], axis=-1), context)
    return layers.dense(params["readout"], hidden)

  def __call__(self, params: dict, batch: Batch, *, train: bool = False, rng=None) -> jax.Array:
    """Teacher forcing: the logits o_t of every target step given the gold prefix -> [B, T, V_y]."""
    return self._teacher_forcing(params, batch, train=train, rng=rng)[0]

  def attention_weights(self, params: dict, batch: Batch) -> jax.Array:
    """alpha_tj of teacher forcing on ``batch``: [B, T, S], row t the weights read while predicting
    target_outputs[:, t], column j the source token j in the source's own order (also for a
    reversed source); 0 at padded source positions."""
    if not self.attention:
      raise ValueError("seq2seq: attention_weights needs a model with attention; attention is ''")
    weights = self._teacher_forcing(params, batch)[1]
    if not self.reversed_source:
      return weights
    lengths = jnp.asarray(batch.source_lengths)[:, None, None]
    positions = jnp.arange(weights.shape[-1])[None, None, :]
    read_at = jnp.clip(lengths - 1 - positions, 0, weights.shape[-1] - 1)   # x_j was read at L-1-j
    gathered = jnp.take_along_axis(weights, jnp.broadcast_to(read_at, weights.shape), axis=-1)
    return jnp.where(positions < lengths, gathered, jnp.zeros((), weights.dtype))

  def _teacher_forcing(self, params: dict, batch: Batch, *, train: bool = False, rng=None):
    """(logits [B, T, V_y], attention weights [B, T, S] in the encoder's order, or None without attention).

    Luong attention without input feeding runs the decoder over all T at once and attends for
    every t in one batched read; otherwise (Bahdanau, input feeding) step t needs step t-1's
    attention, so the decoder is a lax.scan of ``_attention_step``.
    """
    keys = (None, None) if rng is None else tuple(jax.random.split(rng))
    encoded = self.encode(params, batch.source, batch.source_lengths, train=train, rng=keys[0])
    layers.check_token_ids(batch.target_inputs, self.target_vocab_size, "seq2seq: target ids")
    embedded = layers.embed(params["target_embedding"], batch.target_inputs)
    if not self.attention or (self.attention in attention_lib.LUONG and not self.input_feeding):
      inputs = embedded if self.attention else self._decoder_inputs(embedded, encoded.context)
      _, hidden = self.decoder(params["decoder"], inputs, batch.target_lengths, train=train,
                               rng=keys[1], initial_carries=encoded.initial_carries)
      if not self.attention:
        return self._readout(params, hidden, embedded, encoded.context), None
      read = jax.vmap(lambda h: self._luong_read(params, h, encoded), in_axes=1, out_axes=1)
      attentional, weights = read(hidden)
      return layers.dense(params["readout"], attentional), weights
    use_dropout = train and self.dropout > 0.0 and self.num_layers > 1
    if use_dropout and rng is None:
      raise ValueError("seq2seq: train=True with dropout > 0 needs an rng key")
    step_keys = jax.random.split(keys[1], embedded.shape[1]) if use_dropout else None

    def body(state, inputs):
      embedded_t, key_t = inputs
      state, logits, weights = self._attention_step(params, state, embedded_t, encoded, rng=key_t)
      return state, (logits, weights)

    _, (logits, weights) = jax.lax.scan(body, self.initial_state(encoded),
                                        (jnp.swapaxes(embedded, 0, 1), step_keys))
    return jnp.swapaxes(logits, 0, 1), jnp.swapaxes(weights, 0, 1)

  def initial_state(self, encoded: Encoded) -> DecoderState:
    """The decoder's start: the encoder's initial carries, and h~_0 = 0 [B, O] with input feeding."""
    carries = tuple(encoded.initial_carries)
    if not self.input_feeding:
      return DecoderState(carries)
    return DecoderState(carries, jnp.zeros(encoded.memory.shape[:1] + (self.cell.output_size,),
                                           encoded.memory.dtype))

  def _stack_step(self, params: dict, carries: tuple, x_t: jax.Array, rng=None):
    """The decoder stack's step, with dropout between layers when rng is given (training)."""
    if rng is None or self.dropout == 0.0:
      return self.decoder.step(params["decoder"], carries, x_t)
    new_carries, inputs = [], x_t
    for layer in range(self.num_layers):
      if layer > 0:
        rng, sub = jax.random.split(rng)
        inputs = dropout_layer(sub, self.dropout, inputs)
      carry, inputs = self.cell.step(params["decoder"][f"layer_{layer}"]["forward"], carries[layer], inputs)
      new_carries.append(carry)
    return tuple(new_carries), inputs

  def _luong_read(self, params: dict, hidden: jax.Array, encoded: Encoded):
    """h~_t = tanh(W_c [c_t; h_t]) with c_t attending with h_t: hidden [B, O] -> (h~_t [B, O], alpha_t [B, S])."""
    context, weights = attention_lib.attend(self.attention, params.get("attention", {}), hidden, encoded.keys,
                                            encoded.memory, encoded.mask)
    attentional = jnp.tanh(linear(jnp.concatenate([context, hidden], axis=-1), params["attentional"]["w"]))
    return attentional, weights

  def _attention_step(self, params: dict, state: DecoderState, embedded: jax.Array, encoded: Encoded,
                      rng=None):
    """One attention decoder step from e(y_{t-1}) [B, E]: -> (state, logits [B, V_y], alpha_t [B, S]).

      bahdanau: c_t = attend(s_{t-1}); s_t = RNN([e(y_{t-1}); c_t], s_{t-1}); o_t = W_o [s_t; e(y_{t-1}); c_t] + b_o
      luong:    h_t = RNN([e(y_{t-1}); h~_{t-1}] or e(y_{t-1}), h_{t-1}); c_t = attend(h_t);
                h~_t = tanh(W_c [c_t; h_t]); o_t = W_s h~_t + b_s
    """
    carries = state.carries
    if self.attention == "bahdanau":
      query = jax.vmap(self.cell.hidden)(carries[-1])
      context, weights = attention_lib.attend("bahdanau", params["attention"], query, encoded.keys,
                                              encoded.memory, encoded.mask)
      carries, hidden = self._stack_step(params, carries, jnp.concatenate([embedded, context], axis=-1), rng)
      logits = layers.dense(params["readout"], jnp.concatenate([hidden, embedded, context], axis=-1))
      return DecoderState(carries), logits, weights
    inputs = jnp.concatenate([embedded, state.feed], axis=-1) if self.input_feeding else embedded
    carries, hidden = self._stack_step(params, carries, inputs, rng)
    attentional, weights = self._luong_read(params, hidden, encoded)
    return (DecoderState(carries, attentional if self.input_feeding else None),
            layers.dense(params["readout"], attentional), weights)

  def loss(self, params: dict, batch: Batch, *, train: bool = False, rng=None,
           reduction: str = "mean") -> jax.Array:
    """Teacher-forcing cross-entropy -sum_t log p(y_t | y_<t, x) over real target steps (nats)."""
    logits = self(params, batch, train=train, rng=rng)
    mask = jnp.arange(logits.shape[1])[None, :] < batch.target_lengths[:, None]
    return losses.cross_entropy(logits, batch.target_outputs, mask, reduction=reduction)

  def decode_step(self, params: dict, state: DecoderState, previous: jax.Array, encoded: Encoded):
    """One decoder step for a batch: previous ids [B] -> (state, logits [B, V_y]).

      s_t^(l) = cell.step(s_{t-1}^(l), x_t^(l)),  x_t^(0) = decoder input,  x_t^(l+1) = s_t^(l)

    state: ``initial_state(encoded)`` or the previous step's; encoded: ``encode``'s (its context
    for Cho without attention, its memory with attention).
    """
    embedded = layers.embed(params["target_embedding"], previous)
    if self.attention:
      state, logits, _ = self._attention_step(params, state, embedded, encoded)
      return state, logits
    carries, x = self.decoder.step(params["decoder"], state.carries,
                                   self._decoder_inputs(embedded, encoded.context))
    return DecoderState(carries), self._readout(params, x, embedded, encoded.context)

  def _next_token_logits(self, logits: jax.Array) -> jax.Array:
    """Decoding never emits <pad> or <bos>: their logits are set to -1e9 (in float32)."""
    return logits.astype(jnp.float32).at[..., self.pad_id].set(NEG_INF).at[..., self.bos_id].set(NEG_INF)

  def greedy_decode(self, params: dict, source: jax.Array, source_lengths: jax.Array, max_len: int):
    """y_t = argmax_v p(v | y_<t, x), feeding y_t back, until <eos> or max_len steps.

    <pad> and <bos> are never emitted (their logits are masked), here and in ``beam_search``.

    Returns (tokens [B, max_len] with <eos> included and pad_id after it, lengths [B]
    counting the tokens up to and including <eos>).
    """
    encoded = self.encode(params, source, source_lengths)
    B = source.shape[0]

    def body(state, _):
      carries, previous, finished = state
      carries, logits = self.decode_step(params, carries, previous, encoded)
      best = jnp.argmax(self._next_token_logits(logits), axis=-1).astype(jnp.int32)
      token = jnp.where(finished, self.pad_id, best)
      finished = finished | (token == self.eos_id)
      return (carries, token, finished), token

    start = (self.initial_state(encoded), jnp.full((B,), self.bos_id, jnp.int32), jnp.zeros((B,), bool))
    (_, _, _), tokens = jax.lax.scan(body, start, None, length=max_len)
    tokens = tokens.T
    return tokens, self._lengths(tokens)

  def _lengths(self, tokens: jax.Array) -> jax.Array:
    """Tokens up to and including the first <eos> (max_len if none): [B, T] -> [B]."""
    is_eos = tokens == self.eos_id
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(jnp.any(is_eos, axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)

  def beam_search(self, params: dict, source: jax.Array, source_lengths: jax.Array, max_len: int,
                  beam_width: int = 4, length_penalty: float = 0.0):
    """Beam search: keep the K prefixes of highest log p(y_<=t | x) at every step.

      score(y_<=t) = sum_i log p(y_i | y_<i, x);   finished beams (ending in <eos>) keep their score
      final choice: argmax_k score_k / L_k ** length_penalty   (L_k: tokens including <eos>)

    With beam_width=1 this is exactly ``greedy_decode``. Returns (tokens [B, max_len],
    lengths [B], scores [B]) of the best hypothesis per example.
    """
    if beam_width < 1:
      raise ValueError(f"seq2seq: beam_width must be >= 1, got {beam_width}")
    K, V = beam_width, self.target_vocab_size
    if K > V - 2:
      raise ValueError(f"seq2seq: beam_width {K} exceeds the {V - 2} emittable target tokens "
                       f"(vocabulary size {V} minus <pad> and <bos>)")
    B = source.shape[0]
    tile = lambda leaf: jnp.repeat(leaf, K, axis=0)   # [B, ...] -> [B*K, ...], beams of b adjacent
    encoded = jax.tree_util.tree_map(tile, self.encode(params, source, source_lengths))   # memory per beam
    carries = self.initial_state(encoded)
    only_pad = jnp.full((V,), NEG_INF).at[self.pad_id].set(0.0)

    def body(state, t):
      carries, previous, finished, scores, tokens = state
      carries, logits = self.decode_step(params, carries, previous.reshape(B * K), encoded)
      log_probs = jax.nn.log_softmax(self._next_token_logits(logits), axis=-1).reshape(B, K, V)
      log_probs = jnp.where(finished[..., None], only_pad, log_probs)
      candidates = (scores[..., None] + log_probs).reshape(B, K * V)
      scores, flat = jax.lax.top_k(candidates, K)
      origin, token = flat // V, (flat % V).astype(jnp.int32)
      pick = lambda leaf: jnp.take_along_axis(
          leaf.reshape((B, K) + leaf.shape[1:]), origin.reshape((B, K) + (1,) * (leaf.ndim - 1)),
          axis=1).reshape(leaf.shape)
      carries = jax.tree_util.tree_map(pick, carries)
      tokens = jnp.take_along_axis(tokens, origin[..., None], axis=1).at[:, :, t].set(token)
      finished = jnp.take_along_axis(finished, origin, axis=1) | (token == self.eos_id)
      return (carries, token, finished, scores, tokens), None

    scores = jnp.full((B, K), NEG_INF).at[:, 0].set(0.0)   # one live beam at t = 0: no duplicates
    start = (carries, jnp.full((B, K), self.bos_id, jnp.int32), jnp.zeros((B, K), bool), scores,
             jnp.full((B, K, max_len), self.pad_id, jnp.int32))
    (_, _, _, scores, tokens), _ = jax.lax.scan(body, start, jnp.arange(max_len))
    lengths = self._lengths(tokens)
    normalised = scores / lengths.astype(jnp.float32) ** length_penalty
    best = jnp.argmax(normalised, axis=1)
    pick_best = lambda leaf: jnp.take_along_axis(leaf, best.reshape((B, 1) + (1,) * (leaf.ndim - 2)),
                                                 axis=1)[:, 0]
    return pick_best(tokens), pick_best(lengths), pick_best(scores)


# ---------------------------------------------------------------------------
# Decoding many sources, corpus loss, and translation from a run directory
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _decoder(model: Seq2Seq, max_len: int, beam_size: int, length_penalty: float):
  """The jitted decoder of ``model``: greedy for beam_size 1, else beam search (cached per settings)."""
  if beam_size == 1:
    return mesh.data_parallel(jax.jit(functools.partial(model.greedy_decode, max_len=max_len)))
  return mesh.data_parallel(jax.jit(functools.partial(model.beam_search, max_len=max_len, beam_width=beam_size,
                                                      length_penalty=length_penalty)))


@functools.lru_cache(maxsize=32)
def _mean_loss(model: Seq2Seq):
  return mesh.data_parallel(jax.jit(lambda params, batch: model.loss(params, batch, reduction="mean")))


def decode_sources(model: Seq2Seq, params: dict, sources: Sequence, *, max_len: int, beam_size: int = 1,
                   length_penalty: float = 0.0, batch_size: int = 64,
                   pad_multiple: int = 8) -> list[list[int]]:
  """Decode every source id sequence; returns each one's output ids without <eos>, in input order.

  Sources are sorted by length and decoded ``batch_size`` at a time, padded to a multiple of
  ``pad_multiple`` (one compilation per batch width). beam_size 1 is ``greedy_decode``; larger
  sizes are ``beam_search`` with that beam width K and ``length_penalty``. At most ``max_len``
  tokens are emitted per source.
  """
  if not len(sources):
    raise ValueError("decode_sources: no sources to decode")
  for name, value in (("max_len", max_len), ("beam_size", beam_size), ("batch_size", batch_size),
                      ("pad_multiple", pad_multiple)):
    if int(value) < 1:
      raise ValueError(f"decode_sources: {name} must be >= 1, got {value}")
  lengths = np.asarray([len(s) for s in sources], np.int32)
  if lengths.min() == 0:
    raise ValueError(f"decode_sources: source {int(np.argmin(lengths))} is empty; every source needs a token")
  decode = _decoder(model, int(max_len), int(beam_size), float(length_penalty))
  order = np.argsort(lengths, kind="stable")
  outputs: list = [None] * len(sources)
  for start in range(0, len(sources), batch_size):
    indices = order[start:start + batch_size]
    width = _round_up(int(lengths[indices].max()), pad_multiple)
    source = np.full((len(indices), width), model.pad_id, np.int32)
    for row, index in enumerate(indices):
      source[row, :lengths[index]] = sources[index]
    tokens, token_lengths = decode(params, jnp.asarray(source), jnp.asarray(lengths[indices]))[:2]
    tokens, token_lengths = np.asarray(tokens), np.asarray(token_lengths)
    for row, index in enumerate(indices):
      ids = tokens[row, :token_lengths[row]].tolist()
      outputs[index] = ids[:-1] if ids and ids[-1] == model.eos_id else ids
  return outputs


def corpus_loss(model: Seq2Seq, params: dict, batches) -> float:
  """Teacher-forced cross-entropy per target token (<eos> included) over a whole split, in nats.

  batches: (example indices, ``Batch``) pairs, e.g. ``data.translation.evaluation_pair_batches``;
  each batch's mean is weighted by its number of target tokens.
  """
  loss = _mean_loss(model)
  total = tokens = 0.0
  for _, batch in batches:
    count = float(np.sum(batch.target_lengths))
    total += float(loss(params, batch)) * count
    tokens += count
  if not tokens:
    raise ValueError("corpus_loss: no target tokens (the split is empty)")
  return total / tokens


@functools.lru_cache(maxsize=32)
def _attention_weights(model: Seq2Seq):
  return jax.jit(model.attention_weights)


def attention_maps(model: Seq2Seq, params: dict, sources: Sequence, outputs: Sequence) -> list[np.ndarray]:
  """The alignment of each source with an output (e.g. its greedy translation, without <eos>).

  Returns one array per pair, [len(output) + 1, len(source)]: row t the weights alpha_tj read while
  emitting output token t (the last row: <eos>), column j source token j in the source's order.
  The weights are those of teacher forcing on the output, which for the model's own greedy output
  are exactly those of its greedy decoding.
  """
  if len(sources) != len(outputs) or not len(sources):
    raise ValueError(f"attention_maps: {len(sources)} sources and {len(outputs)} outputs; expected as many, "
                     f"at least one")
  batch = make_batch([list(s) for s in sources], [list(o) for o in outputs], model.bos_id, model.eos_id,
                     model.pad_id, pad_multiple=8)
  weights = np.asarray(_attention_weights(model)(params, batch))
  return [weights[b, :len(o) + 1, :len(s)] for b, (s, o) in enumerate(zip(sources, outputs))]


def num_params(params) -> int:
  """The number of scalar parameters in a params tree."""
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def run_vocabularies(loaded):
  """(source, target) ``Vocabulary`` of a translation run loaded with ``rnn_jax.load_run``.

  model.json's ``vocabularies`` entry names the two files in the run directory
  ({"source": "source_vocab.json", "target": "target_vocab.json"}, each {"tokens": [...]}).
  """
  from rnn_jax.data.vocab import Vocabulary  # pylint: disable=import-outside-toplevel
  from rnn_jax.rundir import read_json  # pylint: disable=import-outside-toplevel
  files = loaded.extra.get("vocabularies")
  if not isinstance(files, dict) or not {"source", "target"} <= set(files):
    raise ValueError(f"{loaded.workdir}/model.json names no source and target vocabularies; "
                     f"it is not the run directory of a translation model")
  vocabularies = []
  for side in ("source", "target"):
    path = os.path.join(loaded.workdir, files[side])
    if not os.path.exists(path):
      raise FileNotFoundError(f"the {side} vocabulary {path} is missing from the run directory")
    vocabularies.append(Vocabulary(read_json(path)["tokens"]))
  return tuple(vocabularies)


def translate(loaded, sentences: Sequence[str], *, beam_size: int = 1, length_penalty: Optional[float] = None,
              max_len: int = 0, batch_size: int = 64) -> list[str]:
  """Translate raw sentences with a trained run (``rnn_jax.load_run(workdir)``): one string each.

  Each sentence is tokenised as in training (``data.translation.tokenize``: lower-cased words
  and punctuation; unknown words become <unk>), encoded with the run's source vocabulary and
  decoded greedily (beam_size 1) or by beam search of width beam_size, in batches of
  ``batch_size``. length_penalty: None uses the run's. max_len: the most output tokens
  (<eos> included); 0 uses the run's ``decode_max_len`` (the limit of its evaluation), or
  twice the longest source plus 10 for a run that recorded none.
  Output tokens are joined by the run's ``target_separator`` ("" for characters, " " for words).
  """
  from rnn_jax.data import translation  # pylint: disable=import-outside-toplevel
  model = loaded.model
  if not isinstance(model, Seq2Seq):
    raise ValueError(f"{loaded.workdir} holds a {type(model).__name__}, not a Seq2Seq translation model")
  sentences = list(sentences)
  if not sentences:
    raise ValueError("translate: no sentences to translate")
  source_vocab, target_vocab = run_vocabularies(loaded)
  tokenized = [translation.tokenize(sentence) for sentence in sentences]
  empty = [i for i, tokens in enumerate(tokenized) if not tokens]
  if empty:
    raise ValueError(f"translate: sentence {empty[0]} ({sentences[empty[0]]!r}) has no word to translate")
  sources = [source_vocab.encode(tokens) for tokens in tokenized]
  if not max_len:
    max_len = int(loaded.extra.get("decode_max_len") or 2 * max(len(s) for s in sources) + 10)
  if length_penalty is None:
    length_penalty = float(loaded.config.get("length_penalty", 0.0))
  outputs = decode_sources(model, loaded.params, sources, max_len=max_len, beam_size=beam_size,
                           length_penalty=length_penalty, batch_size=batch_size)
  separator = loaded.extra.get("target_separator", " ")
  return [separator.join(target_vocab.tokens[i] for i in ids) for ids in outputs]
