"""Recurrent dropout, zoneout and DropConnect on W_hh (``rnn_jax.regularizers``).

Each regulariser is checked against a numpy loop written from its equations for one fixed
mask or noise; the stack's masks are shown to be one per sequence (recurrent dropout) and fresh
per step (zoneout); evaluation, rate 0, padding, float64 finite differences and the language
model are covered. Small shapes, one compiled function per case.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import bptt, config
from rnn_jax.cells import GRU, LSTM, Elman, MinGRU
from rnn_jax.lm import LanguageModel, make_loss_fn
from rnn_jax.lm_train import LMConfig, build_model
from rnn_jax.regularizers import (RecurrentDropoutCell, RecurrentDropoutState, ZoneoutCell,
                                  recurrent_dropout_mask, weight_drop)
from rnn_jax.sequence import ScanOptions, StackedRNN, rnn, run_cell

B, T, F, H = 3, 6, 4, 8
LENGTHS = np.array([6, 3, 0])


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _numpy_step(cell, p, h, c, x, m):
  """One step of the cell's equations with m * h_{t-1} in the recurrent product (m = 1: none)."""
  a = p["w_xh"] @ x + p["b"]
  if isinstance(cell, Elman):
    return np.tanh(a + p["w_hh"] @ (m * h)), c
  if isinstance(cell, LSTM):
    i, f, g, o = np.split(a + p["w_hh"] @ (m * h), 4)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c
  a_r, a_z, a_n = np.split(a, 3)
  w_r, w_z, w_n = np.split(p["w_hh"], 3)
  r, z = _sigmoid(a_r + w_r @ (m * h)), _sigmoid(a_z + w_z @ (m * h))
  if cell.reset_after:
    n = np.tanh(a_n + r * (w_n @ (m * h) + p["b_hn"]))
  else:
    n = np.tanh(a_n + w_n @ (r * m * h) + p["b_hn"])
  return (1 - z) * n + z * h, c                          # the interpolation reads the unmasked h


def _numpy_rnn(cell, params, xs, lengths, mask=None, d_h=None, d_c=None):
  """ys [B, T, H], final h [B, H] (and c) by the equations; mask [B, H]; d_h, d_c [B, T, H] or scalars."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  xs = np.asarray(xs, np.float64)
  ys, finals = np.zeros(xs.shape[:2] + (H,)), []
  for b in range(xs.shape[0]):
    h, c = np.zeros(H), np.zeros(H)
    m = np.ones(H) if mask is None else np.asarray(mask[b], np.float64)
    for t in range(lengths[b]):
      h_new, c_new = _numpy_step(cell, p, h, c, xs[b, t], m)
      if d_c is not None:
        dc = d_c if np.isscalar(d_c) else d_c[b, t]
        c_new = dc * c + (1 - dc) * c_new
      if d_h is not None:
        dh = d_h if np.isscalar(d_h) else d_h[b, t]
        h_new = dh * h + (1 - dh) * h_new
      h, c = h_new, c_new
      ys[b, t] = h
    finals.append((h, c))
  return ys, np.stack([f[0] for f in finals]), np.stack([f[1] for f in finals])


def _batched(carry, batch):
  return jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, (batch,) + leaf.shape), carry)


def _inputs(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, F)), jnp.float32)


def _init(owner, *args, seed=0, scale=0.4):
  """Params of ``owner.init(key, *args)``'s shapes drawn by numpy, N(0, scale^2) (nothing to compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda key: owner.init(key, *args), jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(lambda leaf: jnp.asarray(scale * rng.normal(size=leaf.shape), leaf.dtype), shapes)


CELLS = {"elman": Elman(H), "lstm": LSTM(H), "gru": GRU(H), "gru_reset_before": GRU(H, reset_after=False)}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_recurrent_dropout_equals_the_equations_for_a_fixed_mask(name):
  cell = CELLS[name]
  params = _init(cell, F, seed=1)
  xs = _inputs()
  mask = recurrent_dropout_mask(jax.random.PRNGKey(2), 0.5, (B, H))
  assert set(np.unique(np.asarray(mask))) == {0.0, 2.0}              # inverted scaling 1 / (1 - p)
  wrapped = RecurrentDropoutCell(cell, 0.5)
  start = RecurrentDropoutState(_batched(cell.initial_carry(params), B), mask)
  final, ys = jax.jit(lambda p, x, s: rnn(wrapped, p, x, jnp.asarray(LENGTHS), initial_carry=s))(params, xs, start)
  ys_ref, h_ref, c_ref = _numpy_rnn(cell, params, xs, LENGTHS, mask=mask)
  np.testing.assert_allclose(ys, ys_ref, atol=1e-5)
  np.testing.assert_allclose(wrapped.hidden(final), h_ref, atol=1e-5)
  np.testing.assert_array_equal(final.mask, mask)                    # the mask rides along unchanged
  if isinstance(cell, LSTM):
    np.testing.assert_allclose(final.carry.c, c_ref, atol=1e-5)
  # the mask matters: without it the numbers differ
  assert np.max(np.abs(ys_ref - _numpy_rnn(cell, params, xs, LENGTHS)[0])) > 1e-3


@pytest.mark.parametrize("name,cell_rate", [("lstm", 0.5), ("gru", 0.0)])
def test_zoneout_equals_the_equations_for_fixed_noise_and_its_expectation(name, cell_rate):
  cell = CELLS[name]
  params = _init(cell, F, seed=1)
  xs = _inputs()
  train = ZoneoutCell(cell, 0.3, cell_rate, train=True)
  noise = jnp.swapaxes(train.noise(jax.random.PRNGKey(3), T, (B,)), 0, 1)       # [B, T, K]
  assert noise.shape == (B, T, H + (H if cell_rate else 0))
  evaluation = ZoneoutCell(cell, 0.3, cell_rate)
  (final, ys), (_, ys_eval) = jax.jit(lambda p, x, n: (rnn(train, p, train.with_noise(x, n), jnp.asarray(LENGTHS)),
                                                       rnn(evaluation, p, x, jnp.asarray(LENGTHS))))(params, xs, noise)
  d_h, d_c = np.asarray(noise[..., :H]), (np.asarray(noise[..., H:]) if cell_rate else None)
  ys_ref, h_ref, c_ref = _numpy_rnn(cell, params, xs, LENGTHS, d_h=d_h, d_c=d_c)
  np.testing.assert_allclose(ys, ys_ref, atol=1e-5)
  np.testing.assert_allclose(cell.hidden(final), h_ref, atol=1e-5)
  if cell_rate:
    np.testing.assert_allclose(final.c, c_ref, atol=1e-5)
  # evaluation: the expectation h_t = p h_{t-1} + (1 - p) h~_t (c_t with p_c)
  ys_ref, _, _ = _numpy_rnn(cell, params, xs, LENGTHS, d_h=0.3, d_c=cell_rate if cell_rate else None)
  np.testing.assert_allclose(ys_eval, ys_ref, atol=1e-5)


def _identity_elman(recurrent: float):
  """Elman with f = identity, W_xh = I, W_hh = recurrent * I, b = 0 (H = F = 64): h_t = x_t + r h_{t-1}."""
  cell = Elman(64, activation="identity")
  params = {"w_xh": jnp.eye(64), "w_hh": recurrent * jnp.eye(64), "b": jnp.zeros(64)}
  return cell, params


def test_recurrent_dropout_of_the_stack_keeps_one_mask_per_sequence_and_example():
  """h_t = 1 + m * h_{t-1}: a dropped unit stays at exactly 1 at every step, a kept one grows
  (h_1 = 1 + 2 * 1 = 3 at p = 0.5), so the dropped set is the same at every step."""
  cell, params = _identity_elman(1.0)
  stack = StackedRNN(cell, recurrent_dropout=0.5)
  xs = jnp.ones((4, T, 64))
  _, ys = jax.jit(lambda p, x, k: stack(p, x, train=True, rng=k))({"layer_0": {"forward": params}}, xs,
                                                                  jax.random.PRNGKey(0))
  ys = np.asarray(ys)
  dropped = ys[:, 1] == 1.0
  np.testing.assert_array_equal(ys[:, 1][~dropped], 3.0)
  for t in range(2, T):
    np.testing.assert_array_equal(ys[:, t] == 1.0, dropped)
  assert 0.3 < dropped.mean() < 0.7
  assert not all(np.array_equal(dropped[0], dropped[b]) for b in range(1, 4))   # one mask per example


def test_zoneout_of_the_stack_draws_fresh_masks_every_step():
  """h~_t = x_t = t + 1 (W_hh = 0), so h_t != t + 1 exactly where the unit was zoned out at step t."""
  cell, params = _identity_elman(0.0)
  stack = StackedRNN(cell, zoneout=0.5)
  xs = jnp.broadcast_to(jnp.arange(1.0, T + 1)[None, :, None], (4, T, 64))
  run = jax.jit(lambda p, x, k, train: stack(p, x, train=train, rng=k), static_argnums=3)
  p = {"layer_0": {"forward": params}}
  _, ys = run(p, xs, jax.random.PRNGKey(0), True)
  zoned = np.asarray(ys) != np.arange(1.0, T + 1)[None, :, None]            # d_t, [4, T, 64]
  assert 0.4 < zoned.mean() < 0.6
  assert all(not np.array_equal(zoned[:, t], zoned[:, t + 1]) for t in range(T - 1))
  # a zoned-out unit holds h_{t-1} exactly
  held = np.asarray(ys)[:, 1:][zoned[:, 1:]]
  np.testing.assert_array_equal(held, np.asarray(ys)[:, :-1][zoned[:, 1:]])
  # evaluation: h_t = 0.5 h_{t-1} + 0.5 (t + 1), the same for every unit
  _, ys_eval = run(p, xs, None, False)
  h, expected = 0.0, []
  for t in range(T):
    h = 0.5 * h + 0.5 * (t + 1)
    expected.append(h)
  np.testing.assert_allclose(ys_eval, np.broadcast_to(np.asarray(expected)[None, :, None], ys.shape), rtol=1e-6)


def test_weight_drop_equals_its_equation_and_keeps_the_kernel_and_the_hand_derived_backward():
  cell = LSTM(16)
  params = _init(cell, F)
  dropped = weight_drop(jax.random.PRNGKey(1), 0.4, params)
  keep = jax.random.bernoulli(jax.random.split(jax.random.PRNGKey(1), 1)[0], 0.6, params["w_hh"].shape)
  np.testing.assert_allclose(dropped["w_hh"], np.where(keep, params["w_hh"] / 0.6, 0.0), rtol=1e-6)
  assert 0.45 < float(jnp.mean(keep)) < 0.75
  for name in ("w_xh", "b"):
    assert dropped[name] is params[name]
  assert weight_drop(jax.random.PRNGKey(1), 0.0, params) is params
  xs = _inputs(2)
  a = jnp.zeros((T, B, 64))
  carry = _batched(cell.initial_carry(params), B)
  assert bptt.kernel_choice(cell, dropped, a, carry) == bptt.kernel_choice(cell, params, a, carry)

  def loss(p, key, grad):
    _, ys = rnn(cell, weight_drop(key, 0.4, p), xs, jnp.asarray(LENGTHS), options=ScanOptions(grad=grad))
    return jnp.sum(ys * jnp.cos(ys))

  grads = jax.jit(lambda p, key: {grad: jax.grad(loss)(p, key, grad) for grad in ("manual", "autodiff")})(
      params, jax.random.PRNGKey(1))
  for name in params:
    np.testing.assert_allclose(grads["manual"][name], grads["autodiff"][name], atol=1e-5)
  # a dropped entry of W_hh gets no gradient; a kept one gets its gradient scaled by 1 / (1 - p)
  assert float(jnp.max(jnp.abs(jnp.where(keep, 0.0, grads["manual"]["w_hh"])))) == 0.0


def test_evaluation_is_the_plain_stack_and_rate_zero_is_bit_for_bit():
  cell = LSTM(H)
  plain = StackedRNN(cell, dropout=0.2)
  regularised = StackedRNN(cell, dropout=0.2, recurrent_dropout=0.4, weight_dropout=0.3)
  params = _init(plain, F)
  xs, lengths, key = _inputs(), jnp.asarray(LENGTHS), jax.random.PRNGKey(5)

  @jax.jit
  def runs(p, x):
    return [stack(p, x, lengths, train=train, rng=key)[1] for stack in (plain, regularised) for train in (False, True)]

  plain_eval, plain_train, regularised_eval, regularised_train = runs(params, xs)
  np.testing.assert_array_equal(regularised_eval, plain_eval)
  assert not np.allclose(regularised_train, plain_train)
  # the wrappers at rate 0 are the plain cell on the same (lax.scan) path bit for bit; the GRU's
  # correction term z * (h - 1 * h) is exactly 0
  autodiff = ScanOptions(grad="autodiff")
  for cell in (LSTM(H), GRU(H)):
    params = _init(cell, F)
    start = _batched(cell.initial_carry(params), B)
    dropout_cell, zoneout_cell = RecurrentDropoutCell(cell, 0.0), ZoneoutCell(cell, 0.0, train=True)

    @jax.jit
    def three(p, x):
      return (rnn(cell, p, x, lengths, initial_carry=start, options=autodiff)[1],
              rnn(dropout_cell, p, x, lengths, initial_carry=dropout_cell.start(key, start))[1],
              rnn(zoneout_cell, p, x, lengths, initial_carry=start)[1])

    ys_plain, ys_dropout, ys_zoneout = three(params, xs)
    np.testing.assert_array_equal(ys_dropout, ys_plain)
    np.testing.assert_array_equal(ys_zoneout, ys_plain)


def test_padding_does_not_change_a_regularised_bidirectional_stack():
  """The same key gives the same masks whatever T (zoneout draws step t from fold_in(key, t))."""
  stack = StackedRNN(LSTM(H), bidirectional=True, recurrent_dropout=0.3, zoneout=0.2, zoneout_cell=0.4,
                     weight_dropout=0.25)
  params = _init(stack, F)
  xs, lengths, key = _inputs(), jnp.asarray(LENGTHS), jax.random.PRNGKey(7)
  padded = jnp.concatenate([xs, jnp.full((B, 3, F), 9.0)], axis=1)

  @jax.jit
  def runs(p, x, x_padded):
    return stack(p, x, lengths, train=True, rng=key), stack(p, x_padded, lengths, train=True, rng=key)

  (carries, ys), (carries_padded, ys_padded) = runs(params, xs, padded)
  np.testing.assert_allclose(ys_padded[:, :T], ys, atol=1e-6)
  np.testing.assert_array_equal(ys_padded[:, T:], 0.0)
  for a, b in zip(jax.tree_util.tree_leaves(carries), jax.tree_util.tree_leaves(carries_padded)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_gradients_equal_float64_finite_differences_for_fixed_masks():
  """All three regularisers at once: zoneout (h and c) around recurrent dropout (LSTM; GRU with its
  state-gate correction), DropConnect on W_hh, each with a fixed mask; d/d eps L(params + eps v)."""
  rng = np.random.default_rng(0)
  lstm, gru = LSTM(H, param_dtype="float64"), GRU(H, param_dtype="float64")
  cells = (ZoneoutCell(RecurrentDropoutCell(lstm, 0.4), 0.3, 0.5, train=True),
           ZoneoutCell(RecurrentDropoutCell(gru, 0.4), 0.3, train=True))
  cast = lambda tree: jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), tree)
  params = [cast(_init(LSTM(H), F, seed=1)), cast(_init(GRU(H), F, seed=2))]
  direction = [jax.tree_util.tree_map(lambda v: rng.normal(size=v.shape), p) for p in params]
  xs = rng.normal(size=(B, T, F))
  masks = [np.where(rng.random((B, H)) < 0.6, 1 / 0.6, 0.0) for _ in cells]
  noises = [(rng.random((B, T, cell.noise_size)) < 0.3).astype(np.float64) for cell in cells]
  drops = [np.where(rng.random(p["w_hh"].shape) < 0.7, 1 / 0.7, 0.0) for p in params]
  with jax.enable_x64(True):
    @jax.jit
    def check(params, direction, xs, masks, noises, drops):
      results = []
      for cell, p, v, mask, noise, drop in zip(cells, params, direction, masks, noises, drops):
        start = RecurrentDropoutState(_batched(cell.cell.cell.initial_carry(p), B), mask)

        def loss(p):
          p = {**p, "w_hh": p["w_hh"] * drop}                             # DropConnect with a fixed M
          _, ys = rnn(cell, p, cell.with_noise(xs, noise), jnp.asarray(LENGTHS), initial_carry=start)
          return jnp.sum(jnp.sin(ys) * jnp.arange(1.0, H + 1))

        shifted = lambda eps: loss(jax.tree_util.tree_map(lambda a, b: a + eps * b, p, v))
        analytic = sum(jnp.vdot(g, v[k]) for k, g in jax.grad(loss)(p).items())
        results.append((analytic, (shifted(1e-6) - shifted(-1e-6)) / 2e-6))
      return results

    for analytic, numeric in check(params, direction, xs, masks, noises, drops):
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-7)
      assert abs(float(analytic)) > 1e-2


def test_wrappers_work_under_vmap_of_run_cell_and_jit():
  cell = GRU(H)
  params = _init(cell, F)
  xs, lengths = _inputs(), jnp.asarray(LENGTHS)
  wrapped = ZoneoutCell(RecurrentDropoutCell(cell, 0.3), 0.2, train=True)
  start = wrapped.cell.start(jax.random.PRNGKey(1), _batched(cell.initial_carry(params), B))
  inputs = wrapped.with_noise(xs, jnp.swapaxes(wrapped.noise(jax.random.PRNGKey(2), T, (B,)), 0, 1))
  _, ys_batch = jax.jit(lambda x, s: rnn(wrapped, params, x, lengths, initial_carry=s, reverse=True))(inputs, start)
  one = lambda x, n, s: run_cell(wrapped, params, x, n, initial_carry=s, reverse=True)[1]
  ys_vmap = jax.jit(jax.vmap(one))(inputs, lengths, start)
  np.testing.assert_allclose(ys_vmap, ys_batch, atol=1e-6)
  assert "autodiff" in bptt.unsupported_reason(wrapped) and "recurrent product" in bptt.unsupported_reason(
      wrapped.cell)
  assert bptt.kernel_choice(wrapped, params, inputs, start).kernel is None


def test_language_model_draws_masks_from_its_key_and_decodes_with_the_zoneout_expectation():
  model = LanguageModel(LSTM(H), vocab_size=11, embed_size=6, zoneout=0.1, zoneout_cell=0.3)
  params = _init(model)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 7)), jnp.int32)
  batch = {"inputs": ids, "targets": jnp.roll(ids, -1, axis=1)}
  loss = jax.jit(make_loss_fn(model, train=True))
  (loss_a, _), (loss_b, _) = loss(params, batch, jax.random.PRNGKey(2)), loss(params, batch, jax.random.PRNGKey(3))
  assert np.isfinite(float(loss_a)) and float(loss_a) != float(loss_b)       # the key draws the masks
  # one-step decoding (sampling) runs the evaluation model, with the zoneout expectation
  @jax.jit
  def whole_and_stepwise(p, batch):
    def body(carries, token):
      return model.next_token_logits(p, carries, token)
    return model(p, batch)[0], jax.lax.scan(body, model.initial_carries(p, 2), batch["inputs"].T)[1]

  logits, stepwise = whole_and_stepwise(params, batch)
  np.testing.assert_allclose(jnp.swapaxes(stepwise, 0, 1), logits, atol=1e-5)
  # the config's fields reach the stack, with the rate bounds of the config
  stack = build_model(LMConfig(recurrent_dropout=0.25, zoneout=0.05, zoneout_cell=0.5, weight_dropout=0.5), 11).stack
  assert (stack.recurrent_dropout, stack.zoneout, stack.zoneout_cell, stack.weight_dropout) == (0.25, 0.05, 0.5, 0.5)
  with pytest.raises(ValueError, match="zoneout"):
    config.check(LMConfig(zoneout=1.0))


def test_flax_layer_draws_the_regularisers_masks_from_its_dropout_rng():
  from rnn_jax.flax_modules import RNNLayer
  stack = StackedRNN(GRU(H), recurrent_dropout=0.3, weight_dropout=0.2)
  layer = RNNLayer(stack)
  xs = _inputs()
  variables = {"params": _init(stack, F)}                # what layer.init makes: the stack's params
  train = jax.jit(lambda v, x, key: layer.apply(v, x, train=True, rngs={"dropout": key})[1])
  ys_a, ys_b = train(variables, xs, jax.random.PRNGKey(3)), train(variables, xs, jax.random.PRNGKey(4))
  ys_eval = jax.jit(lambda p, x: stack(p, x)[1])(dict(variables["params"]), xs)
  assert not np.allclose(ys_a, ys_b) and not np.allclose(ys_a, ys_eval)
  np.testing.assert_array_equal(train(variables, xs, jax.random.PRNGKey(3)), ys_a)


def test_embedding_dropout_drops_whole_word_types_once_per_batch_and_only_in_training():
  from rnn_jax import layers
  from rnn_jax.regularizers import embedding_dropout
  vocab, rate = 4000, 0.3
  table = jax.random.normal(jax.random.PRNGKey(0), (vocab, 5))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (8, 400)), jnp.int32)
  dropped = embedding_dropout(jax.random.PRNGKey(1), rate, table[ids], ids, vocab)
  ratio = np.asarray(dropped / table[ids])                           # m[w_t], the same in every feature
  np.testing.assert_allclose(ratio, ratio[..., :1].repeat(5, -1), rtol=1e-6)
  per_type = {}
  for word, scale in zip(np.asarray(ids).ravel(), ratio[..., 0].ravel()):
    per_type.setdefault(int(word), set()).add(round(float(scale), 5))
  assert all(len(scales) == 1 for scales in per_type.values())       # every occurrence of a word alike
  assert {s for scales in per_type.values() for s in scales} == {0.0, round(1 / (1 - rate), 5)}
  share = np.mean([0.0 in scales for scales in per_type.values()])
  assert abs(share - rate) < 0.04, share                             # about rate of the types seen dropped
  # a dropped word's row of E gets no gradient, a kept one gets 1 / (1 - rate) per occurrence
  grad = jax.grad(lambda t: embedding_dropout(jax.random.PRNGKey(1), rate, t[ids], ids, vocab).sum())(table)
  counts = np.bincount(np.asarray(ids).ravel(), minlength=vocab)
  kept = np.zeros(vocab)
  for word, scales in per_type.items():
    kept[word] = max(scales)
  np.testing.assert_allclose(np.asarray(grad)[:, 0], counts * kept, rtol=1e-5)
  np.testing.assert_array_equal(embedding_dropout(jax.random.PRNGKey(1), 0.0, table[ids], ids, vocab), table[ids])
  # in the language model: training equals the evaluation model on E with the dropped rows zeroed
  model = LanguageModel(GRU(H), vocab_size=13, embed_size=6, embedding_dropout=0.5)
  params = _init(model)
  batch = {"inputs": jnp.asarray(np.random.default_rng(2).integers(0, 13, (3, 9)), jnp.int32)}
  key = jax.random.PRNGKey(5)
  train_logits = model(params, batch, train=True, rng=key)[0]
  stream = jax.random.fold_in(key, layers._EMBEDDING_DROPOUT_STREAM)
  keep = jax.random.bernoulli(stream, 0.5, (13,))
  masked = {**params, "embedding": {"table": params["embedding"]["table"] * (keep[:, None] / 0.5)}}
  np.testing.assert_allclose(train_logits, model(masked, batch)[0], atol=1e-5)
  assert not np.allclose(train_logits, model(params, batch)[0])
  np.testing.assert_array_equal(model(params, batch, train=True, rng=key)[0], train_logits)   # from its key
  # the config's field reaches every model that reads tokens
  from rnn_jax.classifier import SentenceClassifier
  from rnn_jax.tagger import SequenceTagger
  assert build_model(LMConfig(embedding_dropout=0.1), 11).body.embedding_dropout == 0.1
  assert SequenceTagger(13, 3, GRU(H), embedding_dropout=0.2).body.embedding_dropout == 0.2
  classifier = SentenceClassifier(13, 3, GRU(H), embedding_dropout=0.3, recurrent_dropout=0.1, weight_dropout=0.2)
  assert classifier.body.embedding_dropout == 0.3
  assert (classifier.encoder.recurrent_dropout, classifier.encoder.weight_dropout) == (0.1, 0.2)
  with pytest.raises(ValueError, match="embedding_dropout must be in"):
    LanguageModel(GRU(H), vocab_size=13, embed_size=6, embedding_dropout=1.0)
  with pytest.raises(ValueError, match="needs an rng key"):
    model(params, batch, train=True)


def _train_without_key(stack):
  return stack(_init(stack, F), jnp.zeros((B, T, F)), train=True)


@pytest.mark.parametrize("make,message", [
    (lambda: StackedRNN(LSTM(H), recurrent_dropout=1.0), "recurrent_dropout must be a number in [0, 1)"),
    (lambda: StackedRNN(LSTM(H), zoneout=-0.1), "zoneout must be a number in [0, 1)"),
    (lambda: StackedRNN(LSTM(H), weight_dropout="0.2"), "weight_dropout must be a number in [0, 1)"),
    (lambda: StackedRNN(GRU(H), zoneout_cell=0.5), "zoneout_cell zones out the LSTM's cell state c; gru has none"),
    (lambda: StackedRNN(MinGRU(H), recurrent_dropout=0.2), "mingru has no recurrent weights"),
    (lambda: StackedRNN(MinGRU(H), weight_dropout=0.2), "mingru has no recurrent weight w_hh"),
    (lambda: StackedRNN(LSTM(H), zoneout=0.1, scan=ScanOptions(grad="manual")), "use grad='auto'"),
    (lambda: RecurrentDropoutCell(ZoneoutCell(LSTM(H), 0.1), 0.2), "a ZoneoutCell goes outside"),
    (lambda: _train_without_key(StackedRNN(LSTM(H), recurrent_dropout=0.2)), "needs an rng key"),
    (lambda: rnn(ZoneoutCell(LSTM(H), 0.1, train=True), _init(LSTM(H), F),
                 jnp.zeros((B, T, F))), "4 + 8 = 12 features (with_noise)"),
])
def test_bad_settings_name_the_parameter(make, message):
  with pytest.raises(ValueError) as error:
    make()
  assert message in str(error.value)
