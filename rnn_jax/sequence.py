"""Run a cell over time with ``jax.lax.scan``: lengths, reversal, bidirectional and stacked layers.

Layers of this module
---------------------
``run_cell``       one example, xs: [T, F] -> (carry_T, ys: [T, O])
``rnn``            a batch, xs: [B, T, F] (or time-major [T, B, F]), vmapping ``run_cell``
``bidirectional``  a forward and a padding-aware backward ``rnn``, merged per step
``StackedRNN``     layers of (bi)directional ``rnn`` with dropout and residual connections

Variable lengths. With ``length = L``, steps t >= L leave the carry untouched
and produce y_t = 0, so the final carry is the state at the true end of the
sequence. ``reverse=True`` scans t = T-1, ..., 0 with the same rule, so the carry
stays at its initial value through the padding and the backward pass starts at
the sequence's last real token x_{L-1}. No gather or flip is needed.

Lengths are checked to lie in [0, T] whenever they are concrete values; inside
``jit`` (traced lengths) out-of-range values cannot raise, and then L > T acts as
L = T and L < 0 as L = 0 (their shape and integer dtype are checked even when traced).

Dtypes. The recurrence computes in the params' dtype: inputs xs (floating, integer or bool)
and a given initial carry are cast to it, so float64 data under x64, or bfloat16 params,
never change the scan's carry type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax import bptt, cudnn_lstm, regularizers
from rnn_jax.cells import Cell, Params, linear


def _mask_tree(valid, new, old):
  """where(valid, new, old) leaf by leaf: keep the old carry on padded steps."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(valid, n, o), new, old)


GRADS = ("auto", "manual", "autodiff")


@dataclasses.dataclass(frozen=True)
class ScanOptions:
  """How a recurrence is scanned and differentiated (one value, passed as ``options=``).

  Attributes:
    unroll: time steps per ``lax.scan`` iteration.
    grad: the gradient method: "auto" (the hand-derived BPTT of ``rnn_jax.bptt`` where a rule
      covers the cell, else autodiff), "manual" (require the hand-derived rule) or "autodiff"
      (``jax.grad`` through ``lax.scan``).
    remat_chunk: 0 keeps every step's activations; k > 0 checkpoints every k steps, so
      activation memory grows like T/k + k instead of T.
  """
  unroll: int = 1
  grad: str = "auto"
  remat_chunk: int = 0

  def __post_init__(self):
    if self.grad not in GRADS:
      raise ValueError(f"ScanOptions: unknown grad {self.grad!r}; expected one of {GRADS}")
    for name in ("unroll", "remat_chunk"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (1 if name == "unroll" else 0):
        raise ValueError(f"ScanOptions: {name} must be an integer >= {1 if name == 'unroll' else 0}, got {value!r}")


DEFAULT_OPTIONS = ScanOptions()


def _use_manual(cell: Cell, grad: str) -> bool:
  """Resolve ``grad``: True for the hand-derived BPTT, False for autodiff."""
  if grad == "auto":
    return bptt.supports(cell)
  return grad == "manual"


def _scan_steps(cell: Cell, params: Params, a: jax.Array, carry, mask, *, reverse: bool, unroll: int,
                manual: bool):
  """One lax.scan of the recurrence over a: [T, G*H] (or [T, B, G*H] with a batched carry)."""
  if manual:
    return bptt.manual_scan(cell, params, a, carry, mask, reverse=reverse, unroll=unroll)
  recurrence = cell.recurrence
  if a.ndim == 3:
    recurrence = jax.vmap(cell.recurrence, in_axes=(None, 0, 0))
  blocks = bptt.split_gates(a, cell.hidden_size)
  if mask is None:
    def body(carry, a_t):
      return recurrence(params, carry, bptt.join_gates(a_t))
    return jax.lax.scan(body, carry, blocks, reverse=reverse, unroll=unroll)

  def masked_body(carry, inputs):
    a_t, valid_t = inputs
    new_carry, h_t = recurrence(params, carry, bptt.join_gates(a_t))
    valid_t = valid_t if a.ndim == 2 else valid_t[:, None]
    return _mask_tree(valid_t, new_carry, carry), h_t

  return jax.lax.scan(masked_body, carry, (blocks, mask), reverse=reverse, unroll=unroll)


def _remat_scan(scan_chunk, a: jax.Array, carry, mask, chunk: int, reverse: bool):
  """Checkpoint every ``chunk`` steps: an outer scan over ceil(T/k) chunks under
  ``jax.checkpoint`` around ``scan_chunk`` (an inner scan of k steps).

  a: [T, ...] is what scan_chunk reads per step (input projections, or the inputs
  x_t when scan_chunk projects them itself). Only the carries at chunk boundaries
  are kept for the backward pass; each chunk's activations are recomputed when its
  gradient is needed, so activation memory is O(T/k + k) steps (O(sqrt(T)) for
  k ~ sqrt(T)) instead of O(T). T is padded to a multiple of k with masked (held)
  steps, which are dropped from hs.
  """
  T = a.shape[0]
  num_chunks = -(-T // chunk)
  pad = num_chunks * chunk - T
  if pad:
    if mask is None:
      mask = jnp.ones(a.shape[:-1], bool)
    a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)], axis=0)
    mask = jnp.concatenate([mask, jnp.zeros((pad,) + mask.shape[1:], bool)], axis=0)
  a = a.reshape((num_chunks, chunk) + a.shape[1:])
  if mask is not None:
    mask = mask.reshape((num_chunks, chunk) + mask.shape[1:])

  @jax.checkpoint
  def outer_body(carry, inputs):
    a_chunk, mask_chunk = inputs
    return scan_chunk(a_chunk, carry, mask_chunk)

  carry, hs = jax.lax.scan(outer_body, carry, (a, mask), reverse=reverse)
  hs = hs.reshape((num_chunks * chunk,) + hs.shape[2:])
  return carry, hs[:T]


def scan_recurrence(cell: Cell, params: Params, a: jax.Array, carry, mask=None, *,
                    reverse: bool = False, options: ScanOptions = DEFAULT_OPTIONS):
  """The scanned recurrence over precomputed input projections.

    for t in (0..T-1, or T-1..0 if reverse):
      carry_t, h_t = cell.recurrence(params, carry_{t-1}, a_t)   where mask_t
      carry_t = carry_{t-1}                                      where not mask_t

  Args:
    a: [T, G*H] for one example, or time-major [T, B, G*H] for a batch (then the
      carry leaves have a leading B axis and mask is [T, B]).
    carry: the initial carry.
    mask: optional [T] (or [T, B]) bool, True on real steps.
    reverse: scan t = T-1, ..., 0.
    options: unroll, the gradient method and remat (``ScanOptions``).
  Returns:
    (final carry, hs: [T, (B,) state_size]); hs on masked steps are unspecified.
  """
  if a.ndim not in (2, 3):
    raise ValueError(f"{cell.name}: a must have shape [T, G*H] or [T, B, G*H], got {tuple(a.shape)}")
  manual = _use_manual(cell, options.grad)

  def scan_chunk(a_chunk, carry_chunk, mask_chunk):
    return _scan_steps(cell, params, a_chunk, carry_chunk, mask_chunk, reverse=reverse, unroll=options.unroll,
                       manual=manual)

  if not options.remat_chunk:
    return scan_chunk(a, carry, mask)
  return _remat_scan(scan_chunk, a, carry, mask, options.remat_chunk, reverse)


def _project_and_scan(cell: Cell, params: Params, xs: jax.Array, carry, mask, *, reverse: bool,
                      options: ScanOptions):
  """a = W_xh xs + b (one matmul), then the scanned recurrence; xs: [T, F] or [T, B, F].

  With remat_chunk = k the projection moves inside each checkpointed chunk, so
  neither a: [T, (B,) G*H] nor its gradient is ever held for all T at once.
  """
  manual = _use_manual(cell, options.grad)
  unroll = options.unroll
  # The recurrence computes in the params' dtype (cells.py, "Precision"); inputs of another
  # dtype (float64 data under x64, integers, bfloat16 params) would change the carry's dtype
  # inside the scan.
  xs = xs.astype(params["w_xh"].dtype)
  if mask is not None:
    # Padded inputs never reach the recurrence, so junk there (even NaN or inf) cannot
    # leak into gradients through 0 * NaN in the masked steps' backward pass.
    xs = jnp.where(mask[..., None], xs, jnp.zeros((), xs.dtype))

  def scan_chunk(xs_chunk, carry_chunk, mask_chunk):
    if manual and bptt.fuses_input_gradient(cell, params, xs_chunk, carry_chunk):
      return bptt.projected_manual_scan(cell, params, xs_chunk, carry_chunk, mask_chunk, reverse=reverse,
                                        unroll=unroll)
    if manual and bptt.kernel_adds_bias(cell, params, xs_chunk, carry_chunk):
      # The CPU LSTM kernel adds b while it reads a_t, which spares XLA a pass over a.
      a = cell.input_projection(params, xs_chunk, bias=False)
      return bptt.manual_scan(cell, params, a, carry_chunk, mask_chunk, reverse=reverse, unroll=unroll,
                              input_bias=cell.projection_bias(params))
    a = cell.input_projection(params, xs_chunk)
    return _scan_steps(cell, params, a, carry_chunk, mask_chunk, reverse=reverse, unroll=unroll,
                       manual=manual)

  if not options.remat_chunk:
    return scan_chunk(xs, carry, mask)
  return _remat_scan(scan_chunk, xs, carry, mask, options.remat_chunk, reverse)


def run_cell(cell: Cell, params: Params, xs: jax.Array, length=None, *, initial_carry=None,
             reverse: bool = False, options: ScanOptions = DEFAULT_OPTIONS):
  """Run ``cell`` over one sequence: xs: [T, F] -> (carry at the true end, ys: [T, O]).

    a = W_xh xs + b                 one matmul for all T steps, before the scan
    carry_t, h_t = recurrence(carry_{t-1}, a_t)   inside lax.scan
    y_t = output(h_t), and y_t = 0 for t >= length

  Args:
    xs: [T, F] inputs of one example.
    length: optional scalar int, the number of real steps L (0 <= L <= T).
    initial_carry: optional carry; zeros if None.
    reverse: scan from the last real step back to t = 0.
    options: unroll, the gradient method and remat (``ScanOptions``).
  """
  check_inputs(cell.name, xs)
  if xs.ndim != 2:
    raise ValueError(f"{cell.name}: run_cell expects xs of shape [T, F], got {tuple(xs.shape)}")
  cell.check_params(params)
  check_lengths(cell.name, length, xs.shape[0])
  if initial_carry is None:
    carry = cell.initial_carry(params)
  else:
    reference = jax.eval_shape(cell.initial_carry, params)
    expected = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), reference)
    got = jax.tree_util.tree_map(lambda leaf: tuple(np.shape(leaf)), initial_carry)
    if jax.tree_util.tree_structure(initial_carry) != jax.tree_util.tree_structure(reference) or got != expected:
      raise ValueError(f"{cell.name}: run_cell reads one example; initial_carry must have shapes {expected} "
                       f"(no batch axis), got {got}")
    carry = _carry_like_cell(cell, params, initial_carry)
  mask = None if length is None else jnp.arange(xs.shape[0]) < length
  carry, hs = _project_and_scan(cell, params, xs, carry, mask, reverse=reverse, options=options)
  ys = cell.output(params, hs)
  if mask is not None:
    ys = jnp.where(mask[:, None], ys, jnp.zeros((), ys.dtype))
  return carry, ys


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_lengths(name: str, length, T: int) -> None:
  """A length must be an integer scalar; a concrete one must lie in [0, T] (a traced one's value
  cannot be checked, but its shape and dtype are)."""
  if length is None:
    return
  if not _is_concrete(length):
    if np.ndim(length) != 0:
      raise ValueError(f"{name}: length must be a scalar (the number of real steps), got shape {np.shape(length)}")
    if not jnp.issubdtype(length.dtype, jnp.integer):
      raise ValueError(f"{name}: length must be an integer, got dtype {length.dtype}")
    return
  value = np.asarray(length)
  if value.ndim != 0:
    raise ValueError(f"{name}: length must be a scalar (the number of real steps), got shape {value.shape}")
  if not np.issubdtype(value.dtype, np.integer):
    raise ValueError(f"{name}: length must be an integer, got {value.item()!r}")
  if not 0 <= int(value) <= T:
    raise ValueError(f"{name}: length must lie in [0, T={T}], got {int(value)}")


def check_inputs(name: str, xs) -> None:
  """xs must be a JAX or NumPy array of real numbers (floating, integer or bool; the recurrence casts
  them to the params' dtype)."""
  if not isinstance(xs, (jax.Array, np.ndarray)):
    raise ValueError(f"{name}: xs must be a jax or numpy array, got {type(xs).__name__}")
  if not (jnp.issubdtype(xs.dtype, jnp.floating) or jnp.issubdtype(xs.dtype, jnp.integer)
          or xs.dtype == jnp.bool_):
    raise ValueError(f"{name}: xs must hold real numbers, got dtype {xs.dtype}")


def check_batch(name: str, xs, lengths, *, time_major: bool = False) -> tuple[int, int]:
  """Validate a batch at the public boundary; returns (B, T).

  Raises ValueError naming the wrong value and the expected one: xs must be a real array of rank 3;
  lengths must be an integer vector of size B with 0 <= lengths <= T.
  """
  check_inputs(name, xs)
  if xs.ndim != 3:
    layout = "[T, B, F]" if time_major else "[B, T, F]"
    raise ValueError(f"{name}: xs must have shape {layout}, got shape {tuple(np.shape(xs))}")
  T, B = (xs.shape[0], xs.shape[1]) if time_major else (xs.shape[1], xs.shape[0])
  if lengths is not None:
    lengths_shape = tuple(np.shape(lengths))
    if lengths_shape != (B,):
      raise ValueError(f"{name}: lengths must have shape ({B},) to match the batch size, got {lengths_shape}")
    if not jnp.issubdtype(jnp.asarray(lengths).dtype, jnp.integer):
      raise ValueError(f"{name}: lengths must be integers, got dtype {jnp.asarray(lengths).dtype}")
    if _is_concrete(lengths):
      values = np.asarray(lengths)
      if values.size and (values.min() < 0 or values.max() > T):
        raise ValueError(f"{name}: lengths must lie in [0, T={T}], got min {values.min()} and max {values.max()}")
  return B, T


def _carry_in_axes(cell: Cell, params: Params, initial_carry, batch_size: Optional[int] = None) -> Any:
  """0 if initial_carry has a leading batch axis beyond the cell's carry, else None (broadcast).

  Raises ValueError unless initial_carry has the structure of ``cell.initial_carry``
  with every leaf of the cell's shape S (shared by all examples) or [B, *S].
  """
  reference_leaves, reference_def = jax.tree_util.tree_flatten(jax.eval_shape(cell.initial_carry, params))
  leaves, tree_def = jax.tree_util.tree_flatten(initial_carry)
  expected = [tuple(leaf.shape) for leaf in reference_leaves]
  shapes = [tuple(np.shape(leaf)) for leaf in leaves]
  if tree_def == reference_def:
    if shapes == expected:
      return None
    batch = batch_size if batch_size is not None else (shapes[0][:1] or (None,))[0]
    if shapes == [(batch,) + shape for shape in expected]:
      return 0
  batch_name = "B" if batch_size is None else f"B={batch_size}"
  raise ValueError(
      f"{cell.name}: initial_carry must have shapes {jax.tree_util.tree_unflatten(reference_def, expected)} "
      f"(shared) or with a leading batch axis {batch_name}, got {jax.tree_util.tree_unflatten(tree_def, shapes)}")


def _carry_like_cell(cell: Cell, params: Params, carry):
  """``carry`` with the dtypes of ``cell.initial_carry(params)`` (the recurrence's own), so that
  a carry of another float dtype cannot change the scan's carry type."""
  reference = jax.tree_util.tree_leaves(jax.eval_shape(cell.initial_carry, params))
  leaves, tree_def = jax.tree_util.tree_flatten(carry)
  return jax.tree_util.tree_unflatten(
      tree_def, [jnp.asarray(leaf).astype(ref.dtype) for leaf, ref in zip(leaves, reference)])


def _broadcast_carry(cell: Cell, params: Params, initial_carry, batch_size: int):
  """The initial carry with a leading B axis: zeros, a shared carry broadcast, or a batched one."""
  if initial_carry is None:
    initial_carry = cell.initial_carry(params)
  batched = _carry_in_axes(cell, params, initial_carry, batch_size) == 0
  initial_carry = _carry_like_cell(cell, params, initial_carry)
  if batched:
    return initial_carry
  return jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, (batch_size,) + leaf.shape),
                                initial_carry)


def rnn(cell: Cell, params: Params, xs: jax.Array, lengths=None, *, initial_carry=None,
        reverse: bool = False, time_major: bool = False, options: ScanOptions = DEFAULT_OPTIONS):
  """Run ``cell`` over a batch of sequences.

    ys[b], carry[b] = run_cell(cell, params, xs[b], lengths[b])   for every b

  Computed time-major inside: a = W_xh x + b for all [T, B] at once, then one
  lax.scan whose body is the batched recurrence (a [B, H] x [H, G*H] matmul).
  With remat_chunk = k, activation memory grows like T/k + k instead of T. On a GPU the
  plain float32 LSTM read forwards runs as one cuDNN layer instead (``rnn_jax.cudnn_lstm``;
  ``cudnn_lstm.reason`` says why not elsewhere; ``RNN_JAX_CUDNN=0`` turns it off).

  Args:
    xs: [B, T, F] (time_major=False) or [T, B, F] (time_major=True).
    lengths: optional [B] ints in [0, T]; see the module docstring for the padding rule.
    initial_carry: optional carry, unbatched (shared by all examples) or with a
      leading B axis; pass a params leaf to learn it.
    reverse: padding-aware reversal: example b is read from x_{L_b - 1} back to x_0.
    options: unroll, the gradient method and remat (``ScanOptions``).
  Returns:
    (final carry with leading B axis, ys: [B, T, O] or [T, B, O]).
  """
  B, T = check_batch(cell.name, xs, lengths, time_major=time_major)
  cell.check_params(params)
  carry = _broadcast_carry(cell, params, initial_carry, B)
  if cudnn_lstm.reason(cell, params, xs, reverse=reverse, grad=options.grad,
                       remat_chunk=options.remat_chunk) is None:
    carry, ys = cudnn_lstm.lstm_layer(params, jnp.swapaxes(xs, 0, 1) if time_major else xs, carry, lengths)
    return carry, (jnp.swapaxes(ys, 0, 1) if time_major else ys)
  xs_time_major = xs if time_major else jnp.swapaxes(xs, 0, 1)
  mask = None if lengths is None else jnp.arange(T)[:, None] < jnp.asarray(lengths)[None, :]
  carry, hs = _project_and_scan(cell, params, xs_time_major, carry, mask, reverse=reverse, options=options)
  ys = cell.output(params, hs)
  if mask is not None:
    ys = jnp.where(mask[:, :, None], ys, jnp.zeros((), ys.dtype))
  return carry, (ys if time_major else jnp.swapaxes(ys, 0, 1))


MERGES = ("concat", "sum")


def merge_directions(forward: jax.Array, backward: jax.Array, merge: str) -> jax.Array:
  """Per-step merge: concat -> [..., 2*O], sum -> [..., O]."""
  if merge == "concat":
    return jnp.concatenate([forward, backward], axis=-1)
  if merge == "sum":
    return forward + backward
  raise ValueError(f"unknown merge {merge!r}; expected one of {MERGES}")


def bidirectional(cell: Cell, params_forward: Params, params_backward: Params, xs: jax.Array,
                  lengths=None, *, merge: str = "concat", initial_carry=(None, None),
                  time_major: bool = False, backward_cell: Optional[Cell] = None,
                  options: ScanOptions = DEFAULT_OPTIONS):
  """Bidirectional RNN (Schuster & Paliwal 1997).

    ->h_t = forward RNN over x_0 .. x_{L-1};   <-h_t = backward RNN over x_{L-1} .. x_0
    y_t = [->h_t ; <-h_t] (concat) or ->h_t + <-h_t (sum); y_t = 0 for t >= L

  Returns ((forward final carry, backward final carry), ys). The backward final
  carry is its state after reading x_0. ``backward_cell`` is the cell of the reverse
  direction (default: ``cell``); ``options`` are those of ``rnn``.
  """
  if merge not in MERGES:
    raise ValueError(f"unknown merge {merge!r}; expected one of {MERGES}")
  if not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != 2:
    raise ValueError(f"{cell.name}: bidirectional initial_carry must be a (forward, backward) pair of carries "
                     f"(None for zeros), got {type(initial_carry).__name__}")
  backward_size = (backward_cell or cell).output_size
  if merge == "sum" and backward_size != cell.output_size:
    raise ValueError(f"{cell.name}: merge='sum' adds the two directions, so the backward cell's output size "
                     f"({backward_size}) must equal the forward cell's ({cell.output_size}); use merge='concat'")
  carry_f, ys_f = rnn(cell, params_forward, xs, lengths, initial_carry=initial_carry[0],
                      time_major=time_major, options=options)
  carry_b, ys_b = rnn(backward_cell or cell, params_backward, xs, lengths,
                      initial_carry=initial_carry[1], reverse=True, time_major=time_major, options=options)
  return (carry_f, carry_b), merge_directions(ys_f, ys_b, merge)


def dropout(key, rate: float, x: jax.Array) -> jax.Array:
  """Inverted dropout: x * m / (1 - rate), m ~ Bernoulli(1 - rate)."""
  if rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


@dataclasses.dataclass(frozen=True)
class StackedRNN:
  """A deep (stacked) RNN: layer l reads the outputs of layer l-1.

    x^(0) = xs;   x^(l+1) = RNN_l(dropout(x^(l)))  (+ x^(l) if residual and l >= 1)

  Attributes:
    cell: the cell hyper-parameters, shared by every layer (sizes per layer follow).
    num_layers: number of stacked layers.
    bidirectional: each layer is a forward and a padding-aware backward RNN.
    merge: "concat" or "sum" for the two directions.
    dropout: rate applied to the inputs of layers 1..L-1 (between layers), only with train=True.
    residual: add each layer's input to its output for layers l >= 1 (Wu et al. 2016).
    learn_initial_state: keep h_0 (and c_0) per layer and direction as trainable params.
    scan: how every layer is scanned and differentiated (``ScanOptions``).
    recurrent_dropout: p of recurrent dropout (Gal & Ghahramani 2016): one mask per sequence and
      example on h_{t-1} in the recurrent product, only with train=True (``rnn_jax.regularizers``).
    zoneout: p of zoneout on h (Krueger et al. 2017): fresh masks per step with train=True, the
      expectation h_t = p h_{t-1} + (1 - p) h~_t otherwise (and in ``step``).
    zoneout_cell: p_c of zoneout on the LSTM's cell state c.
    weight_dropout: p of DropConnect on W_hh (AWD-LSTM's weight drop): one mask per call, only
      with train=True.

  Params layout: {"layer_0": {"forward": cell params, "backward": ..., "initial_forward": carry}, ...}.
  """
  cell: Cell
  num_layers: int = 1
  bidirectional: bool = False
  merge: str = "concat"
  dropout: float = 0.0
  residual: bool = False
  learn_initial_state: bool = False
  scan: ScanOptions = DEFAULT_OPTIONS
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  zoneout_cell: float = 0.0
  weight_dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, (int, np.integer)) \
        or self.num_layers < 1:
      raise ValueError(f"StackedRNN: num_layers must be an integer >= 1, got {self.num_layers!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"StackedRNN: dropout must be in [0, 1), got {self.dropout}")
    if self.merge not in MERGES:
      raise ValueError(f"StackedRNN: unknown merge {self.merge!r}; expected one of {MERGES}")
    if not isinstance(self.scan, ScanOptions):
      raise ValueError(f"StackedRNN: scan must be a ScanOptions, got {self.scan!r}")
    self.regularizers.check("StackedRNN", self.cell, self.scan.grad)

  @property
  def regularizers(self) -> regularizers.Regularizers:
    """The rates of recurrent dropout, zoneout and DropConnect on W_hh."""
    return regularizers.Regularizers(self.recurrent_dropout, self.zoneout, self.zoneout_cell, self.weight_dropout)

  @property
  def directions(self) -> tuple[str, ...]:
    return ("forward", "backward") if self.bidirectional else ("forward",)

  @property
  def output_size(self) -> int:
    """Size of the last layer's y_t: O, or 2*O for a concatenated bidirectional layer."""
    width = self.cell.output_size
    return 2 * width if (self.bidirectional and self.merge == "concat") else width

  def init(self, key, input_size: int) -> Params:
    """Params for every layer and direction; layer l > 0 has input size ``output_size``."""
    params = {}
    for layer in range(self.num_layers):
      layer_input = input_size if layer == 0 else self.output_size
      layer_params = {}
      for direction in self.directions:
        key, sub = jax.random.split(key)
        layer_params[direction] = self.cell.init(sub, layer_input)
        if self.learn_initial_state:
          layer_params[f"initial_{direction}"] = self.cell.initial_carry(layer_params[direction])
      params[f"layer_{layer}"] = layer_params
    return params

  def initial_carries(self, params: Params, batch_size: Optional[int] = None) -> tuple:
    """Every layer's initial carry (learned, or zeros), with a leading B axis if ``batch_size`` is set.

    One carry per layer, a (forward, backward) pair per layer when bidirectional.
    """
    carries = []
    for layer in range(self.num_layers):
      layer_params = params[f"layer_{layer}"]
      per_direction = []
      for direction in self.directions:
        carry = layer_params.get(f"initial_{direction}")
        if carry is None:
          carry = self.cell.initial_carry(layer_params[direction])
        if batch_size is not None:
          carry = jax.tree_util.tree_map(lambda c: jnp.broadcast_to(c, (batch_size, *c.shape)), carry)
        per_direction.append(carry)
      carries.append(tuple(per_direction) if self.bidirectional else per_direction[0])
    return tuple(carries)

  def check_params(self, params: Params) -> None:
    """Raise ValueError unless params has every layer and direction ``init`` makes (each cell's
    own leaves are checked by the cell when the layer runs)."""
    if not isinstance(params, dict):
      raise ValueError(f"StackedRNN: params must be a dict of layers, got {type(params).__name__}")
    expected = [f"layer_{layer}" for layer in range(self.num_layers)]
    missing = [name for name in expected if not isinstance(params.get(name), dict)]
    problems = [f"missing {missing}"] if missing else []
    for name in expected:
      if name not in missing:
        absent = [d for d in self.directions if d not in params[name]]
        if absent:
          problems.append(f"{name} has no {absent}")
    if problems:
      raise ValueError(f"StackedRNN: params do not match {self.num_layers} layer(s) of directions "
                       f"{self.directions}: " + "; ".join(problems))

  def step(self, params: Params, carries: Sequence, x_t: jax.Array):
    """One time step of a unidirectional stack: (carries_{t-1}, x_t) -> (carries_t, y_t).

    x_t: [..., F] (any leading batch axes, matching the carries'); carries: one per layer, as
    returned by ``initial_carries`` or by ``__call__``. Decoding and generation call this once
    per produced token; no dropout is applied, and zoneout acts as its expectation.
    """
    if self.bidirectional:
      raise ValueError("StackedRNN.step: a bidirectional stack reads the whole sequence; it has no step")
    if len(carries) != self.num_layers:
      raise ValueError(f"StackedRNN.step: carries has {len(carries)} entries, expected one per layer "
                       f"({self.num_layers})")
    self.check_params(params)
    new_carries, inputs = [], x_t
    for layer in range(self.num_layers):
      layer_params = params[f"layer_{layer}"]["forward"]
      carry, outputs = self.regularizers.evaluation_cell(self.cell).step(layer_params, carries[layer], inputs)
      if self.residual and layer > 0:
        outputs = outputs + inputs
      new_carries.append(carry)
      inputs = outputs
    return tuple(new_carries), inputs

  def __call__(self, params: Params, xs: jax.Array, lengths=None, *, train: bool = False, rng=None,
               initial_carries: Optional[Sequence] = None, time_major: bool = False):
    """Run the stack: xs [B, T, F] -> (per-layer final carries, ys [B, T, output_size]).

    initial_carries: optional per-layer sequence of carries ((forward, backward)
    pairs when bidirectional); learned initial states are used when present.
    Each final carry is a carry (or a (forward, backward) pair) with a leading B axis.
    rng: the dropout key, needed when train=True and dropout (or a regulariser's rate) > 0.
    """
    if train and self.dropout > 0.0 and rng is None:
      raise ValueError("StackedRNN: train=True with dropout > 0 needs an rng key")
    regularized = self.regularizers.active(train)
    if train and self.regularizers.any:
      if rng is None:
        raise ValueError("StackedRNN: train=True with recurrent_dropout, zoneout or weight_dropout > 0 needs "
                         "an rng key")
      rng, regularizer_rng = jax.random.split(rng)
    if initial_carries is not None and len(initial_carries) != self.num_layers:
      raise ValueError(f"StackedRNN: initial_carries has {len(initial_carries)} entries, "
                       f"expected one per layer ({self.num_layers})")
    self.check_params(params)
    final_carries = []
    inputs = xs
    for layer in range(self.num_layers):
      layer_params = params[f"layer_{layer}"]
      if layer > 0 and train and self.dropout > 0.0:
        rng, sub = jax.random.split(rng)
        inputs = dropout(sub, self.dropout, inputs)
      starts = [layer_params.get(f"initial_{d}") for d in self.directions]
      if initial_carries is not None and initial_carries[layer] is not None:
        given = initial_carries[layer]
        starts = list(given) if self.bidirectional else [given]
      if regularized:
        key = jax.random.fold_in(regularizer_rng, layer) if train else None
        carry, outputs = self._regularized_layer(layer_params, inputs, lengths, starts, train=train, key=key,
                                                 time_major=time_major)
      elif self.bidirectional:
        carry, outputs = bidirectional(
            self.cell, layer_params["forward"], layer_params["backward"], inputs, lengths,
            merge=self.merge, initial_carry=tuple(starts), time_major=time_major, options=self.scan)
      else:
        carry, outputs = rnn(self.cell, layer_params["forward"], inputs, lengths,
                             initial_carry=starts[0], time_major=time_major, options=self.scan)
      if self.residual and layer > 0:
        outputs = outputs + inputs
      final_carries.append(carry)
      inputs = outputs
    return tuple(final_carries), inputs

  def _regularized_layer(self, layer_params: Params, inputs, lengths, starts, *, train: bool, key,
                         time_major: bool):
    """One layer with the regularisers (``rnn_jax.regularizers``): each direction its own key."""
    carries, outputs = [], []
    for index, direction in enumerate(self.directions):
      run = self.regularizers.prepare(self.cell, layer_params[direction], inputs, starts[index], train=train,
                                      key=None if key is None else jax.random.fold_in(key, index),
                                      time_major=time_major)
      carry, ys = rnn(run.cell, run.params, run.xs, lengths, initial_carry=run.carry,
                      reverse=direction == "backward", time_major=time_major, options=self.scan)
      carries.append(self.regularizers.unwrap(carry))
      outputs.append(ys)
    if not self.bidirectional:
      return carries[0], outputs[0]
    return tuple(carries), merge_directions(outputs[0], outputs[1], self.merge)
