"""Build, load and register the C++ kernels of ``rnn_jax/csrc``, shared by every kernel module.

A kernel module (``lstm_kernel``, ``gru_kernel``, ``elman_kernel``) declares a ``KernelLibrary``:
its source file, its library name and the FFI targets it exports. Each source includes the
shared ``csrc/rnn_cpu.h``. On first use the source is compiled with the system C++ compiler
(``$CXX``, else ``c++``) for the machine it runs on (``-march=native``) into a cache directory
(``$RNN_JAX_KERNEL_CACHE``, else ``~/.cache/rnn_jax/kernels``; the temp directory if that cannot
be written), keyed by the source and the headers beside it, the flags, the jaxlib version and
the CPU. The build goes to a temporary file that is renamed into place, so concurrent first
uses never load half a library. If there is no compiler or the build fails, ``available()`` is
False, a warning says why once, and callers use the ``lax.scan`` path.

``RNN_JAX_CPU_KERNELS=0`` (or ``set_enabled(False)``) turns every kernel off.

``rows_batched`` gives a kernel call on N rows a vmap rule: the mapped axis joins the rows, so a
vmapped cell still makes one call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile
import threading
import warnings
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

CSRC = pathlib.Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w")

_enabled = os.environ.get("RNN_JAX_CPU_KERNELS", "1") != "0"


def set_enabled(enabled: bool) -> None:
  """Turn the kernels on or off for functions traced from now on (jitted ones keep what they traced)."""
  global _enabled
  _enabled = bool(enabled)


def enabled() -> bool:
  """True if the kernels are switched on (one may still be unavailable; see ``KernelLibrary.available``)."""
  return _enabled


def _cpu_signature() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


class KernelLibrary:
  """One C++ source in ``csrc/``, compiled on first use, with the FFI targets it exports.

    LIBRARY = KernelLibrary("lstm_cpu", {"rnn_jax_lstm_forward": "RnnJaxLstmForward", ...})
    if LIBRARY.available(): jax.ffi.ffi_call("rnn_jax_lstm_forward", ...)

  targets: {FFI target name: exported C symbol}, registered for the CPU platform on load.
  """

  def __init__(self, name: str, targets: Mapping[str, str], source: Optional[pathlib.Path] = None):
    self.name = name
    self.source = source or CSRC / f"{name}.cc"
    self.targets = dict(targets)
    self._lock = threading.Lock()
    self._library: Optional[ctypes.CDLL] = None
    self._failure: Optional[str] = None

  def _library_path(self, compiler: str) -> pathlib.Path:
    key = hashlib.sha256()
    headers = [header.read_bytes() for header in sorted(self.source.parent.glob("*.h"))]
    for part in (self.source.read_bytes(), *headers, compiler.encode(), " ".join(FLAGS).encode(),
                 jax.lib.__version__.encode(), _cpu_signature().encode()):
      key.update(part)
      key.update(b"\0")
    cache = pathlib.Path(os.environ.get("RNN_JAX_KERNEL_CACHE",
                                        pathlib.Path.home() / ".cache" / "rnn_jax" / "kernels"))
    return cache / key.hexdigest()[:16] / f"lib{self.name}.so"

  def _build(self, path: pathlib.Path, compiler: str) -> None:
    """Compile into a temporary file and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as handle:
      partial = pathlib.Path(handle.name)
    try:
      command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(self.source), "-o", str(partial)]
      done = subprocess.run(command, capture_output=True, text=True, check=False)
      if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
      os.replace(partial, path)
    finally:
      partial.unlink(missing_ok=True)

  def load(self) -> Optional[ctypes.CDLL]:
    """Build (once per machine), load and register the targets; None on failure (warned once)."""
    with self._lock:
      if self._library is not None or self._failure is not None:
        return self._library
      compiler = os.environ.get("CXX", "c++")
      try:
        path = self._library_path(compiler)
        if not path.exists():
          try:
            self._build(path, compiler)
          except OSError:  # an unwritable cache directory: build in the temp directory instead
            path = pathlib.Path(tempfile.gettempdir()) / "rnn_jax_kernels" / path.parent.name / path.name
            if not path.exists():
              self._build(path, compiler)
        library = ctypes.CDLL(str(path))
        for target, symbol in self.targets.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        self._library = library
      except (OSError, RuntimeError, AttributeError, ValueError) as error:
        self._failure = f"{type(error).__name__}: {error}"
        warnings.warn(f"rnn_jax: the {self.name} kernel is unavailable, using lax.scan instead "
                      f"({self._failure})", RuntimeWarning, stacklevel=3)
      return self._library

  def available(self) -> bool:
    """True if kernels are switched on and this one is built (building it on first call)."""
    return _enabled and self.load() is not None

  def unavailable_reason(self) -> Optional[str]:
    """Why ``available()`` is False, or None."""
    if not _enabled:
      return "switched off (RNN_JAX_CPU_KERNELS=0 or set_enabled(False))"
    return None if self.load() is not None else self._failure

  def require(self) -> ctypes.CDLL:
    library = self.load()
    if library is None:
      raise RuntimeError(f"the {self.name} kernel is unavailable: {self._failure}")
    return library

  def vector_width(self) -> int:
    """Floats per SIMD vector in the built library; H must be a multiple of it."""
    function = self.require().rnn_jax_vector_width
    function.restype = ctypes.c_int64
    return int(function())

  def gates_per_pass(self) -> int:
    """Gates a product block of the built library covers in one pass over a gate panel (4 with
    AVX-512, 2 with AVX2); ``gate_panels`` groups the gates by it."""
    function = self.require().rnn_jax_gates_per_pass
    function.restype = ctypes.c_int64
    return int(function())

  def gate_panels(self, w: jax.Array, gates: int) -> jax.Array:
    """``gate_panels`` for this library's vector width and gate passes: what its step kernel reads."""
    return gate_panels(w, gates, self.vector_width(), self.gates_per_pass())

  def why_not(self, hidden_size: int, *arrays) -> Optional[str]:
    """None if the library can run a recurrence of H = ``hidden_size`` on ``arrays``, else why not:
    switched off or not built, H not a multiple of the vector width, or an array not float32."""
    if not self.available():
      return f"{self.name} kernel unavailable: {self.unavailable_reason()}"
    width = self.vector_width()
    if hidden_size % width != 0:
      return f"{self.name} kernel needs H to be a multiple of {width}, got H={hidden_size}"
    dtypes = sorted({str(jnp.result_type(x)) for x in arrays} - {"float32"})
    if dtypes:
      return f"{self.name} kernel is float32 only, got {dtypes}"
    return None

  def applies(self, hidden_size: int, *arrays) -> bool:
    """True if ``why_not`` finds nothing against running the library here."""
    return self.why_not(hidden_size, *arrays) is None


# ---- calls on rows N, with a vmap rule ------------------------------------------------

# The kernels hand hs and dL/dhs over batch-major: the FFI operands are [N, T, H], and the calls
# below swap them to and from the time-major [T, N, H] of the Python API. rnn()'s read-out runs
# batch-major, so that swap meets the read-out's own swap back and XLA folds the two into nothing.
# (A custom layout on a [T, N, H] operand, {2, 0, 1}, left a copy of hs behind every forward call
# and of dL/dhs before every backward call: XLA:CPU's layout assignment did not see through it.)
# a stays time-major: XLA transposes the small inputs x before the projection, so a = W_xh x
# arrives time-major and goes in as it is.


def swap_time_and_rows(x: jax.Array) -> jax.Array:
  """[T, N, H] <-> [N, T, H]: hs and dL/dhs between the Python API's order and the kernels'."""
  return jnp.swapaxes(x, 0, 1)


def batch_rows(shape) -> tuple[tuple, int]:
  """(batch axes, N) for an array [T, *batch, features]: the kernels run the batch axes as N rows."""
  batch_shape = tuple(shape[1:-1])
  return batch_shape, int(np.prod(batch_shape, dtype=np.int64))


def mask_operand(mask, T: int, N: int):
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


def rows_batched(call, in_row_axes, out_row_axes):
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


# ---- a decoding step's operands ---------------------------------------------------------

def gate_panels(w: jax.Array, gates: int, width: int, gates_per_pass: int) -> jax.Array:
  """The kernels' packed layout of a gate-blocked weight: w [G H, K] -> [H / W, G K W], W = ``width``
  (the vector width). For unit vector v the gates come in groups of ``gates_per_pass`` (the last
  one may be smaller), group after group, and inside a group g of n gates starting at gate g0:

    panels[v, (g0 K + k n + q - g0) W + lane] = w[q H + v W + lane, k]   for q in [g0, g0 + n)

  so that each pass of one unit vector's block of the product reads one contiguous stream over k.
  Inside a decoding loop the weights are loop-invariant, but XLA's loop-invariant code motion does
  not hoist a transpose on its own (it counts as too cheap), and the step would repack W_hh every
  token (LSTM music generation, B=32, H=256: 50 ms a call against 27 ms hoisted). The float32
  ``reduce_precision`` after it is the identity, bit for bit, and makes the pair worth hoisting.
  """
  rows, K = w.shape
  H = rows // gates
  groups = []
  for first in range(0, gates, gates_per_pass):
    n = min(gates_per_pass, gates - first)
    block = w[first * H:(first + n) * H].reshape(n, H // width, width, K).transpose(1, 3, 0, 2)
    groups.append(block.reshape(H // width, K * n * width))
  panels = groups[0] if len(groups) == 1 else jnp.concatenate(groups, axis=1)
  return jax.lax.reduce_precision(panels, exponent_bits=8, mantissa_bits=23)


def step_on_rows(call, x: jax.Array, weights: tuple, carries: tuple):
  """A decoding step's kernel call on rows: x [..., F] and carries [..., H] (the same leading axes,
  none for one example) are flattened to N rows for ``call(x, *weights, *carries)``, which has a
  vmap rule (``rows_batched``); its outputs [N, H] come back with the leading axes."""
  batch_shape = carries[0].shape[:-1]
  rows = lambda v: v.reshape((-1, v.shape[-1]))
  outs = call(rows(x), *weights, *(rows(c) for c in carries))
  return tuple(out.reshape(batch_shape + out.shape[-1:]) for out in outs)
