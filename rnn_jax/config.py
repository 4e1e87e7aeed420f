"""Typed experiment configurations: frozen dataclasses with documented fields, presets and checks.

An experiment declares its settings once, as a frozen dataclass whose fields carry their
help text and constraints::

  @dataclasses.dataclass(frozen=True)
  class Config(TrainingConfig):
    dataset: str = field("ptb_char", "ptb_char, shakespeare or file:PATH.", fixed=True)
    hidden_size: int = field(256, "Hidden size H of each layer.", minimum=1, fixed=True)
    learning_rate: float = 6e-3          # a new default; help and checks come from TrainingConfig

  PRESETS = {"ptb_lstm": dict(hidden_size=1000, num_layers=2, steps=40000)}
  config = resolve(Config, presets=PRESETS, preset="ptb_lstm", explicit={"hidden_size": 128})

``resolve`` applies the layers in the order defaults < preset < smoke < explicit values, so a
value the user typed always wins, then ``check`` validates every field (type, choices,
minimum, the class's own ``validate``) and raises ``ValueError`` naming the field.

Fields marked ``fixed`` define the architecture or the data: a resumed run must keep them
(``resumed``). Everything here is plain Python; ``experiments/common.py`` binds the fields to
absl flags of the same names.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping, Optional, Sequence

_MISSING = dataclasses.MISSING


def field(default, help: str, *, choices: Optional[Sequence] = None, minimum: Optional[float] = None,
          maximum: Optional[float] = None, fixed: bool = False):
  """A config field with its help text and constraints.

  choices: the accepted values; minimum / maximum: inclusive numeric bounds (for tuples, of
  each element); fixed: part of the architecture or data, so a resume may not change it.
  """
  if isinstance(default, (list, dict, set)):
    raise TypeError(f"config field defaults must be immutable; use a tuple, got {default!r}")
  metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
              "minimum": minimum, "maximum": maximum, "fixed": fixed}
  return dataclasses.field(default=default, metadata=metadata)


def field_info(cls, name: str) -> dict:
  """help, choices, minimum, maximum and fixed of field ``name``, looked up through the class's
  bases so that a subclass redeclaring only a default keeps the base's documentation."""
  for klass in getattr(cls, "__mro__", (type(cls),)):
    for f in getattr(klass, "__dataclass_fields__", {}).values():
      if f.name == name and f.metadata.get("help"):
        return dict(f.metadata)
  return {"help": "", "choices": None, "minimum": None, "maximum": None, "fixed": False}


def field_types(cls) -> dict[str, Any]:
  """{name: resolved type annotation} of a config class's fields."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def element_type(annotation) -> Optional[type]:
  """int for tuple[int, ...], str for tuple[str, ...]; None if ``annotation`` is no tuple."""
  if typing.get_origin(annotation) is tuple:
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return args[0] if args else str
  return None


def fixed_fields(cls) -> tuple[str, ...]:
  """The fields a resumed run may not change."""
  return tuple(f.name for f in dataclasses.fields(cls) if field_info(cls, f.name)["fixed"])


def to_dict(config) -> dict:
  """{field: value} of a config (tuples stay tuples; ``json`` writes them as lists)."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _coerce(cls, name: str, value):
  """``value`` as the field's type: JSON lists become tuples, ints become floats for float fields."""
  annotation = field_types(cls)[name]
  inner = element_type(annotation)
  if inner is not None and isinstance(value, (list, tuple)):
    return tuple(float(v) if inner is float and isinstance(v, int) and not isinstance(v, bool) else v
                 for v in value)
  if annotation is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def from_dict(cls, values: Mapping[str, Any], *, strict: bool = True):
  """Build ``cls`` from a dict; unknown keys raise ValueError (or are ignored with strict=False)."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown and strict:
    raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(names)}")
  return cls(**{k: _coerce(cls, k, v) for k, v in values.items() if k in names})


def _check_value(cls, name: str, value, annotation) -> None:
  info = field_info(cls, name)
  inner = element_type(annotation)
  items = value if inner is not None else (value,)
  expected = inner if inner is not None else annotation
  if inner is not None and not isinstance(value, tuple):
    raise ValueError(f"{name} must be a tuple of {inner.__name__}, got {value!r}")
  for item in items:
    if expected is bool:
      ok = isinstance(item, bool)
    elif expected is int:
      ok = isinstance(item, int) and not isinstance(item, bool)
    elif expected is float:
      ok = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
    elif expected is str:
      ok = isinstance(item, str)
    else:
      ok = True
    if not ok:
      kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[expected]
      raise ValueError(f"{name} must be {kind}{' (each element)' if inner is not None else ''}, got {item!r}")
    if info["choices"] is not None and item not in info["choices"]:
      raise ValueError(f"{name}={item!r} is not one of {list(info['choices'])}")
    if info["minimum"] is not None and item < info["minimum"]:
      raise ValueError(f"{name} must be >= {info['minimum']:g}, got {item!r}")
    if info["maximum"] is not None and item > info["maximum"]:
      raise ValueError(f"{name} must be <= {info['maximum']:g}, got {item!r}")


def check(config):
  """Validate every field (type, choices, bounds) and the class's own ``validate()``; returns config."""
  cls = type(config)
  for name, annotation in field_types(cls).items():
    _check_value(cls, name, getattr(config, name), annotation)
  validate = getattr(config, "validate", None)
  if callable(validate):
    validate()
  return config


def resolve(cls, *, presets: Optional[Mapping[str, Mapping]] = None, preset: Optional[str] = None,
            smoke: bool = False, smoke_values: Optional[Mapping] = None,
            explicit: Optional[Mapping] = None):
  """The config of a run: defaults < preset < smoke < explicit values, then ``check``.

  ``explicit`` holds only the values the user gave (on the command line or in code), so a
  preset or the smoke settings never replace them.
  """
  presets = presets or {}
  values: dict = {}
  if preset:
    if preset not in presets:
      raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(presets)}")
    values.update(presets[preset])
  if smoke:
    values.update(smoke_values or {})
  values.update(explicit or {})
  return check(from_dict(cls, {**to_dict(cls()), **values}))


def resumed(cls, saved: Mapping[str, Any], explicit: Optional[Mapping] = None) -> tuple[Any, list[str]]:
  """The config of a resumed run: the saved config with ``explicit`` changes to non-fixed fields.

  Returns (config, notes), one note per changed field. Raises ValueError naming each fixed
  field (architecture or data) whose value would change.
  """
  config = from_dict(cls, saved, strict=False)
  explicit = {k: _coerce(cls, k, v) for k, v in (explicit or {}).items()}
  from_dict(cls, explicit)  # unknown names fail here
  fixed = set(fixed_fields(cls))
  refused = {k: (getattr(config, k), v) for k, v in explicit.items() if k in fixed and getattr(config, k) != v}
  if refused:
    listed = ", ".join(f"{k} (saved {old!r}, given {new!r})" for k, (old, new) in sorted(refused.items()))
    raise ValueError(f"a resumed run keeps its architecture and data; cannot change {listed}")
  notes = [f"{k}: {getattr(config, k)!r} -> {v!r}" for k, v in sorted(explicit.items())
           if getattr(config, k) != v]
  return check(dataclasses.replace(config, **explicit)), notes


@dataclasses.dataclass(frozen=True)
class RecurrentRegularizerConfig:
  """The regularisers of the recurrent connection (0 = off): recurrent dropout, zoneout and DropConnect on
  W_hh, one flag each for every model built on ``rnn_jax.sequence.StackedRNN`` (``rnn_jax.regularizers``).

  A config class lists it beside TrainingConfig, ``class Config(TrainingConfig, RecurrentRegularizerConfig)``,
  and hands ``regularizer_options()`` to its model; models that read tokens take ``RegularizerConfig``.
  """
  recurrent_dropout: float = field(0.0, "Recurrent dropout (Gal & Ghahramani 2016): one mask per sequence (or "
                                   "window) and example on h_{t-1} where it enters W_hh h_{t-1}.",
                                   minimum=0.0, maximum=0.99)
  zoneout: float = field(0.0, "Zoneout on h (Krueger et al. 2017): each unit keeps h_{t-1} with this "
                         "probability, fresh per step; evaluation uses the expectation.", minimum=0.0,
                         maximum=0.99, fixed=True)
  zoneout_cell: float = field(0.0, "Zoneout on the LSTM's cell state c (Krueger et al. 2017 use 0.5 on c, "
                              "0.05 on h).", minimum=0.0, maximum=0.99, fixed=True)
  weight_dropout: float = field(0.0, "DropConnect on W_hh (AWD-LSTM's weight drop, Merity et al. 2017): one "
                                "mask per batch (or window).", minimum=0.0, maximum=0.99)

  def regularizer_options(self) -> dict:
    """The rates as keyword arguments of the models (LanguageModel, SequenceTagger, SentenceClassifier,
    FrameModel)."""
    return {field_.name: getattr(self, field_.name) for field_ in dataclasses.fields(self)
            if field_.name in REGULARIZER_FIELDS}

  def regularizer_summary(self) -> str:
    """", recurrent dropout 0.25, zoneout 0.05 (c 0.5), weight dropout 0.5" for the rates in use; "" if none."""
    parts = []
    if self.recurrent_dropout:
      parts.append(f"recurrent dropout {self.recurrent_dropout:g}")
    if self.zoneout or self.zoneout_cell:
      parts.append(f"zoneout {self.zoneout:g}" + (f" (c {self.zoneout_cell:g})" if self.zoneout_cell else ""))
    if self.weight_dropout:
      parts.append(f"weight dropout {self.weight_dropout:g}")
    if getattr(self, "embedding_dropout", 0.0):
      parts.append(f"embedding dropout {self.embedding_dropout:g}")
    return "".join(", " + part for part in parts)


@dataclasses.dataclass(frozen=True)
class RegularizerConfig(RecurrentRegularizerConfig):
  """The recurrent regularisers and embedding dropout: one flag vocabulary for every model that reads
  tokens through ``rnn_jax.layers.TokenRNN``."""
  embedding_dropout: float = field(0.0, "Embedding dropout (Gal & Ghahramani 2016): the rate of whole word "
                                   "types zeroed in the embedding, one mask per batch (or window; training "
                                   "only).", minimum=0.0, maximum=0.99)


REGULARIZER_FIELDS = ("recurrent_dropout", "zoneout", "zoneout_cell", "weight_dropout", "embedding_dropout")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """The settings every gradient-trained experiment shares (the one flag vocabulary).

  clip = 0 turns clipping off everywhere. steps = 0 means "train for ``epochs`` epochs".
  eval_every = 0 evaluates once per epoch (and at the end); checkpoint_every = 0 saves at each
  evaluation and at the end only.
  """
  optimizer: str = field("adam", "Optimiser.", choices=("sgd", "momentum", "adam", "adamw", "rmsprop"))
  learning_rate: float = field(1e-3, "Peak learning rate.", minimum=0.0)
  schedule: str = field("constant", "Learning-rate schedule: constant, step (x decay_rate per epoch "
                        "after decay_start_epoch) or cosine (linear warmup, cosine decay to 0).",
                        choices=("constant", "step", "cosine"))
  warmup_steps: int = field(0, "Linear warmup steps of the cosine schedule.", minimum=0)
  decay_start_epoch: int = field(0, "Epochs at the full rate before the step schedule decays.", minimum=0)
  decay_rate: float = field(1.0, "Factor of the step schedule per epoch after decay_start_epoch.",
                            minimum=0.0, maximum=1.0)
  clip: float = field(0.0, "Gradient clipping threshold; 0 turns clipping off.", minimum=0.0)
  clip_mode: str = field("norm", "Clip the global norm or each value.", choices=("norm", "value"))
  weight_decay: float = field(0.0, "Weight decay (decoupled for adamw, coupled L2 otherwise).", minimum=0.0)
  batch_size: int = field(32, "Examples (or parallel streams) per training batch.", minimum=1, fixed=True)
  steps: int = field(0, "Training steps; 0 trains for `epochs` epochs.", minimum=0)
  epochs: float = field(1.0, "Training epochs, used when steps is 0.", minimum=0.0)
  eval_every: int = field(0, "Steps between validations; 0 validates once per epoch.", minimum=0)
  checkpoint_every: int = field(0, "Steps between checkpoints; 0 saves at validations and at the end.",
                                minimum=0)
  keep: int = field(2, "Latest checkpoints kept, besides the best one.", minimum=1)
  log_every: int = field(50, "Steps between training log lines.", minimum=1)
  seed: int = field(0, "Seed of the initialisation, the data order, dropout and sampling.")
  num_devices: int = field(0, "Devices of the data-parallel mesh (the batch is split over them); 0 uses "
                           "every local device.", minimum=0)

  def validate(self) -> None:
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.steps == 0 and self.epochs <= 0:
      raise ValueError(f"epochs must be > 0 when steps is 0, got {self.epochs}")
    if self.schedule == "cosine" and self.steps and self.steps <= self.warmup_steps:
      raise ValueError(f"steps={self.steps} must exceed warmup_steps={self.warmup_steps} for the cosine "
                       f"schedule")
