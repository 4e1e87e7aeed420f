"""Batching one long token stream for truncated BPTT (the Zaremba et al. 2014 layout).

  stream ids: [N]  ->  rows: [B, N // B]   (row b is the contiguous slice b*M .. (b+1)*M - 1, M = N // B;
                                            the last N mod B tokens are dropped)
  window i:   inputs  = rows[:, i*T     : (i+1)*T]        [B, T]
              targets = rows[:, i*T + 1 : (i+1)*T + 1]    [B, T]   (the next token)

Row b of window i+1 continues row b of window i, so the final state of one window is
the right initial state of the next (truncated BPTT with k1 = k2 = T). Training uses the
(M - 1) // T full windows of an epoch; evaluation (``eval_windows``) also scores the last
partial window with a mask, so every token of the rows but the first of each row is scored.
"""

from __future__ import annotations

import numpy as np

from rnn_jax.layers import check_token_ids


def check_stream(ids, batch_size: int, seq_len: int, vocab_size: int, name: str = "corpus") -> np.ndarray:
  """Validate a token stream for the B x T layout; returns it as int32 [N].

  Raises ValueError with what to change: B and T must be positive, the stream non-empty
  and 1-D with ids in [0, vocab_size), and long enough that each of the B rows holds at
  least T + 1 tokens (one window plus its shifted target).
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"{name}: batch_size must be a positive integer, got {batch_size!r}")
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"{name}: seq_len must be a positive integer, got {seq_len!r}")
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"{name}: token stream must be 1-D [N], got shape {ids.shape}")
  if ids.size == 0:
    raise ValueError(f"{name}: the token stream is empty; check the dataset")
  check_token_ids(ids, vocab_size, f"{name}: token ids")
  needed = batch_size * (seq_len + 1)
  if ids.size < needed:
    raise ValueError(f"{name}: {ids.size} tokens are too few for batch_size={batch_size} rows of "
                     f"seq_len={seq_len} (+1 target) = {needed} tokens; lower batch_size or seq_len, "
                     f"or use a longer corpus")
  return ids.astype(np.int32)


def zaremba_layout(ids, batch_size: int) -> np.ndarray:
  """[N] -> [B, N // B]: B contiguous parallel streams (the tail N mod B is dropped)."""
  ids = np.asarray(ids)
  per_row = ids.size // batch_size
  return ids[: batch_size * per_row].reshape(batch_size, per_row)


class StreamBatches:
  """Endless training windows over a stream, epoch after epoch; resumable.

    stream = StreamBatches(ids, batch_size=20, seq_len=20, vocab_size=10000, name="ptb train")
    batch = next(stream)   # {"inputs": [B, T] int32, "targets": [B, T] int32, "reset": bool}
    stream.position()      # {"epoch": e, "window": i}: the NEXT window to be served
    stream.seek({"epoch": e, "window": i})

  ``reset`` is True on the first window of each epoch: the truncated-BPTT carry starts at 0.
  Every epoch serves the same windows in the same order (the layout is fixed), so the
  position alone determines the data of a resumed run.
  """

  def __init__(self, ids, batch_size: int, seq_len: int, vocab_size: int, name: str = "train"):
    ids = check_stream(ids, batch_size, seq_len, vocab_size, name)
    self.rows = zaremba_layout(ids, batch_size)
    self.batch_size, self.seq_len = batch_size, seq_len
    self.windows_per_epoch = (self.rows.shape[1] - 1) // seq_len
    self.epoch, self.window = 0, 0

  @property
  def tokens_per_window(self) -> int:
    return self.batch_size * self.seq_len

  def window_batch(self, index: int) -> dict:
    start = index * self.seq_len
    return {"inputs": self.rows[:, start:start + self.seq_len],
            "targets": self.rows[:, start + 1:start + 1 + self.seq_len],
            "reset": np.bool_(index == 0)}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = self.window_batch(self.window)
    self.window += 1
    if self.window == self.windows_per_epoch:
      self.epoch, self.window = self.epoch + 1, 0
    return batch

  def position(self) -> dict:
    return {"epoch": int(self.epoch), "window": int(self.window)}

  def seek(self, position: dict) -> None:
    epoch, window = int(position["epoch"]), int(position["window"])
    if epoch < 0 or not 0 <= window < self.windows_per_epoch:
      raise ValueError(f"StreamBatches.seek: position {position} is outside this stream "
                       f"({self.windows_per_epoch} windows per epoch); was the checkpoint made with "
                       f"another batch_size or seq_len, or another dataset?")
    self.epoch, self.window = epoch, window


def eval_windows(ids, batch_size: int, seq_len: int, vocab_size: int, name: str = "eval"):
  """All windows of a stream for evaluation, the last one padded: yields dicts of
  inputs/targets [B, T] int32, mask [B, T] bool (True on scored tokens), lengths [B] int32
  and reset (True for the first window). Every window has the same shape (one compilation).
  """
  ids = check_stream(ids, batch_size, seq_len, vocab_size, name)
  rows = zaremba_layout(ids, batch_size)
  scored = rows.shape[1] - 1
  for index, start in enumerate(range(0, scored, seq_len)):
    length = min(seq_len, scored - start)
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    inputs[:, :length] = rows[:, start:start + length]
    targets[:, :length] = rows[:, start + 1:start + 1 + length]
    mask = np.zeros((batch_size, seq_len), bool)
    mask[:, :length] = True
    yield {"inputs": inputs, "targets": targets, "mask": mask,
           "lengths": np.full((batch_size,), length, np.int32), "reset": np.bool_(index == 0)}
