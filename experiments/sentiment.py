"""Many-to-one: sentence sentiment with an Elman (ReLU), an LSTM and a GRU classifier, in one table.

  x_t = E[w_t] -> h_t = RNN(x_t, h_{t-1}) -> s = h_{L-1} (the state at the true last token)
  p(y | w) = softmax(W_hy s + b_y)          ([h_{L-1} ; <-h_0] with --bidirectional)

Every cell of --cells trains on the same split; the table reports held-out accuracy and
macro-F1 (fractions) beside the majority-class baseline:

  python experiments/sentiment.py                                   # CrowdFlower tweets, 3 classes
  python experiments/sentiment.py --dataset=movies                  # VADER movie snippets, 2 classes
  python experiments/sentiment.py --preset=movies_kim2014           # Kim (2014)'s CNN-rand settings
  python experiments/sentiment.py --resume                          # continue every cell
  python experiments/sentiment.py --predict="I love my new self-driving car"
  python experiments/sentiment.py --predict=@texts.txt              # one text per line, batched
  cat texts.txt | python experiments/sentiment.py --predict=-       # standard input, one per line

--predict prints one JSON line per text ({"text", "label", "probabilities", "tokens", "cell"})
using the cell with the best validation accuracy, or --predict_cell; it needs only the
workdir (model.json and vocab.json of each cell), not the corpus.

Outputs in --workdir: table.txt, results.json (one row per cell + the majority baseline),
comparison.png (training loss and validation accuracy of every cell), metrics.jsonl (every
cell's records, with a "cell" field), and one sub-directory per cell with its config.json,
metrics.jsonl, results.json, curves.png, model.json, vocab.json and checkpoints/ (the best on
validation accuracy is tested).

There is no published figure for the aggregated tweet corpus. For the movie snippets, the
closest is Kim (2014), "Convolutional Neural Networks for Sentence Classification", Table 2:
CNN-rand 76.1% on MR, 10-fold cross-validation on 10,662 sentences, not this split.
"""

import dataclasses
import json

import jax
import numpy as np
from absl import flags, logging

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import classifier, metrics, plots, rundir
from rnn_jax import predict as predict_io
from rnn_jax.classifier import CELL_NAMES, SentenceClassifier, keras_cell
from rnn_jax.config import RegularizerConfig, TrainingConfig, field
from rnn_jax.data import sentiment as sentiment_data
from rnn_jax.data.sentences import SentenceBatches
from rnn_jax.train import train_and_test

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
KIM_2014 = {"test_accuracy": 0.761,
            "source": "Kim 2014, Convolutional Neural Networks for Sentence Classification, Table 2, "
                      "CNN-rand on MR",
            "differences": "a CNN over 300-d random word vectors; 10-fold cross-validation on the 10,662 MR "
                           "sentences, not this 80/10/10 split of the 10,568 VADER snippets"}


@dataclasses.dataclass(frozen=True)
class Config(TrainingConfig, RegularizerConfig):
  """sentiment: Elman-ReLU, LSTM and GRU sentence classifiers on one split, Adam, clip 5."""
  dataset: str = field("tweets", "Corpus: CrowdFlower tweets (3 classes) or VADER movie snippets (2).",
                       choices=sentiment_data.DATASETS, fixed=True)
  cells: tuple[str, ...] = field(("elman", "lstm", "gru"), "Cells to train and compare, each in "
                                 "<workdir>/<cell>.", choices=CELL_NAMES)
  activation: str = field("relu", "Activation of the Elman cell (relu as in Keras' SimpleRNN).",
                          choices=("relu", "tanh"), fixed=True)
  bidirectional: bool = field(False, "Read each text both ways; s = [h_{L-1} ; <-h_0].", fixed=True)
  embed_size: int = field(64, "Embedding size D.", minimum=1, fixed=True)
  hidden_size: int = field(64, "Hidden size H (per direction).", minimum=1, fixed=True)
  num_layers: int = field(1, "Stacked recurrent layers L.", minimum=1, fixed=True)
  dropout: float = field(0.3, "Dropout on the embeddings, between layers and on the sentence vector s.",
                         minimum=0.0, maximum=0.99)
  vocab_size: int = field(10000, "Most frequent training tokens kept, <unk> included.", minimum=2, fixed=True)
  max_length: int = field(48, "Texts are cut to their first max_length tokens.", minimum=1, fixed=True)
  pad_multiple: int = field(8, "Batch widths round up to a multiple of this (fewer compilations).", minimum=1)
  split_seed: int = field(0, "Seed of the shuffled 80/10/10 train/valid/test split.", fixed=True)
  train_texts: int = field(0, "If > 0, train on the first train_texts texts of the shuffled train split.",
                           minimum=0, fixed=True)
  eval_texts: int = field(0, "If > 0, validate and test on the first eval_texts texts of each split.",
                          minimum=0, fixed=True)
  batch_size: int = 64
  epochs: float = 4.0
  eval_every: int = 100
  learning_rate: float = 2e-3
  clip: float = 5.0


PRESETS = {
    # Kim (2014)'s CNN-rand settings where they apply to an RNN, on the movie snippets: 300-d
    # randomly initialised word vectors, dropout 0.5, mini-batches of 50; H = 100 like his 100
    # feature maps per window size. His MR row reports 76.1% (10-fold cross-validation).
    "movies_kim2014": dict(dataset="movies", embed_size=300, hidden_size=100, dropout=0.5, batch_size=50),
    "bidirectional": dict(bidirectional=True),
}
SMOKE = dict(embed_size=16, hidden_size=16, vocab_size=500, batch_size=32, max_length=16, pad_multiple=16,
             train_texts=512, eval_texts=128, steps=8, eval_every=4, log_every=2)


def cell_name(config: Config, cell: str) -> str:
  """The table's name of a cell: "bi-lstm", "elman (relu)", ..."""
  name = ("bi-" if config.bidirectional else "") + cell
  return name + (f" ({config.activation})" if cell == "elman" else "")


def build_model(config: Config, cell: str, vocab_size: int, num_classes: int) -> SentenceClassifier:
  return SentenceClassifier(vocab_size=vocab_size, num_classes=num_classes,
                            cell=keras_cell(cell, config.hidden_size, config.activation),
                            embed_size=config.embed_size, bidirectional=config.bidirectional,
                            num_layers=config.num_layers, dropout=config.dropout,
                            **config.regularizer_options())


def train_cell(parent: rundir.RunDir, config: Config, cell: str, data: sentiment_data.SentimentSplits,
               baseline_valid: float, options) -> dict:
  """Train (or resume) one cell in <workdir>/<cell>; returns its row of the table (its results.json
  without the config and device, which the parent's results.json holds)."""
  run = parent.child(cell, config, label=f"sentiment {cell}")
  num_classes = len(data.label_names)
  model = build_model(config, cell, len(data.vocab), num_classes)
  run.save_model(model, data.vocab, best_metric="accuracy", best_mode="max", cell=cell,
                 label_names=list(data.label_names), max_length=config.max_length,
                 pad_multiple=config.pad_multiple, dataset=config.dataset)
  sequences, labels = data.splits["train"]
  stream = SentenceBatches(sequences, labels, config.batch_size, seed=config.seed,
                           max_length=config.max_length, pad_multiple=config.pad_multiple, pool_batches=20)
  params = model.init(jax.random.PRNGKey(config.seed))

  def evaluate(params, split):
    return classifier.evaluate(model, params, *data.splits[split], batch_size=config.batch_size,
                               pad_multiple=config.pad_multiple, max_length=config.max_length)

  num_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  logging.info("%s: %s, %d params, %d batches of %d per epoch", run.label, cell_name(config, cell),
               num_params, stream.batches_per_epoch, config.batch_size)
  tokens_per_step = int(config.batch_size * np.mean([len(s) for s in sequences]))
  outcome = train_and_test(run, config, params=params, loss_fn=classifier.make_loss_fn(model), stream=stream,
                           steps_per_epoch=stream.batches_per_epoch, evaluate=evaluate,
                           best_metric="accuracy", best_mode="max", tokens_per_step=tokens_per_step,
                           progress=options.progress)
  results = run.finish({"cell": cell, "name": cell_name(config, cell), "num_params": num_params,
                        **outcome.results})
  results = {k: v for k, v in results.items() if k not in ("config", "device", "experiment")}
  plots.plot_run(run.workdir, f"sentiment {cell_name(config, cell)} on {config.dataset}: {config.num_layers}x"
                 f"{config.hidden_size}, D={config.embed_size}, dropout {config.dropout:g}"
                 f"{config.regularizer_summary()}",
                 metrics=["loss", "accuracy", "macro_f1", "grad_norm"],
                 reference={"accuracy": (baseline_valid, f"majority class ({baseline_valid:.3f})")},
                 labels={"loss": "cross-entropy (nats per text)", "accuracy": "accuracy (fraction)",
                         "macro_f1": "macro-F1 (fraction)", "grad_norm": "gradient norm ||g||"},
                 final={"test accuracy": results["test_accuracy"], "test macro-F1": results["test_macro_f1"],
                        "at best step": results["best_step"]})
  return results


def merge_metrics(run: rundir.RunDir, cells) -> None:
  """<workdir>/metrics.jsonl: the records of every finished cell, each with a "cell" field."""
  records = [{**record, "cell": cell} for cell in cells for record in rundir.read_metrics(run.path(cell))]
  run.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def format_table(rows, baseline: dict) -> str:
  """The comparison table: test accuracy, test macro-F1 and valid accuracy (fractions)."""
  lines = [f"{'model':<22} {'test acc':>9} {'test macro-F1':>14} {'valid acc':>10}",
           f"{'majority class':<22} {baseline['test_accuracy']:>9.4f} {baseline['test_macro_f1']:>14.4f} "
           f"{baseline['valid_accuracy']:>10.4f}"]
  for row in rows:
    lines.append(f"{row['name']:<22} {row['test_accuracy']:>9.4f} {row['test_macro_f1']:>14.4f} "
                 f"{row['valid_accuracy']:>10.4f}")
  return "\n".join(lines)


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train every cell of ``config.cells`` into <workdir>/<cell>; returns results.json's content."""
  options = options or common.RunOptions()
  if not config.cells:
    raise ValueError(f"cells is empty; give a list from {CELL_NAMES}")
  if len(set(config.cells)) != len(config.cells):
    raise ValueError(f"cells lists a cell twice: {list(config.cells)}")
  corpus = sentiment_data.load_sentiment(config.dataset)
  data = sentiment_data.prepare_splits(
      corpus, seed=config.split_seed, fractions=SPLIT_FRACTIONS, vocab_size=config.vocab_size,
      max_length=config.max_length, train_texts=config.train_texts, eval_texts=config.eval_texts)
  run = rundir.RunDir(workdir, "sentiment", config, options, label="sentiment")
  run.check_data(f"sentiment {config.dataset}", corpus.texts, corpus.labels)  # each cell checks its vocabulary
  sizes = {name: len(labels) for name, (_, labels) in data.splits.items()}
  logging.info("sentiment: %s, texts %s (dropped without a token: %s), vocabulary %d", config.dataset, sizes,
               data.dropped, len(data.vocab))
  num_classes = len(data.label_names)
  train_labels = data.splits["train"][1]
  valid_base = metrics.majority_baseline(train_labels, data.splits["valid"][1], num_classes)
  test_base = metrics.majority_baseline(train_labels, data.splits["test"][1], num_classes)
  baseline = {"class": data.label_names[test_base["class"]], "valid_accuracy": valid_base["accuracy"],
              "valid_macro_f1": valid_base["macro_f1"], "test_accuracy": test_base["accuracy"],
              "test_macro_f1": test_base["macro_f1"]}
  rows = []
  for cell in config.cells:
    rows.append(train_cell(run, config, cell, data, baseline["valid_accuracy"], options))
    merge_metrics(run, [row["cell"] for row in rows])
  best = max(rows, key=lambda row: row["valid_accuracy"])
  table = format_table(rows, baseline)
  print(table)
  run.write_text("table.txt", table + "\n")
  title = (f"sentiment on {config.dataset} ({num_classes} classes): {config.num_layers}x{config.hidden_size} "
           f"cells, D={config.embed_size}, dropout {config.dropout:g}; majority class test "
           f"{baseline['test_accuracy']:.3f}")
  plots.plot_comparison(
      {row["name"]: run.path(row["cell"]) for row in rows}, ["accuracy"], title, run.path("comparison.png"),
      labels={"loss": "cross-entropy (nats per text)", "accuracy": "accuracy (fraction)"},
      reference={"accuracy": {"majority class": (baseline["valid_accuracy"],
                                                 f"majority class ({baseline['valid_accuracy']:.3f})")}},
      final={row["name"]: f"test {row['test_accuracy']:.3f}" for row in rows})
  extra = {"published": KIM_2014} if config.dataset == "movies" else {}
  results = run.finish({
      "dataset": config.dataset, "label_names": list(data.label_names), "split_sizes": sizes,
      "dropped_texts": data.dropped, "vocab_size": len(data.vocab), "majority_baseline": baseline,
      "cells": rows, "best_cell": best["cell"], "best_valid_accuracy": best["valid_accuracy"],
      "best_test_accuracy": best["test_accuracy"], **extra})
  print(f"sentiment on {config.dataset}: best cell {best['name']} (valid accuracy "
        f"{100 * best['valid_accuracy']:.2f}%), test accuracy {100 * best['test_accuracy']:.2f}%, "
        f"macro-F1 {100 * best['test_macro_f1']:.2f}%; majority class {100 * baseline['test_accuracy']:.2f}%")
  return results


# ---------------------------------------------------------------------------
# --predict
# ---------------------------------------------------------------------------

def define_predict_flags(flag_values) -> None:
  """The flags of --predict, which classifies texts with a trained run instead of training."""
  common.define_input_flag(flag_values, "predict", "Classify texts (one JSON line each)", "text")
  flags.DEFINE_string("predict_cell", "", "Cell used by --predict (default: the best validation accuracy).",
                      flag_values=flag_values)


def predict_mode(flag_values, workdir: str) -> bool:
  if flag_values.predict is None:
    return False
  texts = predict_io.read_texts(flag_values.predict)
  loaded = classifier.load_classifier(workdir, flag_values.predict_cell)
  answers = classifier.predict(loaded, texts, batch_size=int(loaded.config.get("batch_size", 64)))
  predict_io.json_lines(answers)
  return True


EXPERIMENT = common.Experiment("sentiment", Config, train_and_evaluate, PRESETS, SMOKE, __doc__,
                               define_flags=define_predict_flags, infer=predict_mode)

if __name__ == "__main__":
  common.main(EXPERIMENT)
