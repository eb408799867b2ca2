"""Cost model vs independent counts: hand arithmetic, the traced sliced
network's own ops, and XLA's cost analysis of that network."""

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build, random_masks
from legr_jax import cost, models, ops, surgery


def test_resnet56_reference_figures():
  spec = models.get("resnet56").spec
  # LeGR reference: 125.49 M MACs, 0.85 M parameters on 32x32 inputs.
  macs = cost.unpruned(spec, "flops")
  # by hand: stem + 3 stages of 18 3x3 convs + the classifier weights
  by_hand = (32 * 32 * 9 * 3 * 16 + 18 * 32 * 32 * 9 * 16 * 16 +
             16 * 16 * 9 * (16 * 32 + 17 * 32 * 32) +
             8 * 8 * 9 * (32 * 64 + 17 * 64 * 64) + 64 * 10)
  assert macs == by_hand
  assert round(macs / 1e6, 2) == 125.49
  assert round(cost.unpruned(spec, "params") / 1e6, 2) == 0.85


def test_unpruned_matches_full_masks_and_none(model_name):
  spec = build(model_name).spec
  full = cost.unpruned(spec, "flops")
  np.testing.assert_allclose(float(cost.flops(spec)), full, rtol=1e-6)
  np.testing.assert_allclose(float(cost.flops(spec, spec.full_masks())), full,
                             rtol=1e-6)


def _conv_and_dot_macs_from_jaxpr(fn, *args):
  """MACs of every conv / dot in the traced program, from operand shapes."""
  total = 0

  def walk(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)
      if eqn.primitive.name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape  # NHWC
        kh, kw, cin_g, cout = eqn.invars[1].aval.shape  # HWIO
        total += out[0] * out[1] * out[2] * kh * kw * cin_g * cout
      elif eqn.primitive.name == "dot_general":
        a, b = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        total += int(np.prod(a)) * b[-1]
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return total


def _xla_conv_flops_same_convention(fn, *args):
  """XLA's flop count of each conv / dot in ``fn``, compiled on its own.

  XLA skips the taps that fall on zero padding; compiling the conv with VALID
  padding on an input that already has the padded shape makes XLA count every
  tap, which is the convention of the cost model (h * w * k * k * cin * cout
  per conv).
  """
  total = 0.0
  cache = {}

  def xla_flops(f, *shapes):
    ca = jax.jit(f).lower(*[jax.ShapeDtypeStruct(s, jnp.float32)
                             for s in shapes]).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return ca["flops"]

  def walk(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      for sub in jax_core.jaxprs_in_params(eqn.params):
        walk(sub)
      name = eqn.primitive.name
      if name not in ("conv_general_dilated", "dot_general"):
        continue
      shapes = tuple(v.aval.shape for v in eqn.invars)
      key = (name, shapes, str(eqn.params))
      if key not in cache:
        params = dict(eqn.params)
        if name == "conv_general_dilated":
          pad = params.pop("padding")
          params["padding"] = ((0, 0), (0, 0))
          n, h, w, c = shapes[0]
          shapes = ((n, h + sum(pad[0]), w + sum(pad[1]), c), shapes[1])

          def f(x, w, params=params):
            return jax.lax.conv_general_dilated_p.bind(x, w, **params)
        else:
          def f(a, b, params=params):
            return jax.lax.dot_general_p.bind(a, b, **params)
        cache[key] = xla_flops(f, *shapes)
      total += cache[key]
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return total


def test_cost_model_matches_sliced_network_and_xla(model_name):
  seed = sum(map(ord, model_name))
  net = build(model_name)
  variables = net.init(jax.random.key(0))
  masks = random_masks(net.spec, seed)
  small, small_vars = surgery.slice_network(net, variables, masks)
  assert small.ops == ops.XLA  # the logical convs (packing adds zero taps)
  x = jnp.zeros((1,) + net.input_shape)
  fn = lambda v, x: small.apply(v, x)  # noqa: E731
  ours = float(cost.flops(net.spec, masks))
  # 1) exact: the sliced network's traced convs and dots, from their shapes
  assert _conv_and_dot_macs_from_jaxpr(fn, small_vars, x) == pytest.approx(
      ours, rel=1e-6)
  # 2) XLA's own count (2 flops per MAC, same padding convention)
  xla = _xla_conv_flops_same_convention(fn, small_vars, x)
  assert xla == pytest.approx(2 * ours, rel=0.02)
  # 3) XLA on the whole sliced program: at least the conv work (XLA skips
  # padding taps, so allow that), plus elementwise ops of order of the
  # activation count.
  ca = jax.jit(fn).lower(small_vars, x).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  acts = sum(c.out_hw[0] * c.out_hw[1] * c.out_channels
             for c in small.spec.convs)
  assert ca["flops"] <= 2 * ours + 16 * acts
  # params: the sliced network's actual parameter count
  n_params = sum(int(np.prod(p.shape))
                 for p in jax.tree_util.tree_leaves(small_vars["params"]))
  assert float(cost.params(net.spec, masks)) == pytest.approx(n_params,
                                                              rel=1e-6)


def test_cost_is_jittable_vmappable_and_soft(model_name):
  spec = build(model_name).spec
  rng = np.random.default_rng(0)
  pop = {g.name: jnp.asarray(rng.random((5, g.size)), jnp.float32)
         for g in spec.groups}
  batched = jax.jit(jax.vmap(lambda m: cost.flops(spec, m)))(pop)
  for i in range(5):
    one = {k: v[i] for k, v in pop.items()}
    # soft masks: the independent formula with fractional widths
    widths = {g.name: float(np.sum(np.asarray(one[g.name], np.float64)))
              for g in spec.groups}
    expect = 0.0
    for c in spec.convs:
      hw = c.out_hw[0] * c.out_hw[1] * c.kernel[0] * c.kernel[1]
      cin = c.in_channels if c.in_group is None else widths[c.in_group]
      expect += hw * (widths[c.out_group] if c.depthwise else
                      cin * widths[c.out_group])
    expect += widths[spec.dense.in_group] * spec.dense.out_features
    assert float(batched[i]) == pytest.approx(expect, rel=1e-5)
  grads = jax.grad(lambda m: cost.params(spec, m))(
      {k: v[0] for k, v in pop.items()})
  assert all(bool(jnp.all(g > 0)) for g in jax.tree_util.tree_leaves(grads))
