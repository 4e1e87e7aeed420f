"""Process-level settings that make JAX on CPU run RNN training steps faster.

``retain_freed_memory()`` is the one setting here. Call it before the first JAX
computation of the process (the experiments do it first thing in ``main``).

Why it matters. XLA:CPU gives each execution of a compiled program one temporary
buffer of ``compiled.memory_analysis().temp_size_in_bytes`` (73 MB for the
benchmark's LSTM char-LM train step at B=32, T=128, H=256). glibc serves requests
above 32 MB with a fresh ``mmap`` and unmaps them on ``free``, so every step
touches all of that memory for the first time again: about 19,000 page faults per
step, 20 ms of a 70 ms step on a 2-core CPU. With the arenas merged into the main
heap, ``mmap`` disabled and trimming off, freed memory stays in the process and the
next step reuses it without faults (the same step: 50 ms).

The cost: the process keeps its peak heap until it exits instead of handing freed
memory back to the OS. Set ``RNN_JAX_RETAIN_FREED_MEMORY=0`` to leave glibc's
defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import warnings
import os

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV_SWITCH = "RNN_JAX_RETAIN_FREED_MEMORY"
_applied = False


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # pragma: no cover - private API moved
    return False


def retain_freed_memory() -> bool:
  """Keep freed heap memory for reuse instead of unmapping it (glibc only).

    mallopt(M_ARENA_MAX, 1)        every thread allocates from the main heap,
                                   which grows without a per-heap size cap
    mallopt(M_MMAP_MAX, 0)         no allocation is served by its own mmap
    mallopt(M_TRIM_THRESHOLD, max) the top of the heap is never given back

  Returns True when the settings were applied; False on a C library without
  ``mallopt`` (macOS, musl), when ``RNN_JAX_RETAIN_FREED_MEMORY=0``, or when a
  setting is refused. Safe to call more than once. It only takes full effect
  before JAX starts its CPU client: threads that already hold a malloc arena keep it.
  """
  if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  path = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(path)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  if _backend_started():
    warnings.warn(
        "retain_freed_memory() called after JAX started its CPU client; its worker "
        "threads keep their own malloc arenas, so XLA's temporary buffers are still "
        "unmapped after every call. Call it before the first JAX computation.", RuntimeWarning,
        stacklevel=2)
  global _applied
  _applied = (mallopt(_M_ARENA_MAX, 1) == 1
              and mallopt(_M_MMAP_MAX, 0) == 1
              and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1)
  return _applied


def retains_freed_memory() -> bool:
  """Whether ``retain_freed_memory()`` has been applied in this process."""
  return _applied
