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


def _get(tree, site: str):
  for k in site.split("/"):
    tree = tree[k]
  return tree


def _set(tree: dict, site: str, value) -> None:
  keys = site.split("/")
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def slice_candidate(spec, variables, keep: dict):
  """Slices ``variables`` (numpy) to the channels kept by 0/1 ``keep``.

  Returns ``(widths, index_maps, small_variables)`` as in the config and
  variables of `surgery.slice_network(net, variables, keep)`.
  """
  idx = {g.name: np.flatnonzero(np.asarray(keep[g.name]) > 0)
         for g in spec.groups}
  widths, index_maps = {}, {}
  for c in spec.convs:
    if not c.depthwise:
      widths[c.name] = int(idx[c.out_group].size)
  for s in spec.shortcuts:
    dst, src = idx[s.out_group], idx[s.in_group]
    position = np.full(s.in_channels, -1, np.int64)
    position[src] = np.arange(src.size)
    imap = np.asarray(s.index_map, np.int64)[dst]
    widths[s.name] = int(dst.size)
    index_maps[s.name] = np.where(imap >= 0, position[np.maximum(imap, 0)],
                                  -1).tolist()
  params, stats = variables["params"], variables.get("batch_stats", {})
  new_params: dict = {}
  new_stats: dict = {}
  for c in spec.convs:
    out = idx[c.out_group]
    kernel = np.asarray(_get(params, c.name)["conv"]["kernel"])
    if not c.depthwise and c.in_group is not None:
      kernel = kernel[:, :, idx[c.in_group], :]
    _set(new_params, c.name + "/conv/kernel", kernel[..., out])
    for k, v in _get(params, c.name)["bn"].items():
      _set(new_params, f"{c.name}/bn/{k}", np.asarray(v)[out])
    for k, v in _get(stats, c.name)["bn"].items():
      _set(new_stats, f"{c.name}/bn/{k}", np.asarray(v)[out])
  d = spec.dense
  dense = _get(params, d.name)["dense"]
  kernel = np.asarray(dense["kernel"])
  if d.in_group is not None:
    kernel = kernel[idx[d.in_group], :]
  _set(new_params, d.name + "/dense/kernel", kernel)
  _set(new_params, d.name + "/dense/bias", np.asarray(dense["bias"]))
  return widths, index_maps, {"params": new_params, "batch_stats": new_stats}


def sliced_site_masks(spec, masks: dict, keep: dict) -> dict:
  """Per-site masks of the sliced network: the group ``masks`` restricted to
  the ``keep`` channels (0 exactly on the filler channels that ``keep`` adds
  to round widths up)."""
  inner = {g.name: np.asarray(masks[g.name], np.float32)[
      np.asarray(keep[g.name]) > 0] for g in spec.groups}
  return spec.site_masks(inner)
