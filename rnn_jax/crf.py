"""Linear-chain conditional random field over tag sequences (Lafferty et al. 2001), as the output
layer of a BiLSTM tagger (Huang, Xu & Yu 2015, "BI-LSTM-CRF"; Lample et al. 2016, "LSTM-CRF").

Notation. A batch of B sentences, padded to T steps, with K tags:

  U          emissions [B, T, K]: U[b, t, k] is the network's score of tag k at token t;
  A          transitions [K, K]: A[i, j] is the score of tag j following tag i;
  s, e       start [K] and end [K] scores of the first and the last tag;
  L          lengths [B] in [0, T]: steps t >= L_b are padding and never read.

The score of a tag sequence y = (y_1, ..., y_L) of one sentence (1-based t, as in the papers)

  score(y) = sum_{t=1..L} U[t, y_t] + sum_{t=2..L} A[y_{t-1}, y_t] + s[y_1] + e[y_L]

defines p(y | x) = exp(score(y)) / Z,  Z = sum over all K^L sequences y' of exp(score(y')).
log Z comes from the forward algorithm in log space, O(L K^2):

  alpha_1(k) = s[k] + U[1, k]
  alpha_t(k) = U[t, k] + logsumexp_i (alpha_{t-1}(i) + A[i, k])      t = 2..L
  log Z      = logsumexp_k (alpha_L(k) + e[k])

and the most probable sequence argmax_y score(y) from Viterbi's recursion, the same with max
for logsumexp, back-pointers bp_t(k) = argmax_i (delta_{t-1}(i) + A[i, k]) and a backtrace
y_L = argmax_k (delta_L(k) + e[k]),  y_{t-1} = bp_t(y_t).

Padding: both recursions run over all T steps with ``lax.scan``; at a padded step the forward
variables stay unchanged (and the back-pointers are the identity), so alpha_T = alpha_L and
nothing past L_b changes any result. Padded emissions are zeroed before use, so even NaN
there cannot reach a result or a gradient. A sentence of length 0 has one (empty) tag
sequence: score 0, log Z 0, NLL 0, and its decoded tags are all 0.

Constraints: ``iob2_constraints(tag_names)`` gives the transitions the IOB2 scheme forbids
(``O -> I-X``, ``B-X / I-X -> I-Y`` for Y != X, and a sentence starting with ``I-X``);
``constrain`` replaces those scores by ``FORBIDDEN`` (-1e4, so that exp(score) underflows to 0
but nothing becomes inf or NaN). Every function computes in float32 or wider.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax.layers import check_token_ids

FORBIDDEN = -1e4


def _prepare(emissions, lengths, transitions, start, end):
  """Checked shapes; emissions, transitions, start, end in a float32-or-wider dtype; mask [B, T]."""
  emissions = jnp.asarray(emissions)
  if emissions.ndim != 3:
    raise ValueError(f"crf: emissions must have shape [B, T, K], got {tuple(emissions.shape)}")
  batch, steps, num_tags = emissions.shape
  dtype = jnp.promote_types(emissions.dtype, jnp.float32)
  transitions = jnp.asarray(transitions)
  if tuple(transitions.shape) != (num_tags, num_tags):
    raise ValueError(f"crf: transitions must have shape [K, K] = {(num_tags, num_tags)}, "
                     f"got {tuple(transitions.shape)}")
  zeros = jnp.zeros((num_tags,), dtype)
  start = zeros if start is None else jnp.asarray(start)
  end = zeros if end is None else jnp.asarray(end)
  for name, value in (("start", start), ("end", end)):
    if tuple(value.shape) != (num_tags,):
      raise ValueError(f"crf: {name} must have shape [K] = ({num_tags},), got {tuple(value.shape)}")
  lengths = jnp.asarray(lengths)
  if tuple(lengths.shape) != (batch,):
    raise ValueError(f"crf: lengths must have shape [B] = ({batch},), got {tuple(lengths.shape)}")
  if not isinstance(lengths, jax.core.Tracer):
    values = np.asarray(lengths)
    if values.size and (values.min() < 0 or values.max() > steps):
      raise ValueError(f"crf: lengths must lie in [0, T={steps}], got min {values.min()} and max "
                       f"{values.max()}")
  mask = jnp.arange(steps)[None, :] < lengths[:, None]
  emissions = jnp.where(mask[..., None], emissions.astype(dtype), 0)
  return emissions, lengths, transitions.astype(dtype), start.astype(dtype), end.astype(dtype), mask


def score(emissions, tags, lengths, transitions, start=None, end=None) -> jax.Array:
  """score(y) = sum_{t<=L} U[t, y_t] + sum_{2<=t<=L} A[y_{t-1}, y_t] + s[y_1] + e[y_L] per sentence.

  Args:
    emissions: U [B, T, K].
    tags: y [B, T] integers in [0, K); entries at t >= L are ignored.
    lengths: L [B] in [0, T].
    transitions: A [K, K] (row: previous tag, column: next tag).
    start, end: s, e [K], or None for zeros.
  Returns: [B]; 0 for a sentence of length 0.
  """
  emissions, lengths, transitions, start, end, mask = _prepare(emissions, lengths, transitions, start, end)
  num_tags = emissions.shape[-1]
  tags = jnp.asarray(tags)
  if tuple(tags.shape) != tuple(emissions.shape[:2]):
    raise ValueError(f"crf.score: tags must have shape [B, T] = {tuple(emissions.shape[:2])}, "
                     f"got {tuple(tags.shape)}")
  check_token_ids(jnp.where(mask, tags, 0) if not isinstance(tags, jax.core.Tracer) else tags, num_tags,
                  "crf.score: tags")
  tags = jnp.where(mask, tags, 0).astype(jnp.int32)
  if emissions.shape[1] == 0:
    return jnp.zeros(emissions.shape[:1], emissions.dtype)
  unary = jnp.take_along_axis(emissions, tags[..., None], axis=-1)[..., 0].sum(axis=1)
  pairs = transitions[tags[:, :-1], tags[:, 1:]]
  binary = jnp.sum(jnp.where(mask[:, 1:], pairs, 0), axis=1)
  last = jnp.take_along_axis(tags, jnp.maximum(lengths - 1, 0)[:, None].astype(jnp.int32), axis=1)[:, 0]
  boundary = jnp.where(lengths > 0, start[tags[:, 0]] + end[last], 0)
  return unary + binary + boundary


def log_partition(emissions, lengths, transitions, start=None, end=None) -> jax.Array:
  """log Z per sentence by the forward algorithm in log space (see the module docstring): [B].

  A ``lax.scan`` over t = 2..T updates alpha only where t <= L, so padding changes nothing;
  log Z = 0 for a sentence of length 0 (its one, empty, sequence has score 0).
  """
  emissions, lengths, transitions, start, end, mask = _prepare(emissions, lengths, transitions, start, end)
  if emissions.shape[1] == 0:
    return jnp.zeros(emissions.shape[:1], emissions.dtype)
  alpha = start[None, :] + emissions[:, 0]                                      # [B, K]

  def step(alpha, inputs):
    emission, real = inputs                                                    # [B, K], [B]
    updated = jax.nn.logsumexp(alpha[:, :, None] + transitions[None], axis=1) + emission
    return jnp.where(real[:, None], updated, alpha), None

  alpha, _ = jax.lax.scan(step, alpha, (jnp.swapaxes(emissions[:, 1:], 0, 1), mask[:, 1:].T))
  return jnp.where(lengths > 0, jax.nn.logsumexp(alpha + end[None, :], axis=-1), 0)


def nll(emissions, tags, lengths, transitions, start=None, end=None) -> jax.Array:
  """Negative log-likelihood -log p(y | x) = log Z - score(y) per sentence, in nats: [B] (>= 0)."""
  return (log_partition(emissions, lengths, transitions, start, end)
          - score(emissions, tags, lengths, transitions, start, end))


def viterbi(emissions, lengths, transitions, start=None, end=None) -> tuple[jax.Array, jax.Array]:
  """The highest-scoring tag sequence of each sentence and its score.

    delta_1(k) = s[k] + U[1, k]
    delta_t(k) = U[t, k] + max_i (delta_{t-1}(i) + A[i, k]),  bp_t(k) = argmax_i (...)   t = 2..L
    y_L = argmax_k (delta_L(k) + e[k]),  y_{t-1} = bp_t(y_t)

  A forward ``lax.scan`` keeps delta and stacks the back-pointers bp_t [B, K] (the identity at
  padded steps, so the backtrace passes y_L unchanged through the padding); a reverse scan
  follows them back. Ties go to the lowest tag id.

  Returns: (tags [B, T] int32, 0 at t >= L; best score [B], 0 for a sentence of length 0).
  """
  emissions, lengths, transitions, start, end, mask = _prepare(emissions, lengths, transitions, start, end)
  batch, steps, num_tags = emissions.shape
  if steps == 0:
    return jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch,), emissions.dtype)
  identity = jnp.broadcast_to(jnp.arange(num_tags, dtype=jnp.int32), (batch, num_tags))
  delta = start[None, :] + emissions[:, 0]

  def forward(delta, inputs):
    emission, real = inputs
    candidates = delta[:, :, None] + transitions[None]                        # [B, K_prev, K]
    pointers = jnp.argmax(candidates, axis=1).astype(jnp.int32)
    updated = jnp.max(candidates, axis=1) + emission
    return (jnp.where(real[:, None], updated, delta),
            jnp.where(real[:, None], pointers, identity))

  delta, pointers = jax.lax.scan(forward, delta, (jnp.swapaxes(emissions[:, 1:], 0, 1), mask[:, 1:].T))
  final = delta + end[None, :]
  last = jnp.argmax(final, axis=-1).astype(jnp.int32)
  best = jnp.where(lengths > 0, jnp.max(final, axis=-1), 0)

  def backward(tag, pointer):                                                 # tag y_t, pointer bp_t
    return jnp.take_along_axis(pointer, tag[:, None], axis=1)[:, 0], tag

  first, rest = jax.lax.scan(backward, last, pointers, reverse=True)          # rest[t-1] = y_t
  tags = jnp.concatenate([first[:, None], rest.T], axis=1)
  return jnp.where(mask, tags, 0), best


def iob2_constraints(tag_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """The tag sequences IOB2 allows: (allowed transitions [K, K] bool, allowed first tags [K] bool).

  In IOB2 every entity starts with B-X, so I-X may follow only B-X or I-X (not O, nor a tag
  of another type) and no sentence starts with I-X. Raises ValueError for a tag that is not
  "O", "B-X" or "I-X".
  """
  parsed = []
  for name in tag_names:
    prefix, _, kind = str(name).partition("-")
    if name != "O" and (prefix not in ("B", "I") or not kind):
      raise ValueError(f"iob2_constraints: tag names must be 'O', 'B-TYPE' or 'I-TYPE', got {name!r}")
    parsed.append(("O", "") if name == "O" else (prefix, kind))
  num_tags = len(parsed)
  allowed = np.ones((num_tags, num_tags), bool)
  for j, (prefix, kind) in enumerate(parsed):
    if prefix == "I":
      allowed[:, j] = [previous != "O" and previous_kind == kind for previous, previous_kind in parsed]
  allowed_start = np.array([prefix != "I" for prefix, _ in parsed], bool)
  return allowed, allowed_start


def constrain(transitions, start, allowed: Optional[np.ndarray], allowed_start: Optional[np.ndarray]):
  """(A, s) with the forbidden entries replaced by ``FORBIDDEN``; those entries get no gradient."""
  if allowed is not None:
    transitions = jnp.where(jnp.asarray(allowed), transitions, FORBIDDEN)
  if allowed_start is not None:
    start = jnp.where(jnp.asarray(allowed_start), start, FORBIDDEN)
  return transitions, start


def count_forbidden(tag_sequences: Sequence[Sequence[int]], allowed: np.ndarray,
                    allowed_start: np.ndarray) -> int:
  """How many of the tag-id sequences hold a transition (or a first tag) that the constraints
  forbid; such a sequence would have probability ~0 under the constrained CRF."""
  allowed, allowed_start = np.asarray(allowed, bool), np.asarray(allowed_start, bool)
  count = 0
  for tags in tag_sequences:
    tags = np.asarray(tags, np.int64)
    if tags.size and (not allowed_start[tags[0]] or not np.all(allowed[tags[:-1], tags[1:]])):
      count += 1
  return count
