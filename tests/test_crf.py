"""The linear-chain CRF (rnn_jax.crf) against brute-force enumeration of all K^L tag sequences."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import crf, losses

# Jitted once per shape: eager dispatch of every small op would cost more than the checks.
log_partition, nll, score = jax.jit(crf.log_partition), jax.jit(crf.nll), jax.jit(crf.score)
viterbi = jax.jit(crf.viterbi)


def enumerate_paths(emissions, length, transitions, start, end):
  """Every tag sequence of one sentence and its score, in numpy: (paths [K^L, L], scores [K^L])."""
  num_tags = emissions.shape[-1]
  paths = list(itertools.product(range(num_tags), repeat=length))
  paths = np.array(paths, np.int64).reshape(len(paths), length)
  scores = np.zeros(len(paths))
  for t in range(length):
    scores += emissions[t, paths[:, t]]
    if t:
      scores += transitions[paths[:, t - 1], paths[:, t]]
  if length:
    scores += start[paths[:, 0]] + end[paths[:, -1]]
  return paths, scores


def problem(seed, batch=5, steps=4, num_tags=3):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, steps, num_tags)), rng.normal(size=(num_tags, num_tags)),
          rng.normal(size=num_tags), rng.normal(size=num_tags))


def test_log_partition_score_and_viterbi_equal_brute_force_enumeration():
  with jax.enable_x64(True):
    decode = jax.jit(lambda u, l, a, s, e: (log_partition(u, l, a, s, e), *viterbi(u, l, a, s, e)))
    for seed, (steps, num_tags, lengths) in enumerate([(4, 3, [4, 3, 1, 0, 2]), (5, 2, [5, 5, 4, 1, 0])]):
      emissions, transitions, start, end = problem(seed, len(lengths), steps, num_tags)
      lengths = np.array(lengths)
      log_z, tags, best = map(np.asarray, decode(emissions, lengths, transitions, start, end))
      assert tags.dtype == np.int32 and tags.shape == (len(lengths), steps)
      every = {"emissions": [], "tags": [], "lengths": [], "scores": []}
      for row, length in enumerate(lengths):
        paths, scores = enumerate_paths(emissions[row], length, transitions, start, end)
        np.testing.assert_allclose(log_z[row], np.logaddexp.reduce(scores), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(best[row], scores.max(), rtol=1e-12, atol=1e-12)
        assert tags[row, :length].tolist() == paths[scores.argmax()].tolist()
        assert not tags[row, length:].any()  # padding holds 0
        padded = np.zeros((len(paths), steps), np.int64)
        padded[:, :length] = paths
        every["emissions"].append(np.repeat(emissions[row:row + 1], len(paths), 0))
        every["tags"].append(padded)
        every["lengths"].append(np.full(len(paths), length))
        every["scores"].append(scores)
      # score() of every path of every sentence, as one batch, equals the enumeration's.
      every = {k: np.concatenate(v) for k, v in every.items()}
      scores = score(every["emissions"], every["tags"], every["lengths"], transitions, start, end)
      np.testing.assert_allclose(scores, every["scores"], rtol=1e-12, atol=1e-12)
      # NLL = log Z - score >= 0; 0 for the empty sentence.
      sentence_nll = np.asarray(nll(emissions, tags, lengths, transitions, start, end))
      np.testing.assert_allclose(sentence_nll, log_z - best, atol=1e-12)
      assert np.all(sentence_nll >= 0) and sentence_nll[list(lengths).index(0)] == 0.0


def test_padding_changes_nothing_even_nan_padding():
  emissions, transitions, start, end = problem(3, batch=4, steps=5, num_tags=4)
  emissions = emissions.astype(np.float32)
  lengths = np.array([5, 2, 0, 3])
  rng = np.random.default_rng(4)
  tags = rng.integers(0, 4, size=(4, 5))
  wider = np.concatenate([emissions, np.full((4, 6, 4), np.nan, np.float32)], axis=1)
  wider_tags = np.concatenate([tags, rng.integers(0, 4, size=(4, 6))], axis=1)
  for row, length in enumerate(lengths):  # garbage past each length, inside the original width too
    wider[row, length:] = np.nan
    wider_tags[row, length:] = 3

  @jax.jit
  def results(u, y):
    value, grads = jax.value_and_grad(lambda u, a, s, e: nll(u, y, lengths, a, s, e).sum(),
                                      argnums=(0, 1, 2, 3))(u, transitions, start, end)
    path, best = viterbi(u, lengths, transitions, start, end)
    return value, grads, path, best

  narrow, wide = results(emissions, tags), results(wider, wider_tags)
  np.testing.assert_allclose(wide[0], narrow[0], rtol=1e-6)
  for row, length in enumerate(lengths):
    np.testing.assert_allclose(wide[1][0][row, :length], narrow[1][0][row, :length], rtol=1e-5, atol=1e-6)
  assert not np.asarray(wide[1][0])[:, 5:].any() and np.isfinite(np.asarray(wide[1][0])).all()
  for narrow_grad, wide_grad in zip(narrow[1][1:], wide[1][1:]):
    np.testing.assert_allclose(wide_grad, narrow_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(wide[2])[:, :5], narrow[2])
  np.testing.assert_allclose(wide[3], narrow[3], rtol=1e-6)


def test_nll_gradient_equals_central_finite_differences_in_float64():
  with jax.enable_x64(True):
    emissions, transitions, start, end = problem(5, batch=3, steps=4, num_tags=3)
    lengths = np.array([4, 2, 0])
    tags = np.array([[0, 2, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]])
    args = (emissions, transitions, start, end)
    loss = jax.jit(lambda u, a, s, e: jnp.sum(nll(u, tags, lengths, a, s, e)))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    rng = np.random.default_rng(6)
    eps = 1e-6
    for which in range(4):
      for _ in range(3):
        direction = rng.normal(size=args[which].shape)
        plus = list(args)
        minus = list(args)
        plus[which] = args[which] + eps * direction
        minus[which] = args[which] - eps * direction
        numeric = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
        np.testing.assert_allclose(float(np.sum(grads[which] * direction)), numeric, rtol=1e-7, atol=1e-8)
    # Padded emissions and the empty sentence get no gradient.
    assert not np.asarray(grads[0])[1, 2:].any() and not np.asarray(grads[0])[2].any()


def test_without_transitions_the_crf_is_independent_softmaxes():
  """A = 0, s = e = 0: Z factorises over tokens, so the NLL is the summed per-token softmax
  cross-entropy and Viterbi is the per-token argmax."""
  emissions, _, _, _ = problem(7, batch=4, steps=6, num_tags=5)
  emissions = jnp.asarray(emissions, jnp.float32)
  lengths = np.array([6, 3, 1, 0])
  tags = np.random.default_rng(8).integers(0, 5, size=(4, 6))
  mask = np.arange(6)[None, :] < lengths[:, None]
  zero = jnp.zeros((5, 5))
  cross_entropy = np.where(mask, losses.token_nll(emissions, jnp.asarray(tags)), 0).sum(axis=1)
  np.testing.assert_allclose(nll(emissions, tags, lengths, zero), cross_entropy, rtol=1e-5, atol=1e-5)
  path, _ = viterbi(emissions, lengths, zero)
  np.testing.assert_array_equal(path, np.where(mask, np.argmax(emissions, axis=-1), 0))


def test_iob2_constraints_forbid_invalid_paths_and_their_scores_get_no_gradient():
  names = ("B-LOC", "B-PER", "I-LOC", "I-PER", "O")
  allowed, allowed_start = crf.iob2_constraints(names)
  expected = np.ones((5, 5), bool)
  expected[[1, 3, 4], 2] = False  # I-LOC only after B-LOC or I-LOC
  expected[[0, 2, 4], 3] = False  # I-PER only after B-PER or I-PER
  np.testing.assert_array_equal(allowed, expected)
  np.testing.assert_array_equal(allowed_start, [True, True, False, False, True])
  assert crf.count_forbidden([[4, 2], [0, 2, 2, 4], [2], [1, 2], []], allowed, allowed_start) == 3
  with pytest.raises(ValueError, match="'NNP'"):
    crf.iob2_constraints(("O", "NNP"))
  # Emissions that favour "O I-PER I-LOC": unconstrained Viterbi follows them, constrained does not.
  emissions = jnp.asarray(np.eye(5)[[4, 3, 2]][None] * 5.0, jnp.float32)
  zero_a, zero_s = jnp.zeros((5, 5)), jnp.zeros(5)
  free, _ = viterbi(emissions, np.array([3]), zero_a, zero_s)
  assert free[0].tolist() == [4, 3, 2]
  transitions, start = crf.constrain(zero_a, zero_s, allowed, allowed_start)
  path, _ = viterbi(emissions, np.array([3]), transitions, start)
  assert crf.count_forbidden(np.asarray(path), allowed, allowed_start) == 0
  partition = lambda a, s: log_partition(emissions, np.array([3]), *crf.constrain(a, s, allowed, allowed_start))
  grads = jax.jit(jax.grad(lambda a, s: partition(a, s).sum(), argnums=(0, 1)))(zero_a, zero_s)
  assert not np.asarray(grads[0])[~allowed].any() and not np.asarray(grads[1])[~allowed_start].any()


def test_bad_shapes_and_lengths_name_the_argument():
  emissions = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(ValueError, match=r"transitions must have shape \[K, K\] = \(4, 4\)"):
    log_partition(emissions, np.array([3, 1]), np.zeros((3, 3)))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=3\]"):  # checked when concrete
    crf.viterbi(emissions, np.array([4, 1]), np.zeros((4, 4)))
  with pytest.raises(ValueError, match=r"start must have shape \[K\]"):
    nll(emissions, np.zeros((2, 3), int), np.array([3, 1]), np.zeros((4, 4)), np.zeros(3))
  with pytest.raises(ValueError, match=r"tags must lie in \[0, 4\)"):
    crf.score(emissions, np.array([[0, 4, 0], [0, 0, 0]]), np.array([3, 1]), np.zeros((4, 4)))
  # Tags past a sentence's length are never read, so they may hold anything.
  assert float(score(emissions, np.array([[0, 0, 0], [0, 9, 9]]), np.array([3, 1]), np.zeros((4, 4)))[1]) == 0
  # T = 0: every sentence is empty.
  empty = np.zeros((2, 0, 4), np.float32)
  assert np.asarray(log_partition(empty, np.array([0, 0]), np.zeros((4, 4)))).tolist() == [0, 0]
  assert viterbi(empty, np.array([0, 0]), np.zeros((4, 4)))[0].shape == (2, 0)
