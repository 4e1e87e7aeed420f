"""Many-to-many with T_x != T_y: an encoder-decoder translates, scored by corpus BLEU.

  python experiments/translate.py                                   # dates in words -> ISO, Cho et al. GRU
  python experiments/translate.py --model=sutskever                 # reversed source, LSTM
  python experiments/translate.py --attention=bahdanau              # RNNsearch: bidirectional encoder
  python experiments/translate.py --model=sutskever --attention=general   # Luong et al., input feeding
  python experiments/translate.py --preset=bible                    # KJV English -> Reina-Valera Spanish
  python experiments/translate.py --smoke --workdir=/tmp/smoke      # seconds, same code path
  python experiments/translate.py --workdir=runs/translate --translate="march the third, nineteen oh five"
  python experiments/translate.py --workdir=runs/translate --translate=@sentences.txt --beam_size=4
  echo "may 1, 2020" | python experiments/translate.py --workdir=runs/translate --translate=-

Models (rnn_jax.seq2seq): "cho" (Cho et al. 2014, "Learning phrase representations using
RNN encoder-decoder"; the context c = tanh(W_c h_S) conditions every decoder step and the
read-out; GRU by default) and "sutskever" (Sutskever et al. 2014, "Sequence to sequence
learning with neural networks"; c is the encoder's final state, the source is read
reversed; LSTM by default). --attention replaces the one fixed context by c_t = sum_j
alpha_tj h_j at every decoder step: "bahdanau" (Bahdanau et al. 2014, "Neural machine
translation by jointly learning to align and translate": additive score v_a^T tanh(W_a
s_{t-1} + U_a h_j) over a bidirectional encoder) or Luong et al. 2015's global scores
("Effective approaches to attention-based neural machine translation": "dot" h_t^T h̄_s,
"general" h_t^T W_a h̄_s, "concat" v_a^T tanh(W_a [h_t; h̄_s]), read-out from h~_t =
tanh(W_c [c_t; h_t]), with --input_feeding of h~_{t-1}); see rnn_jax.seq2seq. Training is
teacher forcing, minimising the cross-entropy -1/N sum_t log p(y_t | y_<t, x) per target
token (<eos> included), through the one training recipe (rnn_jax.train.train_and_test).
Each validation logs the loss and the greedy BLEU on the first valid_bleu_pairs validation
pairs; the best checkpoint on
validation loss is then decoded greedily and with beam search (beam_size K, final choice
argmax score / length ** length_penalty) on all of valid and test.

BLEU (Papineni et al. 2002): corpus BLEU-4 via sacrebleu on our lower-cased tokens
(tokenize="none"), the references being the real tokens (never <unk>), stored as a
fraction in 0..1 (sacrebleu's score / 100). For dates the target tokens are the characters
of the ISO date, so the BLEU is character BLEU; the exact-match rate is reported too.

--translate="a sentence" (or @FILE with one sentence per line, or - for stdin) translates
with the best checkpoint of --workdir instead of training, greedily unless --beam_size is
given, and prints one translation per line (rnn_jax.seq2seq.translate).

Outputs in --workdir: config.json, metrics.jsonl, results.json, curves.png, checkpoints/,
model.json, source_vocab.json, target_vocab.json, samples.txt (sample translations),
test_translations.tsv (every test pair: reference, source, target, greedy, beam) and, with
attention, attention.png (the weights alpha_tj of the greedy translations of the first
attention_samples test sentences).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import flags, logging

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax import attention, cells, load_run, metrics, plots, seq2seq
from rnn_jax import predict as predict_io
from rnn_jax.config import TrainingConfig, field
from rnn_jax.data import translation
from rnn_jax.layers import check_token_ids
from rnn_jax.rundir import RunDir, RunOptions
from rnn_jax.train import train_and_test

DEFAULT_CELLS = {"cho": "gru", "sutskever": "lstm"}


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig(TrainingConfig):
  """The settings of an encoder-decoder on dates or the Bible, shared by translate.py and multitask.py."""
  dataset: str = field("dates", "Parallel corpus: dates (synthetic, English words -> ISO 8601; generated, so it "
                       "runs anywhere) or bible (KJV English -> Reina-Valera 1909 Spanish; needs the SWORD "
                       "modules).", choices=translation.DATASETS, fixed=True)
  model: str = field("cho", "Encoder-decoder: cho (Cho et al. 2014) or sutskever (Sutskever et al. 2014).",
                     choices=seq2seq.KINDS, fixed=True)
  cell: str = field("", "Recurrent cell of every encoder and decoder; empty: gru for cho, lstm for sutskever.",
                    choices=("", "elman", "gru", "lstm"), fixed=True)
  attention: str = field("", "Attention over the source: empty (none: one fixed context), bahdanau "
                         "(Bahdanau et al. 2014, additive, bidirectional encoder) or Luong et al. 2015's "
                         "global dot, general or concat.", choices=seq2seq.ATTENTIONS, fixed=True)
  input_feeding: bool = field(True, "Luong attention (dot, general, concat): feed the attentional state "
                              "h~_{t-1} into the next decoder input (Luong et al. 2015, section 3.3); "
                              "unused without it.", fixed=True)
  embed_size: int = field(64, "Embedding size E of source and target tokens.", minimum=1, fixed=True)
  hidden_size: int = field(128, "Hidden size H of every encoder and decoder.", minimum=1, fixed=True)
  num_layers: int = field(1, "Stacked layers in every encoder and decoder.", minimum=1, fixed=True)
  dropout: float = field(0.0, "Dropout between stacked layers (training only).", minimum=0.0, maximum=0.99)
  vocab_size: int = field(4000, "Bible: the most frequent training tokens kept per language, the four "
                          "specials <pad> <bos> <eos> <unk> included; 0 keeps all (dates keep all).",
                          minimum=0, fixed=True)
  max_length: int = field(20, "Bible: keep verse pairs with at most this many tokens on each side; 0: all.",
                          minimum=0, fixed=True)
  num_train_pairs: int = field(20000, "Dates: training pairs generated. Bible: at most this many training "
                               "pairs (0: all).", minimum=0, fixed=True)
  num_eval_pairs: int = field(1000, "Dates: validation and test pairs generated, each. Bible: at most this "
                              "many of each (0: all).", minimum=0, fixed=True)
  data_dir: str = field("", "Cache directory of the exported Bible; empty: $RNN_JAX_CACHE or "
                        "~/.cache/rnn_jax.")
  beam_size: int = field(4, "Beam size K of the beam-search decoding of valid and test (1 is greedy).",
                         minimum=1)
  length_penalty: float = field(0.6, "Beam search picks argmax score / length ** length_penalty.",
                                minimum=0.0)
  decode_extra_tokens: int = field(10, "Decode at most (longest reference + <eos> + decode_extra_tokens) "
                                   "tokens.", minimum=0)
  valid_bleu_pairs: int = field(200, "Validation pairs decoded greedily for the BLEU of each validation.",
                                minimum=1)
  num_samples: int = field(10, "Test translations printed and saved in samples.txt.", minimum=0)
  pad_multiple: int = field(8, "Batch widths are rounded up to a multiple of this (fewer compilations).",
                            minimum=1)
  batch_size: int = 64
  steps: int = 2500
  learning_rate: float = 2e-3
  clip: float = 1.0
  eval_every: int = 500

  def validate(self) -> None:
    super().validate()
    if self.dataset == "dates" and (self.num_train_pairs < 1 or self.num_eval_pairs < 1):
      raise ValueError(f"num_train_pairs and num_eval_pairs must be >= 1 for the generated dates, got "
                       f"{self.num_train_pairs} and {self.num_eval_pairs}")

  @property
  def cell_name(self) -> str:
    """The cell used: ``cell``, or the model's own (gru for cho, lstm for sutskever)."""
    return self.cell or DEFAULT_CELLS[self.model]


@dataclasses.dataclass(frozen=True)
class Config(EncoderDecoderConfig):
  """translate: an encoder-decoder on dates (or the Bible) with Adam and global-norm clipping."""
  beam_size: int = field(4, "Beam size K of the beam-search decoding of valid and test (1 is greedy); "
                         "--translate decodes greedily unless it is given.", minimum=1)
  attention_samples: int = field(4, "With attention: test sentences whose attention weights attention.png "
                                 "draws.", minimum=0)


BIBLE = dict(dataset="bible", num_train_pairs=0, num_eval_pairs=0, steps=2000)   # every verse pair, 2,000 steps
PRESETS = {
    "sutskever": dict(model="sutskever"),
    "bible": BIBLE,
    "bible_sutskever": dict(BIBLE, model="sutskever"),
}
# The seconds-long run of every encoder-decoder script (multitask.py adds its own fields).
ENCODER_DECODER_SMOKE = dict(embed_size=16, hidden_size=32, batch_size=16, pad_multiple=32, steps=12,
                             eval_every=6, log_every=6, valid_bleu_pairs=16, num_train_pairs=200,
                             num_eval_pairs=40, vocab_size=300, max_length=12)
SMOKE = dict(ENCODER_DECODER_SMOKE, num_samples=3, attention_samples=2)


def build_model(config: Config, source_vocab_size: int, target_vocab_size: int) -> seq2seq.Seq2Seq:
  return seq2seq.Seq2Seq(
      kind=config.model, cell=cells.make_cell(config.cell_name, config.hidden_size),
      source_vocab_size=source_vocab_size, target_vocab_size=target_vocab_size,
      embed_size=config.embed_size, num_layers=config.num_layers, dropout=config.dropout,
      bos_id=translation.BOS_ID, eos_id=translation.EOS_ID, pad_id=translation.PAD_ID,
      attention=config.attention, input_feeding=config.input_feeding and config.attention in attention.LUONG)


def attention_name(config: Config) -> str:
  """"" without attention, else e.g. "bahdanau attention" or "general attention, input feeding"."""
  if not config.attention:
    return ""
  feeding = ", input feeding" if config.input_feeding and config.attention in attention.LUONG else ""
  return f"{config.attention} attention{feeding}"


def _plot_attention(run: RunDir, config: Config, model, params, pairs, sources, greedy, target_vocab,
                    title: str) -> str:
  """attention.png: the alignment of the first attention_samples test sources with their greedy translations."""
  count = min(config.attention_samples, len(pairs))
  maps = seq2seq.attention_maps(model, params, sources[:count],
                                [target_vocab.encode(tokens) for tokens in greedy[:count]])
  separator = translation.TARGET_SEPARATORS[config.dataset]
  samples = []
  for pair, tokens, weights in zip(pairs, greedy, maps):
    verdict = "exact" if list(tokens) == list(pair.target) else "reference " + separator.join(pair.target)
    reference = f"{pair.reference}: " if pair.reference else ""
    samples.append((list(pair.source), [*tokens, "<eos>"], weights,
                    f"{reference}greedy {separator.join(tokens)} ({verdict})"))
  return attention.plot_attention(run.path("attention.png"), samples, title)


def write_test_translations(run: RunDir, pairs, decoded: dict, separator: str) -> None:
  """test_translations.tsv: reference, source, target, greedy and beam output of every test pair."""
  lines = ["\t".join([p.reference, " ".join(p.source), separator.join(p.target), separator.join(g),
                      separator.join(b)]) for p, g, b in zip(pairs, decoded["greedy"], decoded["beam"])]
  run.write_text("test_translations.tsv", "reference\tsource\ttarget\tgreedy\tbeam\n" + "\n".join(lines) + "\n")


def _write_outputs(run: RunDir, config: Config, pairs, decoded: dict, separator: str) -> str:
  """test_translations.tsv (every test pair) and samples.txt (the first num_samples); returns the samples."""
  write_test_translations(run, pairs, decoded, separator)
  rows = list(zip(pairs, decoded["greedy"], decoded["beam"]))
  samples = [f"{p.reference + ': ' if p.reference else ''}source : {' '.join(p.source)}\n"
             f"  target : {separator.join(p.target)}\n"
             f"  greedy : {separator.join(g)}\n"
             f"  beam {config.beam_size} : {separator.join(b)}" for p, g, b in rows[:config.num_samples]]
  text = "\n".join(samples)
  run.write_text("samples.txt", text + "\n")
  return text


def load_corpus(config: EncoderDecoderConfig):
  """(the token pairs of each split, the vocabularies of source and target built on train)."""
  pairs = translation.load_pairs(config.dataset, num_train_pairs=config.num_train_pairs,
                                 num_eval_pairs=config.num_eval_pairs, max_length=config.max_length,
                                 seed=config.seed, cache_dir=config.data_dir or None)
  if config.batch_size > len(pairs["train"]):
    raise ValueError(f"batch_size={config.batch_size} exceeds the {len(pairs['train'])} training pairs")
  max_size = (config.vocab_size or None) if config.dataset == "bible" else None
  return pairs, translation.pair_vocabularies(pairs["train"], max_size)


def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Train the encoder-decoder into ``workdir``, decode valid and test, and return results.json's content."""
  options = options or RunOptions()
  pairs, (source_vocab, target_vocab) = load_corpus(config)
  encoded = {name: translation.encode_pairs(split, source_vocab, target_vocab)
             for name, split in pairs.items()}
  for name, (sources, targets) in encoded.items():
    check_token_ids(np.concatenate(sources), len(source_vocab), f"{name} source ids")
    check_token_ids(np.concatenate(targets), len(target_vocab), f"{name} target ids")
  separator = translation.TARGET_SEPARATORS[config.dataset]
  decode_len = max(len(p.target) for split in pairs.values() for p in split) + 1 + config.decode_extra_tokens

  model = build_model(config, len(source_vocab), len(target_vocab))
  label = f"translate {config.model} {config.cell_name}" + (f" {config.attention}" if config.attention else "")
  run = RunDir(workdir, "translate", config, options, label=label)
  for name, (sources, targets) in encoded.items():  # the ids read, and the vocabularies that give them
    run.check_data(f"{config.dataset} {name}", sources, targets)
  run.check_vocabulary(source_vocab.tokens, "source_vocab.json")
  run.check_vocabulary(target_vocab.tokens, "target_vocab.json")
  run.write_json("source_vocab.json", {"tokens": source_vocab.tokens})
  run.write_json("target_vocab.json", {"tokens": target_vocab.tokens})
  run.save_model(model, best_metric="loss", best_mode="min", dataset=config.dataset,
                 vocabularies={"source": "source_vocab.json", "target": "target_vocab.json"},
                 target_separator=separator, decode_max_len=decode_len)
  params = model.init(jax.random.PRNGKey(config.seed))
  num_params = seq2seq.num_params(params)
  logging.info("%s: %s pairs (train/valid/test), vocabularies %d -> %d, %d params", label,
               [len(pairs[s]) for s in translation.SPLITS], len(source_vocab), len(target_vocab), num_params)

  stream = translation.PairBatches(*encoded["train"], config.batch_size, seed=config.seed,
                                   pad_multiple=config.pad_multiple)
  eval_batches = {name: translation.evaluation_pair_batches(*encoded[name], config.batch_size,
                                                            config.pad_multiple)
                  for name in ("valid", "test")}
  bleu_pairs = min(config.valid_bleu_pairs, len(pairs["valid"]))
  as_tokens = lambda outputs: [[target_vocab.tokens[i] for i in ids] for ids in outputs]

  def decode(params, split, beam_size, count=None):
    sources = encoded[split][0][:count]
    return as_tokens(seq2seq.decode_sources(model, params, sources, max_len=decode_len, beam_size=beam_size,
                                            length_penalty=config.length_penalty,
                                            batch_size=config.batch_size, pad_multiple=config.pad_multiple))

  def references(split, count=None):
    return [p.target for p in pairs[split][:count]]

  def validate(params, split):
    """Teacher-forced loss on the whole split and greedy BLEU / exact match on its first pairs."""
    scores = metrics.translation_scores(decode(params, split, 1, bleu_pairs), references(split, bleu_pairs))
    return {"loss": seq2seq.corpus_loss(model, params, eval_batches[split]), "bleu": scores["bleu"],
            "exact_match": scores["exact_match"]}

  def loss_fn(params, batch, rng):
    return model.loss(params, batch, train=True, rng=rng, reduction="mean"), {}

  steps_per_epoch = max(1, len(pairs["train"]) // config.batch_size)
  tokens_per_step = int(config.batch_size * np.mean([len(t) + 1 for t in encoded["train"][1]]))
  outcome = train_and_test(run, config, params=params, loss_fn=loss_fn, stream=stream,
                           steps_per_epoch=steps_per_epoch, evaluate=validate, best_metric="loss",
                           splits=(), tokens_per_step=tokens_per_step, progress=options.progress)

  results = {**outcome.results, "dataset": config.dataset, "model": config.model, "cell": config.cell_name,
             "attention": config.attention, "input_feeding": model.input_feeding,
             "num_params": num_params, "pairs": {s: len(pairs[s]) for s in translation.SPLITS},
             "source_vocab_size": len(source_vocab), "target_vocab_size": len(target_vocab),
             "decode_max_len": decode_len, "valid_bleu_pairs": bleu_pairs,
             "bleu_unit": "fraction (sacrebleu score / 100), tokenize=none on our tokens"}
  decoded = {}
  for split in ("valid", "test"):
    split_metrics = {"loss": seq2seq.corpus_loss(model, outcome.params, eval_batches[split])}
    for method, beam_size in (("greedy", 1), ("beam", config.beam_size)):
      hypotheses = decode(outcome.params, split, beam_size)
      scores = metrics.translation_scores(hypotheses, references(split))
      split_metrics.update({f"{method}_bleu": scores["bleu"], f"{method}_exact_match": scores["exact_match"],
                            f"{method}_brevity_penalty": scores["brevity_penalty"]})
      results[f"{split}_{method}_bleu_precisions"] = scores["precisions"]
      results["bleu_signature"] = scores["signature"]
      if split == "test":
        decoded[method] = hypotheses
    results.update({f"{split}_{k}": v for k, v in split_metrics.items()})
    if split == "test":
      run.log(outcome.step, "test", **split_metrics)
  print(_write_outputs(run, config, pairs["test"], decoded, separator))

  title = (f"translate {config.dataset}: {config.model} {config.num_layers}x{config.hidden_size} "
           f"{config.cell_name}, E={config.embed_size}")
  if config.attention:
    title += f", {attention_name(config)}"
  if config.attention and config.attention_samples:
    _plot_attention(run, config, model, outcome.params, pairs["test"], encoded["test"][0], decoded["greedy"],
                    target_vocab, f"{title}\nattention weights of the greedy translations of test sentences "
                    f"(best checkpoint, step {outcome.results['best_step']})")
  plots.plot_run(run.workdir, title, metrics=["loss", "bleu"],
                 labels={"loss": "cross-entropy (nats per target token)",
                         "bleu": f"greedy BLEU (0-1), first {bleu_pairs} valid pairs"},
                 final={"test BLEU greedy": results["test_greedy_bleu"],
                        f"beam {config.beam_size}": results["test_beam_bleu"]})
  results = run.finish(results)
  print(f"{label} on {config.dataset}: test BLEU (x100) greedy {100 * results['test_greedy_bleu']:.2f}, "
        f"beam {config.beam_size} {100 * results['test_beam_bleu']:.2f}; exact match (fraction) greedy "
        f"{results['test_greedy_exact_match']:.3f}, beam {results['test_beam_exact_match']:.3f}; test loss "
        f"{results['test_loss']:.3f} nats per token (best step {results['best_step']} of {results['steps']})")
  return results


# ---------------------------------------------------------------------------
# --translate: inference from the run directory alone
# ---------------------------------------------------------------------------

def define_translate_flags(flag_values) -> None:
  """--translate (greedy unless --beam_size is given), which decodes with a trained run."""
  common.define_input_flag(flag_values, "translate", "Translate sentences (greedy unless --beam_size is "
                           "given)", "sentence")


def translate_mode(flag_values, workdir: str) -> bool:
  if flag_values.translate is None:
    return False
  sentences = predict_io.read_texts(flag_values.translate)
  loaded = load_run(workdir)
  beam_size = flag_values.beam_size if flag_values["beam_size"].present else 1
  length_penalty = flag_values.length_penalty if flag_values["length_penalty"].present else None
  logging.info("translate: %d sentence(s) with the checkpoint of step %d in %s, %s", len(sentences),
               loaded.step, loaded.workdir, "greedy" if beam_size == 1 else f"beam search K={beam_size}")
  for line in seq2seq.translate(loaded, sentences, beam_size=beam_size, length_penalty=length_penalty):
    print(line)
  return True


EXPERIMENT = common.Experiment("translate", Config, train_and_evaluate, PRESETS, SMOKE, __doc__,
                               define_flags=define_translate_flags, infer=translate_mode)

if __name__ == "__main__":
  common.main(EXPERIMENT)
