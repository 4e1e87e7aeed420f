"""rnn_jax.runtime.retain_freed_memory: applied before JAX starts, it removes the page
faults XLA:CPU's per-call temporary buffer costs every train step."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# An LSTM char-LM train step (B=32, T=128, H=256): XLA's temporary buffer for it is
# far above glibc's 32 MB mmap threshold. Prints the page faults of 4 steps after 10 warm-up steps.
_STEP_FAULTS = r"""
import json, resource, sys
retain = sys.argv[1] == "1"
from rnn_jax import runtime
applied = runtime.retain_freed_memory() if retain else False
import jax, jax.numpy as jnp
from rnn_jax import layers, losses, optim, train
from rnn_jax.cells import make_cell
from rnn_jax.sequence import rnn
cell = make_cell("lstm", 256)
k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
params = {"embed": layers.embedding_init(k1, 65, 64), "rnn": cell.init(k2, 64), "out": layers.dense_init(k3, 256, 65)}
ids = jax.random.randint(k1, (32, 129), 0, 65)
def loss(p):
  hs = rnn(cell, p["rnn"], layers.embed(p["embed"], ids[:, :-1]))[1]
  return losses.cross_entropy(layers.dense(p["out"], hs), ids[:, 1:], reduction="mean")
opt = optim.make_optimizer("adam", 1e-3, clip=1.0)
@jax.jit
def step(p, s):
  g = jax.grad(loss)(p)
  u, s = opt.update(g, s, p)
  return jax.tree_util.tree_map(jnp.add, p, u), s
state = opt.init(params)
temp_mb = step.lower(params, state).compile().memory_analysis().temp_size_in_bytes / 2 ** 20
for _ in range(10):  # the heap settles in the first few steps
  params, state = step(params, state)
jax.block_until_ready(params)
# The median over 8 steps: even with retention the heap now and then grows once more to a new
# high-water mark (one step faults in a whole temporary buffer, then 0 again; seen at steps
# 12-15 with and without the CPU LSTM kernel), which a 4-step mean counted as a per-step cost.
per_step = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  params, state = step(params, state)
  jax.block_until_ready(params)
  per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(per_step)[len(per_step) // 2]
print(json.dumps({"applied": applied, "faults_per_step": faults, "temp_mb": temp_mb}))
"""


def _python(code, *args, env=None):
  done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                        cwd=ROOT, env={**os.environ, **(env or {})})
  assert done.returncode == 0, done.stderr[-3000:]
  return done


@glibc_only
def test_retaining_freed_memory_removes_the_per_step_page_faults():
  # RNN_JAX_RETAIN_FREED_MEMORY=0: glibc's defaults (import rnn_jax would apply it otherwise).
  default = json.loads(_python(_STEP_FAULTS, "0", env={"RNN_JAX_RETAIN_FREED_MEMORY": "0"}
                               ).stdout.strip().splitlines()[-1])
  retained = json.loads(_python(_STEP_FAULTS, "1").stdout.strip().splitlines()[-1])
  assert retained["applied"] is True
  assert default["temp_mb"] > 32  # above glibc's largest mmap threshold
  # Without it every step faults in a large part of the temporary buffer again (4 KB pages).
  assert default["faults_per_step"] > 0.25 * default["temp_mb"] * 256
  assert retained["faults_per_step"] < default["faults_per_step"] / 10


@glibc_only
def test_import_applies_it_before_jax_starts_and_not_after():
  code = "import rnn_jax; print(rnn_jax.runtime.retains_freed_memory(), rnn_jax.runtime.status()['how'])"
  env = {"JAX_PLATFORMS": "cpu"}
  assert _python(code, env=env).stdout.split()[:3] == ["True", "applied", "at"]
  late = "import jax.numpy as jnp; jnp.ones(2).block_until_ready()\n" + code
  out = _python(late, env=env).stdout
  assert out.startswith("False not applied at import: JAX's backend had already started"), out


@glibc_only
def test_environment_switch_turns_it_off():
  # With the switch at 0 neither import rnn_jax nor the call applies it.
  code = "from rnn_jax import runtime; print(runtime.retain_freed_memory(), runtime.retains_freed_memory())"
  assert _python(code, env={"RNN_JAX_RETAIN_FREED_MEMORY": "0"}).stdout.split() == ["False", "False"]
  assert _python(code, env={"RNN_JAX_RETAIN_FREED_MEMORY": "1"}).stdout.split() == ["True", "True"]


@glibc_only
def test_calling_it_after_jax_started_warns():
  code = ("import warnings, jax.numpy as jnp; jnp.ones(2).block_until_ready()\n"
          "from rnn_jax import runtime\n"
          "with warnings.catch_warnings(record=True) as caught:\n"
          "  warnings.simplefilter('always'); runtime.retain_freed_memory()\n"
          "print([str(w.message) for w in caught])")
  out = _python(code).stdout
  assert "before the first JAX computation" in out
