"""Evaluation metrics computed on the host (NumPy / plain Python) from predictions.

* classification: ``accuracy``, ``confusion_matrix``, ``macro_f1``, ``majority_baseline``;
* sequence labelling: ``entity_spans`` and ``entity_scores``, entity-level
  precision / recall / F1 with the definition of the CoNLL ``conlleval`` script;
* translation: ``corpus_bleu`` (sacrebleu) and ``translation_scores`` (BLEU and exact match
  of token sequences, as fractions).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


# ---- classification ----------------------------------------------------------
def accuracy(labels, predictions) -> float:
  """Fraction of examples with predictions == labels; labels, predictions: [N] ints."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.shape != predictions.shape or labels.size == 0:
    raise ValueError(f"accuracy: labels {labels.shape} and predictions {predictions.shape} "
                     "must have the same non-empty shape")
  return float(np.mean(labels == predictions))


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """C[i, j] = number of examples of true class i predicted as class j: [K, K] ints."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.shape != predictions.shape:
    raise ValueError(f"confusion_matrix: labels {labels.shape} and predictions {predictions.shape} differ")
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"confusion_matrix: {name} must lie in [0, {num_classes}), "
                       f"got min {values.min()} and max {values.max()}")
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def per_class_f1(labels, predictions, num_classes: int) -> np.ndarray:
  """F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) for each class k: [K]; 0 where the class is never seen."""
  matrix = confusion_matrix(labels, predictions, num_classes)
  true_positive = np.diag(matrix).astype(np.float64)
  denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # (TP + FP) + (TP + FN)
  return np.divide(2 * true_positive, denominator, out=np.zeros(num_classes), where=denominator > 0)


def macro_f1(labels, predictions, num_classes: int) -> float:
  """Unweighted mean of the per-class F1 over all K classes (scikit-learn's average="macro")."""
  return float(np.mean(per_class_f1(labels, predictions, num_classes)))


def majority_baseline(train_labels, labels, num_classes: int) -> dict:
  """Scores of predicting the most frequent class of ``train_labels`` for every example of ``labels``.

  Returns {"class": k (ties: the smallest id), "accuracy", "macro_f1"} (fractions).
  """
  train_labels = np.asarray(train_labels)
  if train_labels.size == 0:
    raise ValueError("majority_baseline: train_labels is empty")
  majority = int(np.bincount(train_labels, minlength=num_classes).argmax())
  labels = np.asarray(labels)
  predictions = np.full_like(labels, majority)
  return {"class": majority, "accuracy": accuracy(labels, predictions),
          "macro_f1": macro_f1(labels, predictions, num_classes)}


# ---- sequence labelling -------------------------------------------------------
def _split_tag(tag: str) -> tuple[str, str]:
  """"B-PER" -> ("B", "PER"); "O" -> ("O", ""). Only the IOB prefixes B and I are accepted."""
  if tag == "O":
    return "O", ""
  prefix, _, entity_type = tag.partition("-")
  if prefix not in ("B", "I") or not entity_type:
    raise ValueError(f"entity tags must be 'O', 'B-TYPE' or 'I-TYPE' (IOB1 or IOB2), got {tag!r}")
  return prefix, entity_type


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
  """The entities of one tagged sentence as {(type, start, end)}, tokens start..end-1.

  conlleval's chunk rules for IOB tags (so IOB1 and IOB2 both work):
    an entity ends before token t if tag_{t-1} is B/I and (tag_t is B or O, or its type differs);
    an entity starts at token t if tag_t is B, or tag_t is I and (tag_{t-1} is O or its type differs).
  A stray I-X after O therefore opens a new X entity, as in conlleval.
  """
  spans = set()
  previous_prefix, previous_type, start = "O", "", None
  for position, tag in enumerate(list(tags) + ["O"]):
    prefix, entity_type = _split_tag(tag)
    ends = previous_prefix != "O" and (prefix in ("B", "O") or entity_type != previous_type)
    starts = prefix == "B" or (prefix == "I" and (previous_prefix == "O" or entity_type != previous_type))
    if ends and start is not None:
      spans.add((previous_type, start, position))
      start = None
    if starts:
      start = position
    previous_prefix, previous_type = prefix, entity_type
  return spans


def _precision_recall_f1(correct: int, predicted: int, true: int) -> dict:
  precision = correct / predicted if predicted else 0.0
  recall = correct / true if true else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1,
          "correct": correct, "predicted": predicted, "true": true}


def entity_scores(true_sequences, predicted_sequences) -> dict:
  """Entity-level precision, recall and F1 over a corpus (conlleval's definition).

    P = correct / predicted entities,  R = correct / true entities,  F1 = 2PR / (P + R)

  An entity is correct when its type, first and last token all match. Counts are
  summed over all sentences (micro average). Returns {"precision", "recall",
  "f1", "correct", "predicted", "true", "per_type": {type: same keys}} as fractions.
  """
  if len(true_sequences) != len(predicted_sequences):
    raise ValueError(f"entity_scores: {len(true_sequences)} true sentences but "
                     f"{len(predicted_sequences)} predicted")
  counts: dict[str, list[int]] = {}
  for number, (true_tags, predicted_tags) in enumerate(zip(true_sequences, predicted_sequences)):
    if len(true_tags) != len(predicted_tags):
      raise ValueError(f"entity_scores: sentence {number} has {len(true_tags)} true tags but "
                       f"{len(predicted_tags)} predicted")
    true_spans, predicted_spans = entity_spans(true_tags), entity_spans(predicted_tags)
    for spans, slot in ((true_spans & predicted_spans, 0), (predicted_spans, 1), (true_spans, 2)):
      for entity_type, _, _ in spans:
        counts.setdefault(entity_type, [0, 0, 0])[slot] += 1
  totals = [sum(c[slot] for c in counts.values()) for slot in range(3)]
  scores = _precision_recall_f1(*totals)
  scores["per_type"] = {name: _precision_recall_f1(*c) for name, c in sorted(counts.items())}
  return scores


def token_accuracy(true_sequences, predicted_sequences) -> float:
  """Fraction of tokens whose predicted tag equals the true tag (the POS-tagging metric)."""
  correct = total = 0
  for true_tags, predicted_tags in zip(true_sequences, predicted_sequences, strict=True):
    if len(true_tags) != len(predicted_tags):
      raise ValueError(f"token_accuracy: {len(true_tags)} true tags but {len(predicted_tags)} predicted")
    correct += sum(t == p for t, p in zip(true_tags, predicted_tags))
    total += len(true_tags)
  if total == 0:
    raise ValueError("token_accuracy: no tokens")
  return correct / total


# ---- translation -------------------------------------------------------------
SACREBLEU_INSTALL_COMMAND = "pip install sacrebleu"


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a",
                lowercase: bool = False) -> dict:
  """Corpus BLEU-4 (Papineni et al. 2002) with one reference per sentence, via sacrebleu.

    BLEU = BP * exp(1/4 sum_{n=1..4} log p_n),   p_n = clipped n-gram matches / hypothesis n-grams
    BP   = min(1, exp(1 - r / c)),               c, r = hypothesis and reference lengths (tokens)

  Counts are summed over the corpus before the ratios (not an average of sentence BLEU).
  ``tokenize`` is sacrebleu's: "13a" (its default, for detokenised text), "none" (split on
  spaces: text already tokenised, e.g. "1 9 9 4 - 0 3 - 2 3" for character BLEU), "intl", "char".
  Returns {"bleu": 0..100, "precisions": [p_1..p_4] in %, "brevity_penalty", "hypothesis_length",
  "reference_length", "signature"}.
  """
  try:
    import sacrebleu  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f"corpus_bleu needs the sacrebleu package; install it with: "
                      f"{SACREBLEU_INSTALL_COMMAND} (or pip install 'rnn_jax[translate]')") from error
  hypotheses, references = list(hypotheses), list(references)
  if len(hypotheses) != len(references):
    raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
  if not hypotheses:
    raise ValueError("corpus_bleu: no sentences to score")
  # force: with tokenize="none" the text is tokenised on purpose; silence sacrebleu's detokenisation warning
  metric = sacrebleu.metrics.BLEU(tokenize=tokenize, lowercase=lowercase, force=(tokenize == "none"))
  score = metric.corpus_score(hypotheses, [references])
  return {"bleu": float(score.score), "precisions": [float(p) for p in score.precisions],
          "brevity_penalty": float(score.bp), "hypothesis_length": int(score.sys_len),
          "reference_length": int(score.ref_len), "signature": str(metric.get_signature())}


def translation_scores(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict:
  """Corpus BLEU-4 and exact match of token sequences, as fractions.

  The tokens are joined by spaces and scored with ``corpus_bleu(tokenize="none")``, so BLEU
  counts n-grams of exactly these tokens (character BLEU when the tokens are characters).
  Returns {"bleu": 0..1 (sacrebleu's score / 100), "precisions": [p_1..p_4] in 0..1,
  "brevity_penalty", "exact_match": fraction of hypotheses equal to their reference, "signature"}.
  """
  hypotheses, references = [list(h) for h in hypotheses], [list(r) for r in references]
  bleu = corpus_bleu([" ".join(h) for h in hypotheses], [" ".join(r) for r in references], tokenize="none")
  return {"bleu": bleu["bleu"] / 100.0, "precisions": [p / 100.0 for p in bleu["precisions"]],
          "brevity_penalty": bleu["brevity_penalty"],
          "exact_match": float(np.mean([h == r for h, r in zip(hypotheses, references)])),
          "signature": bleu["signature"]}
