"""Many-to-many with T_x != T_y: an encoder-decoder translates, scored by corpus BLEU.

  python experiments/translate.py --workdir=/tmp/translate_dates                   # dates, Cho et al. GRU
  python experiments/translate.py --model=sutskever --workdir=/tmp/dates_sutskever # reversed source, LSTM
  python experiments/translate.py --dataset=bible --workdir=/tmp/translate_bible   # KJV -> Reina-Valera
  python experiments/translate.py --smoke --workdir=/tmp/smoke                     # seconds, same code path

Models (rnn_jax.seq2seq): "cho" (Cho et al. 2014; the context c conditions every decoder
step and the read-out; GRU by default) and "sutskever" (Sutskever et al. 2014; c is the
encoder's final state, the source is read reversed; LSTM by default). Training is
teacher forcing with Adam and global-norm clipping through rnn_jax.train; the best
checkpoint on validation loss is decoded greedily and with beam search.

BLEU: sacrebleu corpus BLEU-4 on our lower-cased word tokens (tokenize="none"), the
references being the real tokens (never <unk>). For dates the target tokens are the
characters of the ISO date, so that BLEU is character BLEU; exact match is reported too.

Outputs in --workdir: results.json, metrics.jsonl, curves.png, checkpoints/, vocab.json,
samples.txt (sample translations) and test_translations.tsv (every test sentence).
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from rnn_jax import cells, metrics, runtime, seq2seq, train
from rnn_jax.checkpoint import CheckpointManager
from rnn_jax.data import translation
from rnn_jax.layers import check_token_ids

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "dates", ["dates", "bible"],
                  "Built-in synthetic dates, or the Bible (en -> es).")
flags.DEFINE_enum("model", "cho", list(seq2seq.KINDS), "Cho et al. 2014 or Sutskever et al. 2014.")
flags.DEFINE_enum("cell", None, ["elman", "lstm", "gru"], "Recurrent cell (default: gru for cho, lstm for "
                  "sutskever).")
flags.DEFINE_integer("embed_size", 64, "Embedding size E (source and target).")
flags.DEFINE_integer("hidden_size", None, "Hidden size H (default: 128).")
flags.DEFINE_integer("num_layers", 1, "Stacked layers in encoder and decoder.")
flags.DEFINE_float("dropout", 0.0, "Dropout between stacked layers (training only).")
flags.DEFINE_integer("vocab_size", 4000, "Bible: most frequent training tokens kept per language (incl. "
                     "<pad>, <bos>, <eos>, <unk>).")
flags.DEFINE_integer("max_len", 20, "Bible: keep verse pairs with at most this many tokens on each side.")
flags.DEFINE_integer("num_train", 20000, "Dates: training pairs generated (valid and test: 1000 each).")
flags.DEFINE_integer("batch_size", 64, "Pairs per training batch.")
flags.DEFINE_integer("steps", None, "Training steps (default: 2500 for dates, 2000 for bible).")
train.define_optimizer_flags(learning_rate=2e-3, clip=1.0)
flags.DEFINE_integer("beam_width", 4, "Beam width K for beam-search decoding.")
flags.DEFINE_float("length_penalty", 0.6, "Beam search picks argmax score / length ** length_penalty.")
flags.DEFINE_integer("decode_extra", 10, "Decode at most (longest reference + decode_extra) tokens.")
flags.DEFINE_integer("eval_every", 500, "Steps between validations (teacher-forced loss and greedy BLEU).")
flags.DEFINE_integer("eval_bleu_examples", 200,
                     "Validation pairs decoded for the BLEU logged during training.")
flags.DEFINE_integer("num_samples", 10, "Sample translations printed and saved.")
flags.DEFINE_integer("pad_multiple", 8, "Batch widths are rounded up to a multiple of this (fewer compiles).")
flags.DEFINE_integer("log_every", 50, "Steps between train log lines.")
flags.DEFINE_integer("keep", 2, "Checkpoints kept (plus the best on validation loss).")
flags.DEFINE_integer("seed", 0, "Seed of the dates data, the init, dropout and the batch order.")
flags.DEFINE_string("data_dir", None, "Cache directory of the exported Bible (default ~/.cache/rnn_jax).")
flags.DEFINE_string("workdir", "/tmp/rnn_jax/translate", "Output directory.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
flags.DEFINE_bool("smoke", False, "Seconds-long run of the same code path on a small subset.")

DEFAULTS = {"dates": {"hidden_size": 128, "steps": 2500}, "bible": {"hidden_size": 128, "steps": 2000}}


def resolve_flags() -> None:
  """Fill the dataset- and model-dependent defaults; shrink everything for --smoke."""
  for name, value in DEFAULTS[FLAGS.dataset].items():
    if getattr(FLAGS, name) is None:
      setattr(FLAGS, name, value)
  if FLAGS.cell is None:
    FLAGS.cell = "gru" if FLAGS.model == "cho" else "lstm"
  if FLAGS.smoke:
    FLAGS.embed_size, FLAGS.hidden_size, FLAGS.batch_size, FLAGS.pad_multiple = 16, 32, 16, 32
    if not FLAGS["steps"].present:
      FLAGS.steps = 12
    FLAGS.eval_every, FLAGS.log_every, FLAGS.eval_bleu_examples, FLAGS.num_samples = 6, 6, 16, 3
    FLAGS.num_train, FLAGS.vocab_size, FLAGS.max_len = 200, 300, 12
  for name in ("steps", "batch_size", "hidden_size", "embed_size", "beam_width", "eval_every"):
    if getattr(FLAGS, name) < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")


def load_pairs() -> dict[str, list[translation.Pair]]:
  """Token pairs per split for --dataset (a small subset with --smoke)."""
  if FLAGS.dataset == "dates":
    sizes = (FLAGS.num_train, 40, 40) if FLAGS.smoke else (FLAGS.num_train, 1000, 1000)
    return translation.dates_dataset(*sizes, seed=FLAGS.seed)
  splits = translation.bible_dataset(FLAGS.data_dir, max_len=FLAGS.max_len)
  if FLAGS.smoke:
    splits = {"train": splits["train"][:300], "valid": splits["valid"][:40], "test": splits["test"][:40]}
  return splits


def build_model(source_vocab_size: int, target_vocab_size: int) -> seq2seq.Seq2Seq:
  return seq2seq.Seq2Seq(
      kind=FLAGS.model, cell=cells.make_cell(FLAGS.cell, FLAGS.hidden_size),
      source_vocab_size=source_vocab_size, target_vocab_size=target_vocab_size,
      embed_size=FLAGS.embed_size, num_layers=FLAGS.num_layers, dropout=FLAGS.dropout,
      bos_id=translation.BOS_ID, eos_id=translation.EOS_ID, pad_id=translation.PAD_ID)


def make_loss_fn(model: seq2seq.Seq2Seq):
  """loss_fn(params, batch, rng) -> (mean cross-entropy per target token, {})."""

  def loss_fn(params, batch, rng):
    return model.loss(params, batch, train=True, dropout_key=rng, reduction="mean"), {}

  return loss_fn


def teacher_forced_nats(loss_fn, params, batches) -> float:
  """Cross-entropy per target token (incl. <eos>) over a whole split, in nats."""
  total = tokens = 0.0
  for _, batch in batches:
    count = float(np.sum(batch.target_lengths))
    total += float(loss_fn(params, batch)) * count
    tokens += count
  return total / tokens


def translate_split(decode_fn, params, batches, num_pairs: int) -> list[list[int]]:
  """Decode every pair of a split; returns each pair's output ids without <eos>, in split order."""
  outputs: list = [None] * num_pairs
  for indices, batch in batches:
    tokens, lengths = decode_fn(params, jnp.asarray(batch.source), jnp.asarray(batch.source_lengths))[:2]
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    for row, index in enumerate(indices):
      ids = tokens[row, :lengths[row]].tolist()
      outputs[index] = ids[:-1] if ids and ids[-1] == translation.EOS_ID else ids
  return outputs


def score(hypotheses: list[list[str]], pairs) -> dict:
  """Corpus BLEU on space-joined tokens (tokenize="none") and the exact-match rate."""
  references = [list(p.target) for p in pairs]
  bleu = metrics.corpus_bleu([" ".join(h) for h in hypotheses], [" ".join(r) for r in references],
                             tokenize="none")
  exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
  return {"bleu": bleu["bleu"], "bleu_precisions": bleu["precisions"], "brevity_penalty":
          bleu["brevity_penalty"], "exact_match": exact, "bleu_signature": bleu["signature"]}


def main(argv):
  del argv
  runtime.retain_freed_memory()  # before any JAX computation (rnn_jax/runtime.py)
  resolve_flags()
  config = train.script_flag_values()
  pairs = load_pairs()
  source_vocab = translation.build_vocabulary([p.source for p in pairs["train"]],
                                              FLAGS.vocab_size if FLAGS.dataset == "bible" else None)
  target_vocab = translation.build_vocabulary([p.target for p in pairs["train"]],
                                              FLAGS.vocab_size if FLAGS.dataset == "bible" else None)
  encoded = {name: translation.encode_pairs(split, source_vocab, target_vocab)
             for name, split in pairs.items()}
  for name, (sources, targets) in encoded.items():
    check_token_ids(np.concatenate(sources), len(source_vocab), f"{name} source ids")
    check_token_ids(np.concatenate(targets), len(target_vocab), f"{name} target ids")
  logging.info("%s: %s pairs (train/valid/test), vocabularies %d -> %d", FLAGS.dataset,
               [len(pairs[s]) for s in translation.SPLITS], len(source_vocab), len(target_vocab))

  model = build_model(len(source_vocab), len(target_vocab))
  init_key, train_key = jax.random.split(jax.random.PRNGKey(FLAGS.seed))
  optimizer = train.optimizer_from_flags()
  state = train.create_train_state(model.init(init_key), optimizer, train_key)
  num_params = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
  batch_size = min(FLAGS.batch_size, len(pairs["train"]))
  stream = translation.PairBatches(*encoded["train"], batch_size, seed=FLAGS.seed,
                                   pad_multiple=FLAGS.pad_multiple)
  run = train.RunDir(FLAGS.workdir, {**config, "num_params": num_params,
                                     "pairs": {s: len(pairs[s]) for s in translation.SPLITS},
                                     "source_vocab": len(source_vocab), "target_vocab": len(target_vocab)})
  run.write_text("vocab.json", json.dumps({"source": source_vocab.tokens, "target": target_vocab.tokens}))
  checkpoints = CheckpointManager(run.path("checkpoints"), keep=FLAGS.keep, best_metric="loss")
  state, start_step = train.resume_or_refuse(checkpoints, state, run, FLAGS.resume, stream)

  loss_fn = make_loss_fn(model)
  train_step = train.make_train_step(loss_fn, optimizer)
  eval_loss = jax.jit(lambda params, batch: model.loss(params, batch, reduction="mean"))
  decode_len = max(len(p.target) for split in pairs.values() for p in split) + FLAGS.decode_extra
  greedy = jax.jit(functools.partial(model.greedy_decode, max_len=decode_len))
  beam = jax.jit(functools.partial(model.beam_search, max_len=decode_len, beam_width=FLAGS.beam_width,
                                   length_penalty=FLAGS.length_penalty))
  eval_batches = {name: translation.evaluation_pair_batches(*encoded[name], FLAGS.batch_size,
                                                            FLAGS.pad_multiple)
                  for name in ("valid", "test")}
  bleu_subset = min(FLAGS.eval_bleu_examples, len(pairs["valid"]))
  subset_batches = translation.evaluation_pair_batches(
      encoded["valid"][0][:bleu_subset], encoded["valid"][1][:bleu_subset], FLAGS.batch_size,
      FLAGS.pad_multiple)
  target_tokens = lambda outputs: [[target_vocab.tokens[i] for i in ids] for ids in outputs]

  def validate(state) -> dict:
    nats = teacher_forced_nats(eval_loss, state.params, eval_batches["valid"])
    hypotheses = target_tokens(translate_split(greedy, state.params, subset_batches, bleu_subset))
    scores = score(hypotheses, pairs["valid"][:bleu_subset])
    return {"loss": nats, "perplexity": float(np.exp(nats)), "greedy_bleu": scores["bleu"],
            "greedy_exact_match": scores["exact_match"]}

  tokens_per_step = batch_size * float(np.mean([len(t) + 1 for t in encoded["train"][1]]))
  started = time.time()
  outcome = train.fit(state, train_step, stream, num_steps=FLAGS.steps, run=run, start_step=start_step,
                      evaluate=validate, eval_every=FLAGS.eval_every, checkpoints=checkpoints,
                      checkpoint_every=FLAGS.eval_every, best_metric="loss",
                      log_every=min(FLAGS.log_every, FLAGS.steps), tokens_per_step=tokens_per_step,
                      progress=not FLAGS.smoke)
  train_seconds = time.time() - started
  best_step = checkpoints.best_step()
  best_state, _ = checkpoints.restore(state, step=best_step)
  params = best_state.params

  results = {"dataset": FLAGS.dataset, "model": FLAGS.model, "cell": FLAGS.cell, "best_step": best_step,
             "steps": outcome.step, "train_seconds_this_process": train_seconds, "num_params": num_params,
             "decode_max_len": decode_len}
  sentence_sep = "" if FLAGS.dataset == "dates" else " "
  decoded = {}
  for name in ("valid", "test"):
    nats = teacher_forced_nats(eval_loss, params, eval_batches[name])
    results[f"{name}_loss"], results[f"{name}_perplexity"] = nats, float(np.exp(nats))
    for method, decode_fn in (("greedy", greedy), ("beam", beam)):
      decode_started = time.time()
      hypotheses = target_tokens(translate_split(decode_fn, params, eval_batches[name], len(pairs[name])))
      scores = score(hypotheses, pairs[name])
      results.update({f"{name}_{method}_{key}": value for key, value in scores.items()})
      results[f"{name}_{method}_seconds"] = time.time() - decode_started
      decoded[(name, method)] = hypotheses
  run.log(outcome.step, "test", **{k: v for k, v in results.items()
                                   if k.startswith("test_") and isinstance(v, float)})

  lines = []
  for pair, greedy_out, beam_out in list(zip(pairs["test"], decoded[("test", "greedy")],
                                             decoded[("test", "beam")])):
    lines.append("\t".join([pair.reference, " ".join(pair.source), sentence_sep.join(pair.target),
                            sentence_sep.join(greedy_out), sentence_sep.join(beam_out)]))
  header = "reference\tsource\ttarget\tgreedy\tbeam\n"
  run.write_text("test_translations.tsv", header + "\n".join(lines) + "\n")
  samples = []
  for pair, greedy_out, beam_out in list(zip(pairs["test"], decoded[("test", "greedy")],
                                             decoded[("test", "beam")]))[:FLAGS.num_samples]:
    samples.append(f"{pair.reference + ': ' if pair.reference else ''}source : {' '.join(pair.source)}\n"
                   f"  target : {sentence_sep.join(pair.target)}\n"
                   f"  greedy : {sentence_sep.join(greedy_out)}\n"
                   f"  beam {FLAGS.beam_width} : {sentence_sep.join(beam_out)}")
  samples_text = "\n".join(samples)
  run.write_text("samples.txt", samples_text + "\n")
  print(samples_text)
  run.finish(results)
  checkpoints.close()
  print(f"translate {FLAGS.dataset} {FLAGS.model} ({FLAGS.cell}): test BLEU greedy "
        f"{results['test_greedy_bleu']:.2f}, beam {FLAGS.beam_width} {results['test_beam_bleu']:.2f}; "
        f"exact match greedy {results['test_greedy_exact_match']:.3f}, beam "
        f"{results['test_beam_exact_match']:.3f}; test loss {results['test_loss']:.3f} nats/token")


if __name__ == "__main__":
  app.run(main)
