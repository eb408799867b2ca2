"""The method interface: registry, budgets met within one channel on every
model, determinism, uniform fractions, FPGM against a brute-force numpy
re-implementation, LeGR's identity ranking = L2."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import (ALL_MODELS, build, check_within_one_channel,
                      numpy_variables, perturbed_variables)
from legr_jax import methods, ranking
from legr_jax.methods import budget as B

# Methods that need no learned artifact; legr is tested with a ranking file.
DATA_FREE = ("l1", "l2", "random", "uniform", "fpgm", "clr_rnf")


@pytest.fixture(scope="module")
def nets():
  cache = {}

  def get(name):
    if name not in cache:
      net = build(name)
      cache[name] = (net, (perturbed_variables(net, 0) if name in
                           ("cnn_small", "resnet20") else
                           numpy_variables(net, 0)))
    return cache[name]
  return get


def _write_ranking(path, spec, seed):
  rng = np.random.default_rng(seed)
  layers = {n: {"alpha": float(np.exp(rng.normal())),
                "kappa": float(rng.normal(0, 0.1))} for n in spec.layer_names}
  path.write_text(json.dumps({"layers": layers, "loss": 1.0}))
  return str(path)


# Every method on the light models; on the heavy ones one method per budget
# path (l2: global ranking; uniform: knob bisection + fill; legr: the
# artifact). clr_rnf meets budgets on every model in test_clr_rnf.py.
_HEAVY_METHODS = ("l2", "uniform", "legr")
_CASES = [(model, method) for model in ALL_MODELS
          for method in DATA_FREE + ("legr",)
          if model in ("cnn_small", "resnet20") or method in _HEAVY_METHODS]


@pytest.mark.parametrize("model_name,method", _CASES)
@pytest.mark.parametrize("budget", ["flops:0.47", "params:0.4"])
def test_budget_met_within_one_channel(nets, model_name, method, budget,
                                       tmp_path):
  net, variables = nets(model_name)
  budget = methods.Budget.parse(budget)
  artifact = (_write_ranking(tmp_path / "r.json", net.spec, 1)
              if method == "legr" else None)
  m = methods.get(method, safeguard=0.1)
  pruned = m.prune(net, variables, budget, artifact=artifact)
  assert set(pruned.masks) == set(net.spec.group_names)
  for g in net.spec.groups:
    mask = np.asarray(pruned.masks[g.name])
    assert mask.shape == (g.size,) and set(np.unique(mask)) <= {0.0, 1.0}
  protected = B.protected_counts(net.spec, 0.1)
  assert np.all(B.counts_of(net.spec, pruned.masks) >= protected)
  check_within_one_channel(net.spec, pruned.masks, budget)


@pytest.mark.parametrize("method", DATA_FREE)
def test_deterministic_for_a_seed(nets, method):
  net, variables = nets("resnet20")
  m = methods.get(method, seed=3)
  a = m.prune(net, variables, methods.Budget("flops", 0.5)).masks
  b = m.prune(net, variables, methods.Budget("flops", 0.5)).masks
  for g in a:
    np.testing.assert_array_equal(a[g], b[g])


def test_random_depends_on_the_seed(nets):
  net, variables = nets("resnet20")
  budget = methods.Budget("flops", 0.5)
  a = methods.get("random", seed=0).prune(net, variables, budget).masks
  b = methods.get("random", seed=1).prune(net, variables, budget).masks
  assert any(not np.array_equal(a[g], b[g]) for g in a)


@pytest.mark.parametrize("model_name", ["resnet20", "vgg16", "mobilenetv2"])
def test_uniform_keeps_equal_fractions(nets, model_name):
  net, variables = nets(model_name)
  pruned = methods.get("uniform", safeguard=0.0).prune(
      net, variables, methods.Budget("flops", 0.5))
  t = pruned.info["knob"]
  assert 0 < t < 1
  sizes = B.sizes(net.spec)
  counts = B.counts_of(net.spec, pruned.masks)
  base = np.maximum(np.ceil(t * sizes - 1e-9), 1)
  extra = counts - base
  # every group keeps ceil(t * C_g), a few get one more channel in the fill
  assert set(np.unique(extra)) <= {0, 1}, extra
  fractions = counts / sizes
  assert fractions.max() - fractions.min() <= 2.0 / sizes.min() + 1e-9


def _fpgm_numpy(filters):
  """FPGM's criterion by brute force: per filter, the sum of its Euclidean
  distances to every filter."""
  n = len(filters)
  return np.array([sum(np.sqrt(np.sum((filters[i] - filters[j]) ** 2))
                       for j in range(n)) for i in range(n)])


def test_fpgm_matches_a_brute_force_reimplementation(nets):
  net, variables = nets("resnet20")
  params = variables["params"]
  budget = methods.Budget("flops", 0.5)
  pruned = methods.get("fpgm").prune(net, variables, budget)
  counts = B.counts_of(net.spec, pruned.masks)
  for g, k in zip(net.spec.groups, counts):
    parts = []
    for member in g.members:   # kernels [kh, kw, cin, cout] -> rows
      w = np.asarray(ranking._site(params, member), np.float64)  # pylint: disable=protected-access
      rows = np.stack([w[..., j].ravel() for j in range(w.shape[-1])])
      parts.append(np.pad(rows, ((0, g.size - len(rows)), (0, 0))))
    crit = _fpgm_numpy(np.concatenate(parts, axis=1))
    keep = sorted(np.argsort(-crit, kind="stable")[:k])
    assert keep == list(np.flatnonzero(pruned.masks[g.name])), g.name


def test_legr_identity_ranking_equals_l2(nets, tmp_path):
  net, variables = nets("resnet20")
  layers = {n: {"alpha": 1.0, "kappa": 0.0} for n in net.spec.layer_names}
  path = tmp_path / "ranking.json"
  path.write_text(json.dumps({"layers": layers}))
  budget = methods.Budget("flops", 0.4)
  a = methods.get("legr").prune(net, variables, budget, artifact=str(path))
  b = methods.get("l2").prune(net, variables, budget)
  for g in a.masks:
    np.testing.assert_array_equal(a.masks[g], b.masks[g])
  # and a learned (random) ranking prunes differently
  c = methods.get("legr").prune(
      net, variables, budget,
      artifact=_write_ranking(tmp_path / "r.json", net.spec, 0))
  assert any(not np.array_equal(a.masks[g], c.masks[g]) for g in a.masks)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_legr_refuses_non_finite_rankings(nets, tmp_path, bad):
  net, variables = nets("cnn_small")
  layers = {n: {"alpha": 1.0, "kappa": 0.0} for n in net.spec.layer_names}
  layers[net.spec.layer_names[0]]["kappa"] = bad
  path = tmp_path / "ranking.json"
  path.write_text(json.dumps({"layers": layers}))
  with pytest.raises(ValueError, match="not finite"):
    methods.get("legr").prune(net, variables, methods.Budget("flops", 0.5),
                              artifact=str(path))
  path.write_text(json.dumps({"layers": {}, "loss": None}))
  with pytest.raises(ValueError, match="lacks layers"):
    methods.get("legr").prune(net, variables, methods.Budget("flops", 0.5),
                              artifact=str(path))


def test_legr_needs_its_artifact(nets):
  net, variables = nets("cnn_small")
  with pytest.raises(ValueError, match="learn stage"):
    methods.get("legr").prune(net, variables, methods.Budget("flops", 0.5))


@pytest.mark.parametrize("method", DATA_FREE)
def test_infeasible_budget_is_refused(nets, method):
  net, variables = nets("resnet20")
  with pytest.raises(methods.InfeasibleBudgetError, match="below"):
    methods.get(method, safeguard=0.5).prune(
        net, variables, methods.Budget("flops", 0.05))


def test_budget_parse_and_validation():
  assert methods.Budget.parse("0.47") == methods.Budget("flops", 0.47)
  assert methods.Budget.parse("params:0.5") == methods.Budget("params", 0.5)
  assert methods.Budget("flops", 0.47).name == "flops_0.47"
  for bad in ("0", "1.5", "nan", "-0.1", "latency:0.5", "half"):
    with pytest.raises(ValueError):
      methods.Budget.parse(bad)


def test_registry_names_get_and_user_methods(nets):
  assert set(DATA_FREE + ("legr",)) <= set(methods.names())
  with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
    methods.get("nope")
  with pytest.raises(ValueError, match="no option"):
    methods.get("l2", lam=3)

  @methods.register
  @dataclasses.dataclass(frozen=True)
  class Reverse(methods.GlobalRanking):   # a user's method: one function
    name = "reverse_l2_test"

    def scores(self, spec, params, artifact):
      return {k: -np.asarray(v) for k, v in ranking.group_scores(
          spec, ranking.filter_norms(spec, params)).items()}

  net, variables = nets("resnet20")
  budget = methods.Budget("flops", 0.5)
  rev = methods.get("reverse_l2_test").prune(net, variables, budget)
  l2 = methods.get("l2").prune(net, variables, budget)
  check_within_one_channel(net.spec, rev.masks, budget)
  assert any(not np.array_equal(rev.masks[g], l2.masks[g]) for g in l2.masks)


def test_solve_counts_against_exhaustive_search(nets):
  """On cnn_small, the fill lands where an exhaustive scan of the knob
  (fine grid) plus a one-channel step says it must."""
  net, _ = nets("cnn_small")
  spec = net.spec
  sizes = B.sizes(spec).astype(float)
  fn = lambda t: np.ceil(t * sizes - 1e-9).astype(np.int64)
  for frac in (0.2, 0.35, 0.5, 0.77):
    budget = methods.Budget("flops", frac)
    counts, _ = B.solve_counts(spec, fn, budget, 0.0)
    limit = B.threshold(spec, budget)
    grid = [np.maximum(fn(t), 1) for t in np.linspace(0, 1, 20001)]
    best = max((c for c in grid if B.cost_of_counts(spec, c, "flops") <=
                limit), key=lambda c: B.cost_of_counts(spec, c, "flops"))
    assert B.cost_of_counts(spec, counts, "flops") <= limit
    # at least as good as any knob value, and at most one fill step beyond
    assert np.all(counts >= best) and np.all(counts - best <= 1)


def test_aggregate_options_change_coupled_scores(nets):
  """sum / mean / max over a residual chain's members, against numpy."""
  net, variables = nets("resnet20")
  spec = net.spec
  norms = {k: np.asarray(v) for k, v in
           ranking.filter_norms(spec, variables["params"]).items()}
  chain = max(spec.groups, key=lambda g: len(g.members))
  stack = np.stack([np.pad(norms[m], (0, chain.size - len(norms[m])),
                           constant_values=np.nan) for m in chain.members])
  expect = {"sum": np.nansum(stack, 0), "mean": np.nanmean(stack, 0),
            "max": np.nanmax(stack, 0)}
  for reduce, want in expect.items():
    got = ranking.group_scores(spec, norms, reduce)[chain.name]
    np.testing.assert_allclose(got, want, rtol=1e-6)
  budget = methods.Budget("flops", 0.47)
  a = methods.get("l2").prune(net, variables, budget).masks
  b = methods.get("l2", aggregate="mean").prune(net, variables, budget).masks
  assert any(not np.array_equal(a[g], b[g]) for g in a)
  check_within_one_channel(spec, b, budget)
  with pytest.raises(ValueError, match="aggregate"):
    methods.get("l2", aggregate="avg")


def test_parse_spec():
  assert methods.parse_spec("l2") == ("l2", "l2", {})
  assert methods.parse_spec("legr@aggregate=mean+tau_hat=200") == (
      "legr@aggregate=mean+tau_hat=200", "legr",
      {"aggregate": "mean", "tau_hat": 200})
  for bad in ("@x=1", "l2@x", "a/b"):
    with pytest.raises(ValueError):
      methods.parse_spec(bad)


def test_legr_chains_sum_over_the_reference_cross_stage_chains(tmp_path):
  """pad='append' ResNet-20: channel j of a stage is channel j of the next
  (the reference's DownsampleA); with chains=True a stage channel's score is
  the sum over every chained layer having it (numpy), the search's masks
  agree with the method's, and a ranking is pruned as it was learned."""
  import jax  # pylint: disable=g-import-not-at-top
  from legr_jax.search import fitness  # pylint: disable=g-import-not-at-top
  net = build("resnet20", pad="append")
  spec = net.spec
  variables = numpy_variables(net, 1)
  rng = np.random.default_rng(0)
  alpha = {n: float(np.exp(rng.normal())) for n in spec.layer_names}
  kappa = {n: float(rng.normal(0, 0.1)) for n in spec.layer_names}
  layer = {k: np.asarray(v) for k, v in ranking.affine_scores(
      ranking.filter_norms(spec, variables["params"]), alpha, kappa).items()}
  streams = sorted((g for g in spec.groups if len(g.members) > 1),
                   key=lambda g: g.size)
  assert [g.size for g in streams] == [16, 32, 64]
  expect = {}
  for g in streams:
    total = np.zeros(g.size)
    for h in streams:
      for m in h.members:
        n = min(g.size, len(layer[m]))
        total[:n] += layer[m][:n]
    expect[g.name] = total
  path = tmp_path / "ranking.json"
  path.write_text(json.dumps({
      "layers": {n: {"alpha": alpha[n], "kappa": kappa[n]}
                 for n in spec.layer_names}, "loss": 1.0,
      "aggregate": "sum", "chains": True}))
  method = methods.get("legr", chains=True)
  got = method.scores(spec, variables["params"], str(path))
  for g in streams:
    np.testing.assert_allclose(got[g.name], expect[g.name], rtol=1e-5)
  budget = methods.Budget("flops", 0.47)
  masks = method.prune(net, variables, budget, artifact=str(path)).masks
  check_within_one_channel(spec, masks, budget)
  plain = methods.get("legr").scores
  with pytest.raises(ValueError, match="learned with.*legr@aggregate=sum"
                     r"\+chains=True"):
    plain(spec, variables["params"], str(path))
  # the search's candidate masks use the same scores
  names = spec.layer_names
  cfg = fitness.FitnessConfig(flops=0.47, safeguard=0.1, chains=True)
  m2, feasible, _ = jax.jit(lambda a, k: fitness.candidate_masks(
      spec, ranking.filter_norms(spec, variables["params"]), a, k, cfg))(
          np.array([alpha[n] for n in names], np.float32),
          np.array([kappa[n] for n in names], np.float32))
  assert bool(feasible)
  for g in masks:
    np.testing.assert_array_equal(np.asarray(m2[g]), masks[g])
  with pytest.raises(ValueError, match="not 'max'"):
    methods.get("legr", chains=True, aggregate="max")
