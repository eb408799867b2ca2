"""The papers' presets (experiments/presets/*.flags) parse, pass every
check that comes before the work with their own networks, and run end to end
at tiny sizes on fake TFDS data.

Nothing downloads: `fake_tfds.write` prepares cifar10 / cifar100 in a
temporary TFDS data_dir with TFDS's own builders (random images, the real
features and array_record files), and the runs read it through
``TFDS_DATA_DIR`` / ``data_dir`` exactly as they would read the prepared
real data.

* `test_preset_flags_are_valid`: every flag value passes the module's
  validators (``--only_check_args``; no JAX).
* `test_preset_preflight`: the preset's network (model options included) on
  the fake data's shape and classes; the search target and every budget
  against the safeguard floor; CLR-RNF's masks at every budget.
* `test_preset_dry_run` (slow): the preset's command end to end; after the
  flagfile only sizes are overridden (epochs, search evaluations, tau_hat,
  validation split, batches, no fine-tuning) and, unless
  ``LEGR_PRESET_FULL_MODELS=1``, the network: resnet20 (same family and
  options) stands in for ResNet-56 / MobileNetV2 / VGG-16, whose runs take
  minutes each on a 2-core CPU (with the variable set: the preset's own).
"""

import glob
import json
import os
import subprocess
import sys

import pytest

import fake_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = os.path.join(ROOT, "experiments", "presets")

# preset -> (module, data set)
EXPECTED = {
    "legr_table1_resnet56_cifar10": ("experiments.legr_pipeline", "cifar10"),
    "legr_fig2_resnet56_cifar100": ("experiments.legr_pipeline", "cifar100"),
    "legr_fig2_mobilenetv2_cifar100": ("experiments.legr_pipeline",
                                       "cifar100"),
    "clr_rnf_resnet56_cifar10": ("experiments.compare", "cifar10"),
    "clr_rnf_vgg16_cifar10": ("experiments.compare", "cifar10"),
}


def preset_path(name):
  return os.path.join(PRESETS, f"{name}.flags")


def preset_flags(name):
  """{flag: value} of a preset (its non-comment lines, --flag=value)."""
  out = {}
  with open(preset_path(name)) as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      assert line.startswith("--") and "=" in line, line
      key, value = line[2:].split("=", 1)
      out[key] = value
  return out


def _run(args, env=None, timeout=600):
  env = dict(os.environ if env is None else env)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_every_preset_is_listed():
  found = {os.path.basename(p)[:-len(".flags")]
           for p in glob.glob(os.path.join(PRESETS, "*.flags"))}
  assert found == set(EXPECTED)
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  for name in EXPECTED:
    assert f"experiments/presets/{name}.flags" in readme, name


def test_presets_say_what_the_papers_say():
  t1 = preset_flags("legr_table1_resnet56_cifar10")
  assert (t1["model"], t1["dataset"], t1["target_flops"], t1["tau_hat"],
          t1["budgets"], t1["finetune_epochs"]) == (
              "resnet56", "cifar10", "0.47", "0", "0.47,0.7", "400")
  assert json.loads(t1["extra_train_flags"].split("=", 1)[1]) == {
      "pad": "append"}
  for model in ("resnet56", "mobilenetv2"):
    f2 = preset_flags(f"legr_fig2_{model}_cifar100")
    assert (f2["model"], f2["dataset"], f2["target_flops"], f2["tau_hat"],
            f2["budgets"], f2["finetune_epochs"]) == (
                model, "cifar100", "0.1", "200", "0.1,0.13,0.16,0.2", "60")
  for name, model, budget in (("clr_rnf_resnet56_cifar10", "resnet56",
                               "0.437"),
                              ("clr_rnf_vgg16_cifar10", "vgg16", "0.259")):
    c = preset_flags(name)
    assert (c["model"], c["dataset"], c["budget"], c["epochs"], c["lr"],
            c["batch_size"]) == (model, "cifar10", budget, "150", "0.01",
                                 "256")
    assert c["methods"].startswith("clr_rnf")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_flags_are_valid(name, tmp_path):
  """absl reads the flagfile and every flag value passes the module's
  validators (--only_check_args: no JAX, no data)."""
  module, _ = EXPECTED[name]
  r = _run(["-m", module, f"--flagfile={preset_path(name)}",
            f"--workdir={tmp_path / 'wd'}", "--only_check_args"])
  assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def fake_data_dir(tmp_path_factory):
  """cifar10 and cifar100 (160 train / 32 test random images) in a TFDS
  data_dir; 160 leave 144 training images after 16 for validation, more
  than the stages' default batch of 128."""
  d = str(tmp_path_factory.mktemp("tfds"))
  for name in ("cifar10", "cifar100"):
    fake_tfds.write(d, name, num_train=160, num_test=32)
  return d


def test_fake_tfds_reads_through_the_data_layer(fake_data_dir):
  from legr_jax import data  # pylint: disable=g-import-not-at-top
  for name, classes in (("cifar10", 10), ("cifar100", 100)):
    ds = data.get_dataset(name, data_dir=fake_data_dir, val_size=16)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (144, 16, 32)
    assert ds.num_classes == classes and ds.image_shape == (32, 32, 3)
    x, y = ds.train.take([0, 1, 2])
    assert x.shape == (3, 32, 32, 3) and x.dtype.name == "uint8"
    assert ((0 <= y) & (y < classes)).all()


FULL_MODELS = os.environ.get("LEGR_PRESET_FULL_MODELS") == "1"
SMALL_MODEL = "resnet20"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_preflight(name, fake_data_dir):
  """What the commands check before any work, with the preset's network:
  it builds (model options) for the data's images and classes; the search
  target and every budget are above the safeguard floor; a method without
  a learn stage (CLR-RNF) finds masks within every budget."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  from legr_jax import data, methods, models  # pylint: disable=g-import-not-at-top
  module, dataset = EXPECTED[name]
  f = preset_flags(name)
  assert f["dataset"] == dataset
  ds = data.get_dataset(dataset, data_dir=fake_data_dir)
  kwargs = {}
  for e in f.get("extra_train_flags", "").split(","):
    if e.startswith("--model_kwargs="):
      kwargs = json.loads(e.split("=", 1)[1])
  net = models.get(f["model"], num_classes=ds.num_classes,
                   input_shape=ds.image_shape, **kwargs)
  safeguard = float(f["safeguard"])
  if module == "experiments.legr_pipeline":
    budgets = [common.parse_budget(b) for b in f["budgets"].split(",")]
    assert min(b for _, b in budgets) == float(f["target_flops"])
    common.check_budgets_reachable(
        net.spec, [("flops", float(f["target_flops"]))] + budgets,
        safeguard, "--target_flops/--budgets")
  else:
    budgets = [methods.Budget.parse(b) for b in f["budget"].split(",")]
    common.check_budgets_reachable(net.spec, budgets, safeguard, "--budget")
    _, method_name, options = methods.parse_spec(f["methods"])
    method = methods.get(method_name, safeguard=safeguard, **options)
    rng = np.random.default_rng(0)   # stand-in weights, as compare uses
    variables = jax.tree.map(
        lambda s: np.abs(rng.standard_normal(s.shape)).astype(s.dtype) + 0.1,
        jax.eval_shape(net.init, jax.random.key(0)))
    for b in budgets:
      method.prune(net, variables, b)


def _tiny_args(name, workdir):
  """The preset's command with tiny sizes appended after the flagfile."""
  module, _ = EXPECTED[name]
  f = preset_flags(name)
  args = ["-m", module, f"--flagfile={preset_path(name)}",
          f"--workdir={workdir}", "--cpu_kernels=off"]
  if not FULL_MODELS:
    args.append(f"--model={SMALL_MODEL}")
  if module == "experiments.legr_pipeline":
    # list flag: the preset's own entries (model options) kept, sizes added
    extra = [e for e in f.get("extra_train_flags", "").split(",") if e]
    extra += ["--batch_size=48", "--eval_batch_size=64", "--val_size=16"]
    args += ["--epochs=1", "--generations=2", "--population=2", "--sample=1",
             f"--tau_hat={min(int(f['tau_hat']), 1)}", "--finetune_epochs=0",
             "--extra_train_flags=" + ",".join(extra)]
  else:
    args += ["--baseline_epochs=1", "--epochs=0", "--batch_size=48",
             "--val_size=16", "--latency_batch=8", "--progress=false"]
  return args


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_dry_run(name, fake_data_dir, tmp_path):
  """The preset end to end at tiny sizes on fake TFDS data."""
  module, dataset = EXPECTED[name]
  wd = tmp_path / "wd"
  env = dict(os.environ, TFDS_DATA_DIR=fake_data_dir)
  r = _run(_tiny_args(name, wd), env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  f = preset_flags(name)
  if module == "experiments.legr_pipeline":
    base = json.load(open(wd / "baseline" / "config.json"))
    model = f["model"] if FULL_MODELS else SMALL_MODEL
    assert (base["model"], base["dataset"]) == (model, dataset)
    if "extra_train_flags" in f:
      assert base["model_kwargs"] == {"pad": "append"}
    search = json.load(open(wd / "ranking" / "search_config.json"))
    assert search["flops"] == float(f["target_flops"])
    assert search["chains"] == (f.get("chains") == "true")
    summary = json.load(open(wd / "pruned" / "summary.json"))
    budgets = [float(b) for b in f["budgets"].split(",")]
  else:
    summary = json.load(open(wd / "comparison.json"))
    budgets = [float(b) for b in f["budget"].split(",")]
  members = summary["members"] if "members" in summary else summary["rows"]
  got = sorted({float(m["budget"]) for m in members})
  assert got == sorted(budgets), members
