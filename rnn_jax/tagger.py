"""Many-to-many tagger with T_x = T_y: embedding -> bidirectional LSTM -> dense per token -> softmax.

    x_t = E[w_t]
    ->h_t = LSTM(x_t, ->h_{t-1});   <-h_t = LSTM(x_t, <-h_{t+1})   (padding-aware: <-h starts at x_{L-1})
    p(tag_t | w) = softmax(W_hy [->h_t ; <-h_t] + b_y)              one independent softmax per token

This is the "BiLSTM" tagger of Huang et al. (2015) and Lample et al. (2016) without
their CRF layer, character features or pretrained embeddings. Padded steps (t >= L)
produce logits that the masked loss and the decoder ignore.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from rnn_jax import layers
from rnn_jax.cells import make_cell
from rnn_jax.sequence import StackedRNN, dropout


@dataclasses.dataclass(frozen=True)
class SequenceTagger:
  """Hyper-parameters of the tagger (static under jit).

  Attributes:
    vocab_size: V words; num_tags: K.
    embed_size, hidden_size: D, and H per direction.
    cell: "lstm" by default ("gru" and "elman" also work).
    num_layers: stacked bidirectional layers.
    dropout: inverted dropout on the embeddings and on the BiLSTM outputs (training only),
      as in Lample et al. (2016).
  """
  vocab_size: int
  num_tags: int
  embed_size: int = 100
  hidden_size: int = 100
  cell: str = "lstm"
  num_layers: int = 1
  dropout: float = 0.5

  def __post_init__(self):
    for name in ("vocab_size", "num_tags", "embed_size", "hidden_size", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"SequenceTagger: {name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"SequenceTagger: dropout must be in [0, 1), got {self.dropout}")

  @property
  def encoder(self) -> StackedRNN:
    """The bidirectional stacked RNN; outputs [->h_t ; <-h_t] of size 2H."""
    return StackedRNN(make_cell(self.cell, self.hidden_size), num_layers=self.num_layers,
                      bidirectional=True, dropout=self.dropout)

  def init(self, key) -> dict:
    """Params {"embed": {table: [V, D]}, "encoder": ..., "output": {w: [K, 2H], b: [K]}}."""
    key_embed, key_encoder, key_output = jax.random.split(key, 3)
    return {
        "embed": layers.embedding_init(key_embed, self.vocab_size, self.embed_size),
        "encoder": self.encoder.init(key_encoder, self.embed_size),
        "output": layers.dense_init(key_output, self.encoder.output_size, self.num_tags),
    }

  def __call__(self, params: dict, ids: jax.Array, lengths: jax.Array, *, train: bool = False,
               dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Tag logits: ids [B, T], lengths [B] -> [B, T, K] (rows t >= L are padding)."""
    if ids.ndim != 2:
      raise ValueError(f"SequenceTagger: ids must have shape [B, T], got {tuple(ids.shape)}")
    if train and self.dropout > 0.0 and dropout_key is None:
      raise ValueError("SequenceTagger: train=True with dropout > 0 needs a dropout_key")
    keys = jax.random.split(dropout_key, 3) if (train and self.dropout > 0.0) else [None] * 3
    xs = layers.embed(params["embed"], ids)
    if keys[0] is not None:
      xs = dropout(keys[0], self.dropout, xs)
    _, hs = self.encoder(params["encoder"], xs, lengths, train=train, dropout_key=keys[1])
    if keys[2] is not None:
      hs = dropout(keys[2], self.dropout, hs)
    return layers.dense(params["output"], hs)
