"""Task generators: shapes, the stated memoryless baselines, the digits split and Mackey-Glass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnn_jax import losses, tasks


def test_adding_problem_has_one_marker_per_half_and_baseline_mse_one_sixth():
  batch = tasks.adding_problem(jax.random.key(0), 20000, 100)
  assert batch.xs.shape == (20000, 100, 2) and batch.targets.shape == (20000,)
  markers = np.asarray(batch.xs[..., 1])
  assert np.all(markers[:, :50].sum(1) == 1) and np.all(markers[:, 50:].sum(1) == 1)
  np.testing.assert_allclose(batch.targets, np.sum(np.asarray(batch.xs[..., 0]) * markers, axis=1), rtol=1e-6)
  always_one = float(jnp.mean(jnp.square(batch.targets - 1.0)))
  assert abs(always_one - tasks.adding_baseline_mse()) < 0.005
  assert abs(tasks.adding_baseline_mse() - 0.1667) < 1e-4


def test_adding_problem_rejects_bad_sizes():
  with pytest.raises(ValueError, match="length must be >= 2"):
    tasks.adding_problem(jax.random.key(0), 4, 1)
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    tasks.adding_problem(jax.random.key(0), 0, 10)


@pytest.mark.parametrize("delay", [5, 100])
def test_copy_task_layout_and_memoryless_cross_entropy(delay):
  batch = tasks.copy_task(jax.random.key(1), 64, delay)
  tokens = np.asarray(jnp.argmax(batch.xs, -1))
  targets = np.asarray(batch.targets)
  assert tokens.shape == targets.shape == (64, delay + 20)
  np.testing.assert_array_equal(targets[:, -10:], tokens[:, :10])
  assert np.all((tokens[:, :10] >= 1) & (tokens[:, :10] <= 8))
  assert np.all(tokens[:, delay + 9] == tasks.COPY_DELIMITER)
  assert np.all(targets[:, :delay + 10] == tasks.COPY_BLANK)
  logits = jnp.broadcast_to(tasks.copy_memoryless_logits(delay), batch.xs.shape)
  memoryless = float(losses.cross_entropy(logits, batch.targets, reduction="mean"))
  expected = 10 * math.log(8) / (delay + 20)
  assert abs(memoryless - expected) < 1e-5
  assert abs(tasks.copy_baseline_cross_entropy(delay) - expected) < 1e-12


def test_digits_sequences_split_and_permutation():
  pytest.importorskip("sklearn")
  plain = tasks.digits(jax.random.key(0))
  permuted = tasks.digits(jax.random.key(0), permuted=True, permutation_key=jax.random.key(7))
  assert plain.train_xs.shape[1:] == (64, 1)
  assert len(plain.train_xs) + len(plain.test_xs) == 1797 and len(plain.test_xs) == 359
  assert plain.train_xs.min() >= 0.0 and plain.train_xs.max() <= 1.0
  assert sorted(permuted.permutation.tolist()) == list(range(64))
  assert not np.array_equal(permuted.permutation, np.arange(64))
  np.testing.assert_array_equal(permuted.train_xs[:, :, 0], plain.train_xs[:, permuted.permutation, 0])
  np.testing.assert_array_equal(permuted.train_labels, plain.train_labels)
  majority = np.bincount(plain.test_labels).max() / len(plain.test_labels)
  assert 0.08 < majority < 0.14
  with pytest.raises(ValueError, match="permutation_key"):
    tasks.digits(jax.random.key(0), permuted=True)


def test_mackey_glass_satisfies_the_delay_equation():
  dt = 0.1
  x = tasks.mackey_glass(3000, dt=dt, sample_every=dt, discard=2000)
  delayed = x[:-170]                       # x(t - 17) on the dt grid
  now = x[170:]
  derivative = (now[2:] - now[:-2]) / (2 * dt)
  rate = 0.2 * delayed[1:-1] / (1 + delayed[1:-1] ** 10) - 0.1 * now[1:-1]
  assert np.max(np.abs(derivative - rate)) < 1e-3
  series = tasks.mackey_glass(2000)
  np.testing.assert_array_equal(series, tasks.mackey_glass(2000))
  assert 0.3 < series.min() and series.max() < 1.5 and 0.15 < series.std() < 0.3
  with pytest.raises(ValueError, match="multiples of dt"):
    tasks.mackey_glass(10, tau=17.05)
