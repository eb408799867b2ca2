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

Every input (flags, the baseline, the ranking, every budget against what
--safeguard and the method allow) is checked before anything is written.
"""

from __future__ import annotations

import os

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
                  "the unpruned MACs (0.47), or flops:F / params:F / "
                  "latency:F (F of the unpruned network's measured latency "
                  "at --latency_batch on this device; the FLOPs fraction "
                  "that meets it is found by measurement once and stored in "
                  "WORKDIR/latency_budgets.json).")
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

# Flag values are checked while absl parses them (before JAX is imported).
common.budget_list("budgets")
common.number("safeguard", 0, 1)
common.number("round_to", 1)
common.number("latency_batch", 1)
common.distinct_paths(["workdir", "checkpoint"])
common.require(["workdir", "ranking"],
               lambda d: d["ranking"] == "l2" or d["workdir"] is None or (
                   os.path.realpath(d["workdir"]) !=
                   os.path.realpath(d["ranking"])),
               "--workdir must not be the --ranking folder: experiments."
               "prune writes only its own --workdir")

RANKING_FIX = ("run python -m experiments.learn_ranking first (its --workdir "
               "holds ranking.json), or pass --ranking=l2")


def _check_ranking_files(ranking: str) -> None:
  """--ranking names a finished search's ranking.json (before JAX)."""
  if ranking == "l2":
    return
  if not os.path.exists(ranking):
    raise common.UserError(f"--ranking={ranking} does not exist: "
                           f"{RANKING_FIX}")
  path = ranking
  if os.path.isdir(ranking):
    path = os.path.join(ranking, "ranking.json")
    if not os.path.exists(path):
      has = lambda f: os.path.exists(os.path.join(ranking, f))  # noqa: E731
      why = ("its search has not finished: rerun the same "
             "experiments.learn_ranking command to resume it"
             if has("search_config.json") else
             "it is an experiments.train workdir, not a search's; "
             + RANKING_FIX if has("config.json") else RANKING_FIX)
      raise common.UserError(f"--ranking={ranking} holds no ranking.json: "
                             f"{why}")
  common.read_json(path, "learn it again: rerun experiments.learn_ranking "
                   "into a new workdir")


def main(argv):
  del argv  # flags only: common.run refuses positional arguments
  # Inputs that exist already, still without JAX.
  common.check_output_workdir(FLAGS.workdir)
  _, net_config = common.check_train_workdir(FLAGS.checkpoint)
  _check_ranking_files(FLAGS.ranking)
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  cpu_kernels = common.start_process()  # before JAX's first computation
  from legr_jax import family, latency, methods, models, ops, train  # pylint: disable=g-import-not-at-top
  from legr_jax.methods import legr as legr_lib  # pylint: disable=g-import-not-at-top
  from legr_jax.train import loop  # pylint: disable=g-import-not-at-top

  budgets = [latency.parse_budget(b) for b in FLAGS.budgets]
  name = FLAGS.method or ("l2" if FLAGS.ranking == "l2" else "legr")
  if name not in methods.names():
    raise app.UsageError(f"--method={name} is not a pruning method; known: "
                         f"{', '.join(methods.names())}")
  extra = {"seed": FLAGS.seed}
  if name == "legr":   # scored as its ranking was learned
    extra = (legr_lib.learned_settings(FLAGS.ranking)
             if FLAGS.ranking != "l2" else {})
  try:
    method = methods.get(name, safeguard=FLAGS.safeguard, **extra)
  except ValueError as e:
    raise app.UsageError(f"--method: {e}") from None
  artifact = None
  if method.learns:
    if FLAGS.ranking == "l2":
      raise app.UsageError(f"--method={name} needs its learned ranking: "
                           "--ranking=SEARCH_WORKDIR (experiments."
                           "learn_ranking)")
    artifact = FLAGS.ranking
  # Budgets against the safeguard floor and the ranking against the
  # network: both need only net.json.
  try:
    spec = models.from_config(net_config).spec
  except (TypeError, KeyError, ValueError) as e:
    raise common.UserError(
        f"{os.path.join(FLAGS.checkpoint, 'net.json')} does not describe a "
        f"network ({e}): rerun its training into a new workdir") from None
  common.check_budgets_reachable(spec, budgets, FLAGS.safeguard, "--budgets",
                                 round_to=FLAGS.round_to)
  if artifact is not None:
    legr_lib.load_affine(artifact, spec.layer_names)
  net, variables, base_config = train.load_trained(FLAGS.checkpoint)
  net = net.with_ops(ops.resolve(cpu_kernels))
  # Every budget by the method itself (its own floor, round_to): masks only.
  for b in budgets:
    if b.metric == "latency":   # solved by measurement in prune_family
      continue
    try:
      method.prune(net, variables, b, artifact=artifact,
                   round_to=FLAGS.round_to)
    except methods.InfeasibleBudgetError as e:
      raise common.UserError(f"--budgets: {b}: {e}") from None
  ds = train.load_dataset(base_config)
  finetune = common.finetune_config(base_config, cpu_kernels)
  if finetune is not None:
    loop.check_fit_inputs(finetune, ds)
  if not FLAGS.overwrite:
    common.check_train_runs(
        [os.path.join(FLAGS.workdir, family.member_name(b, FLAGS.round_to))
         for b in budgets], finetune,
        "choose another --workdir, or pass --overwrite to replace it")
  with common.lock_workdir(FLAGS.workdir, "experiments.prune"):
    rows = family.prune_family(
        net, variables, ds, method, budgets, workdir=FLAGS.workdir,
        finetune=finetune, artifact=artifact, round_to=FLAGS.round_to,
        latency_batch=FLAGS.latency_batch, overwrite=FLAGS.overwrite,
        log=common.log, finetune_mode=FLAGS.finetune_mode,
        summary_extra={"checkpoint": os.path.abspath(FLAGS.checkpoint),
                       "ranking": FLAGS.ranking,
                       "safeguard": FLAGS.safeguard})
  print(f"{'budget':>14} {'MACs':>10} {'params':>9} {'val acc':>8} "
        f"{'test acc':>8} {'ms/batch':>8} {'ms@1':>7} pareto")
  for row in rows:
    test_acc = row.get("test_accuracy")
    print(f"{row['budget_metric'] + ':' + format(row['budget'], 'g'):>14} "
          f"{row['flops'] / 1e6:9.3f}M {row['params'] / 1e3:8.1f}k "
          f"{row['val_accuracy']:8.4f} "
          f"{'n/a' if test_acc is None else format(test_acc, '.4f'):>8} "
          f"{row['latency_ms']:8.2f} {row['latency_ms_batch1']:7.3f} "
          f"{'*' if row['pareto_optimal'] else ''}")
  print(f"Pareto set stored in {os.path.join(FLAGS.workdir, 'pareto')}")
  return 0


if __name__ == "__main__":
  common.run(main)
