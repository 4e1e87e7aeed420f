"""Many-to-many with T_x = T_y: a bidirectional LSTM tagger on CoNLL-2003 (NER, or POS with --task=pos).

  x_t = E[w_t] -> [->h_t ; <-h_t] (BiLSTM) -> softmax(W_hy [->h_t ; <-h_t] + b_y) per token

No pretrained embeddings, no character features, no CRF: each tag is the argmax of
its own softmax. NER is scored by entity-level precision / recall / F1 on the
standard test set (conlleval's definition, rnn_jax.metrics.entity_scores); POS by
token accuracy. The checkpoint with the best validation score is the one tested.

  python experiments/tagging.py --workdir=/tmp/ner
  python experiments/tagging.py --task=pos --workdir=/tmp/pos

Outputs in --workdir: results.json (test and valid scores, per-type NER scores, the
published figure we compare with), metrics.jsonl, curves.png, test_predictions.txt
(token, gold, predicted; conlleval's input format) and checkpoints/ (--resume continues).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rnn_jax import losses, metrics, runtime, train
from rnn_jax.checkpoint import CheckpointManager
from rnn_jax.data import conll
from rnn_jax.data.sentences import SentenceBatches, evaluation_batches
from rnn_jax.data.vocab import Vocabulary
from rnn_jax.layers import check_token_ids
from rnn_jax.tagger import SequenceTagger

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "ner", ["ner", "pos"], "Which column of CoNLL-2003 to predict.")
flags.DEFINE_integer("embed_size", 100, "Word embedding size D (randomly initialised).")
flags.DEFINE_integer("hidden_size", 100, "LSTM size H per direction.")
flags.DEFINE_integer("num_layers", 1, "Stacked bidirectional layers.")
flags.DEFINE_float("dropout", 0.5, "Dropout on embeddings and BiLSTM outputs (Lample et al. 2016 use 0.5).")
flags.DEFINE_float("singleton_unk", 0.5, "Probability of replacing a training singleton word by <unk>.")
flags.DEFINE_integer("batch_size", 32, "Sentences per batch.")
flags.DEFINE_integer("pad_multiple", 16, "Batch widths round up to a multiple of this (fewer compiles).")
flags.DEFINE_integer("epochs", 10, "Training epochs.")
train.define_optimizer_flags(learning_rate=2e-3, clip=5.0)
flags.DEFINE_integer("seed", 0, "Seed of the init, the batch order and the dropout.")
flags.DEFINE_integer("log_every", 50, "Steps between train log lines.")
flags.DEFINE_integer("keep", 2, "Checkpoints kept (plus the best).")
flags.DEFINE_string("workdir", "/tmp/rnn_jax/tagging", "Output directory.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("smoke", False, "Seconds-long run of the same code path on a small subset.")

# The closest published figure: Huang, Xu & Yu (2015), "Bidirectional LSTM-CRF Models for Sequence
# Tagging", arXiv:1508.01991, Table 2, the "Random" (randomly initialised word embeddings) BI-LSTM
# row on CoNLL-2003. Like ours it has no character-level network and no CRF; unlike ours it also
# connects hand-made spelling and context features to the outputs (their section 4.2).
PUBLISHED = {
    "source": "Huang, Xu & Yu 2015, Bidirectional LSTM-CRF Models for Sequence Tagging (arXiv:1508.01991), "
              "Table 2, Random embeddings, BI-LSTM, CoNLL2003",
    "test_f1": 81.11,
    "differences": "theirs also feeds spelling features (capitalisation, prefixes/suffixes, word patterns) and "
                   "word/POS/chunk n-gram context features directly to the outputs, H=300, SGD lr 0.1; ours "
                   "reads words only, H=100 per direction, dropout 0.5, Adam",
    "same": "randomly initialised word embeddings, no character-level features, softmax output (no CRF), "
            "bidirectional LSTM, standard CoNLL-2003 test set, entity-level F1",
}


def normalise(word: str) -> str:
  """Digits -> 0, so numbers share embeddings (case is kept: it is a strong NER cue)."""
  return re.sub(r"\d", "0", word)


def load_data():
  """Word ids, tag ids, the word vocabulary, the tag names and the raw sentences per split."""
  splits = conll.load_conll2003()
  if FLAGS.smoke:
    splits = {"train": splits["train"][:256], "valid": splits["valid"][:128], "test": splits["test"][:128]}
  column = FLAGS.task  # "ner" or "pos"
  train_words = [normalise(w) for s in splits["train"] for w in s.tokens]
  vocab = Vocabulary.build(train_words)
  counts = np.bincount(vocab.encode(train_words), minlength=len(vocab))
  singletons = counts == 1
  tag_names = tuple(sorted({t for s in splits["train"] for t in getattr(s, column)}))
  tag_index = {t: i for i, t in enumerate(tag_names)}
  data = {}
  for name, sentences in splits.items():
    words = [vocab.encode([normalise(w) for w in s.tokens]) for s in sentences]
    for ids in words:
      check_token_ids(ids, len(vocab), f"{name} word ids")
    unknown = {t for s in sentences for t in getattr(s, column)} - set(tag_index)
    if unknown:
      raise ValueError(f"CoNLL-2003 {name}: tags {sorted(unknown)} never occur in train")
    tags = [np.array([tag_index[t] for t in getattr(s, column)], np.int32) for s in sentences]
    data[name] = (words, tags, sentences)
  return data, vocab, singletons, tag_names


def make_loss_fn(model: SequenceTagger, singletons: np.ndarray, unk_id: int):
  """Per-token mean cross-entropy; training singletons become <unk> with prob. --singleton_unk."""
  singleton_mask = jnp.asarray(singletons)

  def loss_fn(params, batch, rng):
    ids, lengths = batch["ids"], batch["lengths"]
    unk_key, dropout_key = jax.random.split(rng)
    if FLAGS.singleton_unk > 0:
      replace = singleton_mask[ids] & jax.random.bernoulli(unk_key, FLAGS.singleton_unk, ids.shape)
      ids = jnp.where(replace, unk_id, ids)
    logits = model(params, ids, lengths, train=True, dropout_key=dropout_key)
    mask = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    loss = losses.cross_entropy(logits, batch["targets"], mask=mask, reduction="mean")
    return loss, {"token_accuracy": losses.accuracy(logits, batch["targets"], mask=mask)}

  return loss_fn


def predict_tags(predict_fn, params, words, tags) -> list[np.ndarray]:
  """Argmax tag ids for every sentence of a split (in order)."""
  predicted = []
  for batch in evaluation_batches(words, tags, FLAGS.batch_size, pad_multiple=FLAGS.pad_multiple):
    logits = predict_fn(params, jnp.asarray(batch["ids"]), jnp.asarray(batch["lengths"]))
    best = np.asarray(jnp.argmax(logits, axis=-1))
    predicted.extend(best[row, :length] for row, length in enumerate(batch["lengths"]) if batch["valid"][row])
  return predicted


def score(predict_fn, params, split, tag_names) -> dict:
  """NER: entity P/R/F1 (+ per type) and token accuracy; POS: token accuracy."""
  words, tags, _ = split
  predicted = predict_tags(predict_fn, params, words, tags)
  true_names = [[tag_names[i] for i in t] for t in tags]
  predicted_names = [[tag_names[i] for i in p] for p in predicted]
  result = {"token_accuracy": metrics.token_accuracy(true_names, predicted_names)}
  if FLAGS.task == "ner":
    entities = metrics.entity_scores(true_names, predicted_names)
    result.update({k: entities[k] for k in ("precision", "recall", "f1")})
    result["per_type"] = {t: {k: v[k] for k in ("precision", "recall", "f1", "true")}
                          for t, v in entities["per_type"].items()}
  return result


def write_predictions(path: str, split, predicted, tag_names) -> None:
  """conlleval's input: one "token gold predicted" line per token, a blank line between sentences."""
  _, tags, sentences = split
  with open(path, "w") as handle:
    for sentence, gold, guess in zip(sentences, tags, predicted):
      for token, g, p in zip(sentence.tokens, gold, guess):
        handle.write(f"{token} {tag_names[g]} {tag_names[p]}\n")
      handle.write("\n")


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  if FLAGS.smoke:
    FLAGS.embed_size, FLAGS.hidden_size, FLAGS.batch_size, FLAGS.pad_multiple = 16, 16, 32, 128
  config = train.script_flag_values()
  run = train.RunDir(FLAGS.workdir, config)
  data, vocab, singletons, tag_names = load_data()
  logging.info("CoNLL-2003 %s: sentences %s, vocabulary %d words, %d tags", FLAGS.task,
               {k: len(v[0]) for k, v in data.items()}, len(vocab), len(tag_names))
  model = SequenceTagger(vocab_size=len(vocab), num_tags=len(tag_names), embed_size=FLAGS.embed_size,
                         hidden_size=FLAGS.hidden_size, num_layers=FLAGS.num_layers, dropout=FLAGS.dropout)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(FLAGS.seed))
  optimizer = train.optimizer_from_flags()
  state = train.create_train_state(model.init(init_key), optimizer, train_key)
  words, tags, _ = data["train"]
  stream = SentenceBatches(words, tags, FLAGS.batch_size, seed=FLAGS.seed, pad_multiple=FLAGS.pad_multiple,
                           pool_batches=20)
  num_steps = 8 if FLAGS.smoke else FLAGS.epochs * stream.batches_per_epoch
  steps_per_epoch = min(stream.batches_per_epoch, num_steps)
  best_metric = "f1" if FLAGS.task == "ner" else "token_accuracy"
  checkpoints = CheckpointManager(run.path("checkpoints"), keep=FLAGS.keep, best_metric=best_metric,
                                  best_mode="max")
  state, start_step = train.resume_or_refuse(checkpoints, state, run, FLAGS.resume, stream)
  train_step = train.make_train_step(make_loss_fn(model, singletons, vocab.unk_id), optimizer)
  predict_fn = jax.jit(lambda params, ids, lengths: model(params, ids, lengths))

  def evaluate(state):
    scores = score(predict_fn, state.params, data["valid"], tag_names)
    scores.pop("per_type", None)
    return scores

  mean_tokens = float(np.mean([len(w) for w in words]))
  train.fit(state, train_step, stream, num_steps=num_steps, run=run, start_step=start_step,
            evaluate=evaluate, eval_every=steps_per_epoch, checkpoints=checkpoints,
            checkpoint_every=steps_per_epoch, best_metric=best_metric,
            log_every=min(FLAGS.log_every, num_steps),
            tokens_per_step=int(FLAGS.batch_size * mean_tokens), progress=not FLAGS.smoke)
  best_step = checkpoints.best_step()
  best_state, _ = checkpoints.restore(state, step=best_step)
  valid = score(predict_fn, best_state.params, data["valid"], tag_names)
  test = score(predict_fn, best_state.params, data["test"], tag_names)
  write_predictions(run.path("test_predictions.txt"), data["test"],
                    predict_tags(predict_fn, best_state.params, *data["test"][:2]), tag_names)
  results = {"task": FLAGS.task, "best_step": best_step, "steps": num_steps, "valid": valid, "test": test,
             "vocab_size": len(vocab), "tags": list(tag_names),
             "sentences": {k: len(v[0]) for k, v in data.items()}}
  if FLAGS.task == "ner":
    results["published"] = PUBLISHED
    print(f"CoNLL-2003 NER test: precision {100 * test['precision']:.2f} recall {100 * test['recall']:.2f} "
          f"F1 {100 * test['f1']:.2f}  (valid F1 {100 * valid['f1']:.2f}; published {PUBLISHED['test_f1']} "
          f"from {PUBLISHED['source']})")
  else:
    print(f"CoNLL-2003 POS test token accuracy {100 * test['token_accuracy']:.2f} "
          f"(valid {100 * valid['token_accuracy']:.2f})")
  run.finish(results)
  checkpoints.close()


if __name__ == "__main__":
  app.run(main)
