"""Flax adapters: rnn_jax cells and stacks as ``flax.linen`` (and ``flax.nnx``) modules.

The modules hold exactly the params pytree of the functional API, created by the
cell's (or stack's) own ``init`` and passed unchanged to its functions, so

  variables = {"params": cell.init(key, F)}        # or stack.init(key, F)
  module.apply(variables, ...)                      # == cell.step / stack(...)

and weights move freely between a Flax model, the functional API, PyTorch and
checkpoints. Nothing here adds computation: every call is one of ours.

The module is named so that it sits beside ``import flax.linen as nn`` without a clash::

  from rnn_jax import flax_modules

linen:
  RNNCell(cell)     (carry, x_t: [..., F]) -> (carry, y_t: [..., O]); a
                    ``flax.linen.RNNCellBase``, so ``flax.linen.RNN`` can scan it.
  CellLayer(cell)   one layer of one cell over a sequence: xs: [B, T, F], lengths: [B]
                    -> (final carry, ys: [B, T, O]), the whole-sequence ``rnn`` (one input
                    matmul for all steps, padding-aware ``reverse``).
  RNNLayer(stack)   xs: [B, T, F], lengths: [B] -> (final carries, ys: [B, T, O']);
                    one ``StackedRNN`` (layers, bidirectional, residual, learned h_0),
                    with dropout drawn from the 'dropout' rng when ``train=True``.
nnx:
  NNXRNNCell, NNXRNNLayer   the same over ``nnx.Param``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp
from flax import nnx

from rnn_jax.cells import Cell, Params
from rnn_jax.sequence import ScanOptions, StackedRNN, rnn


def _check_layout(name: str, params: Params, expected: Params) -> None:
  """Raise ValueError unless ``params`` has the names and shapes that ``init`` would create."""
  shapes = lambda tree: jax.tree_util.tree_map(lambda leaf: tuple(jnp.shape(leaf)), tree)
  got, want = shapes(params), shapes(expected)
  if got != want:
    raise ValueError(f"{name}: params do not match the layout that init creates; expected {want}, got {got}")


def _declare_params(module: linen.Module, owner, input_size: int) -> Params:
  """Make every top-level entry of ``owner.init``'s params a flax param of ``module``, under its own name.

  ``owner`` is a cell or a StackedRNN. On ``module.init``: params = owner.init(key, F) with
  key = module.make_rng("params"), registered unchanged. On ``module.apply`` (or a second
  call during init): the stored values, checked against init's names and shapes.
  """
  stored = module.variables.get("params", {})
  if module.is_initializing() and not stored:
    created = owner.init(module.make_rng("params"), input_size)
    return {name: module.param(name, lambda _, value=value: value) for name, value in created.items()}
  params = dict(stored)
  expected = jax.eval_shape(lambda key: owner.init(key, input_size), jax.random.key(0))
  _check_layout(f"{type(module).__name__}({owner.name if isinstance(owner, Cell) else 'stack'})",
                params, expected)
  return params


def _step_batched(cell: Cell, params: Params, carry, x: jax.Array):
  """cell.step vmapped over every leading axis of x: [..., F]."""
  step = cell.step
  for _ in range(x.ndim - 1):
    step = jax.vmap(step, in_axes=(None, 0, 0))
  return step(params, carry, x)


def _zero_carry(cell: Cell, batch_shape: tuple, input_size: int) -> Any:
  """The cell's zero carry with leading batch axes: leaves [*batch_shape, ...]."""
  reference = jax.eval_shape(lambda key: cell.initial_carry(cell.init(key, input_size)), jax.random.key(0))
  return jax.tree_util.tree_map(lambda leaf: jnp.zeros(batch_shape + leaf.shape, leaf.dtype), reference)


class RNNCell(linen.RNNCellBase):
  """A ``flax.linen`` cell over an rnn_jax cell: (carry_{t-1}, x_t) -> (carry_t, y_t).

    y_t, carry_t = cell.step(params, carry_{t-1}, x_t)   vmapped over x's leading axes

  Its params are ``cell.init(key, F)`` with key = this module's 'params' rng, one
  flax param per name (w_xh, w_hh, b, ...). Usable step by step, in ``linen.scan``
  or in ``linen.RNN(RNNCell(cell))``; for whole sequences ``RNNLayer`` is faster
  (one input matmul for all steps).
  """
  cell: Cell

  @linen.compact
  def __call__(self, carry, x: jax.Array):
    """carry: leaves [..., S]; x: [..., F] -> (carry, y: [..., O])."""
    params = _declare_params(self, self.cell, x.shape[-1])
    return _step_batched(self.cell, params, carry, x)

  @linen.nowrap
  def initialize_carry(self, rng, input_shape: tuple) -> Any:
    """Zeros for a batch: input_shape [..., F] -> carry leaves [..., S] (the rng is unused)."""
    del rng
    return _zero_carry(self.cell, tuple(input_shape[:-1]), input_shape[-1])

  @property
  def num_feature_axes(self) -> int:
    return 1


class CellLayer(linen.Module):
  """One recurrent layer of one cell as a ``flax.linen`` module, over whole sequences.

    carry, ys = rnn(cell, params, xs, lengths, reverse=reverse, time_major=time_major, options=options)

  Params are ``cell.init(key, F)``, one flax param per name. Padded steps (t >= lengths[b])
  hold the carry and give y_t = 0; ``reverse=True`` reads each sequence from its last real step.
  """
  cell: Cell
  reverse: bool = False
  time_major: bool = False
  options: ScanOptions = ScanOptions()

  @linen.compact
  def __call__(self, xs: jax.Array, lengths: Optional[jax.Array] = None, *, initial_carry=None):
    """xs: [B, T, F] (or [T, B, F] if time_major) -> (final carry [B, ...], ys [B, T, O])."""
    params = _declare_params(self, self.cell, xs.shape[-1])
    return rnn(self.cell, params, xs, lengths, initial_carry=initial_carry, reverse=self.reverse,
               time_major=self.time_major, options=self.options)


class RNNLayer(linen.Module):
  """A ``flax.linen`` layer over ``StackedRNN``: xs [B, T, F] -> (final carries, ys [B, T, O']).

  Params are ``stack.init(key, F)`` ({"layer_0": {"forward": ..., "backward": ...}, ...}).
  With ``train=True`` the masks of between-layer dropout and of the stack's recurrent dropout,
  zoneout and DropConnect (those with a rate > 0) are drawn from the 'dropout' rng
  (``apply(..., rngs={"dropout": key})``); otherwise they are off.
  """
  stack: StackedRNN
  time_major: bool = False

  @linen.compact
  def __call__(self, xs: jax.Array, lengths: Optional[jax.Array] = None, *, train: bool = False,
               initial_carries: Optional[Sequence] = None):
    """xs: [B, T, F] (or [T, B, F] if time_major), lengths: optional [B] ints in [0, T]."""
    params = _declare_params(self, self.stack, xs.shape[-1])
    rng = self.make_rng("dropout") if (train and (self.stack.dropout > 0.0 or self.stack.regularizers.any)) else None
    return self.stack(params, xs, lengths, train=train, rng=rng,
                      initial_carries=initial_carries, time_major=self.time_major)


class NNXRNNCell(nnx.Module):
  """A ``flax.nnx`` cell: ``params`` is an ``nnx.Param`` holding ``cell.init(rngs.params(), F)``."""

  def __init__(self, cell: Cell, input_size: int, *, rngs: nnx.Rngs):
    self.cell = cell
    self.params = nnx.Param(cell.init(rngs.params(), input_size))

  def initialize_carry(self, batch_shape: tuple = ()) -> Any:
    """Zeros with leading batch axes: leaves [*batch_shape, S]."""
    return _zero_carry(self.cell, tuple(batch_shape), self.params.value["w_xh"].shape[1])

  def __call__(self, carry, x: jax.Array):
    """(carry, x: [..., F]) -> (carry, y: [..., O])."""
    return _step_batched(self.cell, self.params.value, carry, x)


class NNXRNNLayer(nnx.Module):
  """A ``flax.nnx`` layer over ``StackedRNN``; dropout (train=True) draws from ``rngs.dropout()``."""

  def __init__(self, stack: StackedRNN, input_size: int, *, rngs: nnx.Rngs):
    self.stack = stack
    self.params = nnx.Param(stack.init(rngs.params(), input_size))
    self.rngs = rngs

  def __call__(self, xs: jax.Array, lengths: Optional[jax.Array] = None, *, train: bool = False,
               initial_carries: Optional[Sequence] = None):
    """xs: [B, T, F], lengths: optional [B] -> (final carries, ys: [B, T, O'])."""
    rng = self.rngs.dropout() if (train and (self.stack.dropout > 0.0 or self.stack.regularizers.any)) else None
    return self.stack(self.params.value, xs, lengths, train=train, rng=rng,
                      initial_carries=initial_carries)
