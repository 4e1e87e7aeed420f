"""Content hashes of datasets: the data a run reads is part of its identity.

``fingerprint(*values)`` is a sha256 over a canonical encoding of texts, token lists, id and
frame arrays, vocabularies and nested lists, tuples and dicts of them, so that two values hash
alike exactly when they hold the same data:

* an array hashes its dtype, its shape and its bytes (a JAX array is read back to the host);
* a list of arrays of one dtype (sentences of ids, chorales of frames) hashes their lengths and
  their concatenation, without a Python loop over the bytes;
* str, int, float, bool and None, and containers holding only those (sentences of words, token
  pairs), are written as JSON; a ``Vocabulary`` (anything with a ``tokens`` list) as its tokens;
  a NamedTuple of arrays as its fields by name.

``RunDir.check_data(name, *values)`` records the hash in config.json, and a resumed run refuses
data whose hash changed, naming ``name``.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np


def _is_array(value) -> bool:
  return isinstance(value, np.ndarray) or type(value).__module__.startswith(("jax", "jaxlib"))


def _array_record(digest, value) -> None:
  array = np.ascontiguousarray(np.asarray(value))
  if array.dtype == object:
    raise TypeError("fingerprint: arrays of Python objects have no canonical bytes; pass a list instead")
  digest.update(f"array {array.dtype.str} {array.shape}\n".encode())
  digest.update(array.tobytes())


def _same_kind_arrays(values) -> bool:
  if not values or not all(isinstance(v, np.ndarray) for v in values):
    return False
  first = values[0]
  return first.ndim >= 1 and all(v.dtype == first.dtype and v.shape[1:] == first.shape[1:] for v in values)


def _scalar(value) -> str:
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  return json.dumps(value)


def _not_json(value):
  raise TypeError(type(value).__name__)


def _update_json(digest, value) -> bool:
  """Hash a container of plain JSON values (texts, token tuples, numbers) as one JSON text, in C;
  False if it holds anything else (arrays, vocabularies), which the caller then walks."""
  try:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=_not_json)
  except (TypeError, ValueError):
    return False
  digest.update(b"json\n")
  digest.update(text.encode("utf-8", "surrogatepass"))
  return True


def _update(digest, value: Any) -> None:
  if value is None or isinstance(value, (bool, int, float, str)):
    digest.update(f"{type(value).__name__} {_scalar(value)}\n".encode("utf-8", "surrogatepass"))
  elif isinstance(value, bytes):
    digest.update(f"bytes {len(value)}\n".encode())
    digest.update(value)
  elif isinstance(value, np.generic):
    _array_record(digest, value)
  elif _is_array(value):
    _array_record(digest, value)
  elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple: its fields by name
    digest.update(f"record {type(value).__name__} {len(value)}\n".encode())
    for name, field in zip(value._fields, value):
      _update(digest, name)
      _update(digest, field)
  elif isinstance(value, (list, tuple, dict)) and _update_json(digest, value):
    pass
  elif isinstance(value, (list, tuple)):
    items = list(value)
    if _same_kind_arrays(items):
      digest.update(f"arrays {len(items)}\n".encode())
      _array_record(digest, np.asarray([len(v) for v in items], np.int64))
      _array_record(digest, np.concatenate(items, axis=0))
    else:
      digest.update(f"list {len(items)}\n".encode())
      for item in items:
        _update(digest, item)
  elif isinstance(value, dict):
    digest.update(f"dict {len(value)}\n".encode())
    for key in sorted(value, key=str):
      _update(digest, str(key))
      _update(digest, value[key])
  elif isinstance(getattr(value, "tokens", None), list):  # a Vocabulary
    digest.update(b"vocabulary\n")
    _update(digest, list(value.tokens))
  else:
    raise TypeError(f"fingerprint: cannot hash a {type(value).__name__}; give texts, token lists, arrays or "
                    f"lists, tuples and dicts of them")


def fingerprint(*values) -> str:
  """sha256 (hex) of ``values`` (see the module docstring): equal exactly when the data is equal."""
  digest = hashlib.sha256()
  for value in values:
    _update(digest, value)
  return digest.hexdigest()
