"""Timing shared by the micro-benchmarks."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fn, *args, repeats: int) -> float:
  """Median wall milliseconds of ``fn(*args)`` (results ready) over
  ``repeats`` calls, after one warm-up call (the compile)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))
