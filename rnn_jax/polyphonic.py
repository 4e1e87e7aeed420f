"""Polyphonic sequence models: an RNN over multi-hot frames with independent sigmoid outputs.

Each frame x_t in {0, 1}^K (K pitches; a piano-roll column) is predicted from the
frames before it (Boulanger-Lewandowski et al. 2012; Chung et al. 2014, section 4):

    h_t = RNN(x_{t-1}, h_{t-1}),   x_0 = 0 (an all-silent frame starts every sequence)
    o_t = W_hy h_t + b_y                                          [K]
      or, with a deep output (DO-RNN, Pascanu et al. 2013),
    o_t = W_hy phi(V_k ... phi(V_1 h_t + c_1) ... + c_k) + b_y     (layers.deep_output)
    p(x_t | x_<t) = prod_k sigma(o_tk)^x_tk (1 - sigma(o_tk))^(1 - x_tk)

The loss is the negative log-likelihood per time step, -1/T sum_t log p(x_t | x_<t)
(``losses.sigmoid_nll``), in nats. Generation (one-to-many) feeds a seed chord and then
each sampled frame back as the next input.

Comparing cells at equal size (Chung et al. 2014 compare tanh, GRU and LSTM networks of
about the same number of parameters, e.g. 100 tanh, 46 GRU and 36 LSTM units for about
20k parameters on the music data): ``equal_parameter_sizes`` gives each cell the largest
hidden size whose FrameModel has no more parameters than a reference cell's with H units.
``nll_per_step`` evaluates a whole split of variable-length sequences.

Initial output bias: ``marginal_log_odds`` gives b_y at which sigma(b_y) is each key's
frequency in the training frames (``FrameModel.init(key, output_bias=...)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

import numpy as np

from rnn_jax import cells as cells_lib
from rnn_jax import layers, losses, mesh
from rnn_jax.cells import Cell
from rnn_jax.sequence import StackedRNN


@dataclasses.dataclass(frozen=True)
class FrameModel:
  """A (stacked) RNN with a sigmoid read-out over K pitches per frame.

  With a deep-transition cell (``rnn_jax.deep_transition``: "dt_rnn", "dts_rnn") and
  ``output_layer_sizes`` this is the DOT-RNN / DOT(S)-RNN of Pascanu et al. 2013.

  Attributes:
    cell: the recurrent cell (its hidden size H).
    num_pitches: K, the frame width.
    num_layers: stacked RNN layers.
    dropout: between stacked layers, training only.
    output_layer_sizes: D_1 .. D_k of the read-out's intermediate layers (deep output);
      () is the plain read-out o_t = W_hy h_t + b_y.
    output_activation: phi of those layers.
    recurrent_dropout, zoneout, zoneout_cell, weight_dropout: the stack's regularisers of the
      recurrent connection (``StackedRNN``, ``rnn_jax.regularizers``; 0 = off).
  """
  cell: Cell
  num_pitches: int = 88
  num_layers: int = 1
  dropout: float = 0.0
  output_layer_sizes: tuple[int, ...] = ()
  output_activation: str = "tanh"
  recurrent_dropout: float = 0.0
  zoneout: float = 0.0
  zoneout_cell: float = 0.0
  weight_dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "output_layer_sizes", layers.check_deep_output(
        "FrameModel", self.output_layer_sizes, self.output_activation))

  @property
  def rnn(self) -> StackedRNN:
    return StackedRNN(self.cell, num_layers=self.num_layers, dropout=self.dropout,
                      recurrent_dropout=self.recurrent_dropout, zoneout=self.zoneout,
                      zoneout_cell=self.zoneout_cell, weight_dropout=self.weight_dropout)

  def init(self, key, output_bias=None) -> dict:
    """Params {"rnn": StackedRNN params (input K), "readout": {w: [K, D_k or H], b: [K]} (+ the deep
    output's {"hidden_1": {w, b}, ...})}.

    output_bias: the initial b_y [K], e.g. ``marginal_log_odds`` of the training frames; None
    keeps ``layers.deep_output_init``'s U(+-1/sqrt(fan_in)).
    """
    key_rnn, key_out = jax.random.split(key)
    readout = layers.deep_output_init(key_out, self.cell.output_size, self.num_pitches,
                                      self.output_layer_sizes)
    if output_bias is not None:
      output_bias = jnp.asarray(output_bias, readout["b"].dtype)
      if output_bias.shape != readout["b"].shape:
        raise ValueError(f"FrameModel.init: output_bias must have shape ({self.num_pitches},), "
                         f"got {tuple(output_bias.shape)}")
      readout["b"] = output_bias
    return {"rnn": self.rnn.init(key_rnn, self.num_pitches), "readout": readout}

  def readout(self, params: dict, h: jax.Array) -> jax.Array:
    """o_t from h_t: [..., H] -> [..., K] (``layers.deep_output``; ``layers.dense`` without layers)."""
    return layers.deep_output(params["readout"], h, self.output_activation)

  def _check_frames(self, frames: jax.Array) -> None:
    if frames.ndim != 3 or frames.shape[-1] != self.num_pitches:
      raise ValueError(f"FrameModel: frames must have shape [B, T, {self.num_pitches}], "
                       f"got {tuple(frames.shape)}")

  def __call__(self, params: dict, batch: dict, *, train: bool = False, rng=None) -> jax.Array:
    """o_t for every frame from the frames before it: batch {"frames": [B, T, K], optional
    "lengths": [B]} -> logits [B, T, K].

    The inputs are the frames shifted right by one step: (0, x_1, ..., x_{T-1}).
    """
    frames, lengths = batch["frames"], batch.get("lengths")
    self._check_frames(frames)
    inputs = jnp.concatenate([jnp.zeros_like(frames[:, :1]), frames[:, :-1]], axis=1)
    _, hidden = self.rnn(params["rnn"], inputs.astype(jnp.float32), lengths, train=train,
                         rng=rng)
    return self.readout(params, hidden)

  def nll(self, params: dict, frames: jax.Array, lengths=None, *, train: bool = False,
          rng=None) -> jax.Array:
    """-1/N sum_{b, t < L_b} log p(x_bt | x_b<t), N the number of real frames (nats per time step)."""
    logits = self(params, {"frames": frames, "lengths": lengths}, train=train, rng=rng)
    mask = None if lengths is None else jnp.arange(frames.shape[1])[None, :] < lengths[:, None]
    return losses.sigmoid_nll(logits, frames, mask)

  def generate(self, params: dict, seed_frame: jax.Array, num_frames: int, key) -> jax.Array:
    """Sample a sequence that starts with ``seed_frame``: [K] -> frames [num_frames, K] (float 0/1),
    or B sequences at once: [B, K] -> [B, num_frames, K].

      x_1 = seed;  x_{t+1} ~ Bernoulli(sigma(o_{t+1})) given x_1..x_t, each pitch independently

    One jitted ``lax.scan`` over the frames (compiled once per model, num_frames and seed shape;
    no host round trip per frame).
    """
    seed_frame = jnp.asarray(seed_frame)
    if seed_frame.ndim not in (1, 2) or seed_frame.shape[-1] != self.num_pitches:
      raise ValueError(f"FrameModel.generate: seed_frame must have shape ({self.num_pitches},) or "
                       f"[B, {self.num_pitches}], got {tuple(seed_frame.shape)}")
    if num_frames < 1:
      raise ValueError(f"FrameModel.generate: num_frames must be >= 1, got {num_frames}")
    return _generate(self, params, seed_frame.astype(jnp.float32), key, int(num_frames))


@functools.partial(jax.jit, static_argnames=("model", "num_frames"))
def _generate(model: FrameModel, params: dict, seed: jax.Array, key, num_frames: int) -> jax.Array:
  """``FrameModel.generate`` under jit: seed [(B,) K] -> frames [(B,) num_frames, K]."""
  stack = model.rnn
  batch = seed.shape[0] if seed.ndim == 2 else None

  def advance(carries, x):
    carries, h = stack.step(params["rnn"], carries, x)
    return carries, model.readout(params, h)

  carries, _ = advance(stack.initial_carries(params["rnn"], batch), jnp.zeros_like(seed))

  def body(state, uniform):
    carries, previous = state
    carries, logits = advance(carries, previous)
    frame = (uniform < jax.nn.sigmoid(logits)).astype(jnp.float32)
    return (carries, frame), frame

  # Bernoulli(p) draws are u < p with u ~ U[0, 1) (jax.random.bernoulli's own definition, so the
  # samples are the same): the uniforms of every frame come from one vectorised call before the
  # loop instead of one small threefry loop per frame.
  step_keys = jax.random.split(key, num_frames - 1)
  uniforms = jax.vmap(lambda step_key: jax.random.uniform(step_key, seed.shape, jnp.float32))(step_keys)
  _, sampled = jax.lax.scan(body, (carries, seed), uniforms)
  frames = jnp.concatenate([seed[None], sampled], axis=0)
  return frames if batch is None else jnp.swapaxes(frames, 0, 1)


# ---------------------------------------------------------------------------
# Sizes at equal parameter count, and the NLL of a whole split
# ---------------------------------------------------------------------------

def count_params(model: FrameModel) -> int:
  """The number of scalar parameters of ``model`` (from shapes only; nothing is initialised)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)))


def equal_parameter_sizes(cell_names: Sequence[str], hidden_size: int, *, reference: str = "lstm",
                          num_pitches: int = 88, num_layers: int = 1, output_layer_sizes: tuple = (),
                          cell_options: Optional[Mapping[str, dict]] = None) -> dict[str, int]:
  """{cell: H_cell}: for each cell the largest hidden size whose FrameModel has at most as many
  parameters as the ``reference`` cell's FrameModel with ``hidden_size`` units.

    H_cell = max {H >= 1 : P_cell(H) <= P_reference(hidden_size)}      (the reference keeps hidden_size)

  P is increasing in H, so H_cell is found by bisection. With 88 pitches and an LSTM of 36
  units (21,256 parameters) this gives GRU 43 and tanh 81 units, close to Chung et al. 2014's
  46 and 100 for their 20k-parameter models.

  Every model, the reference's included, has the read-out ``output_layer_sizes`` (a deep output
  counts in every budget alike); ``cell_options`` gives a cell's extra hyper-parameters by name,
  e.g. {"dt_rnn": {"transition_sizes": (64,)}} (a deep-transition cell without them has one
  intermediate layer of H units, so its size grows with H like the others').
  """
  if hidden_size < 1:
    raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
  cell_options = dict(cell_options or {})
  size_of = lambda name, H: count_params(FrameModel(cells_lib.make_cell(name, H, **cell_options.get(name, {})),
                                                    num_pitches=num_pitches, num_layers=num_layers,
                                                    output_layer_sizes=tuple(output_layer_sizes)))
  budget = size_of(reference, hidden_size)
  sizes = {}
  for name in cell_names:
    if name == reference:
      sizes[name] = hidden_size
      continue
    low, high = 1, 2
    while size_of(name, high) <= budget:
      low, high = high, 2 * high
    while high - low > 1:   # P(low) <= budget < P(high), or low = 1
      middle = (low + high) // 2
      low, high = (middle, high) if size_of(name, middle) <= budget else (low, middle)
    sizes[name] = low
  return sizes


def marginal_log_odds(rolls, num_pitches: int = 88, prior: float = 0.5) -> np.ndarray:
  """Each key's log-odds of sounding in ``rolls`` ([T_i, K] arrays): b [K] float32.

    p_k = (n_k + prior) / (N + 2 prior),   b_k = log p_k - log(1 - p_k)

  n_k: frames where key k sounds, N: frames in all. With b_y = b and h-independent logits the
  frame model predicts each key at its training frequency (the add-1/2 estimate keeps keys
  that never sound finite: about -10 nats for 12k frames). Setting an output bias to the
  prior's log-odds is the initialisation of Lin et al. 2017 ("Focal loss for dense object
  detection"); here it spares training the first phase from sigma(o) = 1/2 on all 88 keys
  (~61 nats per frame), whose large gradients otherwise drive the tanh units under the
  read-out into saturation (docs/results.md, music).
  """
  if not len(rolls):
    raise ValueError("marginal_log_odds: no sequences (the split is empty)")
  if prior <= 0:
    raise ValueError(f"marginal_log_odds: prior must be > 0, got {prior}")
  bad = [tuple(np.shape(r)) for r in rolls if np.ndim(r) != 2 or np.shape(r)[1] != num_pitches]
  if bad:
    raise ValueError(f"marginal_log_odds: rolls must have shape [T, {num_pitches}], got {bad[0]}")
  counts = np.sum([np.asarray(r, np.float64).sum(axis=0) for r in rolls], axis=0)
  frames = float(sum(len(r) for r in rolls))
  p = (counts + prior) / (frames + 2 * prior)
  return (np.log(p) - np.log1p(-p)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _jitted_nll(model: FrameModel):
  return mesh.data_parallel(jax.jit(lambda params, frames, lengths: model.nll(params, frames, lengths)))


def nll_per_step(model: FrameModel, params: dict, rolls, batch_size: int, pad_multiple: int = 16) -> float:
  """NLL per time step over every frame of ``rolls`` ([T_i, K] arrays), in nats.

    -1/N sum_i sum_{t < T_i} log p(x_it | x_i<t),   N = sum_i T_i

  Rolls are sorted by length and evaluated ``batch_size`` at a time; each batch's mean is
  weighted by its number of real frames, so the result does not depend on the batching.
  """
  if not len(rolls):
    raise ValueError("nll_per_step: no sequences (the split is empty)")
  nll = _jitted_nll(model)
  ordered = sorted(rolls, key=len)
  total = frames = 0.0
  for start in range(0, len(ordered), batch_size):
    chunk = ordered[start:start + batch_size]
    longest = max(len(r) for r in chunk)
    width = int(-(-longest // pad_multiple) * pad_multiple)
    batch = np.zeros((len(chunk), width, model.num_pitches), np.float32)
    lengths = np.asarray([len(r) for r in chunk], np.int32)
    for row, roll in enumerate(chunk):
      batch[row, :len(roll)] = roll
    count = float(lengths.sum())
    total += float(nll(params, jnp.asarray(batch), jnp.asarray(lengths))) * count
    frames += count
  return total / frames
