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


def add_kernel_flags_arg(parser) -> None:
  """``--kernel_flags``: extra C++ flags of the kernel build (apply with
  `use_kernel_flags` before anything loads the kernels)."""
  parser.add_argument(
      "--kernel_flags", default="",
      help="extra C++ flags of the kernel build, e.g. -mno-avx512f (an AVX2 "
      "build; with XLA_FLAGS=--xla_cpu_max_isa=AVX2 this CPU acts as an AVX2 "
      "one)")


def use_kernel_flags(args) -> None:
  if args.kernel_flags:
    from legr_jax.cpu import kernels  # pylint: disable=g-import-not-at-top
    kernels.use_flags(*args.kernel_flags.split())
