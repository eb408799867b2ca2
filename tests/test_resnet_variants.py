"""CIFAR ResNet option-A layouts (pad='center' | 'append') and the channel
chains that zero-pad shortcuts define (`NetSpec.chains`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturbed_variables, random_masks
from legr_jax import cost, models, surgery
from legr_jax.models import blocks
from legr_jax.search import blockwise
from test_cost import (_conv_and_dot_macs_from_jaxpr,
                       _xla_conv_flops_same_convention)


def _net(pad, depth=20):
  return models.get(f"resnet{depth}", pad=pad)


def test_pad_maps_layouts_and_default():
  assert blocks.default_pad_map(16, 32) == (-1,) * 8 + tuple(range(16)) + (
      -1,) * 8
  assert blocks.append_pad_map(16, 32) == tuple(range(16)) + (-1,) * 16
  assert models.get("resnet20").spec == _net("center").spec
  spec = _net("append").spec
  sc = {s.name: s for s in spec.shortcuts}
  assert sc["stage2_block0/shortcut"].index_map == blocks.append_pad_map(16,
                                                                         32)
  assert sc["stage3_block0/shortcut"].index_map == blocks.append_pad_map(32,
                                                                         64)


def test_bad_pad_is_refused():
  with pytest.raises(ValueError, match="pad must be one of"):
    models.get("resnet20", pad="middle")
  with pytest.raises(ValueError, match="shortcut='B'"):
    models.get("resnet20", shortcut="B", pad="append")


def test_layouts_share_groups_and_costs():
  a, c = _net("append", 56).spec, _net("center", 56).spec
  assert a.groups == c.groups and a.convs == c.convs
  for metric in cost.METRICS:
    qa, la, ca = cost.cost_coefficients(a, metric)
    qc, lc, cc = cost.cost_coefficients(c, metric)
    np.testing.assert_array_equal(qa, qc)
    np.testing.assert_array_equal(la, lc)
    assert ca == cc


def test_resnet56_append_chain_is_the_reference_chain():
  spec = _net("append", 56).spec
  chains = spec.chains()
  assert sorted(g for ch in chains for g in ch.groups) == sorted(
      spec.group_names)
  long = [ch for ch in chains if len(ch.groups) > 1]
  assert len(long) == 1 and len(chains) == 1 + 27
  ch = long[0]
  stream = lambda s: spec.conv(f"stage{s}_block0/conv2").out_group  # noqa: E731
  assert ch.name == "stem" and ch.size == 64
  assert ch.groups == ("stem", stream(2), stream(3))
  # appended zeros: channel j of every stage is chain position j
  assert ch.positions == tuple(tuple(range(n)) for n in (16, 32, 64))
  members = [m for g in ch.groups for m in spec.group(g).members]
  assert len(members) == 28 and members[0] == "stem"
  assert all(m.endswith("/conv2") for m in members[1:])


def test_center_chain_positions_follow_the_offsets():
  ch = [c for c in _net("center").spec.chains() if len(c.groups) > 1][0]
  p1, p2, p3 = (np.array(p) for p in ch.positions)
  np.testing.assert_array_equal(p2[8:24], p1)         # 8 zeros before
  np.testing.assert_array_equal(p3[16:48], p2)        # 16 zeros before
  assert sorted(p3) == list(range(64)) and ch.size == 64


def test_chains_of_a_sliced_network_follow_the_kept_channels():
  net = _net("append")
  variables = perturbed_variables(net, 1)
  masks = random_masks(net.spec, 7, keep_prob=0.5)
  small, _ = surgery.slice_network(net, variables, masks)
  keep = surgery.kept_channels(net.spec, masks)
  ch = [c for c in small.spec.chains() if len(c.groups) > 1][0]
  big = [c for c in net.spec.chains() if len(c.groups) > 1][0]
  # consecutive stages: sliced channels a (of g) and b (of h) share a
  # position iff their original channels did (a stage that drops channel j
  # cuts it from the stages around it, so only neighbours are compared)
  for i, (g, h) in enumerate(zip(big.groups, big.groups[1:])):
    same_small = (np.array(ch.positions[i])[:, None] ==
                  np.array(ch.positions[i + 1])[None, :])
    orig_g = np.array(big.positions[i])[keep[g]]
    orig_h = np.array(big.positions[i + 1])[keep[h]]
    np.testing.assert_array_equal(same_small,
                                  orig_g[:, None] == orig_h[None, :])


def test_chains_refuse_a_channel_copied_twice():
  spec = _net("append").spec
  s = spec.shortcuts[0]
  bad = dataclasses.replace(s, index_map=(0,) * s.out_channels)
  with pytest.raises(ValueError, match="twice"):
    dataclasses.replace(spec, shortcuts=(bad,) + spec.shortcuts[1:]).chains()


def test_option_b_has_no_chains_across_groups():
  spec = models.get("resnet20", shortcut="B").spec
  assert all(len(ch.groups) == 1 for ch in spec.chains())


def _site(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def _relabel(spec, variables, perm):
  """Variables with channel c of group g taken from channel perm[g][c]."""
  src = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
  out = jax.tree_util.tree_map(np.array, src)
  for c in spec.convs:
    k = _site(src["params"], c.name)["conv"]["kernel"][..., perm[c.out_group]]
    if c.in_group is not None:
      k = k[:, :, perm[c.in_group], :]
    _site(out["params"], c.name)["conv"]["kernel"] = k
    for col in ("params", "batch_stats"):
      bn = _site(out[col], c.name)["bn"]
      for name in bn:
        bn[name] = _site(src[col], c.name)["bn"][name][perm[c.out_group]]
  _site(out["params"], spec.dense.name)["dense"]["kernel"] = _site(
      src["params"], spec.dense.name)["dense"]["kernel"][
          perm[spec.dense.in_group]]
  return out


def test_layouts_are_one_network_up_to_a_relabelling():
  """Chain positions relabel a centred network into an appended one."""
  app, cen = _net("append"), _net("center")
  variables = perturbed_variables(app, 3)
  ch_a = {g: p for ch in app.spec.chains()
          for g, p in zip(ch.groups, ch.positions)}
  ch_c = {g: p for ch in cen.spec.chains()
          for g, p in zip(ch.groups, ch.positions)}
  # centred channel c is the appended channel at the same chain position
  perm = {g: np.argsort(ch_a[g])[np.array(ch_c[g])] for g in ch_a}
  x = jax.random.normal(jax.random.key(0), (4,) + app.input_shape)
  want = app.apply(variables, x)
  got = cen.apply(_relabel(cen.spec, variables, perm), x)
  assert float(jnp.std(want)) > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # and not without the relabelling
  assert not np.allclose(cen.apply(variables, x), want, atol=1e-3)


def _residual_masks(spec, seed):
  """Random masks that prune channels of every residual stream too."""
  masks = random_masks(spec, seed, keep_prob=0.5)
  for ch in spec.chains():
    for g in ch.groups:
      assert 0 < float(jnp.sum(masks[g])) < spec.group(g).size
  return masks


def test_append_sliced_equals_masked_and_blockwise():
  net = _net("append")
  variables = perturbed_variables(net, 5)
  masks = _residual_masks(net.spec, 11)
  x = jax.random.normal(jax.random.key(2), (4,) + net.input_shape)
  masked = jax.jit(lambda v, x: net.apply(v, x, masks))(variables, x)
  small, small_vars = surgery.slice_network(net, variables, masks)
  sliced = jax.jit(lambda v, x: small.apply(v, x))(small_vars, x)
  assert float(jnp.std(masked)) > 1e-3
  np.testing.assert_allclose(sliced, masked, atol=1e-4, rtol=1e-4)
  block = blockwise.BlockwiseExecutor().apply(net, variables, x, masks)
  np.testing.assert_allclose(block, masked, atol=1e-4, rtol=1e-4)
  rebuilt = models.from_config(small.config)
  assert rebuilt.spec == small.spec


def test_append_cost_matches_sliced_network_and_xla():
  net = _net("append")
  variables = net.init(jax.random.key(0))
  masks = _residual_masks(net.spec, 4)
  small, small_vars = surgery.slice_network(net, variables, masks)
  x = jnp.zeros((1,) + net.input_shape)
  fn = lambda v, x: small.apply(v, x)  # noqa: E731
  ours = float(cost.flops(net.spec, masks))
  assert _conv_and_dot_macs_from_jaxpr(fn, small_vars, x) == pytest.approx(
      ours, rel=1e-6)
  assert _xla_conv_flops_same_convention(fn, small_vars, x) == pytest.approx(
      2 * ours, rel=0.02)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_chain_scores_are_the_references_zero_padded_chain_sum(reduce):
  from legr_jax.ranking import chain_scores
  from legr_jax import ranking
  spec = _net("append").spec
  rng = np.random.default_rng(0)
  layer = {c.name: jnp.asarray(rng.normal(size=c.out_channels), jnp.float32)
           for c in spec.convs}
  got = chain_scores(spec, ranking.group_scores(spec, layer), reduce)
  # the reference: stack the chain's layers zero-padded to 64 and sum (or
  # divide by the number of layers having the channel)
  chain = ["stem"] + [c.name for c in spec.convs if c.name.endswith("conv2")]
  padded = np.stack([np.pad(layer[n], (0, 64 - layer[n].shape[0]))
                     for n in chain])
  want = padded.sum(0)
  if reduce == "mean":
    want = want / np.stack([np.pad(np.ones(layer[n].shape[0]),
                                   (0, 64 - layer[n].shape[0]))
                            for n in chain]).sum(0)
  for n in chain:
    np.testing.assert_allclose(got[spec.conv(n).out_group],
                               want[:layer[n].shape[0]], rtol=1e-5,
                               atol=1e-5)
  for c in spec.convs:   # one-layer groups are left as they are
    if c.name.endswith("conv1"):
      np.testing.assert_allclose(got[c.out_group], layer[c.name])
