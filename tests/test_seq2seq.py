"""Encoder-decoder: shapes, teacher forcing, source reversal, padding, greedy and beam decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import cells, seq2seq

SOURCES = [[3, 4, 5, 6], [7, 8], [9]]
TARGETS = [[4, 5, 6], [8, 9, 10, 11, 5], []]


def make_model(kind, cell, num_layers=1, **options):
  return seq2seq.Seq2Seq(kind, cell, source_vocab_size=12, target_vocab_size=13, embed_size=6,
                         num_layers=num_layers, **options)


MODELS = [("cho", cells.GRU(10), 1), ("sutskever", cells.LSTM(10), 2), ("cho", cells.LSTM(8), 2)]


def fast_params(model, seed):
  """Params of ``model.init``'s shapes, U(-0.3, 0.3) drawn by numpy: no random-number kernel is compiled
  per shape (what ``init`` draws matters only to the test of the loss at init, which uses it)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed))
  return jax.tree_util.tree_map(lambda leaf: rng.uniform(-0.3, 0.3, leaf.shape).astype(np.float32), shapes)


def test_make_batch_shifts_targets_for_teacher_forcing():
  batch = seq2seq.make_batch([[3, 4]], [[5, 6, 7]], bos_id=1, eos_id=2, pad_id=0, pad_multiple=8)
  assert batch.source.shape == (1, 8) and batch.target_inputs.shape == (1, 8)
  np.testing.assert_array_equal(batch.source[0, :3], [3, 4, 0])
  np.testing.assert_array_equal(batch.target_inputs[0, :5], [1, 5, 6, 7, 0])
  np.testing.assert_array_equal(batch.target_outputs[0, :5], [5, 6, 7, 2, 0])
  assert batch.source_lengths.tolist() == [2] and batch.target_lengths.tolist() == [4]


def test_make_batch_rejects_empty_source():
  with pytest.raises(ValueError, match="source sequence is empty"):
    seq2seq.make_batch([[]], [[3]], 1, 2)


def test_reverse_padded_keeps_padding_at_the_end():
  ids = jnp.array([[1, 2, 3, 0], [4, 5, 0, 0]])
  out = seq2seq.reverse_padded(ids, jnp.array([3, 2]))
  np.testing.assert_array_equal(out, [[3, 2, 1, 0], [5, 4, 0, 0]])


@pytest.mark.parametrize("kind,cell,num_layers", MODELS)
def test_teacher_forcing_matches_step_by_step_decoding(kind, cell, num_layers):
  model = make_model(kind, cell, num_layers)
  params = model.init(jax.random.PRNGKey(0))
  batch = seq2seq.make_batch(SOURCES, TARGETS, model.bos_id, model.eos_id)

  @jax.jit
  def run(params, batch):   # one compilation: teacher forcing, the loss, and decode_step once per token
    encoded = model.encode(params, batch.source, batch.source_lengths)
    step = lambda state, ids: model.decode_step(params, state, ids, encoded)
    _, stepped = jax.lax.scan(step, model.initial_state(encoded), batch.target_inputs.T)
    return model(params, batch), jnp.swapaxes(stepped, 0, 1), model.loss(params, batch)

  logits, stepped, loss = run(params, batch)
  assert logits.shape == (3, 6, 13)
  real = np.arange(6)[None, :] < batch.target_lengths[:, None]
  np.testing.assert_allclose(np.asarray(stepped)[real], np.asarray(logits)[real], atol=1e-5)
  assert 0.5 * np.log(13) < float(loss) < 2 * np.log(13)   # near-uniform predictions at init


@pytest.mark.parametrize("kind,cell,num_layers", MODELS[1:2])
def test_source_padding_does_not_change_the_output(kind, cell, num_layers):
  model = make_model(kind, cell, num_layers)
  params = fast_params(model, 1)
  narrow = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
  wide = seq2seq.make_batch(SOURCES, TARGETS, 1, 2, pad_multiple=16)
  a, b = jax.jit(lambda p: (model(p, narrow), model(p, wide)))(params)
  b = b[:, :a.shape[1]]
  real = np.arange(a.shape[1])[None, :] < narrow.target_lengths[:, None]
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)


def test_sutskever_reads_the_source_reversed():
  model = make_model("sutskever", cells.LSTM(8))
  forward_reader = make_model("sutskever", cells.LSTM(8), reverse_source=False)
  params = fast_params(model, 2)
  batch = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
  flipped = seq2seq.make_batch([s[::-1] for s in SOURCES], TARGETS, 1, 2)
  reversed_logits, flipped_logits, forward_logits = jax.jit(
      lambda p: (model(p, batch), forward_reader(p, flipped), forward_reader(p, batch)))(params)
  np.testing.assert_allclose(reversed_logits, flipped_logits, atol=1e-6)
  assert not np.allclose(reversed_logits, forward_logits, atol=1e-4)


def test_cho_context_conditions_every_step():
  """Changing only c (through the encoder) changes the logits at every decoder step."""
  model = make_model("cho", cells.GRU(10))
  params = fast_params(model, 3)
  batch = seq2seq.make_batch([[3, 4, 5]], [[6, 7, 8, 9]], 1, 2)
  other = seq2seq.make_batch([[9, 10, 11]], [[6, 7, 8, 9]], 1, 2)
  difference = np.abs(np.subtract(*jax.jit(lambda p: (model(p, batch), model(p, other)))(params)))
  assert np.all(difference.max(axis=-1) > 1e-4)


@pytest.mark.parametrize("kind,cell,num_layers", MODELS[:2])
def test_beam_width_one_equals_greedy(kind, cell, num_layers):
  model = make_model(kind, cell, num_layers)
  params = fast_params(model, 4)
  batch = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
  (greedy, greedy_lengths), (beam, beam_lengths, _) = jax.jit(lambda p, s, n: (
      model.greedy_decode(p, s, n, 9), model.beam_search(p, s, n, 9, beam_width=1)))(
          params, batch.source, batch.source_lengths)
  np.testing.assert_array_equal(greedy, beam)
  np.testing.assert_array_equal(greedy_lengths, beam_lengths)


def _masked_log_probs(model, params, sources, tokens, lengths):
  """log p(y | x) of each hypothesis under the decoder's renormalised (no <pad>/<bos>) softmax (one batch)."""
  hypotheses = [[int(t) for t in row[:length]] for row, length in zip(np.asarray(tokens), np.asarray(lengths))]
  bodies = [ids[:-1] if ids and ids[-1] == model.eos_id else ids for ids in hypotheses]
  batch = seq2seq.make_batch(sources, bodies, model.bos_id, model.eos_id)
  logits = model(params, batch)
  logits = logits.at[..., model.pad_id].set(-1e9).at[..., model.bos_id].set(-1e9)
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return [float(sum(log_probs[b, t, i] for t, i in enumerate(ids))) for b, ids in enumerate(hypotheses)]


@pytest.mark.parametrize("kind,cell,num_layers", MODELS[:1])
def test_beam_scores_are_the_hypotheses_log_probabilities(kind, cell, num_layers):
  model = make_model(kind, cell, num_layers)
  params = fast_params(model, 5)
  batch = seq2seq.make_batch(SOURCES, TARGETS, 1, 2)
  tokens, lengths, scores = jax.jit(lambda p, s, n: model.beam_search(p, s, n, 6, beam_width=3))(
      params, batch.source, batch.source_lengths)
  expected = _masked_log_probs(model, params, SOURCES, tokens, lengths)
  for b in range(len(SOURCES)):
    assert scores[b] == pytest.approx(expected[b], abs=1e-4)
    emitted = np.asarray(tokens[b, :lengths[b]])
    assert not np.isin(emitted, [model.pad_id, model.bos_id]).any()
    assert np.all(np.asarray(tokens[b, lengths[b]:]) == model.pad_id)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown kind"):
    make_model("bahdanau", cells.GRU(4))
  model = make_model("cho", cells.GRU(4))
  params = fast_params(model, 0)
  batch = seq2seq.make_batch([[3, 12]], [[4]], 1, 2)   # 12 >= source vocabulary 12
  with pytest.raises(ValueError, match=r"source ids must lie in \[0, 12\)"):
    model.loss(params, batch)
  with pytest.raises(ValueError, match="beam_width"):
    model.beam_search(params, jnp.array([[3]]), jnp.array([1]), 4, beam_width=0)
