"""Building blocks of prunable networks.

Every model in ``legr_jax.models`` is written with these blocks only. Each
block takes a :class:`Context` argument which carries, explicitly:

* the per-site masks (a site is a ``ConvBN`` or a ``ZeroPadShortcut``; its key
  is the module path, e.g. ``"stage1_block0/conv1"``),
* per-site width overrides and shortcut index maps (how a physically sliced
  network is rebuilt from the same declaration),
* optionally a :class:`Recorder` that, during one abstract trace, records every
  conv and how tensors flow between them. ``legr_jax.models.spec`` derives the
  channel groups and the cost model from that record, so no architecture keeps
  a second hand-written table.

A mask multiplies a conv's output after its BatchNorm (and before the
activation), so a masked channel is exactly zero downstream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from legr_jax import ops as ops_lib

INPUT_NODE = "<input>"


@dataclasses.dataclass
class ConvRecord:
  name: str
  in_node: str
  out_node: str
  in_channels: int
  out_channels: int
  kernel: tuple[int, int]
  strides: tuple[int, int]
  feature_group_count: int
  in_hw: tuple[int, int]
  out_hw: tuple[int, int]


@dataclasses.dataclass
class ShortcutRecord:
  name: str
  in_node: str
  out_node: str
  in_channels: int
  out_channels: int
  index_map: tuple[int, ...]


@dataclasses.dataclass
class DenseRecord:
  name: str
  in_node: str
  in_features: int
  out_features: int


class Recorder:
  """Records convs and channel coupling during one abstract trace.

  Tensors are identified by ``id``; every tensor handed to a block must have
  been produced by a block (or by :func:`passthrough`), otherwise the trace
  fails with an error naming the consumer.
  """

  def __init__(self):
    self.parent: dict[str, str] = {INPUT_NODE: INPUT_NODE}
    self._node_of: dict[int, str] = {}
    self._alive: list[Any] = []  # keeps traced arrays alive so ids stay unique
    self.convs: list[ConvRecord] = []
    self.shortcuts: list[ShortcutRecord] = []
    self.dense: list[DenseRecord] = []

  def new_node(self, name: str) -> str:
    self.parent[name] = name
    return name

  def find(self, node: str) -> str:
    while self.parent[node] != node:
      self.parent[node] = self.parent[self.parent[node]]
      node = self.parent[node]
    return node

  def union(self, a: str, b: str) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      # Keep the earlier-created node as root, so group names are stable.
      order = list(self.parent)
      if order.index(ra) < order.index(rb):
        self.parent[rb] = ra
      else:
        self.parent[ra] = rb

  def register(self, x, node: str) -> None:
    self._node_of[id(x)] = node
    self._alive.append(x)

  def node_of(self, x, consumer: str) -> str:
    try:
      return self._node_of[id(x)]
    except KeyError:
      raise ValueError(
          f"{consumer!r} received a tensor that no legr_jax block produced. "
          "Route channel-preserving ops through legr_jax.models.blocks."
          "passthrough(ctx, fn, x) so channel groups can be derived.") from None


@dataclasses.dataclass
class Context:
  """Per-call context passed explicitly through every block.

  Attributes:
    masks: site name -> 1-D mask (length = the site's output width), or None.
    widths: site name -> output width override (sliced networks).
    index_maps: shortcut site name -> tuple, for every output channel the
      input channel it copies or -1 for a zero channel (sliced networks).
    recorder: set only while deriving the channel spec.
    ops: how convs and BatchNorm are computed (`legr_jax.ops.Ops`; a
      compute choice only: variables and results are unchanged).
  """
  masks: dict[str, Any] | None = None
  widths: dict[str, int] = dataclasses.field(default_factory=dict)
  index_maps: dict[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict)
  recorder: Recorder | None = None
  ops: ops_lib.Ops = ops_lib.XLA

  def mask(self, site: str):
    if self.masks is None:
      return None
    return self.masks.get(site)

  def width(self, site: str, default: int) -> int:
    return int(self.widths.get(site, default))

  def network_input(self, x):
    if self.recorder is not None:
      self.recorder.register(x, INPUT_NODE)
    return x


def _path(module: nn.Module) -> str:
  return "/".join(module.scope.path)


def passthrough(ctx: Context, fn: Callable, x, *args, **kwargs):
  """Applies a channel-preserving op (activation, pooling) to ``x``."""
  y = fn(x, *args, **kwargs)
  if ctx.recorder is not None:
    ctx.recorder.register(y, ctx.recorder.node_of(x, getattr(fn, "__name__",
                                                             "passthrough")))
  return y


def residual_add(ctx: Context, a, b, act: Callable | None = None):
  """``act(a + b)``; couples the channels of ``a`` and ``b`` into one group."""
  y = a + b
  if act is not None:
    y = act(y)
  if ctx.recorder is not None:
    rec = ctx.recorder
    na, nb = rec.node_of(a, "residual_add"), rec.node_of(b, "residual_add")
    rec.union(na, nb)
    rec.register(y, na)
  return y


def max_pool(ctx: Context, x, window: int, strides: int, padding="SAME"):
  return passthrough(
      ctx, lambda t: nn.max_pool(t, (window, window), (strides, strides),
                                 padding=padding), x)


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm -> mask -> activation.

  ``depthwise=True`` makes a depthwise conv whose width follows its input; its
  output channels are coupled to its input channels (one group).
  Padding is ``kernel_size // 2`` on every side (PyTorch convention).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  depthwise: bool = False
  act: Callable | None = nn.relu
  dtype: Any = None  # None: follow the inputs and params (bf16 compute)

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    site = _path(self)
    cin = x.shape[-1]
    if self.depthwise:
      features, groups = cin, cin
    else:
      features, groups = ctx.width(site, self.features), 1
    k, s, p = self.kernel_size, self.strides, self.kernel_size // 2
    y = nn.Conv(features, (k, k), (s, s), padding=((p, p), (p, p)),
                use_bias=False, feature_group_count=groups, dtype=self.dtype,
                kernel_init=nn.initializers.variance_scaling(
                    2.0, "fan_out", "normal"),
                **_conv_override(ctx.ops.conv_fn(train)), name="conv")(x)
    y = ctx.ops.batch_norm(use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=self.dtype, name="bn")(y)
    m = ctx.mask(site)
    if m is not None:
      y = y * m.astype(y.dtype)
    if self.act is not None:
      y = self.act(y)
    if ctx.recorder is not None:
      rec = ctx.recorder
      in_node = rec.node_of(x, site)
      out_node = rec.new_node(site)
      if self.depthwise:
        if rec.find(in_node) == rec.find(INPUT_NODE):
          raise ValueError(f"{site}: a depthwise conv directly over the network"
                           " input cannot be pruned; start with a dense conv.")
        rec.union(in_node, out_node)
      rec.convs.append(ConvRecord(
          name=site, in_node=in_node, out_node=out_node, in_channels=cin,
          out_channels=features, kernel=(k, k), strides=(s, s),
          feature_group_count=groups, in_hw=tuple(x.shape[1:3]),
          out_hw=tuple(y.shape[1:3])))
      rec.register(y, out_node)
    return y


def _conv_override(fn) -> dict:
  """``nn.Conv`` keyword for an `Ops` conv function (none: flax's default)."""
  return {} if fn is None else {"conv_general_dilated": fn}


def default_pad_map(in_channels: int, out_channels: int) -> tuple[int, ...]:
  """Option-A index map, centred layout (``pad='center'``, the default).

  Input channel ``i`` goes to output channel ``i + (out - in) // 2``; the
  zeros sit around it (for 16 -> 32: 8 before, 8 after). This is the layout
  of the common PyTorch CIFAR ResNet (akamaster's ``LambdaLayer``), not the
  LeGR reference's: that one appends (`append_pad_map`).
  """
  before = (out_channels - in_channels) // 2
  return tuple(j - before if 0 <= j - before < in_channels else -1
               for j in range(out_channels))


def append_pad_map(in_channels: int, out_channels: int) -> tuple[int, ...]:
  """Option-A index map, appended layout (``pad='append'``): input channel
  ``i`` goes to output channel ``i``, the zeros follow the input channels (the
  LeGR reference's ``DownsampleA``: ``cat(x, zeros)``)."""
  return tuple(j if j < in_channels else -1 for j in range(out_channels))


# ``ZeroPadShortcut.pad`` -> index map of an unsliced network.
PAD_MAPS: dict[str, Callable[[int, int], tuple[int, ...]]] = {
    "center": default_pad_map,
    "append": append_pad_map,
}


class ZeroPadShortcut(nn.Module):
  """Parameter-free option-A shortcut: spatial subsample + channel zero-pad.

  Output channel ``j`` copies input channel ``index_map[j]`` (or is zero when
  it is -1); the output is multiplied by the mask of the group it is added to,
  so a pruned channel of that group is zero even where the shortcut feeds it.
  The index map comes from ``ctx.index_maps`` (sliced networks) or else from
  ``pad``: ``'center'`` (`default_pad_map`) or ``'append'``
  (`append_pad_map`). The two layouts give the same networks up to a
  relabelling of the wider stream's channels; they differ only in which
  trained weights they load.
  """
  features: int
  strides: int = 2
  pad: str = "center"

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    site = _path(self)
    x_in = x
    s = self.strides
    x = x[:, ::s, ::s, :]
    features = ctx.width(site, self.features)
    index_map = ctx.index_maps.get(site)
    if index_map is None:
      if self.pad not in PAD_MAPS:
        raise ValueError(f"{site}: pad must be one of {tuple(PAD_MAPS)}, got "
                         f"{self.pad!r}")
      index_map = PAD_MAPS[self.pad](x.shape[-1], features)
    idx = np.asarray(index_map, dtype=np.int32)
    if idx.shape != (features,):
      raise ValueError(f"{site}: index map has {idx.shape[0]} entries, "
                       f"expected {features}.")
    y = jnp.where(idx >= 0, jnp.take(x, np.maximum(idx, 0), axis=-1),
                  jnp.zeros((), x.dtype))
    m = ctx.mask(site)
    if m is not None:
      y = y * m.astype(y.dtype)
    if ctx.recorder is not None:
      rec = ctx.recorder
      in_node = rec.node_of(x_in, site)
      out_node = rec.new_node(site)
      rec.shortcuts.append(ShortcutRecord(
          name=site, in_node=in_node, out_node=out_node,
          in_channels=x.shape[-1], out_channels=features,
          index_map=tuple(int(i) for i in idx)))
      rec.register(y, out_node)
    return y


class Classifier(nn.Module):
  """Global average pool over space, then a dense layer to the logits."""
  num_classes: int

  @nn.compact
  def __call__(self, x, ctx: Context, train: bool = False):
    site = _path(self)
    h = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="dense")(h)
    if ctx.recorder is not None:
      ctx.recorder.dense.append(DenseRecord(
          name=site, in_node=ctx.recorder.node_of(x, site),
          in_features=x.shape[-1], out_features=self.num_classes))
    return logits.astype(jnp.float32)
