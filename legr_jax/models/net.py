"""`PrunableNet`: a Flax module plus the channel spec derived from it."""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from legr_jax import ops as ops_lib
from legr_jax.models import blocks
from legr_jax.models.cnn import SmallCNN
from legr_jax.models.mobilenetv2 import MobileNetV2
from legr_jax.models.resnet_cifar import ResNetCifar
from legr_jax.models.resnet_imagenet import ResNetImageNet
from legr_jax.models.spec import NetSpec, spec_from_record
from legr_jax.models.vgg import VGG

# name -> (constructor(num_classes, **kwargs) -> nn.Module, default input shape)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int]]] = {
    "resnet20": (functools.partial(ResNetCifar, depth=20), (32, 32, 3)),
    "resnet32": (functools.partial(ResNetCifar, depth=32), (32, 32, 3)),
    "resnet56": (functools.partial(ResNetCifar, depth=56), (32, 32, 3)),
    "resnet110": (functools.partial(ResNetCifar, depth=110), (32, 32, 3)),
    "vgg16": (VGG, (32, 32, 3)),
    "mobilenetv2": (MobileNetV2, (32, 32, 3)),
    "resnet50": (ResNetImageNet, (224, 224, 3)),
    "cnn_small": (SmallCNN, (8, 8, 1)),
}


def known_models() -> tuple[str, ...]:
  return tuple(sorted(MODELS))


class PrunableNet:
  """A Flax module with explicit channel masks and its derived `NetSpec`.

  Attributes:
    config: JSON-serializable description (model name, constructor kwargs,
      input shape, per-site width overrides and shortcut index maps); it is
      enough to rebuild the network with `from_config`.
    module: the Flax module, called as ``module(x, ctx, train)``.
    spec: the `NetSpec` (groups, wiring, spatial sizes) of this network.
    variable_shapes: what `init` returns, as `jax.ShapeDtypeStruct` leaves.
    ops: how convs and BatchNorm are computed (`legr_jax.ops.Ops`; read
      while tracing): default `legr_jax.ops.XLA`; e.g.
      ``legr_jax.ops.resolve('auto')`` for the CPU fast paths. Variables and
      results (to float rounding) do not depend on it.
  """

  def __init__(self, config: dict[str, Any], ops: ops_lib.Ops | None = None):
    self.config = copy.deepcopy(config)
    name = config["model"]
    if name not in MODELS:
      raise ValueError(f"unknown model {name!r}; known models: "
                       f"{', '.join(known_models())}")
    ctor, _ = MODELS[name]
    self.name = name
    self.input_shape = tuple(int(d) for d in config["input_shape"])
    self.num_classes = int(config["num_classes"])
    self.module = ctor(num_classes=self.num_classes,
                       **config.get("kwargs", {}))
    self._widths = {k: int(v) for k, v in config.get("widths", {}).items()}
    self._index_maps = {k: tuple(int(i) for i in v)
                        for k, v in config.get("index_maps", {}).items()}
    self.ops: ops_lib.Ops = ops or ops_lib.XLA
    self.spec: NetSpec = self._derive_spec()

  def _context(self, site_masks=None, recorder=None,
               ops: ops_lib.Ops | None = None) -> blocks.Context:
    return blocks.Context(masks=site_masks, widths=self._widths,
                          index_maps=self._index_maps, recorder=recorder,
                          ops=ops or self.ops)

  def _derive_spec(self) -> NetSpec:
    rec = blocks.Recorder()
    x = jax.ShapeDtypeStruct((1,) + self.input_shape, jnp.float32)
    # The same trace gives the variables' shapes (`variable_shapes`).
    self.variable_shapes = dict(jax.eval_shape(
        lambda x: self.module.init(jax.random.key(0), x,
                                   self._context(recorder=rec,
                                                 ops=ops_lib.XLA),
                                   train=False),
        x))
    return spec_from_record(rec, self.input_shape)

  def init(self, rng) -> dict:
    """Returns ``{'params': ..., 'batch_stats': ...}``."""
    x = jnp.zeros((1,) + self.input_shape, jnp.float32)
    return dict(self.module.init(rng, x, self._context(), train=False))

  def with_ops(self, ops: ops_lib.Ops) -> "PrunableNet":
    """The same network (module, spec, config) computed with ``ops``."""
    other = copy.copy(self)
    other.ops = ops
    return other

  def check_input(self, x) -> None:
    if getattr(x, "ndim", None) != 4 or tuple(x.shape[1:]) != self.input_shape:
      raise ValueError(
          f"{self.name} was built for images of shape (N, "
          f"{', '.join(map(str, self.input_shape))}), got "
          f"{getattr(x, 'shape', type(x))}. Resize the data or build the "
          f"model with legr_jax.models.get({self.name!r}, "
          "input_shape=...).")

  def apply(self, variables, x, masks=None, train: bool = False,
            mutable: bool | None = None):
    """Forward pass with group masks.

    Args:
      variables: from `init` (``params`` and ``batch_stats``).
      x: float images [N, H, W, C] with (H, W, C) == ``input_shape``.
      masks: dict group name -> [group size] float mask, or None (unpruned).
      train: batch statistics in BatchNorm when True.
    Returns:
      logits [N, num_classes] (float32) when ``train`` is False;
      ``(logits, new_batch_stats)`` when ``train`` is True.
    """
    self.check_input(x)
    site_masks = None
    if masks is not None:
      self.spec.check_masks(masks)
      site_masks = self.spec.site_masks(masks)
    return apply_module(self.module, variables, x, self._context(site_masks),
                        train)

  def __repr__(self):
    return (f"PrunableNet({self.name}, input_shape={self.input_shape}, "
            f"groups={len(self.spec.groups)}, convs={len(self.spec.convs)})")


def apply_module(module: nn.Module, variables, x, ctx: blocks.Context,
                 train: bool):
  """``module(x, ctx, train)`` with ``variables``: logits in eval mode,
  ``(logits, new_batch_stats)`` in training mode (see `PrunableNet.apply`)."""
  if train:
    logits, updates = module.apply(variables, x, ctx, train=True,
                                   mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return module.apply(variables, x, ctx, train=False)


def from_config(config: dict[str, Any],
                ops: ops_lib.Ops | None = None) -> PrunableNet:
  """Rebuilds a network (possibly a sliced one) from its ``config``."""
  return PrunableNet(config, ops)


def get(name: str, num_classes: int = 10,
        input_shape: tuple[int, int, int] | None = None,
        ops: ops_lib.Ops | None = None, **kwargs) -> PrunableNet:
  """Builds a model by name.

  Args:
    name: one of `known_models()`.
    num_classes: classifier width.
    input_shape: (H, W, C) of the images; spatial sizes and hence costs follow
      it. Defaults to the model's native shape (32x32x3 for CIFAR models).
    ops: how it is computed (default `legr_jax.ops.XLA`; see `PrunableNet`).
    **kwargs: constructor options, e.g. ``shortcut='B'`` for CIFAR ResNets or
      ``width_multiplier=0.75`` for MobileNetV2.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: "
                     f"{', '.join(known_models())}")
  if input_shape is None:
    input_shape = MODELS[name][1]
  if len(tuple(input_shape)) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
  return PrunableNet({"model": name, "num_classes": int(num_classes),
                      "input_shape": [int(d) for d in input_shape],
                      "kwargs": dict(kwargs)}, ops)
