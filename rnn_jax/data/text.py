"""Reading text files strictly: every dataset reader of rnn_jax opens its files through ``read_text``.

    text = read_text(path)                                   # UTF-8, refusing undecodable bytes
    text = read_text(path, encoding_errors="replace")        # U+FFFD for each undecodable byte
    text = read_text(path, encoding="latin-1")               # every byte is a character

A file that is not text in the given encoding raises ValueError naming the file, the offset of
the first bad byte and its value; a binary file (a NUL byte, which no text file holds) is refused
whatever ``encoding_errors`` says. ``content_hash(path)`` is the sha256 of a file's bytes.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from typing import Optional

ENCODING_ERRORS = ("strict", "replace", "ignore", "backslashreplace")
"""How undecodable bytes are handled (Python's codec error handlers): "strict" refuses the file,
"replace" writes U+FFFD, "ignore" drops them, "backslashreplace" writes \\xNN."""

DEFAULT_ENCODING = "utf-8"


def _codec_name(encoding: str, what: str) -> str:
  try:
    return codecs.lookup(encoding).name
  except (LookupError, TypeError):
    raise ValueError(f"{what}: unknown encoding {encoding!r}; give a Python codec name such as 'utf-8' "
                     f"or 'latin-1'") from None


def _shown(codec: str) -> str:
  return {"utf-8": "UTF-8", "ascii": "ASCII", "iso8859-1": "Latin-1"}.get(codec, codec)


def check_encoding(encoding: str, encoding_errors: str, what: str = "text") -> str:
  """Raise ValueError unless ``encoding`` is a known codec and ``encoding_errors`` one of
  ``ENCODING_ERRORS``; returns the codec's canonical name."""
  if encoding_errors not in ENCODING_ERRORS:
    raise ValueError(f"{what}: encoding_errors must be one of {ENCODING_ERRORS}, got {encoding_errors!r}")
  return _codec_name(encoding, what)


def decode(data: bytes, *, encoding: str = DEFAULT_ENCODING, encoding_errors: str = "strict",
           what: str = "text") -> str:
  """``data`` decoded as ``encoding``; ValueError, naming the offset of the first bad byte, for bytes
  that are not ``encoding`` (with encoding_errors="strict") and for a NUL byte (binary data)."""
  codec = check_encoding(encoding, encoding_errors, what)
  try:
    text = data.decode(codec, encoding_errors)
  except UnicodeDecodeError as error:
    bad = error.object[error.start:error.start + 1]
    raise ValueError(f"{what}: not {_shown(codec)} text (byte {error.start} is {bad!r}); give a "
                     f"{_shown(codec)} text file, name its encoding with encoding=..., or read each "
                     f"undecodable byte as U+FFFD with encoding_errors='replace'") from None
  if codec.startswith(("utf-16", "utf-32")):  # their code units hold zero bytes: look at characters
    nul = text.find("\0")
    where = f"character {nul} is NUL"
  else:
    nul = data.find(b"\0")
    where = f"byte {nul} is b'\\x00'"
  if nul >= 0:
    raise ValueError(f"{what}: a binary file, not text ({where}, which no text holds); give a text file")
  return text


def read_text(path: str, *, encoding: str = DEFAULT_ENCODING, encoding_errors: str = "strict",
              what: Optional[str] = None, universal_newlines: bool = True) -> str:
  """The text of the file at ``path`` (see the module docstring). ``what`` names the file in error
  messages (default: its path). With ``universal_newlines`` "\\r\\n" and "\\r" become "\\n", as
  ``open(path)`` reads them; False keeps them (for the csv module, as ``open(path, newline="")``).

  Raises:
    FileNotFoundError: if there is no such file.
    ValueError: for an unknown encoding or errors handler, a binary file or undecodable bytes.
  """
  what = what or str(path)
  check_encoding(encoding, encoding_errors, what)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no such file")
  with open(path, "rb") as handle:
    data = handle.read()
  text = decode(data, encoding=encoding, encoding_errors=encoding_errors, what=what)
  if universal_newlines and "\r" in text:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
  return text


def content_hash(path: str) -> str:
  """sha256 of the bytes of the file at ``path``."""
  digest = hashlib.sha256()
  with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
