"""Many-to-many tagger with T_x = T_y: embedding -> bidirectional LSTM -> dense per token -> softmax or CRF.

    x_t = E[w_t]
    ->h_t = LSTM(x_t, ->h_{t-1});   <-h_t = LSTM(x_t, <-h_{t+1})   (padding-aware: <-h starts at x_{L-1})
    U_t = W_hy [->h_t ; <-h_t] + b_y                                 tag scores [K] of token t

``output="softmax"``: p(tag_t | w) = softmax(U_t), one independent softmax per token, argmax
decoding (the "BI-LSTM" of Huang et al. 2015).
``output="crf"``: a linear-chain CRF over the whole tag sequence (``rnn_jax.crf``),

    p(y | w) = exp(sum_t U_t[y_t] + sum_{t>1} A[y_{t-1}, y_t] + s[y_1] + e[y_L]) / Z(w),

trained by its negative log-likelihood and decoded with Viterbi (the "BI-LSTM-CRF" of Huang
et al. 2015 without their spelling and context features; the "LSTM-CRF" of Lample et al. 2016
without their character-level word representations and pretrained embeddings). Padded steps
(t >= L) produce scores that the masked loss and the decoders ignore.

Training and inference (``experiments/tagging.py``)::

  loss_fn = make_loss_fn(model, singletons, unk_id, singleton_unk_rate=0.5)
  evaluate(model, params, words, tags, tag_names, task="ner")   # {"loss", "token_accuracy", "f1", ...}
  decode_sentences(model, params, words)                        # argmax or Viterbi tag ids per sentence
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

from rnn_jax import crf, layers, losses, mesh, metrics
from rnn_jax.cells import LSTM, Cell
from rnn_jax.data.conll import normalise
from rnn_jax.data.sentences import evaluation_batches
from rnn_jax.rundir import LoadedRun
from rnn_jax.sequence import StackedRNN


OUTPUTS = ("softmax", "crf")
TRANSITION_CONSTRAINTS = ("none", "iob2")


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
    embedding_dropout: rate of whole word types dropped from the embedding, one mask per batch
      (Gal & Ghahramani 2016; ``rnn_jax.regularizers.embedding_dropout``; training only).
    recurrent_dropout, zoneout, zoneout_cell, weight_dropout: the stack's regularisers of the
      recurrent connection (``StackedRNN``, ``rnn_jax.regularizers``; 0 = off).
    output: "softmax" (an independent softmax per token) or "crf" (a linear-chain CRF;
      params gain "crf": {"transitions" [K, K], "start" [K], "end" [K]}).
    transition_constraints: with output="crf", "none" or "iob2": the transitions IOB2 forbids
      (O -> I-X, B-X / I-X -> I-Y, a sentence starting with I-X) score ``crf.FORBIDDEN`` in
      training and in decoding (``crf.iob2_constraints``); needs ``tag_names``.
    tag_names: the K tag names, in id order (needed only by the constraints).
  """
  vocab_size: int
  num_tags: int
  cell: Cell = LSTM(100)
  embed_size: int = 100
  num_layers: int = 1
  dropout: float = 0.5
  output: str = "softmax"
  transition_constraints: str = "none"
  tag_names: tuple[str, ...] = ()
  embedding_dropout: float = 0.0
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  zoneout_cell: float = 0.0
  weight_dropout: float = 0.0

  def __post_init__(self):
    if not isinstance(self.cell, Cell):
      raise ValueError(f"SequenceTagger: cell must be an rnn_jax Cell (e.g. make_cell('lstm', 100)), "
                       f"got {self.cell!r}")
    for name in ("vocab_size", "num_tags", "embed_size", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"SequenceTagger: {name} must be >= 1, got {getattr(self, name)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"SequenceTagger: dropout must be in [0, 1), got {self.dropout}")
    if self.output not in OUTPUTS:
      raise ValueError(f"SequenceTagger: output must be one of {list(OUTPUTS)}, got {self.output!r}")
    if self.transition_constraints not in TRANSITION_CONSTRAINTS:
      raise ValueError(f"SequenceTagger: transition_constraints must be one of {list(TRANSITION_CONSTRAINTS)}, "
                       f"got {self.transition_constraints!r}")
    if self.tag_names and len(self.tag_names) != self.num_tags:
      raise ValueError(f"SequenceTagger: tag_names has {len(self.tag_names)} names but num_tags is "
                       f"{self.num_tags}")
    if self.transition_constraints != "none":
      if self.output != "crf":
        raise ValueError(f"SequenceTagger: transition_constraints={self.transition_constraints!r} needs "
                         f"output='crf', got output={self.output!r}")
      if not self.tag_names:
        raise ValueError(f"SequenceTagger: transition_constraints={self.transition_constraints!r} needs "
                         f"tag_names (the {self.num_tags} tag names in id order)")
      crf.iob2_constraints(self.tag_names)  # refuses names that are not O / B-X / I-X

  @property
  def encoder(self) -> StackedRNN:
    """The bidirectional stacked RNN; outputs [->h_t ; <-h_t] of size 2H."""
    return StackedRNN(self.cell, num_layers=self.num_layers, bidirectional=True, dropout=self.dropout,
                      recurrent_dropout=self.recurrent_dropout, zoneout=self.zoneout,
                      zoneout_cell=self.zoneout_cell, weight_dropout=self.weight_dropout)

  @property
  def body(self) -> layers.TokenRNN:
    return layers.TokenRNN(self.vocab_size, self.embed_size, self.encoder, self.dropout,
                           embedding_dropout=self.embedding_dropout)

  def init(self, key) -> dict:
    """Params {"embedding": {table: [V, D]}, "rnn": ..., "readout": {w: [K, 2H], b: [K]}}, and with
    output="crf" also "crf": {"transitions": [K, K], "start": [K], "end": [K]}, all zeros."""
    key_embed, key_rnn, key_output = jax.random.split(key, 3)
    params = {**self.body.init(key_embed, key_rnn),
              "readout": layers.dense_init(key_output, self.encoder.output_size, self.num_tags)}
    if self.output == "crf":
      params["crf"] = {"transitions": jnp.zeros((self.num_tags, self.num_tags), jnp.float32),
                       "start": jnp.zeros((self.num_tags,), jnp.float32),
                       "end": jnp.zeros((self.num_tags,), jnp.float32)}
    return params

  def __call__(self, params: dict, batch: dict, *, train: bool = False, rng: Optional[jax.Array] = None):
    """Tag scores U (softmax logits, or CRF emissions): batch {"ids": [B, T], "lengths": [B]} ->
    [B, T, K] (rows t >= L are padding)."""
    output = self.body(params, batch["ids"], batch["lengths"], train=train, rng=rng)
    return layers.dense(params["readout"], self.body.output_dropout(output, output.hs))

  def crf_parameters(self, params: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A [K, K], s [K], e [K]) of the CRF, with the forbidden transitions set to ``crf.FORBIDDEN``."""
    if self.output != "crf":
      raise ValueError(f"SequenceTagger: crf_parameters needs output='crf', got output={self.output!r}")
    table = params["crf"]
    allowed = allowed_start = None
    if self.transition_constraints == "iob2":
      allowed, allowed_start = crf.iob2_constraints(self.tag_names)
    transitions, start = crf.constrain(table["transitions"], table["start"], allowed, allowed_start)
    return transitions, start, table["end"]

  def decode(self, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Predicted tags [B, T] int32 (0 at t >= L) and -log p(targets | words) per sentence [B] (nats).

    Softmax: argmax_k U_t[k] per token and sum_t -log softmax(U_t)[y_t]; CRF: the Viterbi path
    and the CRF NLL. The batch needs "ids", "lengths" and "targets" [B, T]. No dropout.
    """
    scores = self(params, batch)
    lengths, targets = batch["lengths"], batch["targets"]
    mask = jnp.arange(scores.shape[1])[None, :] < lengths[:, None]
    if self.output == "crf":
      transitions, start, end = self.crf_parameters(params)
      tags, _ = crf.viterbi(scores, lengths, transitions, start, end)
      return tags, crf.nll(scores, targets, lengths, transitions, start, end)
    tags = jnp.where(mask, jnp.argmax(scores, axis=-1), 0).astype(jnp.int32)
    token_nll = losses.token_nll(scores, jnp.where(mask, targets, 0))
    return tags, jnp.sum(jnp.where(mask, token_nll, 0), axis=1)


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------

def make_loss_fn(model: SequenceTagger, singletons: np.ndarray, unk_id: int, singleton_unk_rate: float = 0.0):
  """loss_fn(params, batch, rng) -> (negative log-likelihood per real token, {"token_accuracy"}).

    softmax: loss = -1/N sum_b sum_{t < L_b} log p(tag_bt | w_b)     N = sum_b L_b   (nats per token)
    crf:     loss = -1/N sum_b log p(tags_b | w_b)                   (the CRF NLL, crf.nll)

  Both are -log p(all tags of the batch | words) / N, the softmax model's p being the product
  of its per-token probabilities, so the two losses are in the same unit and the learning rate
  means the same for both. token_accuracy is that of the argmax tags (softmax) or of the
  Viterbi path (crf), on the training batch with dropout.

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
    if model.output == "softmax":
      loss = losses.cross_entropy(logits, batch["targets"], mask=mask, reduction="mean")
      return loss, {"token_accuracy": losses.accuracy(logits, batch["targets"], mask=mask)}
    transitions, start, end = model.crf_parameters(params)
    tokens = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    loss = jnp.sum(crf.nll(logits, batch["targets"], lengths, transitions, start, end)) / tokens
    path, _ = crf.viterbi(*jax.lax.stop_gradient((logits, lengths, transitions, start, end)))
    correct = jnp.sum(jnp.where(mask, path == batch["targets"], False)) / tokens
    return loss, {"token_accuracy": correct}

  return loss_fn


@functools.lru_cache(maxsize=32)
def log_probabilities_fn(model: SequenceTagger):
  """Jitted ``log_p(params, ids [B, T], lengths [B]) -> [B, T, K]`` without dropout (one per model):
  log softmax(U_t), the per-token tag distribution (of the softmax output; for a CRF these are
  normalised emissions, not its marginals)."""
  return mesh.data_parallel(jax.jit(lambda params, ids, lengths: jax.nn.log_softmax(
      model(params, {"ids": ids, "lengths": lengths}), axis=-1)))


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


@functools.lru_cache(maxsize=32)
def decode_fn(model: SequenceTagger):
  """Jitted ``decode(params, ids [B, T], lengths [B], targets [B, T]) -> (tags [B, T], nll [B])``
  (``SequenceTagger.decode``: argmax or Viterbi tags, -log p(targets | words) per sentence)."""
  return mesh.data_parallel(jax.jit(lambda params, ids, lengths, targets: model.decode(
      params, {"ids": ids, "lengths": lengths, "targets": targets})))


def decode_sentences(model: SequenceTagger, params, words: Sequence[np.ndarray], tags=None, *,
                     batch_size: int = 32, pad_multiple: int = 16) -> tuple[list[np.ndarray], np.ndarray]:
  """Predicted tag ids of every sentence, in order ([L_i] arrays), and -log p(tags_i | words_i)
  per sentence [N] (nats; meaningless when ``tags`` is None, then zeros stand in for them)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  compute = decode_fn(model)
  if tags is None:
    tags = [np.zeros(len(w), np.int32) for w in words]
  predicted, nll = [], []
  for batch in evaluation_batches(words, tags, batch_size, pad_multiple=pad_multiple):
    path, row_nll = compute(params, jnp.asarray(batch["ids"]), jnp.asarray(batch["lengths"]),
                            jnp.asarray(batch["targets"]))
    path, row_nll = np.asarray(path), np.asarray(row_nll)
    for row, length in enumerate(batch["lengths"]):
      if batch["valid"][row]:
        predicted.append(path[row, :length])
        nll.append(row_nll[row])
  return predicted, np.asarray(nll, np.float64)


def scores(true_names, predicted_names, task: str) -> dict:
  """NER: entity precision, recall, F1 (conlleval) and token accuracy; POS: token accuracy (fractions)."""
  result = {"token_accuracy": metrics.token_accuracy(true_names, predicted_names)}
  if task == "ner":
    entities = metrics.entity_scores(true_names, predicted_names)
    result.update({k: entities[k] for k in ("precision", "recall", "f1")})
  return result


def evaluate(model: SequenceTagger, params, words, tags, tag_names: Sequence[str], *, task: str = "ner",
             batch_size: int = 32, pad_multiple: int = 16) -> tuple[dict, list[np.ndarray]]:
  """Scores of one split and its predicted tag ids (argmax per token, or the CRF's Viterbi path).

  Returns ({"loss" (-log p(tags | words) per token, nats: the softmax model's cross-entropy or
  the CRF's NLL), "token_accuracy", and for NER "precision", "recall", "f1"}, [predicted tag
  ids [L_i] per sentence]).
  """
  predicted, nll = decode_sentences(model, params, words, tags, batch_size=batch_size,
                                    pad_multiple=pad_multiple)
  tokens = sum(len(t) for t in tags)
  true_names = [[tag_names[i] for i in t] for t in tags]
  predicted_names = [[tag_names[i] for i in p] for p in predicted]
  return {"loss": float(np.sum(nll)) / tokens, **scores(true_names, predicted_names, task)}, predicted


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
  """Tag sentences with a trained tagger (``rnn_jax.load_run(workdir)``): the argmax tag of each
  token (softmax) or the Viterbi path of each sentence (crf).

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
  predicted, _ = decode_sentences(loaded.model, loaded.params, ids, batch_size=batch_size,
                                  pad_multiple=int(loaded.extra.get("pad_multiple", 16)))
  return [[(word, tag_names[int(k)]) for word, k in zip(words, path)] for words, path in zip(tokens, predicted)]
