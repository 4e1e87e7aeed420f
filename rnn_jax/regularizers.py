"""Regularisers of the recurrence (recurrent dropout, zoneout, DropConnect on W_hh) and of the embedding.

Dropout between layers (``StackedRNN.dropout``) never touches the recurrent connection. The three
regularisers here do, each with the randomness drawn so that the scan body stays a pure function
of its inputs:

Recurrent dropout (Gal & Ghahramani 2016, "A theoretically grounded application of dropout in
recurrent neural networks"; Keras' ``recurrent_dropout``). ONE mask per sequence and example,
the same at every step, on h_{t-1} where it enters the recurrent product only:

    m ~ Bernoulli(1 - p)^P / (1 - p)                    [B, P], drawn once per forward pass
    Elman:  h_t = f(W_xh x_t + W_hh (m * h_{t-1}) + b)
    LSTM:   (i, f, g, o) = W_xh x_t + W_hh (m * h_{t-1}) + b;  c_t, h_t as usual (c unmasked)
    GRU:    r, z, n read W_hh (m * h_{t-1})  (reset-before: W_hn (r * m * h_{t-1}));
            h_t = (1 - z) * n + z * h_{t-1}   with the UNMASKED h_{t-1}, as Keras' GRUCell

One mask serves every gate (Gal & Ghahramani's tied-weights variant). ``RecurrentDropoutCell``
wraps a cell: its carry holds (the cell's carry, m), and each step hands the cell a carry whose h
is m * h_{t-1}, which is exact wherever h_{t-1} enters only through weight products (Elman, LSTM
with every option, the deep-transition cell). A cell whose h_{t-1} also enters elsewhere declares
the gate g that multiplies it (``register_recurrent_dropout``): the step is then corrected by
g * (h_{t-1} - m * h_{t-1}), so that term reads the unmasked state (GRU: g = z from its saved
gates; echo-state reservoir: g = 1 - alpha).

Zoneout (Krueger et al. 2017, "Zoneout: regularizing RNNs by randomly preserving hidden
activations"). A fresh mask per step and unit keeps the previous value:

    d_t ~ Bernoulli(p)^P                                   fresh at every step t
    h_t = d_t * h_{t-1} + (1 - d_t) * h~_t                 h~_t: the cell's own step from h_{t-1}
    LSTM, separately on the cell state with rate p_c (the paper's LSTM equations):
    c_t = d^c_t * c_{t-1} + (1 - d^c_t) * (f_t * c_{t-1} + i_t * g_t)
    h_t = d^h_t * h_{t-1} + (1 - d^h_t) * (o_t * tanh(f_t * c_{t-1} + i_t * g_t))
    evaluation: the expectation, h_t = p h_{t-1} + (1 - p) h~_t (and c_t with p_c)

The masks d_t for every step are drawn BEFORE the scan (one per time index, by
``fold_in(key, t)``, so padding a batch does not change them) and enter the scan as extra input
columns: ``ZoneoutCell(train=True)`` reads x_t = [x_t ; d_t] and passes d_t through its input
projection untouched, so lengths, reversal, bidirectional layers and remat work unchanged.

DropConnect on W_hh (Wan et al. 2013; the weight drop of AWD-LSTM, Merity, Keskar & Socher
2017, "Regularizing and optimizing LSTM language models"):

    W~_hh = W_hh * M / (1 - p),   M ~ Bernoulli(1 - p)^[G*H, P], drawn once per forward pass

a pure transform of the params (``weight_drop``), so the fused CPU kernels and the hand-derived
backward pass still run the recurrence.

Gradients. The two wrapper cells change the recurrence, which no hand-derived rule or fused
kernel models: ``grad="auto"`` runs jax's autodiff through ``lax.scan`` for them (the reason is
``rnn_jax.bptt.unsupported_reason(cell)``) and ``grad="manual"`` is refused.

Embedding dropout (Gal & Ghahramani 2016, section 4.2; Merity, Keskar & Socher 2017, section
4.3). Whole word TYPES are dropped, not single coordinates: one mask entry per row of the
embedding table E [V, D], drawn once per forward pass, so every occurrence of a dropped word in
the batch reads the zero vector:

    m ~ Bernoulli(1 - p)^V / (1 - p)                       [V], drawn once per forward pass
    x_t = m[w_t] * E[w_t]                                  [B, T, D]

``embedding_dropout`` gathers the mask by the ids and scales the embedded rows (the same values
and gradients as masking the table, without a [V, D] temporary); ``rnn_jax.layers.TokenRNN`` applies it from
its ``embedding_dropout`` field before its ordinary dropout on x_t.

``StackedRNN`` applies the three recurrent ones from its ``recurrent_dropout``, ``zoneout``, ``zoneout_cell`` and
``weight_dropout`` fields (``Regularizers``), each direction of each layer with its own key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import bptt
from rnn_jax.cells import GRU, LSTM, Cell, Elman, LSTMState, MinGRU, Params, Reservoir
from rnn_jax.deep_transition import DeepTransition


def check_rate(owner: str, name: str, value) -> None:
  """A rate must be a real number in [0, 1); raises ValueError naming ``owner`` and ``name``."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
      or not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}")


class _Wrapper:
  """The cell contract of a wrapped cell, by delegation (sizes, params, projections, read-out)."""

  @property
  def hidden_size(self) -> int:
    return self.cell.hidden_size

  @property
  def state_size(self) -> int:
    return self.cell.state_size

  @property
  def output_size(self) -> int:
    return self.cell.output_size

  @property
  def num_gates(self) -> int:
    return self.cell.num_gates

  @property
  def dtype(self):
    return self.cell.dtype

  @property
  def param_dtype(self):
    return self.cell.param_dtype

  def init(self, key, input_size: int) -> Params:
    """The wrapped cell's params: the regulariser adds none."""
    return self.cell.init(key, input_size)

  def check_params(self, params: Params) -> None:
    self.cell.check_params(params)

  def projection_bias(self, params: Params) -> jax.Array:
    return self.cell.projection_bias(params)

  def output(self, params: Params, hs: jax.Array) -> jax.Array:
    return self.cell.output(params, hs)

  def step(self, params: Params, carry, x_t: jax.Array):
    """One time step, scan's body signature: (carry_{t-1}, x_t) -> (carry_t, y_t)."""
    carry, h_t = self.recurrence(params, carry, self.input_projection(params, x_t))
    return carry, self.output(params, h_t)


# ---------------------------------------------------------------------------
# Recurrent dropout
# ---------------------------------------------------------------------------

class RecurrentDropoutState(NamedTuple):
  """The carry of ``RecurrentDropoutCell``: the wrapped cell's carry and the mask m: [..., P]."""
  carry: Any
  mask: jax.Array


_STATE_GATES: dict[type, Optional[Callable]] = {}
_NO_PRODUCT = (MinGRU,)


def register_recurrent_dropout(cell_type: type, state_gate: Optional[Callable] = None) -> None:
  """Declare how h_{t-1} enters ``cell_type``'s recurrence, so recurrent dropout can mask it.

  state_gate: None when h_{t-1} enters only through weight products (W_hh h_{t-1}, ...); else
  ``state_gate(cell, params, saved) -> g`` for a recurrence h_t = ... + g * h_{t-1}, where saved is
  what ``cell.recurrence_saving`` returns third (g: [..., P] or a scalar). Subclasses inherit it.
  """
  if not (isinstance(cell_type, type) and issubclass(cell_type, Cell)):
    raise TypeError(f"register_recurrent_dropout: {cell_type!r} is not a Cell subclass")
  _STATE_GATES[cell_type] = state_gate


register_recurrent_dropout(Elman)
register_recurrent_dropout(LSTM)
register_recurrent_dropout(DeepTransition)
# GRU: h_t = (1 - z) * n + z * h_{t-1}; saved = (r, z, n[, s]) (cells.GRU.recurrence_saving).
register_recurrent_dropout(GRU, lambda cell, params, saved: saved[1])
# Reservoir: h_t = (1 - alpha) h_{t-1} + alpha tanh(a_t + W_hh h_{t-1}).
register_recurrent_dropout(Reservoir, lambda cell, params, saved: 1.0 - cell.leak_rate)


def _state_gate_rule(cell) -> tuple[bool, Optional[Callable]]:
  """(registered, state_gate) for the cell's type or nearest registered base type."""
  for klass in type(cell).__mro__:
    if klass in _STATE_GATES:
      return True, _STATE_GATES[klass]
  return False, None


def check_recurrent_dropout_cell(cell) -> None:
  """Raise ValueError unless recurrent dropout knows where h_{t-1} enters ``cell``'s recurrence."""
  if isinstance(cell, _Wrapper):
    raise ValueError(f"recurrent_dropout: wrap the plain cell, not {type(cell).__name__}; a ZoneoutCell "
                     f"goes outside a RecurrentDropoutCell")
  if isinstance(cell, _NO_PRODUCT):
    raise ValueError(f"recurrent_dropout: {cell.name} has no recurrent weights (h_{{t-1}} enters only "
                     f"through A_t * h_{{t-1}}), so there is no recurrent product to mask")
  if not _state_gate_rule(cell)[0]:
    raise ValueError(f"recurrent_dropout: it is not known where h_{{t-1}} enters the recurrence of "
                     f"{type(cell).__name__}; declare it with register_recurrent_dropout")


def recurrent_dropout_mask(key, rate: float, shape, dtype=jnp.float32) -> jax.Array:
  """m = Bernoulli(1 - rate) / (1 - rate) of ``shape`` (inverted scaling: E[m] = 1)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
  return jnp.where(keep, jnp.asarray(1.0 / (1.0 - rate), dtype), jnp.zeros((), dtype))


@dataclasses.dataclass(frozen=True)
class RecurrentDropoutCell(_Wrapper):
  """A cell with recurrent dropout (Gal & Ghahramani 2016): the mask in the carry, h_{t-1} masked
  in the recurrent product only.

    carry_{t-1} = (carry, m)                      m: [P], m_j in {0, 1/(1-p)}, constant over t
    carry_t, h_t = cell.recurrence(with_hidden(carry, m * h_{t-1}), a_t)
                   (+ g * (h_{t-1} - m * h_{t-1}) on h_t for a cell with a state gate g, e.g. the GRU's z)

  ``initial_carry`` holds m = 1, the identity; ``start(key, carry)`` draws a mask per example
  for a (batched) carry. The mask is the caller's, so the same mask gives the same numbers.

  Attributes:
    cell: the wrapped cell (Elman, LSTM, GRU, reservoir, deep transition, or a registered type).
    rate: p in [0, 1), the probability of dropping a unit of h_{t-1}.
  """
  cell: Cell
  rate: float

  def __post_init__(self):
    check_rate("RecurrentDropoutCell", "rate", self.rate)
    check_recurrent_dropout_cell(self.cell)

  @property
  def name(self) -> str:
    return f"{self.cell.name}+recurrent_dropout"

  def initial_carry(self, params: Params) -> RecurrentDropoutState:
    """(the cell's zero carry, m = 1): [P] ones in the carry's dtype."""
    carry = self.cell.initial_carry(params)
    h = self.cell.hidden(carry)
    return RecurrentDropoutState(carry, jnp.ones(h.shape, h.dtype))

  def start(self, key, carry) -> RecurrentDropoutState:
    """The wrapped carry of ``carry`` (the cell's, with any batch axes [..., P]) and a fresh mask
    m of the same shape as its h: one mask per example, for the whole sequence."""
    h = self.cell.hidden(carry)
    return RecurrentDropoutState(carry, recurrent_dropout_mask(key, self.rate, h.shape, h.dtype))

  def hidden(self, state: RecurrentDropoutState) -> jax.Array:
    return self.cell.hidden(state.carry)

  def with_hidden(self, state: RecurrentDropoutState, h: jax.Array) -> RecurrentDropoutState:
    return RecurrentDropoutState(self.cell.with_hidden(state.carry, h), state.mask)

  def input_projection(self, params: Params, xs: jax.Array, *, bias: bool = True) -> jax.Array:
    return self.cell.input_projection(params, xs, bias=bias)

  def recurrence(self, params: Params, state: RecurrentDropoutState, a_t: jax.Array):
    """(carry_{t-1}, m), a_t -> ((carry_t, m), h_t) with m * h_{t-1} in the recurrent product."""
    carry, mask = state
    h_prev = self.cell.hidden(carry)
    masked = h_prev * mask
    _, state_gate = _state_gate_rule(self.cell)
    if state_gate is None:
      carry_t, h_t = self.cell.recurrence(params, self.cell.with_hidden(carry, masked), a_t)
    else:
      carry_t, h_t, saved = self.cell.recurrence_saving(params, self.cell.with_hidden(carry, masked), a_t)
      h_t = h_t + state_gate(self.cell, params, saved) * (h_prev - masked)
      carry_t = self.cell.with_hidden(carry_t, h_t)
    return RecurrentDropoutState(carry_t, mask), h_t


# ---------------------------------------------------------------------------
# Zoneout
# ---------------------------------------------------------------------------

def _memory(cell, carry) -> Optional[jax.Array]:
  """The LSTM's cell state c_t in a carry (through a RecurrentDropoutCell), or None."""
  if isinstance(cell, RecurrentDropoutCell):
    return _memory(cell.cell, carry.carry)
  return carry.c if isinstance(carry, LSTMState) else None


def _with_memory(cell, carry, c: jax.Array):
  if isinstance(cell, RecurrentDropoutCell):
    return RecurrentDropoutState(_with_memory(cell.cell, carry.carry, c), carry.mask)
  return carry._replace(c=c)


def _has_memory(cell) -> bool:
  inner = cell.cell if isinstance(cell, RecurrentDropoutCell) else cell
  return isinstance(inner, LSTM)


@dataclasses.dataclass(frozen=True)
class ZoneoutCell(_Wrapper):
  """A cell with zoneout (Krueger et al. 2017): each unit keeps its previous value with
  probability p, a fresh draw at every step.

    carry~_t, h~_t = cell.recurrence(carry_{t-1}, a_t)
    h_t = d^h_t * h_{t-1} + (1 - d^h_t) * h~_t            d^h_t: [P]
    c_t = d^c_t * c_{t-1} + (1 - d^c_t) * c~_t            LSTM only, d^c_t: [H]

  train=True: the masks are 0/1 input columns, x_t: [F + K] = [x_t ; d^h_t ; d^c_t] (K = P if
  rate > 0, plus H if cell_rate > 0), which ``noise`` draws and ``with_noise`` appends; the input
  projection passes them through, a_t: [G*H + K]. train=False: x_t: [F] and d = p, the expectation
  h_t = p h_{t-1} + (1 - p) h~_t. The carry is the wrapped cell's.

  Attributes:
    cell: the wrapped cell (any cell, or a ``RecurrentDropoutCell``).
    rate: p, the zoneout probability of h.
    cell_rate: p_c, the zoneout probability of the LSTM's cell state c (0 for other cells).
    train: read the masks from the inputs (True) or use their expectation (False).
  """
  cell: Any
  rate: float
  cell_rate: float = 0.0
  train: bool = False

  def __post_init__(self):
    check_rate("ZoneoutCell", "rate", self.rate)
    check_rate("ZoneoutCell", "cell_rate", self.cell_rate)
    if isinstance(self.cell, ZoneoutCell):
      raise ValueError("ZoneoutCell: the wrapped cell already has zoneout")
    if self.cell_rate and not _has_memory(self.cell):
      raise ValueError(f"ZoneoutCell: cell_rate zones out the LSTM's cell state c; {self.cell.name} has none "
                       f"(use rate, which zones out h)")

  @property
  def name(self) -> str:
    return f"{self.cell.name}+zoneout"

  @property
  def noise_size(self) -> int:
    """K, the mask columns appended to x_t in training: P (if rate > 0) + H (if cell_rate > 0)."""
    return (self.cell.state_size if self.rate else 0) + (self.cell.hidden_size if self.cell_rate else 0)

  def noise(self, key, steps: int, batch_shape=(), dtype=jnp.float32) -> jax.Array:
    """The masks d_t for ``steps`` steps: [T, *batch_shape, K] of 0/1, d_t drawn from fold_in(key, t)
    (so step t's masks do not depend on T); columns [:P] ~ Bernoulli(rate), [P:] ~ Bernoulli(cell_rate)."""
    rates = np.concatenate([np.full(self.cell.state_size if self.rate else 0, self.rate),
                            np.full(self.cell.hidden_size if self.cell_rate else 0, self.cell_rate)])
    rates = jnp.asarray(rates, jnp.float32)

    def one_step(t):
      draw = jax.random.uniform(jax.random.fold_in(key, t), (*batch_shape, rates.shape[0]))
      return (draw < rates).astype(dtype)

    return jax.vmap(one_step)(jnp.arange(steps))

  def with_noise(self, xs: jax.Array, noise: jax.Array) -> jax.Array:
    """[xs ; noise] on the feature axis: xs [..., F], noise [..., K] -> [..., F + K]."""
    if noise.shape[-1] != self.noise_size or noise.shape[:-1] != xs.shape[:-1]:
      raise ValueError(f"{self.name}: noise must have shape {(*xs.shape[:-1], self.noise_size)} to go with "
                       f"xs of shape {tuple(xs.shape)}, got {tuple(noise.shape)}")
    dtype = jnp.result_type(xs.dtype, noise.dtype) if jnp.issubdtype(xs.dtype, jnp.floating) else noise.dtype
    return jnp.concatenate([xs.astype(dtype), noise.astype(dtype)], axis=-1)

  def initial_carry(self, params: Params):
    return self.cell.initial_carry(params)

  def hidden(self, carry) -> jax.Array:
    return self.cell.hidden(carry)

  def with_hidden(self, carry, h: jax.Array):
    return self.cell.with_hidden(carry, h)

  def input_projection(self, params: Params, xs: jax.Array, *, bias: bool = True) -> jax.Array:
    """train: [x ; d] [..., F + K] -> [W_xh x + b ; d] [..., G*H + K]; else the cell's projection."""
    if not self.train:
      return self.cell.input_projection(params, xs, bias=bias)
    features = params["w_xh"].shape[1] + self.noise_size
    if xs.ndim == 0 or xs.shape[-1] != features:
      got = "is a scalar" if xs.ndim == 0 else f"has {xs.shape[-1]} features"
      raise ValueError(f"{self.name}: x {got}; in training it holds the inputs and the zoneout masks, "
                       f"{params['w_xh'].shape[1]} + {self.noise_size} = {features} features (with_noise)")
    split = xs.shape[-1] - self.noise_size
    a = self.cell.input_projection(params, xs[..., :split], bias=bias)
    return jnp.concatenate([a, xs[..., split:].astype(a.dtype)], axis=-1)

  def recurrence(self, params: Params, carry, a_t: jax.Array):
    """carry_{t-1}, a_t -> (carry_t, h_t) with h (and the LSTM's c) zoned out."""
    P = self.cell.state_size
    if self.train:
      split = a_t.shape[-1] - self.noise_size
      a_t, d = a_t[..., :split], a_t[..., split:]
      d_h = d[..., :P] if self.rate else None
      d_c = d[..., P if self.rate else 0:] if self.cell_rate else None
    else:
      d_h, d_c = self.rate, self.cell_rate
    carry_t, h_t = self.cell.recurrence(params, carry, a_t)
    if self.rate:
      h_t = d_h * self.cell.hidden(carry) + (1 - d_h) * h_t
      carry_t = self.cell.with_hidden(carry_t, h_t)
    if self.cell_rate:
      c_t = d_c * _memory(self.cell, carry) + (1 - d_c) * _memory(self.cell, carry_t)
      carry_t = _with_memory(self.cell, carry_t, c_t)
    return carry_t, h_t


# ---------------------------------------------------------------------------
# DropConnect on W_hh
# ---------------------------------------------------------------------------

def weight_drop(key, rate: float, params: Params, names=("w_hh",)) -> Params:
  """DropConnect (Wan et al. 2013; AWD-LSTM's weight drop): W * M / (1 - rate) for each named weight.

    M ~ Bernoulli(1 - rate), one mask of W's shape ([G*H, P] for W_hh), a new key per forward pass

  The other params are returned as they are; rate = 0 returns ``params`` itself. A pure params
  transform: the cell, its hand-derived backward pass and its fused kernel run unchanged.
  """
  check_rate("weight_drop", "rate", rate)
  if not rate:
    return params
  missing = [name for name in names if name not in params]
  if missing:
    raise ValueError(f"weight_drop: params have no {missing} to drop; keys are {sorted(params)}")
  keys = jax.random.split(key, len(names))
  dropped = dict(params)
  for sub, name in zip(keys, names):
    w = params[name]
    keep = jax.random.bernoulli(sub, 1.0 - rate, w.shape)
    dropped[name] = jnp.where(keep, w / jnp.asarray(1.0 - rate, w.dtype), jnp.zeros((), w.dtype))
  return dropped


# ---------------------------------------------------------------------------
# Embedding dropout
# ---------------------------------------------------------------------------

def embedding_dropout(key, rate: float, embedded: jax.Array, ids: jax.Array, vocab_size: int) -> jax.Array:
  """Embedding dropout (Gal & Ghahramani 2016, 4.2): x = m[w] * E[w], one mask entry per word type.

    embedded E[ids] [..., D], ids [...] in [0, V) -> [..., D]
    m ~ Bernoulli(1 - rate)^V / (1 - rate), from ``key`` (a new key per forward pass)

  Every occurrence of a dropped word in ``ids`` reads the zero vector, and its row of E gets no
  gradient. rate = 0 returns ``embedded`` itself. ``embedded`` comes from ``rnn_jax.layers.embed``,
  which has checked the ids (a gather clamps out-of-range ids silently).
  """
  check_rate("embedding_dropout", "rate", rate)
  if embedded.shape[:-1] != jnp.shape(ids):
    raise ValueError(f"embedding_dropout: embedded {tuple(embedded.shape)} must be ids {tuple(jnp.shape(ids))} "
                     f"plus a feature axis")
  if not rate:
    return embedded
  keep = jax.random.bernoulli(key, 1.0 - rate, (int(vocab_size),))
  scale = jnp.where(keep, jnp.asarray(1.0 / (1.0 - rate), embedded.dtype), jnp.zeros((), embedded.dtype))
  return embedded * jnp.take(scale, ids, axis=0)[..., None]


# ---------------------------------------------------------------------------
# The fall-back of the wrapped cells, stated where rnn_jax.bptt looks
# ---------------------------------------------------------------------------

def _never(*args, **kwargs):
  raise AssertionError("a regulariser wrapper has no hand-derived backward rule")


_REASONS = {
    RecurrentDropoutCell: "the mask m multiplies h_{t-1} inside the recurrent product W_hh (m * h_{t-1}), "
                          "which no hand-derived rule or fused kernel models",
    ZoneoutCell: "zoneout mixes h_{t-1} into h_t with a per-step mask, which no hand-derived rule or fused "
                 "kernel models",
}
for _type, _reason in _REASONS.items():
  bptt.register(_type, bptt.BackwardRule(
      recurrent_params=lambda cell: (),
      applies=lambda cell, reason=_reason: f"{cell.name}: {reason}; jax's autodiff through lax.scan runs "
                                           f"with grad='auto'",
      step=_never, weight_gradients=_never))


# ---------------------------------------------------------------------------
# The stack's use: one layer direction at a time
# ---------------------------------------------------------------------------

class Prepared(NamedTuple):
  """What one direction of a regularised layer runs: ``rnn(cell, params, xs, initial_carry=carry)``."""
  cell: Any
  params: Params
  xs: jax.Array
  carry: Any


@dataclasses.dataclass(frozen=True)
class Regularizers:
  """The rates of the three regularisers (0 = off), as ``StackedRNN`` holds them.

  Attributes:
    recurrent_dropout: p of ``RecurrentDropoutCell`` (training only).
    zoneout: p of ``ZoneoutCell`` on h (training: masks; evaluation: the expectation).
    zoneout_cell: p_c of ``ZoneoutCell`` on the LSTM's c.
    weight_dropout: p of ``weight_drop`` on W_hh (training only).
  """
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  zoneout_cell: float = 0.0
  weight_dropout: float = 0.0

  def check(self, owner: str, cell, grad: str = "auto") -> None:
    """Raise ValueError for a rate outside [0, 1) or one the cell (or the gradient method) cannot take."""
    for field in dataclasses.fields(self):
      check_rate(owner, field.name, getattr(self, field.name))
    if self.recurrent_dropout:
      try:
        check_recurrent_dropout_cell(cell)
      except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None
    if self.zoneout_cell and not _has_memory(cell):
      raise ValueError(f"{owner}: zoneout_cell zones out the LSTM's cell state c; {cell.name} has none "
                       f"(zoneout zones out h)")
    if self.weight_dropout:
      if not _has_recurrent_weight(cell):
        raise ValueError(f"{owner}: weight_dropout drops W_hh; {cell.name} has no recurrent weight w_hh")
    if grad == "manual" and (self.recurrent_dropout or self.zoneout or self.zoneout_cell):
      raise ValueError(f"{owner}: recurrent_dropout and zoneout change the recurrence, which the hand-derived "
                       f"backward pass does not model; use grad='auto' (jax's autodiff runs for them)")

  @property
  def any(self) -> bool:
    """True if any rate is above 0."""
    return any(getattr(self, field.name) for field in dataclasses.fields(self))

  def active(self, train: bool) -> bool:
    """True if a call with ``train`` changes the layers: any rate in training, zoneout always."""
    return bool(self.zoneout or self.zoneout_cell or (train and self.any))

  def evaluation_cell(self, cell):
    """The cell of evaluation and of one-step decoding: ``cell`` itself, or the zoneout expectation."""
    if self.zoneout or self.zoneout_cell:
      return ZoneoutCell(cell, self.zoneout, self.zoneout_cell, train=False)
    return cell

  def prepare(self, cell, params: Params, xs: jax.Array, carry, *, train: bool, key=None,
              time_major: bool = False) -> Prepared:
    """The wrapped cell, params, inputs and initial carry of one layer direction.

    xs: [B, T, F] (or [T, B, F]); carry: the cell's initial carry, None (zeros), shared or with a
    leading B axis. With train, ``key`` draws DropConnect's M, recurrent dropout's m [B, P] and
    zoneout's d [T, B, K], each from its own sub-key; without, only the zoneout expectation applies.
    ``unwrap`` turns the final carry back into the cell's.
    """
    if not train:
      return Prepared(self.evaluation_cell(cell), params, xs, carry)
    key_weights, key_mask, key_noise = jax.random.split(key, 3)
    params = weight_drop(key_weights, self.weight_dropout, params)
    run_cell = cell
    if self.recurrent_dropout:
      B = xs.shape[1] if time_major else xs.shape[0]
      run_cell = RecurrentDropoutCell(cell, self.recurrent_dropout)
      carry = run_cell.start(key_mask, _batched(cell, params, carry, B))
    if self.zoneout or self.zoneout_cell:
      run_cell = ZoneoutCell(run_cell, self.zoneout, self.zoneout_cell, train=True)
      T, B = (xs.shape[0], xs.shape[1]) if time_major else (xs.shape[1], xs.shape[0])
      noise = run_cell.noise(key_noise, T, (B,), params["w_xh"].dtype)
      xs = run_cell.with_noise(xs, noise if time_major else jnp.swapaxes(noise, 0, 1))
    return Prepared(run_cell, params, xs, carry)

  def unwrap(self, carry):
    """The cell's own carry from a final carry of a prepared cell."""
    return carry.carry if isinstance(carry, RecurrentDropoutState) else carry


@functools.lru_cache(maxsize=64)
def _has_recurrent_weight(cell) -> bool:
  """True if ``cell.init`` makes a w_hh."""
  return "w_hh" in jax.eval_shape(lambda key: cell.init(key, 1), jax.random.PRNGKey(0))


def _batched(cell, params: Params, carry, batch_size: int):
  """The initial carry with a leading B axis (zeros for None, a shared carry broadcast)."""
  reference = cell.initial_carry(params)
  if carry is None:
    carry = reference
  leaves, reference_leaves = jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(reference)
  if [np.ndim(leaf) for leaf in leaves] == [np.ndim(leaf) for leaf in reference_leaves]:
    return jax.tree_util.tree_map(
        lambda leaf, ref: jnp.broadcast_to(jnp.asarray(leaf, ref.dtype), (batch_size, *ref.shape)), carry, reference)
  return carry
