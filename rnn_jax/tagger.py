"""Many-to-many tagger with T_x = T_y: embedding -> bidirectional LSTM -> dense per token -> softmax.

    x_t = E[w_t]
    ->h_t = LSTM(x_t, ->h_{t-1});   <-h_t = LSTM(x_t, <-h_{t+1})   (padding-aware: <-h starts at x_{L-1})
    p(tag_t | w) = softmax(W_hy [->h_t ; <-h_t] + b_y)              one independent softmax per token

This is the "BiLSTM" tagger of Huang et al. (2015) and Lample et al. (2016) without
their CRF layer, character features or pretrained embeddings. Padded steps (t >= L)
produce logits that the masked loss and the decoder ignore.

Training and inference (``experiments/tagging.py``)::

  loss_fn = make_loss_fn(model, singletons, unk_id, singleton_unk_rate=0.5)
  evaluate(model, params, words, tags, tag_names, task="ner")   # {"loss", "token_accuracy", "f1", ...}
  predict(rnn_jax.load_run(workdir), ["EU rejects German call"])  # [[("EU", "B-ORG"), ...]]
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import layers, losses, metrics
from rnn_jax.cells import LSTM, Cell
from rnn_jax.data.conll import normalise
from rnn_jax.data.sentences import evaluation_batches
from rnn_jax.rundir import LoadedRun
from rnn_jax.sequence import StackedRNN


@dataclasses.dataclass(frozen=True)
class SequenceTagger:
  """Hyper-parameters of the tagger (static under jit).

  Attributes:
    vocab_size: V words; num_tags: K.
    cell: the recurrent cell of each direction (its hidden size H), an LSTM by default.
    embed_size: D.
    num_layers: stacked bidirectional layers.
    dropout: inverted dropout on the embeddings and on the BiLSTM outputs (training only),
      as in Lample et al. (2016).
  """
  vocab_size: int
  num_tags: int
  cell: Cell = LSTM(100)
  embed_size: int = 100
  num_layers: int = 1
  dropout: float = 0.5

  def __post_init__(self):
    if not isinstance(self.cell, Cell):
      raise ValueError(f"SequenceTagger: cell must be an rnn_jax Cell (e.g. make_cell('lstm', 100)), "
                       f"got {self.cell!r}")
    for name in ("vocab_size", "num_tags", "embed_size", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"SequenceTagger: {name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"SequenceTagger: dropout must be in [0, 1), got {self.dropout}")

  @property
  def encoder(self) -> StackedRNN:
    """The bidirectional stacked RNN; outputs [->h_t ; <-h_t] of size 2H."""
    return StackedRNN(self.cell, num_layers=self.num_layers, bidirectional=True, dropout=self.dropout)

  @property
  def body(self) -> layers.TokenRNN:
    return layers.TokenRNN(self.vocab_size, self.embed_size, self.encoder, self.dropout)

  def init(self, key) -> dict:
    """Params {"embedding": {table: [V, D]}, "rnn": ..., "readout": {w: [K, 2H], b: [K]}}."""
    key_embed, key_rnn, key_output = jax.random.split(key, 3)
    return {**self.body.init(key_embed, key_rnn),
            "readout": layers.dense_init(key_output, self.encoder.output_size, self.num_tags)}

  def __call__(self, params: dict, batch: dict, *, train: bool = False, rng: Optional[jax.Array] = None):
    """Tag logits: batch {"ids": [B, T], "lengths": [B]} -> [B, T, K] (rows t >= L are padding)."""
    output = self.body(params, batch["ids"], batch["lengths"], train=train, rng=rng)
    return layers.dense(params["readout"], self.body.output_dropout(output, output.hs))


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------

def make_loss_fn(model: SequenceTagger, singletons: np.ndarray, unk_id: int, singleton_unk_rate: float = 0.0):
  """loss_fn(params, batch, rng) -> (mean cross-entropy per real token, {"token_accuracy"}).

    loss = -1/N sum_{b, t < L_b} log p(tag_bt | w_b),   N = sum_b L_b      (nats per token)

  Before the forward pass every training word seen once in train (``singletons`` [V] bool)
  becomes <unk> with probability ``singleton_unk_rate`` (Lample et al. 2016), so the
  <unk> embedding is trained on words like those unseen at test time.
  """
  if not 0.0 <= singleton_unk_rate <= 1.0:
    raise ValueError(f"singleton_unk_rate must be in [0, 1], got {singleton_unk_rate}")
  singleton_mask = jnp.asarray(singletons, bool)

  def loss_fn(params, batch, rng):
    ids, lengths = batch["ids"], batch["lengths"]
    unk_key, rng = jax.random.split(rng)
    if singleton_unk_rate > 0:
      replace = singleton_mask[ids] & jax.random.bernoulli(unk_key, singleton_unk_rate, ids.shape)
      ids = jnp.where(replace, unk_id, ids)
    logits = model(params, {"ids": ids, "lengths": lengths}, train=True, rng=rng)
    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    loss = losses.cross_entropy(logits, batch["targets"], mask=mask, reduction="mean")
    return loss, {"token_accuracy": losses.accuracy(logits, batch["targets"], mask=mask)}

  return loss_fn


@functools.lru_cache(maxsize=32)
def log_probabilities_fn(model: SequenceTagger):
  """Jitted ``log_p(params, ids [B, T], lengths [B]) -> [B, T, K]`` without dropout (one per model)."""
  return jax.jit(lambda params, ids, lengths: jax.nn.log_softmax(
      model(params, {"ids": ids, "lengths": lengths}), axis=-1))


def tag_log_probabilities(model: SequenceTagger, params, words: Sequence[np.ndarray], *, batch_size: int = 32,
                          pad_multiple: int = 16) -> list[np.ndarray]:
  """log p(tag_t | sentence) of every sentence, in order: a list of [L_i, K] arrays."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  compute = log_probabilities_fn(model)
  dummy = [np.zeros(len(w), np.int32) for w in words]
  out = []
  for batch in evaluation_batches(words, dummy, batch_size, pad_multiple=pad_multiple):
    log_p = np.asarray(compute(params, jnp.asarray(batch["ids"]), jnp.asarray(batch["lengths"])))
    out.extend(log_p[row, :length] for row, length in enumerate(batch["lengths"]) if batch["valid"][row])
  return out


def scores(true_names, predicted_names, task: str) -> dict:
  """NER: entity precision, recall, F1 (conlleval) and token accuracy; POS: token accuracy (fractions)."""
  result = {"token_accuracy": metrics.token_accuracy(true_names, predicted_names)}
  if task == "ner":
    entities = metrics.entity_scores(true_names, predicted_names)
    result.update({k: entities[k] for k in ("precision", "recall", "f1")})
  return result


def evaluate(model: SequenceTagger, params, words, tags, tag_names: Sequence[str], *, task: str = "ner",
             batch_size: int = 32, pad_multiple: int = 16) -> tuple[dict, list[np.ndarray]]:
  """Scores of one split and its argmax tag ids.

  Returns ({"loss" (nats per token), "token_accuracy", and for NER "precision", "recall",
  "f1"}, [predicted tag ids [L_i] per sentence]).
  """
  log_p = tag_log_probabilities(model, params, words, batch_size=batch_size, pad_multiple=pad_multiple)
  predicted = [lp.argmax(axis=-1) for lp in log_p]
  nll = sum(-float(lp[np.arange(len(t)), t].sum()) for lp, t in zip(log_p, tags))
  tokens = sum(len(t) for t in tags)
  true_names = [[tag_names[i] for i in t] for t in tags]
  predicted_names = [[tag_names[i] for i in p] for p in predicted]
  return {"loss": nll / tokens, **scores(true_names, predicted_names, task)}, predicted


def per_type_scores(true_names, predicted_names) -> dict:
  """{entity type: {"precision", "recall", "f1", "true"}} (conlleval's per-type table)."""
  entities = metrics.entity_scores(true_names, predicted_names)
  return {t: {k: v[k] for k in ("precision", "recall", "f1", "true")}
          for t, v in entities["per_type"].items()}


def write_predictions(path: str, sentences, gold, predicted, tag_names: Sequence[str]) -> str:
  """conlleval's input: one "token gold predicted" line per token, a blank line between sentences."""
  with open(path, "w", encoding="utf-8") as handle:
    for sentence, true_tags, guess in zip(sentences, gold, predicted, strict=True):
      for token, g, p in zip(sentence.tokens, true_tags, guess, strict=True):
        handle.write(f"{token} {tag_names[g]} {tag_names[p]}\n")
      handle.write("\n")
  return path


# ---------------------------------------------------------------------------
# Inference from a run directory
# ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+(?:[-.,/:]\w+)*|'\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
  """CoNLL-like tokens of raw text: words (with inner - . , / :, as in "1996-08-22" or "3.5"),
  clitics ("'s"), and every other non-space character alone. Case is kept."""
  return _TOKEN.findall(text)


def predict(loaded: LoadedRun, sentences: Sequence, *, batch_size: int = 32) -> list[list[tuple[str, str]]]:
  """Tag sentences with a trained tagger (``rnn_jax.load_run(workdir)``).

  Each sentence is a string (split by ``tokenize``) or a list of tokens. Words are
  normalised as in training (``rnn_jax.data.conll.normalise``); unknown ones become <unk>.
  Returns [[(token, tag), ...] per sentence]. Raises ValueError for no sentences or a
  sentence without a token.
  """
  if isinstance(sentences, str):
    sentences = [sentences]
  sentences = list(sentences)
  if not sentences:
    raise ValueError("sentences is empty: give at least one sentence to tag")
  if not isinstance(loaded.model, SequenceTagger):
    raise ValueError(f"{loaded.workdir} holds a {type(loaded.model).__name__}, not a SequenceTagger")
  tag_names = loaded.extra.get("tag_names") or [str(k) for k in range(loaded.model.num_tags)]
  tokens = [tokenize(s) if isinstance(s, str) else [str(t) for t in s] for s in sentences]
  for number, (sentence, words) in enumerate(zip(sentences, tokens), start=1):
    if not words:
      raise ValueError(f"sentence {number} ({sentence!r}) has no token to tag")
  ids = [loaded.vocab.encode([normalise(w) for w in words]) for words in tokens]
  log_p = tag_log_probabilities(loaded.model, loaded.params, ids, batch_size=batch_size,
                                pad_multiple=int(loaded.extra.get("pad_multiple", 16)))
  return [[(word, tag_names[int(k)]) for word, k in zip(words, lp.argmax(axis=-1))]
          for words, lp in zip(tokens, log_p)]
