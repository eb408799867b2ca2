r"""Learns LeGR's per-layer ranking (alpha, kappa) by regularized evolution.

  python -m experiments.train --model=resnet56 --dataset=cifar10 \
      --epochs=200 --workdir=workdirs/resnet56_cifar10
  python -m experiments.learn_ranking --checkpoint=workdirs/resnet56_cifar10 \
      --target_flops=0.47 --tau_hat=0 --generations=400 \
      --workdir=workdirs/resnet56_cifar10_legr

The model, data set and validation split default to the baseline's own
(``--checkpoint``'s config.json), so the search never validates on images the
baseline trained on. The learned ranking lands in WORKDIR/ranking.json (layer
name -> alpha, kappa) beside an orbax copy (WORKDIR/ranking); every
evaluation is logged to WORKDIR/evaluations.jsonl and the progress is drawn in
WORKDIR/progress.png. Rerunning the same command resumes a killed search; a
different search in WORKDIR is refused unless --overwrite.

Several hosts (a TPU pod slice, a CPU cluster): run the same command on every
host with --distributed (or --coordinator_address, --num_processes and
--process_id where JAX cannot find its peers itself) and a --workdir all of
them share; each round's candidates are spread over every host's devices and
process 0 writes the plain files.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from experiments import common

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "CPU only: split the host into this many JAX "
    "devices (sets --xla_force_host_platform_device_count before JAX "
    "starts); candidates are spread over them.")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one program over several hosts: calls "
    "jax.distributed.initialize() (which finds its peers by itself on TPU "
    "pods, SLURM and similar; elsewhere give the three flags below on every "
    "host). Every host runs the same command; --workdir must be shared.")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (implies "
    "--distributed).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in "
                                     "all (implies --distributed).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index"
                                  ", 0 .. num_processes-1.")
WORKDIR = flags.DEFINE_string("workdir", None, "Search directory (required).")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Workdir of the pretrained baseline written by "
    "experiments.train (required).")
MODEL = flags.DEFINE_string("model", None, "Expected model name (a check "
                            "against the baseline; default: the baseline's).")
DATASET = flags.DEFINE_string("dataset", None, "Data set (default: the "
                              "baseline's).")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
VAL_SIZE = flags.DEFINE_integer("val_size", None, "Validation examples carved"
                                " from the training data (default: the "
                                "baseline's split).")
VAL_EXAMPLES = flags.DEFINE_integer(
    "val_examples", None, "Use only the first this many validation examples "
    "for the fitness (default: all).")
TARGET_FLOPS = flags.DEFINE_float("target_flops", 0.47, "FLOPs budget (kept "
                                  "fraction) the search prunes to.")
SAFEGUARD = flags.DEFINE_float("safeguard", 0.1, "Every group keeps at least "
                               "this fraction of its channels.")
TAU_HAT = flags.DEFINE_integer("tau_hat", 0, "SGD steps before measuring a "
                               "candidate's loss (0: right after pruning).")
LR = flags.DEFINE_float("lr", 0.01, "Learning rate of the tau_hat steps.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Batch of the tau_hat "
                                  "steps.")
EVAL_BATCH_SIZE = flags.DEFINE_integer("eval_batch_size", 128,
                                       "Validation batch.")
GENERATIONS = flags.DEFINE_integer(
    "generations", 400, "Evaluations in total, the initial population "
    "included (LeGR's G).")
POPULATION = flags.DEFINE_integer("population", 64, "Population size P.")
SAMPLE = flags.DEFINE_integer("sample", 16, "Tournament sample size S.")
MUTATE = flags.DEFINE_float("mutate_fraction", 0.1, "Share of the layers "
                            "mutated per child.")
K = flags.DEFINE_integer(
    "candidates_per_round", 1, "K of the batched evolution: candidates "
    "proposed and evaluated together (1: the sequential algorithm).")
BACKEND = flags.DEFINE_enum("backend", "auto", ["auto", "masked", "sliced"],
                            "Candidate evaluation backend (auto: sliced on "
                            "CPU, masked on GPU/TPU).")
BUCKET = flags.DEFINE_integer("bucket", 4, "Sliced backend: the validation "
                              "pass rounds kept widths up to a multiple of "
                              "this (the tau_hat steps use exact widths).")
WORKERS = flags.DEFINE_integer("workers", None, "Sliced backend: candidates "
                               "evaluated concurrently.")
SEED = flags.DEFINE_integer("seed", 0, "Search seed.")
CKPT_EVERY = flags.DEFINE_integer("checkpoint_every", 16, "Checkpoint the "
                                  "search state every this many evaluations.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete a different search "
                              "found in --workdir and start over.")
PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
CRASH = flags.DEFINE_integer("debug_crash_after", None, "Testing aid: "
                             "SIGKILL the process after this many "
                             "evaluations.")
flags.mark_flags_as_required(["workdir", "checkpoint"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CPU_DEVICES.value:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # JAX is imported only now, so --cpu_devices can take effect.
  cpu_kernels = common.start_process()  # before JAX's first computation
  if DISTRIBUTED.value or COORDINATOR.value or NUM_PROCESSES.value:
    import jax  # pylint: disable=g-import-not-at-top
    # CPU processes exchange losses through gloo (XLA:CPU's collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(coordinator_address=COORDINATOR.value,
                                 num_processes=NUM_PROCESSES.value,
                                 process_id=PROCESS_ID.value)
    except (ValueError, RuntimeError) as e:
      print(f"error: jax.distributed.initialize failed: {str(e).rstrip('.')}. "
            "JAX finds its "
            "peers by itself only on TPU pods and cluster managers such as "
            "SLURM; elsewhere pass --coordinator_address=HOST:PORT (process "
            "0's), --num_processes and --process_id on every host.",
            file=sys.stderr)
      return 2
  from legr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from legr_jax import search, train  # pylint: disable=g-import-not-at-top

  net, variables, tconf = train.load_trained(CHECKPOINT.value)
  if MODEL.value and MODEL.value != net.name:
    print(f"error: --model={MODEL.value} but {CHECKPOINT.value} holds a "
          f"{net.name}", file=sys.stderr)
    return 2
  dataset = DATASET.value or tconf.dataset
  same_data = dataset == tconf.dataset and VAL_SIZE.value is None
  config = search.SearchConfig(
      baseline=os.path.abspath(CHECKPOINT.value), net_config=net.config,
      dataset=dataset, data_dir=DATA_DIR.value or tconf.data_dir,
      val_size=tconf.val_size if same_data else VAL_SIZE.value,
      val_fraction=tconf.val_fraction, test_size=tconf.test_size,
      split_seed=tconf.split_seed,
      flops=TARGET_FLOPS.value, safeguard=SAFEGUARD.value,
      tau_hat=TAU_HAT.value, lr=LR.value, batch_size=BATCH_SIZE.value,
      eval_batch_size=EVAL_BATCH_SIZE.value, val_examples=VAL_EXAMPLES.value,
      population=POPULATION.value, sample=SAMPLE.value,
      evaluations=GENERATIONS.value, mutate_fraction=MUTATE.value,
      candidates_per_round=K.value, seed=SEED.value, backend=BACKEND.value,
      bucket=BUCKET.value, workers=WORKERS.value,
      checkpoint_every=CKPT_EVERY.value, cpu_kernels=cpu_kernels)
  try:
    ds = data_lib.get_dataset(config.dataset, data_dir=config.data_dir,
                              val_fraction=config.val_fraction,
                              val_size=config.val_size,
                              test_size=config.test_size,
                              seed=config.split_seed)
    if tuple(ds.image_shape) != tuple(net.input_shape):
      print(f"error: {config.dataset} has images {ds.image_shape}, the "
            f"network expects {net.input_shape}", file=sys.stderr)
      return 2
    out = search.search(config, WORKDIR.value, net=net, variables=variables,
                        dataset=ds, overwrite=OVERWRITE.value,
                        progress=PROGRESS.value, crash_after=CRASH.value)
  except (search.SearchConflictError, data_lib.NotPreparedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"best_loss": out.loss,
                    "ranking": os.path.join(out.workdir, "ranking.json")}))
  return 0


if __name__ == "__main__":
  app.run(main)
