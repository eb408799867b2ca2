"""Prunes a trained network to several FLOPs budgets with one learned ranking,
fine-tunes each pruned network and stores the Pareto set with orbax.

  python -m experiments.prune --checkpoint=BASELINE_WORKDIR \
      --ranking=SEARCH_WORKDIR --budgets=0.47,0.7 --epochs=40 \
      --workdir=workdirs/resnet56_pruned

``--ranking`` is a `experiments.learn_ranking` workdir (or its ranking.json),
or ``l2`` for plain global L2 ranking (alpha=1, kappa=0; the baseline).
Layout: WORKDIR/flops_<b>/ is the fine-tuning run of budget b (an
`experiments.train`-style workdir: resumable), WORKDIR/pareto/ the orbax
Pareto set with pareto.json, WORKDIR/summary.json the table printed at the
end. Rerunning the same command resumes; finished budgets are not redone.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Workdir of the trained network "
                    "(written by experiments.train).")
flags.DEFINE_string("ranking", "l2", "experiments.learn_ranking workdir, a "
                    "ranking.json, or 'l2' (plain global L2 ranking).")
flags.DEFINE_list("budgets", ["0.47", "0.7"], "FLOPs budgets, fractions of "
                  "the unpruned MACs.")
flags.DEFINE_float("safeguard", 0.1, "Every group keeps at least this "
                   "fraction of its channels.")
flags.DEFINE_integer("round_to", 1, "Keep every group's width a multiple "
                     "of this (groups whose size is one); 8 or 16 run faster "
                     "on vector hardware (see ranking.masks_for_budget).")
flags.DEFINE_integer("epochs", 40, "Fine-tuning epochs per budget (0: no "
                     "fine-tuning, evaluate right after pruning).")
flags.DEFINE_float("lr", 0.01, "Fine-tuning learning rate (LeGR: 0.01, "
                   "Nesterov, x0.2 at 30/60/80%).")
flags.DEFINE_integer("batch_size", 128, "Fine-tuning batch size.")
flags.DEFINE_string("workdir", None, "Where everything is written.")
flags.DEFINE_bool("overwrite", False, "Replace a different run found in "
                  "--workdir.")
flags.mark_flags_as_required(["checkpoint", "workdir"])


def load_affine(path: str, layer_names) -> tuple[dict, dict]:
  """Reads a learned ranking: ``{layer: {"alpha": a, "kappa": k}}``.

  ``path`` may be a search workdir (holding ranking.json) or the file. The
  layers must be exactly the network's conv layers.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "ranking.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run python -m "
                            "experiments.learn_ranking first, or pass "
                            "--ranking=l2")
  with open(path) as f:
    data = json.load(f)
  layers = data.get("layers", data)
  missing = set(layer_names) - set(layers)
  if missing:
    raise ValueError(f"{path} lacks layers {sorted(missing)[:5]}...: it was "
                     "learned for a different network")
  alpha = {n: float(layers[n]["alpha"]) for n in layer_names}
  kappa = {n: float(layers[n]["kappa"]) for n in layer_names}
  return alpha, kappa


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  cpu_kernels = common.start_process()  # before JAX's first computation
  import jax  # pylint: disable=g-import-not-at-top
  from legr_jax import (cost, ops, pareto, provenance, ranking, surgery,
                        train)

  budgets = sorted({float(b) for b in FLAGS.budgets})
  if not budgets or budgets[0] <= 0 or budgets[-1] > 1:
    raise app.UsageError(f"--budgets must be fractions in (0, 1], got "
                         f"{FLAGS.budgets}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  provenance.record_session(FLAGS.workdir, {"job": "prune",
                                            "ranking": FLAGS.ranking})
  net, variables, base_config = train.load_trained(FLAGS.checkpoint)
  net = net.with_ops(ops.resolve(cpu_kernels))
  variables = jax.device_get(variables)
  spec = net.spec
  if FLAGS.ranking == "l2":
    alpha = {n: 1.0 for n in spec.layer_names}
    kappa = {n: 0.0 for n in spec.layer_names}
  else:
    alpha, kappa = load_affine(FLAGS.ranking, spec.layer_names)
  norms = ranking.filter_norms(spec, variables["params"])
  scores = ranking.group_scores(spec, ranking.affine_scores(norms, alpha,
                                                            kappa))
  ds = train.load_dataset(base_config)
  full_flops = cost.unpruned(spec, "flops")
  members, rows = [], []
  for b in budgets:
    masks, _ = ranking.masks_for_budget(spec, scores, flops=b,
                                        safeguard=FLAGS.safeguard,
                                        round_to=FLAGS.round_to)
    small, small_vars = surgery.slice_network(net, variables, masks)
    name = f"flops_{b:g}" + (f"_round{FLAGS.round_to}"
                             if FLAGS.round_to > 1 else "")
    before_loss, before_acc = train.evaluate(small, small_vars, ds.val,
                                             mean=ds.mean, std=ds.std)
    ft_config = base_config.replace(
        epochs=max(FLAGS.epochs, 1), lr=FLAGS.lr, nesterov=True,
        schedule="multistep", batch_size=FLAGS.batch_size,
        cpu_kernels=cpu_kernels)
    if FLAGS.epochs > 0:
      fit = train.fit(ft_config, os.path.join(FLAGS.workdir, name), net=small,
                      variables=small_vars, dataset=ds,
                      overwrite=FLAGS.overwrite)
      small_vars = fit.variables
      result = fit.result
    else:
      test_loss, test_acc = train.evaluate(small, small_vars, ds.test,
                                           mean=ds.mean, std=ds.std)
      result = {"test_accuracy": test_acc, "test_loss": test_loss}
    after_loss, after_acc = train.evaluate(small, small_vars, ds.val,
                                           mean=ds.mean, std=ds.std)
    metrics = {
        "budget": b,
        "flops": cost.unpruned(small.spec, "flops"),
        "flops_fraction": cost.unpruned(small.spec, "flops") / full_flops,
        "params": cost.unpruned(small.spec, "params"),
        "val_accuracy_pruned": before_acc,
        "val_loss_pruned": before_loss,
        "val_accuracy": after_acc,
        "val_loss": after_loss,
        "test_accuracy": result.get("test_accuracy"),
        "test_split": result.get("test_split", "test"),
        "finetune_epochs": FLAGS.epochs,
    }
    members.append(pareto.Member(name, small.config, small_vars, metrics))
    rows.append(metrics)
    print(f"[{name}] {metrics['flops_fraction']:.3f} of the MACs, "
          f"val acc right after pruning {before_acc:.4f}, "
          f"after fine-tuning {after_acc:.4f}", flush=True)
  index = pareto.save(os.path.join(FLAGS.workdir, "pareto"), members,
                      overwrite=True)
  summary = {"checkpoint": os.path.abspath(FLAGS.checkpoint),
             "ranking": FLAGS.ranking, "safeguard": FLAGS.safeguard,
             "round_to": FLAGS.round_to,
             "unpruned_flops": full_flops, "members": rows}
  with open(os.path.join(FLAGS.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"{'budget':>7} {'MACs':>10} {'val acc':>8} {'test acc':>8} pareto")
  for row, entry in zip(rows, index["members"]):
    test_acc = row["test_accuracy"]
    print(f"{row['budget']:7.3f} {row['flops'] / 1e6:9.3f}M "
          f"{row['val_accuracy']:8.4f} "
          f"{test_acc if test_acc is None else format(test_acc, '8.4f')} "
          f"{'*' if entry['pareto_optimal'] else ''}")
  print(f"Pareto set stored in {os.path.join(FLAGS.workdir, 'pareto')}")


if __name__ == "__main__":
  app.run(main)
