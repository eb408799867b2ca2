"""ResNet-50 for ImageNet (bottleneck blocks, stride on the 3x3 conv)."""

from __future__ import annotations

import flax.linen as nn

from legr_jax.models.blocks import (Classifier, Context, ConvBN, max_pool,
                                    residual_add)


class Bottleneck(nn.Module):
  in_features: int
  planes: int
  strides: int = 1
  expansion: int = 4

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    out = self.planes * self.expansion
    h = ConvBN(self.planes, 1, 1, name="conv1")(x, ctx, train)
    h = ConvBN(self.planes, 3, self.strides, name="conv2")(h, ctx, train)
    h = ConvBN(out, 1, 1, act=None, name="conv3")(h, ctx, train)
    if self.strides != 1 or self.in_features != out:
      sc = ConvBN(out, 1, self.strides, act=None,
                  name="downsample")(x, ctx, train)
    else:
      sc = x
    return residual_add(ctx, h, sc, act=nn.relu)


class ResNetImageNet(nn.Module):
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  num_classes: int = 1000
  width: int = 64

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    x = ctx.network_input(x)
    h = ConvBN(self.width, 7, 2, name="stem")(x, ctx, train)
    h = max_pool(ctx, h, 3, 2, padding=((1, 1), (1, 1)))
    cin = self.width
    for s, n in enumerate(self.stage_sizes):
      planes = self.width * 2 ** s
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        h = Bottleneck(cin, planes, stride,
                       name=f"stage{s + 1}_block{b}")(h, ctx, train)
        cin = planes * 4
    return Classifier(self.num_classes, name="classifier")(h, ctx, train)
