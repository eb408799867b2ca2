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
process 0 writes the plain files (and holds the workdir's lock).

Bad input (flags, the baseline's files, data, a target below what
--safeguard allows) is refused before anything is written; a search in which
no candidate got a finite loss exits 1 without a ranking.
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

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
AGGREGATE = flags.DEFINE_enum(
    "aggregate", "sum", ["sum", "mean", "max"], "How the scores of layers "
    "sharing a channel (residual streams) combine: LeGR's sum, or their mean "
    "or max (ranking.group_scores); experiments.prune follows the ranking.")
CHAINS = flags.DEFINE_bool(
    "chains", False, "Also combine over the LeGR reference's cross-stage "
    "chains (ranking.chain_scores; CIFAR ResNets trained with "
    "--model_kwargs='{\"pad\": \"append\"}'); sum or mean only.")
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

# Flag values are checked while absl parses them (before JAX is imported).
common.number("cpu_devices", 1, optional=True)
common.number("num_processes", 1, optional=True)
common.number("process_id", 0, optional=True)
common.require(["process_id", "num_processes"],
               lambda d: d["process_id"] is None or (
                   d["num_processes"] is not None and
                   d["process_id"] < d["num_processes"]),
               "--process_id must be in [0, --num_processes)")
common.dataset_name("dataset", optional=True)
common.number("val_size", 1, optional=True)
common.number("val_examples", 1, optional=True)
common.number("target_flops", 0, 1, low_open=True, high_open=True,
              hint="the kept FLOPs fraction the search prunes to, e.g. 0.47 "
              "(at 1 nothing is pruned)")
common.number("safeguard", 0, 1)
common.number("tau_hat", 0)
common.number("lr", 0, low_open=True)
common.number("batch_size", 1)
common.number("eval_batch_size", 1)
common.number("population", 1)
common.number("sample", 1)
common.require(["population", "generations"],
               lambda d: d["population"] <= d["generations"],
               "--generations (evaluations in total) must be at least "
               "--population (the initial population)")
common.number("mutate_fraction", 0, 1)
common.number("candidates_per_round", 1)
common.number("bucket", 1)
common.number("workers", 1, optional=True)
common.number("checkpoint_every", 1)
common.number("debug_crash_after", 1, optional=True)
common.distinct_paths(["workdir", "checkpoint"])


def main(argv):
  del argv  # flags only: common.run refuses positional arguments
  # Inputs that exist already, still without JAX.
  common.check_output_workdir(WORKDIR.value)
  _, net_config = common.check_train_workdir(CHECKPOINT.value)
  common.check_dataset_files(DATASET.value)
  common.check_run_config(WORKDIR.value, "search_config.json")
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
      raise common.UserError(
          f"jax.distributed.initialize failed: {str(e).rstrip('.')}. JAX "
          "finds its peers by itself only on TPU pods and cluster managers "
          "such as SLURM; elsewhere pass --coordinator_address=HOST:PORT "
          "(process 0's), --num_processes and --process_id on every host."
          ) from None
  from legr_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from legr_jax import models, search, train  # pylint: disable=g-import-not-at-top
  from legr_jax.search import driver, multihost  # pylint: disable=g-import-not-at-top

  # The target against the safeguard floor first: it needs only net.json.
  try:
    spec = models.from_config(net_config).spec
  except (TypeError, KeyError, ValueError) as e:
    raise common.UserError(
        f"{os.path.join(CHECKPOINT.value, 'net.json')} does not describe a "
        f"network ({e}): rerun its training into a new workdir") from None
  if MODEL.value and MODEL.value != net_config.get("model"):
    raise common.UserError(f"--model={MODEL.value} but --checkpoint="
                           f"{CHECKPOINT.value} holds a "
                           f"{net_config.get('model')}")
  common.check_budgets_reachable(spec, [("flops", TARGET_FLOPS.value)],
                                 SAFEGUARD.value, "--target_flops")
  net, variables, tconf = train.load_trained(CHECKPOINT.value)
  dataset = DATASET.value or tconf.dataset
  same_data = dataset == tconf.dataset and VAL_SIZE.value is None
  config = search.SearchConfig(
      baseline=os.path.abspath(CHECKPOINT.value), net_config=net.config,
      dataset=dataset, data_dir=DATA_DIR.value or tconf.data_dir,
      val_size=tconf.val_size if same_data else VAL_SIZE.value,
      val_fraction=tconf.val_fraction, test_size=tconf.test_size,
      split_seed=tconf.split_seed,
      flops=TARGET_FLOPS.value, safeguard=SAFEGUARD.value,
      aggregate=AGGREGATE.value, chains=CHAINS.value,
      tau_hat=TAU_HAT.value, lr=LR.value, batch_size=BATCH_SIZE.value,
      eval_batch_size=EVAL_BATCH_SIZE.value, val_examples=VAL_EXAMPLES.value,
      population=POPULATION.value, sample=SAMPLE.value,
      evaluations=GENERATIONS.value, mutate_fraction=MUTATE.value,
      candidates_per_round=K.value, seed=SEED.value, backend=BACKEND.value,
      bucket=BUCKET.value, workers=WORKERS.value,
      checkpoint_every=CKPT_EVERY.value, cpu_kernels=cpu_kernels)
  ds = data_lib.get_dataset(config.dataset, data_dir=config.data_dir,
                            val_fraction=config.val_fraction,
                            val_size=config.val_size,
                            test_size=config.test_size,
                            seed=config.split_seed)
  if tuple(ds.image_shape) != tuple(net.input_shape):
    raise common.UserError(
        f"--dataset={config.dataset} has images {ds.image_shape}, the "
        f"network of --checkpoint={CHECKPOINT.value} expects "
        f"{net.input_shape}")
  if not len(ds.val):
    raise common.UserError(
        f"{config.dataset} has no validation images to rank candidates on: "
        "give --val_size=N (or a baseline trained with a validation split)")
  if config.tau_hat and len(ds.train) < config.batch_size:
    raise common.UserError(
        f"--batch_size={config.batch_size} is larger than the training split "
        f"({len(ds.train)} images) the --tau_hat steps draw from: lower it")
  old = os.path.join(WORKDIR.value, driver.CONFIG_JSON)
  if os.path.exists(old) and not OVERWRITE.value:
    fix = "pass --overwrite to delete that search, or choose another --workdir"
    try:
      diff = driver.differences(search.SearchConfig.from_dict(
          common.read_json(old, fix)), config)
    except (TypeError, ValueError) as e:
      raise common.UserError(f"{old} is damaged ({e}): {fix}") from None
    if diff:
      raise common.UserError(
          f"{WORKDIR.value} holds a different search (" + "; ".join(
              f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
          + "): choose another --workdir, or pass --overwrite to delete "
          "that search")
  # One job per workdir: process 0 locks it for all processes.
  primary = multihost.is_primary()
  lock, refusal = None, None
  try:
    lock = common.lock_workdir(WORKDIR.value, "experiments.learn_ranking",
                               primary=primary)
  except Exception as e:  # pylint: disable=broad-except
    refusal = str(e)
  refusal = multihost.broadcast_json(refusal)
  if refusal:
    raise common.UserError(refusal)
  try:
    out = search.search(config, WORKDIR.value, net=net, variables=variables,
                        dataset=ds, overwrite=OVERWRITE.value,
                        progress=PROGRESS.value, log=common.log,
                        crash_after=CRASH.value)
  finally:
    lock.release()
  print(json.dumps({"best_loss": out.loss,
                    "ranking": os.path.join(out.workdir, "ranking.json")}))
  return 0


if __name__ == "__main__":
  common.run(main)
