"""Translation data (dates, Bible export parser), corpus BLEU on hand-made cases, batched decoding,
and translate.py in-process: --smoke, --translate from the workdir alone, resume and refusals."""

import datetime
import importlib
import io
import json
import math
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from experiments import common
from rnn_jax import cells, load_run, metrics, seq2seq
from rnn_jax.data import translation

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


def test_translation_scores_are_fractions():
  hypotheses = [list("1994-03-23"), list("2001-01-02")]
  references = [list("1994-03-23"), list("2001-01-03")]
  scores = metrics.translation_scores(hypotheses, references)
  pooled = metrics.corpus_bleu(["1 9 9 4 - 0 3 - 2 3", "2 0 0 1 - 0 1 - 0 2"],
                               ["1 9 9 4 - 0 3 - 2 3", "2 0 0 1 - 0 1 - 0 3"], tokenize="none")
  assert scores["bleu"] == pytest.approx(pooled["bleu"] / 100) and 0.8 < scores["bleu"] < 1.0
  assert scores["precisions"][0] == pytest.approx(19 / 20) and scores["exact_match"] == 0.5


# ---- batched decoding ------------------------------------------------------------
def test_decode_sources_matches_one_source_at_a_time():
  model = seq2seq.Seq2Seq("cho", cells.GRU(8), source_vocab_size=12, target_vocab_size=9, embed_size=5)
  rng = np.random.default_rng(0)   # params of init's shapes drawn by numpy: no random kernels to compile
  params = jax.tree_util.tree_map(lambda leaf: rng.uniform(-0.3, 0.3, leaf.shape).astype(np.float32),
                                  jax.eval_shape(model.init, jax.random.PRNGKey(4)))
  sources = [rng.integers(4, 12, n).astype(np.int32) for n in (5, 1, 3, 7)]   # batches (1, 3) and (5, 7)
  batched = seq2seq.decode_sources(model, params, sources, max_len=6, batch_size=2)
  beamed = seq2seq.decode_sources(model, params, sources, max_len=6, beam_size=3, batch_size=2)
  both = jax.jit(lambda source, length: (model.greedy_decode(params, source, length, 6),   # one compilation
                                          model.beam_search(params, source, length, 6, beam_width=3)[:2]))
  without_eos = lambda tokens, lengths: [t for t in np.asarray(tokens)[0, :int(lengths[0])].tolist()
                                         if t != model.eos_id]
  for source, ids, beam_ids in zip(sources, batched, beamed):
    alone = np.zeros((1, 8), np.int32)   # one source, its own padding
    alone[0, :len(source)] = source
    greedy, beam = both(alone, np.asarray([len(source)], np.int32))
    assert ids == without_eos(*greedy)   # input order kept, no <eos>
    assert beam_ids == without_eos(*beam)
  with pytest.raises(ValueError, match="source 1 is empty"):
    seq2seq.decode_sources(model, params, [[4], []], max_len=4)


# ---- the experiment, in-process: one smoke run shared by the tests below ----------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A smoke run of 6 steps on the dates (Cho et al. GRU); returns its workdir."""
  pytest.importorskip("sacrebleu")
  workdir = str(tmp_path_factory.mktemp("translate") / "dates")
  module = importlib.import_module("experiments.translate")
  assert common.run(module.EXPERIMENT, ["--progress=false", "--smoke", "--steps=6", "--eval_every=3",
                                        f"--workdir={workdir}"]) == 0
  return workdir


def _read(path):
  with open(path) as handle:
    return json.load(handle)


def test_smoke_run_writes_the_run_files(trained):
  for name in ("config.json", "metrics.jsonl", "results.json", "curves.png", "model.json",
               "source_vocab.json", "target_vocab.json", "samples.txt", "test_translations.tsv"):
    assert os.path.getsize(os.path.join(trained, name)) > 0, name
  assert os.listdir(os.path.join(trained, "checkpoints"))
  results = _read(os.path.join(trained, "results.json"))
  assert results["steps"] == 6 and results["config"]["dataset"] == "dates" and results["cell"] == "gru"
  assert results["pairs"] == {"train": 200, "valid": 40, "test": 40}
  for split in ("valid", "test"):
    for method in ("greedy", "beam"):
      assert 0.0 <= results[f"{split}_{method}_bleu"] <= 1.0   # a fraction, not sacrebleu's 0..100
      assert 0.0 <= results[f"{split}_{method}_exact_match"] <= 1.0
    # 15 target tokens (digits, "-", 4 specials): below the uniform log 15 after 6 steps of Adam
    assert 0.5 < results[f"{split}_loss"] < math.log(15)
  records = [json.loads(line) for line in open(os.path.join(trained, "metrics.jsonl"))]
  assert {r["split"] for r in records} == {"train", "valid", "test"}
  valid = [r for r in records if r["split"] == "valid"]
  assert [r["step"] for r in valid] == [3, 6] and all(0.0 <= r["bleu"] <= 1.0 for r in valid)
  assert not any("perplexity" in r or "nats" in r for r in records)   # loss is the nats; nothing repeated
  [test] = [r for r in records if r["split"] == "test"]
  assert test["greedy_bleu"] == results["test_greedy_bleu"] and test["loss"] == results["test_loss"]
  samples = open(os.path.join(trained, "samples.txt")).read()
  assert "greedy :" in samples and "beam 4 :" in samples
  assert len(open(os.path.join(trained, "test_translations.tsv")).readlines()) == 41   # header + 40
  vocabularies = _read(os.path.join(trained, "model.json"))["vocabularies"]
  assert _read(os.path.join(trained, vocabularies["target"]))["tokens"][:4] == list(translation.SPECIALS)


@pytest.fixture
def no_corpus(monkeypatch):
  """Translation must need the workdir only: building the corpus fails."""
  def refuse(*args, **kwargs):
    raise AssertionError("--translate built the training corpus")
  monkeypatch.setattr(translation, "load_pairs", refuse)
  monkeypatch.setattr(translation, "dates_dataset", refuse)


def _test_rows(workdir):
  lines = open(os.path.join(workdir, "test_translations.tsv")).read().splitlines()[1:]
  return [line.split("\t") for line in lines]


def test_translate_reproduces_the_decoding_of_training_from_the_workdir_alone(trained, run_experiment,
                                                                             no_corpus, tmp_path):
  rows = _test_rows(trained)[:3]
  path = tmp_path / "sentences.txt"
  path.write_text(rows[0][1] + "\n\n" + rows[1][1] + "\n" + rows[2][1] + "\n")
  greedy = run_experiment("translate", f"--workdir={trained}", f"--translate=@{path}")
  assert greedy.code == 0, greedy.err
  assert greedy.out.splitlines() == [row[3] for row in rows]   # blank lines skipped, order kept
  beam = run_experiment("translate", f"--workdir={trained}", f"--translate=@{path}", "--beam_size=4")
  assert beam.code == 0, beam.err
  assert beam.out.splitlines() == [row[4] for row in rows]
  loaded = load_run(trained)
  assert seq2seq.translate(loaded, [row[1] for row in rows], beam_size=4) == [row[4] for row in rows]


def test_translate_one_sentence_and_stdin(trained, run_experiment, no_corpus, monkeypatch):
  one = run_experiment("translate", f"--workdir={trained}", "--translate=March the Third, 1905")
  assert one.code == 0, one.err
  [line] = one.out.splitlines()
  tokens = _read(os.path.join(trained, "target_vocab.json"))["tokens"]
  assert set(line) <= set("".join(t for t in tokens if not t.startswith("<"))) | set("<unk>")
  monkeypatch.setattr("sys.stdin", io.StringIO("may 1, 2020\n\nthe second of june , nineteen oh one\n"))
  piped = run_experiment("translate", f"--workdir={trained}", "--translate=-")
  assert piped.code == 0, piped.err
  assert len(piped.out.splitlines()) == 2


@pytest.mark.parametrize("value", ["  ", "-", "@EMPTY", "@MISSING"])
def test_nothing_to_translate_is_one_error_line(trained, run_experiment, monkeypatch, tmp_path, value):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  monkeypatch.setattr("sys.stdin", io.StringIO(""))
  value = value.replace("EMPTY", str(empty)).replace("MISSING", str(tmp_path / "missing.txt"))
  result = run_experiment("translate", f"--workdir={trained}", f"--translate={value}")
  assert result.code == 2 and result.out == ""
  [line] = result.err.strip().splitlines()
  assert line.startswith("translate: error: ")


def test_translate_without_a_trained_run_names_the_workdir(run_experiment, tmp_path):
  result = run_experiment("translate", f"--workdir={tmp_path}", "--translate=may 1, 2020")
  assert result.code == 2 and "holds no trained model" in result.err


def test_training_again_is_refused_and_resume_extends_the_run(trained, run_experiment, tmp_path):
  again = run_experiment("translate", "--smoke", "--steps=6", f"--workdir={trained}")
  assert again.code == 2 and "pass --resume" in again.err and len(again.err.strip().splitlines()) == 1
  workdir = str(tmp_path / "resumed")
  shutil.copytree(trained, workdir)
  changed = run_experiment("translate", "--resume", "--hidden_size=64", f"--workdir={workdir}")
  assert changed.code == 2 and "cannot change hidden_size" in changed.err
  resumed = run_experiment("translate", "--resume", "--steps=9", f"--workdir={workdir}")
  assert resumed.code == 0, resumed.err
  results = _read(os.path.join(workdir, "results.json"))
  assert results["steps"] == 9 and results["resumed_from_step"] == 6
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["split"] == "valid"] == [3, 6, 9]
  assert [r["step"] for r in records if r["split"] == "resume"] == [6]


def test_attention_smoke_run_draws_the_weights(run_experiment, tmp_path):
  """--attention=dot (Luong et al., here without input feeding) trains, writes attention.png and a model.json
  that rebuilds the attention model; the plotted weights are distributions over the source tokens."""
  pytest.importorskip("sacrebleu")
  workdir = str(tmp_path / "dot")
  result = run_experiment("translate", "--smoke", "--model=sutskever", "--attention=dot", "--input_feeding=false",
                          "--steps=4", "--eval_every=4", "--beam_size=1", "--num_eval_pairs=16",
                          "--valid_bleu_pairs=16", f"--workdir={workdir}")
  assert result.code == 0, result.err
  assert os.path.getsize(os.path.join(workdir, "attention.png")) > 10000
  results = _read(os.path.join(workdir, "results.json"))
  assert results["attention"] == "dot" and results["steps"] == 4 and not results["input_feeding"]
  assert 0.5 < results["test_loss"] < 2 * math.log(15)
  loaded = load_run(workdir)
  assert loaded.model.attention == "dot" and not loaded.model.input_feeding and loaded.model.reversed_source
  rows = _test_rows(workdir)[:2]   # the sentences attention.png drew, so its compiled weights are reused
  source_vocab, target_vocab = seq2seq.run_vocabularies(loaded)
  sources = [source_vocab.encode(row[1].split()) for row in rows]
  outputs = [target_vocab.encode(list(row[3])) for row in rows]
  for source, output, weights in zip(sources, outputs, seq2seq.attention_maps(loaded.model, loaded.params,
                                                                              sources, outputs)):
    assert weights.shape == (len(output) + 1, len(source))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("flag,message", [("--model=bahdanau", "--model"), ("--cell=transformer", "--cell"),
                                          ("--attention=luong", "--attention"),
                                          ("--beam_width=4", "beam_width"), ("--batch_size=0", "batch_size")])
def test_bad_flags_are_one_error_line(run_experiment, tmp_path, flag, message):
  result = run_experiment("translate", "--smoke", flag, f"--workdir={tmp_path}")
  assert result.code == 2 and message in result.err
  assert len(result.err.strip().splitlines()) == 1
  assert not os.listdir(tmp_path)   # nothing was written
