"""rnn_jax.lab: training through the one recipe stops when solved, records every gradient norm,
and reports an exploding run; the clipped twin stays finite. The ESN baseline scores a task."""

import math

import jax
import numpy as np
import pytest

from rnn_jax import cells, lab, tasks
from rnn_jax.config import check
from rnn_jax.rundir import RunDir, RunOptions, read_metrics


def test_training_stops_at_the_first_evaluation_where_the_task_is_solved(tmp_path):
  easy = lab.TaskSpec("adding", 5, 2, 1, "mse", target=10.0, baseline=1 / 6)   # any sane MSE solves it
  data = lab.task_data(easy, jax.random.PRNGKey(0), batch_size=16, eval_sequences=64)
  config = lab.LabConfig(hidden_size=4, steps=10, eval_every=2, log_every=1, clip=1.0)
  run = RunDir(str(tmp_path), "lab", config, label="lab adding elman")
  outcome = lab.train_model(cells.Elman(4), data, config, run, jax.random.PRNGKey(1), progress=False)
  assert outcome["solved"] and outcome["steps"] == 2 and outcome["steps_to_solve"] == 2
  assert len(outcome["grad_norms"]) == 2 and all(n > 0 for n in outcome["grad_norms"])
  assert outcome["gradient"]["steps"] == 2
  records = read_metrics(str(tmp_path))
  assert [r["step"] for r in records if r["split"] == "valid"] == [2]
  # The tapped norms are the train step's own ||g|| (logged every step here).
  logged = [r["grad_norm"] for r in records if r["split"] == "train"]
  np.testing.assert_allclose(outcome["grad_norms"], logged, rtol=1e-5)
  assert 0.0 < outcome["valid_mse"] < 10.0 and 0.0 < outcome["test_mse"] < 10.0
  assert outcome["valid_mse"] != outcome["test_mse"]                 # two held-out sets
  # Resuming the finished run returns its outcome and best params without training again.
  resumed = RunDir(str(tmp_path), "lab", config, RunOptions(resume=True))
  again = lab.train_model(cells.Elman(4), data, config, resumed, jax.random.PRNGKey(1), progress=False)
  assert again["steps"] == 2 and again["test_mse"] == outcome["test_mse"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, again["params"], outcome["params"])
  assert len(read_metrics(str(tmp_path))) == len(records)


def test_unclipped_exploding_rnn_goes_non_finite_and_the_clipped_twin_does_not(tmp_path):
  spec = lab.make_task("adding", 40)
  data = lab.task_data(spec, jax.random.PRNGKey(0), batch_size=16, eval_sequences=64)
  cell = cells.Elman(16, spectral_radius=1.5)
  outcomes = {}
  for clip in (0.0, 1.0):                                    # clip = 0 turns clipping off
    config = lab.LabConfig(hidden_size=16, optimizer="sgd", learning_rate=1.0, clip=clip, steps=40,
                           eval_every=20, log_every=1)
    run = RunDir(str(tmp_path / str(clip)), "lab", config)
    outcomes[clip] = lab.train_model(cell, data, config, run, jax.random.PRNGKey(2), progress=False,
                                     exploding_threshold=1.0)
  exploded, clipped = outcomes[0.0], outcomes[1.0]
  assert exploded["diverged"] and exploded["params"] is None and not exploded["solved"]
  first = exploded["gradient"]["first_non_finite_step"]
  assert first is not None and exploded["steps"] == first == len(exploded["grad_norms"])
  assert exploded["gradient"]["exploding_events"] >= exploded["gradient"]["non_finite_events"] == 1
  assert not clipped["diverged"] and clipped["steps"] == 40
  assert all(math.isfinite(n) for n in clipped["grad_norms"]) and math.isfinite(clipped["test_mse"])
  assert clipped["gradient"]["exploding_events"] >= 1          # norms above the threshold, clipped


def test_esn_baseline_beats_the_memoryless_adding_baseline_at_short_length():
  spec = lab.make_task("adding", 10)
  key = jax.random.PRNGKey(3)
  train_batch, eval_batch = tasks.adding_problem(key, 300, 10), tasks.adding_problem(jax.random.fold_in(key, 1), 200, 10)
  outcome = lab.esn_on_task(spec, train_batch, eval_batch, lab.ESNConfig(hidden_size=60), key,
                            test_batch=tasks.adding_problem(jax.random.fold_in(key, 2), 200, 10))
  assert 0.0 < outcome["mse"] < tasks.adding_baseline_mse()      # better than predicting 1 at T=10
  assert 0.0 < outcome["test_mse"] < tasks.adding_baseline_mse()
  assert outcome["solved"] == (outcome["mse"] < 0.01)


def test_task_specs_state_the_baselines_and_solved_rules():
  adding = lab.make_task("adding", 200)
  assert abs(adding.baseline - 0.1667) < 1e-3 and adding.is_solved(0.009) and not adding.is_solved(0.011)
  assert not adding.is_solved(float("nan")) and not adding.is_solved(None) and adding.mode == "min"
  digits = lab.make_task("permuted_digits", digits_target=0.9)
  assert digits.is_solved(0.95) and not digits.is_solved(0.85)
  assert digits.length == 64 and digits.mode == "max"
  np.testing.assert_equal(lab.make_task("copy", 100).readout, "per_step")


def test_lab_config_rejects_a_zero_step_budget():
  with pytest.raises(ValueError, match="steps must be >= 1"):
    check(lab.LabConfig(steps=0))
