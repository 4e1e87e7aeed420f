"""Many-to-many with T_x = T_y: a bidirectional LSTM tagger on CoNLL-2003 (NER, or POS with --task=pos).

  x_t = E[w_t] -> [->h_t ; <-h_t] (BiLSTM) -> U_t = W_hy [->h_t ; <-h_t] + b_y
  --output=softmax:  p(tag_t | w) = softmax(U_t), each tag the argmax of its own softmax
  --output=crf:      p(y | w) ∝ exp(sum_t U_t[y_t] + sum_{t>1} A[y_{t-1}, y_t] + s[y_1] + e[y_L]),
                     a linear-chain CRF decoded with Viterbi (rnn_jax.crf)

No pretrained embeddings, no character features. NER is scored by entity-level precision /
recall / F1 on the standard test set (conlleval's definition, rnn_jax.metrics.entity_scores);
POS by token accuracy. The checkpoint with the best validation score is the one tested.
Scores are fractions in every file; console summaries print percentages marked with %.

  python experiments/tagging.py                                    # NER, 10 epochs (~5 min on 2 cores)
  python experiments/tagging.py --task=pos                         # POS tags of the same sentences
  python experiments/tagging.py --output=crf                       # BiLSTM-CRF (Huang et al. 2015)
  python experiments/tagging.py --output=crf --transition_constraints=iob2   # + IOB2-valid paths only
  python experiments/tagging.py --preset=huang2015                 # H=300, SGD 0.1 as in the comparison
  python experiments/tagging.py --resume                           # continue a stopped run exactly
  python experiments/tagging.py --predict="EU rejects German call to boycott British lamb ."
  python experiments/tagging.py --predict=@sentences.txt           # one sentence per line, batched
  cat sentences.txt | python experiments/tagging.py --predict=-    # standard input, one per line

--predict prints one JSON line per sentence ({"text", "tagged": [[token, tag], ...], and for
NER "entities"}); it needs only the workdir (model.json, vocab.json, checkpoints), not the corpus.

Outputs in --workdir: config.json, metrics.jsonl, results.json (valid and test scores,
per-type NER scores, the published figure compared with), curves.png, test_predictions.txt
(token, gold, predicted: conlleval's input format), model.json, vocab.json, checkpoints/.

Published comparison (NER): Huang, Xu & Yu (2015), "Bidirectional LSTM-CRF Models for Sequence
Tagging", arXiv:1508.01991, Table 2, "Random" embeddings, on CoNLL-2003: BI-LSTM test F1 81.11%
(--output=softmax), BI-LSTM-CRF 84.26% (--output=crf). Like ours they have no character-level
network; unlike ours they also feed hand-made spelling and context features to the outputs
(their section 4.2).
"""

import dataclasses

import jax
import numpy as np
from absl import flags, logging

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import crf, load_run, metrics, plots, rundir, tagger
from rnn_jax import predict as predict_io
from rnn_jax.cells import make_cell
from rnn_jax.config import RegularizerConfig, TrainingConfig, field
from rnn_jax.data import conll
from rnn_jax.data.sentences import SentenceBatches
from rnn_jax.tagger import SequenceTagger
from rnn_jax.train import train_and_test

PUBLISHED = {
    "source": "Huang, Xu & Yu 2015, Bidirectional LSTM-CRF Models for Sequence Tagging (arXiv:1508.01991), "
              "Table 2, Random embeddings, BI-LSTM, CoNLL2003",
    "test_f1": 0.8111,
    "differences": "theirs also feeds spelling features (capitalisation, prefixes/suffixes, word patterns) "
                   "and word/POS/chunk n-gram context features directly to the outputs, H=300, SGD lr 0.1; "
                   "ours reads words only, H=100 per direction, dropout 0.5, Adam",
    "same": "randomly initialised word embeddings, no character-level features, softmax output (no CRF), "
            "bidirectional LSTM, standard CoNLL-2003 test set, entity-level F1",
}
PUBLISHED_LABEL = "Huang et al. 2015 BI-LSTM, test F1 0.811"
PUBLISHED_CRF = {
    "source": "Huang, Xu & Yu 2015, Bidirectional LSTM-CRF Models for Sequence Tagging (arXiv:1508.01991), "
              "Table 2, Random embeddings, BI-LSTM-CRF, CoNLL2003",
    "test_f1": 0.8426,
    "differences": "theirs also feeds spelling features (capitalisation, prefixes/suffixes, word patterns) "
                   "and word/POS/chunk n-gram context features directly to the outputs, H=300, SGD lr 0.1; "
                   "ours reads words only, H=100 per direction, dropout 0.5, Adam",
    "same": "randomly initialised word embeddings, no character-level features, a linear-chain CRF output "
            "with transition scores trained by the sentence-level log-likelihood and Viterbi decoding, "
            "bidirectional LSTM, standard CoNLL-2003 test set, entity-level F1",
}
PUBLISHED_CRF_LABEL = "Huang et al. 2015 BI-LSTM-CRF, test F1 0.843"


def published(output: str) -> tuple[dict, str]:
  """The published NER figure compared with, and its plot label, for a softmax or a CRF output."""
  return (PUBLISHED_CRF, PUBLISHED_CRF_LABEL) if output == "crf" else (PUBLISHED, PUBLISHED_LABEL)


@dataclasses.dataclass(frozen=True)
class Config(TrainingConfig, RegularizerConfig):
  """tagging: a 1x100 BiLSTM tagger (softmax or CRF output) with dropout 0.5 and singleton <unk> replacement,
  Adam, clip 5."""
  task: str = field("ner", "Column of CoNLL-2003 to predict: ner (entities) or pos (part of speech).",
                    choices=conll.TASKS, fixed=True)
  cell: str = field("lstm", "Recurrent cell of the bidirectional encoder.", choices=("lstm", "gru", "elman"),
                    fixed=True)
  embed_size: int = field(100, "Word embedding size D (randomly initialised).", minimum=1, fixed=True)
  hidden_size: int = field(100, "Hidden size H per direction.", minimum=1, fixed=True)
  num_layers: int = field(1, "Stacked bidirectional layers L.", minimum=1, fixed=True)
  output: str = field("softmax", "Output layer: softmax (an independent softmax per token, argmax tags) or crf "
                      "(a linear-chain CRF over the sentence's tags, trained by its log-likelihood, Viterbi "
                      "decoding).", choices=tagger.OUTPUTS, fixed=True)
  transition_constraints: str = field("none", "With output=crf: none, or iob2 (O -> I-X, B-X/I-X -> I-Y and a "
                                      "first I-X are forbidden, in training and decoding).",
                                      choices=tagger.TRANSITION_CONSTRAINTS, fixed=True)
  dropout: float = field(0.5, "Dropout on the embeddings and the BiLSTM outputs (Lample et al. 2016: 0.5).",
                         minimum=0.0, maximum=0.99)
  singleton_unk_rate: float = field(0.5, "Probability that a word seen once in train is read as <unk> "
                                    "during training.", minimum=0.0, maximum=1.0)
  pad_multiple: int = field(16, "Batch widths round up to a multiple of this (fewer compilations).",
                            minimum=1)
  train_sentences: int = field(0, "If > 0, train on the first train_sentences sentences only.", minimum=0,
                               fixed=True)
  eval_sentences: int = field(0, "If > 0, validate and test on the first eval_sentences sentences only.",
                              minimum=0, fixed=True)
  batch_size: int = 32
  epochs: float = 10.0
  learning_rate: float = 2e-3
  clip: float = 5.0

  def validate(self) -> None:
    super().validate()
    if self.transition_constraints != "none" and self.output != "crf":
      raise ValueError(f"transition_constraints={self.transition_constraints!r} needs output='crf', "
                       f"got output={self.output!r}")
    if self.transition_constraints == "iob2" and self.task != "ner":
      raise ValueError(f"transition_constraints='iob2' needs task='ner' (IOB2 entity tags), got "
                       f"task={self.task!r}")


PRESETS = {
    # The compared model's size and optimiser (Huang et al. 2015: H = 300, SGD with learning rate 0.1).
    "huang2015": dict(hidden_size=300, optimizer="sgd", learning_rate=0.1),
}
SMOKE = dict(embed_size=16, hidden_size=16, batch_size=32, pad_multiple=128, train_sentences=256,
             eval_sentences=128, steps=8, eval_every=4, log_every=2)


def best_metric(task: str) -> str:
  return "f1" if task == "ner" else "token_accuracy"


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train the tagger into ``workdir``, test its best checkpoint; returns results.json's content."""
  options = options or common.RunOptions()
  label = f"tagging {config.task}" + (" crf" if config.output == "crf" else "")
  data = conll.prepare_tagging(conll.load_conll2003(), config.task, train_sentences=config.train_sentences,
                               eval_sentences=config.eval_sentences)
  run = rundir.RunDir(workdir, "tagging", config, options, label=label)
  for name, (words, tags, _) in data.splits.items():  # the ids read; the vocabulary via save_model
    run.check_data(f"CoNLL-2003 {config.task} {name}", words, tags)
  run.check_data(f"CoNLL-2003 {config.task} tag names", list(data.tag_names))
  sizes = {name: len(split[0]) for name, split in data.splits.items()}
  model = SequenceTagger(vocab_size=len(data.vocab), num_tags=len(data.tag_names),
                         embed_size=config.embed_size, cell=make_cell(config.cell, config.hidden_size),
                         num_layers=config.num_layers, dropout=config.dropout, output=config.output,
                         transition_constraints=config.transition_constraints,
                         tag_names=tuple(data.tag_names), **config.regularizer_options())
  if config.transition_constraints == "iob2":
    allowed, allowed_start = crf.iob2_constraints(data.tag_names)
    for name, (_, split_tags, _) in data.splits.items():
      count = crf.count_forbidden(split_tags, allowed, allowed_start)
      if count:
        raise ValueError(f"transition_constraints='iob2': {count} {name} sentences have tag sequences that "
                         f"IOB2 forbids (I-X after O or after another type, or first); use "
                         f"transition_constraints='none'")
  metric = best_metric(config.task)
  run.save_model(model, data.vocab, best_metric=metric, best_mode="max", task=config.task,
                 tag_names=list(data.tag_names), pad_multiple=config.pad_multiple)
  words, tags, _ = data.splits["train"]
  stream = SentenceBatches(words, tags, config.batch_size, seed=config.seed, pad_multiple=config.pad_multiple,
                           pool_batches=20)
  params = model.init(jax.random.PRNGKey(config.seed))
  num_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  logging.info("%s: CoNLL-2003 sentences %s, vocabulary %d words, %d tags, %d params", label, sizes,
               len(data.vocab), len(data.tag_names), num_params)

  def evaluate(params, split):
    scores, _ = tagger.evaluate(model, params, *data.splits[split][:2], data.tag_names, task=config.task,
                                batch_size=config.batch_size, pad_multiple=config.pad_multiple)
    return scores

  outcome = train_and_test(
      run, config, params=params,
      loss_fn=tagger.make_loss_fn(model, data.singletons, data.vocab.unk_id, config.singleton_unk_rate),
      stream=stream, steps_per_epoch=stream.batches_per_epoch, evaluate=evaluate, best_metric=metric,
      best_mode="max", tokens_per_step=int(config.batch_size * np.mean([len(w) for w in words])),
      progress=options.progress)
  test_words, test_tags, test_sentences = data.splits["test"]
  _, predicted = tagger.evaluate(model, outcome.params, test_words, test_tags, data.tag_names,
                                 task=config.task, batch_size=config.batch_size,
                                 pad_multiple=config.pad_multiple)
  if run.primary:
    tagger.write_predictions(run.path("test_predictions.txt"), test_sentences, test_tags, predicted,
                             data.tag_names)
  results = {**outcome.results, "task": config.task, "num_params": num_params, "vocab_size": len(data.vocab),
             "tags": list(data.tag_names), "sentences": sizes}
  reference = None
  if config.task == "ner":
    true_names = [[data.tag_names[i] for i in t] for t in test_tags]
    results["test_per_type"] = tagger.per_type_scores(true_names,
                                                      [[data.tag_names[i] for i in p] for p in predicted])
    figure, figure_label = published(config.output)
    results.update(published_test_f1=figure["test_f1"], published_source=figure["source"], published=figure)
    reference = {"f1": (figure["test_f1"], figure_label)}
  results = run.finish(results)
  shown = ["loss", "f1", "token_accuracy", "grad_norm"] if config.task == "ner" else [
      "loss", "token_accuracy", "grad_norm"]
  final = ({"test F1": results["test_f1"]} if config.task == "ner"
           else {"test token accuracy": results["test_token_accuracy"]})
  final["at best step"] = results["best_step"]
  output = "CRF" if config.output == "crf" else "softmax"
  if config.transition_constraints != "none":
    output += f" ({config.transition_constraints.upper()}-constrained)"
  title = (f"tagging: CoNLL-2003 {config.task.upper()}, {config.num_layers}x{config.hidden_size} "
           f"bi-{config.cell} + {output}, D={config.embed_size}, dropout {config.dropout:g}"
           f"{config.regularizer_summary()}")
  loss_label = ("CRF NLL -log p(y|x) (nats per token)" if config.output == "crf"
                else "cross-entropy (nats per token)")
  plots.plot_run(run.workdir, title, metrics=shown, reference=reference, final=final,
                 labels={"loss": loss_label, "f1": "entity F1 (fraction)",
                         "token_accuracy": "token accuracy (fraction)", "grad_norm": "gradient norm ||g||"})
  if config.task == "ner":
    print(f"{label}: test precision {100 * results['test_precision']:.2f}% recall "
          f"{100 * results['test_recall']:.2f}% F1 {100 * results['test_f1']:.2f}% (valid F1 "
          f"{100 * results['valid_f1']:.2f}%, best step {results['best_step']} of {results['steps']}); "
          f"published test F1 {100 * figure['test_f1']:.2f}% (Huang et al. 2015, "
          f"{'BI-LSTM-CRF' if config.output == 'crf' else 'BI-LSTM'}, random embeddings)")
  else:
    print(f"{label}: test token accuracy {100 * results['test_token_accuracy']:.2f}% (valid "
          f"{100 * results['valid_token_accuracy']:.2f}%, best step {results['best_step']} of "
          f"{results['steps']})")
  return results


# ---------------------------------------------------------------------------
# --predict
# ---------------------------------------------------------------------------

def define_predict_flags(flag_values) -> None:
  """The flag of --predict, which tags sentences with a trained run instead of training."""
  common.define_input_flag(flag_values, "predict", "Tag sentences (one JSON line each)", "sentence")


def answer(text: str, tagged: list, task: str) -> dict:
  """The JSON line of one sentence: its tokens with their tags, and for NER its entities."""
  out = {"text": text, "tagged": [list(pair) for pair in tagged]}
  if task == "ner":
    tokens = [token for token, _ in tagged]
    spans = sorted(metrics.entity_spans([tag for _, tag in tagged]), key=lambda span: span[1])
    out["entities"] = [{"type": kind, "start": start, "end": end, "text": " ".join(tokens[start:end])}
                       for kind, start, end in spans]
  return out


def predict_mode(flag_values, workdir: str) -> bool:
  if flag_values.predict is None:
    return False
  texts = predict_io.read_texts(flag_values.predict)
  loaded = load_run(workdir)
  tagged = tagger.predict(loaded, texts, batch_size=int(loaded.config.get("batch_size", 32)))
  task = loaded.extra.get("task", "ner")
  predict_io.json_lines(answer(text, pairs, task) for text, pairs in zip(texts, tagged))
  return True


EXPERIMENT = common.Experiment("tagging", Config, train_and_evaluate, PRESETS, SMOKE, __doc__,
                               define_flags=define_predict_flags, infer=predict_mode)

if __name__ == "__main__":
  common.main(EXPERIMENT)
