"""Vocabularies: token <-> id maps with an <unk> entry, at character or word level."""

from __future__ import annotations

import collections
from typing import Iterable, Optional, Sequence

import numpy as np

UNK = "<unk>"


class Vocabulary:
  """A fixed token list; id = position. ``<unk>`` is always present (appended if absent).

    vocab = Vocabulary.build(train_tokens)        # ordered by frequency, ties by first sight
    ids = vocab.encode(tokens)                    # np.int32 [N]; unknown tokens -> <unk>
    vocab.decode(ids, sep="")                     # back to text

  Tokens are characters (level "char") or words (level "word"); ``encode`` accepts any
  sequence of tokens, e.g. a string for characters or a list of words.
  """

  def __init__(self, tokens: Sequence[str], unk: str = UNK):
    tokens = list(tokens)
    if len(set(tokens)) != len(tokens):
      duplicates = [t for t, c in collections.Counter(tokens).items() if c > 1]
      raise ValueError(f"Vocabulary: duplicate tokens {duplicates[:5]}")
    if unk not in tokens:
      tokens.append(unk)
    self.tokens = tokens
    self.unk = unk
    self.index = {t: i for i, t in enumerate(tokens)}
    self.unk_id = self.index[unk]

  @classmethod
  def build(cls, tokens: Iterable[str], max_size: Optional[int] = None, unk: str = UNK) -> "Vocabulary":
    """Tokens ordered by decreasing count (ties: first occurrence); at most ``max_size`` incl. <unk>."""
    counts = collections.Counter(tokens)
    if not counts:
      raise ValueError("Vocabulary.build: no tokens; the training text is empty")
    ordered = sorted(counts, key=lambda t: -counts[t])  # stable sort keeps first-sight order on ties
    if max_size is not None:
      if max_size < 2:
        raise ValueError(f"Vocabulary.build: max_size must be >= 2, got {max_size}")
      kept = [t for t in ordered if t != unk][: max_size - 1]
      ordered = kept + ([unk] if unk in counts else [])
    return cls(ordered, unk)

  def __len__(self) -> int:
    return len(self.tokens)

  def __contains__(self, token: str) -> bool:
    return token in self.index

  def encode(self, tokens: Iterable[str], allow_unk: bool = True) -> np.ndarray:
    """ids[i] = index of tokens[i]: np.int32 [N]; unknown tokens map to <unk> (or raise)."""
    if allow_unk:
      ids = [self.index.get(t, self.unk_id) for t in tokens]
    else:
      ids = []
      for position, t in enumerate(tokens):
        if t not in self.index:
          raise ValueError(f"Vocabulary.encode: token {t!r} at position {position} is not in the "
                           f"vocabulary of {len(self)} tokens")
        ids.append(self.index[t])
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids, sep: str = "") -> str:
    """The tokens of ``ids`` joined by ``sep`` ("" for characters, " " for words)."""
    values = np.asarray(ids).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= len(self)):
      raise ValueError(f"Vocabulary.decode: ids must lie in [0, {len(self)}), got min {values.min()} "
                       f"and max {values.max()}")
    return sep.join(self.tokens[i] for i in values.tolist())
