"""The fused CPU LSTM recurrence (``csrc/lstm_cpu.cc``), built on first use and called through the XLA FFI.

XLA:CPU runs a scanned LSTM step as a dozen small thunks (a dot, the gate
fusions, the writes of the saved gates), and their dispatch costs more than the
arithmetic at B=32, H=256 (BUILD.md, "Speed"). The kernel runs the whole
recurrence in one call per direction of BPTT, the CPU counterpart of a cuDNN RNN
layer, with the same equations as ``rnn_jax.bptt``:

  forward:   (i, f, g, o) = a_t + b + W_hh h_{t-1};  c_t = sigma(f) c_{t-1} + sigma(i) tanh(g);
             h_t = sigma(o) tanh(c_t)
  backward:  da_t and (dh_{t-1}, dc_{t-1}) from (dh_t, dc_t) and the saved gates

The input projection a = W_xh x and the weight gradients stay in XLA as one
matmul each over all steps. Under ``vmap`` the mapped axis joins the kernel's
batch rows, so a vmapped cell still makes one call.

The source is compiled with the system C++ compiler (``$CXX``, else ``c++``) for
the machine it runs on (``-march=native``) into a cache directory
(``$RNN_JAX_KERNEL_CACHE``, else ``~/.cache/rnn_jax/kernels``; the temp directory if that
cannot be written), keyed by the
source, the flags, the jaxlib version and the CPU. If there is no compiler or the
build fails, ``available()`` is False, a warning says why once, and every caller
uses the ``lax.scan`` path. ``RNN_JAX_CPU_KERNELS=0`` (or ``set_enabled(False)``)
turns the kernel off.

The kernel is float32 only, needs H to be a multiple of the vector width (16
with AVX-512, 8 with AVX2), and has no derivative of its own: ``jax.grad`` of a
``jax.grad`` through it fails, so use ``backward="autodiff"`` for higher-order
derivatives.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).parent / "csrc" / "lstm_cpu.cc"
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w")
FORWARD_TARGET = "rnn_jax_lstm_forward"
BACKWARD_TARGET = "rnn_jax_lstm_backward"
# hs and dL/dhs ([T, N, H]) are handed over batch-major ([N, T, H] in memory): rnn()'s read-out runs
# batch-major, so XLA needs no transpose there. a stays time-major: XLA transposes the small
# inputs x before the projection, so a = W_xh x arrives time-major and goes in as it is.
BATCH_MAJOR = (1, 0, 2)

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None
_enabled = os.environ.get("RNN_JAX_CPU_KERNELS", "1") != "0"


def set_enabled(enabled: bool) -> None:
  """Turn the kernel on or off for functions traced from now on (jitted ones keep what they traced)."""
  global _enabled
  _enabled = bool(enabled)


def enabled() -> bool:
  """True if the kernel is switched on (it may still be unavailable; see ``available``)."""
  return _enabled


def _cpu_signature() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _library_path(compiler: str) -> pathlib.Path:
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), jax.lib.__version__.encode(),
               _cpu_signature().encode()):
    key.update(part)
    key.update(b"\0")
  cache = pathlib.Path(os.environ.get("RNN_JAX_KERNEL_CACHE", pathlib.Path.home() / ".cache" / "rnn_jax" / "kernels"))
  return cache / key.hexdigest()[:16] / "liblstm_cpu.so"


def _build(path: pathlib.Path, compiler: str) -> None:
  """Compile into a temporary file and rename it into place, so concurrent builds never see half a library."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as handle:
    partial = pathlib.Path(handle.name)
  try:
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    os.replace(partial, path)
  finally:
    partial.unlink(missing_ok=True)


def _load() -> Optional[ctypes.CDLL]:
  """Build (once per machine) and load the library, and register its FFI targets; None on failure."""
  global _library, _failure
  with _lock:
    if _library is not None or _failure is not None:
      return _library
    compiler = os.environ.get("CXX", "c++")
    try:
      path = _library_path(compiler)
      if not path.exists():
        try:
          _build(path, compiler)
        except OSError:  # an unwritable cache directory: build in the temp directory instead
          path = pathlib.Path(tempfile.gettempdir()) / "rnn_jax_kernels" / path.parent.name / path.name
          if not path.exists():
            _build(path, compiler)
      library = ctypes.CDLL(str(path))
      jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(library.RnnJaxLstmForward), platform="cpu")
      jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(library.RnnJaxLstmBackward), platform="cpu")
      library.rnn_jax_vector_width.restype = ctypes.c_int64
      _library = library
    except (OSError, RuntimeError, AttributeError, ValueError) as error:
      _failure = f"{type(error).__name__}: {error}"
      warnings.warn(f"rnn_jax: the fused CPU LSTM kernel is unavailable, using lax.scan instead ({_failure})",
                    RuntimeWarning, stacklevel=3)
    return _library


def available() -> bool:
  """True if the kernel is switched on and built (building it on first call)."""
  return _enabled and _load() is not None


def unavailable_reason() -> Optional[str]:
  """Why ``available()`` is False, or None."""
  if not _enabled:
    return "switched off (RNN_JAX_CPU_KERNELS=0 or set_enabled(False))"
  return None if _load() is not None else _failure


def _require() -> ctypes.CDLL:
  library = _load()
  if library is None:
    raise RuntimeError(f"the fused CPU LSTM kernel is unavailable: {_failure}")
  return library


def vector_width() -> int:
  """Floats per SIMD vector in the built kernel; H must be a multiple of it."""
  return int(_require().rnn_jax_vector_width())


def applies(hidden_size: int, *arrays) -> bool:
  """True if the kernel can run this LSTM: switched on, built, float32 and H a multiple of the vector width."""
  if not available() or hidden_size % vector_width() != 0:
    return False
  return all(jnp.result_type(x) == jnp.float32 for x in arrays)


def _mask_operand(mask, T: int, N: int):
  """(mask as [T, N] bool, use_mask flag); a [1, 1] placeholder when there is no mask."""
  if mask is None:
    return jnp.ones((1, 1), jnp.bool_), 0
  return mask.reshape(T, N).astype(jnp.bool_), 1


def _fold_rows(x, row_axis: int, batched: bool, size: int):
  """x with a vmapped axis at 0 (or none, then broadcast) -> that axis merged into the row axis N."""
  x = jnp.moveaxis(x, 0, row_axis) if batched else jnp.broadcast_to(
      jnp.expand_dims(x, row_axis), x.shape[:row_axis] + (size,) + x.shape[row_axis:])
  return x.reshape(x.shape[:row_axis] + (-1,) + x.shape[row_axis + 2:])


def _unfold_rows(x, row_axis: int, size: int):
  """The inverse of _fold_rows: [..., V N, ...] at row_axis -> [V, ..., N, ...]."""
  x = x.reshape(x.shape[:row_axis] + (size, -1) + x.shape[row_axis + 1:])
  return jnp.moveaxis(x, row_axis, 0)


def _rows_batched(call, in_row_axes, out_row_axes):
  """``call`` (a kernel call on rows N) with a vmap rule: a mapped axis joins the row axis, so
  vmap over rnn_jax's cells still makes ONE kernel call with V N rows. Operands without a row
  axis (weights) must be unmapped for that; if one is mapped, it runs one call per element."""
  wrapped = jax.custom_batching.custom_vmap(call)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, *args):
    if any(batched and axis is None for batched, axis in zip(in_batched, in_row_axes)):
      mapped = [i for i, batched in enumerate(in_batched) if batched]

      def one(mapped_args):
        full = list(args)
        for i, value in zip(mapped, mapped_args):
          full[i] = value
        return wrapped(*full)

      outs = jax.lax.map(one, [args[i] for i in mapped])
      return tuple(outs), (True,) * len(outs)
    folded = [x if axis is None else _fold_rows(x, axis, batched, axis_size)
              for x, axis, batched in zip(args, in_row_axes, in_batched)]
    outs = wrapped(*folded)
    return (tuple(x if axis is None else _unfold_rows(x, axis, axis_size) for x, axis in zip(outs, out_row_axes)),
            tuple(axis is not None for axis in out_row_axes))

  return wrapped


def _forward_call(a, w_hh, bias, h0, c0, mask, **attributes):
  """The forward FFI call on rows N: a [T, N, 4H] -> hs, cs [T, N, H], gates [T, N, 4H] (or [0])."""
  T, N, G = a.shape
  gates_shape = (T, N, G) if attributes["save_gates"] else (0,)
  call = jax.ffi.ffi_call(
      FORWARD_TARGET,
      (jax.ShapeDtypeStruct((T, N, G // 4), jnp.float32), jax.ShapeDtypeStruct((T, N, G // 4), jnp.float32),
       jax.ShapeDtypeStruct(gates_shape, jnp.float32)),
      output_layouts=(BATCH_MAJOR, None, None))
  return call(a, w_hh, bias, h0, c0, mask, **attributes)


def _backward_call(gates, cs, c0, w_hh, d_hs, dh_last, dc_last, mask, **attributes):
  """The backward FFI call on rows N: -> da [T, N, 4H], dL/dh0 and dL/dc0 [N, H]."""
  T, N, H = cs.shape
  call = jax.ffi.ffi_call(
      BACKWARD_TARGET,
      (jax.ShapeDtypeStruct((T, N, 4 * H), jnp.float32), jax.ShapeDtypeStruct((N, H), jnp.float32),
       jax.ShapeDtypeStruct((N, H), jnp.float32)),
      input_layouts=(None, None, None, None, BATCH_MAJOR, None, None, None))
  return call(gates, cs, c0, w_hh, d_hs, dh_last, dc_last, mask, **attributes)


def lstm_forward(a, w_hh, h0, c0, mask=None, *, bias=None, reverse: bool = False, save_gates: bool = True):
  """The LSTM recurrence over precomputed input projections, in one kernel call.

  Args:
    a: [T, ..., 4H] float32, a_t = W_xh x_t (+ b) (gate order i, f, g, o).
    w_hh: [4H, H].
    h0, c0: [..., H], the initial carry.
    mask: optional [T, ...] bool, True on real steps (the carry is held elsewhere).
    bias: optional [4H], added to every a_t inside the kernel (sparing XLA a pass over a).
    reverse: run t = T-1, ..., 0.
    save_gates: also return the activated gates, for ``lstm_backward``.
  Returns:
    (hs [T, ..., H], cs [T, ..., H], gates [T, ..., 4H] or None).
  """
  _require()
  T, G = a.shape[0], a.shape[-1]
  H = G // 4
  batch_shape = a.shape[1:-1]
  N = int(np.prod(batch_shape, dtype=np.int64))
  mask_operand, use_mask = _mask_operand(mask, T, N)
  bias = jnp.zeros((G,), jnp.float32) if bias is None else bias
  kernel = functools.partial(_forward_call, reverse=int(reverse), save_gates=int(save_gates), use_mask=use_mask)
  kernel = _rows_batched(kernel, (1, None, None, 0, 0, 1 if use_mask else None),
                         (1, 1, 1 if save_gates else None))
  hs, cs, gates = kernel(a.reshape(T, N, G), w_hh, bias, h0.reshape(N, H), c0.reshape(N, H), mask_operand)
  unflatten = lambda x: x.reshape((T,) + batch_shape + x.shape[-1:])
  return unflatten(hs), unflatten(cs), (unflatten(gates) if save_gates else None)


def lstm_backward(gates, cs, c0, w_hh, d_hs, dh_last, dc_last, mask=None, *, reverse: bool = False):
  """The LSTM's backward recurrence in one kernel call: da for every step and the carry gradients.

  Args:
    gates: [T, ..., 4H], the activated gates saved by ``lstm_forward``.
    cs: [T, ..., H], the cell states; c0: [..., H].
    w_hh: [4H, H].
    d_hs: [T, ..., H], dL/dhs; dh_last, dc_last: [..., H], dL/d(final carry).
    mask, reverse: as in the forward call.
  Returns:
    (da [T, ..., 4H], dL/dh0 [..., H], dL/dc0 [..., H]).
  """
  _require()
  T, H = cs.shape[0], cs.shape[-1]
  batch_shape = cs.shape[1:-1]
  N = int(np.prod(batch_shape, dtype=np.int64))
  mask_operand, use_mask = _mask_operand(mask, T, N)
  kernel = functools.partial(_backward_call, reverse=int(reverse), use_mask=use_mask)
  kernel = _rows_batched(kernel, (1, 1, 0, None, 1, 0, 0, 1 if use_mask else None), (1, 0, 0))
  da, dh0, dc0 = kernel(gates.reshape(T, N, 4 * H), cs.reshape(T, N, H), c0.reshape(N, H), w_hh,
                        d_hs.reshape(T, N, H), dh_last.reshape(N, H), dc_last.reshape(N, H), mask_operand)
  return (da.reshape((T,) + batch_shape + (4 * H,)), dh0.reshape(batch_shape + (H,)),
          dc0.reshape(batch_shape + (H,)))
