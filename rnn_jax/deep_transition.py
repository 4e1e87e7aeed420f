"""Deep-transition RNNs: DT-RNN and DT(S)-RNN (Pascanu, Gulcehre, Cho & Bengio 2013).

"How to construct deep recurrent neural networks" (arXiv:1312.6026, ICLR 2014) makes each of
three functions of an RNN deep: the transition h_{t-1} -> h_t (DT), the read-out h_t -> y_t
(DO) and the input x_t -> h_t. This module holds the deep transition as a cell; the deep
read-out is ``rnn_jax.layers.deep_output`` (DO: y_t = W_hy phi(V h_t + c) + b_y), so that
DOT-RNN = ``DeepTransition`` + a deep read-out, and DOT(S) = ``DeepTransition(shortcut="last")``
+ a deep read-out. The stacked RNN (sRNN) of the same paper is ``StackedRNN``.

The transition is an L-layer MLP whose first layer reads x_t and h_{t-1} (the paper's
eq. for the DT-RNN, h_t = phi_h(W_L^T phi_{L-1}(... phi_1(W_1^T h_{t-1} + U^T x_t)))), in the
project's notation with biases:

  z_t^(1) = f_1(W_xh x_t + W_hh h_{t-1} + b)          W_xh: [D_1, F], W_hh: [D_1, H], b: [D_1]
  z_t^(l) = f_l(W_l z_t^(l-1) + b_l)        l = 2..L-1    W_l: [D_l, D_{l-1}], b_l: [D_l]
  h_t     = f_L(W_L z_t^(L-1) + b_L)                     W_L: [H, D_{L-1}], b_L: [H]

x_t: [F], h_t: [H]; D_1 .. D_{L-1} = ``transition_sizes`` (the intermediate layers), L >= 2.
f_1 .. f_{L-1} = ``transition_activation``, f_L = ``activation``.

DT(S)-RNN (the paper's fig. 2 (b*)): shortcut connections from h_{t-1} that skip the
intermediate layers, so that a gradient can flow back in time through one non-linearity:

  shortcut="last":  h_t = f_L(W_L z_t^(L-1) + W_s h_{t-1} + b_L)       W_s = w_s{L}: [H, H]
  shortcut="all":   z_t^(l) gets + W_s^(l) h_{t-1} for every l = 2..L   W_s^(l): [D_l, H]

With one intermediate layer (L = 2, the configuration of the paper's experiments) the two
coincide. "all" is what the authors' GroundHog code does (``RecurrentMultiLayerShortPath``:
every layer after the first reads h_{t-1}); "last" is the shortcut into the last layer only.

The cell contract holds: a_t = W_xh x_t + b is the only thing the layer reads from x_t, so the
input projection for every step is ONE matmul before the scan; ``recurrence`` does the rest.
Hence the cell runs in ``rnn``, ``bidirectional``, ``StackedRNN`` (a stack of DT layers), the
Flax modules, under ``jax.vmap`` and with ``ScanOptions(remat_chunk=k)``.

Params (names in the math layout [out, in]; layer l >= 2 carries its index):
  w_xh [D_1, F], w_hh [D_1, H], b [D_1], w_{l} [D_l, D_{l-1}] and b_{l} [D_l] for l = 2..L
  (D_L = H), w_s{l} [D_l, H] for each layer with a shortcut.

Initialisation (PyTorch's conventions): the first layer as ``nn.RNN(F, D_1)``, U(+-1/sqrt(D_1))
for W_xh (or Glorot with input_init="glorot"), W_hh and b, W_hh by ``recurrent_init`` when it
is square (D_1 = H); every later layer as ``nn.Linear``, U(+-1/sqrt(fan_in)).

Gradients: a hand-derived backward rule is registered in ``rnn_jax.bptt`` (the backward scan
carries only dh; every weight gradient is one matmul over all steps after it), used by the
default ``ScanOptions(grad="auto")``; it measured faster than jax's autodiff through
``lax.scan`` (docs/design.md, "Deep-transition RNNs"). ``grad="autodiff"`` gives jax's own.
PyTorch and Keras have no DT-RNN layer, so ``rnn_jax.interop`` has no converter for it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import bptt, initializers
from rnn_jax.cells import ACTIVATIONS, Cell, Params, linear, linear_transposed, recurrent_product, register_cell

SHORTCUTS = ("none", "last", "all")


@dataclasses.dataclass(frozen=True)
class DeepTransition(Cell):
  """DT-RNN / DT(S)-RNN cell (Pascanu et al. 2013): an MLP transition from (x_t, h_{t-1}) to h_t.

    z^(1) = f_1(W_xh x_t + W_hh h_{t-1} + b);  z^(l) = f_l(W_l z^(l-1) + b_l);  h_t = z^(L)
    shortcut="last": the last layer also adds W_s h_{t-1};  "all": every layer l >= 2 does

  Attributes:
    transition_sizes: D_1 .. D_{L-1}, the sizes of the intermediate transition layers (at least
      one); None is one layer of H units (L = 2).
    transition_activation: f_1 .. f_{L-1}, one of "tanh", "relu", "sigmoid", "identity".
    activation: f_L, the non-linearity that gives h_t.
    shortcut: "none" (DT-RNN), "last" (DT(S)-RNN, h_{t-1} into the last layer) or "all"
      (h_{t-1} into every layer after the first).
  """
  transition_sizes: Optional[tuple[int, ...]] = None
  transition_activation: str = "tanh"
  activation: str = "tanh"
  shortcut: str = "none"

  num_gates = 1

  @property
  def name(self) -> str:
    """The registry's name: "dt_rnn", or "dts_rnn" with a shortcut."""
    return "dt_rnn" if self.shortcut == "none" else "dts_rnn"

  def __post_init__(self):
    super().__post_init__()
    if self.transition_sizes is not None:
      sizes = self.transition_sizes
      if isinstance(sizes, (list, np.ndarray)):
        sizes = tuple(int(s) for s in sizes)
        object.__setattr__(self, "transition_sizes", sizes)   # hashable, as a static argument must be
      if (not isinstance(sizes, tuple) or not sizes
          or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in sizes)):
        raise ValueError(f"{self.name}: transition_sizes must be a non-empty tuple of positive integers "
                         f"(the intermediate layers D_1 .. D_(L-1)), got {self.transition_sizes!r}")
    for field in ("transition_activation", "activation"):
      if getattr(self, field) not in ACTIVATIONS:
        raise ValueError(f"{self.name}: unknown {field} {getattr(self, field)!r}; "
                         f"expected one of {tuple(ACTIVATIONS)}")
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f"{self.name}: unknown shortcut {self.shortcut!r}; expected one of {SHORTCUTS}")
    square = self.sizes[0] == self.hidden_size
    if not square and (self.recurrent_init in ("orthogonal", "identity") or self.spectral_radius is not None):
      raise ValueError(f"{self.name}: recurrent_init={self.recurrent_init!r} and spectral_radius need a square "
                       f"W_hh, but W_hh is [D_1={self.sizes[0]}, H={self.hidden_size}]; use "
                       f"recurrent_init='torch' or 'glorot', or transition_sizes[0] = hidden_size")

  # ---- sizes ---------------------------------------------------------------
  @property
  def sizes(self) -> tuple[int, ...]:
    """(D_1, ..., D_{L-1}, D_L = H): the width of every transition layer."""
    return tuple(self.transition_sizes or (self.hidden_size,)) + (self.hidden_size,)

  @property
  def depth(self) -> int:
    """L, the number of transition layers (2 for one intermediate layer)."""
    return len(self.sizes)

  def has_shortcut(self, layer: int) -> bool:
    """True if layer ``layer`` (1-based, 2..L) reads h_{t-1} through a shortcut W_s^(layer)."""
    if layer < 2:
      return False
    return self.shortcut == "all" or (self.shortcut == "last" and layer == self.depth)

  # ---- params ----------------------------------------------------------------
  def init(self, key, input_size: int) -> Params:
    """Params {w_xh: [D_1, F], w_hh: [D_1, H], b: [D_1], w_l: [D_l, D_(l-1)], b_l: [D_l], w_s{l}: [D_l, H]}."""
    if not isinstance(input_size, (int, np.integer)) or input_size <= 0:
      raise ValueError(f"{self.name}: input_size must be a positive integer, got {input_size!r}")
    sizes, H = self.sizes, self.hidden_size
    dtype = jnp.dtype(self.param_dtype)
    keys = iter(jax.random.split(key, 3 + 3 * (len(sizes) - 1)))
    first = initializers.torch_default(sizes[0])
    input_init = first if self.input_init == "torch" else initializers.glorot_uniform
    if sizes[0] == H:
      recurrent_init = initializers.recurrent_initializer(self.recurrent_init, H, self.recurrent_gain)
      if self.spectral_radius is not None:
        recurrent_init = initializers.with_spectral_radius(recurrent_init, self.spectral_radius)
    else:
      recurrent_init = first if self.recurrent_init == "torch" else initializers.glorot_uniform
    params = {"w_xh": input_init(next(keys), (sizes[0], input_size), dtype),
              "w_hh": recurrent_init(next(keys), (sizes[0], H), dtype),
              "b": first(next(keys), (sizes[0],), dtype)}
    for layer in range(2, len(sizes) + 1):
      out, fan_in = sizes[layer - 1], sizes[layer - 2]
      dense = initializers.torch_default(fan_in)
      params[f"w_{layer}"] = dense(next(keys), (out, fan_in), dtype)
      params[f"b_{layer}"] = dense(next(keys), (out,), dtype)
      shortcut_key = next(keys)
      if self.has_shortcut(layer):
        params[f"w_s{layer}"] = initializers.torch_default(H)(shortcut_key, (out, H), dtype)
    return params

  # ---- the step -----------------------------------------------------------------
  def recurrence_saving(self, params: Params, h_prev: jax.Array, a_t: jax.Array):
    """h_t from h_{t-1}: [..., H] and a_t = W_xh x_t + b: [..., D_1].

    Returns (h_t, h_t, (z^(1), ..., z^(L-1))): the intermediate layers' activations, each
    [..., D_l], are what a backward pass reads.
    """
    inner, outer = ACTIVATIONS[self.transition_activation], ACTIVATIONS[self.activation]
    z = inner(a_t + recurrent_product(params["w_hh"], h_prev, self.dtype))
    saved = []
    for layer in range(2, self.depth + 1):
      saved.append(z)
      pre = linear(z, params[f"w_{layer}"], self.dtype) + params[f"b_{layer}"]
      if self.has_shortcut(layer):
        pre = pre + recurrent_product(params[f"w_s{layer}"], h_prev, self.dtype)
      z = (outer if layer == self.depth else inner)(pre)
    return z, z, tuple(saved)


register_cell("dt_rnn", DeepTransition, shortcut="none")      # Pascanu et al. 2013, fig. 2 (b)
register_cell("dts_rnn", DeepTransition, shortcut="last")     # DT(S)-RNN, fig. 2 (b*)


# ---------------------------------------------------------------------------
# The hand-derived backward pass (rnn_jax.bptt)
# ---------------------------------------------------------------------------

def _recurrent_params(cell: DeepTransition) -> tuple:
  """The params the recurrence reads besides a_t: W_hh, every W_l, b_l and shortcut W_s^(l)."""
  names = ["w_hh"]
  for layer in range(2, cell.depth + 1):
    names += [f"w_{layer}", f"b_{layer}"] + ([f"w_s{layer}"] if cell.has_shortcut(layer) else [])
  return tuple(names)


def _backward_step(cell: DeepTransition, weights: Params, dh, saved, h_prev, h_t):
  """One step backward through the transition MLP.

    dp^(L) = dh_t * f_L'(h_t);   dp^(l-1) = (W_l^T dp^(l)) * f_{l-1}'(z^(l-1))    l = L..2
    da_t = dp^(1);   dh_{t-1} = W_hh^T dp^(1) + sum_{l with a shortcut} W_s^(l)^T dp^(l)
  Returns (dh_{t-1}, da_t, (dp^(2), ..., dp^(L))), the last for the weight gradients.
  """
  del h_prev
  dp = dh * bptt.activation_derivative(cell.activation, h_t)
  dh_prev = None
  extra = []
  for layer in range(cell.depth, 1, -1):
    extra.append(dp)
    if cell.has_shortcut(layer):
      term = linear_transposed(dp, weights[f"w_s{layer}"], cell.dtype)
      dh_prev = term if dh_prev is None else dh_prev + term
    dp = linear_transposed(dp, weights[f"w_{layer}"], cell.dtype) * bptt.activation_derivative(
        cell.transition_activation, saved[layer - 2])
  term = linear_transposed(dp, weights["w_hh"], cell.dtype)
  dh_prev = term if dh_prev is None else dh_prev + term
  return dh_prev, dp, tuple(reversed(extra))


def _weight_gradients(cell: DeepTransition, weights, da, extra, previous, carries, saved) -> dict:
  """After the scan, one matmul per weight over all T (and B) steps:

    dW_hh = sum_t dp_t^(1) h_{t-1}^T;  dW_l = sum_t dp_t^(l) z_t^(l-1)^T;  db_l = sum_t dp_t^(l);
    dW_s^(l) = sum_t dp_t^(l) h_{t-1}^T
  """
  del carries
  sum_outer = bptt.sum_outer
  gradients = {"w_hh": sum_outer(da, previous, cell.dtype, weights["w_hh"].dtype)}
  for layer in range(2, cell.depth + 1):
    dp, below = extra[layer - 2], saved[layer - 2]
    gradients[f"w_{layer}"] = sum_outer(dp, below, cell.dtype, weights[f"w_{layer}"].dtype)
    gradients[f"b_{layer}"] = jnp.sum(dp, axis=tuple(range(dp.ndim - 1))).astype(weights[f"b_{layer}"].dtype)
    if cell.has_shortcut(layer):
      gradients[f"w_s{layer}"] = sum_outer(dp, previous, cell.dtype, weights[f"w_s{layer}"].dtype)
  return gradients


# Measured faster than jax.grad through lax.scan (docs/design.md, "Deep-transition RNNs"), so
# ScanOptions(grad="auto"), the default, uses it; grad="autodiff" still gives jax's own.
bptt.register(DeepTransition, bptt.BackwardRule(recurrent_params=_recurrent_params, applies=lambda cell: None,
                                                step=_backward_step, weight_gradients=_weight_gradients))
