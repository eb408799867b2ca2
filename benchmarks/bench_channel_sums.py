"""Milliseconds per training-mode BatchNorm (forward + backward): XLA:CPU's
reductions (`batchnorm.column_sums`) vs the one-pass C++ sums
(`channel_sums`), 128 images, widths of a 47%-FLOPs ResNet-56 candidate.

  python -m benchmarks.bench_channel_sums [--batch 128] [--repeats 21]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from benchmarks.timing import median_ms

from legr_jax.cpu import batchnorm, compile_options, kernels, malloc_tuning

# (spatial, channels)
SHAPES = [(32, 16), (32, 7), (32, 2), (16, 32), (16, 12), (8, 64), (8, 46)]


def _bn_step(kernel: bool):
  def f(x, scale, bias, g):
    y, vjp = jax.vjp(lambda x, s, b: batchnorm.batch_norm_train(
        x, s, b, 1e-5, kernel)[0], x, scale, bias)
    return y, vjp(g)
  return jax.jit(f, compiler_options=compile_options.CPU)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=21)
  args = p.parse_args()
  malloc_tuning.retain_freed_memory()
  if not kernels.available():
    sys.exit("the channel-sum kernels are unavailable here (see the warning)")
  print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, batch "
        f"{args.batch}; BatchNorm forward + backward, ms (median of "
        f"{args.repeats})")
  print(f"{'shape':>12} {'XLA':>8} {'C++ sums':>9}")
  totals = np.zeros(2)
  rng = np.random.default_rng(0)
  for hw, c in SHAPES:
    shape = (args.batch, hw, hw, c)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    scale, bias = jnp.ones(c), jnp.zeros(c)
    row = [median_ms(_bn_step(k), x, scale, bias, g, repeats=args.repeats)
           for k in (False, True)]
    totals += row
    print(f"{hw:>5}x{hw:<3}{c:>3} {row[0]:8.2f} {row[1]:9.2f}")
  print(f"{'sum':>12} {totals[0]:8.2f} {totals[1]:9.2f}")


if __name__ == "__main__":
  main()
