"""Multi-task sequence-to-sequence learning: translation with auxiliary autoencoders (Luong et al. 2015).

  python experiments/multitask.py --preset=bible                      # en->es + en->en (one-to-many)
  python experiments/multitask.py --preset=bible --auxiliary_weight=0 # the single-task baseline
  python experiments/multitask.py --preset=bible --setting=many_to_many   # + es->es
  python experiments/multitask.py --preset=bible --setting=many_to_one    # en->es + es->es
  python experiments/multitask.py                                     # dates: words -> ISO + ISO autoencoder
  python experiments/multitask.py --smoke --workdir=/tmp/smoke        # seconds, same code path

Luong, Le, Sutskever, Vinyals & Kaiser 2015, "Multi-task sequence to sequence learning"
(arXiv:1511.06114): tasks share encoders and decoders (rnn_jax.multitask). Each task here is an
encoder-decoder of rnn_jax.seq2seq (Cho et al. 2014 by default, or Sutskever et al. 2014 with
--model=sutskever, with any --attention), its params assembled from the named encoder and decoder
it uses. The main task translates the source language into the target language (Bible: KJV
English -> Reina-Valera 1909 Spanish, "en_es"; dates: English words -> ISO characters,
"words_iso"); the auxiliary tasks are autoencoders of the same training verses:

  one_to_many   en_es (weight 1) + en_en (weight a): one encoder "en", decoders "es" and "en"
  many_to_one   en_es (weight 1) + es_es (weight a): encoders "en" and "es", one decoder "es"
  many_to_many  en_es (weight 1) + en_en (a) + es_es (a): two encoders, two decoders

a = --auxiliary_weight. Every training step trains one task, drawn with probability w_k / sum_j w_j
(seeded by --seed: reproducible and resumed exactly), on that task's next minibatch. a = 0 never
draws an auxiliary task: it is the single-task baseline, whose translation trajectory is the one
a model with the translation task alone would follow (same initialisation, data order and dropout).

Budget: --steps counts training steps of all tasks together, so at the same --steps a run with
a > 0 trains on about 1 / (1 + a) (one_to_many, many_to_one) or 1 / (1 + 2a) (many_to_many) as
many translation minibatches as the baseline; results.json records every task's minibatches.

Each validation logs, per task with a positive weight, the teacher-forced loss on the whole valid
split ("<task>_loss", nats per target token) and the greedy BLEU of its first valid_bleu_pairs
pairs ("<task>_bleu"); training logs each task's mean loss and share of the steps. The best
checkpoint on the translation task's valid loss is decoded greedily (every task) and with beam
search (the translation task) on all of valid and test. BLEU: corpus BLEU-4 via sacrebleu on our
lower-cased tokens, as a fraction 0..1 (as experiments/translate.py).

Outputs in --workdir: config.json, metrics.jsonl, results.json (per task: losses, BLEU, the
minibatches it trained on; the translation task's figures also at the top level), curves.png (all
tasks), curves_<task>.png (one per task), checkpoints/ (every encoder and decoder, the optimiser,
each task's data position and the task draw count), model.json, <language>_vocab.json,
samples.txt (test samples of every task) and test_translations.tsv (the translation task).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

if __package__:
  from experiments import common, translate
else:  # run as a script: experiments/ is on sys.path
  import common
  import translate
from rnn_jax import attention, cells, metrics, multitask, plots, seq2seq
from rnn_jax.config import field
from rnn_jax.data import translation
from rnn_jax.layers import check_token_ids
from rnn_jax.rundir import RunDir, RunOptions
from rnn_jax.train import train_and_test

SETTINGS = ("one_to_many", "many_to_one", "many_to_many")
LANGUAGES = {"bible": ("en", "es"), "dates": ("words", "iso")}   # (source, target) language of each corpus


@dataclasses.dataclass(frozen=True)
class Config(translate.EncoderDecoderConfig):
  """multitask: translation plus autoencoders sharing its encoder and/or decoder, Adam with clipping."""
  setting: str = field("one_to_many", "Tasks: one_to_many (translation + source autoencoder, one shared "
                       "encoder), many_to_one (translation + target autoencoder, one shared decoder) or "
                       "many_to_many (both autoencoders).", choices=SETTINGS, fixed=True)
  auxiliary_weight: float = field(0.1, "Mixing weight a of each autoencoder task (the translation task has "
                                  "1): a step trains a task with probability w_k / sum_j w_j; 0 is the "
                                  "single-task baseline.", minimum=0.0, fixed=True)
  beam_size: int = field(4, "Beam size K of the beam-search decoding of the translation task on valid and "
                         "test (1 is greedy).", minimum=1)
  valid_bleu_pairs: int = field(200, "Validation pairs decoded greedily for each task's BLEU at each "
                                "validation.", minimum=1)
  num_samples: int = field(5, "Test samples of each task printed and saved in samples.txt.", minimum=0)


PRESETS = {
    # translate.py --preset=bible's model and data (Cho GRU 128, E=64, 4000 tokens, verses <= 20 tokens).
    "bible": translate.BIBLE,
    "bible_many_to_many": dict(translate.BIBLE, setting="many_to_many"),
}
SMOKE = dict(translate.ENCODER_DECODER_SMOKE, num_samples=2, auxiliary_weight=0.5)


def task_registry(setting: str, source: str, target: str, auxiliary_weight: float) -> tuple:
  """The tasks of a setting: the translation source_target (weight 1) and the autoencoders (weight a)."""
  if setting not in SETTINGS:
    raise ValueError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
  tasks = [multitask.Task(f"{source}_{target}", source, target, 1.0)]
  if setting in ("one_to_many", "many_to_many"):
    tasks.append(multitask.Task(f"{source}_{source}", source, source, auxiliary_weight))
  if setting in ("many_to_one", "many_to_many"):
    tasks.append(multitask.Task(f"{target}_{target}", target, target, auxiliary_weight))
  return tuple(tasks)


def build_model(config: Config, vocab_sizes: dict) -> multitask.MultiTaskSeq2Seq:
  """The setting's tasks over encoders and decoders named by language, with the architecture of translate.py."""
  source, target = LANGUAGES[config.dataset]
  tasks = task_registry(config.setting, source, target, config.auxiliary_weight)
  architecture = seq2seq.Seq2Seq(
      kind=config.model, cell=cells.make_cell(config.cell_name, config.hidden_size),
      source_vocab_size=vocab_sizes[source], target_vocab_size=vocab_sizes[target],
      embed_size=config.embed_size, num_layers=config.num_layers, dropout=config.dropout,
      bos_id=translation.BOS_ID, eos_id=translation.EOS_ID, pad_id=translation.PAD_ID,
      attention=config.attention, input_feeding=config.input_feeding and config.attention in attention.LUONG)
  encoders = tuple(multitask.Component(name, vocab_sizes[name]) for name in dict.fromkeys(t.encoder for t in tasks))
  decoders = tuple(multitask.Component(name, vocab_sizes[name]) for name in dict.fromkeys(t.decoder for t in tasks))
  return multitask.MultiTaskSeq2Seq(architecture, encoders, decoders, tasks)


def task_pairs(pairs: dict, task: multitask.Task, source: str) -> dict:
  """Each split's pairs of a task: the translation pairs, or an autoencoder's (sentence, same sentence)."""
  if task.encoder != task.decoder:
    return pairs
  side = (lambda p: p.source) if task.encoder == source else (lambda p: p.target)
  return {split: [translation.Pair(side(p), side(p), p.reference) for p in items] for split, items in pairs.items()}


def _samples(config: Config, name: str, pairs, decoded: dict, separators) -> list[str]:
  lines = []
  for index, pair in enumerate(pairs[:config.num_samples]):
    reference = f"{pair.reference}: " if pair.reference else ""
    lines.append(f"[{name}] {reference}source : {separators[0].join(pair.source)}\n"
                 f"  target : {separators[1].join(pair.target)}\n" +
                 "\n".join(f"  {method} : {separators[1].join(tokens[index])}" for method, tokens in decoded.items()))
  return lines


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train the tasks into ``workdir``, decode valid and test per task, and return results.json's content."""
  options = options or RunOptions()
  source, target = LANGUAGES[config.dataset]
  pairs, pair_vocabularies = translate.load_corpus(config)
  vocabularies = dict(zip((source, target), pair_vocabularies))
  separators = {source: " ", target: translation.TARGET_SEPARATORS[config.dataset]}
  model = build_model(config, {name: len(v) for name, v in vocabularies.items()})
  main = model.tasks[0].name
  active = [t for t in model.tasks if t.weight > 0]   # tasks that train (and are evaluated)

  data, encoded = {}, {}
  for task in model.tasks:
    data[task.name] = task_pairs(pairs, task, source)
    model.check_vocabularies(task.name, len(vocabularies[task.encoder]), len(vocabularies[task.decoder]))
    encoded[task.name] = {split: translation.encode_pairs(items, vocabularies[task.encoder],
                                                          vocabularies[task.decoder])
                          for split, items in data[task.name].items()}
    for split, (sources, targets) in encoded[task.name].items():
      check_token_ids(np.concatenate(sources), len(vocabularies[task.encoder]), f"{task.name} {split} source ids")
      check_token_ids(np.concatenate(targets), len(vocabularies[task.decoder]), f"{task.name} {split} target ids")

  label = f"multitask {config.setting} a={config.auxiliary_weight:g} {config.model} {config.cell_name}"
  run = RunDir(workdir, "multitask", config, options, label=label)
  for split, (sources, targets) in encoded[main].items():   # the autoencoders read the same sentences
    run.check_data(f"{config.dataset} {split}", sources, targets)
  vocab_files = {name: f"{name}_vocab.json" for name in vocabularies}
  for name, vocabulary in vocabularies.items():
    run.check_vocabulary(vocabulary.tokens, vocab_files[name])
    run.write_json(vocab_files[name], {"tokens": vocabulary.tokens})
  decode_len = {task.name: max(len(p.target) for split in data[task.name].values() for p in split) + 1 +
                config.decode_extra_tokens for task in model.tasks}
  run.save_model(model, best_metric=f"{main}_loss", best_mode="min", dataset=config.dataset,
                 vocabularies=vocab_files, separators=separators, decode_max_len=decode_len)
  params = model.init(jax.random.PRNGKey(config.seed))
  num_params = seq2seq.num_params(params)
  logging.info("%s: tasks %s (probabilities %s), %s pairs (train/valid/test), vocabularies %s, %d params", label,
               list(model.task_names), np.round(model.probabilities, 4).tolist(),
               [len(pairs[s]) for s in translation.SPLITS], {k: len(v) for k, v in vocabularies.items()}, num_params)

  streams = {task.name: translation.PairBatches(*encoded[task.name]["train"], config.batch_size,
                                                seed=config.seed + 7919 * index, pad_multiple=config.pad_multiple)
             for index, task in enumerate(model.tasks)}
  stream = multitask.MultiTaskBatches(model, streams, seed=config.seed)
  eval_batches = {task.name: {split: translation.evaluation_pair_batches(*encoded[task.name][split],
                                                                         config.batch_size, config.pad_multiple)
                              for split in ("valid", "test")} for task in active}
  bleu_pairs = min(config.valid_bleu_pairs, len(pairs["valid"]))

  def decode(params, name, split, beam_size, count=None):
    tokens = vocabularies[model.task(name).decoder].tokens
    outputs = seq2seq.decode_sources(model.task_model(name), model.task_params(params, name),
                                     encoded[name][split][0][:count], max_len=decode_len[name],
                                     beam_size=beam_size, length_penalty=config.length_penalty,
                                     batch_size=config.batch_size, pad_multiple=config.pad_multiple)
    return [[tokens[i] for i in ids] for ids in outputs]

  def references(name, split, count=None):
    return [p.target for p in data[name][split][:count]]

  def validate(params, split):
    """Per task: teacher-forced loss on the whole split, greedy BLEU and exact match on its first pairs."""
    out = {}
    for task in active:
      scores = metrics.translation_scores(decode(params, task.name, split, 1, bleu_pairs),
                                          references(task.name, split, bleu_pairs))
      out[f"{task.name}_loss"] = seq2seq.corpus_loss(model.task_model(task.name),
                                                     model.task_params(params, task.name),
                                                     eval_batches[task.name][split])
      out[f"{task.name}_bleu"] = scores["bleu"]
    return out

  steps_per_epoch = max(1, len(pairs["train"]) // config.batch_size)
  tokens_per_step = int(config.batch_size * np.mean([len(t) + 1 for t in encoded[main]["train"][1]]))
  outcome = train_and_test(run, config, params=params, loss_fn=multitask.make_loss_fn(model), stream=stream,
                           steps_per_epoch=steps_per_epoch, evaluate=validate, best_metric=f"{main}_loss",
                           splits=(), tokens_per_step=tokens_per_step,
                           train_summary=multitask.per_task_summary(model.task_names), progress=options.progress)

  results = {**outcome.results, "dataset": config.dataset, "setting": config.setting,
             "mixing_setting": multitask.setting_of(model), "main_task": main, "model": config.model,
             "cell": config.cell_name, "attention": config.attention, "num_params": num_params,
             "shared": multitask.shared_components(model),
             "pairs": {s: len(pairs[s]) for s in translation.SPLITS},
             "vocab_sizes": {k: len(v) for k, v in vocabularies.items()}, "valid_bleu_pairs": bleu_pairs,
             "bleu_unit": "fraction (sacrebleu score / 100), tokenize=none on our tokens", "tasks": {}}
  samples, test_decoded = [], {}
  for task in active:
    translating = task.encoder != task.decoder
    summary = {"encoder": task.encoder, "decoder": task.decoder, "weight": task.weight,
               "probability": float(model.probabilities[model.task_index(task.name)]),
               "minibatches": stream.counts[task.name], "decode_max_len": decode_len[task.name]}
    methods = (("greedy", 1), ("beam", config.beam_size)) if translating else (("greedy", 1),)
    for split in ("valid", "test"):
      split_metrics = {"loss": seq2seq.corpus_loss(model.task_model(task.name),
                                                   model.task_params(outcome.params, task.name),
                                                   eval_batches[task.name][split])}
      decoded = {}
      for method, beam_size in methods:
        decoded[method] = decode(outcome.params, task.name, split, beam_size)
        scores = metrics.translation_scores(decoded[method], references(task.name, split))
        split_metrics.update({f"{method}_bleu": scores["bleu"], f"{method}_exact_match": scores["exact_match"],
                              f"{method}_brevity_penalty": scores["brevity_penalty"]})
        results["bleu_signature"] = scores["signature"]
      summary.update({f"{split}_{k}": v for k, v in split_metrics.items()})
      if split == "test":
        run.log(outcome.step, "test", **{f"{task.name}_{k}": v for k, v in split_metrics.items()})
        samples += _samples(config, task.name, data[task.name]["test"], decoded,
                            (separators[task.encoder], separators[task.decoder]))
        if task.name == main:
          test_decoded = decoded
    results["tasks"][task.name] = summary
  results.update({k: v for k, v in results["tasks"][main].items() if k.startswith(("valid_", "test_"))})
  results["translation_minibatches"] = stream.counts[main]
  translate.write_test_translations(run, data[main]["test"], test_decoded, separators[target])
  run.write_text("samples.txt", "\n".join(samples) + "\n")
  print("\n".join(samples))

  title = (f"multitask {config.dataset} {config.setting}, auxiliary weight {config.auxiliary_weight:g}\n"
           f"{config.model} {config.num_layers}x{config.hidden_size} {config.cell_name}, E={config.embed_size}")
  labels = {"loss": "step's task: nats per token"}
  for task in active:
    labels[f"{task.name}_loss"] = f"{task.name}: nats per target token"
    labels[f"{task.name}_bleu"] = f"{task.name}: greedy BLEU (0-1)"
  plots.plot_run(run.workdir, title, metrics=["loss"] + [f"{t.name}_{m}" for m in ("loss", "bleu") for t in active],
                 labels=labels, final={f"{main} test BLEU greedy": results["test_greedy_bleu"],
                                       f"beam {config.beam_size}": results["test_beam_bleu"]})
  for task in active:
    task_final = {"test BLEU greedy": results["tasks"][task.name]["test_greedy_bleu"]}
    plots.plot_run(run.workdir, f"{title}\ntask {task.name} ({task.encoder} encoder -> {task.decoder} decoder, "
                   f"{stream.counts[task.name]} minibatches)", metrics=[f"{task.name}_loss", f"{task.name}_bleu"],
                   labels=labels, final=task_final, filename=f"curves_{task.name}.png")
  results = run.finish(results)
  print(f"{label} on {config.dataset}: {main} test BLEU (x100) greedy {100 * results['test_greedy_bleu']:.2f}, "
        f"beam {config.beam_size} {100 * results['test_beam_bleu']:.2f}; test loss {results['test_loss']:.3f} "
        f"nats per token (best step {results['best_step']} of {results['steps']}, "
        f"{results['translation_minibatches']} translation minibatches)")
  return results


EXPERIMENT = common.Experiment("multitask", Config, train_and_evaluate, PRESETS, SMOKE, __doc__)

if __name__ == "__main__":
  common.main(EXPERIMENT)
