"""Bad input is refused before work starts (issue 18).

`CASES` is a table of what a user gets wrong -- mistyped flags, values out
of range, broken or misplaced files, unreachable budgets, a workdir another
job holds -- each run as the real command in a subprocess. Every case
asserts the exit status, that exactly one ``error:`` line names the culprit
(and no traceback is shown), and that neither the case's folder (its
workdir included) nor the shared input files were created or changed. Flag
cases exit before JAX is imported (a fraction of a second); the others load
data, networks or checkpoints first. The slow tests at the end run real
jobs: killed runs that resume past damaged checkpoints and stale locks, two
jobs on one workdir, a search in which no candidate gets a finite loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def _env(**extra) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("LEGR_WORKDIR_LOCKS", None)
  env.update(extra)
  return env


def _run(module: str, *args: str, timeout: int = TIMEOUT):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True,
                        timeout=timeout, check=False)


def _snapshot(path: str) -> dict:
  """{relative path: (size, mtime_ns)} of everything under ``path`` (None
  when it does not exist)."""
  if not os.path.exists(path):
    return None
  out = {}
  for d, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(d, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size if name in files else -1,
                                       st.st_mtime_ns)
  return out


def _damage_checkpoint(step_dir: str) -> None:
  """Truncates the orbax state of one checkpoint (a disk that filled up)."""
  manifest = os.path.join(step_dir, "state", "manifest.ocdbt")
  assert os.path.exists(manifest), os.listdir(os.path.join(step_dir, "state"))
  open(manifest, "w").close()


# --- shared inputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
  """Input files the cases point at: npz data sets (one good, the others
  broken), a trained-network workdir (an initialized cnn_small saved the way
  experiments.train saves it: no training needed), rankings, odd folders."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from legr_jax import models, train  # pylint: disable=g-import-not-at-top
  from legr_jax.data.local import load_digits  # pylint: disable=g-import-not-at-top
  from legr_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from legr_jax.train import optim  # pylint: disable=g-import-not-at-top

  d = tmp_path_factory.mktemp("inputs")
  f = {}
  x, y = load_digits()
  x, y = x[:300], y[:300]

  def npz(name, **arrays):
    f[name] = str(d / f"{name}.npz")
    np.savez(f[name], **arrays)

  npz("tiny", x=x[:200], y=y[:200], x_test=x[200:], y_test=y[200:])
  npz("frac", x=x[:200], y=y[:200] + 0.5)
  npz("neg", x=x[:200], y=y[:200] - 1)
  npz("shape", x=x[:200], y=y[:200], x_test=np.zeros((10, 6, 6), np.uint8),
      y_test=np.zeros(10, np.int64))
  npz("small", x=x[:3], y=y[:3])
  npz("half", x=x[:200], y=y[:200], x_test=x[200:])
  f["trunc"] = str(d / "trunc.npz")
  with open(f["tiny"], "rb") as src, open(f["trunc"], "wb") as dst:
    dst.write(src.read()[:3000])
  f["a_file"] = str(d / "a_file.txt")
  open(f["a_file"], "w").write("not a folder\n")

  # The baseline: what experiments.train --dataset=npz:tiny --val_size=40
  # --epochs=1 --batch_size=32 writes, with initialized weights.
  base = d / "base"
  cfg = train.TrainConfig(model="cnn_small", dataset=f"npz:{f['tiny']}",
                          val_size=40, epochs=1, batch_size=32)
  net = models.get("cnn_small", num_classes=10, input_shape=(8, 8, 1))
  train.prepare_workdir(str(base), cfg, net.config, None, log=lambda s: None)
  opt = optim.make_optimizer(optax.constant_schedule(cfg.lr),
                             momentum=cfg.momentum, nesterov=cfg.nesterov,
                             weight_decay=cfg.weight_decay)
  # Weights drawn in numpy: an eager net.init costs seconds on a busy CPU.
  rng = np.random.default_rng(0)
  def fill(path, leaf):
    w = rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype)
    return np.abs(w) + 1.0 if "var" in jax.tree_util.keystr(path) else w
  variables = jax.tree_util.tree_map_with_path(
      fill, jax.eval_shape(net.init, jax.random.key(0)))
  state = train.init_train_state(net, jax.random.PRNGKey(0), opt, variables)
  manager = ckpt_lib.make_manager(str(base / "checkpoints"))
  ckpt_lib.save(manager, 1, jax.device_get(state),
                {"step": 1, "steps_per_epoch": 5}, {"val_accuracy": 0.1})
  manager.close()
  f["base"] = str(base)

  layers = {n: {"alpha": 1.0, "kappa": 0.0} for n in net.spec.layer_names}
  def ranking(name, **change):
    doc = {"layers": json.loads(json.dumps(layers)),
           "layer_order": list(layers), "loss": 2.3, **change}
    folder = d / name
    folder.mkdir()
    with open(folder / "ranking.json", "w") as fh:
      json.dump(doc, fh)
    f[name] = str(folder)
    return doc
  ranking("ranking_ok")
  ranking("ranking_inf", loss=float("inf"))
  bad = dict(layers, conv1={"alpha": float("nan"), "kappa": 0.0})
  ranking("ranking_nan", layers=bad)
  ranking("ranking_other",
          layers={k: v for k, v in layers.items() if k != "conv1"})
  f["ranking_trunc"] = str(d / "ranking_trunc.json")
  with open(os.path.join(f["ranking_ok"], "ranking.json")) as src:
    open(f["ranking_trunc"], "w").write(src.read()[:40])
  search = d / "unfinished_search"
  search.mkdir()
  (search / "search_config.json").write_text("{}\n")
  f["unfinished_search"] = str(search)
  return f


# --- the table ----------------------------------------------------------------


def _copy_base(files, tmp, name="base"):
  dst = os.path.join(tmp, name)
  shutil.copytree(files["base"], dst)
  return dst


def _base_damaged_checkpoint(files, tmp):
  _damage_checkpoint(os.path.join(_copy_base(files, tmp), "checkpoints", "1"))


def _base_damaged_net_json(files, tmp):
  path = os.path.join(_copy_base(files, tmp), "net.json")
  text = open(path).read()
  open(path, "w").write(text[:len(text) // 2])


def _finished_run_damaged(files, tmp):
  wd = _copy_base(files, tmp, "wd")
  open(os.path.join(wd, "result.json"), "w").write('{"test_accuracy": 0.1}')
  _damage_checkpoint(os.path.join(wd, "checkpoints", "1"))


def _damaged_config(files, tmp):
  os.makedirs(os.path.join(tmp, "wd"))
  open(os.path.join(tmp, "wd", "config.json"), "w").write('{"model": "cnn')


def _train_run_with_lr(files, tmp):
  """The baseline copied to the workdir: its run has lr 0.1."""
  _copy_base(files, tmp, "wd")


def _member_with_one_epoch(files, tmp):
  """A member of a pruned family fine-tuned 1 epoch (as --epochs=1 did)."""
  from legr_jax import train  # pylint: disable=g-import-not-at-top
  with open(os.path.join(files["base"], "config.json")) as fh:
    base = train.TrainConfig.from_dict(json.load(fh))
  cfg = base.replace(epochs=1, lr=0.01, nesterov=True, schedule="multistep",
                     milestones=(0.3, 0.6, 0.8), gamma=0.2,
                     warmup_epochs=0.0, batch_size=128)
  member = os.path.join(tmp, "wd", "flops_0.5")
  os.makedirs(member)
  with open(os.path.join(member, "config.json"), "w") as fh:
    json.dump(cfg.to_dict(), fh)


def _lock(folder, **info):
  os.makedirs(folder, exist_ok=True)
  doc = {"host": socket.gethostname(), "pid": os.getpid(), "job":
         "experiments.train", "token": "0123456789abcdef",
         "time": time.time()}
  doc.update(info)
  with open(os.path.join(folder, ".legr_lock"), "w") as fh:
    json.dump(doc, fh)


def _locked_live(files, tmp):
  _lock(os.path.join(tmp, "wd"))


def _locked_other_host(files, tmp):
  _lock(os.path.join(tmp, "wd"), host="elsewhere.example", pid=1)


def _outer_locked(files, tmp):
  _lock(os.path.join(tmp, "outer"))


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input: ``module`` run with ``args`` (``{wd}``: the case's
  workdir, ``{tmp}``: its folder, ``{name}``: `files` entries) exits with
  ``code`` and one error line containing every ``culprit`` string."""
  id: str
  module: str
  args: tuple[str, ...]
  code: int
  culprits: tuple[str, ...]
  setup: Callable | None = None
  jax: bool = False         # imports JAX: loads data, networks, ...
  slow: bool = False        # a JAX case left to the full run (-m slow)
  allowed: tuple[str, ...] = ()   # paths (under the case's folder) that
                                  # a job that got as far as locking may
                                  # touch: the workdir, its provenance log
  traceback: bool = False   # --verbosity=1: the traceback is shown


TRAIN, SEARCH, PRUNE = ("experiments.train", "experiments.learn_ranking",
                        "experiments.prune")
PIPELINE, COMPARE = "experiments.legr_pipeline", "experiments.compare"
WD = "--workdir={wd}"
TINY = "--dataset=npz:{tiny}"
BASE = "--checkpoint={base}"

CASES = [
    # --- flags (refused while absl parses them, before JAX) ---------------
    Case("mistyped_flag", TRAIN, (WD, "--epoch=3"), 2, ("'epoch'", "epochs")),
    Case("not_a_number", TRAIN, (WD, "--epochs=ten"), 2, ("--epochs",)),
    Case("zero_epochs", TRAIN, (WD, "--epochs=0"), 2, ("--epochs", ">= 1")),
    Case("nan_learning_rate", TRAIN, (WD, "--lr=nan"), 2, ("--lr",)),
    Case("bad_json", TRAIN, (WD, '--model_kwargs={{"shortcut":'), 2,
         ("--model_kwargs", "JSON")),
    Case("val_fraction_one", TRAIN, (WD, "--val_fraction=1"), 2,
         ("--val_fraction",)),
    Case("no_workdir", TRAIN, ("--epochs=1",), 2, ("--workdir",)),
    Case("positional_argument", TRAIN, (WD, "resnet20"), 2,
         ("resnet20", "--name=value")),
    Case("unknown_dataset", TRAIN, (WD, "--dataset=mnist"), 2,
         ("--dataset", "npz:PATH")),
    Case("bad_milestone", TRAIN, (WD, "--milestones=0.3,late"), 2,
         ("--milestones", "late")),
    Case("bad_enum", TRAIN, (WD, "--cpu_kernels=fast"), 2,
         ("--cpu_kernels",)),
    Case("target_zero", SEARCH, (WD, BASE, "--target_flops=0"), 2,
         ("--target_flops",)),
    Case("target_above_one", SEARCH, (WD, BASE, "--target_flops=1.5"), 2,
         ("--target_flops", "nothing is pruned")),
    Case("safeguard_negative", SEARCH, (WD, BASE, "--safeguard=-0.1"), 2,
         ("--safeguard",)),
    Case("population_above_generations", SEARCH,
         (WD, BASE, "--population=64", "--generations=10"), 2,
         ("--generations", "--population")),
    Case("process_id_out_of_range", SEARCH,
         (WD, BASE, "--num_processes=2", "--process_id=2"), 2,
         ("--process_id",)),
    Case("workdir_is_checkpoint", SEARCH, ("--workdir={base}", BASE), 2,
         ("--workdir", "--checkpoint", "same folder")),
    Case("budget_not_a_number", PRUNE, (WD, BASE, "--budgets=0.5,half"), 2,
         ("--budgets", "half")),
    Case("budget_above_one", PRUNE, (WD, BASE, "--budgets=0.5,1.5"), 2,
         ("--budgets", "1.5")),
    Case("pipeline_budget_above_one", PIPELINE, (WD, "--budgets=0.3,1.2"),
         2, ("--budgets", "1.2")),
    Case("pipeline_target_zero", PIPELINE, (WD, "--target_flops=0"), 2,
         ("--target_flops",)),
    Case("pipeline_generations", PIPELINE, (WD, "--generations=4"), 2,
         ("--generations",)),
    Case("pipeline_stage_flag_typo", PIPELINE,
         (WD, "--extra_train_flags=--epoch=3"), 2,
         ("experiments.train", "'epoch'", "--extra_train_flags")),
    Case("compare_budget_zero", COMPARE, (WD, "--budget=0"), 2,
         ("--budget",)),
    # --- files that exist already (checked before JAX) --------------------
    Case("missing_npz", TRAIN, (WD, "--dataset=npz:{tmp}/data.npz"), 2,
         ("data.npz", "does not exist")),
    Case("workdir_is_a_file", TRAIN, ("--workdir={a_file}",), 2,
         ("a_file.txt", "is a file")),
    Case("damaged_config_in_workdir", TRAIN, (WD, "--epochs=1"), 2,
         ("config.json", "--overwrite"), setup=_damaged_config),
    Case("missing_checkpoint", SEARCH, (WD, "--checkpoint={tmp}/baseline"),
         2, ("baseline", "experiments.train")),
    Case("checkpoint_is_a_search", SEARCH,
         (WD, "--checkpoint={unfinished_search}"), 2,
         ("unfinished_search", "not an experiments.train workdir",
          "LeGR search")),
    Case("checkpoint_is_a_file", PRUNE, (WD, "--checkpoint={a_file}"), 2,
         ("a_file.txt", "experiments.train")),
    Case("damaged_net_json", PRUNE, (WD, "--checkpoint={tmp}/base"), 2,
         ("net.json", "damaged"), setup=_base_damaged_net_json),
    Case("missing_ranking", PRUNE, (WD, BASE, "--ranking={tmp}/search"), 2,
         ("search", "learn_ranking")),
    Case("truncated_ranking", PRUNE, (WD, BASE, "--ranking={ranking_trunc}"),
         2, ("ranking_trunc.json", "damaged")),
    Case("ranking_is_the_baseline", PRUNE, (WD, BASE, "--ranking={base}"), 2,
         ("no ranking.json", "experiments.train workdir")),
    Case("unfinished_search", PRUNE,
         (WD, BASE, "--ranking={unfinished_search}"), 2,
         ("not finished", "resume")),
    Case("compare_missing_checkpoint", COMPARE,
         (WD, "--checkpoint={tmp}/nope"), 2, ("--checkpoint", "nope")),
    # --- data (JAX imported, data loaded; nothing trained) ----------------
    Case("fractional_labels", TRAIN, (WD, "--dataset=npz:{frac}"), 2,
         ("frac.npz", "'y'", "integer"), jax=True),
    Case("negative_labels", TRAIN, (WD, "--dataset=npz:{neg}"), 2,
         ("neg.npz", "-1"), jax=True),
    Case("test_images_other_shape", TRAIN, (WD, "--dataset=npz:{shape}"), 2,
         ("shape.npz", "x_test", "(6, 6, 1)"), jax=True),
    Case("test_split_half_given", TRAIN, (WD, "--dataset=npz:{half}"), 2,
         ("half.npz", "y_test"), jax=True, slow=True),
    Case("too_small_for_splits", TRAIN, (WD, "--dataset=npz:{small}"), 2,
         ("small.npz", "too small"), jax=True),
    Case("truncated_npz", TRAIN, (WD, "--dataset=npz:{trunc}"), 2,
         ("trunc.npz", "not a readable .npz"), jax=True),
    Case("val_size_too_large", TRAIN, (WD, TINY, "--val_size=300"), 2,
         ("--val_size", "200 images"), jax=True, slow=True),
    Case("batch_larger_than_data", TRAIN, (WD, TINY, "--batch_size=512"), 2,
         ("--batch_size", "fewer than one batch"), jax=True),
    Case("unknown_model", TRAIN, (WD, "--model=resnet21"), 2,
         ("--model=resnet21", "resnet20"), jax=True, slow=True),
    Case("verbosity_shows_traceback", TRAIN,
         (WD, "--dataset=npz:{neg}", "--verbosity=1"), 1, ("neg.npz",),
         jax=True, traceback=True),
    # --- budgets, networks, checkpoints, rankings -------------------------
    Case("target_below_safeguard_floor", SEARCH,
         (WD, BASE, "--target_flops=0.01"), 2,
         ("--target_flops", "--safeguard=0.1", "0.01518"), jax=True),
    Case("damaged_baseline_checkpoint", SEARCH,
         (WD, "--checkpoint={tmp}/base"), 2,
         ("checkpoints/1", "does not restore", "--overwrite"),
         setup=_base_damaged_checkpoint, jax=True),
    Case("budget_below_safeguard_floor", PRUNE,
         (WD, BASE, "--budgets=0.5,0.01"), 2,
         ("--budgets", "0.01", "--safeguard"), jax=True),
    Case("ranking_with_infinite_loss", PRUNE,
         (WD, BASE, "--ranking={ranking_inf}"), 2,
         ("ranking_inf", "no feasible candidate"), jax=True),
    Case("ranking_with_nan_alpha", PRUNE,
         (WD, BASE, "--ranking={ranking_nan}"), 2,
         ("ranking_nan", "conv1", "not finite"), jax=True, slow=True),
    Case("ranking_of_another_network", PRUNE,
         (WD, BASE, "--ranking={ranking_other}"), 2,
         ("ranking_other", "different network"), jax=True, slow=True),
    Case("mistyped_method", PRUNE, (WD, BASE, "--method=fgpm"), 2,
         ("--method=fgpm", "fpgm"), jax=True),
    Case("round_to_with_layerwise_method", PRUNE,
         (WD, BASE, "--method=uniform", "--round_to=8"), 2,
         ("round_to", "uniform"), jax=True, slow=True),
    Case("pipeline_budget_below_floor", PIPELINE,
         (WD, TINY.replace("--", "--extra_train_flags=--"),
          "--budgets=0.01,0.5"), 2, ("--budgets", "0.01"), jax=True),
    Case("compare_budget_below_floor", COMPARE,
         (WD, BASE, "--budget=0.005", "--methods=l1,uniform"), 2,
         ("--budget", "0.005"), jax=True, slow=True),
    Case("compare_unknown_method", COMPARE, (WD, BASE, "--methods=l2,l3"), 2,
         ("--methods", "l3"), jax=True, slow=True),
    Case("finished_run_damaged_checkpoint", TRAIN,
         (WD, TINY, "--val_size=40", "--epochs=1", "--batch_size=32"), 2,
         ("checkpoints/1", "--overwrite"), setup=_finished_run_damaged,
         jax=True, allowed=("wd", "wd/provenance.jsonl")),
    Case("rerun_with_another_learning_rate", TRAIN,
         (WD, TINY, "--val_size=40", "--epochs=1", "--batch_size=32",
          "--lr=0.05"), 2, ("different", "lr: 0.1 -> 0.05", "--overwrite"),
         setup=_train_run_with_lr, jax=True),
    Case("prune_rerun_with_other_epochs", PRUNE,
         (WD, BASE, "--budgets=0.5", "--epochs=2"), 2,
         ("flops_0.5", "epochs: 1 -> 2", "--overwrite"),
         setup=_member_with_one_epoch, jax=True, slow=True),
    # --- concurrency --------------------------------------------------------
    Case("workdir_in_use", TRAIN, (WD, TINY, "--epochs=1"), 2,
         ("in use by experiments.train", f"pid {os.getpid()}", ".legr_lock"),
         setup=_locked_live, jax=True),
    Case("workdir_in_use_on_another_host", PRUNE, (WD, BASE), 2,
         ("elsewhere.example", "another host", ".legr_lock"),
         setup=_locked_other_host, jax=True, slow=True),
    Case("workdir_inside_a_locked_one", TRAIN,
         ("--workdir={tmp}/outer/inner", TINY, "--epochs=1"), 2,
         ("lies inside", "outer", f"pid {os.getpid()}"),
         setup=_outer_locked, jax=True, slow=True),
]


def test_the_table_is_large_and_unique():
  assert len(CASES) >= 30
  assert len({c.id for c in CASES}) == len(CASES)
  classes = {c.module for c in CASES}
  assert classes == {TRAIN, SEARCH, PRUNE, PIPELINE, COMPARE}


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
    for c in CASES])
def test_bad_input_is_refused_before_anything_is_written(case, files,
                                                         tmp_path):
  tmp = str(tmp_path)
  if case.setup:
    case.setup(files, tmp)
  values = dict(files, wd=os.path.join(tmp, "wd"), tmp=tmp)
  args = [a.format(**values) for a in case.args]
  before, inputs = _snapshot(tmp), _snapshot(os.path.dirname(files["base"]))
  t0 = time.perf_counter()
  r = _run(case.module, *args)
  took = time.perf_counter() - t0
  out = r.stdout + r.stderr
  assert r.returncode == case.code, out[-3000:]
  if case.traceback:
    assert "Traceback" in r.stderr
  else:
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for culprit in case.culprits:
      assert culprit in errors[0], (culprit, errors[0])
  after = _snapshot(tmp)
  for name in case.allowed:
    for snap in (before, after):
      snap.pop(name, None)
  assert after == before, (set(after) ^ set(before), out[-2000:])
  assert _snapshot(os.path.dirname(files["base"])) == inputs
  if not case.jax:
    assert took < 20, f"{case.id} took {took:.1f}s: is JAX imported early?"


def test_flag_cases_do_not_import_jax():
  """The flag checks run before JAX: a bad flag of every script is refused
  without JAX ever being imported."""
  probe = ("import sys, runpy; sys.argv = sys.argv[1:]; "
           "import absl.app as a; "
           "exit_ = sys.exit\n"
           "def check(code=0):\n"
           "  assert 'jax' not in sys.modules, 'jax was imported'\n"
           "  exit_(code)\n"
           "sys.exit = check\n"
           "runpy.run_module(sys.argv[0], run_name='__main__')")
  for module, args in (
      (TRAIN, ["--workdir=/x", "--epochs=0"]),
      (SEARCH, ["--workdir=/x", "--checkpoint=/y", "--target_flops=2"]),
      (SEARCH, ["--workdir=/x", "--checkpoint=/nowhere"]),
      (PRUNE, ["--workdir=/x", "--checkpoint=/y", "--budgets=x"]),
      (PIPELINE, ["--workdir=/x", "--budgets=2"]),
      (PIPELINE, ["--workdir=/x", "--extra_train_flags=--epoch=3"]),
      (COMPARE, ["--workdir=/x", "--budget=2"])):
    r = subprocess.run([sys.executable, "-c", probe, module, *args],
                       cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2, (module, r.stderr[-2000:])
    assert "jax was imported" not in r.stderr, module


def test_train_flag_defaults_are_the_librarys():
  code = ("import json, experiments.train as t, experiments.common as c\n"
          "from legr_jax import data, ops, train\n"
          "d = train.TrainConfig().to_dict()\n"
          "bad = {k: (v, d[k]) for k, v in t.DEFAULTS.items()\n"
          "       if (list(v) if isinstance(v, tuple) else v) != d[k]}\n"
          "assert not bad, bad\n"
          "assert tuple(t.AUGMENTATIONS) == tuple(data.AUGMENTATIONS)\n"
          "assert tuple(t.SCHEDULES) == tuple(train.SCHEDULES)\n"
          "assert tuple(c._CPU_KERNELS) == tuple(ops.CPU_KERNELS)\n"
          "assert set(c.DATASETS) | {'npz:PATH', 'cifar_dir:PATH'} == "
          "set(data.KNOWN)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-2000:]


# --- library contracts (in process) -------------------------------------------


def test_ranking_refuses_non_finite_numbers_eagerly_and_flags_them_under_jit():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from legr_jax import models, ranking  # pylint: disable=g-import-not-at-top
  spec = models.get("cnn_small", input_shape=(8, 8, 1)).spec
  rng = np.random.default_rng(0)
  norms = {c.name: rng.random(c.out_channels).astype(np.float32)
           for c in spec.convs}
  one = {n: 1.0 for n in spec.layer_names}
  zero = {n: 0.0 for n in spec.layer_names}
  for bad in (float("nan"), float("inf")):
    with pytest.raises(ValueError, match="conv2.*not finite"):
      ranking.affine_scores(norms, dict(one, conv2=bad), zero)
    with pytest.raises(ValueError, match="kappa.*not finite"):
      ranking.affine_scores(norms, one, dict(zero, conv2=bad))
  scores = ranking.group_scores(spec, ranking.affine_scores(norms, one, zero))
  g = spec.groups[0].name
  with pytest.raises(ValueError, match=f"scores\\['{g}'\\].*not finite"):
    ranking.masks_for_budget(spec, dict(scores, **{g: scores[g].at[0].set(
        jnp.nan)}), flops=0.5)

  def feasible(alpha, kappa):
    s = ranking.group_scores(spec, ranking.affine_scores(norms, alpha,
                                                         kappa))
    return ranking.masks_for_budget(spec, s, flops=0.5, safeguard=0.1)[1]
  # Traced (one compile): NaN / inf affine parameters make feasible False.
  alphas = {n: jnp.array([1.0, 1.0, jnp.inf]) for n in spec.layer_names}
  kappas = {n: jnp.array([0.0, jnp.nan, 0.0]) for n in spec.layer_names}
  np.testing.assert_array_equal(jax.jit(jax.vmap(feasible))(alphas, kappas),
                                [True, False, False])


def test_npz_labels_and_splits_are_checked_at_load_time(tmp_path):
  from legr_jax import data  # pylint: disable=g-import-not-at-top
  from legr_jax.data import local  # pylint: disable=g-import-not-at-top
  assert local.as_labels(np.array([0.0, 2.0, 1.0]), "y").dtype == np.int32
  for bad, match in ((np.array([0.5]), "integer"),
                     (np.array([-1, 0]), "-1"),
                     (np.array([np.nan]), "integer"),
                     (np.array(["a"]), "dtype"),
                     (np.zeros((3, 2)), "one label per image")):
    with pytest.raises(ValueError, match=match):
      local.as_labels(bad, "y")
  with pytest.raises(ValueError, match="below the 10 classes"):
    local.as_labels(np.array([3, 10]), "y", num_classes=10)
  x = np.zeros((20, 4, 4), np.uint8)
  y = np.arange(20) % 3
  path = str(tmp_path / "d.npz")
  np.savez(path, x=x, y=y)
  with pytest.raises(ValueError, match="test_size"):
    data.get_dataset(f"npz:{path}", test_size=19)
  with pytest.raises(ValueError, match="val_size"):
    data.get_dataset(f"npz:{path}", val_size=20)
  with pytest.raises(ValueError, match="too small"):
    data.get_dataset(f"npz:{path}", val_fraction=0.01)


def test_workdir_lock(tmp_path, capsys):
  from legr_jax import workdir  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  lock = workdir.WorkdirLock(wd, "job-a").acquire()
  assert workdir.read_lock(wd)["pid"] == os.getpid()
  with pytest.raises(workdir.WorkdirLockedError, match="in use by job-a"):
    workdir.WorkdirLock(wd, "job-b").acquire()
  # Another job may not lock a workdir inside it; a child process of the
  # holder (its token inherited: a pipeline's stage) may.
  code = ("import importlib.util as u, sys; "   # the module alone: no JAX
          "s = u.spec_from_file_location('w', sys.argv[2] + "
          "'/legr_jax/workdir.py'); w = u.module_from_spec(s); "
          "s.loader.exec_module(w); "
          "w.WorkdirLock(sys.argv[1], 'stage').acquire().release()")
  stage = os.path.join(wd, "stage")
  for env, ok in ((_env(), False), (dict(os.environ), True)):
    child = subprocess.run([sys.executable, "-c", code, stage, ROOT],
                           env=env, capture_output=True, text=True,
                           timeout=120, check=False)
    assert (child.returncode == 0) == ok, child.stderr[-2000:]
    assert ok or "lies inside" in child.stderr
  lock.release()
  assert workdir.read_lock(wd) is None
  assert workdir.LOCK_FILE not in os.listdir(wd)
  # Process 1..N of a multi-host job hold nothing.
  other = workdir.WorkdirLock(wd, "job-c", primary=False).acquire()
  assert workdir.read_lock(wd) is None
  other.release()
  # A lock of a process that ended is stale: replaced, with a warning.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _lock(wd, pid=dead.pid, job="job-dead")
  with workdir.WorkdirLock(wd, "job-d"):
    assert workdir.read_lock(wd)["job"] == "job-d"
  assert "stale lock" in capsys.readouterr().err
  # A pid reused by another process (other start time) is stale too.
  _lock(wd, start=1, job="job-reused")
  with workdir.WorkdirLock(wd, "job-e"):
    assert workdir.read_lock(wd)["job"] == "job-e"
  # A lock of another host cannot be checked: refused, with the way out.
  _lock(wd, host="elsewhere.example", pid=1)
  with pytest.raises(workdir.WorkdirLockedError,
                     match="another host.*delete .*legr_lock"):
    workdir.WorkdirLock(wd, "job-f").acquire()
  # A workdir the lock created and the job left empty is removed again.
  fresh = str(tmp_path / "fresh")
  workdir.WorkdirLock(fresh, "job-g").acquire().release()
  assert not os.path.exists(fresh)


_NONE_RESTORES = """
import os, sys, jax
from legr_jax import train
from legr_jax.train import checkpoint as ckpt_lib
base = sys.argv[1]
try:
  train.load_trained(base)
  raise SystemExit("load_trained did not refuse the damaged checkpoint")
except ckpt_lib.CheckpointError as e:
  assert "checkpoints/1 does not restore" in str(e) and "delete" in str(e), e
manager = ckpt_lib.make_manager(os.path.join(base, "checkpoints"))
net = train.load_trained(sys.argv[2])[0]
like = jax.eval_shape(lambda: train.init_train_state(
    net, jax.random.PRNGKey(0), train.make_optimizer(0.1)))
warnings = []
try:
  ckpt_lib.restore_newest(manager, like, log=warnings.append)
  raise SystemExit("restore_newest did not refuse")
except ckpt_lib.CheckpointError as e:
  assert "no checkpoint" in str(e), e
assert os.path.isdir(os.path.join(base, "checkpoints", "1"))  # kept
assert len(warnings) == 1 and "checkpoints/1" in warnings[0], warnings
print("OK")
"""


def test_damaged_run_files_and_checkpoints(files, tmp_path):
  """Library side: a damaged config.json is a conflict that --overwrite
  clears; a checkpoint that does not restore is named, and with no older one
  that restores nothing is deleted (in a subprocess: orbax's other reads of
  it fail later, in the background)."""
  from legr_jax import train  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  open(os.path.join(wd, "config.json"), "w").write("{")
  cfg = train.TrainConfig()
  with pytest.raises(train.WorkdirConflictError, match="damaged"):
    train.prepare_workdir(wd, cfg, {}, None, log=lambda s: None)
  assert not train.prepare_workdir(wd, cfg, {}, None, overwrite=True,
                                   log=lambda s: None)
  assert json.load(open(os.path.join(wd, "config.json")))["lr"] == cfg.lr

  base = _copy_base(files, str(tmp_path))
  _damage_checkpoint(os.path.join(base, "checkpoints", "1"))
  r = subprocess.run([sys.executable, "-c", _NONE_RESTORES, base,
                      files["base"]], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=300,
                     check=False)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_logs_cut_short_by_a_kill_are_read_past(tmp_path):
  from legr_jax.search import state as state_lib  # pylint: disable=g-import-not-at-top
  from legr_jax.train import loop  # pylint: disable=g-import-not-at-top
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"event": "start", "step": 0}\n{"split": "tr')
  log = loop.MetricsLog(str(path))       # ends the torn line
  log.write({"event": "resume", "step": 0})
  assert [r["event"] for r in loop.read_metrics(str(tmp_path))] == [
      "start", "resume"]
  (tmp_path / state_lib.EVALUATIONS).write_text(
      '{"evaluation": 0, "loss": 1.0}\n{"evaluation": 1, "lo')
  evlog = state_lib.EvaluationLog(str(tmp_path))
  assert [r["evaluation"] for r in evlog.read()] == [0]
  evlog.truncate(1)
  evlog.write([{"evaluation": 1, "loss": 2.0}])
  assert [r["evaluation"] for r in evlog.read()] == [0, 1]


# --- real jobs (slow) ---------------------------------------------------------


TINY_TRAIN = ("--val_size=40", "--epochs=2", "--batch_size=32",
              "--ckpt_every_steps=3", "--keep_checkpoints=3", "--noprogress")


@pytest.mark.slow
def test_killed_run_resumes_past_stale_lock_torn_log_damaged_checkpoint(
    files, tmp_path):
  wd = str(tmp_path / "run")
  args = (f"--workdir={wd}", f"--dataset=npz:{files['tiny']}", *TINY_TRAIN)
  r = _run(TRAIN, *args, "--debug_crash_at_step=8")
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  assert os.path.exists(os.path.join(wd, ".legr_lock"))      # left behind
  ckpts = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints"))
                 if s.isdigit())
  assert ckpts[-1] == 6, ckpts
  _damage_checkpoint(os.path.join(wd, "checkpoints", "6"))
  with open(os.path.join(wd, "metrics.jsonl"), "a") as fh:
    fh.write('{"split": "train", "st')                       # torn record
  r = _run(TRAIN, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "stale lock" in r.stderr
  assert f"{wd}/checkpoints/6 does not restore" in r.stderr
  assert "resuming from checkpoint" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(wd, ".legr_lock"))
  from legr_jax import train  # pylint: disable=g-import-not-at-top
  events = [e["event"] for e in train.read_metrics(wd) if "event" in e]
  assert events == ["start", "resume", "done"]
  result = json.load(open(os.path.join(wd, "result.json")))
  assert result["steps"] == 10


@pytest.mark.slow
def test_two_jobs_cannot_write_one_workdir(files, tmp_path):
  wd = str(tmp_path / "run")
  args = (f"--workdir={wd}", f"--dataset=npz:{files['tiny']}",
          "--val_size=40", "--batch_size=32", "--noprogress")
  first = subprocess.Popen([sys.executable, "-m", TRAIN, *args,
                            "--epochs=500"], cwd=ROOT, env=_env(),
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    lock = os.path.join(wd, ".legr_lock")
    while not os.path.exists(lock) and time.time() < deadline:
      assert first.poll() is None
      time.sleep(0.2)
    assert os.path.exists(lock)
    second = _run(TRAIN, *args, "--epochs=500")
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr
    assert "in use by experiments.train" in second.stderr
    # A different job kind on the same workdir is refused the same way.
    third = _run(SEARCH, f"--workdir={wd}", f"--checkpoint={files['base']}")
    assert third.returncode == 2 and f"pid {first.pid}" in third.stderr
  finally:
    first.kill()
    first.wait()
  from legr_jax import workdir  # pylint: disable=g-import-not-at-top
  assert workdir.holder_alive(workdir.read_lock(wd)) is False  # stale now


@pytest.mark.slow
def test_search_without_a_finite_loss_fails_and_writes_no_ranking(
    files, tmp_path):
  wd = str(tmp_path / "search")
  r = _run(SEARCH, f"--workdir={wd}", f"--checkpoint={files['base']}",
           "--tau_hat=2", "--lr=1e30", "--generations=4", "--population=4",
           "--sample=2", "--batch_size=32", "--eval_batch_size=40",
           "--noprogress")
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "no candidate" in errors[0], r.stderr[-2000:]
  assert "--lr" in errors[0]
  assert not os.path.exists(os.path.join(wd, "ranking.json"))
  assert not os.path.exists(os.path.join(wd, "result.json"))


@pytest.mark.slow
def test_killed_search_resumes_past_a_damaged_checkpoint(files, tmp_path):
  wd = str(tmp_path / "search")
  args = (f"--workdir={wd}", f"--checkpoint={files['base']}",
          "--generations=24", "--population=8", "--sample=4",
          "--eval_batch_size=40", "--checkpoint_every=4", "--noprogress")
  r = _run(SEARCH, *args, "--debug_crash_after=14")
  assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "state"))
                 if s.isdigit())
  assert steps == [8, 12], steps
  _damage_checkpoint(os.path.join(wd, "state", "12"))
  r = _run(SEARCH, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"{wd}/state/12 does not restore" in r.stderr
  assert "Traceback" not in r.stderr
  assert "resuming" in r.stdout + r.stderr
  log = [json.loads(l) for l in open(os.path.join(wd, "evaluations.jsonl"))]
  assert [e["evaluation"] for e in log] == list(range(24))
  assert os.path.exists(os.path.join(wd, "ranking.json"))
