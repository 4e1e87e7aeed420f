"""Process-level settings that make JAX on CPU run RNN training steps faster.

``retain_freed_memory()`` is the one setting here, and ``import rnn_jax`` applies it by
itself (``apply_at_import``) when it can still take effect: glibc's ``mallopt`` is there,
JAX has not started its backend yet, no accelerator plugin is installed (JAX will run on the
CPU), and ``RNN_JAX_RETAIN_FREED_MEMORY`` is not ``0``. Nothing has to be called.

Why it matters. XLA:CPU gives each execution of a compiled program one temporary
buffer of ``compiled.memory_analysis().temp_size_in_bytes`` (73 MB for the
benchmark's LSTM char-LM train step at B=32, T=128, H=256). glibc serves requests
above 32 MB with a fresh ``mmap`` and unmaps them on ``free``, and XLA's worker threads
allocate from their own arenas, whose heaps are capped at 64 MB, so every step
touches all of that memory for the first time again: about 12,000-19,000 page faults
per step, 20 ms of a 70 ms step on a 2-core CPU. With the arenas merged into the main
heap, ``mmap`` disabled and trimming off, freed memory stays in the process and the
next step reuses it without faults (the same step: 50 ms).

Why at import, and only then. The arena setting only holds for threads that have not
allocated yet: once XLA's thread pool has run a computation, its threads keep their own
arenas and the buffer is mapped afresh on every call whatever is set later. The glibc
environment variables (``MALLOC_ARENA_MAX`` and friends) are read when the process starts,
which a library cannot control. ``import rnn_jax`` is the last moment the library sees
before the first JAX computation of a typical program (``import jax`` alone starts
nothing), so that is where it applies the setting. XLA has no option for it: none of
``--xla_cpu_*`` keeps the temporary buffer between calls.

The cost: the process keeps its peak heap until it exits instead of handing freed
memory back to the OS, and every thread allocates from one arena. Set
``RNN_JAX_RETAIN_FREED_MEMORY=0`` (before the import) to leave glibc's defaults alone.
``status()`` says whether and how it was applied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import warnings

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV_SWITCH = "RNN_JAX_RETAIN_FREED_MEMORY"
_applied = False
_how = "not applied: neither import rnn_jax nor retain_freed_memory() has tried yet"


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # pragma: no cover - private API moved
    return False


def _switched_off() -> bool:
  return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def accelerator_plugin() -> str:
  """The name of an installed JAX accelerator plugin (CUDA, ROCm, TPU), or "" if there is none.

  Read without starting a backend: the ``jax_plugins`` namespace packages and entry points
  JAX itself discovers, and ``libtpu``. ``JAX_PLATFORMS=cpu`` (or a list starting with cpu)
  means the CPU all the same.
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms and platforms.split(",")[0].strip() == "cpu":
    return ""
  try:
    import pkgutil
    from jax._src import xla_bridge
    namespace = getattr(xla_bridge, "jax_plugins", None)
    if namespace is not None:
      for module in pkgutil.iter_modules(namespace.__path__):
        return module.name
  except (ImportError, AttributeError):  # pragma: no cover - private API moved
    pass
  try:
    import importlib.metadata
    for entry in importlib.metadata.entry_points(group="jax_plugins"):
      return entry.name
  except Exception:  # pragma: no cover - broken package metadata must not break the import
    pass
  return "libtpu" if importlib.util.find_spec("libtpu") is not None else ""


def _mallopt():
  path = ctypes.util.find_library("c")
  try:
    mallopt = ctypes.CDLL(path).mallopt
  except (OSError, AttributeError, TypeError):
    return None
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def _apply(mallopt, how: str) -> bool:
  global _applied, _how
  ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1)
  if not _applied:
    _how = how if ok else "not applied: mallopt refused a setting"
  _applied = _applied or ok
  return ok


def retain_freed_memory() -> bool:
  """Keep freed heap memory for reuse instead of unmapping it (glibc only).

    mallopt(M_ARENA_MAX, 1)        every thread allocates from the main heap,
                                   which grows without a per-heap size cap
    mallopt(M_MMAP_MAX, 0)         no allocation is served by its own mmap
    mallopt(M_TRIM_THRESHOLD, max) the top of the heap is never given back

  ``import rnn_jax`` already calls this on CPU-only installs (see the module docstring);
  call it yourself to apply it anyway (e.g. with an accelerator plugin installed, for
  host-side XLA:CPU work). Returns True when the settings were applied; False on a C
  library without ``mallopt`` (macOS, musl), when ``RNN_JAX_RETAIN_FREED_MEMORY=0``, or
  when a setting is refused. Safe to call more than once. It only takes full effect
  before JAX starts its CPU client: threads that already hold a malloc arena keep it.
  """
  global _how
  if _switched_off():
    _how = f"not applied: {ENV_SWITCH}=0"
    return False
  mallopt = _mallopt()
  if mallopt is None:
    _how = "not applied: this C library has no mallopt"
    return False
  if _backend_started():
    warnings.warn(
        "retain_freed_memory() called after JAX started its CPU client; its worker "
        "threads keep their own malloc arenas, so XLA's temporary buffers are still "
        "unmapped after every call. Call it before the first JAX computation.", RuntimeWarning,
        stacklevel=2)
    return _apply(mallopt, "applied by retain_freed_memory() after JAX's backend had started (partial effect)")
  return _apply(mallopt, "applied by retain_freed_memory() before JAX's backend started")


def apply_at_import() -> bool:
  """What ``import rnn_jax`` runs: ``retain_freed_memory()`` when it can take full effect and is wanted.

  It does nothing (and says why in ``status()``) when ``RNN_JAX_RETAIN_FREED_MEMORY=0``, when
  JAX's backend has already started (too late to help; an explicit call would warn), when an
  accelerator plugin is installed (JAX will not run these steps on the CPU; unless
  ``JAX_PLATFORMS=cpu``), or without glibc's ``mallopt``. Never warns.
  """
  global _how
  if _applied:
    return True
  if _switched_off():
    _how = f"not applied: {ENV_SWITCH}=0"
    return False
  if _backend_started():
    _how = ("not applied at import: JAX's backend had already started; retain_freed_memory() before "
            "the first JAX computation would have applied it")
    return False
  plugin = accelerator_plugin()
  if plugin:
    _how = (f"not applied at import: the accelerator plugin {plugin} is installed; call "
            f"retain_freed_memory() to apply it anyway")
    return False
  mallopt = _mallopt()
  if mallopt is None:
    _how = "not applied: this C library has no mallopt"
    return False
  return _apply(mallopt, "applied at import rnn_jax, before JAX's backend started")


def retains_freed_memory() -> bool:
  """Whether ``retain_freed_memory()`` has been applied in this process (at import or by a call)."""
  return _applied


def status() -> dict:
  """{"applied": bool, "how": one line saying when it was applied or why not}."""
  return {"applied": _applied, "how": _how}
