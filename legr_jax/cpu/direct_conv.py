"""Direct 3x3 convolutions for XLA:CPU: a small C++ kernel behind XLA's FFI.

Why: XLA:CPU vectorizes its convolution kernels along the output channels,
so a pruned network's narrow convs (2, 4, 7 of 16 channels) waste most of
each SIMD vector, and its kernel gradient im2col's the input (plus two
transposes), so it costs the same at 2 output channels as at 16. Training a
pruned candidate for LeGR's ``tau_hat`` steps on a CPU is mostly these convs.

How: `csrc/direct_conv.cc` lays a chunk of images out channel-major with
zero padding (one zero row between stacked images, one shared zero column
between rows) and vectorizes along the flattened rows, so the vector width
no longer depends on the channel counts. The width is the compiler
target's: 16 floats with AVX-512, 8 with AVX/AVX2, 4 otherwise (register
blocking to match; see the top of ``direct_conv.cc``). The input gradient
is the forward kernel run on the output gradient with the flipped,
in/out-swapped kernel. Images are split over XLA's own intra-op thread pool
(no extra threads competing with XLA's); the kernel gradient sums the
tasks' partial sums in a fixed order (deterministic for a given thread
count).

Where it is used: where `legr_jax.cpu.ops` finds the C++ kernels available
(and ``direct_conv=True``), `conv_packing.conv_fn` / `train_conv_fn` send
each of a conv's forward, input gradient and kernel gradient here where
`faster_than_xla` says so.

Scope: 2-D NHWC/HWIO, 3x3 kernel, stride 1, padding 1, no dilation or
groups, float32: the bulk of CIFAR ResNets. Everything else stays XLA's.
The kernel is built on first use (`kernels`: the host's C++ compiler,
``-march=native``, cached); no compiler or a failed build: XLA's
convolutions (one warning says why). First-order gradients only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from legr_jax.cpu import kernels

_FORWARD = "legr_direct_conv3x3_forward"
_KERNEL_GRAD = "legr_direct_conv3x3_kernel_grad"


def applies(lhs, rhs, window_strides, padding) -> bool:
  """Whether an NHWC/HWIO conv (layout already checked) is one the kernel
  computes: 3x3, stride 1, padding 1 on every side, float32."""
  return (rhs.ndim == 4 and tuple(rhs.shape[:2]) == (3, 3)
          and tuple(window_strides) == (1, 1)
          and tuple(tuple(p) for p in padding) == ((1, 1), (1, 1))
          and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and lhs.shape[1] >= 1 and lhs.shape[2] >= 1)


def faster_than_xla(part: str, hw: int, cin: int, cout: int) -> bool:
  """Whether the direct kernel beat XLA:CPU (output packing included) for
  ``part`` ('forward', 'input_grad' or 'kernel_grad') of a conv over
  ``hw`` pixels per image from ``cin`` to ``cout`` channels (another
  ``part``: ValueError).

  Forward and input gradient: when one side has at most 16 channels (with
  32 or more on both, XLA's kernels fill their vectors and this layout
  pads 8x8 images to 9x9). Kernel gradient: from 16x16 pixels up
  (``hw >= 256``). Read off `benchmarks.bench_direct_conv`'s table on
  AVX-512 and on AVX2 (XLA capped at AVX2, kernels built without AVX-512:
  the same rule; benchmarks/RESULTS.md); used on every ISA (other ones not
  measured).
  """
  if part in ("forward", "input_grad"):
    return min(cin, cout) <= 16
  if part == "kernel_grad":
    return hw >= 256
  raise ValueError(f"unknown part {part!r}")


def forward(x, k):
  """The forward conv alone (not differentiable; `conv3x3` is)."""
  kernels.require("direct conv")
  out = jax.ShapeDtypeStruct(x.shape[:3] + (k.shape[3],), jnp.float32)
  return jax.ffi.ffi_call(_FORWARD, out, vmap_method="sequential")(x, k)


def kernel_grad(x, dy):
  """``d conv3x3(x, k) / dk`` applied to the output cotangent ``dy`` ->
  [3, 3, I, O]."""
  kernels.require("direct conv")
  out = jax.ShapeDtypeStruct((3, 3, x.shape[3], dy.shape[3]), jnp.float32)
  return jax.ffi.ffi_call(_KERNEL_GRAD, out, vmap_method="sequential")(x, dy)


@jax.custom_vjp
def conv3x3(x, k):
  """``x [N, H, W, I] * k [3, 3, I, O] -> [N, H, W, O]``: stride 1, padding
  1, float32; equals `lax.conv_general_dilated` up to summation order.
  Builds the kernel on first use; RuntimeError where it cannot be built."""
  return forward(x, k)


def _conv3x3_fwd(x, k):
  return forward(x, k), (x, k)


def input_grad(g, k):
  """``d conv3x3(x, k) / dx`` applied to the output cotangent ``g``: the same
  conv of g with the spatially flipped, in/out-swapped kernel."""
  return forward(g, jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2))


def _conv3x3_bwd(res, g):
  x, k = res
  return input_grad(g, k), kernel_grad(x, g)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
