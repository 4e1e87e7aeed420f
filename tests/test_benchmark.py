"""experiments/benchmark.py --smoke: each sweep runs end to end and writes sane numbers."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "benchmark.py")


def _run(workdir, *flags):
  command = [sys.executable, SCRIPT, "--smoke", f"--workdir={workdir}", *flags]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_speed_sweep_smoke(tmp_path):
  impls = "rnn_jax,flax,torch"
  out = tmp_path / "bench.json"
  results = _run(tmp_path, "--cells=gru", f"--impls={impls}", f"--out={out}")
  rows = results["results"]
  have_torch = any(row["impl"] == "torch" for row in rows)
  assert {row["impl"] for row in rows} == ({"rnn_jax", "flax", "torch"} if have_torch else {"rnn_jax", "flax"})
  for row in rows:
    assert row["cell"] == "gru" and row["mode"] == "train" and (row["batch"], row["seq_len"]) == (4, 16)
    assert row["step_ms"] > 0 and row["tokens_per_s"] > 0
    assert abs(row["tokens_per_s"] * row["step_ms"] / 1000 - 4 * 16) < 0.5
    assert row["peak_mem_mb"] > 10  # RSS high-water of the worker process
  jax_rows = [row for row in rows if row["impl"] != "torch"]
  assert all(0 < row["compile_s"] < 120 for row in jax_rows)
  assert all(row["vs_flax"] > 0 for row in rows)
  if have_torch:
    assert all(row["vs_torch"] > 0 for row in rows)
  assert "machine" in results and results["machine"]["cpu_count"] >= 1
  assert json.loads(out.read_text())["results"] == rows
  assert "| gru | train | 4 | 16 | 16 | rnn_jax |" in (tmp_path / "table.md").read_text()
  assert (tmp_path / "speed.png").stat().st_size > 0
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2 * len(rows)


def test_parallel_and_memory_sweeps_smoke(tmp_path):
  parallel = _run(tmp_path / "parallel", "--sweep=parallel", "--parallel_models=mingru,gru_deer",
                  "--parallel_seq_lens=64")
  rows = parallel["results"]
  assert [row["model"] for row in rows] == ["mingru", "gru_deer"]
  for row in rows:
    assert row["speedup"] > 0 and row["max_abs_diff"] < 1e-4
  assert rows[1]["converged"] and not rows[1]["fell_back"]
  memory = _run(tmp_path / "memory", "--sweep=memory", "--memory_seq_lens=48")
  plain, remat = memory["results"]
  assert plain["remat_chunk"] is None and remat["remat_chunk"] == 7  # round(sqrt(48))
  assert plain["peak_mem_mb"] > 10 and remat["peak_mem_mb"] > 10
  assert (tmp_path / "memory" / "memory.png").stat().st_size > 0
