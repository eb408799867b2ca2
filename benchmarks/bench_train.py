r"""Training throughput: images/s and the share of wall time in the compiled
step, for the real input pipeline (augmentation, normalization, prefetch).

  python -m benchmarks.bench_train                       # ResNet-20, batch 128
  python -m benchmarks.bench_train --model=resnet56 --steps=20

Data: the shared CIFAR-10 subset (../shared/data/cifar10_train_subset.npz)
when present, otherwise random uint8 images of the same shape. Each step is
timed from dispatch until its outputs are ready (`block_until_ready`), so the
"in step" share is a lower bound: without the per-step barrier host work also
overlaps with the previous step.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

import jax
import numpy as np

from legr_jax import data, models, ops, train
from legr_jax.cpu import malloc_tuning

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                      "shared", "data", "cifar10_train_subset.npz")

flags.DEFINE_string("model", "resnet20", "Model name.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("steps", 30, "Timed steps (after warm-up).")
flags.DEFINE_integer("warmup", 3, "Untimed steps (compilation).")
flags.DEFINE_list("prefetch", ["2", "0"], "Prefetch depths to compare.")
flags.DEFINE_string("json_out", None, "Also write the results here.")
flags.DEFINE_enum("cpu_kernels", "auto", list(ops.CPU_KERNELS),
                  "legr_jax.ops.resolve setting of the network's ops.")
FLAGS = flags.FLAGS


def _split():
  if os.path.exists(SHARED):
    with np.load(SHARED) as f:
      return data.ArraySplit(f["x"], f["y"]), "shared CIFAR-10 subset"
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (4096, 32, 32, 3)).astype(np.uint8)
  return data.ArraySplit(x, rng.integers(0, 10, 4096)), "random images"


def run(prefetch: int, split, net, step_fn, state, mesh, mean, std) -> dict:
  bs, n_warm, n_steps = FLAGS.batch_size, FLAGS.warmup, FLAGS.steps
  per_epoch = len(split) // bs
  step_time, done = 0.0, 0
  epoch = 0
  t_start = None
  while done < n_warm + n_steps:
    for batch in data.batches(split, bs, seed=0, epoch=epoch, augment="cifar",
                              mean=mean, std=std, prefetch=prefetch,
                              sharding=train.batch_sharding(mesh)):
      if done == n_warm:
        t_start = time.perf_counter()
        step_time = 0.0
      t0 = time.perf_counter()
      state, m = step_fn(state, batch, None)
      jax.block_until_ready((state, m))
      step_time += time.perf_counter() - t0
      done += 1
      if done == n_warm + n_steps:
        break
    epoch += 1
  wall = time.perf_counter() - t_start
  del per_epoch
  return {"prefetch": prefetch, "steps": n_steps, "wall_s": round(wall, 3),
          "images_per_s": round(n_steps * bs / wall, 1),
          "step_ms": round(1000 * step_time / n_steps, 1),
          "in_step_share": round(step_time / wall, 4),
          "state": state}


def main(argv):
  malloc_tuning.retain_freed_memory()  # before JAX's first computation
  del argv
  logging.set_verbosity(logging.WARNING)
  split, source = _split()
  mean, std = data.channel_stats(split.x)
  net = models.get(FLAGS.model, num_classes=10, input_shape=(32, 32, 3),
                   ops=ops.resolve(FLAGS.cpu_kernels))
  mesh = train.make_mesh()
  opt = train.make_optimizer(train.make_schedule(
      0.1, epochs=1, steps_per_epoch=1000))
  step_fn = train.make_train_step(net, opt, mesh)
  state = train.replicate(train.init_train_state(net, 0, opt), mesh)
  print(f"{FLAGS.model}, batch {FLAGS.batch_size}, {source}, "
        f"{jax.device_count()} x {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPU cores")
  results = []
  for p in FLAGS.prefetch:
    r = run(int(p), split, net, step_fn, state, mesh, mean, std)
    state = r.pop("state")
    results.append(r)
    print(f"prefetch={r['prefetch']}: {r['images_per_s']} images/s, "
          f"{r['step_ms']} ms/step in the compiled step, "
          f"{100 * r['in_step_share']:.1f}% of wall time in the step "
          f"({r['steps']} steps, {r['wall_s']} s)")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"model": FLAGS.model, "batch_size": FLAGS.batch_size,
                 "data": source, "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
