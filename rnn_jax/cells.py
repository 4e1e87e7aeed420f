"""Pure, unbatched recurrent cells: Elman, LSTM and GRU.

The cell contract
-----------------
A cell is a frozen (hashable) dataclass of hyper-parameters. Arrays live in a
separate ``params`` pytree of plain dicts with readable names, so a cell can be a
static argument of ``jax.jit`` and params can be exchanged with PyTorch and Flax.

Every cell offers, for ONE example (batch with ``jax.vmap``):

* ``init(key, input_size) -> params``
* ``initial_carry(params) -> carry``          zeros, in the params' dtype
* ``step(params, carry, x_t) -> (carry, y_t)``  exactly ``lax.scan``'s body signature

and the three pieces ``step`` is made of, which the sequence layer uses so that
the input-to-hidden product for all time steps is ONE matmul before the scan:

* ``input_projection(params, xs) -> a``       a = W_xh x + b, for xs: [..., F] -> [..., G*H]
* ``recurrence(params, carry, a_t) -> (carry, h_t)``  only W_hh h_{t-1} and the gate arithmetic
* ``output(params, hs) -> ys``                 the optional read-out y_t = W_hy h_t + b_y

Weights use the math layout ``[out, in]`` (W_xh: [G*H, F], W_hh: [G*H, H]),
the same as PyTorch's ``weight_ih_l0``/``weight_hh_l0``; gate blocks are stacked
in PyTorch's order. See BUILD.md for the full name mapping to torch and flax.linen.

Precision: ``dtype=None`` computes in the params' dtype. ``dtype="bfloat16"``
casts the matmul operands to bfloat16 and accumulates in float32; gate
arithmetic and the carry stay in the params' dtype (float32 params).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import initializers

Params = dict
ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda v: v,
}
INPUT_INITS = ("torch", "glorot")


class LSTMState(NamedTuple):
  """LSTM carry: hidden state h: [P] (P = proj_size or H) and cell state c: [H]."""
  h: jax.Array
  c: jax.Array


def linear(v: jax.Array, w: jax.Array, compute_dtype: Optional[str] = None) -> jax.Array:
  """W v for a weight in math layout: v: [..., in], w: [out, in] -> [..., out].

  No transpose is materialised: the contraction is on w's second axis. With a
  ``compute_dtype`` the operands are cast to it and the product accumulates in w's dtype.
  """
  accumulate = None
  if compute_dtype is not None:
    accumulate = w.dtype
    v, w = v.astype(compute_dtype), w.astype(compute_dtype)
  return jax.lax.dot_general(
      v, w, (((v.ndim - 1,), (1,)), ((), ())), preferred_element_type=accumulate)


def linear_transposed(delta: jax.Array, w: jax.Array, compute_dtype: Optional[str] = None) -> jax.Array:
  """W^T delta for a weight in math layout: delta [..., out], w [out, in] -> [..., in].

  The contraction is on w's first axis (the gradient of v in W v, and v W^T for a stored W^T).
  """
  accumulate = None
  if compute_dtype is not None:
    accumulate = w.dtype
    delta, w = delta.astype(compute_dtype), w.astype(compute_dtype)
  return jax.lax.dot_general(delta, w, (((delta.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=accumulate)


class TransposedWeight(NamedTuple):
  """A recurrent weight stored as its transpose, t = W_hh^T: [in, out].

  The hand-derived BPTT materialises W_hh^T once before its forward scan, so that the
  in-loop product is a plain [B, H] x [H, G*H] matmul (XLA:CPU runs that form faster);
  ``recurrent_product`` reads either form.
  """
  t: jax.Array


def recurrent_product(w, v: jax.Array, compute_dtype: Optional[str] = None, rows=None) -> jax.Array:
  """W_hh[rows] v: v [..., in] -> [..., len(rows)], for W_hh as [out, in] or as ``TransposedWeight``.

  rows: an optional slice of output rows (a block of gates); None is all of them.
  """
  if isinstance(w, TransposedWeight):
    return linear_transposed(v, w.t if rows is None else w.t[:, rows], compute_dtype)
  return linear(v, w if rows is None else w[rows], compute_dtype)


def _check_features(cell_name: str, what: str, x: jax.Array, expected: int) -> None:
  if x.ndim == 0 or x.shape[-1] != expected:
    got = "is a scalar" if x.ndim == 0 else f"has {x.shape[-1]} features"
    raise ValueError(f"{cell_name}: {what} {got}, params expect {expected}")


def _layer_norm(v: jax.Array, gain: jax.Array, eps: float = 1e-5) -> jax.Array:
  """LN(v) = gain * (v - mean(v)) / sqrt(var(v) + eps) over the last axis (Ba et al. 2016)."""
  mean = jnp.mean(v, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(v - mean), axis=-1, keepdims=True)
  return gain * (v - mean) * jax.lax.rsqrt(var + eps)


@dataclasses.dataclass(frozen=True)
class Cell(abc.ABC):
  """Shared hyper-parameters and the ``step`` every cell derives from its three pieces.

  A concrete cell implements ``init`` and either ``recurrence_saving`` (the step plus what its
  hand-derived backward rule reads, see ``rnn_jax.bptt``) or ``recurrence`` itself; a cell
  whose carry is more than h_t (the LSTM's (h, c)) also overrides ``hidden`` and
  ``with_hidden``.

  Attributes:
    hidden_size: H, the size of h_t.
    recurrent_init: W_hh initialiser: "torch" (U(+-1/sqrt(H))), "glorot", "orthogonal" or "identity".
    recurrent_gain: gain for "orthogonal"/"identity" initialisation.
    spectral_radius: if set, each [H, H] block of W_hh is rescaled to this spectral radius at init.
    input_init: W_xh initialiser: "torch" or "glorot".
    dtype: compute dtype of the matmuls (None: the params' dtype; "bfloat16": mixed precision).
    param_dtype: dtype of the params created by ``init``.
  """
  hidden_size: int
  recurrent_init: str = "torch"
  recurrent_gain: float = 1.0
  spectral_radius: Optional[float] = None
  input_init: str = "torch"
  dtype: Optional[str] = None
  param_dtype: str = "float32"

  name = "cell"
  num_gates = 1

  def __post_init__(self):
    for field in dataclasses.fields(self):
      if isinstance(getattr(self, field.name), jax.core.Tracer):
        raise TypeError(f"{self.name}: hyper-parameter {field.name} is a traced value; a cell is static: "
                        f"close over it or pass it to jax.jit as a static argument")
    if not isinstance(self.hidden_size, (int, np.integer)) or self.hidden_size <= 0:
      raise ValueError(f"{self.name}: hidden_size must be a positive integer, got {self.hidden_size!r}")
    if self.recurrent_init not in initializers.RECURRENT_INITS:
      raise ValueError(f"{self.name}: unknown recurrent_init {self.recurrent_init!r}; "
                       f"expected one of {initializers.RECURRENT_INITS}")
    if self.input_init not in INPUT_INITS:
      raise ValueError(f"{self.name}: unknown input_init {self.input_init!r}; expected one of {INPUT_INITS}")
    for field in ("dtype", "param_dtype"):
      value = getattr(self, field)
      if value is not None and value not in ("float32", "bfloat16", "float64", "float16"):
        raise ValueError(f"{self.name}: unknown {field} {value!r}; expected float32, bfloat16, float16 or float64")

  # ---- sizes -------------------------------------------------------------
  @property
  def state_size(self) -> int:
    """Size of the h_t fed back through W_hh."""
    return self.hidden_size

  @property
  def output_size(self) -> int:
    """Size of y_t returned by ``step`` and by the sequence layer."""
    return self.state_size

  # ---- shared init helpers ----------------------------------------------
  def _init_weights(self, key, input_size: int) -> Params:
    if not isinstance(input_size, (int, np.integer)) or input_size <= 0:
      raise ValueError(f"{self.name}: input_size must be a positive integer, got {input_size!r}")
    H, G = self.hidden_size, self.num_gates
    dtype = jnp.dtype(self.param_dtype)
    key_x, key_h, key_b = jax.random.split(key, 3)
    torch_init = initializers.torch_default(H)
    input_init = torch_init if self.input_init == "torch" else initializers.glorot_uniform
    recurrent_init = initializers.recurrent_initializer(self.recurrent_init, H, self.recurrent_gain)
    if self.spectral_radius is not None:
      recurrent_init = initializers.with_spectral_radius(recurrent_init, self.spectral_radius)
    return {
        "w_xh": input_init(key_x, (G * H, input_size), dtype),
        "w_hh": recurrent_init(key_h, (G * H, self.state_size), dtype),
        "b": torch_init(key_b, (G * H,), dtype),
    }

  @abc.abstractmethod
  def init(self, key, input_size: int) -> Params:
    """Fresh params for inputs of ``input_size`` features."""

  def check_params(self, params: Params) -> None:
    """Raise ValueError unless ``params`` has exactly the leaves and shapes ``init`` makes.

    The message names every missing or extra key and every leaf of the wrong shape.
    """
    if not isinstance(params, dict):
      raise ValueError(f"{self.name}: params must be a dict of arrays, got {type(params).__name__}")
    if "w_xh" not in params or np.ndim(params["w_xh"]) != 2:
      raise ValueError(f"{self.name}: params have no w_xh of shape [G*H, F]; keys are {sorted(params)}")
    expected = _expected_shapes(self, int(np.shape(params["w_xh"])[1]))
    got = {name: tuple(np.shape(value)) for name, value in params.items()}
    problems = []
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
      problems.append(f"missing {missing}")
    if extra:
      problems.append(f"unexpected {extra}")
    problems += [f"{name} has shape {got[name]}, expected {shape}" for name, shape in sorted(expected.items())
                 if name in got and got[name] != shape]
    if problems:
      raise ValueError(f"{self.name}: params do not match {self!r}: " + "; ".join(problems))

  def initial_carry(self, params: Params) -> Any:
    """h_0 = 0: [H] in the params' dtype."""
    return jnp.zeros((self.state_size,), params["w_hh"].dtype)

  def hidden(self, carry) -> jax.Array:
    """The hidden state h_t held in a carry (for any leading batch or time axes)."""
    return carry

  def with_hidden(self, carry, h: jax.Array):
    """The carry with its hidden state replaced by h (an LSTM keeps its cell state c_t)."""
    del carry
    return h

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.recurrence is Cell.recurrence and cls.recurrence_saving is Cell.recurrence_saving:
      raise TypeError(f"{cls.__name__}: a cell defines recurrence or recurrence_saving")

  def recurrence_saving(self, params: Params, carry, a_t: jax.Array):
    """(carry_t, h_t, saved_t): the step and the values its backward rule reads; a cell that
    defines only ``recurrence`` saves nothing (it has no hand-derived backward rule)."""
    carry, h_t = self.recurrence(params, carry, a_t)
    return carry, h_t, ()

  def recurrence(self, params: Params, carry, a_t: jax.Array):
    """One step from the precomputed input projection a_t: (carry_{t-1}, a_t) -> (carry_t, h_t)."""
    carry, h_t, _ = self.recurrence_saving(params, carry, a_t)
    return carry, h_t

  # ---- the three pieces ---------------------------------------------------
  def input_projection(self, params: Params, xs: jax.Array, *, bias: bool = True) -> jax.Array:
    """a_t = W_xh x_t + b for every leading index: xs [..., F] -> [..., G*H].

    bias=False leaves b out (a fused kernel adds ``projection_bias`` while it reads a_t).
    """
    _check_features(self.name, "x", xs, params["w_xh"].shape[1])
    a = linear(xs, params["w_xh"], self.dtype)
    return a + params["b"] if bias else a

  def projection_bias(self, params: Params) -> jax.Array:
    """The b added by ``input_projection``: [G*H]."""
    return params["b"]

  def output(self, params: Params, hs: jax.Array) -> jax.Array:
    """y_t = h_t unless the cell has a read-out."""
    del params
    return hs

  def step(self, params: Params, carry, x_t: jax.Array):
    """One time step, scan's body signature: (carry_{t-1}, x_t: [F]) -> (carry_t, y_t).

    Where a fused CPU kernel runs the whole step (float32 on CPU: the plain LSTM, the GRU and the
    Elman cell; ``bptt.fused_step``) it does, with the same equations and derivatives; otherwise
    XLA runs ``recurrence(params, carry, input_projection(params, x_t))``.
    """
    from rnn_jax import bptt  # bptt builds on this module
    fused = bptt.fused_step(self, params, carry, x_t)
    if fused is None:
      fused = self.recurrence(params, carry, self.input_projection(params, x_t))
    carry, h_t = fused
    return carry, self.output(params, h_t)


@functools.lru_cache(maxsize=256)
def _expected_shapes(cell: "Cell", input_size: int) -> dict:
  """{name: shape} of the params ``cell.init`` makes for ``input_size`` features."""
  shapes = jax.eval_shape(functools.partial(cell.init, input_size=input_size), jax.random.PRNGKey(0))
  return {name: tuple(leaf.shape) for name, leaf in shapes.items()}


@dataclasses.dataclass(frozen=True)
class Elman(Cell):
  """Elman RNN (Elman 1990), the vanilla RNN.

    h_t = f(W_xh x_t + W_hh h_{t-1} + b)        x_t: [F], h_t: [H], W_xh: [H, F], W_hh: [H, H]
    y_t = W_hy h_t + b_y   (only if output_size is set; W_hy: [O, H])

  Attributes:
    activation: f, one of "tanh", "relu", "sigmoid", "identity".
    readout_size: O; None returns y_t = h_t.
  """
  activation: str = "tanh"
  readout_size: Optional[int] = None

  name = "elman"
  num_gates = 1

  def __post_init__(self):
    super().__post_init__()
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"elman: unknown activation {self.activation!r}; expected one of {tuple(ACTIVATIONS)}")
    if self.readout_size is not None and self.readout_size <= 0:
      raise ValueError(f"elman: readout_size must be positive, got {self.readout_size}")

  @property
  def output_size(self) -> int:
    return self.readout_size or self.hidden_size

  def init(self, key, input_size: int) -> Params:
    """Params {w_xh: [H, F], w_hh: [H, H], b: [H]} (+ {w_hy: [O, H], b_y: [O]})."""
    key, key_out = jax.random.split(key)
    params = self._init_weights(key, input_size)
    if self.readout_size is not None:
      dtype = jnp.dtype(self.param_dtype)
      init = initializers.torch_default(self.hidden_size)
      key_w, key_b = jax.random.split(key_out)
      params["w_hy"] = init(key_w, (self.readout_size, self.hidden_size), dtype)
      params["b_y"] = init(key_b, (self.readout_size,), dtype)
    return params

  def recurrence_saving(self, params: Params, h_prev: jax.Array, a_t: jax.Array):
    """h_t = f(a_t + W_hh h_{t-1}), a_t = W_xh x_t + b precomputed: returns (h_t, h_t, ()).

    Nothing beyond h_t is saved: f'(z_t) is a function of h_t.
    """
    h_t = ACTIVATIONS[self.activation](a_t + recurrent_product(params["w_hh"], h_prev, self.dtype))
    return h_t, h_t, ()

  def output(self, params: Params, hs: jax.Array) -> jax.Array:
    """y_t = W_hy h_t + b_y for hs: [..., H] -> [..., O]; identity without a read-out."""
    if self.readout_size is None:
      return hs
    return linear(hs, params["w_hy"], self.dtype) + params["b_y"]


@dataclasses.dataclass(frozen=True)
class LSTM(Cell):
  """Long short-term memory (Hochreiter & Schmidhuber 1997; forget gate, Gers et al. 2000).

  Gate order in W_xh, W_hh and b is PyTorch's: i, f, g, o (blocks of H rows).

    (i, f, g, o) = W_xh x_t + W_hh h_{t-1} + b                     each [H]
    i = sigma(i + p_i * c_{t-1});  f = sigma(f + p_f * c_{t-1});  g = tanh(g)
    c_t = f * c_{t-1} + i * g
    o = sigma(o + p_o * c_t)
    h_t = o * tanh(c_t)                 (h_t = W_hr (o * tanh(c_t)) with a projection)

  Options:
    forget_bias: added to the f block of b at init (1.0: Jozefowicz et al. 2015).
    peephole: the p_i, p_f, p_o terms (Gers & Schmidhuber 2000); params p_i, p_f, p_o: [H].
    layer_norm: (i,f,g,o) = LN(W_xh x_t) + LN(W_hh h_{t-1}) + b and h_t = o * tanh(LN(c_t))
      (Ba et al. 2016); gains ln_x, ln_h: [4H], ln_c: [H], and ln_c_bias: [H].
    proj_size: P, the LSTMP projection W_hr: [P, H] (Sak et al. 2014; torch ``proj_size``);
      then h_t: [P] and W_hh: [4H, P].
  """
  forget_bias: float = 0.0
  peephole: bool = False
  layer_norm: bool = False
  proj_size: Optional[int] = None

  name = "lstm"
  num_gates = 4

  def __post_init__(self):
    super().__post_init__()
    if self.proj_size is not None and not 0 < self.proj_size < self.hidden_size:
      raise ValueError(f"lstm: proj_size must be in (0, hidden_size={self.hidden_size}), got {self.proj_size}")

  @property
  def state_size(self) -> int:
    return self.proj_size or self.hidden_size

  def init(self, key, input_size: int) -> Params:
    """Params {w_xh: [4H, F], w_hh: [4H, P], b: [4H]} plus the options' params."""
    key, key_extra = jax.random.split(key)
    params = self._init_weights(key, input_size)
    H, dtype = self.hidden_size, jnp.dtype(self.param_dtype)
    if self.forget_bias:
      params["b"] = params["b"].at[H:2 * H].add(self.forget_bias)
    keys = jax.random.split(key_extra, 4)
    init = initializers.torch_default(H)
    if self.peephole:
      for k, name in zip(keys[:3], ("p_i", "p_f", "p_o")):
        params[name] = init(k, (H,), dtype)
    if self.layer_norm:
      params["ln_x"] = jnp.ones((4 * H,), dtype)
      params["ln_h"] = jnp.ones((4 * H,), dtype)
      params["ln_c"] = jnp.ones((H,), dtype)
      params["ln_c_bias"] = jnp.zeros((H,), dtype)
    if self.proj_size is not None:
      params["w_hr"] = init(keys[3], (self.proj_size, H), dtype)
    return params

  def initial_carry(self, params: Params) -> LSTMState:
    """(h_0, c_0) = (0, 0): h [P], c [H]."""
    dtype = params["w_hh"].dtype
    return LSTMState(h=jnp.zeros((self.state_size,), dtype), c=jnp.zeros((self.hidden_size,), dtype))

  def hidden(self, carry: LSTMState) -> jax.Array:
    return carry.h

  def with_hidden(self, carry: LSTMState, h: jax.Array) -> LSTMState:
    return LSTMState(h=h, c=carry.c)

  def input_projection(self, params: Params, xs: jax.Array, *, bias: bool = True) -> jax.Array:
    """a_t = W_xh x_t + b (with layer_norm: LN(W_xh x_t) + b): xs [..., F] -> [..., 4H]."""
    _check_features(self.name, "x", xs, params["w_xh"].shape[1])
    a = linear(xs, params["w_xh"], self.dtype)
    if self.layer_norm:
      a = _layer_norm(a, params["ln_x"])
    return a + params["b"] if bias else a

  def recurrence_saving(self, params: Params, carry: LSTMState, a_t: jax.Array):
    """One LSTM update from the precomputed a_t: [4H].

    Returns (LSTMState(h_t, c_t), h_t, (i, f, g, o)) with the activated gates
    sigma(i), sigma(f), tanh(g), sigma(o), each [..., H], which the backward rules read.
    """
    h_prev, c_prev = carry
    recurrent = recurrent_product(params["w_hh"], h_prev, self.dtype)
    if self.layer_norm:
      recurrent = _layer_norm(recurrent, params["ln_h"])
    # a_t and W_hh h_{t-1} are split before they are added (see bptt.split_gates).
    i, f, g, o = (a + u for a, u in zip(jnp.split(a_t, 4, axis=-1), jnp.split(recurrent, 4, axis=-1)))
    if self.peephole:
      i = i + params["p_i"] * c_prev
      f = f + params["p_f"] * c_prev
    i, f, g = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g)
    c_t = f * c_prev + i * g
    if self.peephole:
      o = o + params["p_o"] * c_t
    o = jax.nn.sigmoid(o)
    c_out = _layer_norm(c_t, params["ln_c"]) + params["ln_c_bias"] if self.layer_norm else c_t
    h_t = o * jnp.tanh(c_out)
    if self.proj_size is not None:
      h_t = linear(h_t, params["w_hr"], self.dtype)
    return LSTMState(h=h_t, c=c_t), h_t, (i, f, g, o)


@dataclasses.dataclass(frozen=True)
class GRU(Cell):
  """Gated recurrent unit (Cho et al. 2014). Gate order r, z, n (PyTorch's).

  reset_after=True (default; cuDNN, PyTorch, Keras v3, flax.linen.GRUCell):
    r = sigma(W_xr x_t + W_hr h_{t-1} + b_r)
    z = sigma(W_xz x_t + W_hz h_{t-1} + b_z)
    n = tanh(W_xn x_t + b_n + r * (W_hn h_{t-1} + b_hn))
    h_t = (1 - z) * n + z * h_{t-1}

  reset_after=False (Cho et al. 2014, eq. 5-8: the reset is applied before the matmul):
    n = tanh(W_xn x_t + b_n + W_hn (r * h_{t-1}) + b_hn)

  Params {w_xh: [3H, F], w_hh: [3H, H], b: [3H], b_hn: [H]}; b holds b_r, b_z, b_n.
  """
  reset_after: bool = True

  name = "gru"
  num_gates = 3

  def init(self, key, input_size: int) -> Params:
    key, key_bias = jax.random.split(key)
    params = self._init_weights(key, input_size)
    params["b_hn"] = initializers.torch_default(self.hidden_size)(
        key_bias, (self.hidden_size,), jnp.dtype(self.param_dtype))
    return params

  def recurrence_saving(self, params: Params, h_prev: jax.Array, a_t: jax.Array):
    """One GRU update from the precomputed a_t = W_xh x_t + b: [3H].

    Returns (h_t, h_t, saved) with saved = (r, z, n) and, with reset_after, also
    s = W_hn h_{t-1} + b_hn (each [..., H]), which the backward rule reads.
    """
    H = self.hidden_size
    a_r, a_z, a_n = jnp.split(a_t, 3, axis=-1)
    w_hh = params["w_hh"]
    if self.reset_after:
      u_r, u_z, u_n = jnp.split(recurrent_product(w_hh, h_prev, self.dtype), 3, axis=-1)
      r, z = jax.nn.sigmoid(a_r + u_r), jax.nn.sigmoid(a_z + u_z)
      s = u_n + params["b_hn"]
      n = jnp.tanh(a_n + r * s)
      saved = (r, z, n, s)
    else:
      u_r, u_z = jnp.split(recurrent_product(w_hh, h_prev, self.dtype, slice(0, 2 * H)), 2, axis=-1)
      r, z = jax.nn.sigmoid(a_r + u_r), jax.nn.sigmoid(a_z + u_z)
      n = jnp.tanh(a_n + recurrent_product(w_hh, r * h_prev, self.dtype, slice(2 * H, 3 * H))
                   + params["b_hn"])
      saved = (r, z, n)
    h_t = (1.0 - z) * n + z * h_prev
    return h_t, h_t, saved


CANDIDATES = ("identity", "g")


def _candidate(kind: str, v: jax.Array) -> jax.Array:
  """The candidate state h~ = Linear(x_t), optionally through g(v) = v + 0.5 (v >= 0), sigma(v) (v < 0)."""
  if kind == "identity":
    return v
  return jnp.where(v >= 0, v + 0.5, jax.nn.sigmoid(v))


@dataclasses.dataclass(frozen=True)
class MinGRU(Cell):
  """minGRU (Feng et al. 2024): no recurrent weights in the gate or the candidate.

    z_t = sigma(W_xz x_t + b_z);   h~_t = W_xh~ x_t + b_h~   (or g(.) with candidate="g")
    h_t = (1 - z_t) * h_{t-1} + z_t * h~_t  =  A_t * h_{t-1} + b_t,   A_t = 1 - z_t, b_t = z_t h~_t

  Params {w_xh: [2H, F], b: [2H]}, blocks (z, h~).
  """
  candidate: str = "identity"

  name = "mingru"
  num_gates = 2

  def __post_init__(self):
    super().__post_init__()
    if self.candidate not in CANDIDATES:
      raise ValueError(f"{self.name}: unknown candidate {self.candidate!r}; expected one of {CANDIDATES}")

  def init(self, key, input_size: int) -> Params:
    if not isinstance(input_size, (int, np.integer)) or input_size <= 0:
      raise ValueError(f"{self.name}: input_size must be a positive integer, got {input_size!r}")
    G, H, dtype = self.num_gates, self.hidden_size, jnp.dtype(self.param_dtype)
    key_x, key_b = jax.random.split(key)
    init = initializers.torch_default(H)
    input_init = init if self.input_init == "torch" else initializers.glorot_uniform
    return {"w_xh": input_init(key_x, (G * H, input_size), dtype), "b": init(key_b, (G * H,), dtype)}

  def initial_carry(self, params: Params) -> jax.Array:
    return jnp.zeros((self.hidden_size,), params["w_xh"].dtype)

  def linear_coefficients(self, a: jax.Array):
    """(A_t, b_t) of h_t = A_t h_{t-1} + b_t from a_t = W_xh x_t + b: [..., 2H] -> 2 x [..., H]."""
    a_z, a_h = jnp.split(a, 2, axis=-1)
    z = jax.nn.sigmoid(a_z)
    return 1.0 - z, z * _candidate(self.candidate, a_h)

  def recurrence(self, params: Params, h_prev: jax.Array, a_t: jax.Array):
    """h_t = A_t h_{t-1} + b_t, one step (the sequential reference)."""
    del params
    coefficient, offset = self.linear_coefficients(a_t)
    h_t = coefficient * h_prev + offset
    return h_t, h_t


@dataclasses.dataclass(frozen=True)
class MinLSTM(MinGRU):
  """minLSTM (Feng et al. 2024): forget and input gates normalised to sum to one.

    f_t = sigma(W_xf x_t + b_f);  i_t = sigma(W_xi x_t + b_i);  h~_t = W_xh~ x_t + b_h~ (or g(.))
    f'_t = f_t / (f_t + i_t);  i'_t = i_t / (f_t + i_t)
    h_t = f'_t * h_{t-1} + i'_t * h~_t

  Params {w_xh: [3H, F], b: [3H]}, blocks (f, i, h~).
  """
  name = "minlstm"
  num_gates = 3

  def linear_coefficients(self, a: jax.Array):
    """(f'_t, i'_t h~_t) from a_t: [..., 3H] -> 2 x [..., H]."""
    a_f, a_i, a_h = jnp.split(a, 3, axis=-1)
    f, i = jax.nn.sigmoid(a_f), jax.nn.sigmoid(a_i)
    total = f + i
    return f / total, (i / total) * _candidate(self.candidate, a_h)


@dataclasses.dataclass(frozen=True)
class Reservoir(Cell):
  """An echo-state reservoir (Jaeger 2001): a leaky-integrator tanh cell with fixed random weights.

    h_t = (1 - alpha) h_{t-1} + alpha tanh(W_xh x_t + W_hh h_{t-1} + b)
    x_t: [F], h_t: [H], W_xh: [H, F] ~ input_scaling * U(-1, 1), b: [H] ~ bias_scaling * U(-1, 1)
    W_hh: [H, H] ~ U(-1, 1) with each entry kept with probability ``density`` (sparse when
    density < 1), then rescaled to spectral radius rho.

  The weights are not trained (``rnn_jax.esn`` fits a ridge read-out on the states), but the
  reservoir is a cell like any other: ``rnn``, ``bidirectional``, ``StackedRNN`` and the Flax
  modules run it.

  Attributes:
    spectral_radius: rho = max |lambda(W_hh)| after rescaling (the echo state property needs
      rho < 1 in the usual regime).
    density: the fraction of non-zero entries of W_hh (1.0: dense).
    input_scaling: the scale of W_xh.
    bias_scaling: the scale of b (0: no bias).
    leak_rate: alpha in (0, 1]; 1 is the plain (non-leaky) reservoir.
  """
  spectral_radius: float = 0.9
  density: float = 1.0
  input_scaling: float = 1.0
  bias_scaling: float = 0.0
  leak_rate: float = 1.0

  name = "reservoir"
  num_gates = 1

  def __post_init__(self):
    super().__post_init__()
    if not (self.spectral_radius is not None and self.spectral_radius > 0):
      raise ValueError(f"reservoir: spectral_radius must be positive, got {self.spectral_radius}")
    if not 0.0 < self.density <= 1.0:
      raise ValueError(f"reservoir: density must be in (0, 1], got {self.density}")
    if not 0.0 < self.leak_rate <= 1.0:
      raise ValueError(f"reservoir: leak_rate must be in (0, 1], got {self.leak_rate}")
    if self.input_scaling < 0 or self.bias_scaling < 0:
      raise ValueError(f"reservoir: input_scaling and bias_scaling must be >= 0, got "
                       f"{self.input_scaling} and {self.bias_scaling}")

  def init(self, key, input_size: int) -> Params:
    """Params {w_xh: [H, F], w_hh: [H, H] with rho(W_hh) = spectral_radius, b: [H]}."""
    if not isinstance(input_size, (int, np.integer)) or input_size <= 0:
      raise ValueError(f"reservoir: input_size must be a positive integer, got {input_size!r}")
    H, dtype = self.hidden_size, jnp.dtype(self.param_dtype)
    key_x, key_h, key_mask, key_b = jax.random.split(key, 4)
    w_hh = initializers.uniform(1.0)(key_h, (H, H), dtype)
    if self.density < 1.0:
      w_hh = jnp.where(jax.random.bernoulli(key_mask, self.density, (H, H)), w_hh, 0.0)
    return {
        "w_xh": initializers.uniform(self.input_scaling)(key_x, (H, input_size), dtype),
        "w_hh": initializers.scale_to_spectral_radius(w_hh, self.spectral_radius).astype(dtype),
        "b": initializers.uniform(self.bias_scaling)(key_b, (H,), dtype),
    }

  def recurrence(self, params: Params, h_prev: jax.Array, a_t: jax.Array):
    """h_t = (1 - alpha) h_{t-1} + alpha tanh(a_t + W_hh h_{t-1}); returns (h_t, h_t)."""
    update = jnp.tanh(a_t + recurrent_product(params["w_hh"], h_prev, self.dtype))
    h_t = (1.0 - self.leak_rate) * h_prev + self.leak_rate * update
    return h_t, h_t


# ---------------------------------------------------------------------------
# The registry of cell names and presets
# ---------------------------------------------------------------------------

PRESETS: dict[str, tuple[type, dict]] = {
    "elman": (Elman, {}),
    "tanh": (Elman, {"activation": "tanh"}),
    "relu": (Elman, {"activation": "relu"}),
    "tanh_orthogonal": (Elman, {"activation": "tanh", "recurrent_init": "orthogonal"}),
    "irnn": (Elman, {"activation": "relu", "recurrent_init": "identity"}),   # Le, Jaitly & Hinton 2015
    "lstm": (LSTM, {}),
    "lstm_peephole": (LSTM, {"peephole": True}),
    "lstm_layer_norm": (LSTM, {"layer_norm": True}),
    "gru": (GRU, {}),
    "gru_reset_before": (GRU, {"reset_after": False}),
    "mingru": (MinGRU, {}),
    "minlstm": (MinLSTM, {}),
    "reservoir": (Reservoir, {}),
}
"""Every named cell: {name: (class, hyper-parameters)}. Scripts and models take these names."""

CELL_NAMES = tuple(PRESETS)


def register_cell(name: str, cell_class: type, **options) -> None:
  """Add a named cell (a class and its preset hyper-parameters) to ``PRESETS``."""
  if not (isinstance(cell_class, type) and issubclass(cell_class, Cell)):
    raise TypeError(f"register_cell: {cell_class!r} is not a Cell subclass")
  PRESETS[name] = (cell_class, dict(options))
  global CELL_NAMES
  CELL_NAMES = tuple(PRESETS)


def make_cell(name: str, hidden_size: int, **options) -> Cell:
  """Build a named cell: its class with the preset's hyper-parameters, ``options`` overriding them.

    make_cell("irnn", 128)                    # Elman(128, activation="relu", recurrent_init="identity")
    make_cell("lstm", 256, forget_bias=1.0)
  """
  if name not in PRESETS:
    raise ValueError(f"unknown cell {name!r}; expected one of {CELL_NAMES}")
  cell_class, preset = PRESETS[name]
  return cell_class(hidden_size=hidden_size, **{**preset, **options})
