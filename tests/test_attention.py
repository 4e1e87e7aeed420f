"""Attention: the score equations, the masked softmax, padding invariance of logits and decoded tokens,
beam width 1 = greedy, float64 gradients against finite differences, and model descriptions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import attention, cells, seq2seq
from rnn_jax.rundir import build, describe

SOURCES = [[3, 4, 5, 6, 7], [7, 8], [9, 10, 11]]
TARGETS = [[4, 5, 6], [8, 9, 10, 11, 5], []]

# (kind, cell, layers, attention, input_feeding): every score, both decoder starts, the scanned and the
# vectorised teacher forcing (Luong without input feeding), one and two layers (dot).
MODELS = [("cho", cells.GRU(6), 1, "bahdanau", False), ("sutskever", cells.LSTM(6), 2, "dot", True),
          ("sutskever", cells.LSTM(6), 1, "general", False), ("cho", cells.GRU(6), 1, "concat", True)]
IDS = [m[3] + ("+feed" if m[4] else "") for m in MODELS]


def make_model(kind, cell, num_layers, kind_of_attention, input_feeding, **options):
  return seq2seq.Seq2Seq(kind, cell, source_vocab_size=12, target_vocab_size=13, embed_size=5,
                         num_layers=num_layers, attention=kind_of_attention, input_feeding=input_feeding,
                         **options)


# ---- the pure functions ----------------------------------------------------------
@pytest.mark.parametrize("kind", attention.KINDS)
def test_scores_and_context_follow_the_equations(kind):
  rng = np.random.default_rng(0)
  B, S, Q = 2, 4, 3
  M = Q if kind == "dot" else 5
  params = attention.init(kind, jax.random.PRNGKey(1), Q, M, attention_size=7)
  query, memory = rng.normal(size=(B, Q)), rng.normal(size=(B, S, M))
  mask = np.array([[True, True, True, False], [True, False, False, False]])
  keys = attention.project_keys(kind, params, jnp.asarray(memory, jnp.float32))
  context, weights = attention.attend(kind, params, jnp.asarray(query, jnp.float32), keys,
                                      jnp.asarray(memory, jnp.float32), jnp.asarray(mask))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  if kind in ("bahdanau", "concat"):   # v^T tanh(W_q q + W_k h_j)
    expected = np.einsum("a,bsa->bs", p["v"], np.tanh((query @ p["w_query"].T)[:, None] + memory @ p["w_key"].T))
  elif kind == "general":              # q^T W_a h_j
    expected = np.einsum("bq,qm,bsm->bs", query, p["w_key"], memory)
  else:                                # q^T h_j
    expected = np.einsum("bq,bsq->bs", query, memory)
  np.testing.assert_allclose(attention.scores(kind, params, jnp.asarray(query, jnp.float32), keys), expected,
                             rtol=1e-5, atol=1e-5)
  expected = np.where(mask, np.exp(expected - expected.max(-1, keepdims=True)), 0.0)
  expected /= expected.sum(-1, keepdims=True)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(context, np.einsum("bs,bsm->bm", expected, memory), rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(weights)[~mask])


def test_masked_softmax_is_safe_for_all_masked_rows_and_junk_scores():
  scores = jnp.array([[1.0, 2.0, jnp.nan, jnp.inf], [0.5, -jnp.inf, 3.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
  mask = jnp.array([[True, True, False, False], [False, False, False, False], [True, True, True, True]])
  weights = attention.masked_softmax(scores, mask)
  np.testing.assert_allclose(weights[0], [1 / (1 + np.e), np.e / (1 + np.e), 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(weights[1], np.zeros(4))          # no real position: zeros, not NaN
  np.testing.assert_allclose(weights[2], jax.nn.softmax(scores[2]), rtol=1e-6)
  target = jnp.arange(12.0).reshape(3, 4)
  grad = jax.grad(lambda s: jnp.sum(attention.masked_softmax(s, mask) * target))(scores)
  assert np.all(np.isfinite(grad)) and not np.any(np.asarray(grad)[~np.asarray(mask)])


def test_bad_attention_settings_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown attention 'luong'"):
    make_model("cho", cells.GRU(4), 1, "luong", False)
  with pytest.raises(ValueError, match="input_feeding applies to Luong attention"):
    make_model("cho", cells.GRU(4), 1, "bahdanau", True)
  with pytest.raises(ValueError, match="context_size"):
    make_model("cho", cells.GRU(4), 1, "dot", False, context_size=8)
  with pytest.raises(ValueError, match="attention_weights needs a model with attention"):
    model = make_model("cho", cells.GRU(4), 1, "", False)
    model.attention_weights(None, None)
  with pytest.raises(ValueError, match="dot scores need query_size == memory_size"):
    attention.init("dot", jax.random.PRNGKey(0), 4, 8, 4)


@pytest.mark.parametrize("spec", MODELS, ids=IDS)
def test_model_description_round_trips(spec):
  model = make_model(*spec)
  assert build(describe(model)) == model   # what model.json holds rebuilds the same (hashable) model


# ---- the model: padding, decoding, teacher forcing ---------------------------------
def _pad(sources, width, rng=None, vocab=12):
  """[B, width] ids: each source, then <pad> (or random junk ids when rng is given)."""
  out = np.zeros((len(sources), width), np.int32) if rng is None else rng.integers(0, vocab, (len(sources), width))
  for row, source in enumerate(sources):
    out[row, :len(source)] = source
  return out.astype(np.int32)


@functools.lru_cache(maxsize=None)
def model_and_params(spec):
  """The model of ``spec`` and float32 params of ``init``'s shapes, U(-0.3, 0.3) drawn by numpy (made once,
  shared by the tests below: no random-number kernels to compile per shape)."""
  model = make_model(*spec)
  rng = np.random.default_rng(3)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(3))
  return model, jax.tree_util.tree_map(lambda leaf: rng.uniform(-0.3, 0.3, leaf.shape).astype(np.float32), shapes)


def _replay(model, params, source_batch, tokens, lengths):
  """Teacher forcing on decoded tokens [B, T] (<bos> prepended): the batch and its logits [B, T, V]."""
  inputs = jnp.concatenate([jnp.full((tokens.shape[0], 1), model.bos_id), tokens[:, :-1]], axis=1)
  batch = seq2seq.Batch(source_batch.source, source_batch.source_lengths, inputs, tokens, lengths)
  return model._next_token_logits(model(params, batch))


def _widened(batch, extra, rng):
  """The batch with ``extra`` more source columns: <pad>, or random junk ids when rng is given."""
  return batch._replace(source=_pad(SOURCES, batch.source.shape[1] + extra, rng))


@pytest.mark.parametrize("spec", [pytest.param(spec, id=name, marks=[pytest.mark.slow] if "feed" in name else [])
                                  for spec, name in zip(MODELS, IDS)])   # input feeding: in the beam test
def test_source_padding_changes_neither_logits_nor_greedy_tokens(spec):
  """Extra source padding (<pad>, or junk ids, after each source) leaves the logits, the attention
  weights and the greedy tokens unchanged; the greedy tokens are the argmax of teacher forcing on them
  (the decoder step and teacher forcing agree, for the scanned and the vectorised teacher forcing)."""
  model, params = model_and_params(spec)
  max_len = 7

  @jax.jit
  def run(params, narrow, wide):   # one compilation; the junk fills below reuse it
    logits, weights = model._teacher_forcing(params, narrow)
    wide_logits, wide_weights = model._teacher_forcing(params, wide)
    greedy, lengths = model.greedy_decode(params, narrow.source, narrow.source_lengths, max_len)
    wide_greedy, wide_lengths = model.greedy_decode(params, wide.source, wide.source_lengths, max_len)
    replayed = jnp.argmax(_replay(model, params, narrow, greedy, lengths), axis=-1)
    return (logits, weights, greedy, lengths), (wide_logits, wide_weights, wide_greedy, wide_lengths), replayed

  narrow = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
  S = narrow.source.shape[1]
  real = np.arange(narrow.target_inputs.shape[1])[None, :] < narrow.target_lengths[:, None]
  rng = np.random.default_rng(0)
  for junk in (None, rng, rng):                                      # <pad>, then two random junk fills
    outputs = jax.tree_util.tree_map(np.asarray, run(params, narrow, _widened(narrow, 6, junk)))
    (logits, weights, greedy, lengths), (wide_logits, wide_weights, wide_greedy, wide_lengths), replayed = outputs
    np.testing.assert_allclose(wide_logits[real], logits[real], atol=1e-5)
    np.testing.assert_allclose(wide_weights[:, :, :S], weights, atol=1e-6)
    assert not np.any(wide_weights[:, :, S:])
    np.testing.assert_array_equal(wide_greedy, greedy)
    np.testing.assert_array_equal(wide_lengths, lengths)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  source_real = np.arange(S)[None, :] < narrow.source_lengths[:, None]
  assert not np.any(weights.transpose(0, 2, 1)[~source_real])        # no weight on padding
  steps = np.arange(max_len)[None, :] < lengths[:, None]
  np.testing.assert_array_equal(replayed[steps], greedy[steps])      # decode step == teacher forcing


@pytest.mark.parametrize("spec", [pytest.param(MODELS[1], id=IDS[1]),
                                  pytest.param(MODELS[0], id=IDS[0], marks=pytest.mark.slow)])
def test_beam_search_with_attention(spec):
  """Beam search carries the attention state per beam: width 1 equals greedy, source padding leaves the
  beams unchanged, and each best beam's score is its teacher-forced log-probability (so the beams'
  carries and input feed h~ follow their hypotheses when beams are reordered)."""
  model, params = model_and_params(spec)
  max_len = 7

  @jax.jit
  def run(params, narrow, wide):
    tokens, lengths, scores = model.beam_search(params, narrow.source, narrow.source_lengths, max_len, 3)
    wide_beam = model.beam_search(params, wide.source, wide.source_lengths, max_len, 3)
    beam1 = model.beam_search(params, narrow.source, narrow.source_lengths, max_len, 1)[0]
    greedy = model.greedy_decode(params, narrow.source, narrow.source_lengths, max_len)[0]
    log_probs = jax.nn.log_softmax(_replay(model, params, narrow, tokens, lengths), axis=-1)
    picked = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    steps = jnp.arange(max_len)[None, :] < lengths[:, None]
    return (tokens, lengths, scores), wide_beam, beam1, greedy, jnp.sum(jnp.where(steps, picked, 0.0), axis=1)

  narrow = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
  beam, wide_beam, beam1, greedy, replayed_scores = jax.tree_util.tree_map(
      np.asarray, run(params, narrow, _widened(narrow, 5, np.random.default_rng(1))))
  for got, expected in zip(wide_beam, beam):
    np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_array_equal(beam1, greedy)
  np.testing.assert_allclose(beam[2], replayed_scores, atol=1e-4)


def test_reversed_source_weights_are_returned_in_source_order():
  """A reversed-source (Sutskever) model equals a forward reader of the flipped source; its weights come
  back indexed by the source's own positions."""
  model, params = model_and_params(MODELS[1])
  assert model.reversed_source
  forward_reader = make_model(*MODELS[1], reverse_source=False)
  batch = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
  flipped = seq2seq.make_batch([s[::-1] for s in SOURCES], TARGETS, 1, 2)
  both = jax.jit(lambda p: (model.attention_weights(p, batch), forward_reader.attention_weights(p, flipped)))
  weights, flipped_weights = (np.asarray(w) for w in both(params))
  for b, source in enumerate(SOURCES):
    L = len(source)
    np.testing.assert_allclose(weights[b, :, :L], flipped_weights[b, :, :L][:, ::-1], atol=1e-6)


# ---- gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", MODELS, ids=IDS)
def test_gradients_match_finite_differences_in_float64(spec):
  """<grad L, d> equals (L(p + eps d) - L(p - eps d)) / 2 eps along a random direction d over all params,
  and along one over the attention's own params (W_a, U_a, v_a, W_c, the bridge)."""
  with jax.enable_x64(True):
    model, params = model_and_params(spec)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    batch = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
    eps = 1e-6
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch)))   # the one compilation
    loss, grad = jax.tree_util.tree_map(np.asarray, loss_and_grad(params))

    def check(params, direction):   # the shifted params are made on the host: no other compilation
      shifted = lambda sign: jax.tree_util.tree_map(lambda p, d: p + sign * eps * d, params, direction)
      numeric = (float(loss_and_grad(shifted(1.0))[0]) - float(loss_and_grad(shifted(-1.0))[0])) / (2 * eps)
      analytic = sum(float(np.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                          jax.tree_util.tree_leaves(direction)))
      return loss, numeric, analytic

    rng = np.random.default_rng(6)
    full = jax.tree_util.tree_map(lambda leaf: rng.normal(size=leaf.shape), params)
    own = ("attention", "attentional", "bridge")
    attention_only = {name: value if name in own else jax.tree_util.tree_map(np.zeros_like, value)
                      for name, value in full.items()}
    assert any(name in params for name in own)
    for direction in (full, attention_only):
      loss, numeric, analytic = (float(x) for x in check(params, direction))
      assert 0.5 * np.log(13) < loss < 2 * np.log(13)
      assert abs(analytic) > 1e-4
      assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-9)
