"""The Pareto set of pruned networks: selection and orbax storage.

A *member* is one pruned, physically sliced network: its JSON config (enough
to rebuild it with `legr_jax.models.from_config`), its variables and its
figures (cost, accuracy). `save` writes every member's variables with orbax
under ``directory/members/<name>`` and a readable ``directory/pareto.json``;
`load` brings them back without the original network.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from legr_jax import models

INDEX = "pareto.json"


@dataclasses.dataclass
class Member:
  """One pruned network.

  Attributes:
    name: a path-safe identifier, e.g. ``flops_0.47``.
    net_config: ``small_net.config`` (JSON-serializable).
    variables: ``{'params', 'batch_stats'}`` of the sliced network.
    metrics: figures, at least ``flops`` (MACs) and the accuracy named by the
      caller (e.g. ``val_accuracy``); any JSON-serializable extras.
  """
  name: str
  net_config: dict
  variables: Any
  metrics: dict


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]
                 ) -> np.ndarray:
  """Boolean [N]: True where no other point is at most as costly and at least
  as accurate with one of the two strictly better."""
  c = np.asarray(costs, np.float64)
  a = np.asarray(accuracies, np.float64)
  if c.shape != a.shape or c.ndim != 1:
    raise ValueError(f"costs and accuracies must be 1-D of equal length, got "
                     f"{c.shape} and {a.shape}")
  dominated = ((c[None, :] <= c[:, None]) & (a[None, :] >= a[:, None]) &
               ((c[None, :] < c[:, None]) | (a[None, :] > a[:, None])))
  return ~dominated.any(axis=1)


def _safe_name(name: str) -> str:
  if not name or any(ch in name for ch in "/\\") or name.startswith("."):
    raise ValueError(f"member name {name!r} must be a plain file name")
  return name


def save(directory: str, members: Sequence[Member], *,
         accuracy_key: str = "val_accuracy", overwrite: bool = False) -> dict:
  """Stores ``members`` and marks the Pareto-optimal ones.

  Refuses (FileExistsError) to replace an existing set unless ``overwrite``.
  Returns the index written to ``directory/pareto.json``.
  """
  directory = os.path.abspath(directory)
  index_path = os.path.join(directory, INDEX)
  if os.path.exists(index_path) and not overwrite:
    raise FileExistsError(f"{index_path} exists; pass overwrite=True (or a "
                          "new directory) to replace that Pareto set")
  names = [_safe_name(m.name) for m in members]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate member names: {names}")
  for m in members:
    for key in ("flops", accuracy_key):
      if key not in m.metrics:
        raise ValueError(f"member {m.name!r} lacks metric {key!r}")
  front = pareto_front([m.metrics["flops"] for m in members],
                       [m.metrics[accuracy_key] for m in members])
  os.makedirs(os.path.join(directory, "members"), exist_ok=True)
  with ocp.PyTreeCheckpointer() as ckpt:
    for m in members:
      path = os.path.join(directory, "members", m.name)
      ckpt.save(path, jax.device_get(m.variables), force=overwrite)
  index = {
      "accuracy_key": accuracy_key,
      "members": [{"name": m.name, "pareto_optimal": bool(f),
                   "metrics": m.metrics, "net_config": m.net_config}
                  for m, f in zip(members, front)],
  }
  tmp = index_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  os.replace(tmp, index_path)
  return index


def load(directory: str, *, only_optimal: bool = False
         ) -> list[tuple[Any, dict, dict]]:
  """Returns ``[(net, variables, metrics), ...]`` rebuilt from ``directory``."""
  directory = os.path.abspath(directory)
  index_path = os.path.join(directory, INDEX)
  if not os.path.exists(index_path):
    raise FileNotFoundError(f"no Pareto set in {directory} ({INDEX} missing); "
                            "run python -m experiments.prune first")
  try:
    with open(index_path) as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{index_path} is corrupt ({e}); rerun "
                     "experiments.prune into a new workdir") from None
  out = []
  with ocp.PyTreeCheckpointer() as ckpt:
    for entry in index["members"]:
      if only_optimal and not entry["pareto_optimal"]:
        continue
      net = models.from_config(entry["net_config"])
      abstract = jax.eval_shape(net.init, jax.random.key(0))
      path = os.path.join(directory, "members", entry["name"])
      if not os.path.isdir(path):
        raise FileNotFoundError(f"member {entry['name']!r} listed in "
                                f"{index_path} but {path} is missing")
      variables = ckpt.restore(path, abstract)
      out.append((net, variables, entry["metrics"]))
  return out
