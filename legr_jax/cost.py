"""Exact cost model: multiply-accumulates (MACs) and parameter counts.

Convention (as the LeGR reference counts FLOPs): a conv costs
``H_out * W_out * k_h * k_w * C_in * C_out / groups`` MACs, the classifier
costs its weight count ``C_in * num_classes``; BatchNorm, activations, adds and
pooling are free. Parameters count conv kernels, BatchNorm scale and bias (2
per channel) and the classifier's weights and biases.

With masks, a group's width is the *sum* of its mask, so the counts are also
defined (and differentiable) for soft masks. Every cost is a quadratic form in
the vector ``a`` of group widths: ``a^T Q a + l . a + c`` (see
`cost_coefficients`), which makes it cheap to evaluate for many mask sets.

Unpruned figures (input 32x32x3 and 10 classes unless noted):
  resnet20 40.55 M MACs / 0.27 M params; resnet32 68.86 M / 0.46 M;
  resnet56 125.49 M / 0.85 M; resnet110 252.89 M / 1.73 M;
  vgg16 313.20 M / 14.72 M; mobilenetv2 87.98 M / 2.24 M;
  cnn_small (8x8x1) 1.49 M / 0.07 M;
  resnet50 (224x224x3, 1000 classes) 4089.18 M / 25.56 M.
(`python -m legr_jax.cost` prints this table.)
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from legr_jax.models.spec import NetSpec

METRICS = ("flops", "params")


@functools.lru_cache(maxsize=256)
def cost_coefficients(spec: NetSpec, metric: str = "flops"):
  """Returns numpy ``(Q [G, G], l [G], c)`` with cost = a^T Q a + l.a + c.

  ``a`` holds group widths in ``spec.groups`` order.
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  index = {g.name: i for i, g in enumerate(spec.groups)}
  n = len(spec.groups)
  q = np.zeros((n, n), np.float64)
  lin = np.zeros((n,), np.float64)
  const = 0.0
  for c in spec.convs:
    kk = c.kernel[0] * c.kernel[1]
    per_weight = c.out_hw[0] * c.out_hw[1] if metric == "flops" else 1
    o = index[c.out_group]
    if c.depthwise:
      lin[o] += per_weight * kk
    elif c.in_group is None:
      lin[o] += per_weight * kk * c.in_channels
    else:
      q[index[c.in_group], o] += per_weight * kk
    if metric == "params":
      lin[o] += 2  # BatchNorm scale and bias
  d = spec.dense
  w = d.out_features
  if d.in_group is None:
    const += d.in_features * w
  else:
    lin[index[d.in_group]] += w
  if metric == "params":
    const += w  # classifier bias
  q.setflags(write=False)
  lin.setflags(write=False)
  return q, lin, const


def group_widths(spec: NetSpec, masks) -> jnp.ndarray:
  """[G] float32 widths (mask sums) in ``spec.groups`` order."""
  return jnp.stack([jnp.sum(jnp.asarray(masks[g.name], jnp.float32))
                    for g in spec.groups])


def cost_of_widths(spec: NetSpec, widths, metric: str = "flops"):
  """Cost for widths ``[..., G]`` (any leading batch dims) -> ``[...]``."""
  q, lin, const = cost_coefficients(spec, metric)
  widths = jnp.asarray(widths, jnp.float32)
  quad = jnp.einsum("...i,ij,...j->...", widths, jnp.asarray(q, jnp.float32),
                    widths)
  return quad + widths @ jnp.asarray(lin, jnp.float32) + jnp.float32(const)


def flops(spec: NetSpec, masks=None):
  """MACs of the masked network (float32 scalar); ``masks=None``: unpruned."""
  if masks is None:
    masks = spec.full_masks()
  return cost_of_widths(spec, group_widths(spec, masks), "flops")


def params(spec: NetSpec, masks=None):
  """Parameter count of the masked network (float32 scalar)."""
  if masks is None:
    masks = spec.full_masks()
  return cost_of_widths(spec, group_widths(spec, masks), "params")


def unpruned(spec: NetSpec, metric: str = "flops") -> float:
  """Exact unpruned cost as a Python float (float64 arithmetic)."""
  q, lin, const = cost_coefficients(spec, metric)
  a = np.array([g.size for g in spec.groups], np.float64)
  return float(a @ q @ a + lin @ a + const)


def _table() -> None:
  from legr_jax import models  # pylint: disable=g-import-not-at-top
  for name in models.known_models():
    if name == "resnet50":
      net = models.get(name, num_classes=1000)
    else:
      net = models.get(name, num_classes=10)
    print(f"{name:12s} input {net.input_shape}: "
          f"{unpruned(net.spec, 'flops') / 1e6:9.2f} M MACs, "
          f"{unpruned(net.spec, 'params') / 1e6:6.2f} M params")


if __name__ == "__main__":
  _table()
