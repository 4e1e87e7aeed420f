"""Weight exchange with PyTorch, flax.linen, Keras 3 and safetensors files.

Every converter checks the weights both ways: a missing, unexpected or mis-shaped weight
raises ValueError naming each one with its shape, and an option with no counterpart on the
other side raises ValueError naming the option. torch, flax and keras are imported only by
the functions that need objects of them; the safetensors functions need none of the three.

Notation: F input features, H hidden size, G gates (Elman 1, GRU 3, LSTM 4), P = proj_size or
H, D = 2 for a bidirectional layer else 1, l the layer. Ours use the math layout [out, in]
with gate blocks of H rows in PyTorch's order (rnn_jax.cells): w_xh [G*H, F], w_hh [G*H, P].

PyTorch ``nn.RNN`` (tanh, relu), ``nn.LSTM`` (with ``proj_size``), ``nn.GRU``
------------------------------------------------------------------------------
Layer l, direction d is ``params[f"layer_{l}"][d]`` (d = "forward", "backward"); torch names
carry the suffix ``_l{l}`` and, for the backward direction, ``_reverse``::

  weight_ih_l{l}  [G*H, F_l] = w_xh        F_0 = F, F_l = D*P for l >= 1
  weight_hh_l{l}  [G*H, P]   = w_hh
  weight_hr_l{l}  [P, H]     = w_hr        (LSTM with proj_size = P)
  Elman, LSTM:  b [G*H] = bias_ih + bias_hh          to torch: bias_ih = b, bias_hh = 0
  GRU:  b [3H] = [b_ir + b_hr, b_iz + b_hz, b_in],  b_hn [H] = bias_hh[2H:3H]
        to torch: bias_ih = b, bias_hh = [0, 0, b_hn]

The GRU's n-gate biases stay apart because torch computes n = tanh(W_in x + b_in +
r * (W_hn h + b_hn)). A sum with a zero term returns the other term unchanged (even -0.0),
so ours -> torch -> ours is bit-exact. ``bias=False`` modules import with zero biases.
``batch_first`` changes no weight: a ``batch_first=False`` module takes [T, B, F], which
is ``StackedRNN(..., time_major=True)``. ``dropout`` between layers becomes
``StackedRNN.dropout``.

flax.linen ``SimpleCell``, ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell``
---------------------------------------------------------------------------
One Dense per gate with kernel [in, out]; block k of ours is rows k*H:(k+1)*H::

  SimpleCell   w_xh = i.kernel^T [H, F],  w_hh = h.kernel^T [H, H],  b = i.bias
  LSTMCell     w_xh[k] = i{k}.kernel^T,  w_hh[k] = h{k}.kernel^T,  b[k] = h{k}.bias
               k = i, f, g, o (the input Denses have no bias); OptimizedLSTMCell: same names
  GRUCell      w_xh[k] = i{k}.kernel^T,  w_hh[k] = h{k}.kernel^T,  b[k] = i{k}.bias
               k = r, z, n;  b_hn = hn.bias

Flax's LSTM carry is (c, h); ours is ``LSTMState(h, c)``: ``to_flax_carry`` and
``from_flax_carry`` convert.

Keras 3 ``SimpleRNN``, ``LSTM``, ``GRU``
----------------------------------------
``layer.get_weights()`` is [kernel [F, G*H], recurrent_kernel [H, G*H], bias] with gate
blocks as columns::

  SimpleRNN, LSTM (i, f, c, o = ours i, f, g, o):  w_xh = kernel^T,  w_hh = recurrent_kernel^T,
      b = bias [G*H]
  GRU: Keras column blocks are z, r, h; ours r, z, n, so ours = Keras blocks (1, 0, 2).
      reset_after=True: bias [2, 3H] = (input bias, recurrent bias):
          b = [in_r + rec_r, in_z + rec_z, in_h],  b_hn = rec_h
          to Keras: input bias = [b_z, b_r, b_n], recurrent bias = [0, 0, b_hn]
      reset_after=False: bias [3H], n = tanh(W_xn x + b_h + W_hn (r * h)):
          b = [b_r, b_z, b_h], b_hn = 0;   to Keras: b_h = b_n + b_hn
  SimpleRNN activation "linear" is ours "identity".

safetensors files
-----------------
``save_safetensors`` writes the PyTorch names above (``weight_ih_l0``, ..., ``_reverse``) and
a JSON description of the layer in the header metadata under ``"rnn_jax"``::

  {"format": "rnn_jax.stacked_rnn/1", "layer": {"type": "StackedRNN", ..., "cell": {"type":
   "lstm", "hidden_size": H, ...}}, "input_size": F, "dtype": "float32", "bias": true}

so the file loads into torch with ``safetensors.torch.load_file`` and
``module.load_state_dict(..., strict=True)``, and back into rnn_jax with
``load_safetensors`` without torch. ``load_safetensors`` treats the file as untrusted:
only the layer classes above are built, every field is type-checked, and every tensor's
name, shape and dtype must be the ones the described layer expects.

Untrusted files. Nothing rnn_jax reads runs code from the file: safetensors and orbax
checkpoints hold no pickle, and a PyTorch file is read by ``load_torch`` only through
``torch.load(weights_only=True)``, which refuses (ValueError) any object but tensors and plain
containers instead of unpickling it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from rnn_jax.cells import GRU, LSTM, Cell, Elman, LSTMState, Params
from rnn_jax.sequence import StackedRNN

__all__ = [
    "from_torch", "load_torch", "to_torch", "torch_module",
    "from_flax", "to_flax", "flax_cell", "to_flax_carry", "from_flax_carry",
    "from_keras", "to_keras",
    "save_safetensors", "load_safetensors",
]

_KINDS = {Elman: "elman", LSTM: "lstm", GRU: "gru"}
_CELL_CLASSES = {"elman": Elman, "lstm": LSTM, "gru": GRU}
_GATES = {"elman": 1, "lstm": 4, "gru": 3}
_PARAM_DTYPES = ("float32", "bfloat16", "float64", "float16")
_TARGETS = {"torch": "PyTorch", "flax": "flax.linen", "keras": "Keras"}
_LIST_LIMIT = 8


# ---------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------

def _kind(cell) -> str:
  kind = _KINDS.get(type(cell))
  if kind is None:
    raise ValueError(f"cell must be an rnn_jax Elman, LSTM or GRU, got {type(cell).__name__}")
  return kind


def _to_numpy(value, name: str) -> np.ndarray:
  """A weight as a numpy array (torch tensors on any device, jax arrays, Keras variables)."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):   # torch.Tensor
    tensor = value.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
      return tensor.float().numpy().astype(jnp.bfloat16)   # exact: bfloat16 is a subset of float32
    value = tensor.numpy()
  array = np.asarray(value)
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"{name} must hold floating-point weights, got dtype {array.dtype}")
  return array


def _shape(value) -> tuple:
  return tuple(int(n) for n in np.shape(value))


def _listing(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_LIST_LIMIT])
  return shown + (f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


def _compare(where: str, expected: Mapping[str, tuple], got: Mapping[str, tuple], hint: str = "") -> None:
  """Raise ValueError naming every missing, unexpected and mis-shaped entry."""
  missing = [f"{k} {list(v)}" for k, v in expected.items() if k not in got]
  unexpected = [f"{k} {list(got[k])}" for k in sorted(got) if k not in expected]
  wrong = [f"{k} is {list(got[k])}, expected {list(v)}" for k, v in expected.items()
           if k in got and tuple(got[k]) != tuple(v)]
  if missing or unexpected or wrong:
    parts = []
    if missing:
      parts.append(f"missing {_listing(missing)}")
    if unexpected:
      parts.append(f"unexpected {_listing(unexpected)}")
    if wrong:
      parts.append(f"wrong shape: {_listing(wrong)}")
    raise ValueError(f"{where}: {'; '.join(parts)}{hint}")


def _common_dtype(arrays: Mapping[str, Any], where: str) -> np.dtype:
  dtypes = sorted({np.dtype(a.dtype).name for a in arrays.values()})
  if len(dtypes) != 1:
    raise ValueError(f"{where}: weights mix dtypes {dtypes}; expected one dtype")
  return np.dtype(next(iter(arrays.values())).dtype)


def _dtype_name(dtype) -> str:
  """The dtype name our params will have (float64 becomes float32 unless jax_enable_x64)."""
  name = jnp.dtype(jax.dtypes.canonicalize_dtype(dtype)).name
  if name not in _PARAM_DTYPES:
    raise ValueError(f"weights have dtype {name}; expected one of {_PARAM_DTYPES}")
  return name


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a + b, returning a itself where b == 0 (keeps -0.0, so split-and-sum is bit-exact)."""
  return np.where(b == 0, a, a + b).astype(a.dtype)


@functools.lru_cache(maxsize=256)
def _cell_shapes(cell: Cell, input_size: int) -> dict:
  """The names and shapes of ``cell.init``'s params (initialisers cannot change them, and
  some cannot build every shape, e.g. "orthogonal" with a projection, so plain ones are used)."""
  cell = dataclasses.replace(cell, recurrent_init="torch", spectral_radius=None, input_init="torch")
  shapes = jax.eval_shape(lambda key: cell.init(key, input_size), jax.random.key(0))
  return {name: tuple(s.shape) for name, s in shapes.items()}


def _check_cell_params(cell: Cell, params, input_size: int, where: str) -> None:
  if not isinstance(params, Mapping):
    raise ValueError(f"{where} must be a dict of arrays, got {type(params).__name__}")
  _compare(f"{where} (for {cell.name} with hidden_size={cell.hidden_size}, input_size={input_size})",
           _cell_shapes(cell, input_size), {k: _shape(v) for k, v in params.items()})


def _input_size(params, where: str) -> int:
  w_xh = params.get("w_xh") if isinstance(params, Mapping) else None
  if w_xh is None or np.ndim(w_xh) != 2:
    raise ValueError(f"{where} needs w_xh of shape [G*H, F], got {None if w_xh is None else _shape(w_xh)}")
  return int(np.shape(w_xh)[1])


def _as_stack(layer, params):
  """(StackedRNN, stack params); a bare cell is a one-layer, one-direction stack."""
  if isinstance(layer, StackedRNN):
    return layer, params
  if isinstance(layer, Cell):
    return StackedRNN(layer), {"layer_0": {"forward": params}}
  raise ValueError(f"layer must be an rnn_jax StackedRNN or cell, got {type(layer).__name__}")


def _check_stack_params(layer: StackedRNN, params) -> int:
  """Check params against ``layer.init``'s structure and shapes; returns the input size F."""
  if not isinstance(params, Mapping):
    raise ValueError(f"params must be a dict {{'layer_0': ...}}, got {type(params).__name__}")
  names = [f"layer_{l}" for l in range(layer.num_layers)]
  _compare("params", {n: () for n in names}, {n: () for n in params})
  input_size = _input_size(params["layer_0"].get("forward") if isinstance(params["layer_0"], Mapping)
                           else None, "params['layer_0']['forward']")
  for l, name in enumerate(names):
    layer_params = params[name]
    if not isinstance(layer_params, Mapping):
      raise ValueError(f"params['{name}'] must be a dict of directions, got {type(layer_params).__name__}")
    _compare(f"params['{name}']", {d: () for d in layer.directions}, {d: () for d in layer_params})
    for direction in layer.directions:
      _check_cell_params(layer.cell, layer_params[direction], input_size if l == 0 else layer.output_size,
                         f"params['{name}']['{direction}']")
  return input_size


def _check_portable(layer_or_cell, target: str, name: str = "") -> None:
  """Raise ValueError naming every option that ``target`` has no counterpart for."""
  problems = []
  cell = layer_or_cell
  if isinstance(layer_or_cell, StackedRNN):
    cell = layer_or_cell.cell
    if layer_or_cell.residual:
      problems.append("residual=True")
    if layer_or_cell.bidirectional and layer_or_cell.merge != "concat":
      problems.append(f"merge={layer_or_cell.merge!r}")
    if layer_or_cell.learn_initial_state:
      problems.append("learn_initial_state=True")
  kind = _kind(cell)
  if kind == "elman":
    if cell.readout_size is not None:
      problems.append(f"readout_size={cell.readout_size}")
    if target == "torch" and cell.activation not in ("tanh", "relu"):
      problems.append(f"activation={cell.activation!r} (torch's nonlinearity is 'tanh' or 'relu')")
  elif kind == "lstm":
    if cell.peephole:
      problems.append("peephole=True")
    if cell.layer_norm:
      problems.append("layer_norm=True")
    if target != "torch" and cell.proj_size is not None:
      problems.append(f"proj_size={cell.proj_size}")
  elif target in ("torch", "flax") and not cell.reset_after:
    problems.append("reset_after=False")
  if problems:
    verb = "has" if len(problems) == 1 else "have"
    raise ValueError(f"{cell.name}: {', '.join(problems)} {verb} no {name or _TARGETS[target]} counterpart")


def _resolve_cell(where: str, kind: str, hidden_size: int, template, dtype_name: str, **found) -> Cell:
  """The cell the weights describe: ``template`` checked against them, or a new cell."""
  if isinstance(template, Cell):
    if _kind(template) != kind:
      raise ValueError(f"{where}: cell={type(template).__name__} but the weights are a {kind}")
    mismatched = [f"{k}={getattr(template, k)!r} (the weights have {v!r})"
                  for k, v in {"hidden_size": hidden_size, **found}.items() if getattr(template, k) != v]
    if mismatched:
      raise ValueError(f"{where}: cell has {', '.join(mismatched)}")
    return template
  return _CELL_CLASSES[kind](hidden_size, param_dtype=dtype_name, **found)


def _zero_bias_check(params, kind: str, where: str, option: str) -> None:
  for name in ("b", "b_hn") if kind == "gru" else ("b",):
    if np.any(np.asarray(params[name]) != 0):
      raise ValueError(f"{where}['{name}'] is not zero, but {option} would drop it; "
                       f"export with the bias")


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

_TORCH_MODES = {"RNN_TANH": ("elman", "tanh"), "RNN_RELU": ("elman", "relu"), "LSTM": ("lstm", None),
                "GRU": ("gru", None)}
_TORCH_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


def _torch_suffix(l: int, direction: str) -> str:
  return f"_l{l}" + ("_reverse" if direction == "backward" else "")


def _torch_shapes(layer: StackedRNN, input_size: int, bias: bool) -> dict:
  """torch's state_dict names and shapes for ``layer``, in torch's order."""
  cell = layer.cell
  rows = _GATES[_kind(cell)] * cell.hidden_size
  shapes = {}
  for l in range(layer.num_layers):
    features = input_size if l == 0 else layer.output_size
    for direction in layer.directions:
      s = _torch_suffix(l, direction)
      shapes[f"weight_ih{s}"] = (rows, features)
      shapes[f"weight_hh{s}"] = (rows, cell.state_size)
      if bias:
        shapes[f"bias_ih{s}"] = (rows,)
        shapes[f"bias_hh{s}"] = (rows,)
      if getattr(cell, "proj_size", None):
        shapes[f"weight_hr{s}"] = (cell.proj_size, cell.hidden_size)
  return shapes


def _stack_to_torch_arrays(layer: StackedRNN, params, bias: bool) -> dict:
  kind, H = _kind(layer.cell), layer.cell.hidden_size
  arrays = {}
  for l in range(layer.num_layers):
    for direction in layer.directions:
      p = {k: np.array(v) for k, v in params[f"layer_{l}"][direction].items()}
      s = _torch_suffix(l, direction)
      arrays[f"weight_ih{s}"] = p["w_xh"]
      arrays[f"weight_hh{s}"] = p["w_hh"]
      if bias:
        arrays[f"bias_ih{s}"] = p["b"]
        bias_hh = np.zeros_like(p["b"])
        if kind == "gru":
          bias_hh[2 * H:] = p["b_hn"]
        arrays[f"bias_hh{s}"] = bias_hh
      else:
        _zero_bias_check(p, kind, f"params['layer_{l}']['{direction}']", "bias=False")
      if "w_hr" in p:
        arrays[f"weight_hr{s}"] = p["w_hr"]
  return arrays


def _stack_from_torch_arrays(layer: StackedRNN, arrays: Mapping[str, np.ndarray], bias: bool) -> Params:
  kind, H = _kind(layer.cell), layer.cell.hidden_size
  params = {}
  for l in range(layer.num_layers):
    layer_params = {}
    for direction in layer.directions:
      s = _torch_suffix(l, direction)
      w_xh = arrays[f"weight_ih{s}"]
      p = {"w_xh": w_xh, "w_hh": arrays[f"weight_hh{s}"]}
      if bias:
        b_ih, b_hh = arrays[f"bias_ih{s}"], arrays[f"bias_hh{s}"]
      else:
        b_ih = b_hh = np.zeros(w_xh.shape[:1], w_xh.dtype)
      if kind == "gru":
        p["b"] = np.concatenate([_add(b_ih[:2 * H], b_hh[:2 * H]), b_ih[2 * H:]])
        p["b_hn"] = b_hh[2 * H:]
      else:
        p["b"] = _add(b_ih, b_hh)
      if f"weight_hr{s}" in arrays:
        p["w_hr"] = arrays[f"weight_hr{s}"]
      layer_params[direction] = {k: jnp.asarray(v) for k, v in p.items()}
    params[f"layer_{l}"] = layer_params
  return params


def _torch_kind(cell, nonlinearity: str) -> tuple[str, Optional[str]]:
  """(kind, activation) from a cell name or template for a state_dict."""
  if isinstance(cell, Cell):
    kind = _kind(cell)
    return kind, getattr(cell, "activation", None)
  names = {"rnn_tanh": ("elman", "tanh"), "rnn_relu": ("elman", "relu"), "lstm": ("lstm", None),
           "gru": ("gru", None), "rnn": ("elman", nonlinearity), "elman": ("elman", nonlinearity)}
  if cell is None:
    raise ValueError("from_torch: a state_dict does not say which cell it holds: pass cell='rnn_tanh', "
                     "'rnn_relu', 'lstm' or 'gru' (or an rnn_jax cell)")
  if not isinstance(cell, str) or cell.lower() not in names:
    raise ValueError(f"from_torch: unknown cell {cell!r}; expected one of {tuple(names)} or an rnn_jax cell")
  kind, activation = names[cell.lower()]
  if kind == "elman" and activation not in ("tanh", "relu"):
    raise ValueError(f"from_torch: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
  return kind, activation


def _is_torch_module(value) -> bool:
  return hasattr(value, "state_dict") and hasattr(value, "named_parameters") and callable(value.state_dict)


def _gate_hint(state: Mapping, hidden_size: int, kind: str) -> str:
  rows = _shape(state.get("weight_ih_l0", ()))
  if len(rows) == 2 and hidden_size and rows[0] % hidden_size == 0:
    gates = rows[0] // hidden_size
    named = {g: k for k, g in _GATES.items()}.get(gates)
    if named and named != kind:
      return f" (weight_ih_l0 has {gates} x hidden_size rows: a {named} state_dict, not a {kind})"
  return ""


def from_torch(module_or_state_dict, *, cell: Union[str, Cell, None] = None, nonlinearity: str = "tanh",
               dropout: Optional[float] = None, prefix: str = "") -> tuple[StackedRNN, Params]:
  """A torch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (or its state_dict) as ``(StackedRNN, params)``.

  The mapping is the module docstring's: w_xh = weight_ih_l{l} [G*H, F_l], w_hh =
  weight_hh_l{l} [G*H, P], w_hr = weight_hr_l{l} [P, H]; b = bias_ih + bias_hh (GRU: b =
  [b_ir + b_hr, b_iz + b_hz, b_in] and b_hn = bias_hh[2H:]). ``bias=False`` gives zero
  biases. ``batch_first=False`` modules correspond to calling the stack with
  ``time_major=True``. float64 weights stay float64 only under ``jax_enable_x64``.

  Args:
    module_or_state_dict: a torch module, or a mapping of torch names to tensors or arrays
      (e.g. ``module.state_dict()`` or ``safetensors.numpy.load_file(path)``).
    cell: for a state_dict, which cell it holds: "rnn_tanh", "rnn_relu", "lstm", "gru"
      ("rnn"/"elman" with ``nonlinearity``), or an rnn_jax cell whose other hyper-parameters
      (initialisers, compute dtype) are kept; its sizes must match the weights. With a module
      it may be an rnn_jax cell to keep, checked against the module.
    nonlinearity: "tanh" or "relu", for cell="rnn"/"elman".
    dropout: StackedRNN.dropout; default the module's ``dropout`` (0 for a state_dict).
    prefix: for a state_dict, only keys starting with it are read (e.g. "encoder.rnn.") and the
      others are ignored; without a prefix every key must be used.
  Returns:
    (StackedRNN with the module's num_layers/bidirectional/dropout, its params as jax arrays).
  Raises:
    ValueError: naming every missing, unexpected or mis-shaped weight, or an option (cell,
      nonlinearity) that does not match.
  """
  if _is_torch_module(module_or_state_dict):
    module = module_or_state_dict
    mode = getattr(module, "mode", None)
    if mode not in _TORCH_MODES:
      raise ValueError(f"from_torch expects torch.nn.RNN, nn.LSTM or nn.GRU (or a state_dict), "
                       f"got {type(module).__name__}")
    if prefix:
      raise ValueError("from_torch: prefix applies to a state_dict, not to a module")
    kind, activation = _TORCH_MODES[mode]
    if isinstance(cell, str) and _torch_kind(cell, nonlinearity) != (kind, activation):
      raise ValueError(f"from_torch: cell={cell!r} but the module is {type(module).__name__} ({mode})")
    state = {k: _to_numpy(v, k) for k, v in module.state_dict().items()}
    hidden_size, proj_size = int(module.hidden_size), int(getattr(module, "proj_size", 0) or 0) or None
    num_layers, bidirectional, bias = int(module.num_layers), bool(module.bidirectional), bool(module.bias)
    input_size = int(module.input_size)
    dropout = float(module.dropout) if dropout is None else dropout
    template = cell if isinstance(cell, Cell) else None
  elif isinstance(module_or_state_dict, Mapping):
    keys = [k for k in module_or_state_dict if isinstance(k, str) and k.startswith(prefix)]
    if not prefix:
      keys = list(module_or_state_dict)
    state = {str(k)[len(prefix):]: _to_numpy(module_or_state_dict[k], str(k)) for k in keys}
    kind, activation = _torch_kind(cell, nonlinearity)
    template = cell if isinstance(cell, Cell) else None
    for needed in ("weight_ih_l0", "weight_hh_l0"):
      if needed not in state or np.ndim(state[needed]) != 2:
        nested = sorted(k for k in state if k.endswith("." + needed))
        hint = f"; pass prefix={nested[0][:-len(needed)]!r}" if nested else ""
        raise ValueError(f"from_torch: the state_dict has no 2-D {prefix}{needed} (keys: "
                         f"{_listing(sorted(state))}){hint}")
    layers = sorted({int(m.group(2)) for m in map(_TORCH_KEY.match, state) if m})
    num_layers = layers[-1] + 1
    if len(layers) != num_layers:
      raise ValueError(f"from_torch: the state_dict has weights of layers "
                       f"{_listing([str(l) for l in layers])}; expected layers 0 to {num_layers - 1}")
    bidirectional = any(k.endswith("_reverse") for k in state)
    bias = "bias_ih_l0" in state or "bias_hh_l0" in state
    proj_shape = _shape(state.get("weight_hr_l0", ()))
    proj_size = proj_shape[0] if len(proj_shape) == 2 else None
    if template is not None:
      hidden_size = template.hidden_size
    else:
      hidden_size = proj_shape[1] if len(proj_shape) == 2 else _shape(state["weight_hh_l0"])[1]
    input_size = _shape(state["weight_ih_l0"])[1]
    dropout = 0.0 if dropout is None else dropout
  else:
    raise ValueError(f"from_torch expects a torch.nn.RNN/LSTM/GRU or a state_dict, "
                     f"got {type(module_or_state_dict).__name__}")

  where = "from_torch: state_dict"
  if not state:
    raise ValueError(f"{where} is empty")
  found = {"activation": activation} if kind == "elman" else {}
  if kind == "lstm":
    found["proj_size"] = proj_size
  elif proj_size is not None:
    raise ValueError(f"{where} holds weight_hr_l0 (an LSTM projection) but the cell is a {kind}")
  dtype_name = _dtype_name(_common_dtype(state, where))
  layer_cell = _resolve_cell("from_torch", kind, hidden_size, template, dtype_name, **found)
  _check_portable(layer_cell, "torch")
  layer = StackedRNN(layer_cell, num_layers=num_layers, bidirectional=bidirectional, dropout=dropout)
  _compare(where, _torch_shapes(layer, input_size, bias), {k: _shape(v) for k, v in state.items()},
           _gate_hint(state, hidden_size, kind))
  return layer, _stack_from_torch_arrays(layer, state, bias)


def _torch_tensor(torch, array: np.ndarray):
  if array.dtype == jnp.bfloat16:
    return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(array))


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def load_torch(path: Union[str, os.PathLike], *, cell: Union[str, Cell, None] = None, nonlinearity: str = "tanh",
               dropout: Optional[float] = None, prefix: str = "") -> tuple[StackedRNN, Params]:
  """A PyTorch state_dict file (``torch.save(module.state_dict(), path)``) as ``(StackedRNN, params)``.

  The file is untrusted: it is read with ``torch.load(path, weights_only=True)``, whose unpickler
  builds tensors and plain containers only, so a file that holds any other object (whose
  unpickling could run code) is refused with ValueError before anything in it runs. The weights
  then go through ``from_torch`` (``cell``, ``nonlinearity``, ``dropout`` and ``prefix`` as there).

  Raises:
    FileNotFoundError: if there is no file at ``path``.
    ValueError: for a file that is not a torch file, holds objects other than tensors, or whose
      weights do not match (see ``from_torch``).
  """
  import pickle  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  where = f"load_torch: {path}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: no such file")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    found = re.search(r"GLOBAL (\S+)", str(error))
    if found is None:  # torch's own text here suggests weights_only=False, which would run the file's code
      raise ValueError(f"{where} is not a PyTorch state_dict file (its pickle stream is not one torch.load "
                       f"reads with weights_only=True)") from None
    raise ValueError(f"{where} holds an object of {found.group(1)}, not only tensors and plain containers: "
                     f"refused unread, since unpickling it could run code (torch.load with weights_only=True); "
                     f"save only module.state_dict(), or convert the file to safetensors") from None
  except (RuntimeError, EOFError, OSError, ValueError) as error:
    raise ValueError(f"{where} is not a PyTorch file torch.load can read ({_first_line(error)})") from None
  if not isinstance(state, Mapping):
    raise ValueError(f"{where} holds a {type(state).__name__}, not a state_dict (a mapping of weight names to "
                     f"tensors); save module.state_dict()")
  return from_torch(state, cell=cell, nonlinearity=nonlinearity, dropout=dropout, prefix=prefix)


def to_torch(layer: Union[StackedRNN, Cell], params: Params, *, bias: bool = True,
             as_numpy: bool = False) -> "collections.OrderedDict[str, Any]":
  """The torch state_dict of ``layer`` (a StackedRNN, or a cell as one layer) with ``params``.

  weight_ih_l{l} = w_xh, weight_hh_l{l} = w_hh, weight_hr_l{l} = w_hr; bias_ih_l{l} = b and
  bias_hh_l{l} = 0 (GRU: [0, 0, b_hn] [3H]). ``torch_module.load_state_dict(to_torch(layer,
  params), strict=True)`` loads it into the matching module (see ``torch_module``).

  Args:
    bias: False for a module built with ``bias=False``; then every b (and b_hn) must be zero.
    as_numpy: return numpy arrays instead of torch tensors (torch is then not imported).
  Raises:
    ValueError: for an option torch has no counterpart for (LSTM peephole/layer_norm, Elman
      readout_size or activations other than tanh/relu, GRU reset_after=False, residual,
      merge="sum", learn_initial_state), or params that do not match the layer.
  """
  layer, params = _as_stack(layer, params)
  _check_portable(layer, "torch")
  _check_stack_params(layer, params)
  arrays = _stack_to_torch_arrays(layer, params, bias)
  if as_numpy:
    return collections.OrderedDict(arrays)
  import torch
  return collections.OrderedDict((k, _torch_tensor(torch, v)) for k, v in arrays.items())


def torch_module(layer: Union[StackedRNN, Cell], params: Params, *, batch_first: bool = True,
                 bias: bool = True):
  """A torch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` built to match ``layer``, holding ``params``.

  num_layers, bidirectional, dropout, proj_size and nonlinearity follow the layer; the dtype
  follows the params. ``batch_first=False`` gives a module that takes [T, B, F]. The module
  is returned in eval mode (no dropout), as a StackedRNN runs without ``train=True``; call
  ``.train()`` on it to train.
  """
  layer, params = _as_stack(layer, params)
  state = to_torch(layer, params, bias=bias)
  import torch
  cell, kind = layer.cell, _kind(layer.cell)
  options = dict(input_size=_input_size(params["layer_0"]["forward"], "params"),
                 hidden_size=cell.hidden_size, num_layers=layer.num_layers, bias=bias,
                 batch_first=batch_first, dropout=layer.dropout, bidirectional=layer.bidirectional)
  if kind == "elman":
    module = torch.nn.RNN(nonlinearity=cell.activation, **options)
  elif kind == "lstm":
    module = torch.nn.LSTM(proj_size=cell.proj_size or 0, **options)
  else:
    module = torch.nn.GRU(**options)
  module = module.to(next(iter(state.values())).dtype)
  module.load_state_dict(state, strict=True)
  return module.eval()


# ---------------------------------------------------------------------------
# flax.linen
# ---------------------------------------------------------------------------

_FLAX_KINDS = {"SimpleCell": "elman", "LSTMCell": "lstm", "OptimizedLSTMCell": "lstm", "GRUCell": "gru"}
_FLAX_GATES = {"elman": ("",), "lstm": tuple("ifgo"), "gru": tuple("rzn")}
_FLAX_RECURRENT = {"elman": "h/kernel", "lstm": "hi/kernel", "gru": "hr/kernel"}
_FLAX_INPUT = {"elman": "i/kernel", "lstm": "ii/kernel", "gru": "ir/kernel"}


def _flax_activations() -> dict:
  return {jnp.tanh: "tanh", jax.nn.relu: "relu", jax.nn.sigmoid: "sigmoid"}


def _flax_layout(kind: str, hidden_size: int, input_size: int) -> dict:
  """flax param paths ("dense/leaf") and shapes of a flax cell."""
  H, F = hidden_size, input_size
  if kind == "elman":
    return {"i/kernel": (F, H), "i/bias": (H,), "h/kernel": (H, H)}
  layout = {}
  for g in _FLAX_GATES[kind]:
    layout[f"i{g}/kernel"] = (F, H)
    if kind == "gru":
      layout[f"i{g}/bias"] = (H,)
    layout[f"h{g}/kernel"] = (H, H)
    if kind == "lstm" or g == "n":
      layout[f"h{g}/bias"] = (H,)
  return layout


def _flatten(tree, where: str, prefix: str = "") -> dict:
  if not isinstance(tree, Mapping):
    raise ValueError(f"{where} must be a nested dict of arrays, got {type(tree).__name__} at {prefix or '/'}")
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    flat.update(_flatten(value, where, path + "/") if isinstance(value, Mapping) else {path: value})
  return flat


def from_flax(cell_module_or_name, flax_params, *, activation: Optional[str] = None) -> tuple[Cell, Params]:
  """A flax.linen recurrent cell's params as ``(cell, params)`` of rnn_jax.

  Blocks (module docstring): w_xh[k] = i{k}.kernel^T [H, F], w_hh[k] = h{k}.kernel^T [H, H];
  LSTM b[k] = h{k}.bias; GRU b[k] = i{k}.bias and b_hn = hn.bias; SimpleCell b = i.bias.
  Flax's LSTM carry is (c, h), ours LSTMState(h, c): see ``from_flax_carry``.

  Args:
    cell_module_or_name: a ``SimpleCell``, ``LSTMCell``, ``OptimizedLSTMCell`` or ``GRUCell``
      instance (its activation functions and ``features`` are checked), or the class name.
    flax_params: the cell's params (``variables["params"]``; a ``{"params": ...}`` wrapper is
      unwrapped). Params of a ``flax.linen.RNN`` are under its ``"cell"`` key.
    activation: for a SimpleCell named by a string: "tanh" (flax's default), "relu", "sigmoid".
  Raises:
    ValueError: for other activation or gate functions, ``residual=True``, or params whose
      names or shapes are not the cell's.
  """
  module = None
  if isinstance(cell_module_or_name, str):
    flax_name = cell_module_or_name
  else:
    module, flax_name = cell_module_or_name, type(cell_module_or_name).__name__
    if not type(module).__module__.startswith("flax"):
      flax_name = f"{type(module).__module__}.{flax_name}"
  if flax_name not in _FLAX_KINDS:
    raise ValueError(f"from_flax: unsupported cell {flax_name!r}; expected one of {tuple(_FLAX_KINDS)}")
  kind = _FLAX_KINDS[flax_name]
  found = {}
  if module is not None:
    names = _flax_activations()
    functions = {"activation_fn": getattr(module, "activation_fn", None)}
    if kind != "elman":
      functions["gate_fn"] = getattr(module, "gate_fn", None)
    for option, fn in functions.items():
      name = names.get(fn)
      wanted = ("sigmoid",) if option == "gate_fn" else (("tanh", "relu", "sigmoid") if kind == "elman"
                                                         else ("tanh",))
      if name not in wanted:
        raise ValueError(f"from_flax: {flax_name}.{option}={getattr(fn, '__name__', fn)!r} has no rnn_jax "
                         f"counterpart; expected {' or '.join(wanted)}")
    if getattr(module, "residual", False):
      raise ValueError(f"from_flax: {flax_name}.residual=True has no rnn_jax counterpart")
    if kind == "elman":
      module_activation = names[module.activation_fn]
      if activation is not None and activation != module_activation:
        raise ValueError(f"from_flax: activation={activation!r} but the module uses {module_activation!r}")
      activation = module_activation
  if kind == "elman":
    found["activation"] = activation or "tanh"
  elif activation is not None:
    raise ValueError(f"from_flax: activation applies to a SimpleCell, not to {flax_name}")

  where = f"from_flax: {flax_name} params"
  if isinstance(flax_params, Mapping) and set(flax_params) == {"params"}:
    flax_params = flax_params["params"]
  flat = {k: _to_numpy(v, k) for k, v in _flatten(flax_params, where).items()}
  recurrent, inputs = flat.get(_FLAX_RECURRENT[kind]), flat.get(_FLAX_INPUT[kind])
  if recurrent is None or inputs is None or recurrent.ndim != 2 or inputs.ndim != 2:
    raise ValueError(f"{where}: need 2-D {_FLAX_INPUT[kind]} [F, H] and {_FLAX_RECURRENT[kind]} [H, H]; "
                     f"found {_listing([f'{k} {list(v.shape)}' for k, v in flat.items()])}")
  hidden_size, input_size = recurrent.shape[1], inputs.shape[0]
  if module is not None and module.features != hidden_size:
    raise ValueError(f"{where}: {flax_name}.features={module.features} but the kernels have {hidden_size}")
  _compare(where, _flax_layout(kind, hidden_size, input_size), {k: v.shape for k, v in flat.items()})
  dtype_name = _dtype_name(_common_dtype(flat, where))
  cell = _resolve_cell("from_flax", kind, hidden_size, None, dtype_name, **found)

  gates = _FLAX_GATES[kind]
  params = {"w_xh": np.concatenate([flat[f"i{g}/kernel"].T for g in gates]),
            "w_hh": np.concatenate([flat[f"h{g}/kernel"].T for g in gates])}
  if kind == "lstm":
    params["b"] = np.concatenate([flat[f"h{g}/bias"] for g in gates])
  else:
    params["b"] = np.concatenate([flat[f"i{g}/bias"] for g in gates])
  if kind == "gru":
    params["b_hn"] = flat["hn/bias"]
  return cell, {k: jnp.asarray(v) for k, v in params.items()}


def to_flax(cell: Cell, params: Params) -> dict:
  """Our cell params as the params of the matching flax.linen cell (``flax_cell(cell)``).

  i{k}.kernel = w_xh[k]^T [F, H], h{k}.kernel = w_hh[k]^T [H, H] for block k; the bias goes to
  h{k}.bias (LSTM), i{k}.bias (GRU, with hn.bias = b_hn) or i.bias (SimpleCell). Use it as
  ``flax_module.apply({"params": to_flax(cell, params)}, to_flax_carry(cell, carry), x)``.

  Raises:
    ValueError: for LSTM proj_size/peephole/layer_norm, Elman readout_size or GRU
      reset_after=False (flax has none), or params that are not the cell's.
  """
  _check_portable(cell, "flax")
  kind, H = _kind(cell), cell.hidden_size
  _check_cell_params(cell, params, _input_size(params, "params"), "params")
  gates = _FLAX_GATES[kind]
  block = lambda name, k: jnp.asarray(params[name])[k * H:(k + 1) * H]
  out = {}
  for k, g in enumerate(gates):
    out[f"i{g}"] = {"kernel": block("w_xh", k).T}
    out[f"h{g}"] = {"kernel": block("w_hh", k).T}
    if kind == "lstm":
      out[f"h{g}"]["bias"] = block("b", k)
    else:
      out[f"i{g}"]["bias"] = block("b", k)
  if kind == "gru":
    out["hn"]["bias"] = jnp.asarray(params["b_hn"])
  return out


def flax_cell(cell: Cell, *, optimized: bool = False):
  """The flax.linen cell module matching ``cell``: SimpleCell (with its activation), LSTMCell
  (``OptimizedLSTMCell`` with optimized=True) or GRUCell, with features = H and param_dtype."""
  import flax.linen as nn
  _check_portable(cell, "flax")
  kind = _kind(cell)
  dtype = jnp.dtype(cell.param_dtype)
  if kind == "elman":
    functions = {name: fn for fn, name in _flax_activations().items()}
    functions["identity"] = lambda v: v
    return nn.SimpleCell(features=cell.hidden_size, activation_fn=functions[cell.activation],
                         param_dtype=dtype)
  if kind == "lstm":
    module = nn.OptimizedLSTMCell if optimized else nn.LSTMCell
    return module(features=cell.hidden_size, param_dtype=dtype)
  return nn.GRUCell(features=cell.hidden_size, param_dtype=dtype)


def to_flax_carry(cell: Cell, carry):
  """Our carry as flax's: LSTMState(h, c) -> (c, h); Elman and GRU carries are h either way."""
  if _kind(cell) != "lstm":
    return carry
  if not isinstance(carry, LSTMState):
    raise ValueError(f"to_flax_carry: an LSTM carry must be an LSTMState(h, c), got {type(carry).__name__}")
  return (carry.c, carry.h)


def from_flax_carry(cell: Cell, carry):
  """flax's carry as ours: (c, h) -> LSTMState(h, c); Elman and GRU carries are h either way."""
  if _kind(cell) != "lstm":
    return carry
  if not isinstance(carry, (tuple, list)) or len(carry) != 2:
    raise ValueError(f"from_flax_carry: a flax LSTM carry is a pair (c, h), got {type(carry).__name__}")
  c, h = carry
  return LSTMState(h=h, c=c)


# ---------------------------------------------------------------------------
# Keras 3
# ---------------------------------------------------------------------------

_KERAS_KINDS = {"SimpleRNNCell": "elman", "LSTMCell": "lstm", "GRUCell": "gru"}
_KERAS_ACTIVATIONS = {"tanh": "tanh", "relu": "relu", "sigmoid": "sigmoid", "linear": "identity",
                      "identity": "identity"}
_KERAS_GRU_BLOCKS = (1, 0, 2)   # ours r, z, n are Keras's column blocks 1, 0, 2 (Keras: z, r, h)


def _keras_layout(kind: str, H: int, F: int, use_bias: bool, reset_after: bool) -> dict:
  rows = _GATES[kind] * H
  layout = {"kernel": (F, rows), "recurrent_kernel": (H, rows)}
  if use_bias:
    layout["bias"] = (2, rows) if (kind == "gru" and reset_after) else (rows,)
  return layout


def _keras_options(layer) -> tuple[str, list, dict]:
  """(kind, weights, options) of a Keras SimpleRNN/LSTM/GRU layer or cell."""
  keras_cell = getattr(layer, "cell", layer)
  name = type(keras_cell).__name__
  if name not in _KERAS_KINDS:
    extra = (": convert its forward_layer and backward_layer one by one"
             if hasattr(layer, "forward_layer") else "")
    raise ValueError(f"from_keras expects a Keras SimpleRNN, LSTM or GRU layer (or cell), "
                     f"got {type(layer).__name__}{extra}")
  kind = _KERAS_KINDS[name]
  weights = keras_cell.get_weights()
  if not weights:
    raise ValueError(f"from_keras: the Keras {type(layer).__name__} has no weights yet: build it "
                     f"(call it on a batch) first")
  config = keras_cell.get_config()
  activation = config.get("activation")
  if kind == "elman":
    if activation not in _KERAS_ACTIVATIONS:
      raise ValueError(f"from_keras: activation={activation!r} has no rnn_jax counterpart; expected one "
                       f"of {tuple(_KERAS_ACTIVATIONS)}")
  else:
    if activation != "tanh":
      raise ValueError(f"from_keras: activation={activation!r} has no rnn_jax counterpart; expected 'tanh'")
    if config.get("recurrent_activation") != "sigmoid":
      raise ValueError(f"from_keras: recurrent_activation={config.get('recurrent_activation')!r} has no "
                       f"rnn_jax counterpart; expected 'sigmoid'")
  options = {"use_bias": bool(config.get("use_bias", True)), "activation": _KERAS_ACTIVATIONS.get(activation),
             "reset_after": bool(config.get("reset_after", True))}
  return kind, weights, options


def from_keras(layer_or_weights, *, cell: Union[str, Cell, None] = None, activation: Optional[str] = None,
               reset_after: Optional[bool] = None) -> tuple[Cell, Params]:
  """A Keras 3 SimpleRNN/LSTM/GRU layer (or its ``get_weights()`` list) as ``(cell, params)``.

  Keras weights are [kernel [F, G*H], recurrent_kernel [H, G*H], bias]; the mapping (module
  docstring) transposes them and, for the GRU, reorders the blocks z, r, h -> r, z, n and
  splits the bias: reset_after=True b = [in_r + rec_r, in_z + rec_z, in_h], b_hn = rec_h;
  reset_after=False b = [b_r, b_z, b_h], b_hn = 0. ``use_bias=False`` gives zero biases.
  Options that do not change the weights (dropout, recurrent_dropout, return_sequences,
  go_backwards, stateful, unroll) are not carried over.

  Args:
    layer_or_weights: a built Keras layer or cell, or a list [kernel, recurrent_kernel(, bias)].
      For a list the cell kind follows from the shapes (G = columns / H).
    cell: optional "elman", "lstm", "gru" or an rnn_jax cell to check the weights against (a
      given cell is returned as is, so its initialisers and compute dtype are kept).
    activation: for a weight list of a SimpleRNN: "tanh" (default), "relu", "sigmoid", "linear".
    reset_after: for a GRU weight list without bias (with bias it follows from its shape).
  Raises:
    ValueError: for activations other than those above, recurrent_activation other than
      sigmoid, an unbuilt layer, or weights whose number or shapes do not fit.
  """
  if type(layer_or_weights).__module__.split(".")[0] == "keras":
    if activation is not None or reset_after is not None:
      raise ValueError("from_keras: activation and reset_after are read from a Keras layer; pass them "
                       "only with a weight list")
    kind, weights, options = _keras_options(layer_or_weights)
    use_bias, activation, reset_after = options["use_bias"], options["activation"], options["reset_after"]
  elif isinstance(layer_or_weights, (list, tuple)):
    weights = list(layer_or_weights)
    if len(weights) not in (2, 3):
      raise ValueError(f"from_keras: expected [kernel, recurrent_kernel, bias] (or without bias), got "
                       f"{len(weights)} arrays")
    use_bias = len(weights) == 3
    recurrent = _shape(weights[1])
    if len(recurrent) != 2 or recurrent[0] == 0 or recurrent[1] % recurrent[0] \
        or recurrent[1] // recurrent[0] not in (1, 3, 4):
      raise ValueError(f"from_keras: recurrent_kernel must be [H, G*H] with G = 1, 3 or 4, "
                       f"got {list(recurrent)}")
    kind = {g: k for k, g in _GATES.items()}[recurrent[1] // recurrent[0]]
    if kind == "gru" and use_bias:
      from_shape = len(_shape(weights[2])) == 2
      if reset_after is not None and reset_after != from_shape:
        raise ValueError(f"from_keras: reset_after={reset_after} but the bias has shape "
                         f"{list(_shape(weights[2]))}")
      reset_after = from_shape
    reset_after = True if reset_after is None else reset_after
    if kind == "elman":
      if (activation or "tanh") not in _KERAS_ACTIVATIONS:
        raise ValueError(f"from_keras: activation={activation!r}; expected one of "
                         f"{tuple(_KERAS_ACTIVATIONS)}")
      activation = _KERAS_ACTIVATIONS[activation or "tanh"]
    elif activation not in (None, "tanh"):
      raise ValueError(f"from_keras: activation={activation!r} has no rnn_jax {kind} counterpart")
  else:
    raise ValueError(f"from_keras expects a Keras layer or a list of arrays, "
                     f"got {type(layer_or_weights).__name__}")

  if isinstance(cell, str):
    if cell not in _CELL_CLASSES:
      raise ValueError(f"from_keras: unknown cell {cell!r}; expected one of {tuple(_CELL_CLASSES)}")
    if cell != kind:
      raise ValueError(f"from_keras: cell={cell!r} but the weights are a {kind}")
    cell = None
  names = ("kernel", "recurrent_kernel", "bias")
  arrays = {name: _to_numpy(w, name) for name, w in zip(names, weights)}
  where = "from_keras: weights"
  if arrays["recurrent_kernel"].ndim != 2 or arrays["kernel"].ndim != 2:
    raise ValueError(f"{where}: kernel and recurrent_kernel must be 2-D, got "
                     f"{list(arrays['kernel'].shape)} and {list(arrays['recurrent_kernel'].shape)}")
  H, F = arrays["recurrent_kernel"].shape[0], arrays["kernel"].shape[0]
  _compare(where, _keras_layout(kind, H, F, use_bias, reset_after), {k: v.shape for k, v in arrays.items()})
  found = {"activation": activation} if kind == "elman" else {}
  if kind == "gru":
    found["reset_after"] = reset_after
  result = _resolve_cell("from_keras", kind, H, cell, _dtype_name(_common_dtype(arrays, where)), **found)
  _check_portable(result, "keras")

  kernel, recurrent = arrays["kernel"], arrays["recurrent_kernel"]
  zeros = np.zeros((kernel.shape[1],), kernel.dtype)
  bias = arrays.get("bias", zeros)
  if kind != "gru":
    params = {"w_xh": kernel.T, "w_hh": recurrent.T, "b": bias}
  else:
    blocks = lambda m: [m[..., k * H:(k + 1) * H] for k in _KERAS_GRU_BLOCKS]
    params = {"w_xh": np.concatenate([m.T for m in blocks(kernel)]),
              "w_hh": np.concatenate([m.T for m in blocks(recurrent)])}
    if bias.ndim == 2:
      (in_r, in_z, in_n), (rec_r, rec_z, rec_n) = blocks(bias[0]), blocks(bias[1])
      params["b"] = np.concatenate([_add(in_r, rec_r), _add(in_z, rec_z), in_n])
      params["b_hn"] = rec_n
    else:
      params["b"] = np.concatenate(blocks(bias))
      params["b_hn"] = np.zeros((H,), kernel.dtype)
  return result, {k: jnp.asarray(v) for k, v in params.items()}


def to_keras(cell: Cell, params: Params, *, use_bias: bool = True) -> list:
  """Our cell params as a Keras weight list, for ``keras_layer.set_weights(...)``.

  [kernel = w_xh^T [F, G*H], recurrent_kernel = w_hh^T [H, G*H], bias]; GRU blocks are
  reordered r, z, n -> z, r, h, and its bias is [2, 3H] = ([b_z, b_r, b_n], [0, 0, b_hn]) for
  reset_after=True, or [3H] = [b_z, b_r, b_n + b_hn] for reset_after=False. The Keras layer
  must use the same activation (Elman "identity" is Keras "linear") and reset_after.

  Args:
    use_bias: False for a Keras layer with ``use_bias=False``: [kernel, recurrent_kernel]; then
      b (and b_hn) must be zero.
  Raises:
    ValueError: for LSTM proj_size/peephole/layer_norm or Elman readout_size (Keras has none),
      or params that are not the cell's.
  """
  _check_portable(cell, "keras")
  kind, H = _kind(cell), cell.hidden_size
  _check_cell_params(cell, params, _input_size(params, "params"), "params")
  p = {k: np.array(v) for k, v in params.items()}
  if not use_bias:
    _zero_bias_check(p, kind, "params", "use_bias=False")
  if kind != "gru":
    weights = [p["w_xh"].T, p["w_hh"].T, p["b"]]
  else:
    rows = lambda m: [m[k * H:(k + 1) * H] for k in _KERAS_GRU_BLOCKS]   # Keras z, r, h
    weights = [np.concatenate([m.T for m in rows(p["w_xh"])], axis=1),
               np.concatenate([m.T for m in rows(p["w_hh"])], axis=1)]
    b_z, b_r, b_n = rows(p["b"])
    if cell.reset_after:
      zeros = np.zeros_like(b_n)
      weights.append(np.stack([np.concatenate([b_z, b_r, b_n]), np.concatenate([zeros, zeros, p["b_hn"]])]))
    else:
      weights.append(np.concatenate([b_z, b_r, _add(b_n, p["b_hn"])]))
  weights = [np.ascontiguousarray(w) for w in weights]
  return weights if use_bias else weights[:2]


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------

_META_KEY = "rnn_jax"
_FORMAT = "rnn_jax.stacked_rnn/1"
_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
_LAYER_FIELDS = ("num_layers", "bidirectional", "merge", "dropout", "residual", "learn_initial_state")


def _describe_layer(layer: StackedRNN) -> dict:
  cell = layer.cell
  cell_fields = {f.name: getattr(cell, f.name) for f in dataclasses.fields(cell) if f.init}
  return {"type": "StackedRNN", **{name: getattr(layer, name) for name in _LAYER_FIELDS},
          "cell": {"type": _kind(cell), **cell_fields}}


def _fits(annotation: str, value) -> bool:
  """Whether a JSON value fits a dataclass field annotation (int, float, bool, str, Optional[...])."""
  annotation = str(annotation).replace(" ", "")
  if annotation.startswith("Optional[") and annotation.endswith("]"):
    if value is None:
      return True
    annotation = annotation[len("Optional["):-1]
  if annotation == "bool":
    return isinstance(value, bool)
  if annotation == "int":
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation == "float":
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation == "str":
    return isinstance(value, str)
  return False


def _build(cls, values, where: str, **given):
  """cls(**values, **given) after checking every JSON field against cls's declared fields."""
  if not isinstance(values, dict):
    raise ValueError(f"{where} must be a JSON object, got {type(values).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in given}
  unknown = sorted(set(values) - set(fields) - {"type"})
  if unknown:
    raise ValueError(f"{where} has unknown fields {unknown}; {cls.__name__} has {sorted(fields)}")
  kwargs = dict(given)
  for name, value in values.items():
    if name == "type":
      continue
    annotation = str(fields[name].type)
    if not _fits(annotation, value):
      raise ValueError(f"{where}.{name} = {value!r} does not fit {cls.__name__}.{name}: {annotation}")
    kwargs[name] = float(value) if "float" in annotation and value is not None else value
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{where}: {error}") from None


def _build_layer(description, where: str) -> StackedRNN:
  """The StackedRNN a description names; only Elman, LSTM and GRU cells are built."""
  if not isinstance(description, dict) or description.get("type") != "StackedRNN":
    raise ValueError(f"{where}.type must be 'StackedRNN'")
  cell_description = description.get("cell")
  if not isinstance(cell_description, dict) or cell_description.get("type") not in _CELL_CLASSES:
    raise ValueError(f"{where}.cell.type must be one of {tuple(_CELL_CLASSES)}")
  cell = _build(_CELL_CLASSES[cell_description["type"]], cell_description, f"{where}.cell")
  return _build(StackedRNN, {k: v for k, v in description.items() if k != "cell"}, where, cell=cell)


def save_safetensors(path: Union[str, os.PathLike], params: Params, layer: Union[StackedRNN, Cell], *,
                     bias: bool = True) -> None:
  """Write ``params`` of ``layer`` to a safetensors file under PyTorch's names.

  Tensors are ``to_torch(layer, params, bias=bias)`` (weight_ih_l{l}, weight_hh_l{l},
  bias_ih_l{l} = b, bias_hh_l{l} = 0 or [0, 0, b_hn], weight_hr_l{l}, ``_reverse``), and the
  header metadata holds ``"format": "pt"`` and, under ``"rnn_jax"``, the JSON description
  of the layer (all StackedRNN and cell fields), the input size, the dtype and ``bias``.
  ``load_safetensors`` returns the same layer and bit-identical params; in torch,
  ``module.load_state_dict(safetensors.torch.load_file(path), strict=True)``.

  Raises:
    ValueError: for layers torch cannot hold (see ``to_torch``), params not matching the layer,
      or weights of mixed or unsupported dtypes.
  """
  layer, params = _as_stack(layer, params)
  _check_portable(layer, "torch", "PyTorch-named safetensors")
  input_size = _check_stack_params(layer, params)
  arrays = _stack_to_torch_arrays(layer, params, bias)
  dtype = np.dtype(_common_dtype(arrays, "params")).name
  if dtype not in _ST_DTYPES:
    raise ValueError(f"params have dtype {dtype}; expected one of {tuple(_ST_DTYPES)}")
  description = {"format": _FORMAT, "layer": _describe_layer(layer), "input_size": input_size,
                 "dtype": dtype, "bias": bool(bias)}
  metadata = {"format": "pt", _META_KEY: json.dumps(description, sort_keys=True)}
  import safetensors.numpy
  tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
  if dtype != "bfloat16":
    safetensors.numpy.save_file(tensors, os.fspath(path), metadata=metadata)
    return
  try:   # numpy has no bfloat16; older safetensors releases cannot write ml_dtypes' one
    safetensors.numpy.save_file(tensors, os.fspath(path), metadata=metadata)
  except (TypeError, KeyError, ValueError, AttributeError) as error:
    raise ValueError(f"save_safetensors: this safetensors version cannot write bfloat16 tensors ({error}); "
                     f"upgrade safetensors or cast the params to float32") from None


def _read_description(metadata, where: str) -> dict:
  text = (metadata or {}).get(_META_KEY)
  if text is None:
    raise ValueError(f"{where} holds no rnn_jax layer description (it was not written by save_safetensors); "
                     f"read a plain torch file with from_torch(safetensors.numpy.load_file(path), cell=...)")
  try:
    description = json.loads(text)
  except json.JSONDecodeError as error:
    raise ValueError(f"{where}: the rnn_jax description is not valid JSON ({error})") from None
  if not isinstance(description, dict):
    raise ValueError(f"{where}: the rnn_jax description must be a JSON object")
  expected = {"format", "layer", "input_size", "dtype", "bias"}
  if set(description) != expected:
    raise ValueError(f"{where}: the rnn_jax description has fields {sorted(description)}, expected "
                     f"{sorted(expected)}")
  if description["format"] != _FORMAT:
    raise ValueError(f"{where}: unknown description format {description['format']!r}; expected {_FORMAT!r}")
  input_size = description["input_size"]
  if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size <= 0:
    raise ValueError(f"{where}: input_size must be a positive integer, got {input_size!r}")
  if description["dtype"] not in _ST_DTYPES:
    raise ValueError(f"{where}: dtype must be one of {tuple(_ST_DTYPES)}, got {description['dtype']!r}")
  if not isinstance(description["bias"], bool):
    raise ValueError(f"{where}: bias must be true or false, got {description['bias']!r}")
  return description


def load_safetensors(path: Union[str, os.PathLike]) -> tuple[StackedRNN, Params]:
  """Read a file written by ``save_safetensors``: ``(StackedRNN, params)``, no torch needed.

  The file is treated as untrusted: the header must be valid safetensors, the description
  may only build a StackedRNN of an Elman, LSTM or GRU with type-checked fields, and the
  tensors must be exactly the described layer's, with its shapes and dtype. Biases are
  recombined as in ``from_torch`` (b = bias_ih + bias_hh; GRU b_hn = bias_hh[2H:]).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: naming what does not match (not safetensors, no or bad description, missing,
      unexpected, mis-shaped or mis-typed tensors).
  """
  import safetensors
  path = os.fspath(path)
  where = f"load_safetensors: {path}"
  with open(path, "rb") as f:
    data = f.read()
  try:
    entries = safetensors.deserialize(data)
  except Exception as error:   # the Rust reader raises SafetensorError and others
    raise ValueError(f"{where} is not a valid safetensors file ({error})") from None
  header_size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + header_size])   # valid JSON: deserialize parsed it
  description = _read_description(header.get("__metadata__"), where)
  layer = _build_layer(description["layer"], f"{where}: layer")
  _check_portable(layer, "torch", "PyTorch-named safetensors")
  bias, dtype = description["bias"], description["dtype"]
  tensors = {name: info for name, info in entries}
  per_direction = 2 + 2 * bias + bool(getattr(layer.cell, "proj_size", None))
  needed = layer.num_layers * len(layer.directions) * per_direction
  if needed != len(tensors):   # checked first, so a huge num_layers costs nothing
    raise ValueError(f"{where}: the description needs {needed} tensors ({layer.num_layers} layers), "
                     f"the file holds {len(tensors)}")
  expected = _torch_shapes(layer, description["input_size"], bias)
  _compare(where, expected, {name: tuple(info["shape"]) for name, info in tensors.items()})
  code = _ST_DTYPES[dtype]
  wrong = [f"{name} is {info['dtype']}" for name, info in sorted(tensors.items()) if info["dtype"] != code]
  if wrong:
    raise ValueError(f"{where}: the description says {dtype} ({code}) but {_listing(wrong)}")
  np_dtype = jnp.dtype(dtype).newbyteorder("<") if dtype != "bfloat16" else jnp.dtype(jnp.bfloat16)
  arrays = {}
  for name, info in tensors.items():
    raw = bytes(info["data"])
    if len(raw) != int(np.prod(info["shape"])) * np_dtype.itemsize:
      raise ValueError(f"{where}: {name} holds {len(raw)} bytes, its shape {info['shape']} needs "
                       f"{int(np.prod(info['shape'])) * np_dtype.itemsize}")
    arrays[name] = np.frombuffer(raw, np_dtype).reshape(info["shape"]).astype(jnp.dtype(dtype))
  return layer, _stack_from_torch_arrays(layer, arrays, bias)
