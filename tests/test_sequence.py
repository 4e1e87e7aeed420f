"""The sequence layer: gradients, padding, reversal, composition with JAX transforms, stacking."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnn_jax import GRU, LSTM, Elman, LSTMState, ScanOptions, StackedRNN, bidirectional, rnn

F = 3


def leaves_close(a, b, atol, rtol=0.0):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=rtol), a, b)


# Compiled once per (cell, options, shapes) and reused: eager rnn calls re-trace their scan every time.
rnn_jit = jax.jit(rnn, static_argnums=0, static_argnames=("reverse", "time_major", "options"))
run_stack = jax.jit(StackedRNN.__call__, static_argnums=0, static_argnames=("train",))


def random_inputs(seed, shape, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# ---- gradients against central finite differences (float64) ------------------------------

GRAD_CELLS = {
    "elman_tanh_readout": Elman(3, readout_size=2),
    "lstm": LSTM(3),
    "lstm_all_options": LSTM(4, forget_bias=1.0, peephole=True, layer_norm=True, proj_size=2),
    "gru_reset_after": GRU(3, reset_after=True),
    "gru_reset_before": GRU(3, reset_after=False),
}


def assert_matches_central_differences(loss, args, seed, eps=1e-5, directions=2, tolerance=1e-7):
  """<grad loss(args), v> == (loss(args + eps v) - loss(args - eps v)) / (2 eps) along random v.

  Directions are drawn for each argument alone, so an error in any one gradient shows.
  """
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  rng = np.random.default_rng(seed)
  for index in range(len(args)):
    for _ in range(directions):
      direction = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.normal(size=v.shape)), args[index])
      shifted = lambda sign: [jax.tree_util.tree_map(lambda a, d: a + sign * eps * d, arg, direction)
                              if i == index else arg for i, arg in enumerate(args)]
      numeric = (loss(*shifted(+1)) - loss(*shifted(-1))) / (2 * eps)
      analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree_util.tree_leaves(grads[index]),
                                                    jax.tree_util.tree_leaves(direction)))
      assert abs(float(numeric) - float(analytic)) <= tolerance * max(1.0, abs(float(analytic))), \
          (index, float(numeric), float(analytic))
  return grads


@pytest.mark.parametrize("name", sorted(GRAD_CELLS))
def test_gradients_match_finite_differences_float64(name):
  """d/d(params, xs, h_0) of sum_dir [sum(ys * u_dir) + sum(carry_T * v_dir)], dir = forward, reversed.

  One loss holds both directions (with their own random weights), so one compilation covers both.
  """
  cell = GRAD_CELLS[name]
  B, T = 3, 4
  lengths = jnp.array([4, 2, 0])
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.normal(scale=0.5, size=v.shape))
              for k, v in cell.init(jax.random.key(0), F).items()}
    xs = jnp.asarray(rng.normal(size=(B, T, F)))
    carry0 = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.normal(size=(B,) + v.shape)),
                                    cell.initial_carry(params))
    output_weights = [jnp.asarray(rng.normal(size=(B, T, cell.output_size))) for _ in range(2)]
    carry_weights = [jax.tree_util.tree_map(lambda v: jnp.asarray(rng.normal(size=v.shape)), carry0)
                     for _ in range(2)]

    @jax.jit
    def loss(params, xs, carry0):
      total = 0.0
      for reverse, u, v in zip((False, True), output_weights, carry_weights):
        final, ys = rnn(cell, params, xs, lengths, initial_carry=carry0, reverse=reverse)
        total += jnp.sum(ys * u) + sum(jnp.sum(c * w) for c, w in zip(jax.tree_util.tree_leaves(final),
                                                                      jax.tree_util.tree_leaves(v)))
      return total

    _, grad_xs, grad_carry0 = assert_matches_central_differences(loss, (params, xs, carry0), seed=1)
    # Padded steps get exactly zero gradient; an empty sequence passes h_0's weights straight through.
    np.testing.assert_array_equal(grad_xs[1, 2:], 0.0)
    np.testing.assert_array_equal(grad_xs[2], 0.0)
    leaves_close(jax.tree_util.tree_map(lambda g: g[2], grad_carry0),
                 jax.tree_util.tree_map(lambda a, b: a[2] + b[2], *carry_weights), atol=1e-12)


# ---- padding invariance (property-based) -------------------------------------------------

PAD_CELLS = [Elman(3, activation="relu", readout_size=2), LSTM(3, peephole=True, proj_size=2), GRU(3)]
PAD_PARAMS = [cell.init(jax.random.key(i), F) for i, cell in enumerate(PAD_CELLS)]
BASE_T = 4


def run_mode(cell, mode, params, xs, lengths):
  """(final carry, ys) of a forward, reversed or bidirectional (sum-merged) run."""
  if mode == "bidirectional":
    return bidirectional(cell, params, params, xs, lengths, merge="sum")
  return rnn(cell, params, xs, lengths, reverse=(mode == "reverse"))


run_mode_jit = jax.jit(run_mode, static_argnums=(0, 1))


@settings(max_examples=25, deadline=None)
@given(cell_index=st.integers(0, len(PAD_CELLS) - 1),
       lengths=st.lists(st.integers(0, BASE_T), min_size=3, max_size=3),
       pad=st.sampled_from([1, 3]),
       mode=st.sampled_from(["forward", "reverse", "bidirectional"]),
       junk=st.sampled_from(["normal", "huge", "nan_inf"]),
       seed=st.integers(0, 2 ** 16))
def test_padding_never_changes_real_outputs_or_final_carry(cell_index, lengths, pad, mode, junk, seed):
  """Filling steps t >= L with anything and appending more of it leaves y_{<L} and carry_L unchanged."""
  cell, params = PAD_CELLS[cell_index], PAD_PARAMS[cell_index]
  rng = np.random.default_rng(seed)
  lengths = np.array(lengths)
  B = len(lengths)
  real = np.arange(BASE_T)[None, :] < lengths[:, None]
  xs = np.where(real[..., None], rng.normal(size=(B, BASE_T, F)), 0.0)
  junk_values = {"normal": rng.normal(size=(B, BASE_T + pad, F)),
                 "huge": rng.choice([-1e30, 1e30], size=(B, BASE_T + pad, F)),
                 "nan_inf": rng.choice([np.nan, np.inf, -np.inf], size=(B, BASE_T + pad, F))}[junk]
  padded = np.concatenate([xs, np.zeros((B, pad, F))], axis=1)
  real_padded = np.arange(BASE_T + pad)[None, :] < lengths[:, None]
  padded = np.where(real_padded[..., None], padded, junk_values)

  final, ys = run_mode_jit(cell, mode, params, jnp.asarray(xs, jnp.float32), jnp.asarray(lengths))
  final_padded, ys_padded = run_mode_jit(cell, mode, params, jnp.asarray(padded, jnp.float32),
                                         jnp.asarray(lengths))
  np.testing.assert_allclose(ys_padded[:, :BASE_T], ys, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(ys_padded[:, BASE_T:], 0.0)
  np.testing.assert_array_equal(np.where(real_padded[..., None], 0.0, ys_padded), 0.0)
  leaves_close(final_padded, final, atol=1e-6)


@pytest.mark.parametrize("index", range(len(PAD_CELLS)), ids=["elman", "lstmp", "gru"])
def test_padding_never_changes_gradients(index):
  """d loss / d params is the same whatever fills the padding, NaN and inf included
  (forward, reverse, bidirectional): padded inputs are zeroed before the projection."""
  cell, params = PAD_CELLS[index], PAD_PARAMS[index]
  rng = np.random.default_rng(index)
  lengths = jnp.array([4, 1, 0])
  real = (jnp.arange(6)[None, :] < lengths[:, None])[..., None]
  xs = jnp.where(real, jnp.asarray(rng.normal(size=(3, 6, F)), jnp.float32), 0.0)
  junk = jnp.where(real, xs, jnp.asarray(10 * rng.normal(size=(3, 6, F)), jnp.float32))
  junk = junk.at[0, 5, 0].set(jnp.nan).at[1, 2, :].set(jnp.inf).at[2, 0, 1].set(-jnp.inf)

  @jax.jit
  def grads(xs):
    def loss(params):
      total = 0.0
      for mode in ("forward", "reverse", "bidirectional"):
        final, ys = run_mode(cell, mode, params, xs, lengths)
        total += jnp.sum(jnp.sin(ys)) + sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(final))
      return total
    return jax.grad(loss)(params)

  leaves_close(grads(junk), grads(xs), atol=1e-6)


# ---- reverse semantics -------------------------------------------------------------------

@pytest.mark.parametrize("cell", [Elman(3, readout_size=2), LSTM(3, proj_size=2), GRU(3, reset_after=False)],
                         ids=["elman", "lstmp", "gru"])
def test_reverse_with_length_equals_forward_over_flipped_prefix(cell):
  """rnn(reverse=True) with length L: y_t = forward-over-(x_{L-1}, ..., x_0) at position L-1-t."""
  params = cell.init(jax.random.key(0), F)
  lengths = np.array([5, 3, 1, 0])
  xs = random_inputs(1, (len(lengths), 5, F))
  final, ys = rnn_jit(cell, params, xs, jnp.asarray(lengths), reverse=True)
  (_, final_backward), ys_bi = bidirectional(cell, params, params, xs, jnp.asarray(lengths), merge="concat")
  for b, L in enumerate(lengths):
    if L == 0:
      expected_final = cell.initial_carry(params)
      np.testing.assert_array_equal(ys[b], 0.0)
    else:
      expected_final, expected_ys = rnn_jit(cell, params, xs[b:b + 1, :L][:, ::-1])
      expected_final = jax.tree_util.tree_map(lambda v: v[0], expected_final)
      np.testing.assert_allclose(ys[b, :L], expected_ys[0, ::-1], atol=1e-6)
      np.testing.assert_allclose(ys_bi[b, :L, cell.output_size:], expected_ys[0, ::-1], atol=1e-6)
    leaves_close(jax.tree_util.tree_map(lambda v: v[b], final), expected_final, atol=1e-6)
    leaves_close(jax.tree_util.tree_map(lambda v: v[b], final_backward), expected_final, atol=1e-6)


# ---- composition with jit, vmap, grad and checkpoint; layouts and options ---------------

COMPOSE_CELL = LSTM(4, proj_size=3)
COMPOSE_PARAMS = COMPOSE_CELL.init(jax.random.key(2), F)


def loss_fn(params, xs, lengths):
  final, ys = rnn(COMPOSE_CELL, params, xs, lengths)
  return jnp.sum(jnp.sin(ys)) + jnp.sum(final.c ** 2)


def test_jit_grad_and_checkpoint_give_identical_results():
  xs, lengths = random_inputs(3, (2, 6, F)), jnp.array([6, 4])
  eager = rnn(COMPOSE_CELL, COMPOSE_PARAMS, xs, lengths)
  jitted = jax.jit(rnn, static_argnums=0)(COMPOSE_CELL, COMPOSE_PARAMS, xs, lengths)
  checkpointed = jax.checkpoint(lambda p, x, l: rnn(COMPOSE_CELL, p, x, l))(COMPOSE_PARAMS, xs, lengths)
  leaves_close(jitted, eager, atol=1e-6)
  leaves_close(checkpointed, eager, atol=1e-6)

  grads = jax.grad(loss_fn)(COMPOSE_PARAMS, xs, lengths)
  leaves_close(jax.jit(jax.grad(jax.checkpoint(loss_fn)))(COMPOSE_PARAMS, xs, lengths), grads, atol=1e-5)
  assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))


def test_vmap_over_an_extra_axis_of_inputs_and_over_params():
  xs = random_inputs(4, (3, 2, 5, F))                      # [E, B, T, F]
  lengths = jnp.array([[5, 1], [2, 3], [0, 5]])            # [E, B]
  final, ys = jax.jit(jax.vmap(lambda x, l: rnn(COMPOSE_CELL, COMPOSE_PARAMS, x, l)))(xs, lengths)
  for e in range(3):
    final_e, ys_e = rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs[e], lengths[e])
    np.testing.assert_allclose(ys[e], ys_e, atol=1e-6)
    leaves_close(jax.tree_util.tree_map(lambda v: v[e], final), final_e, atol=1e-6)
  # An ensemble: vmap over stacked params, shared inputs.
  ensemble = jax.vmap(lambda k: COMPOSE_CELL.init(k, F))(jax.random.split(jax.random.key(5), 2))
  _, ys_ensemble = jax.jit(jax.vmap(lambda p: rnn(COMPOSE_CELL, p, xs[0], lengths[0])))(ensemble)
  for member in range(2):
    params = jax.tree_util.tree_map(lambda v: v[member], ensemble)
    np.testing.assert_allclose(ys_ensemble[member], rnn_jit(COMPOSE_CELL, params, xs[0], lengths[0])[1],
                               atol=1e-6)


def test_time_major_unroll_and_initial_carry_forms_agree():
  xs, lengths = random_inputs(6, (3, 5, F)), jnp.array([5, 2, 0])
  final, ys = rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs, lengths)
  final_tm, ys_tm = rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, jnp.swapaxes(xs, 0, 1), lengths, time_major=True)
  np.testing.assert_allclose(jnp.swapaxes(ys_tm, 0, 1), ys, atol=1e-6)
  leaves_close(final_tm, final, atol=1e-6)
  leaves_close(rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs, lengths, options=ScanOptions(unroll=3)), (final, ys), atol=1e-6)
  # Default zeros == explicit zeros; a shared carry == the same carry repeated per example.
  zeros = COMPOSE_CELL.initial_carry(COMPOSE_PARAMS)
  leaves_close(rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs, lengths, initial_carry=zeros), (final, ys), atol=0)
  shared = LSTMState(h=jnp.arange(3.0) / 3, c=-jnp.arange(4.0) / 4)
  batched = jax.tree_util.tree_map(lambda v: jnp.tile(v, (3, 1)), shared)
  from_shared = rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs, lengths, initial_carry=shared)
  from_batched = rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs, lengths, initial_carry=batched)
  leaves_close(from_shared, from_batched, atol=1e-6)
  # Length 0 returns the initial carry itself; a non-zero h_0 changes the outputs.
  leaves_close(jax.tree_util.tree_map(lambda v: v[2], from_shared[0]), shared, atol=0)
  assert not np.allclose(from_shared[1][0], ys[0])


def test_lengths_equal_to_T_match_no_lengths():
  xs = random_inputs(7, (2, 4, F))
  with_full_lengths = rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs, jnp.array([4, 4]))
  leaves_close(with_full_lengths, rnn_jit(COMPOSE_CELL, COMPOSE_PARAMS, xs), atol=1e-6)


@functools.partial(jax.jit, static_argnums=(0, 1))
def float32_and_bfloat16_runs(cell, mixed, params, xs, lengths):
  """Both runs in one compilation."""
  return rnn(cell, params, xs, lengths), rnn(mixed, params, xs, lengths)


@pytest.mark.parametrize("cell", [LSTM(8), GRU(8), Elman(8, readout_size=5)], ids=["lstm", "gru", "elman"])
def test_bfloat16_compute_is_close_to_float32_and_keeps_float32_carries(cell):
  xs, lengths = random_inputs(8, (2, 6, F)), jnp.array([6, 3])
  params = cell.init(jax.random.key(9), F)
  mixed = dataclasses.replace(cell, dtype="bfloat16")
  (final, ys), (final_bf16, ys_bf16) = float32_and_bfloat16_runs(cell, mixed, params, xs, lengths)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(final_bf16))
  assert ys_bf16.dtype == jnp.float32
  np.testing.assert_allclose(ys_bf16, ys, atol=2e-2)
  leaves_close(final_bf16, final, atol=2e-2)
  assert not np.array_equal(ys_bf16, ys)   # the matmuls really ran in bfloat16
  if isinstance(cell, LSTM):
    grads = jax.jit(jax.grad(lambda p: jnp.sum(rnn(mixed, p, xs, lengths)[1] ** 2)))(params)
    assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


# ---- StackedRNN ----------------------------------------------------------------------------

def test_stacked_dropout_only_in_training():
  stack = StackedRNN(GRU(6), num_layers=2, dropout=0.5)
  params = stack.init(jax.random.key(10), F)
  xs, lengths = random_inputs(11, (2, 5, F)), jnp.array([5, 2])
  eval_1 = run_stack(stack, params, xs, lengths)
  eval_2 = run_stack(stack, params, xs, lengths, train=False, rng=jax.random.key(0))
  no_dropout = run_stack(StackedRNN(GRU(6), num_layers=2), params, xs, lengths)
  leaves_close(eval_1, eval_2, atol=0)
  leaves_close(eval_1, no_dropout, atol=0)
  train_a = run_stack(stack, params, xs, lengths, train=True, rng=jax.random.key(1))
  train_a_again = run_stack(stack, params, xs, lengths, train=True, rng=jax.random.key(1))
  train_b = run_stack(stack, params, xs, lengths, train=True, rng=jax.random.key(2))
  leaves_close(train_a, train_a_again, atol=0)
  assert not np.allclose(train_a[1], eval_1[1])
  assert not np.allclose(train_a[1], train_b[1])
  # Dropout sits between layers: the first layer reads the raw inputs, so its final state is unchanged.
  np.testing.assert_array_equal(train_a[0][0], eval_1[0][0])
  assert not np.allclose(train_a[0][1], eval_1[0][1])
  np.testing.assert_array_equal(train_a[1][1, 2:], 0.0)     # padding stays zero in training too


def test_stacked_residual_adds_each_layer_input():
  cell = LSTM(F)
  stack = StackedRNN(cell, num_layers=3, residual=True)
  params = stack.init(jax.random.key(12), F)
  xs, lengths = random_inputs(13, (2, 4, F)), jnp.array([4, 3])
  _, ys = run_stack(stack, params, xs, lengths)
  _, layer_0 = rnn_jit(cell, params["layer_0"]["forward"], xs, lengths)
  _, layer_1 = rnn_jit(cell, params["layer_1"]["forward"], layer_0, lengths)
  layer_1 = layer_1 + layer_0
  _, layer_2 = rnn_jit(cell, params["layer_2"]["forward"], layer_1, lengths)
  np.testing.assert_allclose(ys, layer_2 + layer_1, atol=1e-6)


def test_stacked_learnable_initial_state_gets_gradients():
  stack = StackedRNN(LSTM(4), num_layers=2, bidirectional=True, learn_initial_state=True)
  params = stack.init(jax.random.key(14), F)
  assert set(params["layer_1"]) == {"forward", "backward", "initial_forward", "initial_backward"}
  assert isinstance(params["layer_0"]["initial_forward"], LSTMState)
  xs, lengths = random_inputs(15, (2, 4, F)), jnp.array([4, 2])

  def loss(params):
    return jnp.sum(run_stack(stack, params, xs, lengths)[1] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for layer in ("layer_0", "layer_1"):
    for direction in ("initial_forward", "initial_backward"):
      for leaf in jax.tree_util.tree_leaves(grads[layer][direction]):
        assert np.abs(leaf).max() > 0, (layer, direction)
  moved = jax.tree_util.tree_map(lambda v: v, params)
  moved["layer_0"]["initial_forward"] = LSTMState(h=jnp.ones(4), c=jnp.ones(4))
  assert not np.allclose(run_stack(stack, moved, xs, lengths)[1], run_stack(stack, params, xs, lengths)[1])


@pytest.mark.parametrize("cell, bidirectional, merge, expected", [
    (GRU(5), False, "concat", 5),
    (GRU(5), True, "concat", 10),
    (GRU(5), True, "sum", 5),
    (Elman(5, readout_size=2), True, "concat", 4),
    (LSTM(5, proj_size=3), True, "concat", 6),
])
def test_stacked_output_size(cell, bidirectional, merge, expected):
  stack = StackedRNN(cell, num_layers=2, bidirectional=bidirectional, merge=merge)
  params = jax.eval_shape(lambda key: stack.init(key, F), jax.random.key(16))
  assert stack.output_size == expected
  assert params["layer_1"]["forward"]["w_xh"].shape[1] == expected
  _, ys = jax.eval_shape(stack, params, jax.ShapeDtypeStruct((2, 3, F), jnp.float32), jnp.array([3, 1]))
  assert ys.shape == (2, 3, expected)


def test_stacked_given_initial_carries_and_jit():
  cell = GRU(4)
  stack = StackedRNN(cell, num_layers=2)
  params = stack.init(jax.random.key(18), F)
  xs, lengths = random_inputs(19, (2, 4, F)), jnp.array([4, 0])
  starts = [jnp.full((4,), 0.5), None]
  finals, ys = stack(params, xs, lengths, initial_carries=starts)
  np.testing.assert_allclose(finals[0][1], 0.5)             # length 0 keeps the given h_0
  np.testing.assert_array_equal(finals[1][1], 0.0)          # layer 1 starts from zeros
  jitted = jax.jit(lambda p, x, l: stack(p, x, l, initial_carries=starts))(params, xs, lengths)
  leaves_close(jitted, (finals, ys), atol=1e-6)


@pytest.mark.parametrize("cell", [LSTM(5), GRU(4), Elman(3, readout_size=2)], ids=["lstm", "gru", "elman"])
def test_stacked_step_by_step_equals_the_whole_sequence(cell):
  """StackedRNN.step, called once per token from initial_carries, gives the carries and outputs
  of the scanned stack (the decoding and generation path)."""
  stack = StackedRNN(cell, num_layers=3, residual=cell.output_size == cell.state_size,
                     learn_initial_state=True)
  params = stack.init(jax.random.key(0), F)
  xs = jax.random.normal(jax.random.key(1), (2, 6, F))
  final, ys = stack(params, xs)
  carries = stack.initial_carries(params, batch_size=2)
  outputs = []
  for t in range(xs.shape[1]):
    carries, y_t = stack.step(params, carries, xs[:, t])
    outputs.append(y_t)
  leaves_close(jnp.stack(outputs, axis=1), ys, atol=1e-5)
  leaves_close(carries, final, atol=1e-5)
  with pytest.raises(ValueError, match="bidirectional stack reads the whole sequence"):
    StackedRNN(cell, bidirectional=True).step(params, carries, xs[:, 0])
