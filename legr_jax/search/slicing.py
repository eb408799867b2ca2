"""Fast physical slicing for candidate evaluation.

Why: `surgery.slice_network` builds a new `PrunableNet` (one abstract trace
to derive its spec, one more to check the variables), a sizeable part of a
candidate's time (benchmarks/RESULTS.md). A search only needs the sliced
widths, shortcut index maps and variables, which are numpy indexing on the
original spec; `slice_candidate` computes exactly those (the test suite
checks them against `surgery.slice_network`), and
`BlockwiseExecutor.apply_module` runs them on the original module
declaration; so does `SlicedNet` for the tau_hat training steps.
"""

from __future__ import annotations

import numpy as np

from legr_jax import surgery
from legr_jax.models import blocks
from legr_jax.models import net as net_lib


def slice_candidate(spec, variables, keep: dict):
  """Slices ``variables`` (numpy) to the channels kept by 0/1 ``keep``.

  Returns ``(widths, index_maps, small_variables)`` as in the config and
  variables of `surgery.slice_network(net, variables, keep)` (it is
  `surgery.slice_arrays` on 0/1 masks).
  """
  idx = {g.name: np.flatnonzero(np.asarray(keep[g.name]) > 0)
         for g in spec.groups}
  return surgery.slice_arrays(spec, variables, idx)


def sliced_site_masks(spec, masks: dict, keep: dict) -> dict:
  """Per-site masks of the sliced network: the group ``masks`` restricted to
  the ``keep`` channels (0 exactly on the filler channels that ``keep`` adds
  to round widths up)."""
  inner = {g.name: np.asarray(masks[g.name], np.float32)[
      np.asarray(keep[g.name]) > 0] for g in spec.groups}
  return spec.site_masks(inner)


class SlicedNet:
  """The original module declaration run at sliced widths: what
  `surgery.slice_network` returns as its network, for training and
  evaluation without group masks, minus the trace that derives a spec (and
  variable shapes) of its own (per-candidate time: benchmarks/RESULTS.md).

  ``apply(variables, x, masks=None, train)`` as `PrunableNet.apply`; the
  variables are those of `slice_candidate` on ``net.spec``, whose ``widths``
  and ``index_maps`` it takes.
  """

  def __init__(self, net, widths: dict, index_maps: dict, ops=None):
    self.module = net.module
    self.name = net.name
    self.input_shape = net.input_shape
    self.ops = ops or net.ops
    self._net = net
    self._widths = {k: int(v) for k, v in widths.items()}
    self._index_maps = {k: tuple(int(i) for i in v)
                        for k, v in index_maps.items()}

  def apply(self, variables, x, masks=None, train: bool = False):
    if masks is not None:
      raise ValueError("SlicedNet runs the kept channels only; it takes no "
                       "masks (use the full network with masks instead)")
    self._net.check_input(x)
    ctx = blocks.Context(widths=self._widths, index_maps=self._index_maps,
                         ops=self.ops)
    return net_lib.apply_module(self.module, variables, x, ctx, train)
