"""The hand-derived BPTT (rnn_jax.bptt) equals jax.grad through lax.scan, and remat changes nothing.

Every comparison runs the same model twice, once with ``grad="manual"`` and once
with ``grad="autodiff"`` (``ScanOptions``), and checks the loss and the gradients of every
param and of the initial carry: float64 to 1e-10, float32 to 1e-5. Sequences have
variable lengths (including 0 and T) and are read forwards and reversed.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import GRU, LSTM, Elman, StackedRNN, bptt, rnn
from rnn_jax.sequence import ScanOptions, run_cell, scan_recurrence

B, T, F, H = 3, 6, 4, 5
LENGTHS = np.array([6, 2, 0])

CELLS = {
    "elman_tanh": Elman(H),
    "elman_relu": Elman(H, activation="relu"),
    "elman_sigmoid": Elman(H, activation="sigmoid"),
    "elman_identity": Elman(H, activation="identity", readout_size=3),
    "lstm": LSTM(H, forget_bias=1.0),
    "lstm_peephole": LSTM(H, forget_bias=1.0, peephole=True),
    "gru": GRU(H),
    "gru_reset_before": GRU(H, reset_after=False),
}


def _loss(cell, params, initial_carry, xs, lengths, reverse, backward, remat_chunk=0):
  """A loss that reads every output and the final carry, with uneven weights."""
  carry, ys = rnn(cell, params, xs, lengths, initial_carry=initial_carry, reverse=reverse,
                  options=ScanOptions(grad=backward, remat_chunk=remat_chunk))
  weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
  carry_term = sum(jnp.sum(jnp.sin(3.0 * leaf)) for leaf in jax.tree_util.tree_leaves(carry))
  return jnp.sum(weights * ys ** 2) + jnp.sum(jnp.tanh(ys)) + carry_term


def _inputs(cell, dtype):
  key_p, key_x, key_c = jax.random.split(jax.random.PRNGKey(7), 3)
  params = jax.tree_util.tree_map(lambda p: p.astype(dtype), cell.init(key_p, F))
  xs = jax.random.normal(key_x, (B, T, F), dtype)
  template = cell.initial_carry(params)
  leaves, treedef = jax.tree_util.tree_flatten(template)
  keys = jax.random.split(key_c, len(leaves))
  carry = jax.tree_util.tree_unflatten(
      treedef, [0.5 * jax.random.normal(k, (B,) + leaf.shape, dtype) for k, leaf in zip(keys, leaves)])
  return params, xs, carry


def _max_difference(tree_a, tree_b):
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b)))


def _both_directions_loss(cell, params, initial_carry, xs, lengths, backward):
  """The loss read forwards plus the loss read reversed (one compile covers both directions)."""
  return (_loss(cell, params, initial_carry, xs, lengths, False, backward)
          + _loss(cell, params, initial_carry, xs, lengths, True, backward))


def _compare(cell, dtype, tolerance, lengths):
  params, xs, carry = _inputs(cell, dtype)
  results = {}
  for backward in ("manual", "autodiff"):
    loss = jax.jit(jax.value_and_grad(_both_directions_loss, argnums=(1, 2)), static_argnums=(0, 5))
    results[backward] = loss(cell, params, carry, xs, lengths, backward)
  (loss_manual, grads_manual), (loss_auto, grads_auto) = results["manual"], results["autodiff"]
  np.testing.assert_allclose(float(loss_manual), float(loss_auto), rtol=tolerance)
  assert _max_difference(grads_manual, grads_auto) < tolerance
  assert set(grads_manual[0]) == set(params)
  # the gradient is not trivially zero: W_hh and the initial carry receive signal
  assert float(jnp.max(jnp.abs(grads_manual[0]["w_hh"]))) > 1e-3
  assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(grads_manual[1])) > 1e-4


@pytest.mark.parametrize("name", sorted(CELLS))
def test_fused_equals_autodiff_float64(name):
  with jax.enable_x64(True):
    _compare(CELLS[name], jnp.float64, 1e-10, LENGTHS)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_fused_equals_autodiff_float32_full_length(name):
  _compare(CELLS[name], jnp.float32, 1e-5, None)


def test_run_cell_single_example_and_reverse():
  """The fused path also runs per example ([T, G*H]) and under a user's vmap."""
  cell = LSTM(H)
  params, xs, _ = _inputs(cell, jnp.float32)

  def loss(params, backward):
    def one(x, length):
      _, ys = run_cell(cell, params, x, length, reverse=True, options=ScanOptions(grad=backward))
      return jnp.sum(ys ** 2)
    return jnp.sum(jax.vmap(one)(xs, jnp.asarray(LENGTHS)))

  fused = jax.grad(loss)(params, "manual")
  auto = jax.grad(loss)(params, "autodiff")
  assert _max_difference(fused, auto) < 1e-5


def test_backward_scan_carries_only_state_gradients():
  """In the fused gradient no scan carries a [4H, H] weight gradient; in autodiff one does."""
  cell = LSTM(H)
  params, xs, _ = _inputs(cell, jnp.float32)

  def carried_shapes(backward):
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(rnn(cell, p, xs, options=ScanOptions(grad=backward))[1])))(params)
    shapes = []
    for eqn in jaxpr.jaxpr.eqns:
      if eqn.primitive.name == "scan":
        num_consts, num_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        shapes += [v.aval.shape for v in eqn.invars[num_consts:num_consts + num_carry]]
    return shapes

  weight_shape = (4 * H, H)
  assert weight_shape not in carried_shapes("manual")
  assert weight_shape in carried_shapes("autodiff")


def test_auto_falls_back_for_lstm_options_and_manual_refuses_them():
  cell = LSTM(H, layer_norm=True)
  params, xs, _ = _inputs(cell, jnp.float32)
  assert not bptt.supports(cell) and bptt.supports(LSTM(H)) and bptt.supports(LSTM(H, peephole=True))
  auto = jax.grad(lambda p: jnp.sum(rnn(cell, p, xs, options=ScanOptions(grad="auto"))[1] ** 2))(params)
  ref = jax.grad(lambda p: jnp.sum(rnn(cell, p, xs, options=ScanOptions(grad="autodiff"))[1] ** 2))(params)
  assert _max_difference(auto, ref) == 0.0
  with pytest.raises(ValueError, match="layer_norm"):
    rnn(cell, params, xs, options=ScanOptions(grad="manual"))
  with pytest.raises(ValueError, match="unknown grad"):
    rnn(cell, params, xs, options=ScanOptions(grad="fused"))


@pytest.mark.parametrize("backward", ["manual", "autodiff"])
def test_remat_gives_identical_outputs_and_gradients(backward):
  """remat_chunk=k (T=6 not a multiple of k=4, so the last chunk is padded) changes nothing."""
  cell = GRU(H)
  params, xs, carry = _inputs(cell, jnp.float32)
  lengths = jnp.asarray(LENGTHS)
  for reverse in (False, True):
    plain = rnn(cell, params, xs, lengths, initial_carry=carry, reverse=reverse,
                options=ScanOptions(grad=backward))
    remat = rnn(cell, params, xs, lengths, initial_carry=carry, reverse=reverse,
                options=ScanOptions(grad=backward, remat_chunk=4))
    assert _max_difference(plain, remat) < 1e-6
    grad = jax.grad(_loss, argnums=(1, 2))
    plain_grads = grad(cell, params, carry, xs, lengths, reverse, backward)
    remat_grads = grad(cell, params, carry, xs, lengths, reverse, backward, 4)
    assert _max_difference(plain_grads, remat_grads) < 1e-5


def test_remat_rejects_bad_chunk():
  cell = Elman(H)
  params, xs, _ = _inputs(cell, jnp.float32)
  with pytest.raises(ValueError, match="remat_chunk must be an integer >= 0"):
    rnn(cell, params, xs, options=ScanOptions(remat_chunk=-1))
  with pytest.raises(ValueError, match="unroll must be an integer >= 1"):
    ScanOptions(unroll=0)


def test_stacked_bidirectional_fused_equals_autodiff():
  stack = StackedRNN(LSTM(H), num_layers=2, bidirectional=True)
  params = stack.init(jax.random.PRNGKey(1), F)
  xs = jax.random.normal(jax.random.PRNGKey(2), (B, T, F))
  lengths = jnp.asarray(LENGTHS)

  def loss(params, backward):
    scanned = dataclasses.replace(stack, scan=ScanOptions(grad=backward))
    return jnp.sum(scanned(params, xs, lengths)[1] ** 2)

  assert _max_difference(jax.grad(loss)(params, "manual"), jax.grad(loss)(params, "autodiff")) < 1e-5


def test_scan_recurrence_rejects_bad_rank():
  cell = Elman(H)
  params = cell.init(jax.random.PRNGKey(0), F)
  with pytest.raises(ValueError, match=r"\[T, G\*H\] or \[T, B, G\*H\]"):
    scan_recurrence(cell, params, jnp.zeros((2, 3, 4, H)), cell.initial_carry(params))


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_input_bias_passed_separately_equals_bias_inside_a(name):
  """manual_scan(a, input_bias=b) = manual_scan(a + b), values and gradients (b's included)."""
  cell = CELLS[name]
  params, xs, carry = _inputs(cell, jnp.float32)
  a = jnp.swapaxes(xs, 0, 1) @ params["w_xh"].T  # [T, B, G*H]
  mask = jnp.arange(T)[:, None] < LENGTHS[None, :]

  def loss(a, bias, separate):
    if separate:
      final, hs = bptt.manual_scan(cell, params, a, carry, mask, input_bias=bias)
    else:
      final, hs = bptt.manual_scan(cell, params, a + bias, carry, mask)
    return jnp.sum(jnp.sin(hs)) + sum(jnp.sum(leaf ** 2) for leaf in jax.tree_util.tree_leaves(final))

  value_separate, grads_separate = jax.value_and_grad(loss, argnums=(0, 1))(a, params["b"], True)
  value_inside, grads_inside = jax.value_and_grad(loss, argnums=(0, 1))(a, params["b"], False)
  np.testing.assert_allclose(value_separate, value_inside, rtol=1e-6)
  assert _max_difference(grads_separate, grads_inside) < 1e-5


@pytest.mark.parametrize("cell", [LSTM(16), GRU(H), LSTM(H, peephole=True)], ids=["lstm_kernel", "gru", "peephole"])
def test_forward_mode_and_second_derivatives_through_the_default_path(cell):
  """jax.jvp and jax.hessian work with grad="auto" (the manual rule and the CPU kernel give way to
  the scan under forward mode) and equal the autodiff path."""
  params = cell.init(jax.random.PRNGKey(0), 3)
  xs = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 3))
  loss = lambda p, x, backward: jnp.sum(jnp.tanh(rnn(cell, p, x, options=ScanOptions(grad=backward))[1]))
  tangent_auto = jax.jvp(lambda p: loss(p, xs, "auto"), (params,), (params,))[1]
  tangent_ref = jax.jvp(lambda p: loss(p, xs, "autodiff"), (params,), (params,))[1]
  np.testing.assert_allclose(float(tangent_auto), float(tangent_ref), rtol=1e-6)
  hessian_auto = jax.hessian(lambda x: loss(params, x, "auto"))(xs)
  hessian_ref = jax.hessian(lambda x: loss(params, x, "autodiff"))(xs)
  np.testing.assert_allclose(hessian_auto, hessian_ref, atol=1e-6)


@pytest.mark.parametrize("out_size,in_size", [(12, 5), (5, 5), (4, 9)])
def test_sum_outer_is_the_summed_outer_product_in_either_form(out_size, in_size):
  """dW = sum over (t, b) of delta v^T, whichever factor is wider: on the CPU a wider delta is
  formed as (v^T delta)^T, so the compiled matmul's output is [in, out] there and [out, in]
  otherwise."""
  rng = np.random.default_rng(0)
  delta = rng.standard_normal((T, B, out_size))
  v = rng.standard_normal((T, B, in_size))
  want = np.einsum("tbo,tbi->oi", delta, v)
  got = bptt.sum_outer(jnp.asarray(delta, jnp.float32), jnp.asarray(v, jnp.float32), None, jnp.float32)
  assert got.shape == (out_size, in_size)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  compiled = jax.jit(lambda d, x: bptt.sum_outer(d, x, None, jnp.float32)).lower(
      jnp.asarray(delta, jnp.float32), jnp.asarray(v, jnp.float32)).compile().as_text()
  shapes = re.findall(r"= f32\[([0-9,]+)\]\{[0-9,]+\} (?:dot|fusion)\(", compiled)
  transposed = out_size > in_size and jax.default_backend() == "cpu"
  expected = f"{in_size},{out_size}" if transposed else f"{out_size},{in_size}"
  assert expected in shapes, shapes
