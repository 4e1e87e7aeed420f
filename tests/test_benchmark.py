"""experiments/benchmark.py in this process (its timing workers are still their own processes).

Each sweep runs end to end at smoke sizes and writes sane numbers; the command line refuses
what cannot be measured here with one line and exit code 2, and warns where a comparison
would mislead.
"""

import importlib.util
import json
import logging

import jax
import pytest

from experiments import benchmark

NO_GPU = jax.default_backend() == "cpu"


def _results(workdir):
  with open(workdir / "results.json") as handle:
    return json.load(handle)


def test_speed_sweep_smoke(run_experiment, tmp_path):
  done = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path}", "--cells=gru",
                        "--implementations=rnn_jax,flax,torch")
  assert done.code == 0, done.err
  results = _results(tmp_path)
  rows = results["results"]
  have_torch = any(row["impl"] == "torch" for row in rows)
  assert [row["impl"] for row in rows] == (["rnn_jax", "flax", "torch"] if have_torch else ["rnn_jax", "flax"])
  for row in rows:
    assert row["cell"] == "gru" and row["mode"] == "train"
    assert (row["batch_size"], row["seq_len"], row["hidden_size"]) == (4, 16, 16)  # the smoke sizes
    assert row["step_ms"] > 0 and row["tokens_per_s"] > 0
    assert abs(row["tokens_per_s"] * row["step_ms"] / 1000 - 4 * 16) < 0.5
    assert row["peak_mem_mb"] > 10  # RSS high-water of the worker process
    assert row["timed_steps"] == 2  # repeats 2 x steps 1
    assert row["vs_flax"] == pytest.approx(row["tokens_per_s"] / rows[1]["tokens_per_s"], rel=1e-2, abs=1e-3)
    if have_torch:
      assert row["vs_torch"] > 0
  assert all(0 < row["compile_s"] < 120 for row in rows if row["impl"] != "torch")
  assert results["machine"]["cpu_count"] >= 1 and results["warnings"] == []
  assert results["config"]["implementations"] == ["rnn_jax", "flax", "torch"]
  assert results["experiment"] == "benchmark"
  table = (tmp_path / "table.md").read_text()
  assert table.startswith("Machine: ") and "| gru | train | 4 | 16 | 16 | rnn_jax |" in table
  assert "| gru | train | 4 | 16 | 16 | rnn_jax |" in done.out
  assert (tmp_path / "speed.png").stat().st_size > 10_000
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == 2 * len(rows) and [r["step"] for r in records] == list(range(1, len(records) + 1))
  assert {r["impl"] for r in records} == {row["impl"] for row in rows}
  # Fresh processes of the script (the workers) print no JAX backend-probe lines.
  assert "Unable to initialize backend" not in (tmp_path / "workers.log").read_text()
  assert "Unable to initialize backend" not in done.err
  # The run directory is not measured over without --overwrite, and there is nothing to resume.
  again = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path}")
  assert again.code == 2 and "already holds a benchmark; pass --overwrite" in again.err
  resumed = run_experiment("benchmark", f"--workdir={tmp_path}", "--resume")
  assert resumed.code == 2 and "nothing to continue" in resumed.err
  assert _results(tmp_path)["results"] == rows


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_gpu_only_implementations_on_a_cpu_machine_are_one_line_errors(run_experiment, tmp_path):
  done = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path / 'run'}",
                        "--implementations=jax_cudnn,torch_cuda")
  assert done.code == 2
  lines = done.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("benchmark: error: implementations=jax_cudnn,torch_cuda: "
                                                 "none of them can run here: jax_cudnn needs a GPU")
  assert "torch_cuda" in lines[0] and "Traceback" not in done.err
  assert not (tmp_path / "run").exists()  # refused before anything was written


def test_old_flag_names_and_bad_values_are_one_line_errors(run_experiment, tmp_path):
  for argv, expected in ((["--hidden=256"], "Unknown command line flag 'hidden'"),
                         (["--batch=32"], "Unknown command line flag 'batch'"),
                         (["--cells=lstm,rnn"], "cells='rnn' is not one of"),
                         (["--hidden_size=256,0"], "hidden_size must be >= 1"),
                         (["--vocab_size=40"], "vocab_size must be >= 51")):
    done = run_experiment("benchmark", f"--workdir={tmp_path / 'run'}", *argv)
    assert done.code == 2 and expected in done.err, (argv, done.err)
    assert len(done.err.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


def test_some_implementations_unavailable_are_skipped_with_a_warning():
  config = benchmark.Config(implementations=("rnn_jax", "jax_cudnn"))
  implementations, warnings = benchmark.plan_speed(config)
  if NO_GPU:
    assert implementations == ["rnn_jax"]
    assert warnings == ["skipping jax_cudnn: jax_cudnn needs a GPU (JAX's backend here is cpu)"]
  else:
    assert implementations == ["rnn_jax", "jax_cudnn"]


@pytest.mark.skipif(not NO_GPU, reason="bfloat16 is emulated only on a CPU")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_bfloat16_on_cpu_warns_and_leaves_out_the_torch_ratio(run_experiment, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    done = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path}", "--cells=elman",
                          "--implementations=torch", "--compute_dtype=bfloat16")
  assert done.code == 0, done.err
  results = _results(tmp_path)
  assert results["warnings"] == [benchmark.BF16_ON_CPU]
  assert any("bfloat16 on a CPU is emulated" in record.getMessage() for record in caplog.records)
  header, _, table = (tmp_path / "table.md").read_text().partition("| cell |")
  assert "**Warning:** bfloat16 on a CPU is emulated" in header and "not meaningful" in header
  [row] = results["results"]
  assert row["impl"] == "torch" and row["tokens_per_s"] > 0
  assert "vs_torch" not in row  # in float32 the torch row reads 1.00x against itself
  [line] = [line for line in table.splitlines() if line.startswith("| elman |")]
  assert [cell.strip() for cell in line.split("|")[9:11]] == ["-", "-"]  # vs torch, vs flax
  assert (tmp_path / "speed.png").stat().st_size > 10_000


def test_parallel_and_memory_sweeps_smoke(run_experiment, tmp_path):
  done = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path / 'parallel'}", "--sweep=parallel",
                        "--parallel_models=mingru,gru_deer", "--seq_len=64")
  assert done.code == 0, done.err
  rows = _results(tmp_path / "parallel")["results"]
  assert [row["model"] for row in rows] == ["mingru", "gru_deer"]
  for row in rows:
    assert (row["batch_size"], row["hidden_size"], row["seq_len"]) == (4, 16, 64)
    assert row["speedup"] == pytest.approx(row["sequential_ms"] / row["parallel_ms"], rel=2e-2)
    assert row["max_abs_diff"] < 1e-4  # parallel evaluation equals the sequential scan
  assert rows[1]["converged"] and not rows[1]["fell_back"] and rows[1]["iterations"] >= 1
  assert (tmp_path / "parallel" / "parallel.png").stat().st_size > 10_000

  done = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path / 'memory'}", "--sweep=memory",
                        "--seq_len=48")
  assert done.code == 0, done.err
  plain, remat = _results(tmp_path / "memory")["results"]
  assert plain["remat_chunk"] == 0 and remat["remat_chunk"] == 7  # round(sqrt(48))
  assert plain["peak_mem_mb"] > 10 and remat["peak_mem_mb"] > 10
  assert "| lstm | 4 | 16 | 48 | 7 |" in (tmp_path / "memory" / "table.md").read_text()
  assert (tmp_path / "memory" / "memory.png").stat().st_size > 10_000


def test_presets_set_the_sweep_and_its_sizes_and_explicit_flags_win():
  from absl import flags
  from experiments import common
  parsed = common.parse(benchmark.EXPERIMENT, ["benchmark.py", "--preset=memory", "--seq_len=500"],
                        flags.FlagValues())
  assert parsed.config.sweep == "memory" and parsed.config.batch_size == (16,)
  assert parsed.config.hidden_size == (256,) and parsed.config.seq_len == (500,)
  assert parsed.workdir.endswith("benchmark_memory")
