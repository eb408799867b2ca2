"""Keep freed host memory in the process (glibc malloc), for XLA:CPU speed.

Why: XLA:CPU allocates an executable's buffers when it runs and frees them
when it ends. With glibc's defaults (a malloc arena per thread, large blocks
mmap'ed, free heaps and heap tops given back to the kernel) every run gets
fresh pages that the kernel must fault in again, a large share of a
training step's time (figures: benchmarks/RESULTS.md).
`retain_freed_memory` sets one arena, no mmap'ed blocks and no trimming, so
freed blocks are reused.

A process-wide setting, so the library never applies it on import: the
experiment scripts (unless ``cpu_kernels`` is 'off';
`experiments.common.start_process`) and the speed benchmarks call it first
thing, before JAX's first computation, when its threads get their arenas.
The cost: the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
  """Applies the settings above; True if it did (Linux with glibc), False
  otherwise. Idempotent."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  ok = [mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)]
  return all(r == 1 for r in ok)
