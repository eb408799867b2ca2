"""BatchNorm whose batch statistics are cheap on XLA:CPU.

Same variables and the same maths as ``flax.linen.BatchNorm`` (params
'scale', 'bias'; batch_stats 'mean', 'var'; biased batch variance
E[x^2] - E[x]^2 clipped at 0, computed in float32 (float64 for float64
inputs); running averages
``momentum * old + (1 - momentum) * batch``), so checkpoints are
interchangeable. What differs is how the per-channel sums are taken.

Why: XLA:CPU rewrites a sum of an [N, H, W, C] tensor over (N, H, W) into a
windowed tree reduction that reads the tensor with stride C, a large share
of a training step's time (benchmarks/RESULTS.md). `column_sums` views the
tensor as [N * H, W * C] instead: a reduction over the major axis,
contiguous rows, then a small [W, C] fold. `batch_norm_train` has a custom
VJP so that the backward pass's two per-channel sums (of dy and of
dy * x_hat) take the same path instead of the reductions autodiff would
emit. With ``cpu_kernel`` (set by `legr_jax.cpu.ops` with
``channel_sums=True`` where the C++ kernels are available), the four sums
of float32 tensors are one-pass C++ kernels instead (`channel_sums`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from legr_jax.cpu import channel_sums


def column_sums(x: jax.Array) -> jax.Array:
  """Per-channel sums of ``x`` [..., W, C] over every axis but the last -> [C]
  float32 (float64 for float64 x). Rank >= 2."""
  x = x.astype(_acc_dtype(x))
  if x.ndim < 3:
    return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0)
  w, c = x.shape[-2], x.shape[-1]
  return jnp.sum(x.reshape(-1, w * c), axis=0).reshape(w, c).sum(axis=0)


def _acc_dtype(x):
  """float32, or float64 for float64 x (bfloat16 inputs: float32 stats)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _use_kernel(cpu_kernel: bool, dtype) -> bool:
  return cpu_kernel and dtype == jnp.float32


def _stats(xf, eps, cpu_kernel=False):
  if _use_kernel(cpu_kernel, xf.dtype):
    mean, var = channel_sums.moments(xf)
  else:
    n = xf.size // xf.shape[-1]
    mean = column_sums(xf) / n
    var = jnp.maximum(0.0, column_sums(xf * xf) / n - mean * mean)
  return mean, var, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, eps: float, cpu_kernel: bool = False):
  """Training-mode BatchNorm of ``x`` [..., C] with its own batch statistics.

  scale, bias: [C]. Returns ``(y, mean, var)``: y like x (dtype of x and
  scale combined), mean and biased var [C] float32 (float64 for float64
  x). Differentiable in x, scale and bias (mean and var included).
  ``cpu_kernel``: take the per-channel sums of float32 tensors with
  `channel_sums` (same values to float32 rounding; the kernels must be
  available, else RuntimeError).
  """
  return _forward(x, scale, bias, eps, cpu_kernel)[0]


def _forward(x, scale, bias, eps, cpu_kernel=False):
  xf = x.astype(_acc_dtype(x))
  mean, var, inv = _stats(xf, eps, cpu_kernel)
  out_dtype = jnp.result_type(x.dtype, scale.dtype)
  y = (xf - mean) * (inv * scale.astype(xf.dtype)) + bias.astype(xf.dtype)
  return (y.astype(out_dtype), mean, var), (x, mean, var, inv, scale, bias)


def _bwd(eps, cpu_kernel, res, cts):
  del eps
  x, mean, var, inv, scale, bias = res
  dy, dmean, dvar = cts
  xf = x.astype(_acc_dtype(x))
  dyf = dy.astype(xf.dtype)
  n = xf.size // xf.shape[-1]
  xhat = (xf - mean) * inv
  if _use_kernel(cpu_kernel, xf.dtype):
    g_bias, g_scale = channel_sums.centered_sums(dyf, xf, mean, inv)
  else:
    g_bias = column_sums(dyf)
    g_scale = column_sums(dyf * xhat)
  s = scale.astype(xf.dtype)
  # d var / d x is 0 where the variance was clipped at 0.
  dvar_total = jnp.where(var > 0, dvar, 0.0)
  dx = (s * inv / n) * (n * dyf - g_bias - xhat * g_scale)
  dx = dx + dmean / n + dvar_total * 2.0 * (xf - mean) / n
  return (dx.astype(x.dtype), g_scale.astype(scale.dtype),
          g_bias.astype(bias.dtype))


batch_norm_train.defvjp(_forward, _bwd)


class BatchNorm(nn.Module):
  """Drop-in for ``nn.BatchNorm`` over the last axis (see the module doc).

  use_running_average: eval mode (running statistics) when True.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None  # None: the output dtype follows x and the params
  cpu_kernel: bool = False  # one-pass C++ sums (`channel_sums`) on CPU

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if self.use_running_average:
      out_dtype = jnp.result_type(x.dtype, scale.dtype)
      xf = x.astype(jnp.float32)
      mul = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale.astype(
          jnp.float32)
      y = (xf - ra_mean.value) * mul + bias.astype(jnp.float32)
      return y.astype(self.dtype or out_dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon,
                                    self.cpu_kernel)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
      ra_var.value = m * ra_var.value + (1.0 - m) * var
    return y.astype(self.dtype or y.dtype)
