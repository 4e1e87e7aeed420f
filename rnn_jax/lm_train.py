"""Train and evaluate a language model on a token stream: the shared body of char_lm and word_lm.

    config = LMConfig(dataset="ptb_char", cell="lstm", hidden=256, ...)
    corpus = data.load_corpus(config.dataset)
    outcome = train_lm(config, corpus, workdir, resume=False)
    outcome.results["test_bpc"], outcome.model, outcome.params

What happens: the train split is laid out as B parallel streams cut into windows of T
(``data.StreamBatches``) and trained with truncated BPTT (k1 = k2 = T, the carry flows
across windows under stop_gradient and is reset each epoch; ``train.make_tbptt_step``).
Validation runs every ``eval_every`` steps over the whole valid stream (``lm.evaluate_stream``).
Checkpoints (``<workdir>/checkpoints``) keep the last ``keep`` plus the best on valid nats and
hold the params, optimiser state, step, RNG key, TBPTT carry and data position, so
``resume=True`` continues the exact trajectory of an uninterrupted run. At the end the final
params are evaluated on valid and test and results.json, metrics.jsonl and curves.png are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import logging

from rnn_jax import cells
from rnn_jax.checkpoint import CheckpointManager
from rnn_jax.data import Corpus, StreamBatches, eval_windows
from rnn_jax.data.batching import check_stream
from rnn_jax.lm import LanguageModel, evaluate_stream, make_loss_fn
from rnn_jax.losses import bits_per_char, perplexity
from rnn_jax.train import (RunDir, create_train_state, fit, make_eval_step, make_optimizer, make_schedule,
                           make_tbptt_step, make_train_step)

# Flags that change the shapes or meaning of a checkpoint: a resume must use the same values.
ARCHITECTURE_FIELDS = ("dataset", "cell", "hidden", "embed", "layers", "batch", "seq_len", "optimizer")


@dataclasses.dataclass
class LMConfig:
  """Every setting of a language-model run (the experiments' flags map onto these fields).

  steps: total training steps (windows); 0 means ``epochs`` full passes over the train stream.
  eval_every: steps between validations (0: once per epoch). checkpoint_every: 0 = at evals.
  reduction: "sum" (loss summed over the T steps, averaged over B; Zaremba et al.) or "mean".
  schedule: "constant", "step" (decay_rate per epoch after decay_start_epoch) or "cosine".
  eval_batch: B used for valid/test (0: the training B). eval_tokens: if > 0, evaluate only the
  first eval_tokens tokens of valid/test (smoke runs only).
  """
  dataset: str = "ptb_char"
  level: Optional[str] = None
  cell: str = "lstm"
  hidden: int = 256
  embed: int = 0
  layers: int = 1
  dropout: float = 0.0
  init_scale: Optional[float] = None
  optimizer: str = "adam"
  lr: float = 2e-3
  schedule: str = "constant"
  decay_start_epoch: int = 0
  decay_rate: float = 1.0
  warmup_steps: int = 0
  clip: Optional[float] = 1.0
  clip_mode: str = "norm"
  weight_decay: float = 0.0
  l1: float = 0.0
  l2: float = 0.0
  reduction: str = "mean"
  batch: int = 32
  seq_len: int = 100
  steps: int = 0
  epochs: float = 1.0
  eval_every: int = 0
  eval_batch: int = 0
  eval_tokens: int = 0
  checkpoint_every: int = 0
  keep: int = 2
  log_every: int = 50
  seed: int = 0
  unroll: int = 1

  def validate(self) -> None:
    """Raise ValueError naming the flag and the accepted values."""
    if self.cell not in cells.CELLS:
      raise ValueError(f"--cell={self.cell!r} is unknown; expected one of {tuple(cells.CELLS)}")
    positive = {"hidden": self.hidden, "layers": self.layers, "batch": self.batch, "seq_len": self.seq_len,
                "log_every": self.log_every, "keep": self.keep, "unroll": self.unroll}
    for name, value in positive.items():
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    for name in ("steps", "eval_every", "eval_batch", "eval_tokens", "checkpoint_every", "embed",
                 "warmup_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
    if not (self.lr > 0 and math.isfinite(self.lr)):
      raise ValueError(f"--lr must be a positive number, got {self.lr}")
    if self.clip is not None and not self.clip > 0:
      raise ValueError(f"--clip must be > 0 (or 0 for no clipping), got {self.clip}")
    if self.steps == 0 and not self.epochs > 0:
      raise ValueError(f"--epochs must be > 0 when --steps=0, got {self.epochs}")
    if self.reduction not in ("sum", "mean"):
      raise ValueError(f"--reduction must be 'sum' or 'mean', got {self.reduction!r}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class LMOutcome:
  """What ``train_lm`` returns."""
  results: dict
  model: LanguageModel
  params: Any
  corpus: Corpus


def build_model(config: LMConfig, vocab_size: int) -> LanguageModel:
  cell = cells.make_cell(config.cell, config.hidden)
  return LanguageModel(cell, vocab_size, config.embed or config.hidden, num_layers=config.layers,
                       dropout=config.dropout, init_scale=config.init_scale, unroll=config.unroll)


def _named_metrics(nats: float, level: str, prefix: str = "") -> dict:
  """{nats, bpc} for characters, {nats, perplexity} for words."""
  out = {f"{prefix}nats": nats}
  if level == "char":
    out[f"{prefix}bpc"] = float(bits_per_char(nats))
  else:
    out[f"{prefix}perplexity"] = float(perplexity(min(nats, 700.0)))
  return out


def _eval_split(corpus: Corpus, split: str, config: LMConfig) -> np.ndarray:
  ids = corpus.splits[split]
  if config.eval_tokens:
    ids = ids[: config.eval_tokens]
  return ids


@dataclasses.dataclass
class TrainingSetup:
  """The pieces of a run before training: model, train stream, schedule, optimiser, loop state."""
  model: LanguageModel
  stream: StreamBatches
  schedule: Any
  optimizer: Any
  loop_state: dict
  steps_per_epoch: int
  num_steps: int


def build_training(config: LMConfig, corpus: Corpus) -> TrainingSetup:
  """Validate config and data, then build the model, stream, optimiser and initial loop state
  {"train": TrainState, "carry": per-layer zero carries [B, ...]} (all from ``config.seed``)."""
  config.validate()
  vocab_size = len(corpus.vocab)
  stream = StreamBatches(corpus.splits["train"], config.batch, config.seq_len, vocab_size,
                         name=f"{corpus.name} train")
  eval_batch = config.eval_batch or config.batch
  for split in ("valid", "test"):
    check_stream(_eval_split(corpus, split, config), eval_batch, config.seq_len, vocab_size,
                 name=f"{corpus.name} {split}")
  steps_per_epoch = stream.windows_per_epoch
  num_steps = config.steps or max(1, int(round(config.epochs * steps_per_epoch)))
  model = build_model(config, vocab_size)
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  params = model.init(init_key)
  schedule = make_schedule(config.schedule, config.lr, steps_per_epoch=steps_per_epoch,
                           decay_start_epoch=config.decay_start_epoch, decay_rate=config.decay_rate,
                           warmup_steps=config.warmup_steps, total_steps=num_steps)
  optimizer = make_optimizer(config.optimizer, schedule, clip=config.clip, clip_mode=config.clip_mode,
                             weight_decay=config.weight_decay)
  loop_state = {"train": create_train_state(params, optimizer, train_key),
                "carry": model.initial_carries(params, config.batch)}
  return TrainingSetup(model, stream, schedule, optimizer, loop_state, steps_per_epoch, num_steps)



def train_lm(config: LMConfig, corpus: Corpus, workdir: str, *, resume: bool = False,
             progress: bool = True, extra_config: Optional[dict] = None) -> LMOutcome:
  """Train ``config`` on ``corpus`` into ``workdir``; see the module docstring.

  Raises ValueError for bad settings or data (too short for --batch x --seq_len, ...), and
  refuses to overwrite an existing run's checkpoints unless ``resume`` is set.
  """
  setup = build_training(config, corpus)
  model, stream, loop_state, schedule, optimizer = (setup.model, setup.stream, setup.loop_state,
                                                    setup.schedule, setup.optimizer)
  vocab_size, steps_per_epoch, num_steps = len(corpus.vocab), setup.steps_per_epoch, setup.num_steps
  eval_batch = config.eval_batch or config.batch
  eval_every = config.eval_every or steps_per_epoch
  params = loop_state["train"].params
  train_step = make_tbptt_step(make_train_step(
      make_loss_fn(model, train=True, reduction=config.reduction, l1=config.l1, l2=config.l2),
      optimizer, schedule))
  eval_step = make_eval_step(make_loss_fn(model, train=False))

  full_config = {**config.to_dict(), **(extra_config or {}), "corpus": corpus.summary(),
                 "num_params": model.num_params(params), "steps_per_epoch": steps_per_epoch,
                 "num_steps": num_steps}
  run = RunDir(workdir, full_config)
  checkpoints = CheckpointManager(run.path("checkpoints"), keep=config.keep, best_metric="valid_nats")
  start_step = 0
  latest = checkpoints.latest_step()
  if latest is not None and not resume:
    raise ValueError(f"{run.workdir} already holds checkpoints (latest step {latest}); pass --resume to "
                     f"continue that run, or choose a fresh --workdir")
  if resume and latest is not None:
    loop_state, extra = checkpoints.restore(loop_state)
    saved_config = extra.get("config", {})
    changed = {k: (saved_config.get(k), full_config.get(k)) for k in ARCHITECTURE_FIELDS
               if k in saved_config and saved_config.get(k) != full_config.get(k)}
    if changed:
      raise ValueError(f"--resume: the checkpoint in {checkpoints.directory} was made with other settings "
                       f"(saved, now): {changed}; use the original flags or a fresh --workdir")
    stream.seek(extra["data"])
    start_step = int(extra["step"])
    run.truncate_after(start_step)
    logging.info("resumed from step %d (epoch %d, window %d)", start_step, stream.epoch, stream.window)
  elif resume:
    logging.info("--resume: no checkpoint in %s, starting from scratch", checkpoints.directory)
  with open(run.path("config.json"), "w") as f:
    json.dump(full_config, f, indent=2, default=str)

  def validate(state):
    nats = evaluate_stream(model, eval_step, state["train"].params,
                           eval_windows(_eval_split(corpus, "valid", config), eval_batch, config.seq_len,
                                        vocab_size))["nats"]
    return _named_metrics(nats, corpus.level, "valid_")

  class _Saver:
    """Adds the config to every checkpoint's extra JSON."""
    def save(self, step, state, extra, metrics):
      checkpoints.save(step, state, extra={**extra, "config": full_config}, metrics=metrics)

  logging.info("training %s on %s: %d params, %d steps (%d per epoch), B=%d T=%d",
               config.cell, corpus.name, full_config["num_params"], num_steps, steps_per_epoch,
               config.batch, config.seq_len)
  started = time.time()
  outcome = fit(loop_state, train_step, stream, num_steps=num_steps, run=run, start_step=start_step,
                evaluate=validate, eval_every=eval_every, checkpoints=_Saver(),
                checkpoint_every=config.checkpoint_every, best_metric="valid_nats",
                log_every=config.log_every, tokens_per_step=stream.tokens_per_window,
                train_summary=lambda m: {**m, **_named_metrics(m["nats"], corpus.level)},
                progress=progress)
  train_seconds = time.time() - started
  params = outcome.state["train"].params
  final = {}
  for split in ("valid", "test"):
    nats = evaluate_stream(model, eval_step, params,
                           eval_windows(_eval_split(corpus, split, config), eval_batch, config.seq_len,
                                        vocab_size))["nats"]
    final.update(_named_metrics(nats, corpus.level, f"{split}_"))
  run.log(outcome.step, "test", **{k: v for k, v in final.items() if k.startswith("test_")})
  best_step = checkpoints.best_step()
  results = {**final, "steps": outcome.step, "epochs": outcome.step / steps_per_epoch,
             "best_checkpoint_step": best_step, "train_seconds_this_process": train_seconds,
             "resumed_from_step": start_step, "final_train": outcome.train}
  run.finish(results)
  return LMOutcome(results=results, model=model, params=params, corpus=corpus)


def load_params_for_sampling(config: LMConfig, corpus: Corpus, workdir: str, which: str = "best"):
  """(model, params, step) from ``workdir``'s best (or latest) checkpoint, for sampling only.

  ``config`` must hold the training run's flags (the checkpoint tree is checked against them).
  """
  setup = build_training(config, corpus)
  checkpoints = CheckpointManager(os.path.join(workdir, "checkpoints"), keep=config.keep,
                                  best_metric="valid_nats")
  step = checkpoints.best_step() if which == "best" else checkpoints.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train first with the same --workdir")
  state, _ = checkpoints.restore(setup.loop_state, step=step)
  return setup.model, state["train"].params, step
