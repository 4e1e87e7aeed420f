"""Time one char-LM step of the rnn_jax in a given checkout, to compare two commits in one run.

  python tools/time_checkout.py CHECKOUT CELL H MODE     # MODE: train or infer; prints {"ms": median}

The model is the benchmark's: embed 64 -> RNN (H) -> dense 65, mean cross-entropy, Adam with
global-norm clipping 1.0, B=32, T=128; 3 warm-up steps, then the median of 15.
"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from rnn_jax import runtime
runtime.retain_freed_memory()
import jax, jax.numpy as jnp, numpy as np, optax
from rnn_jax import layers, make_cell, rnn
cell_name, H, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
B, T, D, V = 32, 128, 64, 65
cell = make_cell(cell_name, H)
k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
params = {"embed": layers.embedding_init(k1, V, D), "rnn": cell.init(k2, D), "out": layers.dense_init(k3, H, V)}
ids = jnp.asarray(np.random.default_rng(0).integers(0, 51, (B, T + 1)), jnp.int32)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
def loss(p, ids):
  hs = rnn(cell, p["rnn"], layers.embed(p["embed"], ids[:, :-1]))[1]
  logits = layers.dense(p["out"], hs)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
@jax.jit
def train(p, s, ids):
  l, g = jax.value_and_grad(loss)(p, ids); u, s = opt.update(g, s, p); return optax.apply_updates(p, u), s, l
@jax.jit
def infer(p, ids):
  return layers.dense(p["out"], rnn(cell, p["rnn"], layers.embed(p["embed"], ids[:, :-1]))[1])
state = opt.init(params)
if mode == "train":
  step = lambda: jax.block_until_ready(train(params, state, ids))
else:
  step = lambda: jax.block_until_ready(infer(params, ids))
for _ in range(3): step()
times = []
for _ in range(15):
  t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"ms": 1000 * float(np.median(times))}))
