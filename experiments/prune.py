"""Prunes a trained network to several budgets with one method, fine-tunes
each pruned network and stores the Pareto set with orbax.

  python -m experiments.prune --checkpoint=BASELINE_WORKDIR \
      --ranking=SEARCH_WORKDIR --budgets=0.47,0.7 --epochs=40 \
      --workdir=workdirs/resnet56_pruned
  python -m experiments.prune --checkpoint=BASELINE_WORKDIR --method=fpgm \
      --budgets=0.47,params:0.5 --workdir=workdirs/resnet56_fpgm

``--method`` is a `legr_jax.methods` name (l1, l2, uniform, random, fpgm,
clr_rnf, legr, ...). ``--ranking`` (a contract) is a `experiments.learn_ranking`
workdir or its ranking.json (method legr), or ``l2``; it is the default way
to name LeGR's artifact. Budgets are FLOPs fractions (``0.47``) or
``flops:F`` / ``params:F``. The shared path after the masks is
`legr_jax.family.prune_family`: WORKDIR/<budget>/ is the fine-tuning run of
one budget (resumable), WORKDIR/pareto/ the orbax Pareto set with
pareto.json, WORKDIR/summary.json the table printed at the end. Rerunning
the same command resumes; finished budgets are not redone.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Workdir of the trained network "
                    "(written by experiments.train).")
flags.DEFINE_string("method", None, "Pruning method (legr_jax.methods."
                    "names()); default: legr when --ranking names a "
                    "ranking, l2 when --ranking=l2.")
flags.DEFINE_string("ranking", "l2", "experiments.learn_ranking workdir or "
                    "ranking.json (method legr), or 'l2' (plain global L2 "
                    "ranking).")
flags.DEFINE_list("budgets", ["0.47", "0.7"], "Budgets: FLOPs fractions of "
                  "the unpruned MACs (0.47), or flops:F / params:F.")
flags.DEFINE_float("safeguard", 0.1, "Every group keeps at least this "
                   "fraction of its channels.")
flags.DEFINE_integer("seed", 0, "Seed of seeded methods (random).")
flags.DEFINE_integer("round_to", 1, "Global rankings only: keep every "
                     "group's width a multiple of this (groups whose size is "
                     "one); 8 or 16 run faster on vector hardware (see "
                     "ranking.masks_for_budget).")
common.define_finetune_flags()
flags.DEFINE_integer("latency_batch", 128, "Batch of the latency "
                     "measurement of each sliced network.")
flags.DEFINE_string("workdir", None, "Where everything is written.")
flags.DEFINE_bool("overwrite", False, "Replace a different run found in "
                  "--workdir.")
flags.mark_flags_as_required(["checkpoint", "workdir"])


def _fail(msg: str) -> int:
  print(f"error: {msg}", file=sys.stderr)
  return 2


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  cpu_kernels = common.start_process()  # before JAX's first computation
  from legr_jax import family, methods, ops, train  # pylint: disable=g-import-not-at-top
  from legr_jax.methods import legr as legr_lib  # pylint: disable=g-import-not-at-top

  try:
    budgets = [methods.Budget.parse(b) for b in FLAGS.budgets]
  except ValueError as e:
    raise app.UsageError(f"--budgets: {e}") from None
  if not budgets:
    raise app.UsageError("--budgets: give at least one budget")
  name = FLAGS.method or ("l2" if FLAGS.ranking == "l2" else "legr")
  try:
    method = methods.get(name, safeguard=FLAGS.safeguard,
                         **({"seed": FLAGS.seed} if name != "legr" else {}))
  except ValueError as e:
    raise app.UsageError(f"--method: {e}") from None
  artifact = None
  if method.learns:
    if FLAGS.ranking == "l2":
      raise app.UsageError(f"--method={name} needs its learned ranking: "
                           "--ranking=SEARCH_WORKDIR (experiments."
                           "learn_ranking)")
    artifact = FLAGS.ranking
  if not os.path.isdir(FLAGS.checkpoint):
    return _fail(f"--checkpoint={FLAGS.checkpoint} is not a directory: "
                 "train a baseline with python -m experiments.train first")
  try:
    net, variables, base_config = train.load_trained(FLAGS.checkpoint)
    if artifact is not None:   # refuse a bad ranking before any work
      legr_lib.load_affine(artifact, net.spec.layer_names)
  except (FileNotFoundError, ValueError) as e:
    return _fail(str(e))
  net = net.with_ops(ops.resolve(cpu_kernels))
  ds = train.load_dataset(base_config)
  finetune = common.finetune_config(base_config, cpu_kernels)
  try:
    rows = family.prune_family(
        net, variables, ds, method, budgets, workdir=FLAGS.workdir,
        finetune=finetune, artifact=artifact, round_to=FLAGS.round_to,
        latency_batch=FLAGS.latency_batch, overwrite=FLAGS.overwrite,
        summary_extra={"checkpoint": os.path.abspath(FLAGS.checkpoint),
                       "ranking": FLAGS.ranking,
                       "safeguard": FLAGS.safeguard})
  except (methods.InfeasibleBudgetError, train.WorkdirConflictError) as e:
    return _fail(str(e))
  print(f"{'budget':>14} {'MACs':>10} {'params':>9} {'val acc':>8} "
        f"{'test acc':>8} {'ms/batch':>8} pareto")
  for row in rows:
    test_acc = row.get("test_accuracy")
    print(f"{row['budget_metric'] + ':' + format(row['budget'], 'g'):>14} "
          f"{row['flops'] / 1e6:9.3f}M {row['params'] / 1e3:8.1f}k "
          f"{row['val_accuracy']:8.4f} "
          f"{'n/a' if test_acc is None else format(test_acc, '.4f'):>8} "
          f"{row['latency_ms']:8.2f} {'*' if row['pareto_optimal'] else ''}")
  print(f"Pareto set stored in {os.path.join(FLAGS.workdir, 'pareto')}")
  return 0


if __name__ == "__main__":
  app.run(main)
