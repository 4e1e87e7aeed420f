"""Inputs and outputs of inference from a trained run: texts in, one JSON line per text out.

A source of texts is one of

  "I love my new car"      the text itself (one input);
  "@path/to/file.txt"      a UTF-8 file, one input per line (read strictly: a byte that is not
                           UTF-8, or a binary file, raises ValueError naming its offset);
  "-"                      standard input, one input per line;

blank lines are skipped. ``read_texts(source)`` returns the list of inputs and raises
ValueError when there is none (an empty text, an empty file), FileNotFoundError for a
missing file. ``json_lines(answers)`` writes one JSON object per line, non-ASCII kept.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Optional, TextIO

from rnn_jax.data.text import read_text

SOURCES = "give the text itself, @FILE (one text per line) or - (standard input, one text per line)"


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if line.strip()]


def read_texts(source: Optional[str], stdin: Optional[TextIO] = None) -> list[str]:
  """The inputs that ``source`` names (see the module docstring), in order."""
  if source is None or not source.strip():
    raise ValueError(f"nothing to predict: the text is empty; {SOURCES}")
  if source == "-":
    stream = stdin if stdin is not None else sys.stdin
    texts = _lines(stream.read())
    if not texts:
      raise ValueError(f"nothing to predict: standard input has no non-blank line; {SOURCES}")
    return texts
  if source.startswith("@"):
    path = os.path.expanduser(source[1:])
    if not path:
      raise ValueError(f"nothing to predict: '@' names no file; {SOURCES}")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file of texts to predict")
    texts = _lines(read_text(path))
    if not texts:
      raise ValueError(f"nothing to predict: {path} has no non-blank line; {SOURCES}")
    return texts
  return [source.strip()]


def json_lines(answers: Iterable[dict], stream: Optional[TextIO] = None) -> None:
  """Print each answer as one JSON line (UTF-8 text kept as it is)."""
  stream = stream if stream is not None else sys.stdout
  for answer in answers:
    stream.write(json.dumps(answer, ensure_ascii=False) + "\n")
  stream.flush()
