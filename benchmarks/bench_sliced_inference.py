"""Images/second of the unpruned and a ~50%-FLOPs sliced ResNet-56 (CPU).

Usage: python -m benchmarks.bench_sliced_inference [--batch 256] [--repeats 5]

The pruned network removes the lowest-L2 filters globally (alpha=1, kappa=0,
safeguard 0.1) until 50% of the MACs remain, then slices it physically; once
channel by channel (round_to 1) and once keeping every group's width a
multiple of 8 (round_to 8, `ranking.masks_for_budget`), which XLA:CPU's
vectorized convolutions run closer to their full-width speed.
Timing: eval-mode forward at the given batch, after compilation, median of
``--repeats`` runs, for each `legr_jax.ops.Ops`: 'xla' (plain XLA and flax,
XLA's default options), 'cpu-plain' (the CPU compile options, no packing,
no C++ kernels) and 'cpu' (``legr_jax.ops.resolve('auto')``: what training
and the search use on this CPU).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from legr_jax import cost, cpu, models, ops, provenance, ranking, surgery
from legr_jax.cpu import malloc_tuning


def l2_masks_for_half_flops(net, variables, round_to=1):
  """Plain global L2 ranking (LeGR with alpha=1, kappa=0) to <= 50% MACs
  (``round_to``: kept widths in multiples of that, see masks_for_budget)."""
  spec = net.spec
  norms = ranking.filter_norms(spec, variables["params"])
  ones = {l: 1.0 for l in spec.layer_names}
  zeros = {l: 0.0 for l in spec.layer_names}
  scores = ranking.group_scores(spec, ranking.affine_scores(norms, ones, zeros))
  masks, _ = ranking.masks_for_budget(spec, scores, flops=0.5, safeguard=0.1,
                                      round_to=round_to)
  return masks


def images_per_second(net, variables, batch, repeats):
  fwd = jax.jit(lambda v, x: net.apply(v, x),
                compiler_options=net.ops.jit_options())
  x = jax.random.normal(jax.random.key(0), (batch,) + net.input_shape)
  fwd(variables, x).block_until_ready()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fwd(variables, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return batch / float(np.median(times))


def main():
  malloc_tuning.retain_freed_memory()  # before JAX's first computation
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--round_to", type=int, nargs="*", default=[1, 8, 16],
                      help="channel granularities of the pruning to time")
  args = parser.parse_args()
  net = models.get("resnet56")
  variables = net.init(jax.random.key(0))
  prov = provenance.collect()
  print(f"device: {jax.devices()[0].device_kind} ({prov.get('cpu_model')}),"
        f" batch {args.batch}")
  variants = {"xla": ops.XLA}
  if jax.default_backend() == "cpu":
    variants["cpu-plain"] = cpu.ops(use_kernels="never", lanes=0)
    variants["cpu"] = ops.resolve("auto")
  for round_to in args.round_to:
    masks = l2_masks_for_half_flops(net, variables, round_to)
    small, small_vars = surgery.slice_network(net, variables, masks)
    frac = float(cost.flops(net.spec, masks)) / cost.unpruned(net.spec)
    widths = sorted({int(np.sum(m)) for m in masks.values()})
    print(f"unpruned resnet56: {cost.unpruned(net.spec) / 1e6:.2f} M MACs; "
          f"sliced (round_to={round_to}): "
          f"{cost.unpruned(small.spec) / 1e6:.2f} M MACs ({frac:.1%} of "
          f"unpruned), group widths {widths}")
    for label, variant in variants.items():
      full_ips = images_per_second(net.with_ops(variant), variables,
                                   args.batch, args.repeats)
      small_ips = images_per_second(small.with_ops(variant), small_vars,
                                    args.batch, args.repeats)
      print(f"[round_to {round_to}, ops {label}: {variant.name}] unpruned "
            f"{full_ips:.0f} images/s, sliced {small_ips:.0f} images/s, "
            f"time ratio sliced/unpruned {full_ips / small_ips:.3f} (goal "
            "<= 0.6)", flush=True)


if __name__ == "__main__":
  main()
