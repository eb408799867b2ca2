"""``clr_rnf``: cross-checked against a plain numpy / Python-set rendition of
the reference's procedure (lmbxmu/CLR-RNF), budgets, variants."""

import itertools

import jax
import numpy as np
import pytest

from conftest import build, numpy_variables
from legr_jax import methods
from legr_jax.methods import budget as budget_lib
from legr_jax.methods import clr_rnf

LIGHT = ("cnn_small", "resnet20")


# --- The reference's procedure, written plainly ----------------------------

def ref_rnf(filters, m):
  """Reference k-reciprocal nearest filters: explicit pairwise distances,
  neighbour lists by (distance, index), k grown one by one, sets built and
  topped up as the reference does. Returns (sorted kept, overshoot, popped
  in ascending order?)."""
  f = np.asarray(filters, np.float64)
  c = len(f)
  d = [[float(np.sum((f[i] - f[j]) ** 2)) for j in range(c)]
       for i in range(c)]
  rows = [sorted(range(c), key=lambda j, i=i: (d[i][j], j))
          for i in range(c)]
  k = m
  while True:
    got = set(rows[0][:k]).intersection(*[r[:k] for r in rows[1:]])
    if len(got) == m:
      return sorted(got), False, True
    if len(got) > m:
      prev = set(rows[0][:k - 1]).intersection(
          *[r[:k - 1] for r in rows[1:]])
      extra = got.difference(prev)
      fresh = sorted(extra)
      popped = []
      while len(prev) != m:
        popped.append(extra.pop())
        prev.add(popped[-1])
      ascending = sorted(popped) == fresh[:len(popped)]
      return sorted(prev), True, ascending
    k += 1


def ref_keep_counts(units, lam, knob):
  """Reference cross-layer ranking. ``units``: [(list of weight arrays,
  list of their F, channels)]; returns the keep count of each unit."""
  scores = [np.concatenate([np.abs(np.ravel(w)) / f ** lam
                            for w, f in zip(ws, fs)]) for ws, fs, _ in units]
  pooled = np.concatenate(scores)
  preserve = int(pooled.size * knob)
  thr = np.sort(pooled)[::-1][preserve - 1] if preserve > 0 else np.inf
  out = []
  for s, (_, _, n) in zip(scores, units):
    p = float(np.sum(s < thr)) / s.size
    out.append(int(n * (1 - p)))
  return out


def ref_flops(spec):
  """F per conv (unnormalized MACs): own MACs + readers of its output group
  shared equally by the group's members."""
  own = {}
  for c in spec.convs:
    own[c.name] = (c.out_hw[0] * c.out_hw[1] * c.kernel[0] * c.kernel[1]
                   * c.in_channels * c.out_channels / c.feature_group_count)
  out = {}
  for g in spec.groups:
    readers = sum(own[c.name] for c in spec.convs
                  if c.in_group == g.name and c.out_group != g.name)
    if spec.dense.in_group == g.name:
      readers += spec.dense.in_features * spec.dense.out_features
    for mname in g.members:
      out[mname] = own[mname] + readers / len(g.members)
  return out


def kernel(params, conv):
  node = params
  for part in conv.split("/"):
    node = node[part]
  return np.asarray(node["conv"]["kernel"], np.float64)


def faithful_groups(spec):
  depthwise = {c.name for c in spec.convs if c.depthwise}
  return [g.name for g in spec.groups if not g.shortcuts
          and len([m for m in g.members if m not in depthwise]) == 1]


def ref_counts_fn(spec, params, lam, variant):
  ranked = (faithful_groups(spec) if variant == "faithful"
            else list(spec.group_names))
  f = ref_flops(spec)
  units = [([kernel(params, m) for m in spec.group(g).members],
            [f[m] for m in spec.group(g).members], spec.group(g).size)
           for g in ranked]
  sizes = {g.name: g.size for g in spec.groups}

  def counts(knob):
    keep = dict(zip(ranked, ref_keep_counts(units, lam, knob)))
    return np.array([keep.get(g, sizes[g]) for g in spec.group_names])
  return counts


def ref_filters(spec, params, group):
  parts = []
  for mname in spec.group(group).members:
    k = kernel(params, mname)
    parts.append(k.reshape(-1, k.shape[-1]).T)
  return np.concatenate(parts, axis=1)


def quantized(variables, step=1 / 16):
  """Kernels rounded to multiples of ``step``: exact ties everywhere."""
  def q(path, x):
    key = jax.tree_util.keystr(path)
    return (jax.numpy.round(x / step) * step if "kernel" in key else x)
  return jax.tree_util.tree_map_with_path(q, variables)


# --- k-reciprocal nearest filters -------------------------------------------

def test_rnf_matches_reference_procedure():
  rng = np.random.default_rng(0)
  overshoots = not_ascending = 0
  cases = 0
  for c, kind, seed in itertools.product(
      (1, 2, 5, 16, 33, 64), ("normal", "integer", "twins"), range(3)):
    d = int(rng.integers(1, 40))
    f = rng.normal(size=(c, d))
    if kind == "integer":            # exact distances, many exact ties
      f = np.round(f * 1.5)
    elif kind == "twins" and c > 2:  # identical and all-zero filters
      f[rng.integers(c, size=c // 3)] = f[0]
      f[rng.integers(c, size=2)] = 0.0
    for m in sorted({1, 2, c // 3, c // 2, c - 1, c} & set(range(1, c + 1))):
      want, over, ascending = ref_rnf(f, m)
      got = clr_rnf.k_reciprocal_nearest(f, m)
      assert got.dtype == bool and got.sum() == m
      assert np.flatnonzero(got).tolist() == want, (c, kind, seed, m)
      cases += 1
      overshoots += over
      not_ascending += over and not ascending
  # The top-up path, and its set order, are exercised.
  assert overshoots > cases // 4
  assert not_ascending > 0


def test_rnf_known_case():
  # 1-D filters 0, 1, 10, 11, 12. Neighbour lists (ties by index: filter 3
  # is 1 from both 2 and 4): [0 1 2 3 4], [1 0 2 3 4], [2 3 4 1 0],
  # [3 2 4 1 0], [4 3 2 1 0]. With m = 2: k = 2 gives {}, k = 3 {2}, k = 4
  # {1, 2, 3} (overshoot): {2} topped up from {1, 3} in set order: 1.
  f = np.array([[0.0], [1.0], [10.0], [11.0], [12.0]])
  got = np.flatnonzero(clr_rnf.k_reciprocal_nearest(f, 2)).tolist()
  assert got == [1, 2] == ref_rnf(f, 2)[0]
  assert clr_rnf.k_reciprocal_nearest(f, 5).all()
  with pytest.raises(ValueError, match="m=0"):
    clr_rnf.k_reciprocal_nearest(f, 0)


def test_squared_distances_exact_for_identical_rows():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(9, 300)) * 1e3
  f[4] = f[1]
  d = clr_rnf.squared_distances(f)
  assert d[1, 4] == 0.0 and d[4, 1] == 0.0 and np.all(np.diag(d) == 0)
  want = ((f[:, None] - f[None]) ** 2).sum(-1)
  np.testing.assert_allclose(d, want, rtol=1e-9, atol=1e-6)


# --- Cross-layer ranking ----------------------------------------------------

@pytest.mark.parametrize("model_name", LIGHT)
@pytest.mark.parametrize("variant", clr_rnf.VARIANTS)
@pytest.mark.parametrize("quant", [False, True])
def test_counts_match_reference(model_name, variant, quant):
  net = build(model_name)
  variables = numpy_variables(net, 3)
  if quant:
    variables = quantized(variables)
  params = variables["params"]
  lam = clr_rnf.default_lam(model_name)
  ours = clr_rnf.CLRRNF(lam=lam, variant=variant).counts_fn(net.spec, params)
  ref = ref_counts_fn(net.spec, params, lam, variant)
  rng = np.random.default_rng(0)
  knobs = np.concatenate([[0.0, 1e-9, 0.5, 1.0], rng.random(40)])
  for t in knobs:
    np.testing.assert_array_equal(ours(t), ref(t), err_msg=f"knob {t}")
  grid = np.linspace(0, 1, 201)
  counts = np.stack([ours(t) for t in grid])
  assert np.all(np.diff(counts, axis=0) >= 0)          # non-decreasing
  np.testing.assert_array_equal(counts[-1], budget_lib.sizes(net.spec))


def test_relative_flops_formula():
  spec = build("resnet20").spec
  total = budget_lib.cost_of_counts(spec, budget_lib.sizes(spec), "flops")
  width = clr_rnf.relative_flops(spec, "width")
  conv = clr_rnf.relative_flops(spec, "conv")
  block = 32 * 32 * 9 * 16 * 16         # a stage-1 3x3 conv's MACs
  assert width["stage1_block1/conv1"] * total == pytest.approx(2 * block)
  assert conv["stage1_block1/conv1"] * total == pytest.approx(block)
  # A stride-2 block: 3/4 of a regular block's MACs.
  assert (width["stage2_block0/conv1"] / width["stage2_block1/conv1"]
          == pytest.approx(0.75))
  for name, f in ref_flops(spec).items():
    assert width[name] * total == pytest.approx(f)
  with pytest.raises(ValueError, match="flops_rule"):
    clr_rnf.relative_flops(spec, "params")


# --- The whole method -------------------------------------------------------

@pytest.mark.parametrize("model_name", LIGHT)
@pytest.mark.parametrize("variant", clr_rnf.VARIANTS)
@pytest.mark.parametrize("budget", ["flops:0.5", "params:0.6"])
def test_pipeline_matches_reference(model_name, variant, budget):
  net = build(model_name)
  variables = quantized(numpy_variables(net, 5), step=1 / 64)
  params = variables["params"]
  method = methods.get("clr_rnf", variant=variant)
  pruned = method.prune(net, variables, budget)
  lam = clr_rnf.default_lam(model_name)
  assert pruned.info["lam"] == lam
  counts, _ = budget_lib.solve_counts(
      net.spec, ref_counts_fn(net.spec, params, lam, variant),
      methods.Budget.parse(budget), method.safeguard)
  np.testing.assert_array_equal(
      budget_lib.counts_of(net.spec, pruned.masks), counts)
  pruned_some = 0
  for g, m in zip(net.spec.groups, counts):
    if m == g.size:
      want = list(range(g.size))
    else:
      want, _, _ = ref_rnf(ref_filters(net.spec, params, g.name), int(m))
      pruned_some += 1
    assert np.flatnonzero(pruned.masks[g.name]).tolist() == want, g.name
  assert pruned_some > 0


@pytest.mark.parametrize("metric", ["flops", "params"])
def test_meets_budget_within_one_channel(model_name, metric):
  net = build(model_name)
  variables = numpy_variables(net, 0)
  spec = net.spec
  for fraction in (0.3, 0.6):
    budget = methods.Budget(metric, fraction)
    pruned = methods.get("clr_rnf").prune(net, variables, budget)
    spec.check_masks(pruned.masks)
    counts = budget_lib.counts_of(spec, pruned.masks)
    cost = budget_lib.cost_of_counts(spec, counts, metric)
    limit = budget_lib.threshold(spec, budget)
    assert cost <= limit
    assert limit - cost < budget_lib.marginal_costs(spec, counts, metric).max()
    assert np.all(counts >= budget_lib.protected_counts(spec, 0.1))


@pytest.mark.parametrize("model_name", LIGHT)
@pytest.mark.parametrize("options", [dict(variant="faithful"),
                                     dict(flops_rule="conv", lam=2.0)])
def test_options_meet_budget(model_name, options):
  net = build(model_name)
  variables = numpy_variables(net, 0)
  budget = methods.Budget("flops", 0.5)
  pruned = methods.get("clr_rnf", **options).prune(net, variables, budget)
  counts = budget_lib.counts_of(net.spec, pruned.masks)
  cost = budget_lib.cost_of_counts(net.spec, counts, "flops")
  limit = budget_lib.threshold(net.spec, budget)
  assert cost <= limit
  assert limit - cost < budget_lib.marginal_costs(
      net.spec, counts, "flops").max()
  assert pruned.info["lam"] == options.get("lam", clr_rnf.default_lam(
      model_name))


def test_deterministic():
  net = build("resnet20")
  variables = numpy_variables(net, 2)
  for variant in clr_rnf.VARIANTS:
    method = methods.get("clr_rnf", variant=variant)
    a = method.prune(net, variables, "flops:0.4")
    b = method.prune(net, variables, "flops:0.4")
    assert a.info == b.info
    for g in net.spec.group_names:
      np.testing.assert_array_equal(a.masks[g], b.masks[g])
    leaves = jax.tree_util.tree_leaves
    for x, y in zip(leaves(a.variables), leaves(b.variables)):
      np.testing.assert_array_equal(x, y)


def test_faithful_variant():
  net = build("resnet20")
  spec = net.spec
  variables = numpy_variables(net, 4)
  pruned = methods.get("clr_rnf", variant="faithful").prune(
      net, variables, "flops:0.6")
  ranked = clr_rnf.ranked_groups(spec, "faithful")
  # CIFAR ResNet: exactly the blocks' first convs.
  assert set(ranked) == {g.name for g in spec.groups
                         if g.name.endswith("/conv1")}
  assert len(ranked) == 9
  for g in spec.groups:
    if g.name not in ranked:
      assert pruned.masks[g.name].all(), g.name
  assert any(not pruned.masks[g].all() for g in ranked)
  new = pruned.variables
  ranked_convs = {m for g in ranked for m in spec.group(g).members}
  for c in spec.convs:
    parts = c.name.split("/")
    old_p, new_p = variables["params"], new["params"]
    old_s, new_s = variables["batch_stats"], new["batch_stats"]
    for part in parts:
      old_p, new_p = old_p[part], new_p[part]
      old_s, new_s = old_s[part], new_s[part]
    np.testing.assert_array_equal(new_p["conv"]["kernel"],
                                  old_p["conv"]["kernel"])
    if c.name in ranked_convs:
      np.testing.assert_array_equal(new_p["bn"]["scale"], 1.0)
      np.testing.assert_array_equal(new_p["bn"]["bias"], 0.0)
      np.testing.assert_array_equal(new_s["bn"]["mean"], 0.0)
      np.testing.assert_array_equal(new_s["bn"]["var"], 1.0)
      assert new_p["bn"]["scale"].dtype == old_p["bn"]["scale"].dtype
    else:
      for key in ("scale", "bias"):
        np.testing.assert_array_equal(new_p["bn"][key], old_p["bn"][key])
      for key in ("mean", "var"):
        np.testing.assert_array_equal(new_s["bn"][key], old_s["bn"][key])
  # The input variables are untouched.
  assert not np.all(np.asarray(
      variables["params"]["stage1_block0"]["conv1"]["bn"]["scale"]) == 1.0)
  grouped = methods.get("clr_rnf").prune(net, variables, "flops:0.6")
  assert grouped.variables is None
  assert clr_rnf.ranked_groups(spec, "grouped") == spec.group_names


def test_faithful_rule_on_other_models():
  spec = build("cnn_small").spec
  assert clr_rnf.ranked_groups(spec, "faithful") == spec.group_names
  spec = build("mobilenetv2").spec
  ranked = clr_rnf.ranked_groups(spec, "faithful")
  assert "stage2_block0/expand" in ranked        # expand + its depthwise
  assert "stage2_block0/project" not in ranked   # a residual chain


def test_infeasible_budget():
  net = build("resnet20")
  variables = numpy_variables(net, 0)
  with pytest.raises(methods.InfeasibleBudgetError,
                     match=r"clr_rnf.*faithful.*full width.*budget"):
    methods.get("clr_rnf", variant="faithful").prune(net, variables,
                                                     "flops:0.1")
  with pytest.raises(methods.InfeasibleBudgetError,
                     match=r"clr_rnf: budget flops:0.001 is below"):
    methods.get("clr_rnf").prune(net, variables, "flops:0.001")


def test_options_and_lambda():
  assert "clr_rnf" in methods.names()
  assert clr_rnf.default_lam("resnet56") == 10
  assert clr_rnf.default_lam("resnet110") == 5
  assert clr_rnf.default_lam("vgg16") == 0.5
  assert clr_rnf.default_lam("resnet50") == 0.4
  assert clr_rnf.default_lam("mobilenetv2") == 1
  assert clr_rnf.default_lam("resnet20") == 10
  assert clr_rnf.default_lam("cnn_small") == 0.5
  assert clr_rnf.default_lam("my_net") == clr_rnf.DEFAULT_LAM
  for bad in (dict(variant="all"), dict(flops_rule="macs"), dict(lam=-1.0),
              dict(lam=float("nan")), dict(lam=True)):
    with pytest.raises(ValueError, match="clr_rnf"):
      methods.get("clr_rnf", **bad)
  spec = build("cnn_small").spec
  params = numpy_variables(build("cnn_small"), 0)["params"]
  with pytest.raises(ValueError, match="lam=None"):
    methods.get("clr_rnf").counts_fn(spec, params)
  assert methods.get("clr_rnf", lam=3).config()["lam"] == 3


@pytest.mark.parametrize("model_name", ["resnet56", "vgg16", "resnet110"])
def test_reference_table_reading(model_name):
  """The documented reading of the reference's F table reproduces it."""
  from legr_jax import models  # pylint: disable=import-outside-toplevel
  spec = models.get(model_name).spec
  convs = [spec.group(g).members[0]
           for g in clr_rnf.ranked_groups(spec, "faithful")]
  rebuilt = np.array(clr_rnf.reference_reading(
      spec, convs, *clr_rnf.REFERENCE_READING[model_name]))
  ref = np.array(clr_rnf.REFERENCE_FLOPS_CFG[model_name])
  np.testing.assert_allclose(rebuilt / rebuilt[0], ref, atol=6e-6)
  text = clr_rnf.reference_comparison((model_name,))
  assert text.count("\n") == len(convs)
