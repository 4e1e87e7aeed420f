"""Many-to-one: sentence sentiment with an Elman (ReLU), an LSTM and a GRU classifier, in one table.

  embedding -> RNN (or bidirectional RNN) -> state at each sentence's true length -> dense -> softmax

Train every cell of --cells on the same split and report held-out accuracy and
macro-F1 beside the majority-class baseline:

  python experiments/sentiment.py --workdir=/tmp/sentiment                  # tweets, 3 classes
  python experiments/sentiment.py --dataset=movies --workdir=/tmp/movies    # VADER movie snippets, 2 classes
  python experiments/sentiment.py --workdir=/tmp/sentiment --predict="I love my new self-driving car"

Outputs in --workdir: results.json (the table), metrics.jsonl (every cell's log lines,
with a "cell" field), comparison.png, model.json (vocabulary and model settings), and
one sub-directory per cell with its own metrics.jsonl, results.json, curves.png and
checkpoints (the last --keep plus the best on validation accuracy). --resume continues
each cell from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rnn_jax import losses, metrics, runtime, train
from rnn_jax.checkpoint import CheckpointManager
from rnn_jax.classifier import CELL_NAMES, SentenceClassifier
from rnn_jax.data import sentiment as sentiment_data
from rnn_jax.data.sentences import SentenceBatches, evaluation_batches
from rnn_jax.data.vocab import Vocabulary
from rnn_jax.layers import check_token_ids

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "tweets", sentiment_data.DATASETS,
                  "Corpus: CrowdFlower tweets or VADER movie snippets.")
flags.DEFINE_list("cells", ["elman", "lstm", "gru"], "Cells to train and compare.")
flags.DEFINE_enum("activation", "relu", ["relu", "tanh"], "Elman activation (relu as in Keras SimpleRNN).")
flags.DEFINE_bool("bidirectional", False, "Read each sentence both ways; s = [h_{L-1} ; <-h_0].")
flags.DEFINE_integer("embed_size", 64, "Embedding size D.")
flags.DEFINE_integer("hidden_size", 64, "Hidden size H (per direction).")
flags.DEFINE_integer("num_layers", 1, "Stacked RNN layers.")
flags.DEFINE_float("dropout", 0.3, "Dropout on embeddings and on the sentence vector.")
flags.DEFINE_integer("vocab_size", 10000, "Most frequent training tokens kept (incl. <unk>).")
flags.DEFINE_integer("max_length", 48, "Sentences are truncated to their first max_length tokens.")
flags.DEFINE_integer("pad_multiple", 8, "Batch widths are rounded up to a multiple of this (fewer compiles).")
flags.DEFINE_integer("batch_size", 64, "Sentences per training batch.")
flags.DEFINE_integer("epochs", 4, "Training epochs per cell.")
train.define_optimizer_flags(learning_rate=2e-3, clip=5.0)
flags.DEFINE_integer("seed", 0, "Seed of the split, the init and the batch order.")
flags.DEFINE_integer("log_every", 50, "Steps between train log lines.")
flags.DEFINE_integer("keep", 2, "Checkpoints kept per cell (plus the best).")
flags.DEFINE_string("workdir", "/tmp/rnn_jax/sentiment", "Output directory.")
flags.DEFINE_bool("resume", False, "Continue each cell from its latest checkpoint in --workdir.")
flags.DEFINE_bool("smoke", False, "Seconds-long run of the same code path on a small subset.")
flags.DEFINE_string("predict", None, "Classify this text with a trained checkpoint in --workdir and exit.")
flags.DEFINE_string("predict_cell", "", "Cell used by --predict (default: best validation accuracy).")

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def encode(texts, vocab: Vocabulary, max_length: int) -> list[np.ndarray]:
  """Token ids of each text (unknown words -> <unk>), truncated to max_length."""
  return [vocab.encode(sentiment_data.tokenize(text))[:max_length] for text in texts]


def build_model(cell: str, vocab_size: int, num_classes: int) -> SentenceClassifier:
  return SentenceClassifier(
      vocab_size=vocab_size, num_classes=num_classes, cell=cell, embed_size=FLAGS.embed_size,
      hidden_size=FLAGS.hidden_size, activation=FLAGS.activation, bidirectional=FLAGS.bidirectional,
      num_layers=FLAGS.num_layers, dropout=FLAGS.dropout)


def optimizer_settings() -> dict:
  """The optimiser flags, saved in model.json so --predict rebuilds the same train state."""
  return {"name": FLAGS.optimizer, "learning_rate": FLAGS.learning_rate, "clip": FLAGS.clip or None,
          "clip_mode": FLAGS.clip_mode}


def make_optimizer(settings: dict):
  return train.make_optimizer(settings["name"], settings["learning_rate"], clip=settings["clip"],
                              clip_mode=settings["clip_mode"])


def make_loss_fn(model: SentenceClassifier):
  """loss_fn(params, batch, rng) -> (mean cross-entropy over real rows, {"accuracy"})."""

  def loss_fn(params, batch, rng):
    logits = model(params, batch["ids"], batch["lengths"], train=True, dropout_key=rng)
    loss = losses.cross_entropy(logits, batch["targets"], mask=batch["valid"], reduction="mean")
    return loss, {"accuracy": losses.accuracy(logits, batch["targets"], mask=batch["valid"])}

  return loss_fn


def make_predict_fn(model: SentenceClassifier):
  """Jitted logits for a padded batch (no dropout)."""
  return jax.jit(lambda params, ids, lengths: model(params, ids, lengths))


def evaluate(predict_fn, params, sequences, labels, num_classes: int) -> dict:
  """Accuracy, macro-F1 and mean cross-entropy of the classifier on one split."""
  predictions, total_loss = [], 0.0
  for batch in evaluation_batches(sequences, labels, FLAGS.batch_size, max_length=FLAGS.max_length,
                                  pad_multiple=FLAGS.pad_multiple):
    logits = predict_fn(params, jnp.asarray(batch["ids"]), jnp.asarray(batch["lengths"]))
    valid = batch["valid"]
    nll = losses.token_nll(logits, jnp.asarray(batch["targets"]))
    total_loss += float(jnp.sum(jnp.where(valid, nll, 0.0)))
    predictions.append(np.asarray(jnp.argmax(logits, axis=-1))[valid])
  predictions = np.concatenate(predictions)
  return {"accuracy": metrics.accuracy(labels, predictions),
          "macro_f1": metrics.macro_f1(labels, predictions, num_classes),
          "loss": total_loss / len(labels)}


def load_splits():
  """Tokenised train/valid/test ids and labels, the vocabulary and the label names."""
  data = sentiment_data.load_sentiment(FLAGS.dataset)
  train_idx, valid_idx, test_idx = sentiment_data.split_indices(len(data.texts), SPLIT_FRACTIONS, FLAGS.seed)
  if FLAGS.smoke:
    train_idx, valid_idx, test_idx = train_idx[:512], valid_idx[:128], test_idx[:128]
  texts = [data.texts[i] for i in train_idx]
  vocab = Vocabulary.build((t for text in texts for t in sentiment_data.tokenize(text)),
                           max_size=FLAGS.vocab_size)
  splits = {}
  for name, idx in (("train", train_idx), ("valid", valid_idx), ("test", test_idx)):
    sequences = encode([data.texts[i] for i in idx], vocab, FLAGS.max_length)
    keep = [k for k, s in enumerate(sequences) if len(s) > 0]
    if len(keep) < len(sequences):
      logging.info("%s: dropped %d texts with no tokens", name, len(sequences) - len(keep))
    splits[name] = ([sequences[k] for k in keep], data.labels[idx][keep])
    for sequence in splits[name][0]:
      check_token_ids(sequence, len(vocab), f"{name} token ids")
  return splits, vocab, data.label_names


def majority_baseline(splits, num_classes: int) -> dict:
  """Predict the most frequent training class for every test sentence."""
  majority = int(np.bincount(splits["train"][1], minlength=num_classes).argmax())
  labels = splits["test"][1]
  predictions = np.full_like(labels, majority)
  return {"class": majority, "accuracy": metrics.accuracy(labels, predictions),
          "macro_f1": metrics.macro_f1(labels, predictions, num_classes)}


def train_cell(cell: str, splits, vocab_size: int, num_classes: int, config: dict) -> dict:
  """Train (or resume) one cell; returns its best-checkpoint valid and test metrics."""
  model = build_model(cell, vocab_size, num_classes)
  key = jax.random.PRNGKey(FLAGS.seed)
  init_key, train_key = jax.random.split(key)
  optimizer = make_optimizer(optimizer_settings())
  state = train.create_train_state(model.init(init_key), optimizer, train_key)
  train_sequences, train_labels = splits["train"]
  batch_size = min(FLAGS.batch_size, len(train_sequences))
  stream = SentenceBatches(train_sequences, train_labels, batch_size, seed=FLAGS.seed,
                           max_length=FLAGS.max_length, pad_multiple=FLAGS.pad_multiple, pool_batches=20)
  num_steps = 8 if FLAGS.smoke else FLAGS.epochs * stream.batches_per_epoch
  steps_per_epoch = min(stream.batches_per_epoch, num_steps)
  run = train.RunDir(os.path.join(FLAGS.workdir, cell), {**config, "cell": cell})
  checkpoints = CheckpointManager(run.path("checkpoints"), keep=FLAGS.keep,
                                  best_metric="accuracy", best_mode="max")
  state, start_step = train.resume_or_refuse(checkpoints, state, run, FLAGS.resume, stream, label=cell)
  train_step = train.make_train_step(make_loss_fn(model), optimizer)
  predict_fn = make_predict_fn(model)
  valid_sequences, valid_labels = splits["valid"]
  started = time.time()
  train.fit(state, train_step, stream, num_steps=num_steps, run=run, start_step=start_step,
            evaluate=lambda s: evaluate(predict_fn, s.params, valid_sequences, valid_labels, num_classes),
            eval_every=steps_per_epoch, checkpoints=checkpoints, checkpoint_every=steps_per_epoch,
            best_metric="accuracy", log_every=min(FLAGS.log_every, num_steps),
            tokens_per_step=int(batch_size * np.mean([len(s) for s in train_sequences])),
            progress=not FLAGS.smoke)
  best_step = checkpoints.best_step()
  best_state, _ = checkpoints.restore(state, step=best_step)
  valid = evaluate(predict_fn, best_state.params, valid_sequences, valid_labels, num_classes)
  test = evaluate(predict_fn, best_state.params, *splits["test"], num_classes)
  result = {"cell": cell, "best_step": best_step, "steps": num_steps,
            "valid_accuracy": valid["accuracy"], "valid_macro_f1": valid["macro_f1"],
            "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"], "test_loss": test["loss"],
            "train_time_s": time.time() - started,
            "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(best_state.params)))}
  run.finish(result)
  checkpoints.close()
  return result


def format_table(rows, baseline) -> str:
  lines = [f"{'model':<22} {'test acc':>9} {'test macro-F1':>14} {'valid acc':>10}"]
  lines.append(f"{'majority class':<22} {baseline['accuracy']:>9.4f} {baseline['macro_f1']:>14.4f} {'':>10}")
  for row in rows:
    name = ("bi-" if FLAGS.bidirectional else "") + row["cell"]
    if row["cell"] == "elman":
      name += f" ({FLAGS.activation})"
    lines.append(f"{name:<22} {row['test_accuracy']:>9.4f} {row['test_macro_f1']:>14.4f} "
                 f"{row['valid_accuracy']:>10.4f}")
  return "\n".join(lines)


def predict(text: str) -> dict:
  """Classify ``text`` with the saved vocabulary and the best checkpoint of one cell."""
  if not text or not text.strip():
    raise ValueError("--predict: the text is empty; give a sentence, e.g. --predict='I love this car'")
  model_path = os.path.join(FLAGS.workdir, "model.json")
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"--predict: {model_path} not found; train first with "
                            f"python experiments/sentiment.py --workdir={FLAGS.workdir}")
  with open(model_path) as handle:
    saved = json.load(handle)
  cell = FLAGS.predict_cell or saved.get("best_cell")
  if cell not in saved["models"]:
    raise ValueError(f"--predict_cell={cell!r} was not trained in {FLAGS.workdir}; "
                     f"trained: {sorted(saved['models'])}")
  vocab = Vocabulary(saved["vocab"])
  model = SentenceClassifier(**saved["models"][cell])
  ids = encode([text], vocab, saved["max_length"])[0]
  if len(ids) == 0:
    raise ValueError(f"--predict: {text!r} has no tokens (only spaces?); give a sentence")
  state = train.create_train_state(model.init(jax.random.PRNGKey(0)), make_optimizer(saved["optimizer"]),
                                   jax.random.PRNGKey(0))
  checkpoints = CheckpointManager(os.path.join(FLAGS.workdir, cell, "checkpoints"),
                                  best_metric="accuracy", best_mode="max")
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"--predict: no checkpoint in {checkpoints.directory}; train first")
  state, _ = checkpoints.restore(state, step=checkpoints.best_step())
  logits = model(state.params, jnp.asarray(ids)[None], jnp.asarray([len(ids)], jnp.int32))
  probabilities = np.asarray(jax.nn.softmax(logits[0]))
  labels = saved["label_names"]
  answer = {"text": text, "cell": cell, "tokens": vocab.decode(ids, sep=" "),
            "label": labels[int(probabilities.argmax())],
            "probabilities": {label: float(p) for label, p in zip(labels, probabilities)}}
  print(json.dumps(answer, indent=2))
  return answer


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if FLAGS.predict is not None:
    predict(FLAGS.predict)
    return
  unknown = [c for c in FLAGS.cells if c not in CELL_NAMES]
  if unknown or not FLAGS.cells:
    raise app.UsageError(f"--cells: unknown {unknown}; expected a list from {CELL_NAMES}")
  if FLAGS.smoke:
    FLAGS.embed_size, FLAGS.hidden_size, FLAGS.vocab_size, FLAGS.batch_size = 16, 16, 500, 32
    FLAGS.max_length, FLAGS.pad_multiple = 16, 16
  if not FLAGS.resume:
    for cell in FLAGS.cells:
      directory = os.path.join(FLAGS.workdir, cell, "checkpoints")
      if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
        raise FileExistsError(f"{directory} already holds checkpoints; pass --resume to continue them or "
                              "choose a fresh --workdir (nothing was overwritten)")
  config = train.script_flag_values()
  run = train.RunDir(FLAGS.workdir, config)
  splits, vocab, label_names = load_splits()
  num_classes = len(label_names)
  logging.info("%s: %s sentences (train/valid/test), vocabulary %d", FLAGS.dataset,
               [len(splits[s][1]) for s in ("train", "valid", "test")], len(vocab))
  baseline = majority_baseline(splits, num_classes)
  saved = {"vocab": vocab.tokens, "label_names": list(label_names), "max_length": FLAGS.max_length,
           "optimizer": optimizer_settings(),
           "models": {c: vars(build_model(c, len(vocab), num_classes)) for c in FLAGS.cells}}
  run.write_text("model.json", json.dumps(saved, indent=1))
  rows = []
  for cell in FLAGS.cells:
    rows.append(train_cell(cell, splits, len(vocab), num_classes, config))
    train.merge_run_metrics(FLAGS.workdir, [row["cell"] for row in rows], run.metrics_path)
  best = max(rows, key=lambda r: r["valid_accuracy"])
  saved["best_cell"] = best["cell"]
  run.write_text("model.json", json.dumps(saved, indent=1))
  table = format_table(rows, baseline)
  print(table)
  run.write_text("table.txt", table + "\n")
  train.plot_runs(FLAGS.workdir, FLAGS.cells, "accuracy", ylabel="validation accuracy",
                  title=f"sentiment ({FLAGS.dataset})")
  run.finish({"dataset": FLAGS.dataset, "label_names": list(label_names),
              "split_sizes": {s: len(splits[s][1]) for s in splits}, "vocab_size": len(vocab),
              "majority_baseline": baseline, "cells": rows, "best_cell": best["cell"]}, plot=False)


if __name__ == "__main__":
  app.run(main)
