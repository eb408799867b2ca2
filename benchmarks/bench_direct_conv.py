"""Milliseconds per 3x3 conv: XLA:CPU (with output packing, as legr_jax ran
them before `direct_conv`) vs the direct kernel, forward / input gradient /
kernel gradient, 128 images, shapes of a 47%-FLOPs ResNet-56 candidate.
`direct_conv.faster_than_xla` is read off this table.

  python -m benchmarks.bench_direct_conv [--batch 128] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from benchmarks import timing
from benchmarks.timing import median_ms

from legr_jax import cpu, provenance
from legr_jax.cpu import (compile_options, conv_packing, direct_conv, kernels,
                          malloc_tuning)

DN = ("NHWC", "HWIO", "NHWC")
SAME = ((1, 1), (1, 1))
# (spatial, in, out): CIFAR ResNet-56 stages at the widths LeGR's 47%-FLOPs
# candidates keep (benchmarks/bench_search.py --sgd_steps lists them).
SHAPES = [(32, 16, 16), (32, 16, 7), (32, 16, 4), (32, 16, 2), (32, 4, 16),
          (32, 3, 16), (16, 32, 32), (16, 32, 31), (16, 31, 32),
          (8, 64, 64), (8, 64, 46), (8, 46, 64)]


def _programs(conv):
  """Jitted forward, input gradient and kernel gradient of ``conv``."""

  def traced(fn):
    return jax.jit(fn, compiler_options=compile_options.CPU)

  return (traced(conv),
          traced(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
          traced(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]))


def main():
  malloc_tuning.retain_freed_memory()  # before JAX's first computation
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--lanes", type=int, default=None,
                 help="output packing of the XLA side (default: "
                 "legr_jax.cpu.packing_lanes; 0: XLA's plain convs)")
  timing.add_kernel_flags_arg(p)
  args = p.parse_args()
  timing.use_kernel_flags(args)
  if not kernels.available():
    sys.exit("the C++ kernels are not available here (see the warning "
             "above)")
  lanes = (cpu.packing_lanes(compile_options.CPU) if args.lanes is None
           else args.lanes)
  xla = _programs(lambda x, k: conv_packing.conv_general_dilated_train(
      x, k, (1, 1), SAME, dimension_numbers=DN, lanes=lanes, direct=False))
  direct = _programs(direct_conv.conv3x3)
  prov = provenance.collect()
  print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores "
        f"({prov.get('cpu_model')}), XLA ISA {cpu.xla_isa()}, kernels built "
        f"for {cpu.kernel_isa()}, batch {args.batch}, packing lanes "
        f"{lanes}; ms (median of {args.repeats})")
  print(f"{'shape':>14s} | {'forward':>15s} | {'input grad':>15s} | "
        f"{'kernel grad':>15s}")
  totals = np.zeros((2, 3))
  for hw, cin, cout in SHAPES:
    rng = np.random.default_rng(hw * 100 + cin + cout)
    x = jnp.asarray(rng.normal(size=(args.batch, hw, hw, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(args.batch, hw, hw, cout)), jnp.float32)
    row = []
    for i, (a, b) in enumerate(zip(xla, direct)):
      ta = median_ms(a, *((x, k) if i == 0 else (x, k, g)),
                      repeats=args.repeats)
      tb = median_ms(b, *((x, k) if i == 0 else (x, k, g)),
                      repeats=args.repeats)
      totals[:, i] += (ta, tb)
      row.append(f"{ta:6.2f} -> {tb:5.2f}")
    print(f"{hw:3d}x{hw:<3d}{cin:3d}->{cout:<3d} | " + " | ".join(row),
          flush=True)
  print(f"{'sum':>14s} | " + " | ".join(
      f"{a:6.1f} -> {b:5.1f}" for a, b in zip(*totals)))


if __name__ == "__main__":
  main()
