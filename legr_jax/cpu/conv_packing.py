"""Output packing: fast convolutions with few output channels on XLA:CPU.

Why: XLA:CPU's convolution kernels fill SIMD vectors along the output
channels, so a pruned network's narrow convs (4, 6, 8 of 16 channels) take
about as long as full-width ones (figures: benchmarks/RESULTS.md).

Packing computes ``P`` horizontally adjacent output pixels as ``P * C_out``
channels of one conv with stride ``P`` along the width and a kernel ``P - 1``
columns wider (zeros where a pixel does not see a tap). Its output
``[N, H, W / P, P * C_out]`` is, in memory, exactly ``[N, H, W, C_out]``, so
unpacking is a free reshape (strided convs likewise, with a stride ``s * P``
and a kernel ``s * (P - 1)`` columns wider). The result equals the ordinary
convolution up to float summation order; it costs ``(s * (P - 1) + kw) /
kw`` times the MACs but fills the vectors.

`conv_fn` and `train_conv_fn` choose per conv: `direct_conv` (a C++ kernel
vectorized along the image rows) where it applies and is faster, otherwise
packing to ``lanes`` (`legr_jax.cpu.packing_lanes`: 0, off, except on
AVX-512).

Only the compute layout changes: parameters, outputs and gradients are those
of the ordinary convolution. FLOPs accounting (`legr_jax.cost`) counts the
logical convolution.

Training (`train_conv_fn`, the ``train_conv`` of `legr_jax.cpu.ops`) has its
own VJP: the forward conv and, for stride 1, the input gradient (itself a
stride-1 conv of the output gradient with the flipped kernel) are packed;
the kernel gradient is XLA's own (differentiating the packed forward, or
packing the kernel gradient, measured slower: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from legr_jax.cpu import direct_conv

_NHWC = ("NHWC", "HWIO", "NHWC")


def packing_factor(in_channels: int, out_channels: int, width: int,
                   kernel_width: int, lanes: int) -> int:
  """Pixels packed per conv output position (1: no packing).

  The largest power of two ``P <= 4`` with ``P * out_channels <= lanes``
  that divides the output ``width`` (8 was not clearly better); 1 when
  ``lanes`` is 0, the kernel is 1 wide (packing a 1x1 conv only multiplies
  its MACs), ``in_channels > lanes`` (XLA:CPU then hands the conv to a
  library that does not gain from packing; measured slower:
  benchmarks/RESULTS.md) or no ``P > 1`` fits.
  """
  if lanes <= 0 or kernel_width <= 1 or in_channels > lanes:
    return 1
  p = 1
  while p < 4 and 2 * p * out_channels <= lanes and width % (2 * p) == 0:
    p *= 2
  return p


def pack_kernel(kernel, factor: int, stride: int = 1):
  """``[kh, kw, I, O] -> [kh, kw + stride * (factor - 1), I, factor * O]``:
  column ``t`` of the kernel lands at column ``stride * p + t`` of output
  block ``p`` (the conv's stride along the width is ``stride``)."""
  kh, kw, cin, cout = kernel.shape
  extra = stride * (factor - 1)
  blocks = [jnp.pad(kernel, ((0, 0), (stride * p, extra - stride * p),
                             (0, 0), (0, 0)))
            for p in range(factor)]
  return jnp.stack(blocks, axis=3).reshape(kh, kw + extra, cin,
                                           factor * cout)


def _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
           dimension_numbers, feature_group_count, precision, **kwargs):
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)


def _packable_layout(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count) -> bool:
  """2-D NHWC/HWIO, no dilation, no feature groups, explicit padding."""
  if lhs.ndim != 4 or feature_group_count != 1 or isinstance(padding, str):
    return False
  if any(d not in (None, 1) for d in (lhs_dilation or ()) + (
      rhs_dilation or ())):
    return False
  return lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers) == lax.conv_dimension_numbers(
          lhs.shape, rhs.shape, _NHWC)


def conv_general_dilated(lhs, rhs, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1,
                         precision=None, *, lanes: int, **kwargs):
  """`lax.conv_general_dilated` with output packing where it applies: 2-D
  NHWC/HWIO, no dilation, no feature groups, explicit padding; anything else
  is passed through unchanged."""
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, precision)
  if (not _packable_layout(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count)
      or kwargs.get("batch_group_count", 1) != 1):
    return _plain(*args, **kwargs)
  n, _, w, _ = lhs.shape
  _, kw, cin, cout = rhs.shape
  sh, sw = window_strides
  (pt, pb), (pl, pr) = padding
  if min(pt, pb, pl, pr) < 0 or w + pl + pr < kw:
    return _plain(*args, **kwargs)
  w_out = (w + pl + pr - kw) // sw + 1
  factor = packing_factor(cin, cout, w_out, kw, lanes)
  if factor == 1:
    return _plain(*args, **kwargs)
  y = lax.conv_general_dilated(
      lhs, pack_kernel(rhs, factor, sw), (sh, sw * factor),
      ((pt, pb), (pl, pr)), dimension_numbers=_NHWC, precision=precision,
      **kwargs)
  return y.reshape(n, y.shape[1], w_out, cout)


def _direct_first(packed):
  """``packed`` (a `conv_general_dilated` variant), except that the convs
  `direct_conv` computes (3x3, stride 1, padding 1, float32) faster go
  there (the caller checked that the kernels are available)."""

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
           precision=None, **kwargs):
    if (precision is None and not kwargs
        and _packable_layout(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                             dimension_numbers, feature_group_count)
        and direct_conv.applies(lhs, rhs, window_strides, padding)
        and direct_conv.faster_than_xla("forward", lhs.shape[1] * lhs.shape[2],
                                        rhs.shape[2], rhs.shape[3])):
      return direct_conv.conv3x3(lhs, rhs)
    return packed(lhs, rhs, window_strides, padding, lhs_dilation,
                  rhs_dilation, dimension_numbers, feature_group_count,
                  precision, **kwargs)

  return conv


@functools.lru_cache(maxsize=None)
def conv_fn(lanes: int, direct: bool = False):
  """A drop-in for `lax.conv_general_dilated` for XLA:CPU: `direct_conv`'s
  kernel where it applies and is faster (``direct``: the kernels are
  available), else output packing to ``lanes`` (0: none). None when neither
  is on: XLA's ordinary convolution everywhere."""
  if lanes <= 0 and not direct:
    return None
  packed = functools.partial(conv_general_dilated, lanes=max(0, lanes))
  return _direct_first(packed) if direct else packed


# --- training: packed forward and input gradient, XLA's kernel gradient ------


def _dgrad_padding(kernel_shape, padding):
  kh, kw = kernel_shape[:2]
  (pt, pb), (pl, pr) = padding
  return ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))


def _direct_parts(lhs, rhs, window_strides, padding,
                  direct: bool) -> tuple[bool, ...]:
  """(forward, input_grad, kernel_grad): which parts of this conv's training
  go to `direct_conv` (``direct``: kernels available; where it applies and
  is faster)."""
  if not direct or not direct_conv.applies(lhs, rhs, window_strides,
                                           padding):
    return (False, False, False)
  hw, cin, cout = lhs.shape[1] * lhs.shape[2], rhs.shape[2], rhs.shape[3]
  return tuple(direct_conv.faster_than_xla(p, hw, cin, cout)
               for p in ("forward", "input_grad", "kernel_grad"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_train(lhs, rhs, window_strides, padding, lanes, direct):
  if _direct_parts(lhs, rhs, window_strides, padding, direct)[0]:
    return direct_conv.forward(lhs, rhs)
  return conv_general_dilated(lhs, rhs, window_strides, padding,
                              dimension_numbers=_NHWC, lanes=lanes)


def _conv_train_fwd(lhs, rhs, window_strides, padding, lanes, direct):
  return (_conv_train(lhs, rhs, window_strides, padding, lanes, direct),
          (lhs, rhs))


def _conv_train_bwd(window_strides, padding, lanes, direct, res, g):
  lhs, rhs = res

  def plain(l, r):
    return lax.conv_general_dilated(l, r, window_strides, padding,
                                    dimension_numbers=_NHWC)

  if tuple(window_strides) != (1, 1) or min(min(p) for p in _dgrad_padding(
      rhs.shape, padding)) < 0:
    return jax.vjp(plain, lhs, rhs)[1](g)
  _, use_dx, use_dk = _direct_parts(lhs, rhs, window_strides, padding,
                                    direct)
  if use_dk:
    dk = direct_conv.kernel_grad(lhs, g)
  else:
    dk = jax.vjp(lambda r: plain(lhs, r), rhs)[1](g)[0]
  if use_dx:
    return direct_conv.input_grad(g, rhs), dk
  # The input gradient of a stride-1 conv is a stride-1 conv of g with the
  # spatially flipped, in/out-swapped kernel: pack it like a forward conv.
  flipped = jnp.flip(rhs, (0, 1)).transpose(0, 1, 3, 2)
  dx = conv_general_dilated(g, flipped, (1, 1),
                            _dgrad_padding(rhs.shape, padding),
                            dimension_numbers=_NHWC, lanes=lanes)
  return dx, dk


_conv_train.defvjp(_conv_train_fwd, _conv_train_bwd)


def conv_general_dilated_train(lhs, rhs, window_strides, padding,
                               lhs_dilation=None, rhs_dilation=None,
                               dimension_numbers=None, feature_group_count=1,
                               precision=None, *, lanes: int,
                               direct: bool = False, **kwargs):
  """Like `conv_general_dilated`, differentiable with a packed input
  gradient (stride 1) and XLA's own kernel gradient, except for the parts
  `direct_conv` computes faster (3x3, stride 1, padding 1, float32)."""
  if (not _packable_layout(lhs, rhs, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count)
      or precision is not None or kwargs):
    return _plain(lhs, rhs, window_strides, padding, lhs_dilation,
                  rhs_dilation, dimension_numbers, feature_group_count,
                  precision, **kwargs)
  return _conv_train(lhs, rhs, tuple(window_strides),
                     tuple(tuple(p) for p in padding), lanes, direct)


@functools.lru_cache(maxsize=None)
def train_conv_fn(lanes: int, direct: bool = False):
  """`conv_fn` for training: each of the forward conv, input gradient and
  kernel gradient from `direct_conv` where that is faster
  (`direct_conv.faster_than_xla`; ``direct``: kernels available), else
  packed forward and input gradient and XLA's kernel gradient (None when
  neither packing nor ``direct`` is on)."""
  if lanes <= 0 and not direct:
    return None
  return functools.partial(conv_general_dilated_train, lanes=max(0, lanes),
                           direct=direct)
