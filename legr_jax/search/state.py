"""Persistence of a search: the evolution state (orbax), the evaluation log
(JSONL) and the learned ranking (orbax + readable JSON).

Search checkpoints live in ``<workdir>/state/<count>/{state,meta}`` (the last
``keep`` are kept); ``count`` is the number of evaluations inserted. Saving is
synchronous, so a process killed at any point leaves the previous checkpoint
intact and the search resumes from it; a damaged newest checkpoint is
skipped (with a warning) for the newest one that restores.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from legr_jax.methods.legr import FORMAT_VERSION, check_format_version
from legr_jax.search.evolution import EvolutionState
from legr_jax.train import checkpoint as ckpt_lib
from legr_jax.train import loop as loop_lib

STATE_DIR = "state"
RANKING_JSON = "ranking.json"
RANKING_DIR = "ranking"
EVALUATIONS = "evaluations.jsonl"


def make_manager(workdir: str, *, keep: int = 2,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=False,
      create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir,
                                                            STATE_DIR)),
                               options=options, item_names=("state", "meta"))


def save_state(manager: ocp.CheckpointManager, state: EvolutionState,
               meta: dict) -> None:
  """Checkpoints ``state`` under its evaluation count."""
  step = int(state.count)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_get(state)),
      meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()


def restore_state(manager: ocp.CheckpointManager, like: EvolutionState, *,
                  log: Callable[[str], None] = print,
                  remove_broken: bool = True):
  """``(state, meta)`` of the newest checkpoint that restores, or None when
  there is none. ``like`` gives the tree structure, shapes and dtypes.
  Damaged newer checkpoints are named in a warning and (``remove_broken``)
  removed (`legr_jax.train.checkpoint.restore_newest`); when none restores,
  `CheckpointError` names the newest."""
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          like)
  out = ckpt_lib.restore_newest(manager, abstract, log=log,
                                remove_broken=remove_broken)
  return None if out is None else out[1:]


def digest(alpha, kappa) -> str:
  """Short content hash of one candidate's (alpha, kappa) (float32 bytes)."""
  h = hashlib.sha1(np.asarray(alpha, np.float32).tobytes())
  h.update(np.asarray(kappa, np.float32).tobytes())
  return h.hexdigest()[:12]


def _finite_or_none(x: float):
  x = float(x)
  return x if np.isfinite(x) else None


class EvaluationLog:
  """Appends one JSON record per evaluation to ``<workdir>/evaluations.jsonl``.

  `truncate(count)` drops records of evaluations >= count (written after the
  checkpoint a resumed search continues from), so the log of a resumed search
  equals that of an uninterrupted one.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, EVALUATIONS)

  def read(self) -> list[dict]:
    """The records; a line cut short by a killed process is skipped."""
    return [r for r in loop_lib.read_jsonl(self.path) if "evaluation" in r]

  def truncate(self, count: int) -> None:
    records = [r for r in self.read() if r["evaluation"] < count]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, self.path)

  def write(self, records: list[dict]) -> None:
    # `truncate` (every start) rewrites the file: no torn last line here.
    with open(self.path, "a") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
      f.flush()


def evaluation_records(index, alpha, kappa, result: dict, *, population: int,
                       round_index: int, seconds: float) -> list[dict]:
  """Log records of one round (loss null when infeasible / not finite)."""
  index = np.asarray(index)
  per = seconds / max(1, len(index))
  out = []
  for j, e in enumerate(index):
    out.append({
        "evaluation": int(e), "generation": int(e) // population,
        "round": round_index, "digest": digest(alpha[j], kappa[j]),
        "flops": float(result["flops"][j]),
        "feasible": bool(result["feasible"][j]),
        "loss": _finite_or_none(result["loss"][j]),
        "mask_digest": str(result["mask_digest"][j]),
        "cached": bool(result["cached"][j]),
        "seconds_per_candidate": round(per, 4)})
  return out


def save_ranking(workdir: str, layer_names, alpha, kappa, info: dict) -> None:
  """Writes ``ranking.json`` ({'layers': {name: {'alpha', 'kappa'}}, **info,
  'format_version'}) and the same arrays with orbax in
  ``<workdir>/ranking``."""
  alpha = np.asarray(alpha, np.float32)
  kappa = np.asarray(kappa, np.float32)
  layers = {name: {"alpha": float(a), "kappa": float(k)}
            for name, a, k in zip(layer_names, alpha, kappa)}
  doc = {"layers": layers, "layer_order": list(layer_names), **info,
         "format_version": FORMAT_VERSION}
  if jax.process_index() == 0:   # orbax below is written by every process
    path = os.path.join(workdir, RANKING_JSON)
    with open(path + ".tmp", "w") as f:
      json.dump(doc, f, indent=2)
      f.write("\n")
    os.replace(path + ".tmp", path)
  ckpt = ocp.StandardCheckpointer()
  target = os.path.abspath(os.path.join(workdir, RANKING_DIR))
  ckpt.save(target, {"alpha": alpha, "kappa": kappa}, force=True)
  ckpt.wait_until_finished()
  ckpt.close()


def load_ranking(workdir: str) -> dict:
  """``{layer: (alpha, kappa)}`` from ``ranking.json`` (ValueError for
  another format_version)."""
  path = os.path.join(workdir, RANKING_JSON)
  with open(path) as f:
    doc = json.load(f)
  check_format_version(doc, path)
  return {name: (v["alpha"], v["kappa"]) for name, v in doc["layers"].items()}


def load_ranking_orbax(workdir: str) -> dict:
  """``{'alpha': [L], 'kappa': [L]}`` from the orbax copy."""
  ckpt = ocp.StandardCheckpointer()
  out = ckpt.restore(os.path.abspath(os.path.join(workdir, RANKING_DIR)))
  ckpt.close()
  return {k: np.asarray(v) for k, v in out.items()}
