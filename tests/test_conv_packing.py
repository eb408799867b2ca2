"""Output packing (legr_jax.cpu.conv_packing) changes the compute layout
only: outputs and gradients equal XLA's ordinary convolution. Tests of the
packing itself leave `direct_conv` off (it would take the 3x3 stride-1
convs); the network-level tests run both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build, perturbed_variables, random_masks
from jax import lax

from legr_jax import cpu, ops, surgery
from legr_jax.cpu import conv_packing

DN = ("NHWC", "HWIO", "NHWC")


def _cpu_ops(lanes: int, direct: bool):
  """The CPU ops with packing to ``lanes`` and the C++ kernels or none."""
  if direct:
    from kernel_support import require_kernels  # pylint: disable=g-import-not-at-top
    require_kernels()
  return cpu.ops(use_kernels="required" if direct else "never", lanes=lanes)


@pytest.mark.parametrize("cin,cout,hw,k,stride,pad", [
    (16, 4, 32, 3, 1, 1), (16, 8, 32, 3, 1, 1), (4, 1, 16, 3, 1, 1),
    (8, 3, 14, 3, 2, 1), (16, 2, 32, 5, 1, 2), (3, 6, 12, 3, 1, 1),
    (6, 5, 9, 3, 2, 1), (16, 4, 16, 3, 1, 0), (8, 2, 10, 3, 2, 0)])
def test_packed_conv_equals_lax_conv_values_and_gradients(cin, cout, hw, k,
                                                          stride, pad):
  rng = np.random.default_rng(cin * 100 + cout)
  x = jnp.asarray(rng.normal(size=(3, hw, hw + 2, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
  args = ((stride, stride), ((pad, pad), (pad, pad)))
  ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, *args, dimension_numbers=DN)
  packed = lambda x, w: conv_packing.conv_general_dilated(  # noqa: E731
      x, w, *args, dimension_numbers=DN, lanes=16)
  w_out = (hw + 2 + 2 * pad - k) // stride + 1
  factor = conv_packing.packing_factor(cin, cout, w_out, k, 16)
  # the cases above are chosen so packing really happens where it can
  assert factor > 1 or w_out % 2 == 1
  np.testing.assert_allclose(packed(x, w), ref(x, w), rtol=1e-5, atol=1e-4)
  # the packed conv really is a different program (stride P along W)
  if factor > 1:
    text = str(jax.make_jaxpr(packed)(x, w))
    assert f"window_strides=({stride}, {stride * factor})" in text
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  gx, gw = jax.grad(loss(packed), argnums=(0, 1))(x, w)
  rx, rw = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(gw, rw, rtol=1e-4, atol=1e-3)


def test_packing_factor_rule():
  pf = conv_packing.packing_factor
  assert pf(16, 4, 32, 3, 16) == 4       # 4 pixels x 4 channels = 16 lanes
  assert pf(16, 8, 32, 3, 16) == 2
  assert pf(16, 2, 32, 3, 16) == 4       # at most 4
  assert pf(16, 16, 32, 3, 32) == 2      # 32 lanes (XLA:CPU without YNN)
  assert pf(16, 3, 32, 3, 16) == 4       # 12 of 16 lanes beats 3 of 16
  assert pf(16, 9, 32, 3, 16) == 1       # no power of two fits
  assert pf(16, 4, 6, 3, 16) == 2        # must divide the output width
  assert pf(16, 4, 32, 1, 16) == 1       # 1x1: packing only adds MACs
  assert pf(32, 4, 32, 3, 16) == 1       # wide inputs: not on that path
  assert pf(16, 4, 32, 3, 0) == 1        # off


def test_unsupported_convs_pass_through_unchanged():
  x = jnp.ones((1, 8, 8, 4))
  w = jnp.ones((3, 3, 1, 4))  # depthwise: feature groups
  out = conv_packing.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN,
      feature_group_count=4, lanes=16)
  text = str(jax.make_jaxpr(lambda x, w: conv_packing.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=DN, feature_group_count=4,
      lanes=16))(x, w))
  assert "window_strides=(1, 1)" in text
  np.testing.assert_allclose(out, lax.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN,
      feature_group_count=4))


def _logits(net, variables, x, lanes, train=False):
  net = net.with_ops(_cpu_ops(lanes, direct=False) if lanes else ops.XLA)
  fn = jax.jit(lambda v, x: net.apply(v, x, train=train))
  return fn(variables, x)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["resnet20", "vgg16", "mobilenetv2"])
def test_sliced_networks_give_the_same_logits_packed_or_not(model_name):
  """The pruned networks are where packing happens (narrow convs); every
  model with every fast path on: tests/test_ops.py."""
  net = build(model_name)
  variables = perturbed_variables(net, 3)
  masks = random_masks(net.spec, 7, keep_prob=0.3)
  small, small_vars = surgery.slice_network(net, variables, masks)
  x = jax.random.normal(jax.random.key(1), (2,) + net.input_shape)
  np.testing.assert_allclose(_logits(small, small_vars, x, 16),
                             _logits(small, small_vars, x, 0),
                             rtol=1e-4, atol=1e-4)


def _conv_strides(fn, *args):
  text = str(jax.make_jaxpr(fn)(*args))
  return [line.split("window_strides=")[1].split(")")[0]
          for line in text.split("conv_general_dilated")[1:]]


def _max_rel_err(a, b):
  return max(float(np.max(np.abs(np.asarray(u, np.float64) - w))
                   / (np.max(np.abs(w)) + 1e-30))
             for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.parametrize("direct", [False, True])
def test_network_gradients_are_the_same_packed_or_not(direct):
  """Gradients of a sliced network with the CPU fast paths (packing, and the
  direct kernel or not) vs XLA's plain convs. The reference is float64: in
  training mode a narrow BatchNorm over few images makes the gradients
  ill-conditioned: over 4 images either float32 path could be off by ~7%
  (on an AVX2 machine the packed path was, XLA's was not), so the batch is
  16 images and the fast path must be at least as close as XLA's."""
  fast_ops = _cpu_ops(16, direct)
  net = build("resnet20")
  variables = perturbed_variables(net, 3)
  masks = random_masks(net.spec, 7, keep_prob=0.3)
  small, small_vars = surgery.slice_network(net, variables, masks)
  x = jax.random.normal(jax.random.key(1), (16,) + net.input_shape)
  current = {"net": small}

  def loss(v, x, train):
    out = current["net"].apply(v, x, train=train)
    return jnp.mean((out[0] if train else out) ** 2)
  grad = jax.jit(jax.grad(loss), static_argnums=2)
  for train in (False, True):
    current["net"] = small.with_ops(fast_ops)
    grad = jax.jit(jax.grad(loss), static_argnums=2)
    packed_strides = _conv_strides(jax.grad(lambda v: loss(v, x, train)),
                                   small_vars)
    g16 = grad(small_vars, x, train)
    fast_hlo = jax.jit(jax.grad(lambda v: loss(v, x, train))).lower(
        small_vars).as_text()
    # the same BatchNorm, XLA's plain convs
    current["net"] = small.with_ops(_cpu_ops(0, direct=False))
    grad = jax.jit(jax.grad(loss), static_argnums=2)
    plain_strides = _conv_strides(jax.grad(lambda v: loss(v, x, train)),
                                  small_vars)
    g0 = grad(small_vars, x, train)
    with jax.enable_x64(True):
      g64 = jax.jit(jax.grad(loss), static_argnums=2)(
          jax.tree.map(lambda a: np.asarray(a, np.float64), small_vars),
          np.asarray(x, np.float64), train)
      g64 = jax.tree.map(np.asarray, g64)
    if direct:   # every 3x3 stride-1 conv is the direct kernel's
      assert "legr_direct_conv3x3_kernel_grad" in fast_hlo
      assert "legr_direct_conv3x3_forward" in fast_hlo
    else:
      assert any(s.endswith(("2", "4", "8")) and not s.startswith("(2, 2")
                 for s in packed_strides), packed_strides
    assert all(s in ("(1, 1", "(2, 2") for s in plain_strides), plain_strides
    assert _max_rel_err(g16, g64) <= max(1e-3, 1.5 * _max_rel_err(g0, g64))


@pytest.mark.parametrize("cin,cout,hw,k,stride,pad,lanes", [
    (16, 4, 32, 3, 1, 1, 16), (4, 16, 32, 3, 1, 1, 32),
    (16, 16, 16, 3, 1, 1, 32), (16, 2, 32, 5, 1, 2, 16),
    (8, 3, 14, 3, 2, 1, 16), (16, 4, 16, 3, 1, 0, 16),
    (6, 5, 9, 3, 1, 1, 16), (8, 4, 8, 1, 1, 0, 16)])
def test_training_conv_packs_forward_and_input_gradient(cin, cout, hw, k,
                                                        stride, pad, lanes):
  """`train_conv_fn`: same values and gradients as XLA's convolution; the
  forward conv and (stride 1) the input-gradient conv are packed."""
  rng = np.random.default_rng(cin * 100 + cout + k)
  x = jnp.asarray(rng.normal(size=(3, hw, hw + 2, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
  args = ((stride, stride), ((pad, pad), (pad, pad)))
  ref = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, *args, dimension_numbers=DN)
  conv = conv_packing.train_conv_fn(lanes)
  train = lambda x, w: conv(x, w, *args, dimension_numbers=DN)  # noqa: E731
  np.testing.assert_allclose(train(x, w), ref(x, w), rtol=1e-5, atol=1e-4)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
  gx, gw = jax.grad(loss(train), argnums=(0, 1))(x, w)
  rx, rw = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(gw, rw, rtol=1e-4, atol=1e-3)
  # which convs the gradient program runs: packed ones have a W stride P > s
  w_out = (hw + 2 + 2 * pad - k) // stride + 1
  fwd_p = conv_packing.packing_factor(cin, cout, w_out, k, lanes)
  dx_p = (conv_packing.packing_factor(cout, cin, hw + 2, k, lanes)
          if stride == 1 else 1)
  strides = _conv_strides(jax.grad(loss(train), argnums=(0, 1)), x, w)
  hw_strides = [tuple(int(v) for v in s.strip("(").split(", "))
                for s in strides]
  packed = sorted(sw // sh for sh, sw in hw_strides if sw != sh)
  assert packed == sorted(p for p in (fwd_p, dx_p) if p > 1), strides
  assert fwd_p > 1 or dx_p > 1 or k == 1 or w_out % 2 == 1
