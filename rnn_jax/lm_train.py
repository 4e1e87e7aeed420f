"""Language-model training on a token stream: the body shared by the char and word LM experiments.

    config = LMConfig(dataset="ptb_char", cell="lstm", hidden_size=256, steps=8000)
    outcome = train_lm(config, workdir, RunOptions(), experiment="char_lm")
    outcome.results["test_bpc"]

The train split is laid out as B parallel streams cut into windows of T (``data.StreamBatches``)
and trained with truncated BPTT (k1 = k2 = T; the carry flows across windows under
stop_gradient and is reset each epoch) through the one training recipe,
``train.train_and_test``. Validation runs every ``eval_every`` steps over the whole valid
stream (``lm.evaluate_stream``), the best checkpoint on validation loss is tested, and the
run directory receives model.json and vocab.json so that ``rnn_jax.load_run`` and
``sample_from_run`` work from the workdir alone.

Metrics: ``loss`` is the mean cross-entropy in nats per token; characters also report bits
per character (bpc = nats / ln 2), words the perplexity exp(nats).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from rnn_jax import cells, plots
from rnn_jax.config import RegularizerConfig, TrainingConfig, field
from rnn_jax.data import Corpus, StreamBatches, eval_windows, load_corpus
from rnn_jax.data.batching import check_stream
from rnn_jax.data.text import ENCODING_ERRORS
from rnn_jax.deep_transition import DeepTransition
from rnn_jax.lm import LanguageModel, evaluate_stream, make_loss_fn, sample
from rnn_jax.losses import bits_per_char, perplexity
from rnn_jax.rundir import LoadedRun, RunDir, RunOptions, load_run
from rnn_jax.sequence import ScanOptions
from rnn_jax.train import make_eval_step, train_and_test

# The registry's deep-transition cells (Pascanu et al. 2013: DT-RNN, DT(S)-RNN), which take transition_sizes.
DEEP_TRANSITION_CELLS = tuple(name for name, (cell_class, _) in cells.PRESETS.items()
                              if issubclass(cell_class, DeepTransition))


@dataclasses.dataclass(frozen=True)
class LMConfig(TrainingConfig, RegularizerConfig):
  """Every setting of a language-model run."""
  dataset: str = field("ptb_char", "Corpus: ptb_char, ptb_word, shakespeare or file:PATH.", fixed=True)
  encoding: str = field("utf-8", "Text encoding of a file:PATH corpus (a Python codec name, e.g. latin-1).",
                        fixed=True)
  encoding_errors: str = field("strict", "A byte of a file:PATH corpus that is not text in that encoding: strict "
                               "refuses the file naming the byte, replace reads it as U+FFFD, ignore drops it, "
                               "backslashreplace writes \\xNN. A binary file (NUL bytes) is always refused.",
                               choices=ENCODING_ERRORS, fixed=True)
  cell: str = field("lstm", "Recurrent cell.", choices=cells.CELL_NAMES, fixed=True)
  hidden_size: int = field(256, "Hidden size H of each layer.", minimum=1, fixed=True)
  embed_size: int = field(0, "Embedding size D; 0 uses D = H.", minimum=0, fixed=True)
  num_layers: int = field(1, "Stacked recurrent layers L.", minimum=1, fixed=True)
  dropout: float = field(0.0, "Dropout on embeddings, between layers and before the read-out.",
                         minimum=0.0, maximum=0.99)
  init_scale: float = field(0.0, "If > 0, every parameter ~ U(-init_scale, init_scale); 0 keeps each "
                            "layer's own initialiser.", minimum=0.0, fixed=True)
  seq_len: int = field(100, "T, the truncated-BPTT window (k1 = k2 = T).", minimum=1, fixed=True)
  eval_batch_size: int = field(0, "Parallel streams for validation and test; 0 uses batch_size.", minimum=0)
  eval_tokens: int = field(0, "If > 0, evaluate only the first eval_tokens tokens of valid and test.",
                           minimum=0)
  reduction: str = field("mean", "Loss over the T steps: mean, or sum (Zaremba et al. 2014).",
                         choices=("mean", "sum"))
  l1: float = field(0.0, "L1 penalty on the recurrent weights W_hh only.", minimum=0.0)
  l2: float = field(0.0, "L2 penalty on the recurrent weights W_hh only.", minimum=0.0)
  unroll: int = field(1, "lax.scan unroll of the recurrence.", minimum=1)
  transition_sizes: tuple[int, ...] = field((), "Sizes D_1 .. D_(L-1) of the intermediate transition layers of the "
                                            "dt_rnn and dts_rnn cells (Pascanu et al. 2013); empty: one layer of "
                                            "hidden_size units.", minimum=1, fixed=True)
  output_layer_sizes: tuple[int, ...] = field((), "Sizes of the intermediate tanh layers of a deep output between "
                                              "h_t and the softmax (DO; with dts_rnn the DOT(S)-RNN of Pascanu et "
                                              "al. 2013); empty: o_t = W_hy h_t + b_y.", minimum=1, fixed=True)

  def validate(self) -> None:
    super().validate()
    if self.transition_sizes and self.cell not in DEEP_TRANSITION_CELLS:
      raise ValueError(f"transition_sizes {list(self.transition_sizes)} is for the deep-transition cells "
                       f"{list(DEEP_TRANSITION_CELLS)}, got cell={self.cell!r}")


@dataclasses.dataclass
class LMOutcome:
  """What ``train_lm`` returns."""
  results: dict
  model: LanguageModel
  params: Any
  corpus: Corpus
  run: RunDir


def build_model(config: LMConfig, vocab_size: int) -> LanguageModel:
  """The LanguageModel of ``config`` over ``vocab_size`` tokens (a deep transition through the cell's
  transition_sizes, a deep output through output_layer_sizes)."""
  options = {"transition_sizes": tuple(config.transition_sizes)} if config.transition_sizes else {}
  cell = cells.make_cell(config.cell, config.hidden_size, **options)
  return LanguageModel(cell, vocab_size, config.embed_size or config.hidden_size,
                       output_layer_sizes=tuple(config.output_layer_sizes),
                       num_layers=config.num_layers, dropout=config.dropout,
                       **config.regularizer_options(),
                       init_scale=config.init_scale or None, scan=ScanOptions(unroll=config.unroll))


def count_params(config: LMConfig, vocab_size: int) -> int:
  """The number of parameters of ``build_model(config, vocab_size)``, from shapes alone (nothing is
  initialised): how sizes of different architectures are matched to one parameter budget."""
  model = build_model(config, vocab_size)
  return model.num_params(jax.eval_shape(model.init, jax.random.PRNGKey(0)))


def architecture(config: LMConfig) -> str:
  """"2x256 elman", "1x256 dts_rnn, transition 256, deep output 256": the sizes for titles."""
  parts = [f"{config.num_layers}x{config.hidden_size} {config.cell}"]
  if config.cell in DEEP_TRANSITION_CELLS:
    parts.append("transition " + ",".join(str(s) for s in (config.transition_sizes or (config.hidden_size,))))
  if config.output_layer_sizes:
    parts.append("deep output " + ",".join(str(s) for s in config.output_layer_sizes))
  return ", ".join(parts)


def named_metrics(nats: float, level: str) -> dict:
  """{loss, bpc} for characters, {loss, perplexity} for words (loss in nats per token)."""
  if level == "char":
    return {"loss": nats, "bpc": float(bits_per_char(nats))}
  return {"loss": nats, "perplexity": float(perplexity(min(nats, 700.0)))}


def _split_ids(corpus: Corpus, split: str, config: LMConfig) -> np.ndarray:
  ids = corpus.splits[split]
  return ids[: config.eval_tokens] if config.eval_tokens else ids


def train_lm(config: LMConfig, workdir: str, options: RunOptions = RunOptions(), *,
             experiment: str = "lm", corpus: Optional[Corpus] = None,
             reference: Optional[dict] = None) -> LMOutcome:
  """Train ``config`` into ``workdir`` through the one recipe; see the module docstring.

  reference: published figures {metric: (value, label)} drawn on the curves. Raises
  ValueError for bad settings or data (too short for batch_size x seq_len, ...) and
  ``RunExistsError`` for a workdir that holds a run, unless resuming or overwriting.
  """
  corpus = corpus or load_corpus(config.dataset, encoding=config.encoding, encoding_errors=config.encoding_errors)
  vocab_size = len(corpus.vocab)
  stream = StreamBatches(corpus.splits["train"], config.batch_size, config.seq_len, vocab_size,
                         name=f"{corpus.name} train")
  eval_batch = config.eval_batch_size or config.batch_size
  for split in ("valid", "test"):
    check_stream(_split_ids(corpus, split, config), eval_batch, config.seq_len, vocab_size,
                 name=f"{corpus.name} {split}")
  model = build_model(config, vocab_size)
  label = f"{experiment} {config.cell}"
  run = RunDir(workdir, experiment, config, options, label=label)
  for split in ("train", "valid", "test"):  # the ids the model reads; the vocabulary via save_model
    run.check_data(f"{corpus.name} {split}", corpus.splits[split])
  run.save_model(model, corpus.vocab, best_metric="loss", best_mode="min", level=corpus.level,
                 corpus=corpus.summary())
  params = model.init(jax.random.PRNGKey(config.seed))
  eval_step = make_eval_step(make_loss_fn(model, train=False))

  def evaluate(params, split):
    windows = eval_windows(_split_ids(corpus, split, config), eval_batch, config.seq_len, vocab_size)
    return named_metrics(evaluate_stream(model, eval_step, params, windows)["nats"], corpus.level)

  def train_summary(metrics):
    """loss in nats per token (as for valid and test) plus bpc or perplexity; when the optimised
    objective differs (summed over the T steps, or with the W_hh penalty) it is kept as objective."""
    shown = {k: v for k, v in metrics.items() if k not in ("nats", "nll_sum", "tokens", "loss")}
    if config.reduction == "sum" or config.l1 or config.l2:
      shown["objective"] = metrics["loss"]
    return {**shown, **named_metrics(metrics["nats"], corpus.level)}

  logging.info("%s: %s on %s, %d params, B=%d T=%d, %d windows per epoch", label, config.cell, corpus.name,
               model.num_params(params), config.batch_size, config.seq_len, stream.windows_per_epoch)
  outcome = train_and_test(
      run, config, params=params, loss_fn=make_loss_fn(model, train=True, reduction=config.reduction,
                                                       l1=config.l1, l2=config.l2),
      stream=stream, steps_per_epoch=stream.windows_per_epoch, evaluate=evaluate, best_metric="loss",
      carry=model.initial_carries(params, config.batch_size), tokens_per_step=stream.tokens_per_window,
      train_summary=train_summary, progress=options.progress)
  results = {**outcome.results, "num_params": model.num_params(params), "corpus": corpus.summary()}
  metric = "bpc" if corpus.level == "char" else "perplexity"
  plots.plot_run(run.workdir, f"{experiment}: {architecture(config)} on "
                 f"{corpus.name}{config.regularizer_summary()}", metrics=["loss", metric, "grad_norm"],
                 reference=reference,
                 labels={"loss": "nats per token", "bpc": "bits per character", "perplexity": "perplexity",
                         "grad_norm": "gradient norm ||g||"},
                 final={f"test {metric}": results[f"test_{metric}"]})
  return LMOutcome(results=results, model=model, params=outcome.params, corpus=corpus, run=run)


def sample_from_run(loaded: LoadedRun, prime: str, *, length: int, key, temperature: float = 1.0,
                    top_k: int = 0) -> str:
  """A sample from a trained LM run (``rnn_jax.load_run``): the prime and ``length`` drawn tokens.

  Characters are joined as they are; words with spaces.
  """
  level = loaded.extra.get("level", "char")
  vocab = loaded.vocab
  if level == "char":
    prime_ids = vocab.encode(list(prime), allow_unk=False)
  else:
    prime_ids = vocab.encode(prime.split())
  ids = sample(loaded.model, loaded.params, prime_ids, length, key, temperature=temperature, top_k=top_k)
  if level == "char":
    return prime + vocab.decode(ids)
  return prime + " " + vocab.decode(ids, sep=" ")
