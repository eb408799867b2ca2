"""legr_jax.cpu.channel_sums: the one-pass C++ per-channel sums equal a
float64 computation (at least as closely as XLA's float32 reductions), and
BatchNorm through them equals BatchNorm through XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_support import require_kernels
from legr_jax.cpu import batchnorm, channel_sums


@pytest.fixture(autouse=True)
def _kernels():
  """Skipped without a C++ compiler or off x86-64; a build failure on
  x86-64 with a compiler fails (kernel_support.require_kernels)."""
  require_kernels()

SHAPES = [
    (128, 32, 32, 2),   # a pruned stage-1 BatchNorm: 4096 rows of 64 lanes
    (37, 8, 8, 64),     # rows not a multiple of the 32-row block
    (5, 3, 7, 1),       # one channel
    (16, 10),           # rank 2: a row is one sample
    (3, 5),             # fewer rows than one block, fewer than the threads
]


def _data(shape, seed, offset=3.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * 0.5 + offset).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_moments_match_float64(shape):
  x = _data(shape, sum(shape))
  mean, var = jax.jit(channel_sums.moments)(x)
  x64 = x.astype(np.float64).reshape(-1, shape[-1])
  ref_mean, ref_var = x64.mean(0), x64.var(0)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
  # E[x^2] - E[x]^2 with a mean 6 stds from 0 cancels ~36x; finished in
  # double, the variance is still float32-exact, where XLA's float32
  # reductions lose ~4 digits on the large shapes
  np.testing.assert_allclose(var, ref_var, rtol=1e-5)
  xla = jax.jit(lambda t: batchnorm._stats(t, 0.0))(x)
  assert (np.max(np.abs(var - ref_var) / ref_var)
          <= np.max(np.abs(xla[1] - ref_var) / ref_var) + 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_centered_sums_match_float64(shape):
  x, dy = _data(shape, 1), _data(shape, 2, offset=0.2)
  c = shape[-1]
  mean = np.linspace(2.5, 3.5, c).astype(np.float32)
  inv = np.linspace(0.5, 2.0, c).astype(np.float32)
  s_dy, s_dyx = jax.jit(channel_sums.centered_sums)(dy, x, mean, inv)
  d64, x64 = (a.astype(np.float64).reshape(-1, c) for a in (dy, x))
  ref_dyx = (d64 * (x64 - mean) * inv).sum(0)
  np.testing.assert_allclose(s_dy, d64.sum(0), rtol=1e-6)
  np.testing.assert_allclose(s_dyx, ref_dyx, rtol=1e-5,
                             atol=1e-6 * np.abs(d64 * x64).sum(0).max())


def test_vmap_sums_each_member_on_its_own():
  x = _data((3, 4, 6, 6, 5), 0)
  mean, var = jax.jit(jax.vmap(channel_sums.moments))(x)
  for i in range(3):
    m, v = channel_sums.moments(x[i])
    np.testing.assert_array_equal(mean[i], m)
    np.testing.assert_array_equal(var[i], v)


def test_bad_shapes_raise():
  with pytest.raises(Exception, match="centered sums"):
    jax.block_until_ready(channel_sums.centered_sums(
        jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones(2), jnp.ones(3)))


@pytest.mark.parametrize("shape", [(16, 8, 8, 5), (12, 3)])
def test_batch_norm_with_kernel_equals_without(shape):
  """Values, batch statistics and all three gradients, kernel vs XLA; the
  kernel's targets are in the compiled program."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=shape) * 2 + 1, jnp.float32)
  w = jnp.asarray(rng.normal(size=shape), jnp.float32)
  c = shape[-1]
  scale, bias = jnp.linspace(0.5, 2.0, c), jnp.linspace(-1.0, 1.0, c)

  def loss(x, scale, bias, kernel):
    y, mean, var = batchnorm.batch_norm_train(x, scale, bias, 1e-5, kernel)
    return jnp.sum(jnp.sin(y) * w) + jnp.sum(mean ** 3) + jnp.sum(var ** 2)

  outs = {}
  for kernel in (False, True):
    f = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=3)
    outs[kernel] = f(x, scale, bias, kernel)
    hlo = f.lower(x, scale, bias, kernel).as_text()
    assert ("legr_channel_moments" in hlo) == kernel
    assert ("legr_centered_sums" in hlo) == kernel
  for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
