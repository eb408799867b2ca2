"""VGG-16 for CIFAR (13 convs with BatchNorm, 5 max-pools, one linear)."""

from __future__ import annotations

import flax.linen as nn

from legr_jax.models.blocks import Classifier, Context, ConvBN, max_pool

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512,
                "M", 512, 512, 512, "M")


class VGG(nn.Module):
  num_classes: int = 10
  layout: tuple = VGG16_LAYOUT

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    h = ctx.network_input(x)
    i = 0
    for item in self.layout:
      if item == "M":
        h = max_pool(ctx, h, 2, 2)
      else:
        h = ConvBN(int(item), 3, 1, name=f"conv{i}")(h, ctx, train)
        i += 1
    return Classifier(self.num_classes, name="classifier")(h, ctx, train)
