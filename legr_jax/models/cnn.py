"""A small plain CNN: the default model for the 8x8 digits data set."""

from __future__ import annotations

import flax.linen as nn

from legr_jax.models.blocks import Classifier, Context, ConvBN, max_pool


class SmallCNN(nn.Module):
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 32, 64, 64)

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    h = ctx.network_input(x)
    for i, w in enumerate(self.widths):
      h = ConvBN(w, 3, 1, name=f"conv{i}")(h, ctx, train)
      if i % 2 == 1 and i + 1 < len(self.widths):
        h = max_pool(ctx, h, 2, 2)
    return Classifier(self.num_classes, name="classifier")(h, ctx, train)
