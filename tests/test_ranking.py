"""Tests of legr_jax.ranking against slow, obviously-correct NumPy references.

The reference greedy search recomputes the cost from ``spec.convs`` and
``spec.dense`` (float64, not via `legr_jax.cost`) after every single removal.
"""

import functools
import math
import os
import pathlib
import subprocess
import sys

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import legr_jax
from conftest import ALL_MODELS
from legr_jax import cost, ranking

MODELS = ALL_MODELS   # conftest: the zoo less resnet32/110 (resnet20's blocks)
# Small inputs where they do not change what is tested (costs still depend on
# the spatial sizes; the channel structure does not).
INPUT_SHAPES = {"resnet50": (32, 32, 3), "vgg16": (32, 32, 3),
                "mobilenetv2": (32, 32, 3)}


@functools.lru_cache(maxsize=None)
def get_net(name):
  return legr_jax.models.get(name, num_classes=10,
                             input_shape=INPUT_SHAPES.get(name))


@functools.lru_cache(maxsize=None)
def get_params(name):
  """Random params with the real Flax tree layout (shapes from the module,
  values random so that every filter has its own norm)."""
  net = get_net(name)
  shapes = jax.eval_shape(net.init, jax.random.key(0))["params"]
  rng = np.random.default_rng(sum(map(ord, name)))
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def random_affine(spec, norms, rng, batch=None):
  """LeGR's initial-population distribution: alpha = exp(N(0, 1)),
  kappa ~ N(0, std of the layer's norms)."""
  shape = () if batch is None else (batch,)
  alpha = {l: np.exp(rng.normal(size=shape)).astype(np.float32)
           for l in spec.layer_names}
  kappa = {l: (rng.normal(size=shape) * float(np.std(norms[l]))
               ).astype(np.float32) for l in spec.layer_names}
  return alpha, kappa


# ---------------------------------------------------------------- references


def ref_costs(spec, widths):
  """(MACs, params) of the network with group widths ``widths`` (dict)."""
  macs = prm = 0
  for c in spec.convs:
    cout = widths[c.out_group]
    cin = c.in_channels if c.in_group is None else widths[c.in_group]
    kh, kw = c.kernel
    weights = kh * kw * cout * (1 if c.depthwise else cin)
    macs += c.out_hw[0] * c.out_hw[1] * weights
    prm += weights + 2 * cout                 # kernel + BatchNorm scale, bias
  d = spec.dense
  if d.in_group is None:
    fin = d.in_features
  else:
    fin = widths[d.in_group] * (d.in_features // spec.group(d.in_group).size)
  macs += fin * d.out_features
  prm += fin * d.out_features + d.out_features
  return float(macs), float(prm)


def ref_keep(size, safeguard):
  return max(1, math.ceil(round(safeguard * size, 9)))


def greedy_trajectory(spec, scores, safeguard):
  """LeGR's greedy pruning, one channel at a time.

  Visits all channels in ascending score order (ties: groups in spec order,
  then channel index); removes a channel unless its group is down to its
  safeguard (its remaining channels are then its best ones). Returns the
  removed (group, channel) sequence and the (MACs, params) after 0, 1, ...
  removals, each recomputed from scratch.
  """
  sizes = {g.name: g.size for g in spec.groups}
  keep = {g: ref_keep(c, safeguard) for g, c in sizes.items()}
  flat = [(g.name, c) for g in spec.groups for c in range(g.size)]
  values = np.concatenate(
      [np.asarray(scores[g.name], np.float64) for g in spec.groups])
  widths = dict(sizes)
  removed, costs = [], [ref_costs(spec, widths)]
  for i in np.argsort(values, kind="stable"):
    g, c = flat[i]
    if widths[g] <= keep[g]:
      continue
    widths[g] -= 1
    removed.append((g, c))
    costs.append(ref_costs(spec, widths))
  return removed, np.array(costs)


def ref_masks(spec, trajectory, flops=None, params=None):
  """Masks after the shortest prefix of the trajectory meeting the budgets,
  and whether one exists."""
  removed, costs = trajectory
  full = costs[0]
  fits = np.ones(len(costs), bool)
  if flops is not None:
    fits &= costs[:, 0] <= flops * full[0]
  if params is not None:
    fits &= costs[:, 1] <= params * full[1]
  k = int(np.argmax(fits)) if fits.any() else len(costs) - 1
  masks = {g.name: np.ones(g.size, np.float32) for g in spec.groups}
  for g, c in removed[:k]:
    masks[g][c] = 0.0
  return masks, bool(fits.any()), k


def assert_masks_equal(got, want):
  assert set(got) == set(want)
  for g in want:
    np.testing.assert_array_equal(np.asarray(got[g]), want[g], err_msg=g)


def widths_of(masks):
  return {g: int(np.sum(np.asarray(m))) for g, m in masks.items()}


# --------------------------------------------------------------------- tests


def test_import_does_not_load_tensorflow_or_orbax():
  code = ("import sys, legr_jax.ranking; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets', 'orbax')); "
          "assert not bad, bad; print('ok')")
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=False, env=env, cwd=root)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_reexported_from_package():
  for name in ranking.__all__:
    assert getattr(legr_jax, name) is getattr(ranking, name)
  assert legr_jax.ranking is ranking


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("ord_", [1, 2])
def test_filter_norms_match_numpy(name, ord_):
  spec, params = get_net(name).spec, get_params(name)
  norms = ranking.filter_norms(spec, params, ord=ord_)
  assert list(norms) == list(spec.layer_names)
  flat = {"/".join(k[:-2]): np.asarray(v, np.float64)
          for k, v in flax.traverse_util.flatten_dict(params).items()
          if k[-2:] == ("conv", "kernel")}
  assert set(flat) == set(spec.layer_names)
  for layer, kernel in flat.items():
    want = [np.sum(np.abs(kernel[..., o]) ** ord_)
            for o in range(kernel.shape[-1])]
    assert norms[layer].shape == (spec.conv(layer).out_channels,)
    np.testing.assert_allclose(norms[layer], want, rtol=1e-5, err_msg=layer)
  # A full variables dict is accepted too; jit with spec static agrees.
  again = jax.jit(ranking.filter_norms, static_argnums=(0, 2))(
      spec, {"params": params}, ord_)
  for layer in spec.layer_names:
    np.testing.assert_allclose(again[layer], norms[layer], rtol=1e-6)


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2"])
def test_affine_and_group_scores_match_numpy(name):
  spec, rng = get_net(name).spec, np.random.default_rng(0)
  norms = ranking.filter_norms(spec, get_params(name))
  alpha, kappa = random_affine(spec, norms, rng)
  layer = ranking.affine_scores(norms, alpha, kappa)
  for l in spec.layer_names:
    np.testing.assert_allclose(
        layer[l], alpha[l] * np.asarray(norms[l]) + kappa[l], rtol=1e-6)
  groups = ranking.group_scores(spec, layer)
  assert list(groups) == list(spec.group_names)
  for g in spec.groups:
    want = sum(np.asarray(layer[m], np.float64) for m in g.members)
    np.testing.assert_allclose(groups[g.name], want, rtol=1e-5, atol=1e-5)
  coupled = [g for g in spec.groups if len(g.members) > 1]
  assert coupled, "expected residual / depthwise coupling in " + name


def test_group_scores_zero_pads_a_narrower_member():
  spec = get_net("resnet20").spec
  g = next(g for g in spec.groups if len(g.members) > 2)
  layer = {l: jnp.full((spec.conv(l).out_channels,), 1.0)
           for l in spec.layer_names}
  layer[g.members[1]] = jnp.arange(3.0) + 10   # narrower than the group
  got = np.asarray(ranking.group_scores(spec, layer)[g.name])
  want = np.full(g.size, len(g.members) - 1.0)
  want[:3] += np.arange(3.0) + 10
  np.testing.assert_array_equal(got, want)
  layer[g.members[1]] = jnp.ones(g.size + 1)
  with pytest.raises(ValueError, match="channels"):
    ranking.group_scores(spec, layer)


@pytest.mark.parametrize("name", MODELS)
def test_masks_match_greedy_reference(name):
  """50 random budgets per model and metric: cost <= budget, within one
  channel of it, and the same masks as the one-at-a-time greedy search."""
  spec, rng = get_net(name).spec, np.random.default_rng(1)
  full = ref_costs(spec, spec.group_sizes)
  assert np.allclose(full, [cost.unpruned(spec, "flops"),
                            cost.unpruned(spec, "params")])
  norms = ranking.filter_norms(spec, get_params(name))
  alpha, kappa = random_affine(spec, norms, rng)
  affine = ranking.group_scores(spec, ranking.affine_scores(norms, alpha,
                                                            kappa))
  # Integer-valued scores: many ties within and across groups.
  ties = {g.name: jnp.asarray(rng.integers(0, 4, g.size), jnp.float32)
          for g in spec.groups}
  for scores, safeguard in ((affine, 0.1), (ties, 0.3)):
    traj = greedy_trajectory(spec, scores, safeguard)
    costs = traj[1]
    for m, metric in enumerate(("flops", "params")):
      lowest = costs[-1, m] / full[m]
      # 20 uniform budgets and 5 landing exactly on (or next to) a prefix
      # cost, where float32 cost arithmetic would round the wrong way.
      budgets = list(rng.uniform(lowest, 1.0, 20))
      for k in rng.integers(0, len(costs) - 1, 5):
        exact = costs[k, m] / full[m]
        budgets.append(float(rng.choice(
            [exact, np.nextafter(exact, 0), np.nextafter(exact, 2)])))
      for b in budgets:
        masks, feasible = ranking.masks_for_budget(
            spec, scores, safeguard=safeguard, **{metric: b})
        want, ok, k = ref_masks(spec, traj, **{metric: b})
        assert ok and bool(feasible)
        assert_masks_equal(masks, want)
        got = ref_costs(spec, widths_of(masks))[m]
        assert got <= b * full[m]                          # feasible
        assert k == 0 or costs[k - 1, m] > b * full[m]     # within 1 channel
        lib = float(getattr(cost, metric)(spec, masks))
        assert lib == pytest.approx(got, rel=1e-6)


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2", "vgg16"])
def test_flops_and_params_together(name):
  spec, rng = get_net(name).spec, np.random.default_rng(2)
  scores = {g.name: jnp.asarray(rng.normal(size=g.size), jnp.float32)
            for g in spec.groups}
  traj = greedy_trajectory(spec, scores, 0.1)
  low = traj[1][-1] / traj[1][0]
  for _ in range(10):
    f, p = rng.uniform(low, 1.0)
    masks, feasible = ranking.masks_for_budget(spec, scores, flops=f,
                                               params=p, safeguard=0.1)
    want, ok, _ = ref_masks(spec, traj, flops=f, params=p)
    assert ok and bool(feasible)
    assert_masks_equal(masks, want)
    _, _, kf = ref_masks(spec, traj, flops=f)
    _, _, kp = ref_masks(spec, traj, params=p)
    assert sum(m.size - m.sum() for m in want.values()) == max(kf, kp)


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "mobilenetv2"])
def test_vmap_over_64_affine_sets_equals_loop(name):
  spec, rng = get_net(name).spec, np.random.default_rng(3)
  norms = ranking.filter_norms(spec, get_params(name))
  alphas, kappas = random_affine(spec, norms, rng, batch=64)

  def prune(alpha, kappa):
    scores = ranking.group_scores(spec, ranking.affine_scores(norms, alpha,
                                                              kappa))
    return ranking.masks_for_budget(spec, scores, flops=0.47, safeguard=0.1)

  batched, feasible = jax.jit(jax.vmap(prune))(alphas, kappas)
  assert feasible.shape == (64,) and bool(jnp.all(feasible))
  distinct = set()
  for i in range(64):
    single, ok = prune({l: a[i] for l, a in alphas.items()},
                       {l: k[i] for l, k in kappas.items()})
    assert bool(ok)
    for g in spec.group_names:
      np.testing.assert_array_equal(batched[g][i], single[g])
    distinct.add(tuple(np.concatenate([np.asarray(single[g])
                                       for g in spec.group_names])))
  assert len(distinct) > 32   # the affine sets really differ


@pytest.mark.parametrize("name", ["resnet56", "vgg16", "cnn_small"])
def test_identity_affine_is_global_l2_ranking(name):
  spec, params = get_net(name).spec, get_params(name)
  norms = ranking.filter_norms(spec, params)
  ones = {l: 1.0 for l in spec.layer_names}
  zeros = {l: 0.0 for l in spec.layer_names}
  scores = ranking.group_scores(spec,
                                ranking.affine_scores(norms, ones, zeros))
  # Plain global L2 ranking, from the kernels in NumPy.
  l2 = {}
  for g in spec.groups:
    l2[g.name] = np.zeros(g.size)
    for m in g.members:
      node = params
      for part in m.split("/"):
        node = node[part]
      l2[g.name] += np.sum(np.asarray(node["conv"]["kernel"], np.float64) ** 2,
                           axis=(0, 1, 2))
  traj = greedy_trajectory(spec, l2, 0.0)
  for b in (0.3, 0.47, 0.7):
    masks, _ = ranking.masks_for_budget(spec, scores, flops=b)
    assert_masks_equal(masks, ref_masks(spec, traj, flops=b)[0])


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2"])
@pytest.mark.parametrize("safeguard", [0.1, 0.25, 0.5])
def test_safeguard_keeps_each_groups_best_channels(name, safeguard):
  spec, rng = get_net(name).spec, np.random.default_rng(4)
  scores = {g.name: jnp.asarray(rng.normal(size=g.size), jnp.float32)
            for g in spec.groups}
  q, lin, const = cost.cost_coefficients(spec, "flops")
  keep = np.array([ref_keep(g.size, safeguard) for g in spec.groups], float)
  lowest = (keep @ q @ keep + lin @ keep + const) / cost.unpruned(spec)
  lowest *= 1 + 1e-9      # float64 rounding of lowest * unpruned
  masks, feasible = ranking.masks_for_budget(spec, scores, flops=lowest,
                                             safeguard=safeguard)
  assert bool(feasible)
  for g, k in zip(spec.groups, keep):
    m, s = np.asarray(masks[g.name]), np.asarray(scores[g.name])
    assert m.sum() == k, g.name
    np.testing.assert_array_equal(np.sort(s[m == 1]), np.sort(s)[-int(k):])
  if name == "resnet56" and safeguard == 0.1:  # reference: 2/16, 4/32, 7/64
    assert {g.size: int(masks[g.name].sum()) for g in spec.groups} == {
        16: 2, 32: 4, 64: 7}


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_infeasible_budget(name):
  spec, rng = get_net(name).spec, np.random.default_rng(5)
  scores = {g.name: jnp.asarray(rng.normal(size=g.size), jnp.float32)
            for g in spec.groups}
  traj = greedy_trajectory(spec, scores, 0.2)
  lowest = traj[1][-1] / traj[1][0]         # (flops, params) fractions
  # Eager: a clear error naming the reachable minimum.
  with pytest.raises(ValueError, match=r"infeasible.*safeguard=0\.2") as e:
    ranking.masks_for_budget(spec, scores, flops=0.9 * lowest[0],
                             safeguard=0.2)
  assert f"{lowest[0]:.6g}" in str(e.value)
  with pytest.raises(ValueError, match="params budget"):
    ranking.masks_for_budget(spec, scores, params=0.9 * lowest[1],
                             safeguard=0.2)
  # Under jit: a flag, and the cheapest masks the safeguard allows.
  fn = jax.jit(ranking.masks_for_budget, static_argnums=0)
  for b, expect in ((0.9 * lowest[0], False), (lowest[0] * (1 + 1e-9), True)):
    masks, feasible = fn(spec, scores, flops=b, safeguard=0.2)
    assert bool(feasible) == expect
    assert_masks_equal(masks, ref_masks(spec, traj, flops=lowest[0])[0])
  # A traced budget under vmap: one flag per budget.
  budgets = jnp.array([0.5 * lowest[0], lowest[0] * 1.01, 0.99])
  _, flags = jax.vmap(lambda b: ranking.masks_for_budget(
      spec, scores, flops=b, safeguard=0.2))(budgets)
  np.testing.assert_array_equal(flags, [False, True, True])
  # Safeguard 0 still keeps one channel per group: budget 0 is infeasible.
  with pytest.raises(ValueError, match="infeasible"):
    ranking.masks_for_budget(spec, scores, flops=0.0)


@pytest.mark.parametrize("name", ["resnet32", "mobilenetv2"])
def test_traced_budget_and_safeguard_match_static(name):
  spec, rng = get_net(name).spec, np.random.default_rng(6)
  scores = {g.name: jnp.asarray(rng.normal(size=g.size), jnp.float32)
            for g in spec.groups}
  budgets = rng.uniform(0.3, 1.0, 8).astype(np.float32)
  fn = jax.jit(jax.vmap(lambda b, s: ranking.masks_for_budget(
      spec, scores, flops=b, safeguard=s), in_axes=(0, None)))
  traced, flags = fn(jnp.asarray(budgets), jnp.float32(0.1))
  assert bool(jnp.all(flags))
  for i, b in enumerate(budgets):
    static, _ = ranking.masks_for_budget(spec, scores, flops=float(b),
                                         safeguard=0.1)
    for g in spec.group_names:
      np.testing.assert_array_equal(traced[g][i], static[g])


def test_jit_with_static_spec_matches_eager():
  spec = get_net("resnet20").spec
  params, rng = get_params("resnet20"), np.random.default_rng(7)
  norms = ranking.filter_norms(spec, params)
  alpha, kappa = random_affine(spec, norms, rng)

  def pipeline(spec, params, alpha, kappa):
    n = ranking.filter_norms(spec, params)
    s = ranking.group_scores(spec, ranking.affine_scores(n, alpha, kappa))
    return ranking.masks_for_budget(spec, s, params=0.5, safeguard=0.1)

  jitted = jax.jit(pipeline, static_argnums=0)(spec, params, alpha, kappa)
  eager = pipeline(spec, params, alpha, kappa)
  for g in spec.group_names:
    np.testing.assert_array_equal(jitted[0][g], eager[0][g])


def test_score_dtypes_and_signed_zero():
  spec, rng = get_net("resnet20").spec, np.random.default_rng(8)
  base = {g.name: rng.integers(-8, 8, g.size) / 4.0 for g in spec.groups}
  want, _ = ranking.masks_for_budget(
      spec, {k: jnp.asarray(v, jnp.float32) for k, v in base.items()},
      flops=0.5)
  for dtype in (jnp.bfloat16, jnp.float16, jnp.int32):
    scale = 4.0 if dtype == jnp.int32 else 1.0
    got, _ = ranking.masks_for_budget(
        spec, {k: jnp.asarray(v * scale, dtype) for k, v in base.items()},
        flops=0.5)
    assert_masks_equal(got, {k: np.asarray(v) for k, v in want.items()})
  # -0.0 and +0.0 tie: ties go in (group, channel) order.
  zeros = {g.name: jnp.zeros(g.size) for g in spec.groups}
  signed = {g.name: jnp.asarray(np.where(rng.random(g.size) < 0.5, -0.0, 0.0),
                                jnp.float32) for g in spec.groups}
  a, _ = ranking.masks_for_budget(spec, zeros, flops=0.6)
  b, _ = ranking.masks_for_budget(spec, signed, flops=0.6)
  assert_masks_equal(b, {k: np.asarray(v) for k, v in a.items()})


def test_bad_inputs_raise_clear_errors():
  spec = get_net("cnn_small").spec
  scores = {g.name: jnp.ones(g.size) for g in spec.groups}
  with pytest.raises(ValueError, match="give a budget"):
    ranking.masks_for_budget(spec, scores)
  with pytest.raises(ValueError, match="missing"):
    ranking.masks_for_budget(spec, dict(list(scores.items())[1:]), flops=0.5)
  bad = dict(scores, **{spec.groups[0].name: jnp.ones(3)})
  with pytest.raises(AssertionError, match="scores"):
    ranking.masks_for_budget(spec, bad, flops=0.5)
  with pytest.raises(ValueError, match="safeguard"):
    ranking.masks_for_budget(spec, scores, flops=0.5, safeguard=1.5)
  with pytest.raises(ValueError, match="finite"):
    ranking.masks_for_budget(spec, scores, flops=-0.1)
  with pytest.raises(ValueError, match="ord"):
    ranking.filter_norms(spec, get_params("cnn_small"), ord=3)
  with pytest.raises(ValueError, match="params have no entry"):
    ranking.filter_norms(get_net("resnet20").spec, get_params("cnn_small"))
  norms = {l: jnp.ones(3) for l in spec.layer_names}
  with pytest.raises(ValueError, match="alpha keys"):
    ranking.affine_scores(norms, {}, {})


# ------------------------------------------------------------------ round_to


def unit_greedy_masks(spec, scores, safeguard, r, metric, budget):
  """Reference for ``round_to=r``: per group, channels in ascending score
  order (ties: index) cut into units of r from the bottom (groups whose size
  is not a multiple of r: units of 1); a unit scores as its best channel;
  units removed one at a time in ascending (score, group, unit) order unless
  the group is down to ceil(keep / r) units; shortest prefix that fits."""
  m = {"flops": 0, "params": 1}[metric]
  sizes = {g.name: g.size for g in spec.groups}
  rg = {g: (r if c % r == 0 else 1) for g, c in sizes.items()}
  keep_u = {g: -(-ref_keep(c, safeguard) // rg[g]) for g, c in sizes.items()}
  units, values, members = [], [], {}
  for g in spec.groups:
    s = np.asarray(scores[g.name], np.float64)
    order = np.argsort(s, kind="stable")
    for u in range(g.size // rg[g.name]):
      chans = order[u * rg[g.name]:(u + 1) * rg[g.name]]
      units.append((g.name, u))
      values.append(s[chans[-1]])
      members[(g.name, u)] = chans
  widths = dict(sizes)
  full = ref_costs(spec, widths)[m]
  masks = {g.name: np.ones(g.size, np.float32) for g in spec.groups}
  left = {g: c // rg[g] for g, c in sizes.items()}
  for i in np.argsort(np.array(values), kind="stable"):
    if ref_costs(spec, widths)[m] <= budget * full:
      break
    g, u = units[i]
    if left[g] <= keep_u[g]:
      continue
    left[g] -= 1
    widths[g] -= rg[g]
    masks[g][members[(g, u)]] = 0.0
  return masks, ref_costs(spec, widths)[m] <= budget * full


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("r", [4, 8])
def test_round_to_matches_unit_greedy_reference(name, r):
  spec, rng = get_net(name).spec, np.random.default_rng(r)
  norms = ranking.filter_norms(spec, get_params(name))
  alpha, kappa = random_affine(spec, norms, rng)
  scores = ranking.group_scores(spec, ranking.affine_scores(norms, alpha,
                                                            kappa))
  full = ref_costs(spec, spec.group_sizes)
  for metric in ("flops", "params"):
    for b in rng.uniform(0.35, 0.95, 4):
      masks, feasible = ranking.masks_for_budget(
          spec, scores, safeguard=0.1, round_to=r, **{metric: float(b)})
      want, ok = unit_greedy_masks(spec, scores, 0.1, r, metric, float(b))
      assert bool(feasible) == ok
      if not ok:
        continue
      assert_masks_equal(masks, want)
      widths = widths_of(masks)
      for g in spec.groups:
        if g.size % r == 0:
          assert widths[g.name] % r == 0, (g.name, widths[g.name])
      m = ("flops", "params").index(metric)
      assert ref_costs(spec, widths)[m] <= b * full[m]


def test_round_to_one_is_the_default_and_bad_values_are_refused():
  spec = get_net("resnet20").spec
  norms = ranking.filter_norms(spec, get_params("resnet20"))
  alpha, kappa = random_affine(spec, norms, np.random.default_rng(0))
  scores = ranking.group_scores(spec, ranking.affine_scores(norms, alpha,
                                                            kappa))
  a, _ = ranking.masks_for_budget(spec, scores, flops=0.5, safeguard=0.1)
  b, _ = ranking.masks_for_budget(spec, scores, flops=0.5, safeguard=0.1,
                                  round_to=1)
  assert_masks_equal(b, {g: np.asarray(v) for g, v in a.items()})
  for bad in (0, -8, 2.5, True, "8"):
    with pytest.raises(ValueError, match="round_to"):
      ranking.masks_for_budget(spec, scores, flops=0.5, round_to=bad)
  # the safeguard rounds up to whole units: 0.1 of 16 channels -> 2 -> 8
  m, _ = ranking.masks_for_budget(spec, scores, flops=0.2, safeguard=0.1,
                                  round_to=8)
  assert min(widths_of(m).values()) >= 8


def test_round_to_under_jit_and_vmap_equals_eager():
  spec = get_net("resnet32").spec
  norms = ranking.filter_norms(spec, get_params("resnet32"))
  rng = np.random.default_rng(3)
  alpha, kappa = random_affine(spec, norms, rng, batch=4)
  scores = jax.vmap(lambda a, k: ranking.group_scores(
      spec, ranking.affine_scores(norms, a, k)))(alpha, kappa)
  fn = jax.jit(jax.vmap(lambda s: ranking.masks_for_budget(
      spec, s, flops=0.45, safeguard=0.1, round_to=8)))
  batched, feasible = fn(scores)
  assert np.all(np.asarray(feasible))
  for i in range(4):
    one, _ = ranking.masks_for_budget(
        spec, {g: v[i] for g, v in scores.items()}, flops=0.45,
        safeguard=0.1, round_to=8)
    assert_masks_equal({g: v[i] for g, v in batched.items()},
                       {g: np.asarray(v) for g, v in one.items()})
