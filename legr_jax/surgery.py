"""Physical channel surgery: masked network -> smaller dense network."""

from __future__ import annotations

import copy

import jax
import numpy as np

from legr_jax.models import PrunableNet, from_config


def _get(tree, site: str):
  for k in site.split("/"):
    tree = tree[k]
  return tree


def _set(tree: dict, site: str, value) -> None:
  keys = site.split("/")
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def kept_channels(spec, masks) -> dict[str, np.ndarray]:
  """Group name -> sorted int indices of channels whose mask is 1.

  Masks must be concrete 0/1 values (not traced, not soft).
  """
  spec.check_masks(masks)
  keep = {}
  for g in spec.groups:
    try:
      m = np.asarray(masks[g.name], np.float32)
    except jax.errors.TracerArrayConversionError:
      raise ValueError("slice_network needs concrete masks; call it outside "
                       "jit.") from None
    if not np.all((m == 0) | (m == 1)):
      raise ValueError(f"mask of group {g.name!r} is not 0/1; binarize it "
                       "(e.g. masks > 0.5) before slicing.")
    keep[g.name] = np.flatnonzero(m)
  return keep


def slice_arrays(spec, variables, keep: dict[str, np.ndarray]):
  """The numpy core of surgery: no network is built (fast; used per candidate
  by the search).

  Args:
    spec: the `NetSpec` of the network ``variables`` belong to.
    variables: ``{'params', 'batch_stats'}`` (arrays or numpy).
    keep: group name -> sorted int indices of the channels to keep.
  Returns:
    ``(widths, index_maps, small_variables)``: per-site width overrides and
    shortcut index maps (the ``config`` entries of the sliced network) and
    its numpy variables.
  """
  widths, index_maps = {}, {}
  for c in spec.convs:
    if not c.depthwise:
      widths[c.name] = int(keep[c.out_group].size)
  for s in spec.shortcuts:
    dst, src = keep[s.out_group], keep[s.in_group]
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
    out_idx = keep[c.out_group]
    kernel = np.asarray(_get(params, c.name)["conv"]["kernel"])
    if not c.depthwise and c.in_group is not None:
      kernel = kernel[:, :, keep[c.in_group], :]  # [kh, kw, cin/g, cout]
    _set(new_params, c.name + "/conv/kernel", kernel[..., out_idx])
    for k, v in _get(params, c.name)["bn"].items():
      _set(new_params, f"{c.name}/bn/{k}", np.asarray(v)[out_idx])
    for k, v in _get(stats, c.name)["bn"].items():
      _set(new_stats, f"{c.name}/bn/{k}", np.asarray(v)[out_idx])
  d = spec.dense
  dense = _get(params, d.name)["dense"]
  kernel = np.asarray(dense["kernel"])
  if d.in_group is not None:
    kernel = kernel[keep[d.in_group], :]
  _set(new_params, d.name + "/dense/kernel", kernel)
  _set(new_params, d.name + "/dense/bias", np.asarray(dense["bias"]))
  return widths, index_maps, {"params": new_params, "batch_stats": new_stats}


def embed_arrays(spec, variables, small_variables, keep: dict[str, np.ndarray]):
  """The inverse of `slice_arrays` on the kept channels.

  Returns a numpy copy of ``variables`` (the full network's ``{'params',
  'batch_stats'}``) whose entries at the kept channels hold
  ``small_variables`` (shaped like ``slice_arrays(spec, variables, keep)``'s,
  e.g. after training the sliced network); entries of removed channels keep
  the values of ``variables``. ``slice_arrays`` of the result with the same
  ``keep`` gives back ``small_variables``.
  """
  full = jax.tree_util.tree_map(np.array, jax.device_get(
      {"params": variables["params"],
       "batch_stats": variables.get("batch_stats", {})}))
  small = jax.device_get(small_variables)
  params, stats = full["params"], full["batch_stats"]
  sparams, sstats = small["params"], small.get("batch_stats", {})
  for c in spec.convs:
    out_idx = keep[c.out_group]
    kernel = _get(params, c.name)["conv"]["kernel"]
    small_kernel = np.asarray(_get(sparams, c.name)["conv"]["kernel"])
    if not c.depthwise and c.in_group is not None:
      kh, kw = kernel.shape[:2]
      kernel[np.ix_(np.arange(kh), np.arange(kw), keep[c.in_group],
                    out_idx)] = small_kernel
    else:
      kernel[..., out_idx] = small_kernel
    for tree, stree in ((params, sparams), (stats, sstats)):
      for k, v in _get(tree, c.name)["bn"].items():
        v[out_idx] = np.asarray(_get(stree, c.name)["bn"][k])
  d = spec.dense
  dense = _get(params, d.name)["dense"]
  sdense = _get(sparams, d.name)["dense"]
  if d.in_group is not None:
    dense["kernel"][keep[d.in_group], :] = np.asarray(sdense["kernel"])
  else:
    dense["kernel"][...] = np.asarray(sdense["kernel"])
  dense["bias"][...] = np.asarray(sdense["bias"])
  return full


def slice_network(net: PrunableNet, variables, masks):
  """Removes masked channels physically.

  Args:
    net: the network the masks refer to.
    variables: its ``{'params', 'batch_stats'}``.
    masks: 0/1 group masks (every group keeps at least one channel).
  Returns:
    ``(small_net, small_variables)``: a dense network with the same call
    signature whose eval-mode logits equal ``net.apply(variables, x, masks)``;
    ``small_net.config`` (JSON-serializable) rebuilds it with
    `legr_jax.models.from_config`.
  """
  keep = kept_channels(net.spec, masks)
  widths, index_maps, small_variables = slice_arrays(
      net.spec, jax.device_get(variables), keep)
  config = copy.deepcopy(net.config)
  config["widths"] = {**config.get("widths", {}), **widths}
  config["index_maps"] = {**config.get("index_maps", {}), **index_maps}
  small_net = from_config(config, net.ops)
  expected = small_net.variable_shapes
  got = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape,
                                                              a.dtype),
                               small_variables)
  if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(
      got) or jax.tree_util.tree_leaves(expected) != jax.tree_util.tree_leaves(
          got):
    raise RuntimeError("internal error: sliced variables do not match the "
                       "sliced network's declaration")
  small_variables = jax.tree_util.tree_map(jax.numpy.asarray, small_variables)
  return small_net, small_variables
