"""--smoke runs of the gradient-lab experiments: long_range.py, gradient_flow.py, esn.py."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(name, *args):
  result = subprocess.run([sys.executable, str(ROOT / "experiments" / name), "--smoke", *args],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_long_range_smoke(tmp_path):
  pytest.importorskip("sklearn")
  workdir = tmp_path / "long_range"
  run_script("long_range.py", "--noprogress", "--tasks=adding,permuted_digits", "--models=tanh,esn",
             f"--workdir={workdir}")
  results = json.loads((workdir / "results.json").read_text())
  rows = results["table"]
  assert [(r["task"], r["model"]) for r in rows] == [
      ("adding", "tanh"), ("adding", "esn"), ("permuted_digits", "tanh"), ("permuted_digits", "esn")]
  for row in rows:
    assert math.isfinite(row["final"])
    if row["task"] == "adding":
      assert abs(row["baseline"] - 0.1667) < 1e-3 and 0.0 < row["final"] < 10.0
    else:
      assert 0.0 <= row["final"] <= 1.0
    if row["model"] != "esn":
      assert 1 <= row["steps"] <= 20 and row["gradient"]["steps"] == row["steps"]
  assert results["config"]["smoke"] is True and results["wall_time_s"] > 0
  assert (workdir / "table.md").read_text().count("\n") == 2 + len(rows)
  assert (workdir / "curves_adding_T20.png").stat().st_size > 1000
  assert (workdir / "adding_T20" / "tanh" / "metrics.jsonl").exists()
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(rows)


def test_gradient_flow_smoke(tmp_path):
  workdir = tmp_path / "gradient_flow"
  run_script("gradient_flow.py", "--noprogress", "--models=gru", f"--workdir={workdir}")
  results = json.loads((workdir / "results.json").read_text())
  for model in ("gru",):
    curve = results["jacobians"][model]["jacobian_norm"]
    assert set(curve) == {"init", "trained"}
    assert 0.0 < curve["init"]["at_lag"]["1"] < 10.0 and curve["init"]["log10_per_lag"] < 0.5
  assert results["jacobians"]["esn_reservoir"]["jacobian_norm"]["at_lag"]["10"] > 0
  for name in ("no_clipping", "clipped"):
    assert results["exploding"][name]["steps"] >= 1
  assert not results["exploding"]["clipped"]["diverged"]
  for png in ("jacobian_norms.png", "loss_gradient_norms.png", "spectra.png", "exploding.png"):
    assert (workdir / png).stat().st_size > 1000


def test_esn_smoke(tmp_path):
  pytest.importorskip("statsmodels")
  workdir = tmp_path / "esn"
  run_script("esn.py", f"--workdir={workdir}")
  results = json.loads((workdir / "results.json").read_text())
  mackey_glass, real = results["mackey_glass"], results["real_series"]
  assert len(mackey_glass["nrmse_by_horizon"]) == 84 and mackey_glass["published_log10_nrmse84"] == -4.2
  assert 0.0 < mackey_glass["nrmse_by_horizon"][0] < 0.5
  assert real["series"] == "sunspots" and real["points"] == 309
  assert 0.0 < real["esn_nrmse_mean"] < 1.0 and 0.0 < real["ar_nrmse"] < real["persistence_nrmse"]
  assert (workdir / "esn_mackey_glass.png").stat().st_size > 1000
  assert (workdir / "esn_sunspots.png").exists() and (workdir / "metrics.jsonl").exists()
