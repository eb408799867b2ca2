"""legr_jax.cpu.batchnorm equals flax's BatchNorm: values, running
statistics and gradients (its custom VJP against autodiff of flax's)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from legr_jax.cpu import batchnorm


@pytest.mark.parametrize("shape", [(8, 6, 5, 7), (16, 3), (4, 4, 4, 1)])
@pytest.mark.parametrize("train", [True, False])
def test_values_statistics_and_gradients_equal_flax(shape, train):
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)
  c = shape[-1]
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  params = {"scale": jnp.linspace(0.5, 2.0, c), "bias": jnp.linspace(-1, 1, c)}
  stats = {"mean": jnp.linspace(0, 1, c), "var": jnp.linspace(1, 2, c)}
  ours = batchnorm.BatchNorm(use_running_average=not train)
  ref = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=1e-5)
  shapes = lambda t: jax.tree.map(jnp.shape, t)  # noqa: E731
  assert shapes(ours.init(jax.random.key(0), x)) == shapes(
      ref.init(jax.random.key(0), x))

  def loss(module, p, x):
    y, upd = module.apply({"params": p, "batch_stats": stats}, x,
                          mutable=["batch_stats"])
    # the new running statistics enter the loss too, so their (custom)
    # gradient paths are checked
    s = upd["batch_stats"]
    return (jnp.sum(jnp.sin(y) * weights) + jnp.sum(s["var"] ** 2)
            + jnp.sum(s["mean"] ** 3)), (y, s)

  (l1, (y1, s1)), g1 = jax.jit(jax.value_and_grad(
      lambda p, x: loss(ours, p, x), (0, 1), has_aux=True))(params, x)
  (l2, (y2, s2)), g2 = jax.value_and_grad(
      lambda p, x: loss(ref, p, x), (0, 1), has_aux=True)(params, x)
  np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((s1, g1)), jax.tree.leaves((s2, g2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_column_sums_equal_jnp_sum():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7, 3, 4)),
                  jnp.float32)
  np.testing.assert_allclose(batchnorm.column_sums(x), x.sum((0, 1, 2)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batchnorm.column_sums(x[0, 0]), x[0, 0].sum(0),
                             rtol=1e-6)


def test_bfloat16_inputs_keep_float32_statistics():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4, 4, 3)),
                  jnp.bfloat16)
  bn = batchnorm.BatchNorm()
  v = bn.init(jax.random.key(0), x)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v["params"])
  y, upd = bn.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                    mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert upd["batch_stats"]["var"].dtype == jnp.float32
  ref = (x.astype(jnp.float32) - x.astype(jnp.float32).mean((0, 1, 2))) / (
      jnp.sqrt(x.astype(jnp.float32).var((0, 1, 2)) + 1e-5))
  np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=0.05)


def test_vmapped_over_candidates_like_the_masked_backend():
  xs = jnp.asarray(np.random.default_rng(2).normal(size=(3, 6, 4, 4, 5)),
                   jnp.float32)
  scale, bias = jnp.ones((5,)), jnp.zeros((5,))

  def f(x):
    return jnp.sum(batchnorm.batch_norm_train(x, scale, bias, 1e-5)[0] ** 3)
  g = jax.vmap(jax.grad(f))(xs)
  for i in range(3):
    np.testing.assert_allclose(g[i], jax.grad(f)(xs[i]), rtol=1e-5, atol=1e-5)
