"""Translation data (dates, Bible export parser), corpus BLEU on hand-made cases, translate.py --smoke."""

import datetime
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rnn_jax import metrics
from rnn_jax.data import translation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "translate.py")

DIATHEKE_FIXTURE = """Genesis 1:1: In the beginning God created the heaven and the earth.
Genesis 1:6: \u00b6 And God said, Let there be a firmament
   Psalms 3:1: LORD, how are they increased that trouble me!\x20

A Psalm of David, when he fled from Absalom his son.
   I John 2:23: Whosoever denieth the Son, the same hath not the Father
Song of Solomon 1:1: The song of songs, which is Solomon's.
Revelation of John 22:21: La gracia <G5485> de nuestro <H0398> Se\u00f1or.
(engKJV2006eb)
"""


# ---- dates -------------------------------------------------------------------
def test_number_and_date_words():
  assert translation.number_words(94) == "ninety-four"
  assert translation.number_words(13) == "thirteen"
  assert translation.ordinal_words(23) == "twenty-third"
  assert translation.ordinal_words(30) == "thirtieth"
  assert translation.ordinal_words(2) == "second"
  assert translation.year_words(1905, 0) == "nineteen oh five"
  assert translation.year_words(1900, 1) == "nineteen hundred"
  assert translation.year_words(2012, 2) == "twenty twelve"
  assert translation.year_words(2005, 1) == "two thousand and five"
  pair = translation.date_pair(datetime.date(1994, 3, 23), template=1, year_style=0)
  assert " ".join(pair.source) == "the twenty - third of march nineteen ninety - four"
  assert "".join(pair.target) == "1994-03-23"
  with pytest.raises(ValueError, match="day must be in"):
    translation.ordinal_words(32)


def test_dates_dataset_is_seeded_and_splits_are_disjoint():
  a = translation.dates_dataset(300, 50, 50, seed=3)
  b = translation.dates_dataset(300, 50, 50, seed=3)
  assert a == b
  assert [len(a[s]) for s in translation.SPLITS] == [300, 50, 50]
  sources = [set(p.source for p in a[s]) for s in translation.SPLITS]
  assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
  for pair in a["train"]:
    iso = "".join(pair.target)
    date = datetime.date.fromisoformat(iso)
    assert 1900 <= date.year <= 2099
    assert translation.ordinal_words(date.day).split("-")[-1] in pair.source


def test_vocabulary_starts_with_the_specials():
  vocab = translation.build_vocabulary([["b", "a", "b"], ["c"]], max_size=6)
  assert vocab.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
  assert vocab.tokens[4] == "b" and len(vocab) == 6
  assert vocab.encode(["zzz"]).tolist() == [translation.UNK_ID]


# ---- the Bible -----------------------------------------------------------------
def test_parse_diatheke_keeps_verses_and_strips_markup():
  verses = translation.parse_diatheke(DIATHEKE_FIXTURE)
  assert list(verses) == ["Genesis 1:1", "Genesis 1:6", "Psalms 3:1", "I John 2:23", "Song of Solomon 1:1",
                          "Revelation of John 22:21"]
  assert verses["Genesis 1:6"] == "And God said, Let there be a firmament"
  assert verses["Psalms 3:1"] == "LORD, how are they increased that trouble me!"
  assert verses["Revelation of John 22:21"] == "La gracia de nuestro Se\u00f1or."
  assert translation.tokenize(verses["Revelation of John 22:21"]) == ["la", "gracia", "de", "nuestro",
                                                                      "se\u00f1or", "."]


def test_parse_diatheke_without_verses_names_the_install_command():
  with pytest.raises(ValueError, match="apt-get install -y diatheke sword-text-kjv sword-text-sparv"):
    translation.parse_diatheke("(spaRV1909eb)\n", "spaRV1909eb")


def test_missing_diatheke_gives_the_install_command(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="apt-get install -y diatheke sword-text-kjv sword-text-sparv"):
    translation.export_module("engKJV2006eb")


def test_malformed_bible_cache_is_reported_with_its_line(tmp_path):
  path = tmp_path / "bible.tsv"
  path.write_text("Genesis 1:1\tIn the beginning\tEn el principio\nGenesis 1:2\tonly two fields\n")
  with pytest.raises(ValueError, match="line 2 is malformed"):
    translation.read_bible_cache(str(path))
  verses = [("Genesis 1:1", "In the beginning", "En el principio")]
  translation.write_bible_cache(str(path), verses)
  assert translation.read_bible_cache(str(path)) == verses


@pytest.mark.skipif(shutil.which("diatheke") is None,
                    reason="diatheke and the SWORD modules are not installed")
def test_bible_export_counts_on_the_real_modules():
  verses = translation.load_bible_verses()
  assert 31000 < len(verses) <= 31102   # 31,102 verses in the KJV versification, a few empty in one module
  assert verses[0][0] == "Genesis 1:1" and verses[-1][0] == "Revelation of John 22:21"
  assert all("<G" not in es and "<H" not in es for _, _, es in verses)
  splits = translation.bible_dataset()
  for split in ("valid", "test"):
    assert abs(len(splits[split]) - len(verses) / 50) <= 1


def test_pair_batches_resume_exactly():
  sources = [np.arange(4, 4 + n, dtype=np.int32) for n in range(1, 21)]
  targets = [np.arange(5, 5 + n % 7 + 1, dtype=np.int32) for n in range(1, 21)]
  stream = translation.PairBatches(sources, targets, 4, seed=1, pool_batches=2)
  for _ in range(7):
    next(stream)
  position = stream.position()
  expected = [next(stream) for _ in range(3)]
  resumed = translation.PairBatches(sources, targets, 4, seed=1, pool_batches=2)
  resumed.seek(position)
  for batch, again in zip(expected, [next(resumed) for _ in range(3)]):
    for a, b in zip(batch, again):
      np.testing.assert_array_equal(a, b)


# ---- BLEU ----------------------------------------------------------------------
def test_corpus_bleu_hand_made_cases():
  identical = metrics.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
  assert identical["bleu"] == pytest.approx(100)
  # one extra word: p_n = 6/7, 5/6, 4/5, 3/4, BP = 1 -> BLEU = (3/7) ** (1/4)
  longer = metrics.corpus_bleu(["the cat sat on the mat today"], ["the cat sat on the mat"], tokenize="none")
  assert longer["bleu"] == pytest.approx(100 * (3 / 7) ** 0.25, abs=1e-6)
  # one word short: every p_n = 1, BP = exp(1 - 6/5)
  shorter = metrics.corpus_bleu(["the cat sat on the"], ["the cat sat on the mat"], tokenize="none")
  assert shorter["bleu"] == pytest.approx(100 * np.exp(1 - 6 / 5), abs=1e-6)
  assert shorter["brevity_penalty"] == pytest.approx(np.exp(-0.2))
  # corpus level: n-gram counts are pooled over sentences, not sentence scores averaged
  pooled = metrics.corpus_bleu(["a b c d", "e f g h"], ["a b c d", "e f g x"], tokenize="none")
  assert pooled["precisions"] == pytest.approx([700 / 8, 500 / 6, 300 / 4, 100 / 2])


def test_corpus_bleu_errors(monkeypatch):
  with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
    metrics.corpus_bleu(["a", "b"], ["a"])
  monkeypatch.setitem(sys.modules, "sacrebleu", None)
  with pytest.raises(ImportError, match="pip install sacrebleu"):
    metrics.corpus_bleu(["a"], ["a"])


# ---- the experiment -----------------------------------------------------------
def run_script(*args, check=True):
  result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_translate_smoke_resume_and_refusal(tmp_path):
  workdir = str(tmp_path / "dates")
  run_script("--smoke", "--steps=6", f"--workdir={workdir}")
  first = json.load(open(os.path.join(workdir, "results.json")))
  assert first["steps"] == 6 and first["config"]["dataset"] == "dates"
  for name in ("test_greedy_bleu", "test_beam_bleu"):
    assert 0.0 <= first[name] <= 100.0
  assert np.isfinite(first["test_loss"]) and first["test_loss"] > 0
  samples = open(os.path.join(workdir, "samples.txt")).read()
  assert "greedy :" in samples and "beam 4 :" in samples
  assert len(open(os.path.join(workdir, "test_translations.tsv")).readlines()) == 41   # header + 40
  refused = run_script("--smoke", "--steps=6", f"--workdir={workdir}", check=False)
  assert refused.returncode != 0 and "pass --resume" in refused.stderr
  run_script("--smoke", "--steps=12", "--resume", f"--workdir={workdir}")
  resumed = json.load(open(os.path.join(workdir, "results.json")))
  assert resumed["steps"] == 12
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(steps) == 12 and 6 in steps
