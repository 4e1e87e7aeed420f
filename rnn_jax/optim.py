"""Optimisers and learning-rate schedules: optax chains built from a few named choices.

  schedule  = make_schedule("cosine", 2e-3, warmup_steps=100, total_steps=8000)
  optimizer = make_optimizer("adam", schedule, clip=1.0)        # clipping inside the chain

``schedule_horizons`` lets a resumed run train longer than planned without a jump in the
learning rate: the cosine schedule of the first ``total_steps`` is kept up to the resume
step s, and from there the rate decays along a new cosine from eta(s) to 0 at the new total.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
CLIP_MODES = ("norm", "value")


def make_schedule(kind: str, learning_rate: float, *, steps_per_epoch: Optional[int] = None,
                  decay_start_epoch: Optional[int] = None, decay_rate: Optional[float] = None,
                  warmup_steps: int = 0, total_steps: Optional[int] = None,
                  horizons: Sequence[Sequence[int]] = ()) -> optax.Schedule:
  """A learning-rate schedule eta(step).

  constant: eta(s) = lr.
  step:     Zaremba et al. (2014): the rate is constant for the first ``decay_start_epoch``
            epochs, then multiplied by ``decay_rate`` after every further epoch:
              epoch e = s // steps_per_epoch (0-based),
              eta(s) = lr * decay_rate ** max(0, e + 1 - decay_start_epoch).
            (small: lr 1, decay_start_epoch 4, decay_rate 0.5 -> epochs 1-4 at 1, epoch 5 at 0.5, ...)
  cosine:   linear warmup from 0 to lr over ``warmup_steps``, then cosine decay to 0 at
            ``total_steps``: eta(s) = lr/2 (1 + cos(pi (s - w) / (S - w))).
            ``horizons`` [(s_1, S_1), (s_2, S_2), ...]: from step s_k on, the rate decays along a
            cosine from its value at s_k to 0 at S_k (a resumed run that trains longer).
  """
  if learning_rate <= 0 or not math.isfinite(learning_rate):
    raise ValueError(f"make_schedule: learning_rate must be a positive number, got {learning_rate}")
  if kind == "constant":
    return optax.constant_schedule(learning_rate)
  if kind == "step":
    if not steps_per_epoch or steps_per_epoch <= 0:
      raise ValueError(f"make_schedule('step'): steps_per_epoch must be a positive int, "
                       f"got {steps_per_epoch}")
    if decay_start_epoch is None or decay_start_epoch < 0:
      raise ValueError(f"make_schedule('step'): decay_start_epoch must be >= 0, got {decay_start_epoch}")
    if decay_rate is None or not 0.0 < decay_rate <= 1.0:
      raise ValueError(f"make_schedule('step'): decay_rate must be in (0, 1], got {decay_rate}")

    def step_schedule(step):
      epoch = jnp.asarray(step) // steps_per_epoch
      exponent = jnp.maximum(0, epoch + 1 - decay_start_epoch)
      return learning_rate * jnp.power(decay_rate, exponent.astype(jnp.float32))
    return step_schedule
  if kind == "cosine":
    if not total_steps or total_steps <= warmup_steps:
      raise ValueError(f"make_schedule('cosine'): total_steps must exceed warmup_steps={warmup_steps}, "
                       f"got {total_steps}")
    if warmup_steps < 0:
      raise ValueError(f"make_schedule('cosine'): warmup_steps must be >= 0, got {warmup_steps}")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=0.0)
    for start, total in horizons:
      if not 0 <= start < total:
        raise ValueError(f"make_schedule('cosine'): a horizon (start {start}, total {total}) needs "
                         f"0 <= start < total")
      tail = optax.cosine_decay_schedule(float(schedule(start)), decay_steps=total - start)
      schedule = optax.join_schedules([schedule, tail], [start])
    return schedule
  raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


def make_optimizer(name: str, learning_rate, *, clip: float = 0.0, clip_mode: str = "norm",
                   momentum: float = 0.9, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """An optax chain: [clip] -> optimiser (with ``learning_rate`` a float or a schedule).

  clip = 0 (or None): no clipping. clip_mode "norm": g <- g * min(1, clip / ||g||_2), ||g|| the
  global norm over all leaves (Pascanu et al. 2013; Zaremba et al. 2014 use clip = 5).
  clip_mode "value": g <- clamp(g, -clip, clip) elementwise.
  Optimisers: sgd, momentum (heavy ball, ``momentum``), adam, adamw (decoupled ``weight_decay``),
  rmsprop. ``weight_decay`` > 0 with other optimisers adds the coupled L2 term wd * theta to g.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  if clip_mode not in CLIP_MODES:
    raise ValueError(f"unknown clip_mode {clip_mode!r}; expected one of {CLIP_MODES}")
  clip = clip or 0.0
  if not (clip >= 0 and math.isfinite(clip)):
    raise ValueError(f"clip must be >= 0 (0 turns clipping off), got {clip}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f"learning_rate must be positive, got {learning_rate}")
  chain = []
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip) if clip_mode == "norm" else optax.clip(clip))
  if weight_decay and name != "adamw":
    chain.append(optax.add_decayed_weights(weight_decay))
  if name == "sgd":
    chain.append(optax.sgd(learning_rate))
  elif name == "momentum":
    chain.append(optax.sgd(learning_rate, momentum=momentum))
  elif name == "adam":
    chain.append(optax.adam(learning_rate))
  elif name == "adamw":
    chain.append(optax.adamw(learning_rate, weight_decay=weight_decay))
  elif name == "rmsprop":
    chain.append(optax.rmsprop(learning_rate))
  return optax.chain(*chain)


def from_config(config, *, steps_per_epoch: int, total_steps: int,
                horizons: Sequence[Sequence[int]] = ()) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """(schedule, optimizer) described by a ``rnn_jax.config.TrainingConfig``."""
  schedule = make_schedule(config.schedule, config.learning_rate, steps_per_epoch=steps_per_epoch,
                           decay_start_epoch=config.decay_start_epoch, decay_rate=config.decay_rate,
                           warmup_steps=config.warmup_steps, total_steps=total_steps, horizons=horizons)
  optimizer = make_optimizer(config.optimizer, schedule, clip=config.clip, clip_mode=config.clip_mode,
                             weight_decay=config.weight_decay)
  return schedule, optimizer
