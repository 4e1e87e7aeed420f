"""The seeds' "hello" example: the printed forward pass is arithmetically right and BPTT learns "o"."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "hello.py")


def vectors(text: str, label: str) -> list[np.ndarray]:
  """Every bracketed vector printed after ``label`` in a forward trace."""
  pattern = re.escape(label) + r"\s*=\s*\[([^\]]*)\]"
  return [np.array([float(v) for v in match.split(",")]) for match in re.findall(pattern, text)]


def check_trace(text: str):
  """Each printed stage follows from the previous ones (to the 4 printed decimals)."""
  input_terms = vectors(text, "W_xh x_t")
  recurrent_terms = vectors(text, "W_hh h_(t-1) + b")
  hidden = vectors(text, "h_t = tanh(sum)")
  outputs = vectors(text, "y_t = W_hy h_t + b_y")
  assert len(input_terms) == len(recurrent_terms) == len(hidden) == len(outputs) == 4
  for a, r, h in zip(input_terms, recurrent_terms, hidden):
    np.testing.assert_allclose(np.tanh(a + r), h, atol=2e-4)
  probabilities = re.findall(r"p_t = softmax\(y_t\)\s*=\s*(.*)", text)
  for line, y in zip(probabilities, outputs):
    p = np.array([float(item.split(":")[1]) for item in line.split(", ")])
    np.testing.assert_allclose(p, np.exp(y) / np.exp(y).sum(), atol=2e-3)


def run_hello(*flags):
  return subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  """One run on the defaults: (workdir, stdout, results)."""
  workdir = str(tmp_path_factory.mktemp("hello") / "run")
  result = run_hello(f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return workdir, result.stdout, json.load(f)


def test_hello_learns_to_complete_hell_with_o(default_run):
  workdir, stdout, results = default_run
  assert "after 'hell' the model predicts 'o'" in stdout
  assert results["learned"] and results["predicted"] == "ello"
  assert results["p_last_o_after"] >= 0.9 > results["p_last_o_before"]
  assert results["config"]["hidden_size"] == 3
  for name in ("forward_before.txt", "forward_after.txt"):
    with open(os.path.join(workdir, name)) as f:
      check_trace(f.read())
  assert os.path.exists(os.path.join(workdir, "probabilities.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if '"train"' in line]
  assert losses[-1] < losses[0]


def test_hello_smoke_then_resume_matches_the_uninterrupted_run(default_run, tmp_path):
  _, _, uninterrupted = default_run
  workdir = str(tmp_path / "hello_smoke")
  first = run_hello("--smoke", f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["steps"] == 10
  refused = run_hello("--smoke", f"--workdir={workdir}")
  assert refused.returncode != 0 and "pass --resume" in refused.stderr
  resumed = run_hello(f"--workdir={workdir}", "--resume")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  # Params and Adam state restored exactly: the same trajectory as one uninterrupted run.
  assert results["steps"] == uninterrupted["steps"] > 10
  assert results["p_last_o_after"] == pytest.approx(uninterrupted["p_last_o_after"], abs=1e-6)
