"""Model zoo: spec derivation, masking semantics and input validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TEST_SHAPES, build, perturbed_variables
from legr_jax import models
from legr_jax.models import blocks


def test_unknown_model_lists_known_names():
  with pytest.raises(ValueError, match="resnet56") as e:
    models.get("resnet57")
  assert "vgg16" in str(e.value) and "mobilenetv2" in str(e.value)


def test_masks_none_equals_all_ones(model_name):
  net = build(model_name)
  variables = perturbed_variables(net, 0)
  x = jax.random.normal(jax.random.key(1), (2,) + net.input_shape)
  # jitted: op-by-op dispatch of a deep network costs more than a compile
  a = jax.jit(lambda v, x: net.apply(v, x, None))(variables, x)
  b = jax.jit(net.apply)(variables, x, net.spec.full_masks())
  assert a.shape == (2, 10)
  # two programs (no mask / x1.0 masks): XLA may fuse them differently
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_group_members_have_equal_width_and_cover_every_conv(model_name):
  spec = build(model_name).spec
  members = [m for g in spec.groups for m in g.members]
  assert sorted(members) == sorted(spec.layer_names)
  for c in spec.convs:
    assert spec.group(c.out_group).size == c.out_channels
    if c.in_group is not None:
      assert spec.group(c.in_group).size == c.in_channels


def test_resnet56_groups():
  spec = models.get("resnet56").spec
  # 3 residual streams + one group per block's first conv.
  assert len(spec.groups) == 3 + 27
  stream1 = spec.group("stem")
  assert stream1.size == 16
  assert stream1.members == ("stem",) + tuple(
      f"stage1_block{i}/conv2" for i in range(9))
  stream2 = spec.group(spec.conv("stage2_block0/conv2").out_group)
  assert stream2.shortcuts == ("stage2_block0/shortcut",)
  assert len(stream2.members) == 9
  assert spec.conv("stage2_block0/conv1").in_group == "stem"
  assert spec.conv("stage3_block8/conv2").out_hw == (8, 8)


def test_option_b_shortcut_convs_join_the_stream():
  spec = models.get("resnet20", shortcut="B").spec
  g = spec.group(spec.conv("stage2_block0/shortcut").out_group)
  assert "stage2_block0/conv2" in g.members
  assert spec.conv("stage2_block0/shortcut").kernel == (1, 1)
  assert not spec.shortcuts


def test_mobilenetv2_expand_and_depthwise_share_a_group():
  spec = models.get("mobilenetv2").spec
  c = spec.conv("stage2_block0/depthwise")
  assert c.depthwise
  assert c.out_group == spec.conv("stage2_block0/expand").out_group
  # residual blocks' project convs share the stream with the block before.
  assert (spec.conv("stage2_block1/project").out_group ==
          spec.conv("stage2_block0/project").out_group)


def test_resnet50_bottleneck_groups():
  spec = models.get("resnet50", input_shape=(64, 64, 3)).spec
  g = spec.group(spec.conv("stage1_block0/conv3").out_group)
  assert g.members[:2] == ("stage1_block0/conv3", "stage1_block0/downsample")
  assert len(g.members) == 4  # 3 conv3 + downsample
  assert spec.conv("stem").out_hw == (32, 32)
  assert spec.conv("stage1_block0/conv1").in_hw == (16, 16)


def test_new_architecture_gets_groups_for_free():
  """A model never seen by the library, written with the same blocks."""

  class TwoBranch(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, ctx, train=False):
      x = ctx.network_input(x)
      a = blocks.ConvBN(8, 3, name="a")(x, ctx, train)
      b = blocks.ConvBN(8, 1, act=None, name="b")(a, ctx, train)
      c = blocks.ConvBN(8, 3, act=None, name="c")(x, ctx, train)
      h = blocks.residual_add(ctx, b, c, act=nn.relu)
      d = blocks.ConvBN(0, 3, depthwise=True, name="dw")(h, ctx, train)
      return blocks.Classifier(self.num_classes, name="head")(d, ctx, train)

  models.MODELS["_twobranch"] = (TwoBranch, (8, 8, 3))
  try:
    net = models.get("_twobranch")
  finally:
    del models.MODELS["_twobranch"]
  groups = {g.name: g.members for g in net.spec.groups}
  assert groups == {"a": ("a",), "b": ("b", "c", "dw")}
  assert net.spec.dense.in_group == "b"


def test_unregistered_tensor_is_reported():

  class Leaky(nn.Module):
    @nn.compact
    def __call__(self, x, ctx, train=False):
      x = ctx.network_input(x)
      h = blocks.ConvBN(4, name="a")(x, ctx, train)
      h = h * 2.0  # not routed through passthrough()
      return blocks.Classifier(10, name="head")(h, ctx, train)

  models.MODELS["_leaky"] = (lambda num_classes: Leaky(), (8, 8, 3))
  try:
    with pytest.raises(ValueError, match="passthrough"):
      models.get("_leaky")
  finally:
    del models.MODELS["_leaky"]


def test_masked_channels_are_zero_downstream():
  net = build("resnet20")
  variables = perturbed_variables(net, 0)
  masks = net.spec.full_masks()
  masks["stem"] = masks["stem"].at[3].set(0.0)
  x = jax.random.normal(jax.random.key(1), (2,) + net.input_shape)
  _, state = net.module.apply(
      variables, x, net._context(net.spec.site_masks(masks)), train=False,
      capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  for block in ("stage1_block0", "stage1_block2"):
    out = inter[block]["__call__"][0]
    assert float(jnp.max(jnp.abs(out[..., 3]))) == 0.0
    assert float(jnp.max(jnp.abs(out[..., 4]))) > 0.0
  # option-A shortcut also zeroes the pruned stage-2 channels
  masks2 = net.spec.full_masks()
  g2 = net.spec.conv("stage2_block0/conv2").out_group
  masks2[g2] = masks2[g2].at[10].set(0.0)  # fed by stem channel 2
  _, state = net.module.apply(
      variables, x, net._context(net.spec.site_masks(masks2)), train=False,
      capture_intermediates=True, mutable=["intermediates"])
  out = state["intermediates"]["stage2_block0"]["__call__"][0]
  assert float(jnp.max(jnp.abs(out[..., 10]))) == 0.0


def test_bad_masks_are_refused_with_the_group_name():
  net = build("resnet20")
  variables = net.init(jax.random.key(0))
  x = jnp.zeros((1,) + net.input_shape)
  masks = net.spec.full_masks()
  bad = dict(masks, stem=jnp.ones((15,)))
  with pytest.raises(ValueError, match="'stem'.*shape"):
    net.apply(variables, x, bad)
  bad = dict(masks, stem=jnp.ones((16,), jnp.int32))
  with pytest.raises(ValueError, match="'stem'.*dtype"):
    net.apply(variables, x, bad)
  bad = dict(masks, stem=jnp.zeros((16,)))
  with pytest.raises(ValueError, match="every channel of group 'stem'"):
    net.apply(variables, x, bad)
  bad = dict(masks)
  del bad["stem"]
  with pytest.raises(ValueError, match="missing.*stem"):
    net.apply(variables, x, bad)
  with pytest.raises(ValueError, match="dict"):
    net.apply(variables, x, [1, 2])


def test_wrong_image_size_is_refused():
  net = build("resnet20")
  variables = net.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"input_shape=\.\.\."):
    net.apply(variables, jnp.zeros((1, 28, 28, 3)))
  with pytest.raises(ValueError, match="32, 32, 3"):
    net.apply(variables, jnp.zeros((28, 28, 3)))


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mobilenetv2",
                                  "resnet50"])
def test_cifar_models_run_on_digits_shape(name):
  net = models.get(name, num_classes=10, input_shape=(8, 8, 1))
  variables = jax.jit(net.init)(jax.random.key(0))
  logits = jax.jit(net.apply)(variables, jnp.ones((3, 8, 8, 1)),
                              net.spec.full_masks())
  assert logits.shape == (3, 10)
  assert bool(jnp.all(jnp.isfinite(logits)))


def test_train_mode_returns_updated_batch_stats():
  net = build("resnet20")
  variables = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4,) + net.input_shape)
  logits, stats = net.apply(variables, x, net.spec.full_masks(), train=True)
  assert logits.shape == (4, 10)
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(
      variables["batch_stats"])
  assert not np.allclose(stats["stem"]["bn"]["mean"],
                         variables["batch_stats"]["stem"]["bn"]["mean"])


def test_shapes_follow_input_shape():
  assert TEST_SHAPES  # keep the import meaningful
  a = models.get("resnet20", input_shape=(16, 16, 3)).spec
  b = models.get("resnet20").spec
  assert a.conv("stem").out_hw == (16, 16) and b.conv("stem").out_hw == (32, 32)


@pytest.mark.parametrize("model_name", ["resnet20", "mobilenetv2", "vgg16"])
def test_variable_shapes_are_what_init_returns(model_name):
  net = models.get(model_name)
  got = jax.tree.map(lambda a: (a.shape, a.dtype), net.variable_shapes)
  want = jax.tree.map(lambda a: (a.shape, a.dtype),
                      jax.eval_shape(net.init, jax.random.key(0)))
  assert got == want


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar_resnet_structure_and_cost_follow_the_closed_form(depth):
  """Every CIFAR ResNet (the deep ones are left out of the other tests'
  parametrizations): 3 stage streams of n = (depth - 2) / 6 blocks, a
  block-internal group per block, and MACs / params by hand (option-A
  shortcuts cost nothing)."""
  from legr_jax import cost  # pylint: disable=g-import-not-at-top
  net = build(f"resnet{depth}")
  spec = net.spec
  n = (depth - 2) // 6
  assert len(spec.layer_names) == 6 * n + 1
  sizes = sorted((g.size, len(g.members)) for g in spec.groups)
  streams = [s for s in sizes if s[1] > 1]
  assert streams == [(16, n + 1), (32, n), (64, n)]
  assert len(spec.groups) == 3 + 3 * n
  macs = params = 0
  hw, cin = 32 * 32, 3
  for stage, width in enumerate((16, 32, 64)):
    convs = [(cin, width)] if stage == 0 else []
    if stage:
      hw //= 4
    convs += [(cin if (stage and i == 0) else width, width)
              for i in range(2 * n)]
    cin = width
    for a, b in convs:
      macs += hw * 9 * a * b
      params += 9 * a * b + 2 * b          # kernel + BatchNorm scale, bias
  macs += 64 * 10
  params += 64 * 10 + 10
  assert cost.unpruned(spec, "flops") == macs
  assert cost.unpruned(spec, "params") == params
