"""Family fine-tuning: members batched with vmap (train.members) against one
after another (train.fit on sliced networks); latency budgets (fake timer)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import random_masks
from legr_jax import cost, data, family, latency, methods, models, surgery
from legr_jax import train
from legr_jax.data.local import load_digits
from legr_jax.train import members as members_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  x, y = load_digits()
  path = tmp_path_factory.mktemp("data") / "digits.npz"
  np.savez(path, x=x[:232], y=y[:232], x_test=x[232:300], y_test=y[232:300])
  return str(path)


def _config(npz, **kw):
  base = dict(model="cnn_small", dataset=f"npz:{npz}", val_size=40,
              epochs=1, batch_size=32, lr=0.05, cpu_kernels="off",
              augment="cifar", log_every_steps=1, weight_decay=5e-4)
  base.update(kw)
  return train.TrainConfig(**base)


def _sequential_steps(net, variables, masks, ds, config, steps):
  """Reference: the sliced network trained alone, step by step, on the
  batches `fit` gives it."""
  small, sv = surgery.slice_network(net, variables, masks)
  spe = data.num_batches(len(ds.train), config.batch_size)
  opt, _ = train.build_optimizer(config, spe)
  state = train.init_train_state(small, jax.random.PRNGKey(config.seed), opt,
                                 sv)
  step = jax.jit(lambda s, b: train.train_step(small, opt, s, b, None))
  it = data.batches(ds.train, config.batch_size, seed=config.seed, epoch=0,
                    augment="cifar", mean=ds.mean, std=ds.std, prefetch=0)
  for _ in range(steps):
    state, _ = step(state, next(it))
  return jax.device_get(state.variables)


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      a, b)))


@pytest.mark.parametrize("name", ["cnn_small", "resnet20"])
def test_batched_members_equal_sliced_ones_trained_alone(npz, tmp_path, name):
  config = _config(npz, model=name)
  ds = train.load_dataset(config)
  net = models.get(name, num_classes=10, input_shape=ds.image_shape)
  v = jax.device_get(net.init(jax.random.PRNGKey(0)))
  masks = [random_masks(net.spec, s) for s in (1, 2, 3)]
  fulls = members_lib.fit_members(config, str(tmp_path), net=net,
                                  variables=[v] * 3, masks=masks, dataset=ds,
                                  max_steps=STEPS, progress=False,
                                  log=lambda s: None)
  for m, full in zip(masks, fulls):
    ref = _sequential_steps(net, v, m, ds, config, STEPS)
    got = surgery.slice_network(net, full, m)[1]
    assert _max_diff(ref, got) < 1e-5
    # the members really trained (not the initial weights)
    assert _max_diff(surgery.slice_network(net, v, m)[1], got) > 1e-3


_FOUR_DEVICES = textwrap.dedent("""
    import sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import random_masks
    from legr_jax import models, train
    from legr_jax.train import members
    cfg = train.TrainConfig(model="cnn_small", dataset="npz:" + sys.argv[1],
        val_size=40, epochs=1, batch_size=32, lr=0.05, cpu_kernels="off",
        augment="cifar", log_every_steps=1)
    ds = train.load_dataset(cfg)
    net = models.get("cnn_small", num_classes=10, input_shape=ds.image_shape)
    v = jax.device_get(net.init(jax.random.PRNGKey(0)))
    masks = [random_masks(net.spec, s) for s in range(5)]  # 5: padded to 8
    assert len(jax.devices()) == 4
    kw = dict(net=net, variables=[v] * 5, masks=masks, dataset=ds,
              max_steps=3, progress=False, log=lambda s: None)
    four = members.fit_members(cfg, sys.argv[2] + "/4", **kw)
    one = members.fit_members(cfg, sys.argv[2] + "/1",
        mesh=members.member_mesh(jax.devices()[:1]), **kw)
    d = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(four), jax.tree.leaves(one)))
    print("MAXDIFF", d)
""")


@pytest.mark.slow
def test_members_spread_over_four_devices_match_one(npz, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  r = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, npz,
                      str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  diff = float(r.stdout.split("MAXDIFF")[1].split()[0])
  assert diff < 1e-5


_PROCESSES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    npz, wd, port, pid = sys.argv[1:5]
    if port != "none":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address="localhost:" + port,
                                 num_processes=2, process_id=int(pid))
    sys.path.insert(0, "tests")
    from conftest import random_masks
    from legr_jax import models, train
    from legr_jax.train import members
    cfg = train.TrainConfig(model="cnn_small", dataset="npz:" + npz,
        val_size=40, epochs=1, batch_size=32, lr=0.05, cpu_kernels="off",
        augment="cifar", log_every_steps=1)
    ds = train.load_dataset(cfg)
    net = models.get("cnn_small", num_classes=10, input_shape=ds.image_shape)
    v = jax.device_get(net.init(jax.random.PRNGKey(0)))
    masks = [random_masks(net.spec, s) for s in range(3)]
    out = members.fit_members(cfg, wd, net=net, variables=[v] * 3,
        masks=masks, dataset=ds, max_steps=3, progress=False)
    np.savez(wd + "/result_%s.npz" % pid, *jax.tree.leaves(out))
""")


@pytest.mark.slow
def test_two_processes_spread_the_members_and_agree_with_one(npz, tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=ROOT)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  os.makedirs(one)
  os.makedirs(two)
  r = subprocess.run([sys.executable, "-c", _PROCESSES, npz, one, "none",
                      "0"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  procs = [subprocess.Popen([sys.executable, "-c", _PROCESSES, npz, two,
                             port, str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # process 0 fine-tuned members 0 and 2, process 1 member 1
  assert sorted(os.listdir(two + "/process_0")) and sorted(
      os.listdir(two + "/process_1"))
  assert "fine-tuned 2 members" in outs[0][0]
  assert "fine-tuned 1 members" in outs[1][0]
  ref = np.load(one + "/result_0.npz")
  for pid in "01":
    got = np.load(f"{two}/result_{pid}.npz")
    for k in ref.files:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)


_KILLED = textwrap.dedent("""
    import sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import random_masks
    from legr_jax import models, train
    from legr_jax.train import members
    cfg = train.TrainConfig(model="cnn_small", dataset="npz:" + sys.argv[1],
        val_size=40, epochs=2, batch_size=32, lr=0.05, cpu_kernels="off",
        augment="cifar", log_every_steps=1, ckpt_every_steps=2)
    ds = train.load_dataset(cfg)
    net = models.get("cnn_small", num_classes=10, input_shape=ds.image_shape)
    v = jax.device_get(net.init(jax.random.PRNGKey(0)))
    masks = [random_masks(net.spec, s) for s in range(2)]
    crash = int(sys.argv[3]) if len(sys.argv) > 3 else None
    out = members.fit_members(cfg, sys.argv[2], net=net, variables=[v] * 2,
        masks=masks, dataset=ds, progress=False, crash_at_step=crash)
    np.savez(sys.argv[2] + "/out.npz", *jax.tree.leaves(out))
""")


@pytest.mark.slow
def test_killed_members_finetuning_resumes_to_the_same_result(npz, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)

  def run(wd, *extra):
    return subprocess.run([sys.executable, "-c", _KILLED, npz, wd, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  assert run(whole).returncode == 0
  # 6 steps per epoch: killed in the second epoch after a mid-epoch save
  r = run(killed, "9")
  assert r.returncode != 0 and not os.path.exists(killed + "/out.npz")
  r = run(killed)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming the 2 members' fine-tuning from step 8" in r.stdout
  a, b = np.load(whole + "/out.npz"), np.load(killed + "/out.npz")
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def pretrained(npz):
  config = _config(npz)
  ds = train.load_dataset(config)
  net = models.get("cnn_small", num_classes=10, input_shape=ds.image_shape)
  v = jax.device_get(net.init(jax.random.PRNGKey(3)))
  return net, v, ds


def test_parallel_and_sequential_families_agree(pretrained, npz, tmp_path):
  """Two methods x two budgets: one batched fine-tuning of the four members
  (prune_families, as experiments.compare calls it) against each method's
  family fine-tuned one member after another."""
  net, v, ds = pretrained
  ft = _config(npz, epochs=1)
  kw = dict(finetune=ft, latency_batch=8, latency_repeats=2, progress=False,
            log=lambda s: None)
  names = ("l2", "uniform")
  par = family.prune_families(
      net, v, ds, [family.FamilyJob(methods.get(n), str(tmp_path / "p" / n))
                   for n in names], ["0.4", "0.7"], finetune_mode="parallel",
      parallel_workdir=str(tmp_path / "p" / "together"), **kw)
  seq = [family.prune_family(net, v, ds, methods.get(n), ["0.4", "0.7"],
                             workdir=str(tmp_path / "s" / n),
                             finetune_mode="sequential", **kw)
         for n in names]
  for rows_p, rows_s in zip(par, seq):
    for p, s in zip(rows_p, rows_s):
      assert p["finetune_mode"] == "parallel"
      assert p["finetune_members_together"] == 4
      assert s["finetune_mode"] == "sequential"
      assert p["flops"] == s["flops"] and p["method"] == s["method"]
      assert abs(p["val_loss"] - s["val_loss"]) < 1e-4
      assert p["val_accuracy"] == s["val_accuracy"]
      assert p["val_loss"] != p["val_loss_pruned"]    # it was fine-tuned
      assert p["latency_ms_batch1"] > 0 and p["latency_ms"] > 0
  assert par[0][0]["flops"] != par[1][0]["flops"]   # two different methods
  # a rerun reuses the finished members (their variables from final/)
  again = family.prune_family(
      net, v, ds, methods.get("l2"), ["0.4", "0.7"],
      workdir=str(tmp_path / "p" / "l2"), finetune_mode="parallel", **kw)
  assert [r["val_loss"] for r in again] == [r["val_loss"] for r in par[0]]


def _fake_latency(calls):
  """A deterministic 'timer': 1 ms per MFLOP plus 0.5 ms overhead."""
  def fn(small, _):
    calls.append(small.name)
    return 0.5 + cost.unpruned(small.spec) / 1e6
  return fn


def test_latency_budget_met_by_measurement_then_stored(pretrained, tmp_path):
  net, v, ds = pretrained
  calls = []
  full_ms = 0.5 + cost.unpruned(net.spec) / 1e6
  rows = family.prune_family(
      net, v, ds, methods.get("l2"), ["latency:0.6"], workdir=str(tmp_path),
      latency_fn=_fake_latency(calls), latency_batch=8, latency_repeats=2,
      progress=False, log=lambda s: None)
  (row,) = rows
  assert row["name"] == "latency_0.6" and row["budget_metric"] == "latency"
  fake = 0.5 + row["flops"] / 1e6
  assert fake <= 0.6 * full_ms
  # bisection got close: 1/2^10 of the FLOPs range above it is too slow
  solved = row["latency_budget_flops"]
  assert (0.5 + (solved + 2 ** -9) * cost.unpruned(net.spec) / 1e6
          > 0.6 * full_ms)
  stored = json.load(open(tmp_path / family.LATENCY_JSON))
  assert stored["latency:0.6"]["flops_fraction"] == solved
  n = len(calls)
  assert n >= 10
  # rerun: the stored FLOPs fraction is reused, nothing is measured again
  again = family.prune_family(
      net, v, ds, methods.get("l2"), ["latency:0.6"], workdir=str(tmp_path),
      latency_fn=_fake_latency(calls), latency_batch=8, latency_repeats=2,
      progress=False, log=lambda s: None)
  assert len(calls) == n and again[0]["flops"] == row["flops"]


def test_impossible_latency_budget_is_refused(pretrained, tmp_path):
  net, v, ds = pretrained
  with pytest.raises(methods.InfeasibleBudgetError, match="latency"):
    family.resolve_latency_budget(
        net, v, methods.get("l2"), latency.LatencyBudget(0.01),
        workdir=str(tmp_path), latency_fn=_fake_latency([]),
        log=lambda s: None)
