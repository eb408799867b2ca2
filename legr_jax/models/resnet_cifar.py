"""CIFAR ResNets (He et al. 2016): 3 stages of basic blocks, 6n+2 layers.

Shortcuts where the width or resolution changes: ``shortcut='A'`` (default,
parameter-free zero padding) or ``'B'`` (1x1 conv + BN). Option A's zero
channels are laid out by ``pad``:

* ``'center'`` (default): the input channels sit in the middle of the wider
  stream (16 -> 32: 8 zeros before, 8 after), as in the common PyTorch CIFAR
  ResNet. Kept as the default: existing checkpoints and results use it.
* ``'append'``: the zeros follow the input channels, as in the LeGR reference
  code (its ``DownsampleA``); use it to load that code's weights and to
  reproduce it (``tools/legr_fidelity.py``). There channel ``j`` of stage 1 is
  channel ``j`` of stages 2 and 3 (see `NetSpec.chains`).

Both layouts give the same network family (one is the other with the wider
streams' channels relabelled), the same channel groups and the same costs.
"""

from __future__ import annotations

import flax.linen as nn

from legr_jax.models.blocks import (PAD_MAPS, Classifier, Context, ConvBN,
                                    ZeroPadShortcut, residual_add)


class BasicBlock(nn.Module):
  """Two 3x3 convs; option-A (zero-pad) or option-B (1x1 conv) shortcut."""
  in_features: int
  features: int
  strides: int = 1
  shortcut: str = "A"
  pad: str = "center"

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    h = ConvBN(self.features, 3, self.strides, name="conv1")(x, ctx, train)
    h = ConvBN(self.features, 3, 1, act=None, name="conv2")(h, ctx, train)
    if self.strides != 1 or self.in_features != self.features:
      if self.shortcut == "A":
        sc = ZeroPadShortcut(self.features, self.strides, self.pad,
                             name="shortcut")(x, ctx, train)
      else:
        sc = ConvBN(self.features, 1, self.strides, act=None,
                    name="shortcut")(x, ctx, train)
    else:
      sc = x
    return residual_add(ctx, h, sc, act=nn.relu)


class ResNetCifar(nn.Module):
  """``depth = 6n + 2``; ``shortcut`` 'A' or 'B'; ``pad`` 'center' or
  'append': option A's layout (see the module docstring), left at 'center'
  with shortcut 'B'."""
  depth: int = 56
  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)
  shortcut: str = "A"
  pad: str = "center"

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
    if self.shortcut not in ("A", "B"):
      raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}")
    if self.pad not in PAD_MAPS:
      raise ValueError(f"pad must be one of {tuple(PAD_MAPS)}, got "
                       f"{self.pad!r}")
    if self.shortcut == "B" and self.pad != "center":
      raise ValueError("pad lays out option A's zero channels; shortcut='B' "
                       "has none (leave pad at 'center')")
    n = (self.depth - 2) // 6
    x = ctx.network_input(x)
    h = ConvBN(self.widths[0], 3, 1, name="stem")(x, ctx, train)
    cin = self.widths[0]
    for s, w in enumerate(self.widths):
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        h = BasicBlock(cin, w, stride, self.shortcut, self.pad,
                       name=f"stage{s + 1}_block{b}")(h, ctx, train)
        cin = w
    return Classifier(self.num_classes, name="classifier")(h, ctx, train)
