r"""A family's fine-tuning: members one after another (sliced networks,
`train.fit`) against all at once (masked full-size networks batched with
vmap, `train.members`), on the device at hand. Decides
`family.default_finetune_mode`.

  python -m benchmarks.bench_family_finetune                 # ResNet-20
  python -m benchmarks.bench_family_finetune --budgets=0.3,0.5,0.7 --epochs=1

Data: the shared CIFAR-10 subset when present (3,085 train images of the
seeded three-way split), otherwise scikit-learn's digits. The network is
randomly initialised (speed does not depend on the weights) and pruned by
L2 to each budget. Each mode runs ``--rounds`` times, interleaved (A B A B),
each in a fresh workdir, so compiles are included as a user meets them.
Printed: wall seconds of the whole family (pruning, fine-tuning, evaluation,
latency) and of the fine-tuning alone, and the members' val accuracies
(both modes must agree).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

from absl import app, flags, logging

import jax
import numpy as np

from legr_jax import family, methods, models, ops, provenance, train
from legr_jax.cpu import malloc_tuning

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                      "shared", "data", "cifar10_train_subset.npz")

flags.DEFINE_string("model", "resnet20", "Model name.")
flags.DEFINE_list("budgets", ["0.3", "0.5", "0.7"], "FLOPs budgets.")
flags.DEFINE_integer("epochs", 1, "Fine-tuning epochs.")
flags.DEFINE_integer("batch_size", 128, "Fine-tuning batch.")
flags.DEFINE_integer("rounds", 1, "Runs of each mode (interleaved).")
flags.DEFINE_enum("cpu_kernels", "auto", list(ops.CPU_KERNELS),
                  "Sequential mode's ops (the parallel mode is plain XLA).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  malloc_tuning.retain_freed_memory()
  if os.path.exists(SHARED):
    cfg = train.TrainConfig(model=FLAGS.model, dataset=f"npz:{SHARED}",
                            val_size=1000, test_size=1000)
  else:
    cfg = train.TrainConfig(model=FLAGS.model, dataset="digits")
  ds = train.load_dataset(cfg)
  net = models.get(FLAGS.model, num_classes=ds.num_classes,
                   input_shape=ds.image_shape)
  variables = jax.device_get(net.init(jax.random.PRNGKey(0)))
  ft = cfg.replace(epochs=FLAGS.epochs, lr=0.01, nesterov=True,
                   schedule="multistep", milestones=(0.3, 0.6, 0.8),
                   gamma=0.2, batch_size=FLAGS.batch_size,
                   cpu_kernels=FLAGS.cpu_kernels, log_every_steps=10)
  dev = jax.devices()[0]
  prov = provenance.collect()
  isa = ",".join(k for k, v in prov.get("cpu_isa", {}).items() if v)
  print(f"device: {dev.device_kind} x{len(jax.local_devices())}; CPU: "
        f"{prov.get('cpu_model') or platform.processor()} ({isa}); data: "
        f"{ds.summary()}")
  print(f"{FLAGS.model}, budgets {FLAGS.budgets}, {FLAGS.epochs} epoch(s), "
        f"batch {FLAGS.batch_size}")
  results = {"sequential": [], "parallel": []}
  for _ in range(FLAGS.rounds):
    for mode in ("sequential", "parallel"):
      with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        rows = family.prune_family(
            net, variables, ds, methods.get("l2"), FLAGS.budgets,
            workdir=wd, finetune=ft, finetune_mode=mode, latency_batch=1,
            latency_repeats=3, progress=False, log=lambda s: None)
        wall = time.perf_counter() - t0
      tune = sum(r["finetune_seconds"] for r in rows)
      accs = [round(r["val_accuracy"], 4) for r in rows]
      results[mode].append((wall, tune, accs))
      print(f"{mode:>10}: family {wall:7.1f} s, fine-tuning {tune:7.1f} s, "
            f"val acc {accs}")
  seq = np.median([w for w, _, _ in results["sequential"]])
  par = np.median([w for w, _, _ in results["parallel"]])
  print(f"median family wall: sequential {seq:.1f} s, parallel {par:.1f} s "
        f"(parallel / sequential = {par / seq:.2f})")


if __name__ == "__main__":
  app.run(main)
