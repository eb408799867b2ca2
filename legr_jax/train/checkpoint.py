"""Orbax checkpoints of a `TrainState` plus JSON metadata.

Layout: ``<dir>/<step>/{state,meta}``. The manager keeps the last
``keep`` checkpoints and the best one by ``metrics['val_accuracy']``
(checkpoints saved without metrics, e.g. mid-epoch, never count as best).
Saving is synchronous: once `save` returns the checkpoint is complete on
disk; a process killed while saving leaves a temporary folder that orbax
ignores.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

BEST_METRIC = "val_accuracy"


def _best_metric(metrics) -> float:
  return float(metrics[BEST_METRIC])


def make_manager(directory: str, *, keep: int = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over ``directory`` with items 'state' and 'meta'."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=max(1, keep)),
      ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric, best_mode="max", preservation_policy=policy,
      enable_async_checkpointing=False, create=not read_only,
      read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves ``state`` (a pytree) and JSON ``meta`` at ``step``."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores (state, meta) of ``step``; ``abstract_state`` gives the tree
  structure, shapes, dtypes and shardings (e.g. from `jax.eval_shape`)."""
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of ``tree`` (with ``sharding`` if given) for restore."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=sharding or getattr(x, "sharding",
                                                             None))
  return jax.tree.map(leaf, tree)
