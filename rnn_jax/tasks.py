"""Long-range benchmark tasks generated in code, and the Mackey-Glass series.

Every generator takes an explicit ``jax.random`` key (except the deterministic
Mackey-Glass integrator) and returns batch-major arrays ``xs: [B, T, F]``.

* ``adding_problem``  (Hochreiter & Schmidhuber 1997; the form of Le, Jaitly & Hinton 2015)
* ``copy_task``       (Hochreiter & Schmidhuber 1997; the form of Arjovsky, Shah & Bengio 2016)
* ``digits``          scikit-learn's bundled 8x8 digits read pixel by pixel (64 steps), optionally permuted
* ``mackey_glass``    the delay differential equation used by Jaeger & Haas (2004)

Each task documents the loss a model gets without memory (its baseline), and the
functions ``adding_baseline_mse`` / ``copy_baseline_cross_entropy`` return it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ADDING_SOLVED_MSE = 0.01
COPY_NUM_SYMBOLS = 8      # data symbols 1..8
COPY_LENGTH = 10          # symbols to remember
COPY_BLANK = 0
COPY_DELIMITER = COPY_NUM_SYMBOLS + 1   # 9
COPY_VOCAB = COPY_NUM_SYMBOLS + 2       # blank, 8 symbols, delimiter


class Batch(NamedTuple):
  """A batch of a sequence task: inputs xs: [B, T, F] and targets (shape depends on the task)."""
  xs: jax.Array
  targets: jax.Array


class GeneratedStream:
  """An endless, resumable stream of generated batches: batch_i = make_batch(fold_in(key, i)).

  ``position()`` is {"index": i}; ``seek`` returns to it, so a resumed run sees the same data.
  """

  def __init__(self, make_batch, key):
    self.make_batch, self.key, self.index = make_batch, key, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.make_batch(jax.random.fold_in(self.key, self.index))
    self.index += 1
    return batch

  def position(self) -> dict:
    return {"index": self.index}

  def seek(self, position: dict) -> None:
    self.index = int(position["index"])


class ArrayStream:
  """Minibatches of fixed arrays, reshuffled every epoch with fold_in(key, epoch); resumable.

  Batch i is the slice [j*B, (j+1)*B) of epoch e's permutation, e = i // n, j = i % n,
  n = N // B (the last partial batch of each epoch is dropped).
  """

  def __init__(self, xs: np.ndarray, targets: np.ndarray, batch_size: int, key):
    if len(xs) != len(targets):
      raise ValueError(f"ArrayStream: {len(xs)} inputs but {len(targets)} targets")
    if not 0 < batch_size <= len(xs):
      raise ValueError(f"ArrayStream: batch_size must be in [1, {len(xs)}] (the number of examples), "
                       f"got {batch_size}")
    self.xs, self.targets, self.batch_size, self.key = xs, targets, batch_size, key
    self.batches_per_epoch = len(xs) // batch_size
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self):
    epoch, j = divmod(self.index, self.batches_per_epoch)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(self.key, epoch), len(self.xs)))
    rows = order[j * self.batch_size:(j + 1) * self.batch_size]
    self.index += 1
    return Batch(xs=jnp.asarray(self.xs[rows]), targets=jnp.asarray(self.targets[rows]))

  def position(self) -> dict:
    return {"index": self.index}

  def seek(self, position: dict) -> None:
    self.index = int(position["index"])


def _check_positive(name: str, **values) -> None:
  for key, value in values.items():
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")


def adding_problem(key, batch_size: int, length: int) -> Batch:
  """The adding problem: sum the two marked numbers of a length-T sequence.

    x_t = (u_t, m_t),  u_t ~ U(0, 1),  m_t = 1 at exactly two steps, one drawn uniformly in
    [0, T/2) and one in [T/2, T), and 0 elsewhere;   target y = sum_t m_t u_t.

  Always predicting 1 (= E[y]) gives MSE Var(u + u') = 2/12 = 0.1667; below 0.01 the
  task counts as solved.

  Returns Batch(xs: [B, T, 2] float32, targets: [B] float32).
  """
  _check_positive("adding_problem", batch_size=batch_size, length=length)
  if length < 2:
    raise ValueError(f"adding_problem: length must be >= 2 to hold two markers, got {length}")
  key_values, key_first, key_second = jax.random.split(key, 3)
  half = length // 2
  values = jax.random.uniform(key_values, (batch_size, length))
  first = jax.random.randint(key_first, (batch_size,), 0, half)
  second = jax.random.randint(key_second, (batch_size,), half, length)
  steps = jnp.arange(length)
  markers = ((steps == first[:, None]) | (steps == second[:, None])).astype(jnp.float32)
  xs = jnp.stack([values, markers], axis=-1)
  return Batch(xs=xs, targets=jnp.sum(values * markers, axis=1))


def adding_baseline_mse() -> float:
  """MSE of always predicting E[y] = 1 in the adding problem: Var(U(0,1)) * 2 = 1/6."""
  return 2.0 / 12.0


def copy_task(key, batch_size: int, delay: int) -> Batch:
  """The copy task: read 10 symbols, wait ``delay`` steps, then write them back.

    inputs  = s_1 .. s_10, blank x (T - 1), delimiter, blank x 10          length T + 20
    targets = blank x (T + 10), s_1 .. s_10                                length T + 20

  with s_i uniform over the symbols 1..8, blank = 0 and delimiter = 9 (T = ``delay``).
  Inputs are one-hot over the 10 tokens. A memoryless model that outputs blank until the
  delimiter and then a uniform guess reaches the cross-entropy 10 log(8) / (T + 20) per step.

  Returns Batch(xs: [B, T+20, 10] float32 one-hot, targets: [B, T+20] int32 in [0, 10)).
  """
  _check_positive("copy_task", batch_size=batch_size, delay=delay)
  symbols = jax.random.randint(key, (batch_size, COPY_LENGTH), 1, COPY_NUM_SYMBOLS + 1)
  blanks_wait = jnp.full((batch_size, delay - 1), COPY_BLANK, jnp.int32)
  delimiter = jnp.full((batch_size, 1), COPY_DELIMITER, jnp.int32)
  blanks_answer = jnp.full((batch_size, COPY_LENGTH), COPY_BLANK, jnp.int32)
  inputs = jnp.concatenate([symbols, blanks_wait, delimiter, blanks_answer], axis=1)
  blanks_target = jnp.full((batch_size, delay + COPY_LENGTH), COPY_BLANK, jnp.int32)
  targets = jnp.concatenate([blanks_target, symbols], axis=1).astype(jnp.int32)
  return Batch(xs=jax.nn.one_hot(inputs, COPY_VOCAB), targets=targets)


def copy_baseline_cross_entropy(delay: int) -> float:
  """Memoryless cross-entropy of the copy task per step: 10 log(8) / (T + 20), in nats."""
  return COPY_LENGTH * math.log(COPY_NUM_SYMBOLS) / (delay + 2 * COPY_LENGTH)


def copy_memoryless_logits(delay: int) -> jax.Array:
  """Logits [T+20, 10] of the memoryless strategy: blank for T+10 steps, then uniform over 1..8.

  Its cross-entropy on any copy batch equals ``copy_baseline_cross_entropy(delay)``.
  """
  answer = jnp.full((COPY_VOCAB,), -jnp.inf).at[1:COPY_NUM_SYMBOLS + 1].set(0.0)
  wait = jnp.full((COPY_VOCAB,), -jnp.inf).at[COPY_BLANK].set(0.0)
  return jnp.concatenate([jnp.tile(wait, (delay + COPY_LENGTH, 1)), jnp.tile(answer, (COPY_LENGTH, 1))])


class DigitsSplit(NamedTuple):
  """Sequential digits: pixels xs: [N, 64, 1] in [0, 1] and labels: [N] int32 in [0, 10)."""
  train_xs: np.ndarray
  train_labels: np.ndarray
  test_xs: np.ndarray
  test_labels: np.ndarray
  permutation: np.ndarray


def digits(key, test_fraction: float = 0.2, permuted: bool = False, permutation_key=None) -> DigitsSplit:
  """scikit-learn's bundled 8x8 digits (1797 images) read one pixel per step, 64 steps.

    x_t = pixel_{pi(t)} / 16,  t = 0..63, row-major; pi = identity, or a fixed random
    permutation of the 64 pixels (the permuted variant, drawn from ``permutation_key``).

  ``key`` shuffles the images before the train/test split. Always guessing the most
  frequent class gives about 10% accuracy. The data ship inside scikit-learn (no download).
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
  try:
    from sklearn.datasets import load_digits
  except ImportError as error:  # scikit-learn is the optional "lab" extra
    raise ImportError("digits: needs scikit-learn; pip install 'rnn_jax[lab]'") from error
  data = load_digits()
  pixels = (data.images.reshape(len(data.images), 64) / 16.0).astype(np.float32)
  labels = data.target.astype(np.int32)
  if permuted:
    if permutation_key is None:
      raise ValueError("digits: permuted=True needs a permutation_key")
    permutation = np.asarray(jax.random.permutation(permutation_key, 64))
  else:
    permutation = np.arange(64)
  pixels = pixels[:, permutation]
  order = np.asarray(jax.random.permutation(key, len(labels)))
  num_test = int(round(test_fraction * len(labels)))
  test, train = order[:num_test], order[num_test:]
  return DigitsSplit(train_xs=pixels[train, :, None], train_labels=labels[train],
                     test_xs=pixels[test, :, None], test_labels=labels[test], permutation=permutation)


def mackey_glass(length: int, tau: float = 17.0, beta: float = 0.2, gamma: float = 0.1,
                 exponent: float = 10.0, dt: float = 0.1, sample_every: float = 1.0,
                 initial_value: float = 1.2, discard: int = 1000) -> np.ndarray:
  """The Mackey-Glass delay differential equation, sampled every ``sample_every`` time units.

    dx/dt = beta x(t - tau) / (1 + x(t - tau)^n) - gamma x(t)

  with beta=0.2, gamma=0.1, n=10 and tau=17 (mildly chaotic), as in Jaeger & Haas (2004).
  Integrated with 4th-order Runge-Kutta at step ``dt`` (the delayed value at a half step is
  the mean of its two grid neighbours), from the constant history x = ``initial_value``;
  the first ``discard`` samples (the transient) are dropped. Deterministic, float64.

  Returns x: [length] float64.
  """
  _check_positive("mackey_glass", length=length)
  delay_steps = tau / dt
  per_sample = sample_every / dt
  if abs(delay_steps - round(delay_steps)) > 1e-9 or abs(per_sample - round(per_sample)) > 1e-9:
    raise ValueError(f"mackey_glass: tau={tau} and sample_every={sample_every} must be multiples of dt={dt}")
  delay_steps, per_sample = int(round(delay_steps)), int(round(per_sample))
  total = (length + discard) * per_sample + 1
  x = np.empty(total + delay_steps)
  x[:delay_steps + 1] = initial_value

  def rate(value, delayed):
    return beta * delayed / (1.0 + delayed ** exponent) - gamma * value

  for i in range(delay_steps, total + delay_steps - 1):
    now, past, past_next = x[i], x[i - delay_steps], x[i - delay_steps + 1]
    past_half = 0.5 * (past + past_next)
    k1 = rate(now, past)
    k2 = rate(now + 0.5 * dt * k1, past_half)
    k3 = rate(now + 0.5 * dt * k2, past_half)
    k4 = rate(now + dt * k3, past_next)
    x[i + 1] = now + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
  samples = x[delay_steps::per_sample]
  return samples[discard:discard + length]


REAL_SERIES = ("sunspots", "co2")


def real_series(name: str) -> tuple[np.ndarray, np.ndarray]:
  """A real time series bundled with statsmodels (no download): (times [N], values [N] float64).

    sunspots: yearly mean sunspot numbers 1700-2008 (309 values; statsmodels.datasets.sunspots)
    co2:      Mauna Loa CO2 in ppm, weekly 1958-2001 averaged to months, gaps filled by linear
              interpolation (526 values; statsmodels.datasets.co2)
  """
  if name not in REAL_SERIES:
    raise ValueError(f"real_series: unknown series {name!r}; expected one of {REAL_SERIES}")
  try:
    from statsmodels import datasets
  except ImportError as error:  # statsmodels is the optional "lab" extra
    raise ImportError("real_series: needs statsmodels; pip install 'rnn_jax[lab]'") from error
  if name == "sunspots":
    frame = datasets.sunspots.load_pandas().data
    return frame["YEAR"].to_numpy(np.float64), frame["SUNACTIVITY"].to_numpy(np.float64)
  frame = datasets.co2.load_pandas().data
  monthly = frame["co2"].resample("MS").mean().interpolate()
  times = monthly.index.year + (monthly.index.month - 1) / 12.0
  return np.asarray(times, np.float64), monthly.to_numpy(np.float64)
