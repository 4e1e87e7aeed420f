"""Property tests (hypothesis) of the public sequence API: ``rnn``, ``run_cell``, ``bidirectional`` and
``StackedRNN`` over every named cell (``cells.PRESETS``), every gradient path (the plain scan with
autodiff, the hand-derived BPTT of ``rnn_jax.bptt``, remat, forward mode) and the fused CPU LSTM kernel.

The property: a call either returns finite outputs and gradients that match the plain scan
(``ScanOptions(grad="autodiff")``, to float32 or float64 tolerance), or raises ValueError with a
message; never another exception, never a silent NaN. The plain scan itself is checked against a
loop of ``cell.step`` (the padding rule of ``rnn_jax.sequence``).

Shapes are fixed per test (B=3, T=4, F=2, H=3; H=16 takes the fused kernel) so that each compiled
function serves every example: hypothesis varies values (params, inputs, lengths, carries,
cotangents), not shapes. Examples are derandomised (the same on every run). The ``slow`` variants
draw more examples.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from rnn_jax import ScanOptions, StackedRNN, bidirectional, bptt, cells, layers, rnn, run_cell  # noqa: E402
from rnn_jax.cells import Elman, LSTMState  # noqa: E402

B, T, F, H = 3, 4, 2, 3
KERNEL_H = 16  # a multiple of the kernel's vector width (8 or 16)
CELL_NAMES = tuple(cells.PRESETS)
COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAST = settings(max_examples=3, **COMMON)
MORE = settings(max_examples=30, **COMMON)
TOLERANCE = {"float32": dict(rtol=2e-4, atol=2e-5), "float64": dict(rtol=1e-9, atol=1e-11)}

SCAN = ScanOptions(grad="autodiff")
MANUAL = ScanOptions(grad="manual")
REMAT = ScanOptions(grad="auto", remat_chunk=3, unroll=2)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def canonical(cell):
  """The cell with the hyper-parameters that only ``init`` reads reset, so that presets which differ
  only there (tanh / tanh_orthogonal, relu / irnn) share one compiled function."""
  if isinstance(cell, Elman):
    return dataclasses.replace(cell, recurrent_init="torch", recurrent_gain=1.0, spectral_radius=None)
  return cell


def make(name: str, hidden_size: int = H, **options):
  """(the preset cell, the cell to run) for a PRESETS name."""
  cell = cells.make_cell(name, hidden_size, **options)
  return cell, canonical(cell)


def batched(carry, batch: int):
  return jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, (batch,) + c.shape), carry)


def compiled(function):
  """jit with XLA's backend (LLVM) optimisation off: these functions run a few microseconds on tiny
  shapes, so compiling is their whole cost; the HLO, hence what is computed, is the same."""
  return jax.jit(function, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def rnn_function(cell, options: ScanOptions, masked: bool, directions: tuple = (False, True)):
  """jit(value_and_grad) of a loss over ``rnn`` from one initial carry, in each direction of
  ``directions`` (reverse=False, True).

  Returns ((loss, ((carry, ys) per direction)), (d params, d xs, d initial carry)).
  """
  def loss(params, xs, carry, lengths, weights):
    lengths = lengths if masked else None
    outputs = tuple(rnn(cell, params, xs, lengths, initial_carry=carry, reverse=reverse, options=options)
                    for reverse in directions)
    value = sum(jnp.sum(ys * weights[k]) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(c))
                for k, (c, ys) in enumerate(outputs))
    return value, outputs

  return compiled(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def assert_finite(tree, what: str):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.inexact):
      assert np.all(np.isfinite(value)), f"{what}: non-finite values in {jax.tree_util.keystr(path)}"


def assert_close(got, want, dtype: str, what: str):
  assert_finite(got, what)
  assert_finite(want, f"{what} (reference)")
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  assert got_tree == want_tree, f"{what}: {got_tree} != {want_tree}"
  for (path, _), a, b in zip(jax.tree_util.tree_flatten_with_path(want)[0], got_leaves, want_leaves):
    assert np.shape(a) == np.shape(b), f"{what} {jax.tree_util.keystr(path)}: {np.shape(a)} != {np.shape(b)}"
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **TOLERANCE[dtype],
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


@st.composite
def examples(draw, batch: int = B, steps: int = T, out_of_range: bool = True):
  """Values for one call: a seed for params/inputs/carries/cotangents, the input scale, the lengths
  (traced values may lie outside [0, T]), and whether padded inputs hold NaN."""
  low, high = (-2, steps + 2) if out_of_range else (0, steps)
  lengths = draw(st.lists(st.integers(low, high), min_size=batch, max_size=batch))
  return {"seed": draw(st.integers(0, 2 ** 31 - 1)), "scale": draw(st.sampled_from([0.0, 0.1, 1.0, 4.0])),
          "lengths": np.asarray(lengths, np.int32), "nan_padding": draw(st.booleans())}


def inputs(example, preset, params, dtype: str, batch: int = B, steps: int = T, features: int = F):
  """(xs [B, T, F], a batched initial carry, cotangent weights [2, B, T, O]) from an example."""
  rng = np.random.default_rng(example["seed"])
  xs = rng.uniform(-1.0, 1.0, (batch, steps, features)) * example["scale"]
  if example["nan_padding"]:
    xs[np.arange(steps)[None, :] >= np.clip(example["lengths"], 0, steps)[:, None]] = np.nan
  carry = jax.tree_util.tree_map(lambda c: rng.uniform(-1.0, 1.0, (batch,) + c.shape).astype(dtype),
                                 preset.initial_carry(params))
  weights = rng.normal(size=(2, batch, steps, preset.output_size)).astype(dtype)
  return jnp.asarray(xs, dtype), carry, jnp.asarray(weights)


def init_params(preset, seed: int, features: int = F):
  return preset.init(jax.random.PRNGKey(seed % (2 ** 31)), features)


def step_loop(cell, params, xs, lengths, carry, reverse: bool = False):
  """The padding rule spelled out with ``cell.step``: ys[b, t] for t < L_b, zeros after; the final
  carry is the state after the L_b real steps (read backwards from x_{L_b - 1} when reversed)."""
  ys_all, finals = [], []
  for b in range(xs.shape[0]):
    length = int(np.clip(lengths[b], 0, xs.shape[1]))
    state = jax.tree_util.tree_map(lambda c: c[b], carry)
    ys = [None] * xs.shape[1]
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
      state, ys[t] = cell.step(params, state, xs[b, t])
    zero = jnp.zeros((cell.output_size,), xs.dtype)
    ys_all.append(jnp.stack([y if y is not None else zero for y in ys]))
    finals.append(state)
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *finals), jnp.stack(ys_all)


def run_paths(name: str, example, paths, *, hidden_size: int = H, dtype: str = "float32", masked: bool = True,
              directions: tuple = (False, True)):
  """Every path's (loss, outputs, grads) next to the plain scan's; ValueError where a path refuses."""
  if not masked:  # without lengths every step is real: no padding to fill
    example = {**example, "nan_padding": False}
  preset, cell = make(name, hidden_size, param_dtype=dtype)
  params = init_params(preset, example["seed"])
  xs, carry, weights = inputs(example, preset, params, dtype)
  lengths = jnp.asarray(example["lengths"])
  reference = rnn_function(cell, SCAN, masked, directions)(params, xs, carry, lengths, weights)
  assert_finite(reference, f"{name} scan")
  results = {}
  for path in paths:
    try:
      results[path] = rnn_function(cell, path, masked, directions)(params, xs, carry, lengths, weights)
    except ValueError as error:
      assert str(error), f"{name} {path}: a ValueError without a message"
      results[path] = error
  return preset, cell, params, (xs, carry, lengths, weights), reference, results


# ---------------------------------------------------------------------------
# rnn: every cell, every gradient path
# ---------------------------------------------------------------------------

def check_cell_paths(name: str, example, directions=(False,)):
  """The hand-derived BPTT ("manual") matches the scan for every cell it covers and is refused with a
  ValueError for the others; the scan obeys the padding rule, and traced lengths outside [0, T] act
  as the nearest bound."""
  preset, cell, params, (xs, carry, lengths, weights), reference, results = run_paths(
      name, example, [MANUAL], directions=directions)
  manual = results[MANUAL]
  if bptt.supports(cell):
    assert not isinstance(manual, Exception), f"{name}: manual raised {manual}"
    assert_close(manual, reference, "float32", f"{name} manual vs scan")
  else:
    assert isinstance(manual, ValueError) and "grad='autodiff'" in str(manual), manual
  clipped = rnn_function(cell, SCAN, True, directions)(params, xs, carry, jnp.clip(lengths, 0, T), weights)
  assert_close(clipped, reference, "float32", f"{name} out-of-range lengths vs clipped")
  xs_clean = jnp.nan_to_num(xs)  # padding never reaches a step
  for reverse, outputs in zip(directions, reference[0][1]):
    loop = step_loop(preset, params, xs_clean, example["lengths"], carry, reverse)
    assert_close(outputs, loop, "float32", f"{name} scan (reverse={reverse}) vs step loop")


@pytest.mark.parametrize("name", CELL_NAMES)
@FAST
@given(example=examples())
def test_every_cell_manual_bptt_matches_the_scan(name, example):
  """Forward direction here; the fused kernels, the stack and the slow variant read both."""
  check_cell_paths(name, example)


@pytest.mark.slow
@pytest.mark.parametrize("name", CELL_NAMES)
@MORE
@given(example=examples())
def test_every_cell_manual_bptt_matches_the_scan_many_examples(name, example):
  check_cell_paths(name, example, directions=(False, True))


def check_remat(name: str, example):
  _, _, _, _, reference, results = run_paths(name, example, [REMAT], directions=(True,))
  assert_close(results[REMAT], reference, "float32", f"{name} remat_chunk=3 unroll=2 vs scan")


@FAST
@given(example=examples())
def test_remat_and_unroll_match_the_scan(example):
  """remat_chunk=3 (T=4: one padded chunk) and unroll=2 around the hand-derived GRU backward."""
  check_remat("gru", example)


@pytest.mark.slow
@pytest.mark.parametrize("name", CELL_NAMES)
@MORE
@given(example=examples())
def test_remat_and_unroll_match_the_scan_many_examples(name, example):
  check_remat(name, example)


# ---------------------------------------------------------------------------
# the fused CPU kernel
# ---------------------------------------------------------------------------

def check_kernel(name: str, example, masked: bool):
  preset, cell = make(name, KERNEL_H)
  params = init_params(preset, example["seed"])
  choice = bptt.kernel_choice(cell, params, jnp.zeros((T, B, cell.num_gates * KERNEL_H)), batched(
      preset.initial_carry(params), B))
  if choice.kernel is None and name != "lstm":
    pytest.skip(choice.reason)
  paths = [MANUAL, REMAT] if (masked and name == "lstm") else [MANUAL]
  *_, reference, results = run_paths(name, example, paths, hidden_size=KERNEL_H, masked=masked,
                                     directions=(False, True) if masked else (False,))
  for path in paths:
    assert_close(results[path], reference, "float32", f"{name} H={KERNEL_H} ({choice.kernel}) {path}")


@pytest.mark.parametrize("name, masked", [("lstm", True), ("lstm", False), ("gru", True)],
                         ids=["lstm-lengths", "lstm-no_lengths", "gru-lengths"])
@FAST
@given(example=examples())
def test_fused_kernels_match_the_scan(name, masked, example):
  """H a multiple of the vector width takes the fused CPU kernel (``bptt.kernel_choice``) where one
  exists; its outputs and gradients (the LSTM's under remat and unroll too) are the scan's."""
  check_kernel(name, example, masked)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lstm", "gru", "elman"])
@pytest.mark.parametrize("masked", [True, False], ids=["lengths", "no_lengths"])
@MORE
@given(example=examples())
def test_fused_kernels_match_the_scan_many_examples(name, masked, example):
  check_kernel(name, example, masked)


def test_the_lstm_kernel_is_the_path_these_tests_take():
  """H=16 float32 on CPU is the kernel's case, so the tests above do cover it."""
  from rnn_jax import lstm_kernel
  if not lstm_kernel.available():
    pytest.skip(f"the CPU LSTM kernel is unavailable: {lstm_kernel.unavailable_reason()}")
  cell = cells.LSTM(KERNEL_H)
  params = cell.init(jax.random.PRNGKey(0), F)
  choice = bptt.kernel_choice(cell, params, jnp.zeros((T, B, 4 * KERNEL_H)), batched(cell.initial_carry(params), B))
  assert choice.kernel == "lstm_cpu", choice.reason


# ---------------------------------------------------------------------------
# float64, forward mode, T = 0
# ---------------------------------------------------------------------------

def check_float64(name: str, hidden_size: int, example):
  with jax.enable_x64(True):
    *_, reference, results = run_paths(name, example, [MANUAL], hidden_size=hidden_size, dtype="float64",
                                       directions=(False,))
    leaf = jax.tree_util.tree_leaves(reference)[0]
    assert leaf.dtype == jnp.float64
    if isinstance(results[MANUAL], ValueError):  # a cell without a hand-derived rule
      assert not bptt.supports(canonical(cells.make_cell(name, hidden_size))), results[MANUAL]
      return
    assert_close(results[MANUAL], reference, "float64", f"{name} float64 manual vs scan")


@FAST
@given(example=examples())
def test_float64_manual_bptt_matches_the_scan(example):
  """float64 params and inputs (x64 on): the kernel declines (float32 only) and the hand-derived LSTM
  backward agrees with autodiff to float64 precision."""
  check_float64("lstm", KERNEL_H, example)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CELL_NAMES if n not in ("tanh", "tanh_orthogonal", "irnn")])
@MORE
@given(example=examples())
def test_float64_manual_bptt_matches_the_scan_many_examples(name, example):
  check_float64(name, H, example)


@functools.lru_cache(maxsize=None)
def jvp_function(cell, options: ScanOptions):
  def outputs(params, xs, carry, lengths):
    return rnn(cell, params, xs, lengths, initial_carry=carry, options=options)
  return compiled(lambda primals, tangents, lengths: jax.jvp(lambda p, x, c: outputs(p, x, c, lengths),
                                                            primals, tangents))


def check_forward_mode(name: str, hidden_size: int, example):
  preset, cell = make(name, hidden_size)
  params = init_params(preset, example["seed"])
  xs, carry, _ = inputs(example, preset, params, "float32")
  rng = np.random.default_rng(example["seed"] + 1)
  tangents = jax.tree_util.tree_map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype),
                                    (params, jnp.nan_to_num(xs), carry))
  lengths = jnp.asarray(example["lengths"])
  want = jvp_function(cell, SCAN)((params, xs, carry), tangents, lengths)
  got = jvp_function(cell, MANUAL)((params, xs, carry), tangents, lengths)
  assert_close(got, want, "float32", f"{name} H={hidden_size} jvp through grad='manual'")


@FAST
@given(example=examples())
def test_forward_mode_through_the_manual_path_matches_the_scan(example):
  """jax.jvp under jit cannot pass the custom VJP (nor the kernel): the manual path falls back to the
  scan's own derivative, so forward mode gives the scan's tangents."""
  check_forward_mode("lstm", KERNEL_H, example)


@pytest.mark.slow
@pytest.mark.parametrize("name, hidden_size", [("gru", KERNEL_H), ("elman", KERNEL_H), ("gru_reset_before", H),
                                               ("lstm_peephole", H), ("relu", H)])
@MORE
@given(example=examples())
def test_forward_mode_through_the_manual_path_matches_the_scan_many_examples(name, hidden_size, example):
  check_forward_mode(name, hidden_size, example)


@pytest.mark.parametrize("name, options", [("lstm", MANUAL), ("gru", MANUAL), ("elman", REMAT), ("mingru", SCAN),
                                           ("mingru", MANUAL)], ids=["lstm_kernel", "gru", "elman_remat",
                                                                      "mingru", "mingru_manual"])
def test_an_empty_sequence_gives_the_initial_carry_and_zero_gradients(name, options):
  """T = 0: no step runs; the final carry is the initial one and W_hh gets no gradient."""
  preset, cell = make(name, KERNEL_H if name == "lstm" else H)
  params = init_params(preset, 0)
  xs = jnp.zeros((B, 0, F))
  carry = batched(preset.initial_carry(params), B)
  carry = jax.tree_util.tree_map(lambda c: c + 0.5, carry)

  def loss(params, carry, lengths):
    final, ys = rnn(cell, params, xs, lengths, initial_carry=carry, options=options)
    return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(final)) + jnp.sum(ys), (final, ys)

  for lengths in (None, jnp.zeros((B,), jnp.int32)):
    try:
      (value, (final, ys)), (d_params, d_carry) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
          params, carry, lengths)
    except ValueError as error:
      assert options is MANUAL and not bptt.supports(cell) and "grad='autodiff'" in str(error)
      return
    assert ys.shape == (B, 0, preset.output_size)
    assert_close(final, carry, "float32", f"{name} T=0 final carry")
    assert_close(d_carry, jax.tree_util.tree_map(jnp.ones_like, carry), "float32", f"{name} T=0 d carry")
    assert_close(d_params, jax.tree_util.tree_map(jnp.zeros_like, params), "float32", f"{name} T=0 d params")


# ---------------------------------------------------------------------------
# run_cell, bidirectional and StackedRNN
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def run_cell_function(cell, options: ScanOptions):
  def loss(params, xs, carry, length, weights):
    final, ys = run_cell(cell, params, xs, length, initial_carry=carry, options=options)
    return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(final)), (
        final, ys)
  return compiled(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                          in_axes=(None, 0, 0, 0, 0)))


@FAST
@given(example=examples(out_of_range=False))
def test_run_cell_is_one_row_of_rnn_on_every_path(example):
  """run_cell(xs[b], L_b) (vmapped over b) gives rnn's row b and the same gradients, on the scan and
  the hand-derived path (LSTM H=16: the kernel)."""
  preset, cell = make("lstm", KERNEL_H)
  params = init_params(preset, example["seed"])
  xs, carry, weights = inputs(example, preset, params, "float32")
  lengths = jnp.asarray(example["lengths"])
  (_, ((want_carry, want_ys), _)), _ = rnn_function(cell, SCAN, True)(params, xs, carry, lengths, weights)
  for options in (SCAN, MANUAL):
    (_, (final, ys)), (d_params, d_xs, d_carry) = run_cell_function(cell, options)(params, xs, carry, lengths,
                                                                                   weights[0])
    assert_close((final, ys), (want_carry, want_ys), "float32", f"run_cell {options} vs rnn rows")
    if options is SCAN:
      reference = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), d_params), d_xs, d_carry
    else:
      got = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), d_params), d_xs, d_carry
      assert_close(got, reference, "float32", "run_cell manual vs scan gradients")


@functools.lru_cache(maxsize=None)
def stack_function(stack: StackedRNN, time_major: bool):
  def loss(params, xs, lengths, weights):
    inputs = jnp.swapaxes(xs, 0, 1) if time_major else xs
    finals, ys = stack(params, inputs, lengths, time_major=time_major)
    ys = jnp.swapaxes(ys, 0, 1) if time_major else ys
    return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(finals)), (
        finals, ys)
  return compiled(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def check_stack(cell_name: str, hidden_size: int, merge: str, example):
  preset, cell = make(cell_name, hidden_size)
  make_stack = lambda options: StackedRNN(cell, num_layers=2, bidirectional=True, merge=merge, residual=True,
                                          learn_initial_state=True, scan=options)
  params = make_stack(SCAN).init(jax.random.PRNGKey(example["seed"] % (2 ** 31)), F)
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # learned initial states away from 0
  xs, _, weights = inputs(example, preset, init_params(preset, 0), "float32")
  width = make_stack(SCAN).output_size
  weights = jnp.asarray(np.random.default_rng(example["seed"]).normal(size=(B, T, width)), jnp.float32)
  lengths = jnp.asarray(example["lengths"])
  want = stack_function(make_stack(SCAN), False)(params, xs, lengths, weights)
  got = stack_function(make_stack(MANUAL), True)(params, xs, lengths, weights)  # time-major, hand-derived
  assert_close(got, want, "float32", f"StackedRNN {cell_name} H={hidden_size} {merge} manual time-major vs scan")


@FAST
@given(example=examples())
def test_bidirectional_residual_stack_matches_the_scan(example):
  """Two bidirectional residual layers (merge="sum") with learned initial states: the hand-derived path
  (the LSTM kernel), time-major, gives the batch-major scan's outputs, final carries and gradients."""
  check_stack("lstm", KERNEL_H, "sum", example)


@pytest.mark.slow
@pytest.mark.parametrize("cell_name, hidden_size, merge", [
    ("lstm", KERNEL_H, "concat"), ("gru", H, "sum"), ("elman", KERNEL_H, "concat"), ("lstm_peephole", H, "sum"),
    ("gru_reset_before", H, "concat")])
@MORE
@given(example=examples())
def test_bidirectional_residual_stack_matches_the_scan_many_examples(cell_name, hidden_size, merge, example):
  check_stack(cell_name, hidden_size, merge, example)


# ---------------------------------------------------------------------------
# bad values: a ValueError with a message, before anything runs
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _valid_values(name: str):
  cell = cells.make_cell(name, H)
  params = cell.init(jax.random.PRNGKey(0), F)
  stack = StackedRNN(cell, num_layers=2)
  return cell, params, stack, stack.init(jax.random.PRNGKey(0), F)


def bad_calls(name: str, value: int) -> list:
  """Invalid calls of the public API, each a zero-argument function; ``value`` varies the wrong value."""
  cell, params, stack, stack_params = _valid_values(name)
  xs = jnp.ones((B, T, F))
  carry = batched(cell.initial_carry(params), B)
  size = abs(value)
  bad_lengths = [
      np.full((B,), value + 0.5, np.float32), np.ones((B,), bool), np.arange(B + 1 + size % 3),
      np.int32(value % T), np.ones((B, 1), np.int32), np.array([T + 1 + size] * B),
      np.array([-1 - size] + [0] * (B - 1)), [0.5] * B]
  return [
      *[functools.partial(rnn, cell, params, xs, lengths) for lengths in bad_lengths],
      lambda: rnn(cell, params, jnp.ones((T, F))),
      lambda: rnn(cell, params, jnp.ones((B, T, F, 1))),
      lambda: rnn(cell, params, jnp.ones((B, T, F + 1 + size % 4))),
      lambda: rnn(cell, params, jnp.ones((B, T, F), jnp.complex64)),
      lambda: rnn(cell, params, np.ones((B, T, F)).tolist()),
      lambda: rnn(cell, params, np.full((B, T, F), "x")),
      lambda: rnn(cell, params, xs, initial_carry=batched(cell.initial_carry(params), B + 1 + size % 3)),
      lambda: rnn(cell, params, xs, initial_carry=(carry, carry)),
      lambda: rnn(cell, {k: v for k, v in params.items() if k != "w_xh"}, xs),
      lambda: rnn(cell, {**params, "b": jnp.ones(params["b"].shape[0] + 1 + size % 5)}, xs),
      lambda: rnn(cell, {**params, "extra": jnp.ones(2)}, xs),
      lambda: rnn(cell, params, xs, options=ScanOptions(unroll=-size)),
      lambda: rnn(cell, params, xs, options=ScanOptions(remat_chunk=-1 - size)),
      lambda: rnn(cell, params, xs, options=ScanOptions(grad="forward")),
      lambda: ScanOptions(unroll=1.5 + size),
      lambda: ScanOptions(unroll=True),
      lambda: run_cell(cell, params, xs[0], T + 1 + size),
      lambda: run_cell(cell, params, xs[0], 1.5 + size),
      lambda: run_cell(cell, params, xs[0], np.arange(2 + size)),
      lambda: run_cell(cell, params, xs),
      lambda: run_cell(cell, params, xs[0], initial_carry=carry),
      lambda: jax.jit(lambda length: run_cell(cell, params, xs[0], length))(jnp.float32(value)),
      lambda: jax.jit(lambda lengths: rnn(cell, params, xs, lengths))(jnp.full((B,), value, jnp.float32)),
      lambda: bidirectional(cell, params, params, xs, merge="max"),
      lambda: bidirectional(cell, params, params, xs, initial_carry=None),
      lambda: bidirectional(cell, params, params, xs, np.array([T + 1 + size] * B)),
      lambda: StackedRNN(cell, num_layers=size % 2 - 1),
      lambda: StackedRNN(cell, dropout=1.0 + size),
      lambda: StackedRNN(cell, merge="mean"),
      lambda: stack({"layer_0": stack_params["layer_0"]}, xs),
      lambda: stack(stack_params, xs, initial_carries=[None] * (3 + size % 2)),
      lambda: StackedRNN(cell, dropout=0.5, num_layers=2)(stack_params, xs, train=True),
      lambda: stack(stack_params, jnp.ones((B, T, F + 1))),
      lambda: stack.step(stack_params, stack.initial_carries(stack_params)[:1], xs[:, 0]),
  ]



@pytest.mark.parametrize("name", ["elman", "lstm", "gru", "mingru", "reservoir", "lstm_layer_norm"])
@settings(max_examples=4, **COMMON)
@given(value=st.integers(-3, 5))
def test_every_bad_value_raises_a_value_error_with_a_message(name, value):
  """Wrong shapes, dtypes, lengths, carries, params and options are refused eagerly (and traced
  lengths or length of a float dtype under jit) with a ValueError, never another exception."""
  for case, call in enumerate(bad_calls(name, value)):
    try:
      call()
    except ValueError as error:
      assert len(str(error)) > 20, f"case {case}: {error}"
    else:
      raise AssertionError(f"{name} case {case} (value={value}) raised nothing")


# ---------------------------------------------------------------------------
# token ids
# ---------------------------------------------------------------------------

@settings(max_examples=25, **COMMON)
@given(ids=st.lists(st.integers(-4, 9), min_size=1, max_size=6), dtype=st.sampled_from(["int32", "int64", "uint8"]))
def test_token_ids_out_of_range_are_refused_or_give_nan_rows_under_jit(ids, dtype):
  """Concrete ids outside [0, V) raise ValueError; traced ones embed as NaN rows, never as another
  token's row."""
  table = {"table": jnp.arange(15.0).reshape(5, 3)}
  values = np.asarray(ids)
  if dtype == "uint8":
    values = values[values >= 0]
    if not values.size:
      return
  values = values.astype(dtype)
  valid = (values >= 0) & (values < 5)
  if valid.all():
    np.testing.assert_array_equal(layers.embed(table, values), np.asarray(table["table"])[values])
  else:
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 5\)"):
      layers.embed(table, values)
  rows = np.asarray(_jitted_embed(table, jnp.asarray(values.astype(np.int32))))
  np.testing.assert_array_equal(rows[valid], np.asarray(table["table"])[values[valid]])
  assert np.isnan(rows[~valid]).all()


_jitted_embed = jax.jit(layers.embed)
