"""Weight initialisers for recurrent networks.

Every initialiser has the signature ``init(key, shape, dtype) -> array`` so it
can be passed wherever a ``jax.nn.initializers`` function is accepted. Shapes
follow the math convention used throughout rnn_jax: a weight applied as
``W @ v`` has shape ``[out, in]`` (``W_xh: [G, F]``, ``W_hh: [G, H]``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple, jnp.dtype], jax.Array]


def uniform(scale: float) -> Initializer:
  """U(-scale, scale), the PyTorch recurrent default with scale = 1/sqrt(H)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


def torch_default(hidden_size: int) -> Initializer:
  """PyTorch's ``nn.RNN/LSTM/GRU`` default: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias."""
  return uniform(1.0 / np.sqrt(hidden_size))


def glorot_uniform(key, shape, dtype=jnp.float32):
  """Glorot & Bengio (2010): U(-a, a), a = sqrt(6 / (fan_in + fan_out)), for W: [out, in].

  For a stacked gate matrix ``[k*H, F]``, fan_out = k*H, as Keras does for its fused kernels.
  """
  fan_out, fan_in = shape
  return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * np.sqrt(6.0 / (fan_in + fan_out))


def orthogonal(gain: float = 1.0) -> Initializer:
  """Orthogonal recurrent weights (Saxe et al. 2014), one orthogonal block per gate.

  ``shape = [k*H, H]`` is split into k square blocks of ``[H, H]``, each an
  independent random orthogonal matrix times ``gain``; all singular values equal ``gain``.
  """

  def init(key, shape, dtype=jnp.float32):
    rows, cols = shape
    if rows % cols:
      raise ValueError(f"orthogonal: shape {shape} is not a stack of square [H, H] blocks")
    blocks = rows // cols
    ortho = jax.nn.initializers.orthogonal(scale=gain)
    keys = jax.random.split(key, blocks)
    return jnp.concatenate([ortho(k, (cols, cols), dtype) for k in keys], axis=0)

  return init


def identity(gain: float = 1.0) -> Initializer:
  """Identity recurrent weights, IRNN (Le, Jaitly & Hinton 2015): W_hh = gain * I per gate block."""

  def init(key, shape, dtype=jnp.float32):
    del key
    rows, cols = shape
    if rows % cols:
      raise ValueError(f"identity: shape {shape} is not a stack of square [H, H] blocks")
    return jnp.tile(gain * jnp.eye(cols, dtype=dtype), (rows // cols, 1))

  return init


def _spectral_radius_on_host(w) -> np.ndarray:
  w = np.asarray(w, dtype=np.float64)
  return np.asarray(np.max(np.abs(np.linalg.eigvals(w))), dtype=np.float32)


def spectral_radius(w_hh: jax.Array):
  """rho(W_hh) = max_i |lambda_i(W_hh)| for a square W_hh: [H, H].

  Computed on the host with numpy's eigvals (float64): a float for a concrete matrix, and
  through ``jax.pure_callback`` (a float32 scalar) inside ``jit`` or ``jax.eval_shape``.
  """
  shape = tuple(np.shape(w_hh))
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"spectral_radius: expected a square [H, H] matrix, got shape {shape}")
  if isinstance(w_hh, jax.core.Tracer):
    return jax.pure_callback(_spectral_radius_on_host, jax.ShapeDtypeStruct((), jnp.float32), w_hh)
  w = np.asarray(w_hh, dtype=np.float64)
  return float(np.max(np.abs(np.linalg.eigvals(w))))


def scale_to_spectral_radius(w_hh, target: float):
  """Rescale a square W_hh so that rho(W_hh) = target: W <- W * target / rho(W)."""
  rho = spectral_radius(w_hh)
  if isinstance(rho, jax.Array):  # traced: rho > 0 for any random initialisation
    return jnp.asarray(w_hh) * (target / jnp.maximum(rho, jnp.finfo(jnp.float32).tiny)).astype(w_hh.dtype)
  if rho == 0.0:
    raise ValueError("scale_to_spectral_radius: W_hh has spectral radius 0 and cannot be rescaled")
  return jnp.asarray(w_hh) * (target / rho)


def with_spectral_radius(base: Initializer, target: float) -> Initializer:
  """Wrap ``base`` so that each square [H, H] gate block has spectral radius ``target``."""

  def init(key, shape, dtype=jnp.float32):
    w = base(key, shape, dtype)
    rows, cols = shape
    blocks = [scale_to_spectral_radius(w[i:i + cols], target) for i in range(0, rows, cols)]
    return jnp.concatenate(blocks, axis=0).astype(dtype)

  return init


RECURRENT_INITS = ("torch", "glorot", "orthogonal", "identity")


def recurrent_initializer(name: str, hidden_size: int, gain: float = 1.0) -> Initializer:
  """Look up a W_hh initialiser by name: one of ``RECURRENT_INITS``."""
  if name == "torch":
    return torch_default(hidden_size)
  if name == "glorot":
    return glorot_uniform
  if name == "orthogonal":
    return orthogonal(gain)
  if name == "identity":
    return identity(gain)
  raise ValueError(f"unknown recurrent initialiser {name!r}; expected one of {RECURRENT_INITS}")
