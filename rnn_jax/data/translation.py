"""Parallel corpora for encoder-decoder models: the Bible (English -> Spanish) and synthetic dates.

Bible (``--dataset=bible``): the King James Version (``engKJV2006eb``) and the Reina-Valera
1909 (``spaRV1909eb``) from Debian's SWORD modules, exported with the ``diatheke`` command
line tool (install once with ``apt-get install -y diatheke sword-text-kjv sword-text-sparv``):

    diatheke -b MODULE -f plain -k "Genesis 1:1-Revelation of John 22:21"

prints one verse per line as ``Book C:V: text``; lines that do not start with a
reference are Psalm titles (section headings, repeated by diatheke) and are dropped.
Strong's numbers (``<H2416>``, ``<G3588>``) and the paragraph sign are stripped, the two
modules are aligned by verse reference, and the pairs are cached as a TSV file
(``cache_dir``, default ``~/.cache/rnn_jax``). With the modules engKJV2006eb 14.3 (2022-12-21)
and spaRV1909eb 2.60 (2022-12-23) (Debian's sword-text-kjv 14.3-1 and sword-text-sparv 2.60-1)
that gives 31,084 aligned verse pairs: the English has all 31,102 verses of the KJV
versification, the Spanish leaves 18 of them empty where the Reina-Valera numbers its verses
differently (Numbers 12:16, 29:40; 1 Samuel 23:29; 2 Samuel 20:26; 2 Chronicles 33:25; Job 35:16,
38:39-41, 40:20-24; Hosea 11:12; Jonah 1:17; Acts 19:41; 2 Corinthians 13:14). Around those gaps
about 160 pairs keep the Spanish numbering and are off by one to five verses: Numbers 13 and
30, 1 Samuel 24, 2 Chronicles 33:11-24, Job 39 and 40:1-19, Hosea 12 and Jonah 2 (KJV Jonah 1:17
is the Spanish Jonah 2:1); elsewhere one Spanish verse holds two KJV verses (2 Samuel 20:25,
Job 35:15, Acts 19:40, 2 Corinthians 13:12-13). A Psalm's title is part of its first Spanish
verse.

Split (deterministic): pair i (0-based, canonical verse order) is ``valid`` if
i % 50 == 48, ``test`` if i % 50 == 49, else ``train`` (96 / 2 / 2 %, spread over
every book).

Dates (``--dataset=dates``): generated in code from a seed, dates between 1900-01-01 and
2099-12-31 written out in English words in several styles, mapped to ISO 8601:

    "the twenty - third of march , nineteen ninety - four"  ->  "1994-03-23"

Sources are word tokens; targets are characters (digits and "-").

Token ids: every vocabulary built here starts with <pad>=0, <bos>=1, <eos>=2, <unk>=3.

``load_pairs(dataset, ...)`` gives the token pairs of either corpus per split and
``TARGET_SEPARATORS`` how target tokens join into text (characters for dates, words for
the Bible).
"""

from __future__ import annotations

import datetime
import io
import os
import re
import shutil
import subprocess
from typing import NamedTuple, Optional, Sequence

import numpy as np

from rnn_jax.data.sentences import IndexedBatches
from rnn_jax.data.text import read_text
from rnn_jax.data.vocab import UNK, Vocabulary
from rnn_jax.seq2seq import Batch, make_batch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPLITS = ("train", "valid", "test")
DATASETS = ("dates", "bible")
TARGET_SEPARATORS = {"dates": "", "bible": " "}

BIBLE_MODULES = ("engKJV2006eb", "spaRV1909eb")
BIBLE_INSTALL_COMMAND = "apt-get install -y diatheke sword-text-kjv sword-text-sparv"
BIBLE_RANGE = "Genesis 1:1-Revelation of John 22:21"
BIBLE_CACHE_VERSION = 1
_VERSE_LINE = re.compile(r"^\s*((?:[1-3] |I{1,3} )?[A-Z][A-Za-z ]*?) (\d+):(\d+):(.*)$")
_STRONGS = re.compile(r"<[GH]\d+[a-z]?>")
_TOKEN = re.compile(r"\w+|[^\w\s]")


class Pair(NamedTuple):
  """A source and a target token sequence (and, for the Bible, the verse reference)."""
  source: tuple
  target: tuple
  reference: str = ""


def default_cache_dir() -> str:
  """~/.cache/rnn_jax, or $RNN_JAX_CACHE when set."""
  return os.environ.get("RNN_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rnn_jax"))


def tokenize(text: str) -> list[str]:
  """Lower-cased word and punctuation tokens: "Y dijo Dios: Sea" -> [y, dijo, dios, :, sea]."""
  return _TOKEN.findall(text.lower())


def build_vocabulary(sequences: Sequence[Sequence[str]], max_size: Optional[int] = None) -> Vocabulary:
  """<pad>, <bos>, <eos>, <unk> (ids 0..3), then tokens by decreasing frequency.

  ``max_size`` bounds the total size including the four specials; rarer tokens map to <unk>.
  """
  if max_size is not None and max_size <= len(SPECIALS):
    raise ValueError(f"build_vocabulary: max_size must exceed {len(SPECIALS)} (the specials), got {max_size}")
  counted = Vocabulary.build((t for s in sequences for t in s if t not in SPECIALS),
                             None if max_size is None else max_size - len(SPECIALS) + 1)
  return Vocabulary(list(SPECIALS) + [t for t in counted.tokens if t != UNK])


def encode_pairs(pairs: Sequence[Pair], source_vocab: Vocabulary, target_vocab: Vocabulary):
  """Token pairs -> (source id arrays, target id arrays) as lists of int32 [L] arrays."""
  sources = [source_vocab.encode(p.source) for p in pairs]
  targets = [target_vocab.encode(p.target) for p in pairs]
  return sources, targets


# ---- dates -------------------------------------------------------------------
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL_ONES = ("_ first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
                 "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth").split()
_ORDINAL_TENS = {20: "twentieth", 30: "thirtieth"}
_MONTHS = ("january february march april may june july august september october november "
           "december").split()
_WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
DATE_TEMPLATES = (
    "{month} {day}, {year}",
    "the {day} of {month} {year}",
    "{day} {month} {year}",
    "{weekday}, {month} {day}, {year}",
    "{month} the {day}, {year}",
)


def number_words(n: int) -> str:
  """0 <= n < 100 in words: 7 -> "seven", 94 -> "ninety-four"."""
  if not 0 <= n < 100:
    raise ValueError(f"number_words: n must be in [0, 100), got {n}")
  if n < 20:
    return _ONES[n]
  tens, ones = divmod(n, 10)
  return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def ordinal_words(n: int) -> str:
  """1 <= n <= 31 as an ordinal: 3 -> "third", 23 -> "twenty-third", 30 -> "thirtieth"."""
  if not 1 <= n <= 31:
    raise ValueError(f"ordinal_words: day must be in [1, 31], got {n}")
  if n < 20:
    return _ORDINAL_ONES[n]
  tens, ones = divmod(n, 10)
  return _ORDINAL_TENS[tens * 10] if ones == 0 else _TENS[tens] + "-" + _ORDINAL_ONES[ones]


def year_words(year: int, style: int) -> str:
  """1900 <= year <= 2099 in words; ``style`` (any int) picks among the usual readings.

  1994 -> "nineteen ninety-four"; 1905 -> "nineteen oh five"; 1900 -> "nineteen hundred";
  2005 -> "two thousand five" | "two thousand and five"; 2012 -> also "twenty twelve".
  """
  if not 1900 <= year <= 2099:
    raise ValueError(f"year_words: year must be in [1900, 2099], got {year}")
  century, rest = divmod(year, 100)
  if century == 19:
    if rest == 0:
      return "nineteen hundred"
    return "nineteen " + ("oh " + _ONES[rest] if rest < 10 else number_words(rest))
  if rest == 0:
    return "two thousand"
  readings = ["two thousand " + number_words(rest), "two thousand and " + number_words(rest)]
  if rest >= 10:
    readings.append("twenty " + number_words(rest))
  return readings[style % len(readings)]


def date_pair(date: datetime.date, template: int, year_style: int) -> Pair:
  """One date in words (template ``template`` of DATE_TEMPLATES) -> its ISO characters."""
  text = DATE_TEMPLATES[template].format(
      month=_MONTHS[date.month - 1], day=ordinal_words(date.day), year=year_words(date.year, year_style),
      weekday=_WEEKDAYS[date.weekday()])
  return Pair(tuple(tokenize(text)), tuple(date.isoformat()))


def dates_dataset(num_train: int = 20000, num_valid: int = 1000, num_test: int = 1000,
                  seed: int = 0) -> dict[str, list[Pair]]:
  """Random dates (uniform over 1900-01-01 .. 2099-12-31), styles and year readings from ``seed``.

  No source sentence appears in two splits (repeats are redrawn).
  """
  for name, count in (("num_train", num_train), ("num_valid", num_valid), ("num_test", num_test)):
    if count < 1:
      raise ValueError(f"dates_dataset: {name} must be >= 1, got {count}")
  rng = np.random.default_rng(seed)
  first, last = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)
  span = (last - first).days + 1
  seen, splits = set(), {}
  for split, count in (("train", num_train), ("valid", num_valid), ("test", num_test)):
    pairs = []
    while len(pairs) < count:
      date = first + datetime.timedelta(days=int(rng.integers(span)))
      pair = date_pair(date, int(rng.integers(len(DATE_TEMPLATES))), int(rng.integers(3)))
      if pair.source not in seen:
        seen.add(pair.source)
        pairs.append(pair)
    splits[split] = pairs
  return splits


# ---- the Bible ------------------------------------------------------------------
def parse_diatheke(text: str, module: str = "module") -> dict[str, str]:
  """diatheke plain output -> {"Genesis 1:1": "In the beginning ...", ...} in canonical order.

  Only lines that start with a verse reference are kept (headings and the trailing
  "(MODULE)" line are dropped). Strong's tags and the pilcrow are removed and spaces
  collapsed. Raises ValueError if no verse line is found.
  """
  verses = {}
  for line in text.splitlines():
    match = _VERSE_LINE.match(line)
    if match is None:
      continue
    book, chapter, verse, body = match.groups()
    body = " ".join(_STRONGS.sub(" ", body).replace("\u00b6", " ").split())
    verses[f"{book} {chapter}:{verse}"] = body
  if not verses:
    raise ValueError(f"bible: the export of {module} holds no verse line ('Book C:V: text'); "
                     f"is the module installed? ({BIBLE_INSTALL_COMMAND})")
  return verses


def export_module(module: str) -> dict[str, str]:
  """Run diatheke over the whole Bible for ``module``; clear errors if the tool or module is missing."""
  if shutil.which("diatheke") is None:
    raise FileNotFoundError(f"the Bible corpus needs the diatheke tool and the SWORD modules "
                            f"{' and '.join(BIBLE_MODULES)}; install them with: {BIBLE_INSTALL_COMMAND}")
  result = subprocess.run(["diatheke", "-b", module, "-f", "plain", "-k", BIBLE_RANGE],
                          capture_output=True, text=True, check=False)
  if result.returncode != 0 or not result.stdout.strip():
    raise FileNotFoundError(f"bible: diatheke printed nothing for module {module} (exit code "
                            f"{result.returncode}); install the modules with: {BIBLE_INSTALL_COMMAND}")
  return parse_diatheke(result.stdout, module)


def align_verses(english: dict[str, str], spanish: dict[str, str]) -> list[tuple[str, str, str]]:
  """(reference, english, spanish) for every reference present and non-empty in both, in English order."""
  return [(ref, text, spanish[ref]) for ref, text in english.items() if text and spanish.get(ref)]


def bible_cache_path(cache_dir: str) -> str:
  return os.path.join(cache_dir, f"bible_{'_'.join(BIBLE_MODULES)}_v{BIBLE_CACHE_VERSION}.tsv")


def write_bible_cache(path: str, verses: Sequence[tuple[str, str, str]]) -> None:
  """One "reference<TAB>english<TAB>spanish" line per verse, written atomically."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    for fields in verses:
      f.write("\t".join(fields) + "\n")
  os.replace(temporary, path)


def read_bible_cache(path: str) -> list[tuple[str, str, str]]:
  """Read the TSV cache (strict UTF-8); ValueError naming the file and line if a line is not 3 non-empty
  fields, or the byte if the file is not text."""
  verses = []
  text = read_text(path, what=f"bible: {path}")
  for number, line in enumerate(io.StringIO(text), 1):
    fields = line.rstrip("\n").split("\t")
    if len(fields) != 3 or not all(fields):
      raise ValueError(f"bible: {path} line {number} is malformed: expected 'reference<TAB>english"
                       f"<TAB>spanish', got {line[:80]!r}; delete the file to export the corpus again")
    verses.append(tuple(fields))
  if not verses:
    raise ValueError(f"bible: {path} is empty; delete it to export the corpus again")
  return verses


def load_bible_verses(cache_dir: Optional[str] = None) -> list[tuple[str, str, str]]:
  """Aligned (reference, english, spanish) verses: read from the cache, or exported once and cached."""
  path = bible_cache_path(cache_dir or default_cache_dir())
  if os.path.exists(path):
    return read_bible_cache(path)
  english, spanish = (export_module(m) for m in BIBLE_MODULES)
  verses = align_verses(english, spanish)
  write_bible_cache(path, verses)
  return verses


def bible_split_of(index: int) -> str:
  """Split of the verse pair at canonical position ``index``: 48 -> valid, 49 -> test (mod 50)."""
  return {48: "valid", 49: "test"}.get(index % 50, "train")


def bible_dataset(cache_dir: Optional[str] = None, max_len: Optional[int] = None) -> dict[str, list[Pair]]:
  """English -> Spanish verse pairs per split, tokenised; with ``max_len``, only pairs whose
  sides both have at most ``max_len`` tokens (filtered after splitting, in every split)."""
  splits = {name: [] for name in SPLITS}
  for index, (reference, english, spanish) in enumerate(load_bible_verses(cache_dir)):
    pair = Pair(tuple(tokenize(english)), tuple(tokenize(spanish)), reference)
    if max_len is None or max(len(pair.source), len(pair.target)) <= max_len:
      splits[bible_split_of(index)].append(pair)
  empty = [name for name, pairs in splits.items() if not pairs]
  if empty:
    raise ValueError(f"bible: no verse pair left in split(s) {empty} with max_len={max_len}; raise max_len")
  return splits


def load_pairs(dataset: str, *, num_train_pairs: int = 0, num_eval_pairs: int = 0, max_length: int = 0,
               seed: int = 0, cache_dir: Optional[str] = None) -> dict[str, list[Pair]]:
  """Token pairs per split of ``dataset`` ("dates" or "bible").

  dates: ``num_train_pairs`` training pairs and ``num_eval_pairs`` valid and test pairs each,
  generated from ``seed``. bible: the verse pairs with at most ``max_length`` tokens on each
  side (0: all), the first ``num_train_pairs`` / ``num_eval_pairs`` of each split (0: all).
  """
  if dataset == "dates":
    for name, value in (("num_train_pairs", num_train_pairs), ("num_eval_pairs", num_eval_pairs)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1 for the generated dates, got {value}")
    return dates_dataset(num_train_pairs, num_eval_pairs, num_eval_pairs, seed=seed)
  if dataset != "bible":
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
  splits = bible_dataset(cache_dir, max_len=max_length or None)
  limits = {"train": num_train_pairs, "valid": num_eval_pairs, "test": num_eval_pairs}
  return {name: pairs[:limits[name]] if limits[name] else pairs for name, pairs in splits.items()}


def pair_vocabularies(train_pairs: Sequence[Pair], max_size: Optional[int] = None):
  """(source, target) vocabularies of the training pairs (``build_vocabulary``, each at most ``max_size``)."""
  return (build_vocabulary([p.source for p in train_pairs], max_size),
          build_vocabulary([p.target for p in train_pairs], max_size))


# ---- batches ---------------------------------------------------------------------
class PairBatches(IndexedBatches):
  """An endless, resumable stream of shuffled teacher-forcing batches (``seq2seq.Batch``).

  The order is ``IndexedBatches``' over the source lengths (epoch e shuffled with
  default_rng([seed, e]), pools of P batches sorted by source length, N // B batches per
  epoch); ``position()`` / ``seek()`` resume it exactly.
  """

  def __init__(self, sources, targets, batch_size: int, *, seed: int = 0, pad_multiple: int = 8,
               pool_batches: int = 8):
    if len(sources) != len(targets):
      raise ValueError(f"PairBatches: {len(sources)} sources but {len(targets)} targets")
    self.sources, self.targets, self.pad_multiple = list(sources), list(targets), pad_multiple
    super().__init__([len(s) for s in self.sources], batch_size, self._batch,
                     seed=seed, pool_batches=pool_batches)

  def _batch(self, chosen) -> Batch:
    return make_batch([self.sources[i] for i in chosen], [self.targets[i] for i in chosen],
                      BOS_ID, EOS_ID, PAD_ID, self.pad_multiple)

def evaluation_pair_batches(sources, targets, batch_size: int, pad_multiple: int = 8) -> list:
  """Every pair once: a list of (example indices, ``seq2seq.Batch``).

  Pairs are grouped by source length (stable sort) so that a batch holds little padding;
  the indices map each row back to its position in ``sources``.
  """
  if not sources:
    raise ValueError("evaluation_pair_batches: no pairs (the split is empty)")
  order = np.argsort([len(s) for s in sources], kind="stable")
  batches = []
  for start in range(0, len(sources), batch_size):
    indices = order[start:start + batch_size]
    batches.append((indices, make_batch([sources[i] for i in indices], [targets[i] for i in indices],
                                        BOS_ID, EOS_ID, PAD_ID, pad_multiple)))
  return batches
