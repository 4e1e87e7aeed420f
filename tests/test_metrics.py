"""Entity-level P/R/F1 (conlleval's definition), macro-F1 and accuracy on hand-made cases."""

import numpy as np
import pytest

from rnn_jax import metrics


def test_entity_spans_iob2_and_boundaries():
  tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG"]
  assert metrics.entity_spans(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 6, 7)}


def test_entity_spans_follow_conlleval_for_stray_and_switching_inside_tags():
  # A stray I-X after O opens an X entity (IOB1 reading); I-Y after I-X starts a new Y entity.
  assert metrics.entity_spans(["O", "I-MISC", "I-MISC", "O"]) == {("MISC", 1, 3)}
  assert metrics.entity_spans(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}
  assert metrics.entity_spans(["O", "O"]) == set()
  assert metrics.entity_spans([]) == set()


def test_entity_scores_hand_computed():
  true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
  predicted = [["B-PER", "I-PER", "O", "B-ORG"],   # PER right, LOC typed as ORG
               ["B-ORG", "I-ORG", "O"]]            # ORG with a wrong end: not correct
  scores = metrics.entity_scores(true, predicted)
  assert (scores["correct"], scores["predicted"], scores["true"]) == (1, 3, 3)
  assert scores["precision"] == pytest.approx(1 / 3)
  assert scores["recall"] == pytest.approx(1 / 3)
  assert scores["f1"] == pytest.approx(1 / 3)
  assert scores["per_type"]["PER"]["f1"] == pytest.approx(1.0)
  assert scores["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "correct": 0,
                                       "predicted": 0, "true": 1}
  assert scores["per_type"]["ORG"]["precision"] == pytest.approx(0.0)


def test_entity_scores_unequal_precision_and_recall():
  true = [["B-PER", "O", "B-LOC", "I-LOC", "O", "B-MISC"]]
  predicted = [["B-PER", "O", "B-LOC", "I-LOC", "O", "O"]]
  scores = metrics.entity_scores(true, predicted)
  assert scores["precision"] == pytest.approx(1.0)
  assert scores["recall"] == pytest.approx(2 / 3)
  assert scores["f1"] == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))


def test_entity_scores_reject_bad_input():
  with pytest.raises(ValueError, match="sentence 0 has 2 true tags but 1 predicted"):
    metrics.entity_scores([["O", "O"]], [["O"]])
  with pytest.raises(ValueError, match="IOB1 or IOB2"):
    metrics.entity_spans(["S-PER"])


def test_entity_scores_match_seqeval_on_random_tag_noise():
  seqeval = pytest.importorskip("seqeval.metrics")
  rng = np.random.default_rng(0)
  names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
  true = [[names[i] for i in rng.integers(0, len(names), rng.integers(1, 20))] for _ in range(300)]
  predicted = [[t if rng.random() > 0.3 else names[rng.integers(len(names))] for t in s] for s in true]
  scores = metrics.entity_scores(true, predicted)
  assert scores["precision"] == pytest.approx(seqeval.precision_score(true, predicted), abs=1e-12)
  assert scores["recall"] == pytest.approx(seqeval.recall_score(true, predicted), abs=1e-12)
  assert scores["f1"] == pytest.approx(seqeval.f1_score(true, predicted), abs=1e-12)


def test_macro_f1_and_accuracy_hand_computed():
  labels = [0, 0, 0, 1, 1, 2]
  predictions = [0, 0, 1, 1, 2, 2]
  # class 0: TP 2 FP 0 FN 1 -> 4/5; class 1: TP 1 FP 1 FN 1 -> 1/2; class 2: TP 1 FP 1 FN 0 -> 2/3
  assert metrics.per_class_f1(labels, predictions, 3) == pytest.approx([0.8, 0.5, 2 / 3])
  assert metrics.macro_f1(labels, predictions, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
  assert metrics.accuracy(labels, predictions) == pytest.approx(4 / 6)
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, predictions, 3),
                                [[2, 1, 0], [0, 1, 1], [0, 0, 1]])


def test_macro_f1_of_a_majority_classifier():
  labels = [0, 0, 0, 1, 2]
  # only class 0 is ever predicted: F1_0 = 2*3/(2*3+2) = 0.75, F1_1 = F1_2 = 0
  assert metrics.macro_f1(labels, [0] * 5, 3) == pytest.approx(0.25)
  with pytest.raises(ValueError, match="must lie in"):
    metrics.macro_f1([0, 3], [0, 0], 3)


def test_token_accuracy():
  assert metrics.token_accuracy([["NN", "VB"], ["DT"]], [["NN", "NN"], ["DT"]]) == pytest.approx(2 / 3)
