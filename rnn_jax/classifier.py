"""Many-to-one sentence classifier: embedding -> (bi)RNN -> state at the true length -> dense -> softmax.

    x_t = E[w_t]                                   token embeddings, t < L (L = the sentence's length)
    h_t = RNN(x_t, h_{t-1})                        forward;   <-h_t reads x_{L-1} .. x_0 when bidirectional
    s   = h_{L-1}   (or [h_{L-1} ; <-h_0])         the state at the TRUE last token, never a padded step
    p(y | w) = softmax(W_hy s + b_y)

The sentence vector is the final carry of ``rnn_jax.sequence.rnn``: on padded steps
(t >= L) the carry is left untouched, so the final carry is exactly the state after
the last real token whatever the padding. A batch padded to any width gives the same
logits.

Training and inference (``experiments/sentiment.py``)::

  loss_fn = make_loss_fn(model)                  # mean cross-entropy over real rows, + accuracy
  evaluate(model, params, sequences, labels)     # {"loss", "accuracy", "macro_f1"} of one split
  loaded = load_classifier(workdir)              # the best cell of a run (rnn_jax.load_run)
  predict(loaded, ["I love this car"])           # [{"label", "probabilities", ...}]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import layers, losses, mesh, metrics
from rnn_jax import cells as cells_lib
from rnn_jax.cells import Cell, make_cell
from rnn_jax.data import sentiment
from rnn_jax.data.sentences import evaluation_batches
from rnn_jax.rundir import LoadedRun, load_run, read_json
from rnn_jax.sequence import StackedRNN

CELL_NAMES = cells_lib.CELL_NAMES


def keras_cell(name: str, hidden_size: int, activation: str = "relu") -> Cell:
  """A cell with Keras' defaults (orthogonal W_hh, Glorot W_xh; the Elman cell with ``activation``)."""
  options = {"recurrent_init": "orthogonal", "input_init": "glorot"}
  if name == "elman":
    options["activation"] = activation
  return make_cell(name, hidden_size, **options)


@dataclasses.dataclass(frozen=True)
class SentenceClassifier:
  """Hyper-parameters of the classifier (static under jit).

  Attributes:
    vocab_size: V, rows of the embedding table (id 0 is conventionally padding).
    num_classes: C.
    cell: the recurrent cell (its hidden size H), e.g. ``make_cell("relu", 64,
      recurrent_init="orthogonal", input_init="glorot")`` for Keras' SimpleRNN defaults.
    embed_size: D.
    bidirectional: read the sentence both ways and concatenate the two final states.
    num_layers: stacked RNN layers.
    dropout: inverted-dropout rate on the embeddings and on the sentence vector (training only).
    embedding_dropout: rate of whole word types dropped from the embedding, one mask per batch
      (Gal & Ghahramani 2016; ``rnn_jax.regularizers.embedding_dropout``; training only).
    recurrent_dropout, zoneout, zoneout_cell, weight_dropout: the stack's regularisers of the
      recurrent connection (``StackedRNN``, ``rnn_jax.regularizers``; 0 = off).
  """
  vocab_size: int
  num_classes: int
  cell: Cell
  embed_size: int = 64
  bidirectional: bool = False
  num_layers: int = 1
  dropout: float = 0.0
  embedding_dropout: float = 0.0
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  zoneout_cell: float = 0.0
  weight_dropout: float = 0.0

  def __post_init__(self):
    if not isinstance(self.cell, Cell):
      raise ValueError(f"SentenceClassifier: cell must be an rnn_jax Cell (e.g. make_cell('lstm', 64)), "
                       f"got {self.cell!r}")
    for name in ("vocab_size", "num_classes", "embed_size", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"SentenceClassifier: {name} must be >= 1, got {getattr(self, name)}")
    if self.num_classes < 2:
      raise ValueError(f"SentenceClassifier: num_classes must be >= 2, got {self.num_classes}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"SentenceClassifier: dropout must be in [0, 1), got {self.dropout}")

  @property
  def encoder(self) -> StackedRNN:
    """The (bi)directional stacked RNN over the embeddings."""
    return StackedRNN(self.cell, num_layers=self.num_layers, bidirectional=self.bidirectional,
                      dropout=self.dropout, recurrent_dropout=self.recurrent_dropout, zoneout=self.zoneout,
                      zoneout_cell=self.zoneout_cell, weight_dropout=self.weight_dropout)

  @property
  def body(self) -> layers.TokenRNN:
    return layers.TokenRNN(self.vocab_size, self.embed_size, self.encoder, self.dropout,
                           embedding_dropout=self.embedding_dropout)

  @property
  def sentence_size(self) -> int:
    """Size of s: H, or 2H when bidirectional."""
    return self.cell.output_size * (2 if self.bidirectional else 1)

  def init(self, key) -> dict:
    """Params {"embedding": {table: [V, D]}, "rnn": stacked RNN params, "readout": {w: [C, S], b: [C]}}."""
    key_embed, key_rnn, key_output = jax.random.split(key, 3)
    return {**self.body.init(key_embed, key_rnn),
            "readout": layers.dense_init(key_output, self.sentence_size, self.num_classes)}

  def sentence_vectors(self, params: dict, ids: jax.Array, lengths: jax.Array, *, train: bool = False,
                       rng: Optional[jax.Array] = None) -> jax.Array:
    """s for each sentence: ids [B, T] ints, lengths [B] -> [B, S], the state at each true length."""
    output = self.body(params, ids, lengths, train=train, rng=rng)
    last = output.carries[-1]
    hidden = self.cell.hidden
    vector = jnp.concatenate([hidden(last[0]), hidden(last[1])], axis=-1) if self.bidirectional else hidden(last)
    return self.body.output_dropout(output, vector)

  def __call__(self, params: dict, batch: dict, *, train: bool = False, rng: Optional[jax.Array] = None):
    """Logits W_hy s + b_y: batch {"ids": [B, T], "lengths": [B]} -> [B, C]; softmax gives p(y | sentence)."""
    vector = self.sentence_vectors(params, batch["ids"], batch["lengths"], train=train, rng=rng)
    return layers.dense(params["readout"], vector)


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------

def make_loss_fn(model: SentenceClassifier):
  """loss_fn(params, batch, rng) -> (mean cross-entropy over the batch's real rows, {"accuracy"}).

    loss = -1/N sum_b valid_b log p(y_b | w_b),   N = sum_b valid_b    (nats per sentence)

  ``batch`` is a ``rnn_jax.data.sentences`` batch (ids [B, T], lengths [B], targets [B],
  valid [B]); dropout is drawn from ``rng``.
  """

  def loss_fn(params, batch, rng):
    logits = model(params, batch, train=True, rng=rng)
    loss = losses.cross_entropy(logits, batch["targets"], mask=batch["valid"], reduction="mean")
    return loss, {"accuracy": losses.accuracy(logits, batch["targets"], mask=batch["valid"])}

  return loss_fn


@functools.lru_cache(maxsize=32)
def logits_fn(model: SentenceClassifier):
  """Jitted ``logits(params, ids [B, T], lengths [B]) -> [B, C]`` without dropout (one per model)."""
  return mesh.data_parallel(jax.jit(lambda params, ids, lengths: model(params, {"ids": ids, "lengths": lengths})))


def log_probabilities(model: SentenceClassifier, params, sequences: Sequence[np.ndarray], *,
                      batch_size: int = 64, pad_multiple: int = 8,
                      max_length: Optional[int] = None) -> np.ndarray:
  """log p(y | sentence) of every sentence, in order: [N, C] (batched; filler rows dropped)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  compute = logits_fn(model)
  rows = []
  dummy = np.zeros(len(sequences), np.int32)
  for batch in evaluation_batches(sequences, dummy, batch_size, pad_multiple=pad_multiple,
                                  max_length=max_length):
    logits = compute(params, jnp.asarray(batch["ids"]), jnp.asarray(batch["lengths"]))
    rows.append(np.asarray(jax.nn.log_softmax(logits, axis=-1))[batch["valid"]])
  return np.concatenate(rows)


def evaluate(model: SentenceClassifier, params, sequences: Sequence[np.ndarray], labels, *,
             batch_size: int = 64, pad_multiple: int = 8, max_length: Optional[int] = None) -> dict:
  """Scores of the classifier on one split: {"loss", "accuracy", "macro_f1"}.

  loss is the mean cross-entropy in nats per sentence; accuracy and macro-F1 (the
  unweighted mean of the per-class F1) are fractions.
  """
  labels = np.asarray(labels)
  log_p = log_probabilities(model, params, sequences, batch_size=batch_size, pad_multiple=pad_multiple,
                            max_length=max_length)
  predictions = log_p.argmax(axis=-1)
  return {"loss": float(-np.mean(log_p[np.arange(len(labels)), labels])),
          "accuracy": metrics.accuracy(labels, predictions),
          "macro_f1": metrics.macro_f1(labels, predictions, model.num_classes)}


# ---------------------------------------------------------------------------
# Inference from a run directory
# ---------------------------------------------------------------------------

def trained_cells(workdir: str) -> dict[str, float]:
  """{cell: valid accuracy} of the finished per-cell runs in ``workdir`` (sub-directories with
  model.json and results.json)."""
  cells = {}
  if not os.path.isdir(workdir):
    return cells
  for name in sorted(os.listdir(workdir)):
    child = os.path.join(workdir, name)
    results = os.path.join(child, "results.json")
    if os.path.isfile(os.path.join(child, "model.json")) and os.path.isfile(results):
      cells[name] = float(read_json(results).get("valid_accuracy", float("nan")))
  return cells


def load_classifier(workdir: str, cell: str = "") -> LoadedRun:
  """The trained classifier of ``workdir`` for ``predict``.

  ``workdir`` is either one cell's run (it holds model.json) or a comparison of several
  cells, one sub-directory each: then ``cell`` picks one, and by default the finished cell
  with the highest validation accuracy is taken (the "best_cell" of the comparison's
  results.json once it is written). The chosen cell is ``extra["cell"]``.
  """
  workdir = os.path.abspath(workdir)
  if os.path.isfile(os.path.join(workdir, "model.json")) and not cell:
    return load_run(workdir)
  cells = trained_cells(workdir)
  if not cells:
    raise FileNotFoundError(f"{workdir} holds no trained classifier (no model.json, no finished cell "
                            f"sub-directory); train into it first")
  if cell and cell not in cells:
    raise ValueError(f"cell={cell!r} was not trained in {workdir}; trained: {sorted(cells)}")
  summary = os.path.join(workdir, "results.json")
  recorded = read_json(summary).get("best_cell") if os.path.isfile(summary) else None
  if not cell and recorded in cells:
    chosen = recorded  # the comparison's own choice (ties broken in the order the cells trained)
  else:
    chosen = cell or max(cells, key=lambda name: (cells[name] == cells[name], cells[name]))
  loaded = load_run(os.path.join(workdir, chosen))
  loaded.extra.setdefault("cell", chosen)
  return loaded


def predict(loaded: LoadedRun, texts: Sequence[str], *, batch_size: int = 64) -> list[dict]:
  """Classify raw texts with a trained run (``load_classifier`` or ``rnn_jax.load_run``).

  Each text is tokenised as in training (``rnn_jax.data.sentiment.tokenize``), unknown words
  become <unk> and the first ``max_length`` tokens are kept. Returns one dict per text:
  {"text", "label", "probabilities": {label: p}, "tokens" (what the model read), "cell"}.
  Raises ValueError for no texts or a text without a single token.
  """
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if not texts:
    raise ValueError("texts is empty: give at least one text to classify")
  if not isinstance(loaded.model, SentenceClassifier):
    raise ValueError(f"{loaded.workdir} holds a {type(loaded.model).__name__}, not a SentenceClassifier")
  label_names = loaded.extra.get("label_names") or [str(k) for k in range(loaded.model.num_classes)]
  max_length = int(loaded.extra.get("max_length", 0)) or None
  sequences = sentiment.encode(texts, loaded.vocab, max_length or 10**9)
  for number, (text, ids) in enumerate(zip(texts, sequences), start=1):
    if len(ids) == 0:
      raise ValueError(f"text {number} ({text!r}) has no token to classify")
  probabilities = np.exp(log_probabilities(loaded.model, loaded.params, sequences, batch_size=batch_size,
                                           pad_multiple=int(loaded.extra.get("pad_multiple", 8)),
                                           max_length=max_length))
  cell = loaded.extra.get("cell", loaded.model.cell.name)
  return [{"text": text, "label": label_names[int(p.argmax())],
           "probabilities": {name: round(float(v), 6) for name, v in zip(label_names, p)},
           "tokens": loaded.vocab.decode(ids, sep=" "), "cell": cell}
          for text, ids, p in zip(texts, sequences, probabilities)]
