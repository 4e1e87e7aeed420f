"""Bach chorales from the music21 corpus as multi-hot piano rolls (the JSB convention).

Source: ``music21.corpus.chorales.Iterator()`` (``pip install music21``; BSD), which
yields the 371 four-part chorales of the Riemenschneider edition in catalogue order.

Piano roll (Boulanger-Lewandowski et al. 2012, "JSB Chorales"): time is quantised to
quarter notes and each frame is a multi-hot vector over the 88 piano keys,

    roll[t, k] = 1  iff a note of MIDI pitch k + 21 sounds at time t (in quarter notes),
                    i.e. onset <= t < onset + duration,

so a frame samples the chord sounding on each beat (an off-beat passing note that
starts and ends between two beats is not sampled, as in the JSB data). Keys are left
as written (no transposition to C). Frames where every voice rests are all zeros.

Split (deterministic, documented): chorale i (0-based position in the Riemenschneider
order) goes to ``valid`` if i % 5 == 3, to ``test`` if i % 5 == 4, else to ``train``:
60 / 20 / 20 %, the proportions of the JSB split (229 / 76 / 77 of 382) but not the
same pieces, so our figures are not directly comparable with published JSB NLLs.

Parsing all 371 scores takes about a minute; the parsed rolls are cached in one npz
file (``cache_dir``, default ``~/.cache/rnn_jax``). ``roll_to_score`` turns a roll back into
a music21 score (for MIDI) and ``plot_piano_roll`` draws one.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from rnn_jax.data.sentences import IndexedBatches

INSTALL_COMMAND = "pip install music21"
LOWEST_MIDI = 21          # A0, the piano's lowest key
NUM_PITCHES = 88          # A0 .. C8 (MIDI 21 .. 108)
NUM_CHORALES = 371        # music21.corpus.chorales.Iterator() in the Riemenschneider numbering
SPLITS = ("train", "valid", "test")
CACHE_VERSION = 1


def default_cache_dir() -> str:
  """~/.cache/rnn_jax, or $RNN_JAX_CACHE when set."""
  return os.environ.get("RNN_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rnn_jax"))


def import_music21():
  """Import music21 or raise ImportError with the exact install command."""
  try:
    import music21  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f"the Bach chorales need the music21 package; install it with: {INSTALL_COMMAND} "
                      f"(or pip install 'rnn_jax[music]')") from error
  return music21


def split_of(index: int) -> str:
  """The split of the chorale at 0-based catalogue position ``index``: 3 -> valid, 4 -> test (mod 5)."""
  return {3: "valid", 4: "test"}.get(index % 5, "train")


def score_to_roll(score) -> np.ndarray:
  """A music21 score -> piano roll [T, 88] uint8, T = ceil(score length in quarter notes).

    roll[t, p - 21] = 1  iff some note of MIDI pitch p has onset <= t < onset + duration

  Grace notes (zero duration) sound at no sampled instant and are dropped. Raises
  ValueError if the score holds no pitched note or a pitch outside the piano's range.
  """
  events = []
  for element in score.flatten().notes:
    onset, duration = float(element.offset), float(element.quarterLength)
    for pitch in element.pitches:
      events.append((onset, onset + duration, int(pitch.midi)))
  if not events:
    raise ValueError("chorales: the score holds no pitched note")
  num_frames = int(np.ceil(max(end for _, end, _ in events) - 1e-9))
  roll = np.zeros((max(num_frames, 1), NUM_PITCHES), np.uint8)
  for onset, end, midi in events:
    key = midi - LOWEST_MIDI
    if not 0 <= key < NUM_PITCHES:
      raise ValueError(f"chorales: MIDI pitch {midi} lies outside the piano range "
                       f"[{LOWEST_MIDI}, {LOWEST_MIDI + NUM_PITCHES - 1}]")
    first, stop = int(np.ceil(onset - 1e-9)), int(np.ceil(end - 1e-9))
    roll[first:stop, key] = 1
  return roll


def parse_corpus(limit: Optional[int] = None, progress: bool = False):
  """Parse the music21 chorales into piano rolls.

  Args:
    limit: parse only the first ``limit`` chorales (None: all 371).
  Returns:
    (rolls: list of [T_i, 88] uint8, titles: list of str), in catalogue order.
  """
  music21 = import_music21()
  iterator = music21.corpus.chorales.Iterator()
  rolls, titles = [], []
  for score in iterator:
    if limit is not None and len(rolls) >= limit:
      break
    rolls.append(score_to_roll(score))
    titles.append(str(score.metadata.title if score.metadata is not None else len(titles)))
    if progress and len(rolls) % 50 == 0:
      print(f"chorales: parsed {len(rolls)} scores", flush=True)
  if not rolls:
    raise ValueError("chorales: music21.corpus.chorales.Iterator() yielded no chorale")
  return rolls, titles


def cache_path(cache_dir: str, limit: Optional[int]) -> str:
  name = "chorales" if limit is None else f"chorales_first{limit}"
  return os.path.join(cache_dir, f"{name}_v{CACHE_VERSION}.npz")


def save_rolls(path: str, rolls, titles) -> None:
  """Write rolls as one concatenated [sum T_i, 88] array plus frame offsets, atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  offsets = np.cumsum([0] + [len(r) for r in rolls]).astype(np.int64)
  temporary = path + ".tmp.npz"
  np.savez_compressed(temporary, frames=np.concatenate(rolls, axis=0), offsets=offsets,
                      titles=np.asarray(titles), version=np.asarray(CACHE_VERSION))
  os.replace(temporary, path)


def read_rolls(path: str):
  """Read a cache written by ``save_rolls``; raise ValueError naming the file if it is malformed."""
  try:
    with np.load(path, allow_pickle=False) as data:
      frames, offsets, titles = data["frames"], data["offsets"], data["titles"]
      version = int(data["version"])
  except (OSError, KeyError, ValueError, EOFError) as error:
    raise ValueError(f"chorales: cache file {path} is malformed ({error}); delete it to parse the "
                     f"music21 corpus again") from error
  if version != CACHE_VERSION:
    raise ValueError(f"chorales: cache file {path} has version {version}, expected {CACHE_VERSION}; "
                     f"delete it to parse again")
  if (frames.ndim != 2 or frames.shape[1] != NUM_PITCHES or offsets.ndim != 1 or offsets[0] != 0
      or offsets[-1] != frames.shape[0] or np.any(np.diff(offsets) <= 0) or len(titles) != len(offsets) - 1):
    raise ValueError(f"chorales: cache file {path} is malformed (frames {frames.shape}, "
                     f"{len(offsets) - 1} offsets, {len(titles)} titles); delete it to parse again")
  rolls = [frames[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
  return rolls, [str(t) for t in titles]


def load_chorales(cache_dir: Optional[str] = None, limit: Optional[int] = None, progress: bool = False):
  """Chorale piano rolls split into train/valid/test, parsed once and cached.

  Returns:
    {"train": [...], "valid": [...], "test": [...]} of [T_i, 88] uint8 rolls, and
    {"train": [...], ...} of their titles; split by ``split_of`` on the catalogue position.
  """
  path = cache_path(cache_dir or default_cache_dir(), limit)
  if os.path.exists(path):
    rolls, titles = read_rolls(path)
  else:
    rolls, titles = parse_corpus(limit, progress=progress)
    save_rolls(path, rolls, titles)
  splits = {name: [] for name in SPLITS}
  split_titles = {name: [] for name in SPLITS}
  for index, (roll, title) in enumerate(zip(rolls, titles)):
    splits[split_of(index)].append(roll)
    split_titles[split_of(index)].append(title)
  return splits, split_titles


def pad_rolls(rolls, max_len: Optional[int] = None):
  """Pad rolls to a batch: frames [B, T, 88] float32 and lengths [B] int32 (T = longest, or max_len).

  Longer rolls are cut to ``max_len`` frames.
  """
  if not rolls:
    raise ValueError("chorales: no rolls to batch")
  longest = max(len(r) for r in rolls)
  T = longest if max_len is None else min(longest, max_len)
  frames = np.zeros((len(rolls), T, NUM_PITCHES), np.float32)
  lengths = np.zeros((len(rolls),), np.int32)
  for b, roll in enumerate(rolls):
    length = min(len(roll), T)
    frames[b, :length] = roll[:length]
    lengths[b] = length
  return frames, lengths


def roll_to_score(roll: np.ndarray, quarter_length: float = 1.0):
  """A piano roll [T, 88] -> a music21 Score (one part of chords; held pitches are tied into one note).

  A pitch on in consecutive frames becomes one note lasting that many quarter notes.
  """
  music21 = import_music21()
  roll = np.asarray(roll)
  if roll.ndim != 2 or roll.shape[1] != NUM_PITCHES:
    raise ValueError(f"chorales: roll must have shape [T, {NUM_PITCHES}], got {roll.shape}")
  part = music21.stream.Part()
  T = roll.shape[0]
  for key in range(NUM_PITCHES):
    t = 0
    while t < T:
      if roll[t, key]:
        start = t
        while t < T and roll[t, key]:
          t += 1
        note = music21.note.Note(midi=key + LOWEST_MIDI, quarterLength=(t - start) * quarter_length)
        part.insert(start * quarter_length, note)
      else:
        t += 1
  score = music21.stream.Score()
  score.insert(0, part)
  return score


def plot_piano_roll(roll: np.ndarray, path: str, title: str) -> str:
  """A piano roll [T, 88] as a figure: MIDI pitch against time in quarter notes, one dark cell
  per sounding note, over the sounding range plus 3 keys each side. Returns ``path`` (a PNG)."""
  from rnn_jax import plots  # pylint: disable=import-outside-toplevel
  roll = np.asarray(roll)
  if roll.ndim != 2 or roll.shape[1] != NUM_PITCHES:
    raise ValueError(f"chorales: roll must have shape [T, {NUM_PITCHES}], got {roll.shape}")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  sounding = np.where(roll.any(axis=0))[0]
  low, high = (int(sounding.min()), int(sounding.max())) if sounding.size else (27, 60)
  low, high = max(low - 3, 0), min(high + 3, NUM_PITCHES - 1)
  fig, axis = plt.subplots(figsize=(8, 3.5))
  axis.imshow(roll[:, low:high + 1].T, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
              vmin=0, vmax=1, extent=(0, roll.shape[0], low + LOWEST_MIDI - 0.5, high + LOWEST_MIDI + 0.5))
  axis.set_xlabel("time (quarter notes)")
  axis.set_ylabel("MIDI pitch")
  axis.set_title(title, fontsize=10)
  return plots.save_figure(fig, path)


class RollBatches(IndexedBatches):
  """An endless, resumable stream of shuffled batches of whole chorales: {"frames", "lengths"}.

  frames [B, T, 88] float32 and lengths [B] int32, T the longest in the batch rounded up to
  ``pad_multiple``. The order is ``IndexedBatches``' over the chorale lengths (epoch e
  shuffled with default_rng([seed, e]), pools of P batches sorted by length);
  ``position()`` / ``seek()`` resume it exactly.
  """

  def __init__(self, rolls, batch_size: int, *, seed: int = 0, pad_multiple: int = 16,
               pool_batches: int = 4):
    self.rolls, self.pad_multiple = list(rolls), pad_multiple
    super().__init__([len(r) for r in self.rolls], batch_size,
                     lambda chosen: batch_rolls([self.rolls[i] for i in chosen], self.pad_multiple),
                     seed=seed, pool_batches=pool_batches)

def batch_rolls(rolls, pad_multiple: int = 1) -> dict:
  """{"frames": [B, T, 88] float32, "lengths": [B] int32}, T = longest rounded up to pad_multiple."""
  longest = max(len(r) for r in rolls) if rolls else 0
  frames, lengths = pad_rolls(rolls, max_len=None)
  width = int(-(-longest // pad_multiple) * pad_multiple)
  if width > frames.shape[1]:
    frames = np.pad(frames, ((0, 0), (0, width - frames.shape[1]), (0, 0)))
  return {"frames": frames, "lengths": lengths}
