"""Block-by-block eval-mode execution with compiled functions shared by shape.

Every network of the zoo is a top-level module whose direct children are
blocks (`ConvBN`, residual blocks, the classifier). `BlockwiseExecutor` runs
the top level eagerly and each child as its own jitted function, cached by the
child's class, hyperparameters, (relative) widths and input shape. Networks
sliced to different widths therefore share the compiled code of every block
whose shapes coincide: a search that slices each candidate physically pays a
compile only for block shapes it has not met before, instead of a whole-network
compile per candidate.

Zero-pad shortcuts inside a block take their channel index map as a traced
argument (not a compile-time constant), so sliced networks with different
kept-channel sets share one compiled block.
"""

from __future__ import annotations

import dataclasses
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
from legr_jax import ops as ops_lib
from legr_jax.models import blocks

_tls = threading.local()


def _hparams(module: nn.Module) -> tuple:
  return tuple((f.name, getattr(module, f.name))
               for f in dataclasses.fields(module)
               if f.name not in ("parent", "name"))


def _relative(tree: dict, prefix: str) -> dict:
  """Entries of a site-keyed dict under ``prefix``, keyed relative to it
  (the block's own site becomes '')."""
  out = {}
  for site, v in tree.items():
    if site == prefix:
      out[""] = v
    elif site.startswith(prefix + "/"):
      out[site[len(prefix) + 1:]] = v
  return out


def _shortcut_interceptor(index_arrays: dict):
  """Replaces `ZeroPadShortcut` calls by a gather with traced indices."""

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if (context.method_name != "__call__" or
        not isinstance(m, blocks.ZeroPadShortcut)):
      return next_fun(*args, **kwargs)
    x, ctx = args[0], args[1]
    site = "/".join(m.scope.path)
    idx = index_arrays[site]
    s = m.strides
    x = x[:, ::s, ::s, :]
    y = jnp.where(idx >= 0, jnp.take(x, jnp.maximum(idx, 0), axis=-1),
                  jnp.zeros((), x.dtype))
    mask = ctx.mask(site)
    if mask is not None:
      y = y * mask.astype(y.dtype)
    return y

  return interceptor


class BlockwiseExecutor:
  """Eval-mode forward passes of (sliced) `PrunableNet`s, block by block.

  Thread-safe; one executor is meant to serve a whole search. ``apply(net,
  variables, x, masks)`` equals ``net.apply(variables, x, masks,
  train=False)`` up to float rounding.
  """

  def __init__(self, ops: ops_lib.Ops | None = None):
    """``ops``: how blocks are computed and compiled (`legr_jax.ops.Ops`,
    its compiler options included; default `legr_jax.ops.XLA`)."""
    self._fns: dict = {}
    self._lock = threading.Lock()
    self.ops = ops or ops_lib.XLA
    self.compiler_options = self.ops.jit_options()

  @property
  def num_block_functions(self) -> int:
    return len(self._fns)

  def num_compiled(self) -> int:
    """Compiled (function, shape) pairs so far."""
    return sum(f._cache_size() for f in list(self._fns.values()))  # pylint: disable=protected-access

  def _block_fn(self, module: nn.Module, rel_widths: dict, mask_sites,
                index_sites):
    key = (type(module), _hparams(module), tuple(sorted(rel_widths.items())),
           tuple(mask_sites), tuple(index_sites))
    fn = self._fns.get(key)
    if fn is not None:
      return fn
    standalone = type(module)(**dict(_hparams(module)))
    widths = dict(rel_widths)

    def run(variables, x, masks, index_arrays):
      _tls.inside = True
      try:
        ctx = blocks.Context(masks=masks or None, widths=widths,
                             ops=self.ops)
        with nn.intercept_methods(_shortcut_interceptor(index_arrays)):
          return standalone.apply(variables, x, ctx, train=False)
      finally:
        _tls.inside = False

    fn = jax.jit(run, compiler_options=self.compiler_options)
    with self._lock:
      return self._fns.setdefault(key, fn)

  def apply(self, net, variables: dict, x, masks: dict | None = None):
    """Logits [N, classes] of ``net`` (eval mode) with group ``masks``."""
    net.check_input(x)
    site_masks = None
    if masks is not None:
      net.spec.check_masks(masks, allow_empty_groups=True)
      site_masks = net.spec.site_masks(masks)
    widths = {k: int(v) for k, v in net.config.get("widths", {}).items()}
    index_maps = dict(net.config.get("index_maps", {}))
    for s in net.spec.shortcuts:  # unsliced nets: the default maps
      index_maps.setdefault(s.name, s.index_map)
    return self.apply_module(net.module, variables, x, widths=widths,
                             index_maps=index_maps, site_masks=site_masks)

  def apply_module(self, module: nn.Module, variables: dict, x, *,
                   widths: dict, index_maps: dict,
                   site_masks: dict | None = None):
    """Like `apply` for a bare module declaration: ``widths`` (site -> width
    overrides), ``index_maps`` (every zero-pad shortcut site -> index map;
    int arrays, ideally already on the device) and per-site masks."""
    ctx = blocks.Context(masks=site_masks, widths=widths,
                         index_maps=index_maps, ops=self.ops)

    def interceptor(next_fun, args, kwargs, context):
      m = context.module
      if (getattr(_tls, "inside", False) or context.method_name != "__call__"
          or len(m.scope.path) != 1):
        return next_fun(*args, **kwargs)
      prefix = m.scope.path[0]
      rel_widths = _relative(widths, prefix)
      rel_masks = _relative(site_masks or {}, prefix)
      rel_index = {k: jnp.asarray(v, jnp.int32)
                   for k, v in _relative(index_maps, prefix).items()}
      fn = self._block_fn(m, rel_widths, sorted(rel_masks),
                          sorted(rel_index))
      return fn(dict(m.variables), args[0], rel_masks, rel_index)

    with nn.intercept_methods(interceptor):
      return module.apply(variables, x, ctx, train=False)
