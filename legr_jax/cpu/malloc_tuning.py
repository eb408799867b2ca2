"""Keep freed host memory in the process (glibc malloc), for XLA:CPU speed.

XLA:CPU allocates an executable's buffers when it runs and frees them when
it ends. With glibc's defaults (a malloc arena per thread, large blocks
mmap'ed, free heaps and heap tops given back to the kernel) every run gets
fresh pages that the kernel must fault in again: one SGD step of a
47%-FLOPs ResNet-56 on 128 CIFAR images took ~130K page faults and ~0.27 s
of system time (2-core AVX-512 CPU, jax 0.10.2). `retain_freed_memory` sets
one arena, no mmap'ed blocks and no trimming, so freed blocks are reused:
then ~600 faults per step (counted with `perf stat -e page-faults` over 8
vs 24 steps), and `benchmarks/bench_search.py --sgd_steps=20` ran the step
in 0.486 s instead of 0.616 s (``LEGR_MALLOC_TUNING=0``).

A process-wide setting, so the library never applies it on import: the
experiment and benchmark scripts call it first thing (before JAX's first
computation, when its threads get their arenas), the experiments unless
``cpu_kernels`` is 'off'. The cost: the process keeps its peak heap until
it exits.
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
