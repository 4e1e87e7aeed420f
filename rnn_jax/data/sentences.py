"""Padded batches of whole sentences (for many-to-one and tagging models).

A batch is a dict of NumPy arrays::

  ids:     [B, T] int32   token ids, padded with ``pad_id`` after each sentence's end
  lengths: [B]    int32   L_b, the number of real tokens of row b
  targets: [B] (one label per sentence) or [B, T] (one tag per token, padded with 0)
  valid:   [B]    bool    False on filler rows that only complete the last evaluation batch

The width T is the longest length in the batch rounded up to a multiple of
``pad_multiple`` (and at most ``max_length``), so a jitted step compiles once per
width rather than once per batch. Padding is invisible to the models: the
sequence layers keep the carry through padded steps and the losses mask them.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np


def _check_examples(sequences: Sequence[np.ndarray], targets) -> None:
  if len(sequences) == 0:
    raise ValueError("sentence batches: no sentences (the dataset or split is empty)")
  if len(targets) != len(sequences):
    raise ValueError(f"sentence batches: {len(sequences)} sentences but {len(targets)} targets")
  empty = [i for i, s in enumerate(sequences) if len(s) == 0]
  if empty:
    raise ValueError(f"sentence batches: sentence {empty[0]} is empty ({len(empty)} empty in all); "
                     "drop empty sentences before batching")


def pad_batch(sequences: Sequence[np.ndarray], targets, *, pad_multiple: int = 8,
              max_length: Optional[int] = None, batch_size: Optional[int] = None,
              pad_id: int = 0) -> dict:
  """Pad a list of id arrays (and their targets) into one batch dict (see the module docstring).

  Sentences longer than ``max_length`` are truncated to their first ``max_length`` tokens.
  With ``batch_size`` larger than the number of sentences, filler rows (length 0,
  ``valid`` False) complete the batch so that every batch has the same B.
  """
  _check_examples(sequences, targets)
  count = len(sequences)
  rows = batch_size or count
  if rows < count:
    raise ValueError(f"pad_batch: {count} sentences do not fit in batch_size={rows}")
  lengths = np.array([len(s) for s in sequences], np.int32)
  if max_length is not None:
    lengths = np.minimum(lengths, max_length)
  width = int(-(-lengths.max() // pad_multiple) * pad_multiple)
  if max_length is not None:
    width = min(width, max_length)
  ids = np.full((rows, width), pad_id, np.int32)
  per_token = np.ndim(targets[0]) == 1
  padded_targets = np.zeros((rows, width) if per_token else (rows,), np.int32)
  for row, (sequence, length) in enumerate(zip(sequences, lengths)):
    ids[row, :length] = sequence[:length]
    if per_token:
      if len(targets[row]) != len(sequence):
        raise ValueError(f"pad_batch: sentence {row} has {len(sequence)} tokens but "
                         f"{len(targets[row])} tags")
      padded_targets[row, :length] = targets[row][:length]
    else:
      padded_targets[row] = targets[row]
  all_lengths = np.zeros((rows,), np.int32)
  all_lengths[:count] = lengths
  valid = np.arange(rows) < count
  return {"ids": ids, "lengths": all_lengths, "targets": padded_targets, "valid": valid}


class SentenceBatches:
  """An endless, resumable stream of shuffled training batches of B sentences.

    epoch e shuffles the sentences with default_rng([seed, e]) and cuts them into N // B
    full batches (the remainder is skipped; the next epoch reshuffles, so every sentence
    is seen over epochs). With ``pool_batches`` = P > 1, each run of P*B shuffled
    sentences is sorted by length before it is cut, and the batches are shuffled again:
    similar lengths share a batch, so little compute is spent on padding.

  ``position()`` -> {"epoch", "batch"} and ``seek(position)`` make the stream resumable:
  the batches after a seek are exactly those an uninterrupted stream would give.
  """

  def __init__(self, sequences: Sequence[np.ndarray], targets, batch_size: int, *, seed: int = 0,
               pad_multiple: int = 8, max_length: Optional[int] = None, pool_batches: int = 1):
    _check_examples(sequences, targets)
    if pool_batches < 1:
      raise ValueError(f"SentenceBatches: pool_batches must be >= 1, got {pool_batches}")
    if batch_size < 1 or batch_size > len(sequences):
      raise ValueError(f"SentenceBatches: batch_size must be in [1, {len(sequences)}] (the number of "
                       f"sentences), got {batch_size}")
    self.sequences, self.targets = list(sequences), list(targets)
    self.batch_size, self.seed = batch_size, seed
    self.pad_multiple, self.max_length, self.pool_batches = pad_multiple, max_length, pool_batches
    self.batches_per_epoch = len(self.sequences) // batch_size
    self.epoch, self.batch = 0, 0
    self._order = self._epoch_order(0)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """The epoch's sentence order; consecutive runs of B indices form the batches."""
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.sequences))[:self.batches_per_epoch * self.batch_size]
    if self.pool_batches == 1:
      return order
    lengths = np.array([len(self.sequences[i]) for i in order])
    pool = self.pool_batches * self.batch_size
    for start in range(0, len(order), pool):
      by_length = np.argsort(lengths[start:start + pool], kind="stable")
      order[start:start + pool] = order[start:start + pool][by_length]
    batches = order.reshape(self.batches_per_epoch, self.batch_size)
    return batches[rng.permutation(self.batches_per_epoch)].reshape(-1)

  def position(self) -> dict:
    return {"epoch": self.epoch, "batch": self.batch}

  def seek(self, position: dict) -> None:
    epoch, batch = int(position["epoch"]), int(position["batch"])
    if not 0 <= batch < self.batches_per_epoch or epoch < 0:
      raise ValueError(f"SentenceBatches.seek: position {position} is outside "
                       f"{self.batches_per_epoch} batches per epoch")
    self.epoch, self.batch = epoch, batch
    self._order = self._epoch_order(epoch)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    chosen = self._order[self.batch * self.batch_size:(self.batch + 1) * self.batch_size]
    self.batch += 1
    if self.batch == self.batches_per_epoch:
      self.epoch, self.batch = self.epoch + 1, 0
      self._order = self._epoch_order(self.epoch)
    return pad_batch([self.sequences[i] for i in chosen], [self.targets[i] for i in chosen],
                     pad_multiple=self.pad_multiple, max_length=self.max_length)



class IndexedBatches:
  """``SentenceBatches``' resumable order over any kind of example, batched by ``make_batch``.

  lengths: [N] example lengths (only they shape the order: shuffling per epoch with
  default_rng([seed, e]) and, with pool_batches > 1, length pooling). Each batch is
  ``make_batch(indices)`` for the B example indices the order picks. ``position()`` /
  ``seek()`` resume it exactly.
  """

  def __init__(self, lengths, batch_size: int, make_batch, *, seed: int = 0, pool_batches: int = 1):
    # The order needs sequences only for their lengths, and carries each example's index as its label.
    placeholders = [np.zeros(int(n), np.int32) for n in lengths]
    self._order = SentenceBatches(placeholders, np.arange(len(placeholders)), batch_size, seed=seed,
                                  pool_batches=pool_batches)
    self._make_batch = make_batch

  def position(self) -> dict:
    return self._order.position()

  def seek(self, position: dict) -> None:
    self._order.seek(position)

  def __iter__(self):
    return self

  def __next__(self):
    return self._make_batch(next(self._order)["targets"])

def evaluation_batches(sequences: Sequence[np.ndarray], targets, batch_size: int, *,
                       pad_multiple: int = 8, max_length: Optional[int] = None) -> Iterator[dict]:
  """Every sentence once, in order, in batches of exactly ``batch_size`` rows (filler rows
  in the last batch have ``valid`` False and length 0)."""
  _check_examples(sequences, targets)
  for start in range(0, len(sequences), batch_size):
    yield pad_batch(sequences[start:start + batch_size], targets[start:start + batch_size],
                    pad_multiple=pad_multiple, max_length=max_length, batch_size=batch_size)
