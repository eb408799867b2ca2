"""legr_jax.cpu.direct_conv: the C++ 3x3 conv kernel equals XLA's
convolution in values and both gradients, over shapes that exercise its
channel blocks, stacked-image chunks and thread split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kernel_support import require_kernels
from legr_jax.cpu import direct_conv, kernels

DN = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def _kernels():
  """Skipped without a C++ compiler or off x86-64; a build failure on
  x86-64 with a compiler fails (kernel_support.require_kernels)."""
  require_kernels()


def _ref(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=DN)


def _loss(f):
  return lambda x, k: jnp.sum(jnp.sin(f(x, k) / 8))


@pytest.mark.parametrize("n,h,w,cin,cout", [
    (3, 32, 32, 16, 16),   # ResNet stage 1, full width
    (2, 32, 32, 16, 2),    # narrow output: a partial channel block
    (37, 8, 8, 64, 46),    # several stacked-image chunks, odd batch
    (4, 16, 16, 31, 32),
    (5, 2, 9, 7, 13),      # non-square, H < kernel
    (1, 1, 1, 1, 1),       # every tap but the centre is padding
    (2, 3, 40, 3, 7),      # rows wider than 2 vectors
])
def test_values_and_gradients_equal_xla(n, h, w, cin, cout):
  assert kernels.available()
  rng = np.random.default_rng(n * 1000 + cin * 10 + cout)
  x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
  y = jax.jit(direct_conv.conv3x3)(x, k)
  scale = float(np.sqrt(9 * cin))
  np.testing.assert_allclose(y, _ref(x, k), rtol=1e-5, atol=1e-5 * scale)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  gx, gk = jax.jit(lambda x, k, g: jax.vjp(direct_conv.conv3x3, x, k)[1](g))(
      x, k, g)
  rx, rk = jax.vjp(_ref, x, k)[1](g)
  cscale = float(np.sqrt(9 * cout))
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * cscale)
  # the kernel gradient sums over every pixel of every image
  np.testing.assert_allclose(gk, rk, rtol=1e-5,
                             atol=1e-5 * np.sqrt(n * h * w))


def test_results_are_deterministic_and_vmap_works():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 6, 16, 16, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 8, 5)), jnp.float32)
  grad = jax.jit(jax.vmap(jax.grad(_loss(direct_conv.conv3x3),
                                   argnums=(0, 1))))
  a, b = grad(x, k), grad(x, k)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  for i in range(3):
    rx, rk = jax.grad(_loss(_ref), argnums=(0, 1))(x[i], k[i])
    np.testing.assert_allclose(a[0][i], rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a[1][i], rk, rtol=1e-4, atol=1e-3)


def test_applies_only_to_3x3_stride_1_padding_1_float32():
  x = jnp.zeros((1, 8, 8, 4))
  k = jnp.zeros((3, 3, 4, 4))
  same = ((1, 1), (1, 1))
  assert direct_conv.applies(x, k, (1, 1), same)
  assert not direct_conv.applies(x, k, (2, 2), same)
  assert not direct_conv.applies(x, k, (1, 1), ((0, 0), (0, 0)))
  assert not direct_conv.applies(x, jnp.zeros((5, 5, 4, 4)), (1, 1),
                                 ((2, 2), (2, 2)))
  assert not direct_conv.applies(x.astype(jnp.bfloat16),
                                 k.astype(jnp.bfloat16), (1, 1), same)


def test_build_is_cached_and_failures_are_reported(tmp_path, monkeypatch):
  monkeypatch.setenv("LEGR_KERNEL_CACHE", str(tmp_path / "cache"))
  path = kernels.build()
  assert path.parent == tmp_path / "cache" and path.exists()
  mtime = path.stat().st_mtime_ns
  assert kernels.build() == path and path.stat().st_mtime_ns == mtime
  # a compiler that fails: a clear error, nothing half-written in the cache
  bad = tmp_path / "bad-cxx"
  bad.write_text("#!/bin/sh\necho 'cc: fatal error: out of cheese' >&2\n"
                 "exit 1\n")
  bad.chmod(0o755)
  monkeypatch.setenv("LEGR_KERNEL_CACHE", str(tmp_path / "other"))
  with pytest.raises(RuntimeError, match="out of cheese"):
    kernels.build(str(bad))
  assert list((tmp_path / "other").iterdir()) == []
