"""The "hello" example: the printed forward pass is arithmetically right and BPTT learns "o"."""

import contextlib
import io
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import experiment_module
from rnn_jax import load_run


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


def results_of(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  """One in-process run on the defaults: (workdir, stdout, results)."""
  from experiments import common
  workdir = str(tmp_path_factory.mktemp("hello") / "run")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    code = common.run(experiment_module("hello").EXPERIMENT, ["--progress=false", f"--workdir={workdir}"])
  assert code == 0
  return workdir, out.getvalue(), results_of(workdir)


def test_hello_learns_to_complete_hell_with_o(default_run):
  workdir, stdout, results = default_run
  assert "after 'hell' the model predicts 'o'" in stdout
  assert results["learned"] and results["predicted"] == "ello"
  assert results["p_last_o_after"] >= 0.9 > results["p_last_o_before"]
  assert results["valid_min_target_probability"] >= 0.9 and results["valid_accuracy"] == 1.0
  assert results["steps"] == results["best_step"] < 2000          # stopped as soon as learned
  assert results["config"]["hidden_size"] == 3
  for name in ("forward_before.txt", "forward_after.txt"):
    with open(os.path.join(workdir, name)) as f:
      check_trace(f.read())
  for name in ("probabilities.png", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if '"train"' in line]
  assert losses[-1] < losses[0]
  # The run directory alone gives back the trained model (model.json, vocab.json, checkpoints/).
  loaded = load_run(workdir)
  assert loaded.vocab.tokens[:4] == ["h", "e", "l", "o"]
  _, logits = loaded.model(loaded.params, jnp.eye(4)[jnp.array([0, 1, 2, 2])])
  p_o = float(np.exp(logits[-1, 3]) / np.exp(logits[-1]).sum())
  assert p_o == pytest.approx(results["p_last_o_after"], abs=1e-5)


def test_hello_smoke_then_resume_matches_the_uninterrupted_run(default_run, tmp_path, run_experiment):
  _, _, uninterrupted = default_run
  workdir = str(tmp_path / "hello_smoke")
  first = run_experiment("hello", "--smoke", f"--workdir={workdir}")
  assert first.code == 0, first.err[-3000:]
  assert results_of(workdir)["steps"] == 10
  refused = run_experiment("hello", "--smoke", f"--workdir={workdir}")
  assert refused.code == 2 and "pass --resume" in refused.err
  resumed = run_experiment("hello", f"--workdir={workdir}", "--resume", "--steps=2000")
  assert resumed.code == 0, resumed.err[-3000:]
  results = results_of(workdir)
  # Params and Adam state restored exactly: the same trajectory as one uninterrupted run.
  assert results["resumed_from_step"] == 10 and results["steps"] == uninterrupted["steps"] > 10
  assert results["p_last_o_after"] == pytest.approx(uninterrupted["p_last_o_after"], abs=1e-6)


def test_hello_rejects_a_one_character_word(run_experiment, tmp_path):
  result = run_experiment("hello", "--text=h", f"--workdir={tmp_path}")
  assert result.code == 2 and "text must have at least 2 characters" in result.err
