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
                        "--implementations=rnn_jax,flax,torch", "--warmup_steps=1")
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
    assert row["untimed_steps"] == 2  # --warmup_steps=1: one untimed step before each repetition's timed one
    assert row["vs_flax"] == pytest.approx(row["tokens_per_s"] / rows[1]["tokens_per_s"], rel=1e-2, abs=1e-3)
    if have_torch:
      assert row["vs_torch"] > 0
  assert all(0 < row["compile_s"] < 120 for row in rows if row["impl"] != "torch")
  # The limit: this machine's matmul peak, and each row's FLOP rate from the stated count.
  peak = results["machine"]["matmul_peak_gflops"]["float32"]
  assert peak > 0 and results["machine"]["matmul_peak_size"] == 256  # the smoke size
  for row in rows:
    assert row["flops"] == benchmark.step_flops("gru", "train", 4, 16, 16, 64, 65)
    assert row["gflops"] == pytest.approx(row["flops"] / row["step_ms"] / 1e6, rel=1e-2)
    assert row["pct_of_peak"] == pytest.approx(100 * row["gflops"] / peak, rel=1e-2, abs=0.01)
    assert row["faults_per_step"] >= 0 and row["compute_dtype"] == "float32"
    assert row["min_step_ms"] <= row["step_ms"] <= row["max_step_ms"]  # the table's min-max column
  assert results["machine"]["cpu_count"] >= 1 and results["warnings"] == []
  assert results["config"]["implementations"] == ["rnn_jax", "flax", "torch"]
  assert results["experiment"] == "benchmark"
  table = (tmp_path / "table.md").read_text()
  assert table.startswith("Machine: ") and "| gru | train | float32 | 4 | 16 | 16 | rnn_jax |" in table
  assert f"float32 {peak:,.0f} GFLOP/s" in table and "| GFLOP/s | % of peak |" in table
  assert "| step ms (median) | min-max ms |" in table
  assert "| gru | train | float32 | 4 | 16 | 16 | rnn_jax |" in done.out
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
  assert [cell.strip() for cell in line.split("|")[13:15]] == ["-", "-"]  # vs torch, vs flax
  assert (tmp_path / "speed.png").stat().st_size > 10_000


@pytest.mark.slow  # a minute of sweeps; the plans are tested below
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
  assert "| lstm | float32 | 4 | 16 | 48 | 7 |" in (tmp_path / "memory" / "table.md").read_text()
  assert plain["gflops"] > 0 and plain["flops"] == remat["flops"]  # remat's recomputation is not counted
  assert (tmp_path / "memory" / "memory.png").stat().st_size > 10_000


def test_presets_set_the_sweep_and_its_sizes_and_explicit_flags_win():
  from absl import flags
  from experiments import common
  parsed = common.parse(benchmark.EXPERIMENT, ["benchmark.py", "--preset=memory", "--seq_len=500"],
                        flags.FlagValues())
  assert parsed.config.sweep == "memory" and parsed.config.batch_size == (16,)
  assert parsed.config.hidden_size == (256,) and parsed.config.seq_len == (500,)
  assert parsed.workdir.endswith("benchmark_memory")


def test_flop_counts_and_the_matmul_peak():
  # forward 2 B T ((D + H) G H + H V); train 3x that (the backward pass is 2x the forward)
  assert benchmark.step_flops("lstm", "infer", 32, 128, 256, 64, 65) == 2 * 32 * 128 * (320 * 4 * 256 + 256 * 65)
  assert benchmark.step_flops("gru", "train", 2, 3, 4, 5, 51) == 3 * 2 * 2 * 3 * (9 * 3 * 4 + 4 * 51)
  assert benchmark.step_flops("elman", "train", 1, 1, 8, 8, 51) == 3 * 2 * (16 * 8 + 8 * 51)
  greedy = benchmark.decode_flops("seq2seq_greedy", "lstm", 2, 10, 8, 4, 51)
  beam = benchmark.decode_flops("seq2seq_beam", "lstm", 2, 10, 8, 4, 51, beam_width=3)
  encoder = 10 * 2 * 2 * 12 * 4 * 8
  assert greedy == encoder + 10 * 2 * 2 * (12 * 4 * 8 + 8 * 51)
  assert beam == encoder + 3 * (greedy - encoder)  # K decoder rows per source
  assert benchmark.decode_flops("lm_sample", "gru", 1, 20, 8, 4, 51) == (16 + 20) * 2 * (12 * 3 * 8 + 8 * 51)
  assert benchmark.decode_flops("music_generate", "elman", 1, 5, 8, 4, 51) == 5 * 2 * (96 * 8 + 8 * 88)
  assert benchmark.matmul_peak_gflops(64, repeats=2) > 0


@pytest.mark.slow  # the decode plan is tested in test_decode_and_devices_plans
def test_decode_sweep_smoke(run_experiment, tmp_path):
  done = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path}", "--sweep=decode", "--cells=gru",
                        "--implementations=rnn_jax,flax,torch", "--beam_width=3")
  assert done.code == 0, done.err
  results = _results(tmp_path)
  rows = results["results"]
  have_torch = any(row["impl"] == "torch" for row in rows)
  impls = ["rnn_jax", "torch"] if have_torch else ["rnn_jax"]
  assert [(row["task"], row["impl"]) for row in rows] == [(task, impl) for task in benchmark.DECODE_TASKS
                                                           for impl in impls]
  assert results["warnings"][0].startswith("skipping flax: the decode sweep times rnn_jax's decoders")
  for row in rows:
    assert (row["batch_size"], row["seq_len"], row["hidden_size"]) == (4, 16, 16)
    assert row["tokens_per_s"] == pytest.approx(4 * 16 / row["step_ms"] * 1000, rel=1e-2)
    assert row["ms_per_token"] == pytest.approx(row["step_ms"] / 16, rel=1e-2)
    assert row["flops"] == benchmark.decode_flops(row["task"], "gru", 4, 16, 16, 64, 65, beam_width=3)
    assert row["gflops"] > 0 and row["timed_steps"] == 2
    assert row["untimed_steps"] == 0  # no warm-up call by default
    assert row["min_step_ms"] <= row["step_ms"] <= row["max_step_ms"]
    if row["impl"] == "rnn_jax":
      assert row["recompiles"] == 0  # one compiled loop per decoder, reused by every call
      if have_torch:
        assert row["vs_torch"] > 0
  table = (tmp_path / "table.md").read_text()
  assert "| seq2seq_beam (K=3) | gru | 4 | 16 | 16 | rnn_jax |" in table and "| recompiles |" in table
  assert (tmp_path / "decode.png").stat().st_size > 10_000


@pytest.mark.slow  # the mesh path is tested end to end in test_data_parallel.py
def test_devices_sweep_smoke(run_experiment, tmp_path):
  done = run_experiment("benchmark", "--smoke", f"--workdir={tmp_path}", "--sweep=devices")
  assert done.code == 0, done.err
  results = _results(tmp_path)
  one, two = results["results"]  # the smoke's num_devices=1,2
  for row, n in ((one, 1), (two, 2)):
    assert row["num_devices"] == row["devices_used"] == n
    assert row["global_batch_size"] == 4 * n and row["tokens_per_s"] > 0
    assert row["loss_abs_diff"] < 1e-5  # the sharded step computes the one-device loss
    assert row["scaling_efficiency"] == pytest.approx(row["speedup"] / n, rel=1e-2)
    assert row["forced_host_devices"] is NO_GPU
  assert one["speedup"] == 1.0
  if NO_GPU:
    assert results["warnings"] == [benchmark.FORCED_DEVICES]
    table = (tmp_path / "table.md").read_text()
    assert "correctness" in table and "not a speed-up" in table and "| lstm | 2 (forced host) | 4 | 8 |" in table
  assert (tmp_path / "devices.png").stat().st_size > 10_000


def _gpu_check_config():
  from absl import flags
  from experiments import common
  return common.parse(benchmark.EXPERIMENT, ["benchmark.py", "--preset=gpu_check"], flags.FlagValues()).config


def test_gpu_check_plan_without_a_gpu(run_experiment, tmp_path):
  """The gpu_check preset's CPU-side logic: its plan on a GPU machine, its skips, its table; no GPU run."""
  config = _gpu_check_config()
  assert config.reuse_workers and config.require_gpu and 0 < config.time_limit_s < 480
  gpu = {"backend": "gpu", "device_count": 1, "torch": True, "torch_cuda": True}
  implementations, warnings = benchmark.plan_speed(config, gpu)
  assert implementations == ["rnn_jax", "rnn_jax_scan", "flax", "jax_cudnn", "torch_cuda"] and warnings == []
  plan, skips = benchmark.speed_points(config, implementations)
  assert len(plan) == 3 * 2 * 2 * 2 * 2 * 2  # cells x modes x dtypes x H x B x T
  for impl in ("jax_cudnn", "rnn_jax_scan"):  # cuDNN itself, and rnn_jax with its cuDNN route off
    points = [point for point, names in plan if impl in names]
    assert len(points) == 16 and all(p["cell"] == "lstm" and p["compute_dtype"] == "float32" for p in points)
  assert sum(len(names) for _, names in plan) == 96 * 3 + 16 + 16
  assert sorted(skips) == ["skipping jax_cudnn for bfloat16: " + benchmark.CUDNN_FLOAT32_ONLY,
                           "skipping jax_cudnn for elman, gru: jax.experimental.rnn has only an LSTM",
                           "skipping rnn_jax_scan for elman, gru, lstm: " + benchmark.CUDNN_ROUTE_ONLY]
  # Here (no GPU): the GPU implementations are skipped with their reasons, and the preset is refused.
  cpu = {"backend": "cpu", "device_count": 1, "torch": True, "torch_cuda": False}
  implementations, warnings = benchmark.plan_speed(config, cpu)
  assert implementations == ["rnn_jax", "rnn_jax_scan", "flax"]
  assert warnings[:2] == ["skipping jax_cudnn: jax_cudnn needs a GPU (JAX's backend here is cpu)",
                          "skipping torch_cuda: torch_cuda needs a CUDA device (torch.cuda.is_available() is False)"]
  if NO_GPU:
    done = run_experiment("benchmark", "--preset=gpu_check", f"--workdir={tmp_path / 'run'}")
    assert done.code == 2 and len(done.err.strip().splitlines()) == 1
    assert "require_gpu: this sweep is meant for a GPU and JAX's backend here is cpu" in done.err
    assert not (tmp_path / "run").exists()
  # The table of such a run: one line per row, "-" where a figure is unknown (peak MB of a reused worker).
  point, names = plan[0]
  rows = [{"impl": impl, **point, "step_ms": 2.0, "tokens_per_s": 2048.0, "gflops": 10.0, "pct_of_peak": 5.0,
           "compile_s": 1.5, "peak_mem_mb": None, "faults_per_step": 0} for impl in names]
  benchmark._add_ratios(rows, benchmark.SPEED_KEY, ("flax", "torch_cuda"))
  table = benchmark.speed_table(rows).splitlines()
  assert len(table) == 2 + len(names)
  assert table[2] == ("| lstm | train | float32 | 32 | 128 | 512 | rnn_jax | 2.0 | - | 2,048 | 10.0 | 5.0% | 1.00x "
                      "| 1.00x | 1.50 | - | 0 |")
  rows[0].update(min_step_ms=1.94, max_step_ms=2.71)  # a row's fastest and slowest timed step
  assert benchmark.speed_table(rows).splitlines()[2].startswith(
      "| lstm | train | float32 | 32 | 128 | 512 | rnn_jax | 2.0 | 1.9-2.7 | 2,048 |")


def test_decode_and_devices_plans():
  config = benchmark.Config(sweep="decode", implementations=("rnn_jax", "flax", "torch_cuda"))
  cpu = {"backend": "cpu", "device_count": 1, "torch": True, "torch_cuda": False}
  implementations, warnings = benchmark.plan_decode(config, cpu)
  assert implementations == ["rnn_jax"] and len(warnings) == 2 and "torch_cuda needs a CUDA device" in warnings[1]
  with pytest.raises(ValueError, match="none of them can run the decode sweep"):
    benchmark.plan_decode(benchmark.Config(sweep="decode", implementations=("flax",)), cpu)
  config = benchmark.Config(sweep="devices", num_devices=(8, 1, 2, 4))
  assert benchmark.plan_devices(config, cpu) == ([1, 2, 4, 8], [benchmark.FORCED_DEVICES])
  gpus = {"backend": "gpu", "device_count": 2, "torch": True, "torch_cuda": True}
  counts, warnings = benchmark.plan_devices(config, gpus)
  assert counts == [1, 2] and warnings == ["skipping num_devices=4: this machine has 2 gpu devices",
                                           "skipping num_devices=8: this machine has 2 gpu devices"]
  deadline = benchmark._Deadline(1e-9)
  import time
  time.sleep(0.01)
  assert deadline.passed({"cell": "lstm", "batch_size": 4})
  assert deadline.warning(1e-9, 3).startswith("time_limit_s=1e-09: 1 of 3 points were not measured, from cell=lstm")
