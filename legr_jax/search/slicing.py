"""Fast physical slicing for candidate evaluation.

`surgery.slice_network` builds a new `PrunableNet` (one abstract trace to
derive its spec, one more to check the variables): ~0.4 s for ResNet-56,
a quarter of a candidate's budget. A search only needs the sliced widths,
shortcut index maps and variables, which are numpy indexing on the original
spec; `slice_candidate` computes exactly those (the test suite checks them
against `surgery.slice_network`), and `BlockwiseExecutor.apply_module` runs
them on the original module declaration.
"""

from __future__ import annotations

import numpy as np

from legr_jax import surgery


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
