"""The learned-gate methods ``dagger`` and ``sbf``: budgets met within one
channel on every model after a (tiny) learn stage, determinism for a seed,
a killed learn stage resumed to the uninterrupted result, dagger's gates
independent of the input batch, sbf's scores starting at 1, and a tiny
learn + prune + family run of each."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (ALL_MODELS, TEST_SHAPES, build,
                      check_within_one_channel, numpy_variables)
from legr_jax import data, gates, methods
from legr_jax.methods import budget as B
from legr_jax.methods import dagger as dagger_lib
from legr_jax.methods import sbf as sbf_lib
from legr_jax.train import step as step_lib

LEARNED = ("dagger", "sbf")
TINY = {"steps": 2, "batch_size": 4, "checkpoint_every": 2}


def tiny_dataset(shape, n=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  y = rng.integers(0, 10, n).astype(np.int32)
  split = data.ArraySplit(x, y)
  c = shape[-1]
  return data.Dataset("tiny", split, split, split, 10, tuple(shape),
                      (127.5,) * c, (64.0,) * c, "none")


@pytest.fixture(scope="module")
def nets():
  cache = {}

  def get(name):
    if name not in cache:
      net = build(name)
      cache[name] = (net, numpy_variables(net, 0))
    return cache[name]
  return get



def _scores(path):
  with open(path) as f:
    return json.load(f)["scores"]


@pytest.mark.parametrize("method", LEARNED)
def test_registered_and_learning(method):
  assert method in methods.names()
  m = methods.get(method)
  assert m.learns and m.artifact_file
  with pytest.raises(ValueError, match="learn stage"):
    net = build("cnn_small")
    m.prune(net, numpy_variables(net, 0), methods.Budget("flops", 0.5))
  with pytest.raises(ValueError, match="steps"):
    methods.get(method, steps=0)


@pytest.mark.parametrize("model_name", ALL_MODELS)
@pytest.mark.parametrize("method", LEARNED)
def test_budget_met_within_one_channel(nets, model_name, method, tmp_path):
  net, variables = nets(model_name)
  m = methods.get(method, safeguard=0.1, **TINY)
  art = m.learn(net, variables, tiny_dataset(TEST_SHAPES[model_name]),
                str(tmp_path / "learn"), budget=methods.Budget("flops", 0.4),
                progress=False, log=lambda s: None)
  assert os.path.basename(art) == m.artifact_file
  protected = B.protected_counts(net.spec, 0.1)
  for text in ("flops:0.47", "params:0.4", "flops:0.3"):
    budget = methods.Budget.parse(text)
    pruned = m.prune(net, variables, budget, artifact=art)
    assert set(pruned.masks) == set(net.spec.group_names)
    for g in net.spec.groups:
      mask = np.asarray(pruned.masks[g.name])
      assert mask.shape == (g.size,) and set(np.unique(mask)) <= {0.0, 1.0}
    assert np.all(B.counts_of(net.spec, pruned.masks) >= protected)
    check_within_one_channel(net.spec, pruned.masks, budget)


@pytest.mark.parametrize("method", LEARNED)
def test_deterministic_for_a_seed(nets, method, tmp_path):
  net, variables = nets("cnn_small")
  ds = tiny_dataset(TEST_SHAPES["cnn_small"], n=16)
  kw = dict(steps=4, batch_size=4, checkpoint_every=4)
  budget = methods.Budget("flops", 0.4)
  run = lambda seed, wd: _scores(methods.get(method, seed=seed, **kw).learn(
      net, variables, ds, str(tmp_path / wd), budget=budget, progress=False,
      log=lambda s: None))
  a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
  assert a == b
  assert a != c


@pytest.mark.parametrize("method", LEARNED)
def test_killed_learn_stage_resumes_to_the_same_result(nets, method,
                                                       tmp_path):
  net, variables = nets("cnn_small")
  ds = tiny_dataset(TEST_SHAPES["cnn_small"], n=12)   # 3 batches an epoch
  m = methods.get(method, steps=8, batch_size=4, checkpoint_every=3)
  budget = methods.Budget("flops", 0.4)
  quiet = lambda s: None
  whole = m.learn(net, variables, ds, str(tmp_path / "whole"), budget=budget,
                  progress=False, log=quiet)
  wd = str(tmp_path / "killed")
  with pytest.raises(gates.LearnInterrupted):
    m.learn(net, variables, ds, wd, budget=budget, progress=False, log=quiet,
            stop_after=5)              # killed after step 5: checkpoint 3
  assert not os.path.exists(os.path.join(wd, m.artifact_file))
  lines = []
  resumed = m.learn(net, variables, ds, wd, budget=budget, progress=False,
                    log=lines.append)
  assert any("resuming" in s and "step 3/8" in s for s in lines), lines
  assert _scores(resumed) == _scores(whole)
  # a finished run is reused; a different one is refused
  lines = []
  m.learn(net, variables, ds, wd, budget=budget, progress=False,
          log=lines.append)
  assert any("learned already" in s for s in lines)
  with pytest.raises(gates.LearnConflictError, match="different run"):
    m.learn(net, variables, ds, wd, budget=methods.Budget("flops", 0.6),
            progress=False, log=quiet)


def test_learned_on_other_weights_is_refused(nets, tmp_path):
  net, variables = nets("cnn_small")
  m = methods.get("dagger", **TINY)
  art = m.learn(net, variables, tiny_dataset(TEST_SHAPES["cnn_small"]),
                str(tmp_path / "l"), budget=methods.Budget("flops", 0.5),
                progress=False, log=lambda s: None)
  with pytest.raises(ValueError, match="other weights"):
    m.prune(net, numpy_variables(net, 1), methods.Budget("flops", 0.5),
            artifact=art)
  with pytest.raises(ValueError, match="learned by 'dagger'"):
    methods.get("sbf").prune(net, variables, methods.Budget("flops", 0.5),
                             artifact=art)


class _Spy:
  """A network that reports the masks of every forward pass to the host."""

  def __init__(self, net):
    self.net, self.spec, self.seen = net, net.spec, []

  def apply(self, variables, x, masks=None, train=False):
    names = sorted(masks)
    jax.debug.callback(
        lambda *ms: self.seen.append({k: np.asarray(v) for k, v in
                                      zip(names, ms)}),
        *[masks[k] for k in names])
    return self.net.apply(variables, x, masks, train=train)


def test_dagger_gates_do_not_depend_on_the_batch(nets):
  net, variables = nets("cnn_small")
  spy = _Spy(net)
  m = methods.get("dagger")
  setup = m.setup(spy, variables, methods.Budget("flops", 0.5))
  opt = optax.sgd(0.0)
  state = step_lib.TrainState(
      step=jnp.asarray(7, jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=opt.init(variables["params"]), rng=step_lib.raw_key(0))
  es = step_lib.init_extra_state(setup.extra, setup.init)
  fn = jax.jit(lambda s, e, b: step_lib.train_step(
      spy, opt, s, b, None, extra=setup.extra, extra_state=e))
  rng = np.random.default_rng(0)
  outs = []
  for i in range(2):
    batch = {"image": jnp.asarray(rng.normal(size=(6, 8, 8, 1)) * (i + 1),
                                  jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 6), jnp.int32)}
    _, e2, metrics = fn(state, es, batch)
    outs.append((e2, float(metrics["loss"])))
  assert len(spy.seen) == 2
  assert outs[0][1] != outs[1][1]                    # different batches ...
  for k in spy.seen[0]:                               # ... the same gates
    np.testing.assert_array_equal(spy.seen[0][k], spy.seen[1][k])
  # the gates are soft (between 0 and 1) and come from the module
  module = m.module(net.spec, variables["params"])
  want = m.gates(module, es.params, 7)
  for k in want:
    np.testing.assert_allclose(spy.seen[0][k], np.asarray(want[k]),
                               rtol=1e-6)
    assert 0 < spy.seen[0][k].min() and spy.seen[0][k].max() < 1


def test_sbf_scores_start_at_one_and_lexp():
  z = jnp.array([-3.0, -0.5, 0.0, 0.5, 2.0])
  np.testing.assert_allclose(sbf_lib.lexp(z),
                             [np.exp(-3), np.exp(-0.5), 1.0, 1.5, 3.0],
                             rtol=1e-6)
  g = jax.vmap(jax.grad(sbf_lib.lexp))(z)
  np.testing.assert_allclose(g, [np.exp(-3), np.exp(-0.5), 1.0, 1.0, 1.0],
                             rtol=1e-6)
  net = build("resnet20")
  variables = numpy_variables(net, 0)
  setup = methods.get("sbf").setup(net, variables,
                                   methods.Budget("flops", 0.5))
  masks = jax.jit(setup.extra.masks_fn)(setup.init, variables["params"], 0)
  for g in net.spec.groups:
    np.testing.assert_array_equal(np.asarray(masks[g.name]),
                                  np.ones(g.size, np.float32))


def test_dagger_features_are_finite_on_every_light_model(nets):
  for name in ("cnn_small", "resnet20"):
    net, variables = nets(name)
    feats = dagger_lib.channel_features(net.spec, variables["params"])
    assert [f.shape for f in feats] == [(g.size, dagger_lib.NUM_FEATURES)
                                        for g in net.spec.groups]
    assert all(np.all(np.isfinite(f)) for f in feats)


@pytest.mark.parametrize("method", LEARNED)
def test_end_to_end_learn_prune_family(method, tmp_path):
  from legr_jax import family  # pylint: disable=import-outside-toplevel
  ds = data.get_dataset("digits", val_fraction=0.1, seed=0)
  net = build("cnn_small")
  variables = numpy_variables(net, 0)
  m = methods.get(method, steps=6, batch_size=32, checkpoint_every=3)
  art = m.learn(net, variables, ds, str(tmp_path / "learn"),
                budget=methods.Budget("flops", 0.5), progress=False,
                log=lambda s: None)
  rows = family.prune_family(net, variables, ds, m, ["0.5", "params:0.4"],
                             workdir=str(tmp_path / "family"), artifact=art,
                             latency_batch=8, latency_repeats=2,
                             progress=False, log=lambda s: None)
  assert len(rows) == 2
  for r in rows:
    assert r["flops_fraction"] <= 0.5 or r["budget_metric"] == "params"
    assert 0.0 <= r["val_accuracy_pruned"] <= 1.0
  assert os.path.exists(tmp_path / "family" / "summary.json")


@pytest.mark.slow
def test_compare_runs_both_with_a_learn_workdir(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wd = str(tmp_path / "cmp")
  labels = ["dagger@steps=4+batch_size=32", "sbf@steps=4+batch_size=32"]
  r = subprocess.run(
      [sys.executable, "-m", "experiments.compare", f"--workdir={wd}",
       f"--methods={','.join(labels)}", "--budget=0.5", "--baseline_epochs=1",
       "--epochs=1", "--noprogress"], cwd=root, capture_output=True,
      text=True, timeout=900, env=dict(os.environ, PYTHONPATH=root))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.load(open(os.path.join(wd, "comparison.json")))["rows"]
  assert [row["method"] for row in rows] == labels
  for label, row in zip(labels, rows):
    assert row["flops_fraction"] <= 0.5
    learn = os.path.join(wd, "seed_0", f"{label}_search")
    name = label.split("@")[0]
    assert os.path.exists(os.path.join(
        learn, methods.get(name).artifact_file))
    assert row["learn_seconds"] > 0
