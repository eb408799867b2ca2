r"""Trains a network; the one entry point for baselines and fine-tuning runs.

  python -m experiments.train --workdir=/tmp/digits            # digits, offline
  python -m experiments.train --model=resnet56 --dataset=cifar10 \
      --epochs=200 --workdir=workdirs/resnet56_cifar10

The workdir gets config.json, net.json, checkpoints/, metrics.jsonl and
result.json. Rerunning the same command resumes from the last checkpoint (a
damaged one is skipped, with a warning); a different configuration is
refused unless --overwrite. Flags, data and network are checked before
anything is written, and one job at a time writes a workdir (its lock file
WORKDIR/.legr_lock). `--helpfull` lists all flags.
"""

from __future__ import annotations

import json
import types

from absl import flags, logging

from experiments import common

# legr_jax.train.TrainConfig's defaults and the names of the enum flags,
# spelled out so that importing this module does not import JAX (bad flags
# are refused in a fraction of a second); tests/test_bad_input.py keeps them
# equal to the library's.
DEFAULTS = dict(
    model="cnn_small", dataset="digits", val_fraction=0.1, split_seed=0,
    seed=0, epochs=30, batch_size=128, lr=0.1, momentum=0.9, nesterov=False,
    weight_decay=5e-4, schedule="multistep", milestones=(0.3, 0.6, 0.8),
    gamma=0.2, warmup_epochs=0.0, label_smoothing=0.0,
    compute_dtype="float32", eval_every_epochs=1, eval_batch_size=500,
    ckpt_every_steps=1000, keep_checkpoints=3, log_every_steps=20,
    prefetch=2)
AUGMENTATIONS = ("none", "cifar", "imagenet")   # legr_jax.data.AUGMENTATIONS
SCHEDULES = ("multistep", "cosine", "constant")  # legr_jax.train.SCHEDULES
_D = types.SimpleNamespace(**DEFAULTS)

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
                    ", ".join(common.DATASETS) + ", npz:PATH, "
                    "cifar_dir:PATH.")
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
flags.DEFINE_enum("augment", None, list(AUGMENTATIONS),
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
flags.DEFINE_enum("schedule", _D.schedule, list(SCHEDULES),
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

# Flag values are checked while absl parses them (before JAX is imported).
common.json_dict("model_kwargs")
common.dataset_name("dataset")
common.number("val_fraction", 0, 1, high_open=True)
common.number("val_size", 0, optional=True)
common.number("test_size", 1, optional=True)
common.number("epochs", 1)
common.number("batch_size", 1)
common.number("lr", 0, low_open=True)
common.number("momentum", 0, 1, high_open=True)
common.number("weight_decay", 0)
common.number_list("milestones", 0, 1, nonempty=False)
common.number("gamma", 0, low_open=True)
common.number("warmup_epochs", 0)
common.number("label_smoothing", 0, 1, high_open=True)
common.number("eval_every_epochs", 1)
common.number("eval_batch_size", 1)
common.number("ckpt_every_steps", 0)
common.number("keep_checkpoints", 1)
common.number("log_every_steps", 1)
common.number("prefetch", 0)
common.number("debug_crash_at_step", 1, optional=True)


def config_from_flags(cpu_kernels: str = "auto"):
  """The `legr_jax.train.TrainConfig` of the flags (imports JAX)."""
  from legr_jax import train  # pylint: disable=g-import-not-at-top
  return train.TrainConfig(
      cpu_kernels=cpu_kernels,
      model=FLAGS.model, model_kwargs=json.loads(FLAGS.model_kwargs),
      dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
      val_fraction=FLAGS.val_fraction, val_size=FLAGS.val_size,
      test_size=FLAGS.test_size, split_seed=FLAGS.split_seed,
      augment=FLAGS.augment, seed=FLAGS.seed,
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
  del argv  # flags only: common.run refuses positional arguments
  workdir = WORKDIR.value
  # Inputs that exist already, still without JAX.
  common.check_output_workdir(workdir)
  common.check_dataset_files(FLAGS.dataset)
  common.check_run_config(workdir, "config.json")
  cpu_kernels = common.start_process()  # before JAX's first computation
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  from legr_jax import models, train  # pylint: disable=g-import-not-at-top
  from legr_jax.train import loop  # pylint: disable=g-import-not-at-top

  config = config_from_flags(cpu_kernels)
  if config.model not in models.known_models():
    raise common.UserError(f"--model={config.model} is not a model; known: "
                           f"{', '.join(models.known_models())}")
  # Data, network and batches are checked before the workdir is touched.
  ds = train.load_dataset(config, download=DOWNLOAD.value)
  try:
    net = models.get(config.model, num_classes=ds.num_classes,
                     input_shape=ds.image_shape, **config.model_kwargs)
  except (TypeError, ValueError) as e:
    raise common.UserError(
        f"--model={config.model} with --model_kwargs={FLAGS.model_kwargs} "
        f"on {ds.image_shape} images: {e}") from None
  loop.check_fit_inputs(config, ds)
  if not OVERWRITE.value:
    common.check_train_runs([workdir], config, "choose another --workdir, "
                            "or pass --overwrite to delete that run")
  with common.lock_workdir(workdir, "experiments.train"):
    out = train.fit(config, workdir, net=net, dataset=ds,
                    overwrite=OVERWRITE.value, download=DOWNLOAD.value,
                    progress=PROGRESS.value, log=common.log,
                    crash_at_step=CRASH_AT_STEP.value)
  r = out.result
  print(f"final {r['test_split']} accuracy: {r['test_accuracy']:.4f}")
  return 0


if __name__ == "__main__":
  common.run(main)
