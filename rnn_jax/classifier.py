"""Many-to-one sentence classifier: embedding -> (bi)RNN -> state at the true length -> dense -> softmax.

    x_t = E[w_t]                                   token embeddings, t < L (L = the sentence's length)
    h_t = RNN(x_t, h_{t-1})                        forward;   <-h_t reads x_{L-1} .. x_0 when bidirectional
    s   = h_{L-1}   (or [h_{L-1} ; <-h_0])         the state at the TRUE last token, never a padded step
    p(y | w) = softmax(W_hy s + b_y)

The sentence vector is the final carry of ``rnn_jax.sequence.rnn``: on padded steps
(t >= L) the carry is left untouched, so the final carry is exactly the state after
the last real token whatever the padding. A batch padded to any width gives the same
logits.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from rnn_jax import layers
from rnn_jax.cells import make_cell
from rnn_jax.sequence import StackedRNN, dropout

CELL_NAMES = ("elman", "lstm", "gru")


@dataclasses.dataclass(frozen=True)
class SentenceClassifier:
  """Hyper-parameters of the classifier (static under jit).

  Attributes:
    vocab_size: V, rows of the embedding table (id 0 is conventionally padding).
    num_classes: C.
    cell: "elman", "lstm" or "gru".
    embed_size, hidden_size: D and H.
    activation: f of the Elman cell ("relu" as in the Keras SimpleRNN example, or "tanh").
    bidirectional: read the sentence both ways and concatenate the two final states.
    num_layers: stacked RNN layers.
    dropout: inverted-dropout rate on the embeddings and on the sentence vector (training only).
    recurrent_init, input_init: cell initialisers (Keras' defaults: "orthogonal", "glorot").
  """
  vocab_size: int
  num_classes: int
  cell: str = "lstm"
  embed_size: int = 64
  hidden_size: int = 64
  activation: str = "relu"
  bidirectional: bool = False
  num_layers: int = 1
  dropout: float = 0.0
  recurrent_init: str = "orthogonal"
  input_init: str = "glorot"

  def __post_init__(self):
    if self.cell not in CELL_NAMES:
      raise ValueError(f"SentenceClassifier: unknown cell {self.cell!r}; expected one of {CELL_NAMES}")
    for name in ("vocab_size", "num_classes", "embed_size", "hidden_size", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"SentenceClassifier: {name} must be >= 1, got {getattr(self, name)}")
    if self.num_classes < 2:
      raise ValueError(f"SentenceClassifier: num_classes must be >= 2, got {self.num_classes}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"SentenceClassifier: dropout must be in [0, 1), got {self.dropout}")

  @property
  def encoder(self) -> StackedRNN:
    """The (bi)directional stacked RNN over the embeddings."""
    options = {"recurrent_init": self.recurrent_init, "input_init": self.input_init}
    if self.cell == "elman":
      options["activation"] = self.activation
    return StackedRNN(make_cell(self.cell, self.hidden_size, **options), num_layers=self.num_layers,
                      bidirectional=self.bidirectional, dropout=self.dropout)

  @property
  def sentence_size(self) -> int:
    """Size of s: H, or 2H when bidirectional."""
    return self.hidden_size * (2 if self.bidirectional else 1)

  def init(self, key) -> dict:
    """Params {"embed": {table: [V, D]}, "encoder": stacked RNN params, "output": {w: [C, S], b: [C]}}."""
    key_embed, key_encoder, key_output = jax.random.split(key, 3)
    return {
        "embed": layers.embedding_init(key_embed, self.vocab_size, self.embed_size),
        "encoder": self.encoder.init(key_encoder, self.embed_size),
        "output": layers.dense_init(key_output, self.sentence_size, self.num_classes),
    }

  def sentence_vectors(self, params: dict, ids: jax.Array, lengths: jax.Array, *, train: bool = False,
                       dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """s for each sentence: ids [B, T] ints, lengths [B] -> [B, S], the state at each true length."""
    if ids.ndim != 2:
      raise ValueError(f"SentenceClassifier: ids must have shape [B, T], got {tuple(ids.shape)}")
    if train and self.dropout > 0.0 and dropout_key is None:
      raise ValueError("SentenceClassifier: train=True with dropout > 0 needs a dropout_key")
    keys = jax.random.split(dropout_key, 3) if (train and self.dropout > 0.0) else [None] * 3
    xs = layers.embed(params["embed"], ids)
    if keys[0] is not None:
      xs = dropout(keys[0], self.dropout, xs)
    encoder = self.encoder
    final_carries, _ = encoder(params["encoder"], xs, lengths, train=train, dropout_key=keys[1])
    last = final_carries[-1]
    if self.bidirectional:
      forward, backward = last
      vector = jnp.concatenate([encoder.cell.hidden(forward), encoder.cell.hidden(backward)], axis=-1)
    else:
      vector = encoder.cell.hidden(last)
    if keys[2] is not None:
      vector = dropout(keys[2], self.dropout, vector)
    return vector

  def __call__(self, params: dict, ids: jax.Array, lengths: jax.Array, *, train: bool = False,
               dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Logits W_hy s + b_y: ids [B, T], lengths [B] -> [B, C]; softmax gives p(y | sentence)."""
    vector = self.sentence_vectors(params, ids, lengths, train=train, dropout_key=dropout_key)
    return layers.dense(params["output"], vector)
