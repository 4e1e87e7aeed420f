"""--smoke runs of the gradient-lab experiments, in-process: long_range, gradient_flow, esn."""

import json
import math

import jax
import pytest

from rnn_jax.rundir import read_metrics


def results_of(workdir):
  return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow  # 30 s; resume is tested by test_lm_train and test_fault_injection
def test_long_range_smoke_then_resume_reuses_the_finished_runs(run_experiment, tmp_path):
  pytest.importorskip("sklearn")
  workdir = tmp_path / "long_range"
  argv = ("--smoke", "--tasks=adding,permuted_digits", "--models=tanh,esn", f"--workdir={workdir}")
  done = run_experiment("long_range", *argv)
  assert done.code == 0, done.err[-3000:]
  results = results_of(workdir)
  rows = results["table"]
  assert [(r["task"], r["model"]) for r in rows] == [
      ("adding", "tanh"), ("adding", "esn"), ("permuted_digits", "tanh"), ("permuted_digits", "esn")]
  for row in rows:
    assert math.isfinite(row["valid"]) and math.isfinite(row["test"])
    if row["task"] == "adding":
      assert abs(row["baseline"] - 0.1667) < 1e-3 and 0.0 < row["test"] < 10.0
    else:
      assert 0.0 <= row["test"] <= 1.0
    if row["model"] != "esn":
      assert 1 <= row["steps"] <= 20 and row["gradient"]["steps"] == row["steps"]
      run = workdir / f"{row['task']}_T{row['T']}" / row["model"]
      child = results_of(run)
      assert child["test_mse" if row["task"] == "adding" else "test_accuracy"] == row["test"]
      assert (run / "model.json").exists() and (run / "curves.png").stat().st_size > 1000
  assert results["config"]["steps"] == 20 and results["wall_time_s"] > 0
  assert (workdir / "table.md").read_text().count("\n") == 2 + len(rows)
  assert (workdir / "curves_adding_T20.png").stat().st_size > 1000
  assert "long_range adding T=20 tanh: not solved in 20" in done.out or "solved at step" in done.out
  # --resume continues: the finished runs are reused, not trained again.
  records = read_metrics(str(workdir / "adding_T20" / "tanh"))
  again = run_experiment("long_range", f"--workdir={workdir}", "--resume")
  assert again.code == 0, again.err[-3000:]
  assert read_metrics(str(workdir / "adding_T20" / "tanh")) == records
  assert [r["test"] for r in results_of(workdir)["table"]] == [r["test"] for r in rows]


def test_gradient_flow_smoke(run_experiment, tmp_path):
  workdir = tmp_path / "gradient_flow"
  done = run_experiment("gradient_flow", "--smoke", "--models=gru", "--clip=0", f"--workdir={workdir}")
  assert done.code == 0, done.err[-3000:]
  results = results_of(workdir)
  assert results["config"]["clip"] == 0.0                    # clip = 0: the training run is unclipped
  curve = results["jacobians"]["gru"]["jacobian_norm"]
  assert set(curve) == {"init", "trained"}
  assert 0.0 < curve["init"]["at_lag"]["1"] < 10.0 and curve["init"]["log10_per_lag"] < 0.5
  assert results["jacobians"]["gru"]["exploding_events"] == 0     # no threshold: only non-finite norms count
  assert results["jacobians"]["esn_reservoir"]["jacobian_norm"]["at_lag"]["10"] > 0
  for name in ("no_clipping", "clipped"):
    assert results["exploding"][name]["steps"] >= 1
  assert not results["exploding"]["clipped"]["diverged"]
  clipped = json.loads((workdir / "exploding_clipped" / "grad_norms.json").read_text())["grad_norms"]
  assert len(clipped) == 10
  assert results["exploding"]["clipped"]["exploding_events"] == sum(n > 1.0 for n in clipped)
  for png in ("jacobian_norms.png", "loss_gradient_norms.png", "spectra.png", "exploding.png",
              "training_curves.png"):
    assert (workdir / png).stat().st_size > 1000


def test_gradient_flow_refuses_a_zero_exploding_clip(run_experiment, tmp_path):
  done = run_experiment("gradient_flow", "--smoke", "--exploding_clip=0", f"--workdir={tmp_path}")
  assert done.code == 2 and "exploding_clip must be > 0" in done.err


def test_esn_smoke(run_experiment, tmp_path):
  pytest.importorskip("statsmodels")
  workdir = tmp_path / "esn"
  done = run_experiment("esn", "--smoke", f"--workdir={workdir}")
  assert done.code == 0, done.err[-3000:]
  assert not jax.config.jax_enable_x64                       # float64 stayed inside the run
  results = results_of(workdir)
  mackey_glass, real = results["mackey_glass"], results["real_series"]
  assert len(mackey_glass["nrmse_by_horizon"]) == 84
  assert mackey_glass["nrmse_84"] == mackey_glass["nrmse_by_horizon"][-1]
  assert mackey_glass["published_nrmse_84"] == pytest.approx(10 ** -4.2)
  assert 0.0 < mackey_glass["nrmse_by_horizon"][0] < 0.5
  assert real["series"] == "sunspots" and real["points"] == 309
  assert 0.0 < real["esn_nrmse_mean"] < 1.0 and 0.0 < real["ar_nrmse"] < real["persistence_nrmse"]
  assert (workdir / "esn_mackey_glass.png").stat().st_size > 1000
  assert (workdir / "esn_sunspots.png").exists() and (workdir / "metrics.jsonl").exists()
  assert "NRMSE_84" in done.out


def test_esn_refuses_a_washout_longer_than_the_training_part(run_experiment, tmp_path):
  done = run_experiment("esn", "--smoke", "--washout=500", "--train_length=400", f"--workdir={tmp_path}")
  assert done.code == 2 and "washout (500) must be shorter than train_length (400)" in done.err
