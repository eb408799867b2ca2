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
import shutil
from typing import Callable

import jax
import orbax.checkpoint as ocp

BEST_METRIC = "val_accuracy"


class CheckpointError(ValueError):
  """A checkpoint that does not restore (damaged, or of another network)."""
  exit_code = 2


def step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  """The folder of checkpoint ``step``."""
  return os.path.join(str(manager.directory), str(step))


def _reason(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 160 else text[:157] + "..."


def _best_metric(metrics) -> float:
  return float(metrics[BEST_METRIC])


def make_manager(directory: str, *, keep: int = 3,
                 read_only: bool = False,
                 process_local: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over ``directory`` with items 'state' and 'meta'.
  With ``process_local`` only this JAX process uses it (its own folder and
  process-local arrays; no barrier with the other processes)."""
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=max(1, keep)),
      ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      best_fn=_best_metric, best_mode="max", preservation_policy=policy,
      **{"enable_async_checkpointing": False, "create": not read_only,
         "read_only": read_only, **_process_local_options(process_local)})
  if process_local and not read_only:
    os.makedirs(directory, exist_ok=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def _process_local_options(process_local: bool) -> dict:
  if not process_local or jax.process_count() == 1:
    return {}
  i = jax.process_index()
  return {"create": False, "multiprocessing_options": ocp.options.MultiprocessingOptions(
      primary_host=i, active_processes={i},
      barrier_sync_key_prefix=f"process_{i}")}


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves ``state`` (a pytree) and JSON ``meta`` at ``step``."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               metrics=metrics, force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores (state, meta) of ``step``; ``abstract_state`` gives the tree
  structure, shapes, dtypes and shardings (e.g. from `jax.eval_shape`).
  Raises `CheckpointError` (naming the folder) when it does not restore."""
  try:
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax/TensorStore raise many types
    raise CheckpointError(f"checkpoint {step_dir(manager, step)} does not "
                          f"restore ({_reason(e)})") from e
  if not isinstance(out["meta"], dict):
    raise CheckpointError(f"checkpoint {step_dir(manager, step)}: its meta "
                          "item is not a JSON object")
  return out["state"], out["meta"]


def restore_newest(manager: ocp.CheckpointManager, abstract_state, *,
                   restore_fn=None, log: Callable[[str], None] = print,
                   remove_broken: bool = True):
  """``(step, *restored)`` of the newest checkpoint that restores, or None
  when there is no checkpoint.

  Each newer one that does not restore is named in a warning (``log``);
  with ``remove_broken`` those are deleted once an older one restored (so
  the run can save those steps again). When none restores, nothing is
  deleted and `CheckpointError` names the newest (a damaged checkpoint and a
  changed network look alike then).

  Args:
    restore_fn: ``(manager, step, abstract_state) -> tuple`` (default
      `restore`: ``(state, meta)``).
  """
  restore_fn = restore_fn or restore
  steps = sorted(manager.all_steps(), reverse=True)
  broken = []
  for step in steps:
    try:
      out = restore_fn(manager, step, abstract_state)
    except CheckpointError as e:
      broken.append((step, e))
      log(f"warning: {e}; trying the previous checkpoint")
      continue
    if broken:
      names = ", ".join(step_dir(manager, s) for s, _ in broken)
      if remove_broken:
        for s, _ in broken:
          shutil.rmtree(step_dir(manager, s), ignore_errors=True)
        manager.reload()
      log(f"warning: resuming from checkpoint {step_dir(manager, step)}, the "
          f"newest that restores; {'removed' if remove_broken else 'skipped'}"
          f" the damaged {names}")
    return (step, *out)
  if broken:
    raise CheckpointError(
        f"no checkpoint in {manager.directory} restores (newest: "
        f"{broken[0][1]}); if the files are damaged, delete that folder (or "
        "rerun with --overwrite) to start over")
  return None


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs of ``tree`` (with ``sharding`` if given) for restore."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=sharding or getattr(x, "sharding",
                                                             None))
  return jax.tree.map(leaf, tree)
