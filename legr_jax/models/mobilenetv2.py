"""MobileNetV2 (Sandler et al. 2018), CIFAR variant (stride 1 stem and stage 2).
"""

from __future__ import annotations

import flax.linen as nn

from legr_jax.models.blocks import Classifier, Context, ConvBN, residual_add

# (expansion t, channels c, repeats n, first stride s)
CIFAR_LAYOUT = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class InvertedResidual(nn.Module):
  in_features: int
  features: int
  strides: int
  expansion: int

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    h = x
    if self.expansion != 1:
      h = ConvBN(self.in_features * self.expansion, 1, 1, act=nn.relu6,
                 name="expand")(h, ctx, train)
    h = ConvBN(0, 3, self.strides, depthwise=True, act=nn.relu6,
               name="depthwise")(h, ctx, train)
    h = ConvBN(self.features, 1, 1, act=None, name="project")(h, ctx, train)
    if self.strides == 1 and self.in_features == self.features:
      h = residual_add(ctx, h, x)
    return h


class MobileNetV2(nn.Module):
  num_classes: int = 10
  width_multiplier: float = 1.0
  layout: tuple = CIFAR_LAYOUT

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    wm = self.width_multiplier
    x = ctx.network_input(x)
    cin = make_divisible(32 * wm)
    h = ConvBN(cin, 3, 1, act=nn.relu6, name="stem")(x, ctx, train)
    for i, (t, c, n, s) in enumerate(self.layout):
      cout = make_divisible(c * wm)
      for b in range(n):
        h = InvertedResidual(cin, cout, s if b == 0 else 1, t,
                             name=f"stage{i + 1}_block{b}")(h, ctx, train)
        cin = cout
    last = make_divisible(1280 * max(1.0, wm))
    h = ConvBN(last, 1, 1, act=nn.relu6, name="head")(h, ctx, train)
    return Classifier(self.num_classes, name="classifier")(h, ctx, train)
