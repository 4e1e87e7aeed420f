"""Deep-transition RNNs and the deep output (Pascanu et al. 2013): a numpy float64 reference of the
equations, finite-difference gradients, padding invariance, and the cell in bidirectional,
StackedRNN, the Flax modules, vmap and remat; the DOT(S)-RNN frame model trains."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnn_jax import bptt, cells, layers, polyphonic, rundir
from rnn_jax.deep_transition import DeepTransition
from rnn_jax.flax_modules import CellLayer, RNNCell, RNNLayer
from rnn_jax.polyphonic import FrameModel
from rnn_jax.sequence import ScanOptions, StackedRNN, bidirectional, rnn, run_cell

B, T, F, H = 3, 7, 4, 5
LENGTHS = np.array([7, 4, 0])
NP_ACT = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0.0), "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
          "identity": lambda v: v}
CONFIGS = {   # (cell, what the shortcut connects)
    "dt": DeepTransition(H, transition_sizes=(6,)),
    "dts": DeepTransition(H, transition_sizes=(6,), shortcut="last", transition_activation="relu"),
    "dts_deep": DeepTransition(H, transition_sizes=(6, 3), shortcut="last", activation="sigmoid"),
    "dts_all": DeepTransition(H, transition_sizes=(6, 3), shortcut="all"),
}


def init(owner, seed, *args):
  """``owner.init`` as one compiled function (eager init compiles every random draw on its own)."""
  return jax.jit(lambda key: owner.init(key, *args))(jax.random.key(seed))


def normal_like(owner, seed, *args, scale=0.5):
  """Params with the layout of ``owner.init(key, *args)`` (a cell or a stack) drawn by numpy,
  float32: the layout comes from shapes alone, so nothing is compiled."""
  layout = jax.eval_shape(lambda key: owner.init(key, *args), jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda leaf: jnp.asarray(rng.normal(scale=scale, size=leaf.shape), jnp.float32),
                                layout)


def random_params(cell, seed, scale=0.5):
  layout = jax.eval_shape(lambda key: cell.init(key, F), jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return {name: rng.normal(scale=scale, size=value.shape) for name, value in layout.items()}


def reference_step(cell, p, h, x):
  """The equations of the module docstring, written out in numpy for one example."""
  sizes = tuple(cell.transition_sizes) + (H,)
  L = len(sizes)
  z = NP_ACT[cell.transition_activation](p["w_xh"] @ x + p["w_hh"] @ h + p["b"])
  for l in range(2, L + 1):
    pre = p[f"w_{l}"] @ z + p[f"b_{l}"]
    if cell.shortcut == "all" or (cell.shortcut == "last" and l == L):
      pre = pre + p[f"w_s{l}"] @ h
    z = NP_ACT[cell.activation if l == L else cell.transition_activation](pre)
  return z


def reference_rnn(cell, p, h0, xs, lengths):
  ys, finals = np.zeros((B, T, H)), []
  for b in range(B):
    h = h0[b]
    for t in range(lengths[b]):
      h = reference_step(cell, p, h, xs[b, t])
      ys[b, t] = h
    finals.append(h)
  return np.stack(finals), ys


def test_registry_and_parameter_layout():
  dt, dts = cells.make_cell("dt_rnn", 8), cells.make_cell("dts_rnn", 8, transition_sizes=(6, 3))
  assert (dt.sizes, dt.shortcut, dt.name) == ((8, 8), "none", "dt_rnn")
  assert (dts.sizes, dts.shortcut, dts.name, dts.depth) == ((6, 3, 8), "last", "dts_rnn", 3)
  shapes = {k: v.shape for k, v in jax.eval_shape(lambda key: dts.init(key, F), jax.random.key(0)).items()}
  assert shapes == {"w_xh": (6, F), "w_hh": (6, 8), "b": (6,), "w_2": (3, 6), "b_2": (3,), "w_3": (8, 3),
                    "b_3": (8,), "w_s3": (8, 8)}
  all_shapes = jax.eval_shape(lambda key: dataclasses.replace(dts, shortcut="all").init(key, F), jax.random.key(0))
  assert all_shapes["w_s2"].shape == (3, 8) and all_shapes["w_s3"].shape == (8, 8)
  assert bptt.supports(dt) and bptt.supports(dts)
  assert rundir.build(rundir.describe(dts)) == dts   # model.json round trip (tuple sizes)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_numpy_reference_float64(name):
  cell = CONFIGS[name]
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    p = random_params(cell, 3)
    xs, h0 = rng.normal(size=(B, T, F)), rng.normal(size=(B, H))
    expected_final, expected_ys = reference_rnn(cell, p, h0, xs, LENGTHS)
    params = {k: jnp.asarray(v) for k, v in p.items()}
    final, ys = rnn(cell, params, jnp.asarray(xs), jnp.asarray(LENGTHS), initial_carry=jnp.asarray(h0))
    assert ys.dtype == jnp.float64 and ys.shape == (B, T, H)
    np.testing.assert_allclose(np.asarray(ys), expected_ys, atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.asarray(final), expected_final, atol=1e-12, rtol=0)
    np.testing.assert_allclose(np.asarray(final[2]), h0[2], atol=0)   # length 0 keeps h_0
    carry, y = cell.step(params, jnp.asarray(h0[0]), jnp.asarray(xs[0, 0]))
    np.testing.assert_allclose(np.asarray(y), reference_step(cell, p, h0[0], xs[0, 0]), atol=1e-12)


def test_gradients_match_finite_differences_float64():
  """The hand-derived rule (the default) and jax.grad both equal central differences, for a
  three-layer transition with shortcuts into both later layers and relu / sigmoid units."""
  cell = DeepTransition(H, transition_sizes=(6, 3), shortcut="all", transition_activation="relu",
                        activation="sigmoid")
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    params = {k: jnp.asarray(v) for k, v in random_params(cell, 4).items()}
    xs, h0 = jnp.asarray(rng.normal(size=(B, T, F))), jnp.asarray(rng.normal(size=(B, H)))
    weights, lengths = jnp.asarray(rng.normal(size=(B, T, H))), jnp.asarray(LENGTHS)

    def loss(params, grad="auto"):
      final, ys = rnn(cell, params, xs, lengths, initial_carry=h0, options=ScanOptions(grad=grad))
      return jnp.sum(ys * weights) + jnp.sum(jnp.sin(final))

    gradients = jax.jit(lambda p: (jax.grad(loss)(p, "manual"), jax.grad(loss)(p, "autodiff")))
    manual, auto = gradients(params)
    directions = {k: rng.normal(size=v.shape) for k, v in params.items()}
    eps = 1e-6
    loss_at = jax.jit(loss)
    numeric = {name: (loss_at({**params, name: params[name] + eps * directions[name]})
                      - loss_at({**params, name: params[name] - eps * directions[name]})) / (2 * eps)
               for name in params}
    for name in sorted(params):
      np.testing.assert_allclose(np.asarray(manual[name]), np.asarray(auto[name]), atol=1e-12, rtol=0)
      analytic = float(np.sum(np.asarray(manual[name]) * directions[name]))
      assert abs(float(numeric[name]) - analytic) < 1e-7 * max(1.0, abs(analytic)), name


def test_padding_does_not_change_outputs_carries_or_gradients():
  """Steps t >= L change nothing: the batch padded with NaN, or with 5 more NaN steps, gives the
  outputs, final carries and gradients of the batch padded with zeros, forward and reverse."""
  cell = CONFIGS["dts_deep"]
  rng = np.random.default_rng(3)
  params = normal_like(cell, 5, F)
  clean = rng.normal(size=(B, T, F)).astype(np.float32)
  for b, length in enumerate(LENGTHS):
    clean[b, length:] = 0.0
  junk = np.where(clean == 0.0, np.nan, clean).astype(np.float32)
  longer = np.concatenate([junk, np.full((B, 5, F), np.nan, np.float32)], axis=1)
  weights = jnp.asarray(rng.normal(size=(B, T + 5, H)), jnp.float32)

  @jax.jit
  def run(params, xs):
    def loss(params, reverse):
      final, ys = rnn(cell, params, xs, jnp.asarray(LENGTHS), reverse=reverse)
      return jnp.sum(ys * weights[:, :xs.shape[1]]) + jnp.sum(final), (final, ys[:, :T])
    return [jax.value_and_grad(loss, has_aux=True)(params, reverse) for reverse in (False, True)]

  expected = run(params, jnp.asarray(clean))
  for xs in (junk, longer):
    for ((value, (final, ys)), grads), ((value_0, (final_0, ys_0)), grads_0) in zip(run(params, jnp.asarray(xs)),
                                                                                   expected):
      assert np.isfinite(float(value)) and float(value) == pytest.approx(float(value_0), rel=1e-6)
      np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_0), atol=1e-6)
      np.testing.assert_allclose(np.asarray(final), np.asarray(final_0), atol=1e-6)
      assert not np.any(np.asarray(ys)[2])   # a length-0 example outputs zeros
      for name in grads:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(grads_0[name]), atol=1e-5, err_msg=name)


def test_bidirectional_stacked_flax_vmap_and_remat():
  cell = CONFIGS["dts"]
  rng = np.random.default_rng(4)
  xs = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
  lengths = jnp.asarray(LENGTHS)
  length = int(LENGTHS[1])
  stack = StackedRNN(cell, num_layers=2)
  params, backward_params = normal_like(cell, 6, F), normal_like(cell, 7, F)
  stack_params = normal_like(stack, 8, F)

  @jax.jit
  def forward(params, backward_params, stack_params):
    out = {"rnn": rnn(cell, params, xs, lengths)}
    out["vmap"] = jax.vmap(lambda x, n: run_cell(cell, params, x, n))(xs, lengths)
    out["bidirectional"] = bidirectional(cell, params, backward_params, xs, lengths)[1]
    out["flipped"] = run_cell(cell, backward_params, xs[1, :length][::-1])[1][::-1]
    out["stack"] = stack(stack_params, xs, lengths)[1]
    first = rnn(cell, stack_params["layer_0"]["forward"], xs, lengths)[1]
    out["by_hand"] = rnn(cell, stack_params["layer_1"]["forward"], first, lengths)[1]
    out["flax_stack"] = RNNLayer(stack).apply({"params": stack_params}, xs, lengths)[1]
    out["flax_cell"] = RNNCell(cell).apply({"params": params}, jnp.zeros((B, H)), xs[:, 0])[1]
    return out

  out = forward(params, backward_params, stack_params)
  final, ys = out["rnn"]
  # vmap of the one-example scan equals the batched layer.
  np.testing.assert_allclose(np.asarray(out["vmap"][1]), np.asarray(ys), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["vmap"][0]), np.asarray(final), atol=1e-6)
  # Bidirectional: the backward half at t < L is the forward cell run over the reversed real steps.
  both = out["bidirectional"]
  assert both.shape == (B, T, 2 * H)
  np.testing.assert_allclose(np.asarray(both[..., :H]), np.asarray(ys), atol=1e-6)
  np.testing.assert_allclose(np.asarray(both[1, :length, H:]), np.asarray(out["flipped"]), atol=1e-6)
  # A two-layer stack equals its layers chained by hand; the Flax modules equal ours.
  assert out["stack"].shape == (B, T, H) and float(jnp.abs(out["stack"]).sum()) > 1.0
  np.testing.assert_allclose(np.asarray(out["stack"]), np.asarray(out["by_hand"]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["flax_stack"]), np.asarray(out["stack"]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["flax_cell"][:2]), np.asarray(ys[:2, 0]), atol=1e-6)   # [2]: L = 0

  # Checkpointing every 3 steps gives the same outputs and gradients, with either backward pass
  # (which also compares the hand-derived rule with jax.grad for the shortcut into the last layer).
  @jax.jit
  def value_and_grads(params):
    def loss(params, options):
      ys = rnn(cell, params, xs, lengths, options=options)[1]
      return jnp.sum(ys ** 2), ys
    return [jax.value_and_grad(loss, has_aux=True)(params, options) for options in
            (ScanOptions(), ScanOptions(remat_chunk=3), ScanOptions(remat_chunk=3, grad="autodiff"))]

  results = value_and_grads(params)
  (_, reference_ys), reference = results[0]
  np.testing.assert_allclose(np.asarray(reference_ys), np.asarray(ys), atol=1e-6)
  for (_, remat_ys), grads in results[1:]:
    np.testing.assert_allclose(np.asarray(remat_ys), np.asarray(ys), atol=1e-6)
    for name in reference:
      np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(reference[name]), atol=1e-5)


def test_deep_output_matches_numpy_and_a_plain_readout_is_unchanged():
  plain, dense, params = jax.jit(lambda key: (layers.deep_output_init(key, H, 3), layers.dense_init(key, H, 3),
                                               layers.deep_output_init(key, H, 3, (6, 4))))(jax.random.key(9))
  assert sorted(plain) == ["b", "w"] and all(np.array_equal(plain[k], dense[k]) for k in dense)
  assert {k: np.shape(v["w"]) for k, v in params.items() if k.startswith("hidden")} == {"hidden_1": (6, H),
                                                                                      "hidden_2": (4, 6)}
  assert params["w"].shape == (3, 4)
  h = np.random.default_rng(5).normal(size=(2, H)).astype(np.float32)
  p = jax.tree_util.tree_map(np.asarray, params)
  z = np.tanh(np.tanh(h @ p["hidden_1"]["w"].T + p["hidden_1"]["b"]) @ p["hidden_2"]["w"].T + p["hidden_2"]["b"])
  np.testing.assert_allclose(np.asarray(jax.jit(layers.deep_output)(params, jnp.asarray(h))),
                             z @ p["w"].T + p["b"], atol=1e-5)
  with pytest.raises(ValueError, match="unknown activation 'swish'"):
    layers.deep_output(params, jnp.asarray(h), "swish")


def test_dots_frame_model_trains_and_counts_its_parameters():
  """DOT(S)-RNN on a rising scale (frame t sounds pitch t mod K): Adam takes the NLL well below
  the best memoryless model's (each pitch on with probability 1/K), which only the recurrence
  can do; generation runs; the parameter count is the sum of the layers."""
  K = 12
  model = FrameModel(cells.make_cell("dts_rnn", 16), num_pitches=K, output_layer_sizes=(16,))
  params = init(model, 12)
  starts = np.array([0, 3, 7, 10])
  frames = jnp.asarray(np.eye(K)[(starts[:, None] + np.arange(24)[None, :]) % K], jnp.float32)
  lengths = jnp.array([24, 20, 17, 24])
  memoryless = -K * (np.log(1 / K) / K + (K - 1) / K * np.log(1 - 1 / K))   # 3.45 nats per frame
  optimizer = optax.adam(2e-2)

  @jax.jit
  def update(params, state):
    loss, grads = jax.value_and_grad(lambda p: model.nll(p, frames, lengths))(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses = optimizer.init(params), []
  for _ in range(300):   # deep models sit near the memoryless NLL for a while (0.5 nats at the end)
    params, state, loss = update(params, state)
    losses.append(float(loss))
  assert losses[0] > memoryless and losses[-1] < 0.5 * memoryless, (losses[0], losses[-1])
  cell_params = 16 * K + 16 * 16 + 16 + (16 * 16 + 16) + 16 * 16   # w_xh, w_hh, b, (w_2, b_2), w_s2
  assert polyphonic.count_params(model) == cell_params + (16 * 16 + 16) + (K * 16 + K)
  assert model.generate(params, jnp.ones((K,)), 5, jax.random.key(0)).shape == (5, K)
  assert rundir.build(rundir.describe(model)) == model


def test_music_experiment_offers_the_deep_cells():
  from experiments import music
  config = music.Config(cells=("elman", "dts_rnn"), transition_sizes=(12,), output_layer_sizes=(7,))
  config.validate()
  assert music.cell_options(config, "dts_rnn") == {"transition_sizes": (12,)}
  assert music.cell_options(config, "elman") == {}
  assert music.architecture(config, "dts_rnn", 20) == "1x20, transition 12, deep output 7"
  assert set(music.DEEP_CELL_NAMES) <= set(music.Config.__dataclass_fields__["cells"].metadata["choices"])
  row = {"cell": "dts_rnn", "hidden_size": 20, "num_params": 100, "train_nll": 9.0, "valid_nll": 9.1,
         "test_nll": 9.2, "chung_2014_jsb_test_nll": None}
  assert music.format_table([row]).splitlines()[1].split()[-1] == "-"
  sizes = polyphonic.equal_parameter_sizes(["lstm", "dt_rnn", "dts_rnn"], 36)
  assert sizes == {"lstm": 36, "dt_rnn": 67, "dts_rnn": 59}
  budget = polyphonic.count_params(FrameModel(cells.make_cell("lstm", 36)))
  for name in ("dt_rnn", "dts_rnn"):
    count = lambda H: polyphonic.count_params(FrameModel(cells.make_cell(name, H)))
    assert count(sizes[name]) <= budget < count(sizes[name] + 1)


@pytest.mark.parametrize("options,message", [
    (dict(transition_sizes=()), "transition_sizes must be a non-empty tuple"),
    (dict(transition_sizes=(4, 0)), "transition_sizes must be a non-empty tuple"),
    (dict(shortcut="skip"), "unknown shortcut 'skip'"),
    (dict(activation="swish"), "unknown activation 'swish'"),
    (dict(transition_sizes=(4,), recurrent_init="orthogonal"), "need a square W_hh"),
])
def test_bad_hyper_parameters_are_named(options, message):
  with pytest.raises(ValueError, match=message):
    DeepTransition(H, **options)


def test_no_torch_or_keras_counterpart():
  from rnn_jax import interop
  cell = CONFIGS["dt"]
  with pytest.raises(ValueError, match="got DeepTransition"):
    interop.to_torch(cell, random_params(cell, 0))
