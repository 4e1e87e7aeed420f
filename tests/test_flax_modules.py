"""The Flax adapters hold exactly our params and compute exactly our functions."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rnn_jax import GRU, LSTM, Elman, StackedRNN, rnn
from rnn_jax.flax_modules import CellLayer, NNXRNNCell, NNXRNNLayer, RNNCell, RNNLayer

F = 3
LENGTHS = jnp.array([5, 2, 0])
XS = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, F)), jnp.float32)


class ParamsKey(linen.Module):
  """The key a top-level module's first ``make_rng("params")`` returns."""

  @linen.compact
  def __call__(self):
    return self.make_rng("params")


def module_key(key):
  return ParamsKey().init_with_output(key)[0]


def trees_equal(a, b, atol=0.0):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=0), a, b)


@pytest.mark.parametrize("cell", [LSTM(4, proj_size=2, peephole=True), GRU(4), Elman(4, readout_size=2)],
                         ids=["lstmp", "gru", "elman"])
def test_cell_module_params_are_cell_init_and_steps_equal_cell_step(cell):
  module = RNNCell(cell)
  x = XS[:, 0]
  carry = module.initialize_carry(jax.random.key(1), x.shape)
  trees_equal(carry, jax.vmap(lambda _: cell.initial_carry(cell.init(jax.random.key(0), F)))(jnp.arange(3)))
  variables = module.init(jax.random.key(7), carry, x)
  params = cell.init(module_key(jax.random.key(7)), F)
  trees_equal(variables["params"], params)
  # Step by step through a sequence, with our params loaded into the module.
  ours = {"params": cell.init(jax.random.key(3), F)}
  module_carry, ys = carry, []
  for t in range(XS.shape[1]):
    module_carry, y = module.apply(ours, module_carry, XS[:, t])
    ys.append(y)
  final, expected_ys = rnn(cell, ours["params"], XS)
  np.testing.assert_allclose(jnp.stack(ys, axis=1), expected_ys, atol=1e-6)
  trees_equal(module_carry, final, atol=1e-6)


def test_cell_module_inside_flax_rnn_with_lengths_and_reverse():
  """flax.linen.RNN scanning our cell module (lengths >= 1: flax's carry for length 0 is not h_0)."""
  cell = LSTM(4)
  lengths = jnp.array([5, 2, 1])
  params = cell.init(jax.random.key(4), F)
  for reverse in (False, True):
    flax_rnn = linen.RNN(RNNCell(cell), return_carry=True, reverse=reverse, keep_order=True)
    variables = flax_rnn.init(jax.random.key(5), XS, seq_lengths=lengths)
    assert jax.tree_util.tree_map(jnp.shape, variables["params"]["cell"]) == \
        jax.tree_util.tree_map(jnp.shape, params)
    final, ys = flax_rnn.apply({"params": {"cell": params}}, XS, seq_lengths=lengths)
    expected_final, expected_ys = rnn(cell, params, XS, lengths, reverse=reverse)
    real = (jnp.arange(5)[None, :] < lengths[:, None])[..., None]
    np.testing.assert_allclose(jnp.where(real, ys, 0.0), expected_ys, atol=1e-6)
    trees_equal(final, expected_final, atol=1e-6)


def test_layer_module_params_outputs_and_dropout():
  stack = StackedRNN(GRU(4), num_layers=2, bidirectional=True, dropout=0.5, learn_initial_state=True)
  layer = RNNLayer(stack)
  variables = layer.init(jax.random.key(8), XS, LENGTHS)
  trees_equal(variables["params"], stack.init(module_key(jax.random.key(8)), F))
  ours = {"params": stack.init(jax.random.key(9), F)}
  apply = jax.jit(layer.apply, static_argnames=("train",))
  finals, ys = layer.apply(ours, XS, LENGTHS)
  expected_finals, expected_ys = stack(ours["params"], XS, LENGTHS)
  np.testing.assert_allclose(ys, expected_ys, atol=1e-6)
  trees_equal(finals, expected_finals, atol=1e-6)
  # Evaluation is deterministic and ignores a dropout rng; training draws its mask from it.
  _, eval_ys = apply(ours, XS, LENGTHS, rngs={"dropout": jax.random.key(0)})
  np.testing.assert_array_equal(eval_ys, ys)
  _, train_a = apply(ours, XS, LENGTHS, train=True, rngs={"dropout": jax.random.key(1)})
  _, train_a_again = apply(ours, XS, LENGTHS, train=True, rngs={"dropout": jax.random.key(1)})
  _, train_b = apply(ours, XS, LENGTHS, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(train_a, train_a_again)
  assert not np.allclose(train_a, ys) and not np.allclose(train_a, train_b)
  with pytest.raises(Exception, match="dropout"):
    layer.apply(ours, XS, LENGTHS, train=True)


def test_loading_params_of_the_wrong_layout_raises():
  cell = LSTM(4)
  wrong = {"params": LSTM(5).init(jax.random.key(0), F)}
  with pytest.raises(ValueError, match=r"RNNCell\(lstm\): params do not match the layout that init creates"):
    RNNCell(cell).apply(wrong, RNNCell(cell).initialize_carry(None, (F,)), XS[0, 0])
  stack = StackedRNN(cell, num_layers=2)
  with pytest.raises(ValueError, match=r"RNNLayer\(stack\): params do not match"):
    RNNLayer(stack).apply({"params": StackedRNN(cell, num_layers=1).init(jax.random.key(0), F)}, XS)


class Tagger(linen.Module):
  """Embedding -> bidirectional 2-layer LSTM (our RNNLayer) -> per-step logits."""
  vocab: int

  @linen.compact
  def __call__(self, ids, lengths, train=False):
    xs = linen.Embed(self.vocab, 8)(ids)
    stack = StackedRNN(LSTM(12), num_layers=2, bidirectional=True, dropout=0.1)
    _, hs = RNNLayer(stack)(xs, lengths, train=train)
    return linen.Dense(self.vocab)(hs)


def test_layer_trains_inside_a_flax_model_under_jit_and_grad():
  """Task: at each step, output the token read one step earlier (needs the recurrent state)."""
  vocab, B, T = 5, 16, 7
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, vocab, size=(B, T)))
  lengths = jnp.asarray(rng.integers(3, T + 1, size=B))
  targets = jnp.concatenate([jnp.zeros((B, 1), ids.dtype), ids[:, :-1]], axis=1)
  mask = jnp.arange(T)[None, :] < lengths[:, None]
  model = Tagger(vocab)
  params = jax.jit(model.init)(jax.random.key(0), ids, lengths)["params"]
  optimizer = optax.adam(0.03)
  opt_state = optimizer.init(params)

  def loss_fn(params, key):
    logits = model.apply({"params": params}, ids, lengths, train=True, rngs={"dropout": key})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * mask) / jnp.sum(mask)

  @jax.jit
  def train_step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for step in range(60):
    params, opt_state, loss = train_step(params, opt_state, jax.random.key(step))
    losses.append(float(loss))
  assert losses[0] > 1.2                      # about log(5) = 1.61 at the start
  assert np.mean(losses[-5:]) < 0.25, losses[::10]
  logits = jax.jit(model.apply)({"params": params}, ids, lengths)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / jnp.sum(mask)
  assert accuracy > 0.95


def test_nnx_cell_and_layer_equal_the_functional_api_and_get_gradients():
  cell = LSTM(4, proj_size=2)
  nnx_cell = NNXRNNCell(cell, F, rngs=nnx.Rngs(params=0))
  trees_equal(nnx_cell.params.value, cell.init(nnx.Rngs(params=0).params(), F))
  carry, y = nnx_cell(nnx_cell.initialize_carry((3,)), XS[:, 0])
  expected_final, expected_ys = rnn(cell, nnx_cell.params.value, XS[:, :1])
  np.testing.assert_allclose(y, expected_ys[:, 0], atol=1e-6)
  trees_equal(carry, expected_final, atol=1e-6)

  stack = StackedRNN(cell, num_layers=2, dropout=0.5)
  layer = NNXRNNLayer(stack, F, rngs=nnx.Rngs(params=1, dropout=2))
  _, ys = layer(XS, LENGTHS)
  np.testing.assert_allclose(ys, stack(layer.params.value, XS, LENGTHS)[1], atol=1e-6)
  _, train_ys = layer(XS, LENGTHS, train=True)
  assert not np.allclose(train_ys, ys)

  @nnx.jit
  def grads_of(layer):
    return nnx.grad(lambda layer: jnp.sum(layer(XS, LENGTHS)[1] ** 2))(layer)

  grads = grads_of(layer)
  assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(nnx.state(grads, nnx.Param)))


def test_cell_layer_is_rnn_with_flax_params_and_reverses_with_padding():
  cell = GRU(4)
  xs = jax.random.normal(jax.random.key(3), (2, 5, 3))
  lengths = jnp.array([5, 2])
  layer = CellLayer(cell, reverse=True)
  variables = layer.init(jax.random.key(4), xs, lengths)
  params = variables["params"]
  assert set(params) == {"w_xh", "w_hh", "b", "b_hn"}
  final, ys = layer.apply(variables, xs, lengths)
  expected_final, expected_ys = rnn(cell, dict(params), xs, lengths, reverse=True)
  np.testing.assert_allclose(ys, expected_ys, atol=1e-6)
  np.testing.assert_allclose(final, expected_final, atol=1e-6)
  assert float(jnp.abs(ys[1, 2:]).max()) == 0.0
