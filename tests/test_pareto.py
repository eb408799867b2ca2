"""Pareto set: front selection, orbax round trip of sliced networks, pick,
loading from the workdir, format versions (pareto.json, ranking.json), plot."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import build, numpy_variables, perturbed_variables, random_masks
from legr_jax import data, family, methods, models, pareto, surgery


def test_front_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(20):
    c = rng.integers(0, 6, 12).astype(float)
    a = rng.integers(0, 6, 12).astype(float)
    expect = [not any((c[j] <= c[i] and a[j] >= a[i]) and
                      (c[j] < c[i] or a[j] > a[i]) for j in range(12))
              for i in range(12)]
    np.testing.assert_array_equal(pareto.pareto_front(c, a), expect)


@pytest.mark.slow
def test_save_load_round_trip_and_refuse_overwrite(tmp_path):
  net = models.get("resnet20", input_shape=(8, 8, 3))
  variables = perturbed_variables(net, 0)
  members = []
  for i, keep in enumerate((0.4, 0.8)):
    masks = random_masks(net.spec, i, keep_prob=keep)
    small, small_vars = surgery.slice_network(net, variables, masks)
    members.append(pareto.Member(
        f"m{i}", small.config, small_vars,
        {"flops": float(i + 1), "val_accuracy": 0.5 + 0.1 * i}))
  d = str(tmp_path / "set")
  index = pareto.save(d, members)
  assert [m["pareto_optimal"] for m in index["members"]] == [True, True]
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  loaded = pareto.load(d)
  assert len(loaded) == 2
  for (net2, vars2, metrics), m in zip(loaded, members):
    assert metrics == m.metrics
    small = models.from_config(m.net_config)
    np.testing.assert_allclose(net2.apply(vars2, x),
                               small.apply(m.variables, x), atol=1e-6)
  with pytest.raises(FileExistsError, match="overwrite"):
    pareto.save(d, members)
  with open(os.path.join(d, pareto.INDEX), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    pareto.load(d)


def test_missing_set_and_bad_names(tmp_path):
  with pytest.raises(FileNotFoundError, match="experiments.prune"):
    pareto.load(str(tmp_path))
  net = models.get("cnn_small")
  m = pareto.Member("../x", net.config, net.init(jax.random.key(0)),
                    {"flops": 1.0, "val_accuracy": 1.0})
  with pytest.raises(ValueError, match="plain file name"):
    pareto.save(str(tmp_path / "s"), [m])


# --- pick, workdir loading, format versions, plot (issue 17) ---------------

# name: (flops_fraction, params_fraction, latency_ms, val_acc, test_acc);
# test accuracies run against val ones: choosing on them would differ.
FIGURES = {"a": (0.3, 0.35, 1.0, 0.80, 0.99),
           "b": (0.5, 0.55, 2.0, 0.85, 0.70),
           "c": (0.8, 0.75, 3.0, 0.84, 0.98),
           "d": (0.9, 0.95, 4.0, 0.90, 0.60)}


# batch-1 latencies ordered unlike the serving-batch ones
BATCH1_MS = {"a": 0.4, "b": 0.1, "c": 0.2, "d": 0.5}


def _members(latency=True):
  net = build("cnn_small")
  variables = numpy_variables(net, 0)
  members = []
  for i, (name, (fl, pa, ms, val, test)) in enumerate(FIGURES.items()):
    small, small_vars = surgery.slice_network(
        net, variables, random_masks(net.spec, i, keep_prob=0.3 + 0.2 * i))
    metrics = {"flops": fl * 1e6, "flops_fraction": fl, "params_fraction": pa,
               "val_accuracy": val, "test_accuracy": test}
    if latency:
      metrics.update(latency_ms=ms, latency_batch=8, device_kind="cpu",
                     latency_ms_batch1=BATCH1_MS[name])
    members.append(pareto.Member(name, small.config, small_vars, metrics))
  return members


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A prune workdir: WORKDIR/pareto holds the set of `FIGURES`."""
  wd = tmp_path_factory.mktemp("pruned")
  pareto.save(str(wd / "pareto"), _members())
  return str(wd)


@pytest.mark.parametrize("limits, expect", [
    ({}, "d"),
    ({"max_flops": 0.6}, "b"),
    ({"max_flops": 0.85}, "b"),       # c's better test accuracy is ignored
    ({"max_flops": 0.9}, "d"),        # limits are inclusive
    ({"max_params": 0.5}, "a"),
    ({"max_latency_ms": 3.5}, "b"),
    ({"max_flops": 0.95, "max_params": 0.8, "max_latency_ms": 1.5}, "a"),
])
def test_pick_most_accurate_within_limits(workdir, limits, expect):
  picked = pareto.pick(workdir, **limits)
  assert picked.name == expect
  assert picked.metrics["flops_fraction"] == FIGURES[expect][0]
  assert picked.accuracy_key == "val_accuracy"
  # from the set's folder and from members in memory: the same choice
  assert pareto.pick(os.path.join(workdir, "pareto"), **limits).name == expect
  assert pareto.pick(_members(), **limits).name == expect


def test_pick_by_batch1_latency(workdir):
  assert pareto.pick(workdir, max_latency_ms=0.45, latency_batch=1).name == "b"
  assert pareto.pick(workdir, max_latency_ms=0.15, latency_batch=1).name == "b"
  with pytest.raises(ValueError, match="cheapest is 'a'"):
    pareto.pick(workdir, max_latency_ms=0.45)          # serving batch
  with pytest.raises(ValueError, match="cheapest is 'b'.*latency_ms_batch1"):
    pareto.pick(workdir, max_latency_ms=0.05, latency_batch=1)
  with pytest.raises(ValueError, match="latency_batch must be"):
    pareto.pick(workdir, max_latency_ms=1.0, latency_batch=8)


def test_picked_member_is_ready_to_apply(workdir):
  picked = pareto.pick(workdir, max_flops=0.6)
  stored = next(m for m in _members() if m.name == picked.name)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  expect = jax.jit(models.from_config(stored.net_config).apply)(
      stored.variables, x)
  np.testing.assert_allclose(picked.apply(x), expect, atol=1e-6)
  net, variables, metrics = picked          # unpacks like a load() entry
  np.testing.assert_allclose(jax.jit(net.apply)(variables, x), expect,
                             atol=1e-6)
  assert metrics == stored.metrics
  # load()'s tuples are members too (named by position)
  assert pareto.pick(pareto.load(workdir), max_flops=0.6).metrics == metrics


def test_pick_none_qualifies_names_the_cheapest(workdir):
  with pytest.raises(ValueError, match=r"max_flops=0\.2.*cheapest is 'a'.*"
                     r"flops_fraction 0\.3.*val_accuracy 0\.8"):
    pareto.pick(workdir, max_flops=0.2)
  # two limits: the one closest to qualifying (largest ratio least)
  with pytest.raises(ValueError, match=r"cheapest is 'a'.*latency_ms 1.*"
                     r"latency_batch 8.*'cpu'"):
    pareto.pick(workdir, max_params=0.9, max_latency_ms=0.5)


def test_pick_refuses_bad_limits_missing_metrics_and_test_keys(workdir,
                                                               tmp_path):
  with pytest.raises(ValueError, match="max_flops must be a positive"):
    pareto.pick(workdir, max_flops=-0.5)
  with pytest.raises(ValueError, match="test-split"):
    pareto.pick(workdir, accuracy_key="test_accuracy")
  old = str(tmp_path / "old")
  pareto.save(old, _members(latency=False))       # a set without latency
  assert pareto.pick(old, max_flops=0.6).name == "b"
  with pytest.raises(ValueError, match="lacks 'latency_ms'.*max_latency_ms"):
    pareto.pick(old, max_latency_ms=10.0)
  with pytest.raises(ValueError, match="no members"):
    pareto.pick([])
  with pytest.raises(TypeError, match="pareto.Member"):
    pareto.pick([object()])


def test_load_accepts_the_workdir(workdir):
  from_workdir = pareto.load(workdir, only_optimal=True)
  from_folder = pareto.load(os.path.join(workdir, "pareto"), only_optimal=True)
  assert [m for _, _, m in from_workdir] == [m for _, _, m in from_folder]
  # the front in (flops, val accuracy): a, b, d (c is dominated by b)
  assert [m["flops_fraction"] for _, _, m in from_workdir] == [0.3, 0.5, 0.9]


def _rewrite(path, **changes):
  with open(path) as f:
    doc = json.load(f)
  for k, v in changes.items():
    if v is None:
      doc.pop(k, None)
    else:
      doc[k] = v
  with open(path, "w") as f:
    json.dump(doc, f)


def test_pareto_json_format_version(tmp_path):
  d = str(tmp_path / "set")
  index = pareto.save(d, _members()[:2])
  assert index["format_version"] == pareto.FORMAT_VERSION == 1
  path = os.path.join(d, pareto.INDEX)
  _rewrite(path, format_version=2)
  for read in (pareto.load, pareto.pick, lambda d: pareto.plot(
      d, str(tmp_path / "p.png"))):
    with pytest.raises(ValueError, match=rf"{path} has format_version 2; "
                       r"this legr_jax reads format_version 1"):
      read(d)
  _rewrite(path, format_version=None)        # written before versions: 1
  assert len(pareto.load(d)) == 2


def test_ranking_json_format_version(tmp_path):
  from legr_jax.methods import legr  # pylint: disable=g-import-not-at-top
  from legr_jax.search import state  # pylint: disable=g-import-not-at-top
  names = ["conv0", "conv1"]
  state.save_ranking(str(tmp_path), names, [1.0, 2.0], [0.0, 0.5],
                     {"loss": 1.5})
  path = str(tmp_path / "ranking.json")
  with open(path) as f:
    assert json.load(f)["format_version"] == legr.FORMAT_VERSION == 1
  assert state.load_ranking(str(tmp_path)) == {"conv0": (1.0, 0.0),
                                               "conv1": (2.0, 0.5)}
  assert legr.load_affine(str(tmp_path), names)[1] == {"conv0": 0.0,
                                                       "conv1": 0.5}
  _rewrite(path, format_version=7)
  msg = rf"{path} has format_version 7; this legr_jax reads format_version 1"
  with pytest.raises(ValueError, match=msg):
    state.load_ranking(str(tmp_path))
  with pytest.raises(ValueError, match=msg):
    legr.load_affine(str(tmp_path), names)
  _rewrite(path, format_version=None)        # written before versions: 1
  assert state.load_ranking(str(tmp_path))["conv1"] == (2.0, 0.5)
  assert legr.load_affine(path, names)[0] == {"conv0": 1.0, "conv1": 2.0}


def test_plot_writes_a_png(workdir, tmp_path):
  for source, name in ((workdir, "wd.png"), (_members(latency=False),
                                              "no_latency.png")):
    path = pareto.plot(source, str(tmp_path / name))
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_prune_family_draws_the_plot_and_pick_reads_it(tmp_path,
                                                       monkeypatch):
  """The members prune_family writes (l1, no fine-tuning, digits) carry
  every figure pick reads; the PNG lies beside pareto.json."""
  net = build("cnn_small")
  wd = str(tmp_path / "family")
  variables, dataset = numpy_variables(net, 0), data.get_dataset("digits")
  rows = family.prune_family(
      net, variables, dataset, methods.get("l1"), [0.5, 0.8], workdir=wd,
      latency_batch=4, latency_repeats=2, progress=False, log=lambda s: None)
  assert os.path.getsize(os.path.join(wd, "pareto", pareto.PLOT)) > 0
  for key in ("flops_fraction", "params_fraction", "latency_ms",
              "latency_batch", "device_kind", "val_accuracy"):
    assert all(key in r for r in rows), key
  picked = pareto.pick(wd, max_flops=0.6, max_latency_ms=1e9)
  assert picked.name == "flops_0.5"
  # a plotting failure only warns (rerun: the members are reused)
  def broken(*args, **kwargs):
    raise RuntimeError("no display")
  monkeypatch.setattr(pareto, "plot", broken)
  logs = []
  again = family.prune_family(
      net, variables, dataset, methods.get("l1"), [0.5, 0.8], workdir=wd,
      latency_batch=4, latency_repeats=2, progress=False, log=logs.append)
  assert [r["name"] for r in again] == [r["name"] for r in rows]
  assert any("warning: could not draw pareto.png: no display" in line
             for line in logs), logs
