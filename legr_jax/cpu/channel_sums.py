"""BatchNorm's per-channel sums in one pass on XLA:CPU (C++ behind XLA FFI).

Why: a training-mode BatchNorm needs two per-channel sums in the forward
pass (of x and x^2) and two in the backward pass (of dy and dy * x_hat).
XLA:CPU materializes the products and reduces them with windowed tree
reductions (`batchnorm.column_sums`), several passes over a tensor that one
pass can sum (figures: benchmarks/RESULTS.md).

How (`csrc/channel_sums.cc`): the tensor [..., W, C] is read once as rows
of W * C floats, summed lane by lane in float over blocks of 32 rows and in
double across blocks, split over XLA's intra-op threads, and the lanes of a
channel folded at the end; the moments are finished in double. So the
results are at least as accurate as XLA's float32 reductions.

Where: `batchnorm.batch_norm_train(..., cpu_kernel=True)`, which
`legr_jax.cpu.ops` selects (``channel_sums=True``, the default) where the
C++ kernels are available (`kernels.available`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from legr_jax.cpu import kernels

_MOMENTS = "legr_channel_moments"
_CENTERED = "legr_centered_sums"


def moments(x):
  """Per-channel mean and biased variance (>= 0) of float32 ``x`` [..., C]
  over every axis but the last -> (mean [C], var [C]) float32. Not
  differentiable (`batchnorm.batch_norm_train` is)."""
  kernels.require("channel sums")
  c = x.shape[-1]
  out = jax.ffi.ffi_call(_MOMENTS, jax.ShapeDtypeStruct((2, c), jnp.float32),
                         vmap_method="sequential")(x)
  return out[0], out[1]


def centered_sums(dy, x, mean, inv):
  """``(sum dy, sum dy * (x - mean) * inv)`` per channel over every axis but
  the last of float32 ``dy``, ``x`` [..., C] with ``mean``, ``inv`` [C] ->
  two [C] float32 arrays (BatchNorm's bias and scale gradients)."""
  kernels.require("channel sums")
  c = x.shape[-1]
  out = jax.ffi.ffi_call(_CENTERED, jax.ShapeDtypeStruct((2, c), jnp.float32),
                         vmap_method="sequential")(
                             dy, x, mean.astype(jnp.float32),
                             inv.astype(jnp.float32))
  return out[0], out[1]
