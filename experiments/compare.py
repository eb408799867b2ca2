r"""Compares pruning methods fairly: one baseline, one budget, one fine-tuning
recipe and seed, different methods.

  python -m experiments.compare                       # digits, a few minutes
  python -m experiments.compare --model=resnet20 \
      --dataset=npz:../shared/data/cifar10_train_subset.npz --test_size=1000 \
      --val_size=1000 --baseline_epochs=60 --budget=0.3,0.47 --methods=all \
      --epochs=5 --workdir=workdirs/compare_resnet20

Every method prunes the same pretrained baseline (``--checkpoint``, or one
trained here in WORKDIR/baseline and reused on rerun; its checkpoint is the
best by validation accuracy) to every ``--budget`` (FLOPs fractions, or
flops:F / params:F), each pruned network is fine-tuned with the same recipe
(`experiments.common.define_finetune_flags`) and seed, and evaluated on the
validation split (the only one any method or checkpoint choice looks at) and
the test split (reported only). Data without a test split (the shared npz)
needs ``--test_size``: a seeded three-way split carved once, recorded in the
baseline's config and reused everywhere.

Writes WORKDIR/comparison.md (the table: method, FLOPs, params, val / test
accuracy right after pruning and after fine-tuning, latency of the sliced
network at batch 128 on this device, wall time of the method itself incl. a
learn stage), comparison.json and comparison.png. With several ``--seeds``
each cell is mean ± std over seeds (a seed drives the method's randomness,
LeGR's search and the fine-tuning). Rerunning resumes: finished members and
searches are reused. Layout: WORKDIR/baseline/, WORKDIR/seed_<s>/<method>/
(`legr_jax.family.prune_family` workdirs), WORKDIR/seed_<s>/legr_search/.

Every input (flags, data, baseline, LeGR ranking, each budget against
--safeguard and each method) is checked before anything is written, and
the workdir is locked while the comparison runs.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/compare", "Where everything is "
                    "written.")
flags.DEFINE_string("checkpoint", None, "A trained baseline (experiments."
                    "train workdir); default: train one in WORKDIR/baseline.")
flags.DEFINE_string("model", "cnn_small", "Baseline model (when trained "
                    "here).")
flags.DEFINE_string("dataset", "digits", "Data set (when the baseline is "
                    "trained here).")
flags.DEFINE_integer("val_size", None, "Validation images (baseline trained "
                     "here; default: 10% of the training data).")
flags.DEFINE_integer("test_size", None, "Carve this many test images first "
                     "(data without a test split, e.g. the shared npz).")
flags.DEFINE_integer("baseline_epochs", 15, "Epochs of the baseline trained "
                     "here (cosine schedule, lr --baseline_lr).")
flags.DEFINE_float("baseline_lr", 0.1, "Peak learning rate of the baseline.")
flags.DEFINE_list("budget", ["0.5"], "Budgets: FLOPs fractions, or "
                  "flops:F / params:F.")
flags.DEFINE_list("methods", ["all"], "Methods (legr_jax.methods.names()), "
                  "each optionally with options, e.g. l2@aggregate=mean, "
                  "or 'all'.")
flags.DEFINE_list("seeds", ["0"], "Seeds (methods' randomness, LeGR's search,"
                  " fine-tuning).")
flags.DEFINE_float("safeguard", 0.1, "Every group keeps at least this "
                   "fraction of its channels (every method).")
flags.DEFINE_integer("legr_evaluations", 400, "LeGR search: evaluations.")
flags.DEFINE_integer("legr_population", 64, "LeGR search: population "
                     "(<= --legr_evaluations).")
flags.DEFINE_integer("legr_sample", 16, "LeGR search: tournament sample.")
flags.DEFINE_integer("legr_tau_hat", 0, "LeGR search: SGD steps per "
                     "candidate before its validation loss.")
flags.DEFINE_integer("legr_val_examples", None, "LeGR search: validation "
                     "images of the fitness (default: all).")
flags.DEFINE_string("legr_ranking", None, "Reuse this LeGR ranking (search "
                    "workdir or ranking.json) instead of searching.")
flags.DEFINE_integer("latency_batch", 128, "Batch of the latency "
                     "measurement.")
flags.DEFINE_bool("progress", True, "Progress bars.")
common.define_finetune_flags(epochs_default=3)

COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
COMPARISON_PNG = "comparison.png"


# Flag values are checked while absl parses them (before JAX is imported).
common.dataset_name("dataset")
common.number("val_size", 1, optional=True)
common.number("test_size", 1, optional=True)
common.number("baseline_epochs", 1)
common.number("baseline_lr", 0, low_open=True)
common.budget_list("budget")
common.number_list("seeds", integer=True)
common.number("safeguard", 0, 1)
common.number("legr_evaluations", 1)
common.number("legr_sample", 1)
common.require(["legr_population", "legr_evaluations"],
               lambda d: 1 <= d["legr_population"] <= d["legr_evaluations"],
               "--legr_population must be in [1, --legr_evaluations]")
common.number("legr_tau_hat", 0)
common.number("legr_val_examples", 1, optional=True)
common.number("latency_batch", 1)
common.distinct_paths(["workdir", "checkpoint"])


def _parse_flags(methods):
  """Checks what needs the method registry (after JAX) and returns
  (budgets, method specs (label, name, options), seeds)."""
  from legr_jax import latency  # pylint: disable=g-import-not-at-top
  budgets = sorted({latency.parse_budget(b) for b in FLAGS.budget},
                   key=lambda b: (b.metric, b.fraction))
  texts = list(FLAGS.methods)
  if texts == ["all"]:
    texts = list(methods.names())
  try:
    specs = [methods.parse_spec(t) for t in texts]
  except ValueError as e:
    raise app.UsageError(f"--methods: {e}") from None
  unknown = [n for _, n, _ in specs if n not in methods.names()]
  if unknown or not specs:
    raise app.UsageError(f"--methods: unknown {unknown}; known: "
                         f"{', '.join(methods.names())} or all (options: "
                         "NAME@key=value+key=value)")
  if len({label for label, _, _ in specs}) != len(specs):
    raise app.UsageError(f"--methods: {texts} names a method twice")
  for label, name, options in specs:
    try:
      methods.get(name, **options)
    except (ValueError, TypeError) as e:
      raise app.UsageError(f"--methods={label}: {e}") from None
  seeds = [int(s) for s in FLAGS.seeds]
  if any(n == "legr" for _, n, _ in specs) and not FLAGS.legr_ranking:
    target = min((b.fraction for b in budgets if b.metric == "flops"),
                 default=0.5)
    if target >= 1:
      raise app.UsageError(
          "--budget: LeGR's search learns at the lowest FLOPs budget, which "
          "must be below 1 (at 1 nothing is pruned); add one, or pass "
          "--legr_ranking")
  return budgets, specs, seeds


def _check_inputs() -> dict | None:
  """Input files that exist already (before JAX): the baseline's net.json
  (None when it is trained here), the data set's file, the ranking."""
  common.check_output_workdir(FLAGS.workdir)
  net_config = None
  if FLAGS.checkpoint:
    _, net_config = common.check_train_workdir(FLAGS.checkpoint)
  else:
    common.check_dataset_files(FLAGS.dataset)
  if FLAGS.legr_ranking:
    path = FLAGS.legr_ranking
    if not os.path.exists(path):
      raise common.UserError(f"--legr_ranking={path} does not exist: give "
                             "an experiments.learn_ranking workdir or its "
                             "ranking.json")
    if os.path.isdir(path):
      path = os.path.join(path, "ranking.json")
    common.read_json(path, "rerun experiments.learn_ranking into a new "
                     "workdir, or leave --legr_ranking out")
  return net_config


def _baseline(cpu_kernels, train, loaded=None):
  """(net, variables, config, workdir) of the baseline, trained if needed
  (``loaded``: --checkpoint's, loaded already)."""
  if FLAGS.checkpoint:
    wd = FLAGS.checkpoint
    if loaded is not None:
      return (*loaded, wd)
  else:
    wd = os.path.join(FLAGS.workdir, "baseline")
    train.fit(_baseline_config(cpu_kernels, train), wd,
              progress=FLAGS.progress, log=common.log)
  net, variables, config = train.load_trained(wd)
  return net, variables, config, wd


def _baseline_config(cpu_kernels, train):
  """The `TrainConfig` of a baseline trained here."""
  return train.TrainConfig(
      model=FLAGS.model, dataset=FLAGS.dataset, val_size=FLAGS.val_size,
      test_size=FLAGS.test_size, epochs=FLAGS.baseline_epochs,
      lr=FLAGS.baseline_lr, schedule="cosine", warmup_epochs=1.0,
      nesterov=True, cpu_kernels=cpu_kernels)


def _mean_std(values):
  import numpy as np  # pylint: disable=g-import-not-at-top
  v = [x for x in values if x is not None]
  if not v:
    return None, None
  return float(np.mean(v)), (float(np.std(v)) if len(v) > 1 else None)


def _cell(values, fmt="{:.4f}"):
  m, s = _mean_std(values)
  if m is None:
    return "n/a"
  return fmt.format(m) + ("" if s is None else " ± " + fmt.format(s))


COLUMNS = (  # (header, metric key, format)
    ("FLOPs", "flops_fraction", "{:.3f}"),
    ("params", "params_fraction", "{:.3f}"),
    ("val acc pruned", "val_accuracy_pruned", "{:.4f}"),
    ("test acc pruned", "test_accuracy_pruned", "{:.4f}"),
    ("val acc tuned", "val_accuracy", "{:.4f}"),
    ("test acc tuned", "test_accuracy", "{:.4f}"),
    ("latency ms", "latency_ms", "{:.2f}"),
    ("method s", "method_seconds", "{:.2f}"),
)
# Cells are mean ± standard deviation over the seeds.


def paired_difference(a, b):
  """Mean and standard error of ``a - b`` paired by seed (lists of equal
  length): ``(mean, se)``; se is None for one seed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.size < 2:
    return float(d.mean()), None
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def verdict(mean: float, se: float | None) -> str:
  """'beats' / 'loses' when the mean difference exceeds twice its standard
  error, else 'tie' ('n/a' with one seed)."""
  if se is None:
    return "n/a (1 seed)"
  if mean > 2 * se:
    return "beats"
  if mean < -2 * se:
    return "loses"
  return "tie"


REFERENCES = ("uniform", "l2")


def _differences(rows, budgets, names, key="test_accuracy") -> list[str]:
  """Markdown lines: every method against the simplest baselines, paired
  over the seeds both ran."""
  refs = [r for r in REFERENCES if r in names]
  if not refs or len({r["seed"] for r in rows}) < 2:
    return []
  lines = ["", f"Paired over seeds ({key}, method minus reference; 'beats'"
           " = mean difference above twice its standard error):", "",
           "| budget | method | " + " | ".join(f"vs {r}" for r in refs) +
           " |", "|---" * (len(refs) + 2) + "|"]
  for metric, b in budgets:
    by = {(r["method"], r["seed"]): r.get(key) for r in rows
          if r["budget"] == b and r["budget_metric"] == metric}
    for name in names:
      cells = []
      for ref in refs:
        seeds = sorted(s for (m, s) in by if m == name
                       and (ref, s) in by and by[(name, s)] is not None
                       and by[(ref, s)] is not None)
        if name == ref or not seeds:
          cells.append("")
          continue
        mean, se = paired_difference([by[(name, s)] for s in seeds],
                                     [by[(ref, s)] for s in seeds])
        cells.append(f"{mean:+.4f} ± {se or 0:.4f} {verdict(mean, se)}")
      if any(cells):
        lines.append(f"| {metric}:{b:g} | {name} | " + " | ".join(cells) +
                     " |")
  return lines


def write_report(workdir, rows, header: list[str], baseline: dict) -> str:
  """comparison.md / .json / .png from ``rows`` (one per method, budget and
  seed); returns the Markdown table."""
  budgets = sorted({(r["budget_metric"], r["budget"]) for r in rows})
  names = list(dict.fromkeys(r["method"] for r in rows))
  lines = list(header) + [""]
  lines.append("| budget | method | " + " | ".join(c[0] for c in COLUMNS) +
               " |")
  lines.append("|---" * (len(COLUMNS) + 2) + "|")
  for metric, b in budgets:
    for name in names:
      sel = [r for r in rows if r["method"] == name and
             r["budget"] == b and r["budget_metric"] == metric]
      if not sel:
        continue
      cells = [_cell([r.get(k) for r in sel], f) for _, k, f in COLUMNS]
      lines.append(f"| {metric}:{b:g} | {name} | " + " | ".join(cells) + " |")
  lines.extend(_differences(rows, budgets, names))
  lines.append("")
  lines.append(f"Unpruned baseline: val acc {baseline['val_accuracy']:.4f}, "
               f"test acc {baseline.get('test_accuracy', float('nan')):.4f}, "
               f"latency {baseline['latency_ms']:.2f} ms (batch "
               f"{baseline['latency_batch']}, {baseline['device_kind']}).")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, COMPARISON_MD), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, COMPARISON_JSON), "w") as f:
    json.dump({"baseline": baseline, "rows": rows}, f, indent=2)
  try:
    _plot(os.path.join(workdir, COMPARISON_PNG), rows, budgets, names,
          baseline)
  except Exception as e:  # pylint: disable=broad-except
    print(f"warning: could not draw {COMPARISON_PNG}: {e}", file=sys.stderr)
  return table


def _plot(path, rows, budgets, names, baseline):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  for ax, (key, title) in zip(axes, (("test_accuracy_pruned",
                                      "right after pruning"),
                                     ("test_accuracy", "after fine-tuning"))):
    for name in names:
      xs, ys, es = [], [], []
      for metric, b in budgets:
        sel = [r for r in rows if r["method"] == name and r["budget"] == b
               and r["budget_metric"] == metric]
        m, s = _mean_std([r.get(key) for r in sel])
        fm, _ = _mean_std([r["flops_fraction"] for r in sel])
        if m is not None:
          xs.append(fm)
          ys.append(m)
          es.append(s or 0.0)
      if xs:
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    if baseline.get("test_accuracy") is not None:
      ax.axhline(baseline["test_accuracy"], color="k", ls="--", lw=0.8,
                 label="unpruned")
    ax.set_xlabel("FLOPs fraction of the unpruned network")
    ax.set_title(f"test accuracy {title}")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv  # flags only: common.run refuses positional arguments
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  net_config = _check_inputs()
  cpu_kernels = common.start_process()
  from legr_jax import methods  # pylint: disable=g-import-not-at-top
  budgets, names, seeds = _parse_flags(methods)
  from legr_jax import (family, latency, ops, provenance,  # pylint: disable=g-import-not-at-top
                        train)
  loaded = _check_budgets_and_data(net_config, budgets, names, seeds,
                                   methods, train)
  with common.lock_workdir(FLAGS.workdir, "experiments.compare"):
    return _compare(budgets, names, seeds, cpu_kernels, loaded, methods,
                    family, latency, ops, provenance, train)


def _check_budgets_and_data(net_config, budgets, names, seeds, methods,
                            train):
  """Before anything is written: the data and network of a baseline trained
  here, every budget against the safeguard floor and against every method
  (on the baseline's variables, or an initialization of its network), the
  LeGR ranking against the network. Returns the loaded --checkpoint
  (net, variables, config), or None."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from legr_jax import family, models  # pylint: disable=g-import-not-at-top
  from legr_jax.methods import legr as legr_lib  # pylint: disable=g-import-not-at-top
  from legr_jax.train import loop  # pylint: disable=g-import-not-at-top
  loaded = None
  if net_config is not None:
    loaded = train.load_trained(FLAGS.checkpoint)
    net, variables, config = loaded
    ds = train.load_dataset(config)
  else:
    config = _baseline_config("auto", train)
    ds = train.load_dataset(config)
    if config.model not in models.known_models():
      raise common.UserError(f"--model={config.model} is not a model; "
                             f"known: {', '.join(models.known_models())}")
    net = models.get(config.model, num_classes=ds.num_classes,
                     input_shape=ds.image_shape)
    loop.check_fit_inputs(config, ds)
    # Stand-in weights (the methods' floors depend on the structure only),
    # drawn in numpy: an eager net.init costs seconds.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: np.abs(rng.standard_normal(s.shape)).astype(s.dtype) + 0.1,
        jax.eval_shape(net.init, jax.random.key(0)))
  finetune = common.finetune_config(config, "auto")
  if finetune is not None:
    loop.check_fit_inputs(finetune, ds)
  # Runs already in WORKDIR from other settings are refused now.
  fix = "choose another --workdir (or delete that folder)"
  if net_config is None:
    common.check_train_runs([os.path.join(FLAGS.workdir, "baseline")],
                            _baseline_config("auto", train), fix)
  for seed in seeds:
    ft = common.finetune_config(config, "auto", seed=seed)
    common.check_train_runs(
        [os.path.join(FLAGS.workdir, f"seed_{seed}", label,
                      family.member_name(b)) for label, _, _ in names
         for b in budgets], ft, fix)
  common.check_budgets_reachable(net.spec, budgets, FLAGS.safeguard,
                                 "--budget")
  if FLAGS.legr_ranking:
    legr_lib.load_affine(FLAGS.legr_ranking, net.spec.layer_names)
  for label, name, options in names:
    method = methods.get(name, **{"safeguard": FLAGS.safeguard, **options})
    if method.learns:
      continue   # a global ranking: the safeguard floor above is exact
    for b in budgets:
      try:
        method.prune(net, variables, b)
      except methods.InfeasibleBudgetError as e:
        raise common.UserError(f"--budget: {b}: {label}: {e}") from None
  return loaded


def _compare(budgets, names, seeds, cpu_kernels, loaded, methods, family,
             latency, ops, provenance, train):
  """Everything after the checks (the workdir is locked)."""
  os.makedirs(FLAGS.workdir, exist_ok=True)
  provenance.record_session(FLAGS.workdir, {"job": "compare",
                                            "methods": [l for l, _, _ in
                                                        names]})
  net, variables, base_config, base_wd = _baseline(cpu_kernels, train,
                                                   loaded)
  net = net.with_ops(ops.resolve(cpu_kernels))
  ds = train.load_dataset(base_config)
  print(ds.summary(), "|", ds.note, flush=True)
  if ds.test_is_val:
    print("warning: this data set has no test split; the 'test' columns are "
          "the validation split. Pass --test_size.", file=sys.stderr)
  base_metrics = family._evaluate(net, variables, ds, "")  # pylint: disable=protected-access
  base_lat = latency.measure(net, variables, batch=FLAGS.latency_batch,
                             repeats=10)
  baseline = {**base_metrics, "latency_ms": base_lat["median_ms"],
              "latency_batch": base_lat["batch"],
              "device_kind": base_lat["device_kind"],
              "workdir": os.path.abspath(base_wd)}
  lowest_flops = min((b for b in budgets if b.metric == "flops"),
                     key=lambda b: b.fraction, default=None)
  rows = []
  for seed in seeds:
    sdir = os.path.join(FLAGS.workdir, f"seed_{seed}")
    finetune = common.finetune_config(base_config, cpu_kernels, seed=seed)
    jobs = []
    for label, name, options in names:
      kw = {"safeguard": FLAGS.safeguard, "seed": seed}
      if name == "legr":
        kw.update(evaluations=FLAGS.legr_evaluations,
                  population=FLAGS.legr_population, sample=FLAGS.legr_sample,
                  tau_hat=FLAGS.legr_tau_hat,
                  val_examples=FLAGS.legr_val_examples,
                  cpu_kernels=cpu_kernels)
      method = methods.get(name, **{**kw, **options})
      artifact, learn_s = None, 0.0
      if method.learns:
        if FLAGS.legr_ranking and label == "legr":
          artifact = FLAGS.legr_ranking
        else:
          target = lowest_flops or methods.Budget("flops", 0.5)
          wd = os.path.join(sdir, f"{label}_search")
          t0 = time.perf_counter()
          artifact = method.learn(net, variables, ds, wd, budget=target,
                                  record={"baseline": os.path.abspath(
                                      base_wd), **family.data_record(
                                          base_config)},
                                  progress=FLAGS.progress, log=common.log)
          learn_s = time.perf_counter() - t0
          result = os.path.join(wd, "result.json")
          if os.path.exists(result):   # the search's own time, resumed too
            with open(result) as f:
              learn_s = json.load(f).get("search_time_s", learn_s)
      jobs.append((label, learn_s, family.FamilyJob(
          method, os.path.join(sdir, label), artifact)))
    # every method's members of this seed together (parallel mode: one
    # batched fine-tuning of K methods x budgets)
    try:
      outs = family.prune_families(
          net, variables, ds, [j for _, _, j in jobs], budgets,
          finetune=finetune, latency_batch=FLAGS.latency_batch,
          progress=FLAGS.progress, log=common.log,
          finetune_mode=FLAGS.finetune_mode,
          parallel_workdir=os.path.join(sdir, family.PARALLEL_DIR))
    except methods.InfeasibleBudgetError as e:
      raise common.UserError(str(e)) from None
    for (label, learn_s, _), out in zip(jobs, outs):
      for r in out:
        r = dict(r, method=label, seed=seed, learn_seconds=learn_s)
        r["method_seconds"] = r["method_seconds"] + learn_s
        rows.append(r)
  header = [
      f"# Pruning methods compared: {net.name} on {ds.name}",
      "",
      f"Data: {ds.summary()} ({ds.note}). Baseline: {base_wd}. "
      f"Fine-tuning: {FLAGS.epochs} epochs, lr {FLAGS.lr} (Nesterov, x0.2 at "
      f"30/60/80%), batch {FLAGS.batch_size}; seeds {seeds}; safeguard "
      f"{FLAGS.safeguard}. Accuracies: val = the validation split (the only "
      "one methods see), test = the test split (reported only). Latency: "
      f"median of the jitted sliced forward pass at batch "
      f"{FLAGS.latency_batch} on {base_lat['device_kind']}. Method s: the "
      "method's own wall time (LeGR: its search + pruning).",
  ]
  table = write_report(FLAGS.workdir, rows, header, baseline)
  print(table)
  print(f"written: {os.path.join(FLAGS.workdir, COMPARISON_MD)}, "
        f"{COMPARISON_PNG}, {COMPARISON_JSON}")
  return 0


if __name__ == "__main__":
  common.run(main)
