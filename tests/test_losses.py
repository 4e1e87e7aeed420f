"""Losses and metrics against plain numpy written from their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax.losses import accuracy, bits_per_char, cross_entropy, perplexity, sigmoid_nll


def np_log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)) * 3
  targets = rng.integers(0, 7, size=(3, 5))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
  return logits, targets, mask


def test_cross_entropy_sum_and_mean_match_numpy(batch):
  logits, targets, mask = batch
  nll = -np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  with jax.enable_x64(True):
    total = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), reduction="sum")
    mean = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), reduction="mean")
    unmasked = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(total, (nll * mask).sum(1).mean(), rtol=1e-12)
  np.testing.assert_allclose(mean, (nll * mask).sum() / mask.sum(), rtol=1e-12)
  np.testing.assert_allclose(unmasked, nll.sum(1).mean(), rtol=1e-12)


def test_cross_entropy_rejects_out_of_range_targets_and_bad_shapes(batch):
  logits, targets, mask = batch
  bad = targets.copy()
  bad[0, 0] = 7
  with pytest.raises(ValueError, match=r"\[0, 7\)"):
    cross_entropy(jnp.asarray(logits), jnp.asarray(bad))
  with pytest.raises(ValueError, match="targets have shape"):
    cross_entropy(jnp.asarray(logits), jnp.asarray(targets[:, :4]))
  with pytest.raises(ValueError, match="unknown reduction"):
    cross_entropy(jnp.asarray(logits), jnp.asarray(targets), reduction="avg")


def test_sigmoid_nll_matches_numpy(batch):
  logits, _, mask = batch
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 2, size=logits.shape)
  p = 1 / (1 + np.exp(-logits))
  per_frame = -(frames * np.log(p) + (1 - frames) * np.log(1 - p)).sum(-1)
  with jax.enable_x64(True):
    got = sigmoid_nll(jnp.asarray(logits), jnp.asarray(frames), jnp.asarray(mask))
  np.testing.assert_allclose(got, (per_frame * mask).sum() / mask.sum(), rtol=1e-10)


def test_bpc_perplexity_accuracy(batch):
  logits, targets, mask = batch
  assert bits_per_char(math.log(2.0)) == pytest.approx(1.0)
  assert perplexity(math.log(120.7)) == pytest.approx(120.7)
  targets = targets.copy()
  targets[0] = logits[0].argmax(-1)  # row 0 fully right
  expected = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
  got = accuracy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert float(got) == pytest.approx(expected)
