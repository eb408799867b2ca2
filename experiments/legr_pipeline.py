"""LeGR end to end: train a baseline, learn the ranking, prune to a family of
budgets, fine-tune each and store the Pareto set.

  python -m experiments.legr_pipeline --workdir=workdirs/legr_digits

Defaults run offline in a few minutes on a 2-core CPU (digits, cnn_small, a
small search). Each stage is its own experiment in its own sub-workdir and is
run as a subprocess with the command printed first, so any stage can be rerun
or resumed by hand:

  WORKDIR/baseline   python -m experiments.train ...
  WORKDIR/ranking    python -m experiments.learn_ranking ...
  WORKDIR/pruned     python -m experiments.prune ...  (pruned/pareto: orbax)

Rerunning the pipeline resumes every stage (finished stages do nothing).

Before the first stage the pipeline checks its own flags, every stage's
flags (each stage run with --only_check_args) and every budget and the
search target against the smallest cost --safeguard allows; then it locks
WORKDIR for its stages.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import warnings

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Root of the three stage workdirs.")
flags.DEFINE_string("model", "cnn_small", "Model name (legr_jax.models).")
flags.DEFINE_string("dataset", "digits", "Data set (legr_jax.data).")
flags.DEFINE_integer("epochs", 30, "Baseline training epochs.")
flags.DEFINE_float("lr", 0.1, "Baseline learning rate.")
flags.DEFINE_float("target_flops", 0.3, "Lowest FLOPs target: the search "
                   "runs there (LeGR).")
flags.DEFINE_list("budgets", ["0.3", "0.5", "0.7"], "FLOPs budgets of the "
                  "pruned family.")
flags.DEFINE_integer("generations", 64, "Search evaluations in total.")
flags.DEFINE_integer("population", 16, "Search population size.")
flags.DEFINE_integer("sample", 4, "Tournament sample size.")
flags.DEFINE_integer("tau_hat", 20, "SGD steps per candidate in the search "
                     "before its validation loss (20 by default: at 0, every "
                     "pruned candidate is near chance and the search "
                     "favours networks whose outputs collapse to uniform; "
                     "benchmarks/RESULTS.md, issue 20's study).")
flags.DEFINE_integer("finetune_epochs", 10, "Fine-tuning epochs per budget.")
flags.DEFINE_float("safeguard", 0.1, "Minimum kept fraction per group.")
flags.DEFINE_enum("aggregate", "sum", ["sum", "mean", "max"], "Search: how "
                  "layers sharing a channel combine their scores "
                  "(experiments.learn_ranking --aggregate).")
flags.DEFINE_bool("chains", False, "Search: also over the LeGR reference's "
                  "cross-stage chains (learn_ranking --chains; with "
                  "pad='append' ResNets).")
flags.DEFINE_list("extra_train_flags", [], "Passed through to "
                  "experiments.train, e.g. --extra_train_flags=--val_size=1000")
flags.mark_flag_as_required("workdir")

# Flag values are checked while absl parses them (before JAX is imported).
common.dataset_name("dataset")
common.number("epochs", 1)
common.number("lr", 0, low_open=True)
common.number("target_flops", 0, 1, low_open=True, high_open=True,
              hint="the kept FLOPs fraction the search prunes to, e.g. 0.3")
common.budget_list("budgets")
common.number("population", 1)
common.number("sample", 1)
common.require(["population", "generations"],
               lambda d: d["population"] <= d["generations"],
               "--generations (search evaluations in total) must be at least "
               "--population")
common.number("tau_hat", 0)
common.number("finetune_epochs", 0)
common.number("safeguard", 0, 1)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _stages(wd: str) -> list[tuple[str, list[str]]]:
  """(module, arguments) of the three stages."""
  base, rank, pruned = (os.path.join(wd, d) for d in
                        ("baseline", "ranking", "pruned"))
  kernels = [f"--cpu_kernels={common.CPU_KERNELS.value}"]
  return [
      ("experiments.train", kernels + [
          f"--workdir={base}", f"--model={FLAGS.model}",
          f"--dataset={FLAGS.dataset}", f"--epochs={FLAGS.epochs}",
          f"--lr={FLAGS.lr}"] + FLAGS.extra_train_flags),
      ("experiments.learn_ranking", kernels + [
          f"--workdir={rank}", f"--checkpoint={base}",
          f"--target_flops={FLAGS.target_flops}",
          f"--tau_hat={FLAGS.tau_hat}", f"--generations={FLAGS.generations}",
          f"--population={FLAGS.population}", f"--sample={FLAGS.sample}",
          f"--safeguard={FLAGS.safeguard}", f"--aggregate={FLAGS.aggregate}",
          f"--{'' if FLAGS.chains else 'no'}chains"]),
      ("experiments.prune", kernels + [
          f"--workdir={pruned}", f"--checkpoint={base}", f"--ranking={rank}",
          f"--budgets={','.join(FLAGS.budgets)}",
          f"--epochs={FLAGS.finetune_epochs}",
          f"--safeguard={FLAGS.safeguard}"]),
  ]


def _check_stage_flags(module: str, args: list[str]) -> None:
  """Runs a stage with --only_check_args: its flags, nothing else."""
  r = subprocess.run([sys.executable, "-m", module, *args,
                      "--only_check_args"], cwd=_ROOT, env=_env(),
                     capture_output=True, text=True, check=False)
  if r.returncode != 0:
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    why = lines[-1] if lines else f"exit {r.returncode}"
    why = why[len("error: "):] if why.startswith("error: ") else why
    src = (" (its flags come from --extra_train_flags and the pipeline's own)"
           if module == "experiments.train" else "")
    raise common.UserError(f"stage {module} refuses its flags{src}: {why}")


def _extra(name: str, default=None):
  """The last ``--name=value`` of --extra_train_flags (as the train stage
  reads it), else ``default``."""
  value = default
  for f in FLAGS.extra_train_flags:
    if f.startswith(f"--{name}="):
      value = f.split("=", 1)[1]
  return value


def _check_budgets() -> None:
  """Every budget and the search target against the safeguard floor of the
  network the train stage will build (its data set's shape and classes)."""
  from legr_jax import data, models  # pylint: disable=g-import-not-at-top
  model = _extra("model", FLAGS.model)
  dataset = _extra("dataset", FLAGS.dataset)
  common.check_dataset_files(dataset)
  opt_int = lambda v: None if v is None else int(v)  # noqa: E731
  with warnings.catch_warnings():   # "no test split": the train stage warns
    warnings.simplefilter("ignore")
    ds = data.get_dataset(
        dataset, data_dir=_extra("data_dir"),
        val_fraction=float(_extra("val_fraction", 0.1)),
        val_size=opt_int(_extra("val_size")),
        test_size=opt_int(_extra("test_size")),
        seed=int(_extra("split_seed", 0)))
  if model not in models.known_models():
    raise common.UserError(f"--model={model} is not a model; known: "
                           f"{', '.join(models.known_models())}")
  try:
    net = models.get(model, num_classes=ds.num_classes,
                     input_shape=ds.image_shape,
                     **json.loads(_extra("model_kwargs", "{}")))
  except (TypeError, ValueError) as e:
    raise common.UserError(f"--model={model} on {dataset}: {e}") from None
  common.check_budgets_reachable(net.spec, [("flops", FLAGS.target_flops)],
                                 FLAGS.safeguard, "--target_flops")
  common.check_budgets_reachable(
      net.spec, [common.parse_budget(b) for b in FLAGS.budgets],
      FLAGS.safeguard, "--budgets")


def _run(module: str, args: list[str]) -> None:
  cmd = [sys.executable, "-m", module] + args
  print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
  r = subprocess.run(cmd, cwd=_ROOT, env=_env(), check=False)
  if r.returncode != 0:
    raise common.UserError(
        f"stage {module} failed (exit {r.returncode}); fix the cause and "
        "rerun the same pipeline command to resume",
        exit_code=r.returncode if r.returncode > 0 else common.EXIT_FAILED)


def main(argv):
  del argv  # flags only: common.run refuses positional arguments
  wd = os.path.abspath(FLAGS.workdir)
  common.check_output_workdir(FLAGS.workdir)
  common.check_dataset_files(FLAGS.dataset)
  stages = _stages(wd)
  for module, args in stages:
    _check_stage_flags(module, args)
  common.start_process()
  _check_budgets()
  with common.lock_workdir(wd, "experiments.legr_pipeline"):
    for module, args in stages:
      _run(module, args)
  pruned = os.path.join(wd, "pruned")
  print(f"done: Pareto set in {os.path.join(pruned, 'pareto')}, summary in "
        f"{os.path.join(pruned, 'summary.json')}")
  return 0


if __name__ == "__main__":
  common.run(main)
