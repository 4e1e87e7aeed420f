"""rnn_jax.lab: training through the engine stops when solved, records every gradient norm,
and reports an exploding run; the clipped twin stays finite. The ESN baseline scores a task."""

import math

import jax
import numpy as np

from rnn_jax import cells, lab, tasks, train


def _adding_setup(length, batch=16, seed=0):
  key = jax.random.PRNGKey(seed)
  stream = tasks.GeneratedStream(lambda k: tasks.adding_problem(k, batch, length), key)
  return stream, tasks.adding_problem(jax.random.fold_in(key, 7), 64, length)


def test_training_stops_at_the_first_evaluation_where_the_task_is_solved(tmp_path):
  stream, eval_batch = _adding_setup(5)
  easy = lab.TaskSpec("adding", 5, 2, 1, "mse", target=10.0, baseline=1 / 6)   # any sane MSE solves it
  config = lab.TrainConfig(steps=10, eval_every=2, log_every=1, clip=1.0)
  outcome = lab.train_model(cells.Elman(4), easy, stream, eval_batch, config,
                            train.RunDir(str(tmp_path)), jax.random.PRNGKey(1), progress=False)
  assert outcome["solved"] and outcome["steps"] == 2 and outcome["steps_to_solve"] == 2
  assert len(outcome["grad_norms"]) == 2 and all(n > 0 for n in outcome["grad_norms"])
  assert outcome["gradient"]["steps"] == 2
  records = train.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if r["split"] == "valid"] == [2]


def test_unclipped_exploding_rnn_goes_non_finite_and_the_clipped_twin_does_not(tmp_path):
  spec = lab.make_task("adding", 40)
  stream, eval_batch = _adding_setup(40)
  cell = cells.Elman(16, spectral_radius=1.5)
  outcomes = {}
  for clip in (None, 1.0):
    config = lab.TrainConfig(optimizer="sgd", learning_rate=1.0, clip=clip, steps=40, eval_every=20,
                             log_every=1, exploding_threshold=1.0)
    stream.seek({"index": 0})
    outcomes[clip] = lab.train_model(cell, spec, stream, eval_batch, config, train.RunDir(str(tmp_path / str(clip))),
                                     jax.random.PRNGKey(2), progress=False)
  exploded, clipped = outcomes[None], outcomes[1.0]
  assert exploded["diverged"] and exploded["params"] is None
  assert exploded["gradient"]["first_non_finite_step"] is not None
  assert exploded["gradient"]["exploding_events"] >= exploded["gradient"]["non_finite_events"] >= 1
  assert not clipped["diverged"] and clipped["steps"] == 40
  assert all(math.isfinite(n) for n in clipped["grad_norms"]) and math.isfinite(clipped["final_mse"])
  assert clipped["gradient"]["exploding_events"] >= 1          # norms above the threshold, clipped


def test_esn_baseline_beats_the_memoryless_adding_baseline_at_short_length():
  spec = lab.make_task("adding", 10)
  key = jax.random.PRNGKey(3)
  train_batch, eval_batch = tasks.adding_problem(key, 300, 10), tasks.adding_problem(jax.random.fold_in(key, 1), 200, 10)
  outcome = lab.esn_on_task(spec, train_batch, eval_batch, lab.ESNConfig(hidden_size=60), key)
  assert 0.0 < outcome["mse"] < tasks.adding_baseline_mse()      # better than predicting 1 at T=10
  assert outcome["solved"] == (outcome["mse"] < 0.01)


def test_task_specs_state_the_baselines_and_solved_rules():
  adding = lab.make_task("adding", 200)
  assert abs(adding.baseline - 0.1667) < 1e-3 and adding.is_solved(0.009) and not adding.is_solved(0.011)
  assert not adding.is_solved(float("nan"))
  digits = lab.make_task("permuted_digits", digits_target=0.9)
  assert digits.is_solved(0.95) and not digits.is_solved(0.85) and digits.length == 64
  np.testing.assert_equal(lab.make_task("copy", 100).readout, "per_step")
