"""Times one LeGR population step: norms -> affine -> group scores -> masks.

A population of (alpha, kappa) sets (LeGR's initial distribution) is pruned to
a FLOPs budget in one jitted, vmapped call; the figure is the wall time per
population after compilation (median over repeats).

  python -m benchmarks.bench_ranking            # ResNet-56, population 64
  python -m benchmarks.bench_ranking --model mobilenetv2
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import legr_jax
from legr_jax import cost, ranking


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet56")
  p.add_argument("--population", type=int, default=64)
  p.add_argument("--flops", type=float, default=0.47)
  p.add_argument("--safeguard", type=float, default=0.1)
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--goal_ms", type=float, default=50.0)
  args = p.parse_args()

  net = legr_jax.models.get(args.model, num_classes=10)
  spec = net.spec
  params = net.init(jax.random.key(0))["params"]
  n_pop, layers = args.population, spec.layer_names
  rng = np.random.default_rng(0)
  norms0 = ranking.filter_norms(spec, params)
  alphas = {l: jnp.asarray(np.exp(rng.normal(size=n_pop)), jnp.float32)
            for l in layers}
  kappas = {l: jnp.asarray(rng.normal(size=n_pop) * float(jnp.std(norms0[l])),
                           jnp.float32) for l in layers}

  @jax.jit
  def population_step(params, alphas, kappas):
    norms = ranking.filter_norms(spec, params)          # shared by all members

    def member(alpha, kappa):
      scores = ranking.group_scores(
          spec, ranking.affine_scores(norms, alpha, kappa))
      return ranking.masks_for_budget(spec, scores, flops=args.flops,
                                      safeguard=args.safeguard)

    return jax.vmap(member)(alphas, kappas)

  t0 = time.perf_counter()
  masks, feasible = jax.block_until_ready(population_step(params, alphas,
                                                          kappas))
  compile_s = time.perf_counter() - t0
  assert bool(jnp.all(feasible))
  kept = jax.vmap(lambda m: cost.flops(spec, m))(masks) / cost.unpruned(spec)
  assert bool(jnp.all(kept <= args.flops))

  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(population_step(params, alphas, kappas))
    times.append(time.perf_counter() - t0)
  times_ms = np.array(times) * 1e3
  med = float(np.median(times_ms))
  n_channels = sum(g.size for g in spec.groups)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPU cores, jax {jax.__version__}")
  print(f"{args.model}: {len(layers)} conv layers, {len(spec.groups)} groups, "
        f"{n_channels} channels; population {n_pop}, FLOPs budget "
        f"{args.flops}, safeguard {args.safeguard}")
  print(f"kept FLOPs fraction: min {float(kept.min()):.4f}, max "
        f"{float(kept.max()):.4f}")
  print(f"first call (compile + run): {compile_s:.2f} s")
  print(f"per population of {n_pop}: median {med:.2f} ms, min "
        f"{times_ms.min():.2f} ms, p90 {np.percentile(times_ms, 90):.2f} ms "
        f"over {args.repeats} runs ({1e3 * med / n_pop:.0f} us per member)")
  verdict = "met" if med < args.goal_ms else "MISSED"
  print(f"goal < {args.goal_ms:g} ms: {verdict}")


if __name__ == "__main__":
  main()
