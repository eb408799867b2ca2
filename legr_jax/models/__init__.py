"""Prunable model zoo.

>>> net = legr_jax.models.get("resnet56", num_classes=10)
>>> variables = net.init(jax.random.key(0))
>>> logits = net.apply(variables, x, net.spec.full_masks(), train=False)
"""

from legr_jax.models.net import (MODELS, PrunableNet, from_config, get,
                                 known_models)
from legr_jax.models.spec import (ConvSpec, DenseSpec, GroupSpec, NetSpec,
                                  ShortcutSpec)

__all__ = ["MODELS", "PrunableNet", "from_config", "get", "known_models",
           "ConvSpec", "DenseSpec", "GroupSpec", "NetSpec", "ShortcutSpec"]
