r"""Trains a network; the one entry point for baselines and fine-tuning runs.

  python -m experiments.train --workdir=/tmp/digits            # digits, offline
  python -m experiments.train --model=resnet56 --dataset=cifar10 \
      --epochs=200 --workdir=workdirs/resnet56_cifar10

The workdir gets config.json, net.json, checkpoints/, metrics.jsonl and
result.json. Rerunning the same command resumes from the last checkpoint; a
different configuration is refused unless --overwrite. `--helpfull` lists all
flags.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from experiments import common
from legr_jax import data as data_lib
from legr_jax import train

_D = train.TrainConfig()

WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (required).")
OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Delete a different (or finished) run found in "
    "--workdir and start over. Without it a different run is refused and the "
    "same run is resumed.")
DOWNLOAD = flags.DEFINE_bool("download", False,
                             "Let TFDS download and prepare missing data.")
PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
CRASH_AT_STEP = flags.DEFINE_integer(
    "debug_crash_at_step", None, "Testing aid: SIGKILL the process right "
    "after this training step (to exercise resume).")

flags.DEFINE_string("model", _D.model, "Model name, see "
                    "legr_jax.models.known_models().")
flags.DEFINE_string("model_kwargs", "{}", "JSON dict of model constructor "
                    "options, e.g. '{\"shortcut\": \"B\"}'.")
flags.DEFINE_string("dataset", _D.dataset, "Data set: " +
                    ", ".join(data_lib.KNOWN) + ".")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default "
                    "$TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_float("val_fraction", _D.val_fraction,
                   "Share of the training data held out as validation.")
flags.DEFINE_integer("val_size", None, "Number of validation examples "
                     "(overrides --val_fraction).")
flags.DEFINE_integer("test_size", None, "Data without a test split (npz "
                     "without x_test): carve this many images first as the "
                     "test split (seeded by --split_seed), val from the rest."
                     " Digits: the test split's size.")
flags.DEFINE_integer("split_seed", _D.split_seed,
                     "Seed of the train/val carving.")
flags.DEFINE_enum("augment", None, list(data_lib.AUGMENTATIONS),
                  "Training augmentation (default: the data set's).")
flags.DEFINE_integer("seed", _D.seed,
                     "Seed of initialization, data order and augmentation.")
flags.DEFINE_integer("epochs", _D.epochs, "Training epochs.")
flags.DEFINE_integer("batch_size", _D.batch_size,
                     "Global batch size (split over all local devices).")
flags.DEFINE_float("lr", _D.lr, "Peak learning rate.")
flags.DEFINE_float("momentum", _D.momentum, "SGD momentum.")
flags.DEFINE_bool("nesterov", _D.nesterov, "Nesterov momentum.")
flags.DEFINE_float("weight_decay", _D.weight_decay,
                   "Coupled L2 weight decay (added to the gradient).")
flags.DEFINE_enum("schedule", _D.schedule, list(train.SCHEDULES),
                  "Learning-rate schedule.")
flags.DEFINE_list("milestones", [str(m) for m in _D.milestones],
                  "Multistep: fractions of --epochs where the rate is "
                  "multiplied by --gamma.")
flags.DEFINE_float("gamma", _D.gamma, "Multistep decay factor.")
flags.DEFINE_float("warmup_epochs", _D.warmup_epochs,
                   "Linear learning-rate warm-up length in epochs.")
flags.DEFINE_float("label_smoothing", _D.label_smoothing,
                   "Label smoothing of the training targets.")
flags.DEFINE_enum("compute_dtype", _D.compute_dtype, ["float32", "bfloat16"],
                  "Forward/backward compute dtype (bfloat16 for GPU/TPU).")
flags.DEFINE_integer("eval_every_epochs", _D.eval_every_epochs,
                     "Validate every this many epochs.")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size,
                     "Evaluation batch size.")
flags.DEFINE_integer("ckpt_every_steps", _D.ckpt_every_steps,
                     "Also checkpoint every this many steps (0: epoch ends "
                     "only).")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints,
                     "Keep the last this many checkpoints (plus the best).")
flags.DEFINE_integer("log_every_steps", _D.log_every_steps,
                     "Append training metrics every this many steps.")
flags.DEFINE_integer("prefetch", _D.prefetch,
                     "Batches prepared ahead on a background thread.")

flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def config_from_flags(cpu_kernels: str = "auto") -> train.TrainConfig:
  return train.TrainConfig(
      cpu_kernels=cpu_kernels,
      model=FLAGS.model, model_kwargs=json.loads(FLAGS.model_kwargs),
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
      val_fraction=FLAGS.val_fraction, val_size=FLAGS.val_size,
      test_size=FLAGS.test_size, split_seed=FLAGS.split_seed, augment=FLAGS.augment, seed=FLAGS.seed,
      epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
      momentum=FLAGS.momentum, nesterov=FLAGS.nesterov,
      weight_decay=FLAGS.weight_decay, schedule=FLAGS.schedule,
      milestones=tuple(float(m) for m in FLAGS.milestones),
      gamma=FLAGS.gamma, warmup_epochs=FLAGS.warmup_epochs,
      label_smoothing=FLAGS.label_smoothing,
      compute_dtype=FLAGS.compute_dtype,
      eval_every_epochs=FLAGS.eval_every_epochs,
      eval_batch_size=FLAGS.eval_batch_size,
      ckpt_every_steps=FLAGS.ckpt_every_steps,
      keep_checkpoints=FLAGS.keep_checkpoints,
      log_every_steps=FLAGS.log_every_steps, prefetch=FLAGS.prefetch)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cpu_kernels = common.start_process()  # before JAX's first computation
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  config = config_from_flags(cpu_kernels)
  try:
    out = train.fit(config, WORKDIR.value, overwrite=OVERWRITE.value,
                    download=DOWNLOAD.value, progress=PROGRESS.value,
                    crash_at_step=CRASH_AT_STEP.value)
  except (train.WorkdirConflictError, data_lib.NotPreparedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except train.TrainingDivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  r = out.result
  print(f"final {r['test_split']} accuracy: {r['test_accuracy']:.4f}")
  return 0


if __name__ == "__main__":
  app.run(main)
