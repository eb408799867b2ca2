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
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from absl import app, flags

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
flags.DEFINE_integer("tau_hat", 0, "SGD steps per candidate in the search.")
flags.DEFINE_integer("finetune_epochs", 10, "Fine-tuning epochs per budget.")
flags.DEFINE_float("safeguard", 0.1, "Minimum kept fraction per group.")
flags.DEFINE_list("extra_train_flags", [], "Passed through to "
                  "experiments.train, e.g. --extra_train_flags=--val_size=1000")
flags.mark_flag_as_required("workdir")


def _run(module: str, args: list[str]) -> None:
  cmd = [sys.executable, "-m", module] + args
  print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run(cmd, cwd=root, env=env, check=False)
  if r.returncode != 0:
    raise SystemExit(f"stage {module} failed (exit {r.returncode}); fix the "
                     "cause and rerun the same pipeline command to resume")


def main(argv):
  del argv
  wd = os.path.abspath(FLAGS.workdir)
  base, rank, pruned = (os.path.join(wd, d) for d in
                        ("baseline", "ranking", "pruned"))
  kernels = [f"--cpu_kernels={common.CPU_KERNELS.value}"]
  _run("experiments.train", kernels + [
      f"--workdir={base}", f"--model={FLAGS.model}",
      f"--dataset={FLAGS.dataset}", f"--epochs={FLAGS.epochs}",
      f"--lr={FLAGS.lr}"] + FLAGS.extra_train_flags)
  _run("experiments.learn_ranking", kernels + [
      f"--workdir={rank}", f"--checkpoint={base}",
      f"--target_flops={FLAGS.target_flops}", f"--tau_hat={FLAGS.tau_hat}",
      f"--generations={FLAGS.generations}",
      f"--population={FLAGS.population}", f"--sample={FLAGS.sample}",
      f"--safeguard={FLAGS.safeguard}"])
  _run("experiments.prune", kernels + [
      f"--workdir={pruned}", f"--checkpoint={base}", f"--ranking={rank}",
      f"--budgets={','.join(FLAGS.budgets)}",
      f"--epochs={FLAGS.finetune_epochs}", f"--safeguard={FLAGS.safeguard}"])
  print(f"done: Pareto set in {os.path.join(pruned, 'pareto')}, summary in "
        f"{os.path.join(pruned, 'summary.json')}")


if __name__ == "__main__":
  app.run(main)
