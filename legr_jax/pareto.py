"""The Pareto set of pruned networks: selection, orbax storage, choice, plot.

A *member* is one pruned, physically sliced network: its JSON config (enough
to rebuild it with `legr_jax.models.from_config`), its variables and its
figures (cost, accuracy). `save` writes every member's variables with orbax
under ``directory/members/<name>`` and a readable ``directory/pareto.json``
(``format_version`` `FORMAT_VERSION`; files without one are version 1);
`load` brings them back without the original network. `pick` returns the
most accurate member within FLOPs / params / latency limits; `plot` draws
accuracy against FLOPs and against latency with the front highlighted.

Every reader takes the set's folder or the prune workdir holding it
(``WORKDIR/pareto``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from legr_jax import models

INDEX = "pareto.json"
FOLDER = "pareto"          # the set's folder inside a prune workdir
PLOT = "pareto.png"        # `legr_jax.family.prune_family` draws it there
FORMAT_VERSION = 1         # of pareto.json; absent (older files): 1


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
      "format_version": FORMAT_VERSION,
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


def resolve_directory(path: str) -> str:
  """The Pareto set's folder: ``path`` when it holds `INDEX`, else
  ``path/pareto`` when that does (a prune workdir); FileNotFoundError
  otherwise."""
  path = os.path.abspath(os.fspath(path))
  for d in (path, os.path.join(path, FOLDER)):
    if os.path.exists(os.path.join(d, INDEX)):
      return d
  raise FileNotFoundError(f"no Pareto set in {path} ({INDEX} missing there "
                          f"and in {FOLDER}/); run python -m "
                          "experiments.prune first")


def read_index(path: str) -> tuple[str, dict]:
  """``(folder, index)``: the set's folder (see `resolve_directory`) and its
  parsed `INDEX`, checked for `FORMAT_VERSION` (ValueError naming the file
  and both versions)."""
  directory = resolve_directory(path)
  index_path = os.path.join(directory, INDEX)
  try:
    with open(index_path) as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{index_path} is corrupt ({e}); rerun "
                     "experiments.prune into a new workdir") from None
  version = index.get("format_version", 1) if isinstance(index, dict) else 1
  if version != FORMAT_VERSION:
    raise ValueError(f"{index_path} has format_version {version!r}; this "
                     f"legr_jax reads format_version {FORMAT_VERSION}: use "
                     "the legr_jax that wrote it, or prune again")
  if not isinstance(index, dict) or not isinstance(index.get("members"),
                                                   list):
    raise ValueError(f"{index_path} is not a Pareto set index (no members "
                     "list); rerun experiments.prune into a new workdir")
  return directory, index


def _restore(directory: str, entry: dict, index_path: str):
  net = models.from_config(entry["net_config"])
  abstract = jax.eval_shape(net.init, jax.random.key(0))
  path = os.path.join(directory, "members", entry["name"])
  if not os.path.isdir(path):
    raise FileNotFoundError(f"member {entry['name']!r} listed in "
                            f"{index_path} but {path} is missing")
  with ocp.PyTreeCheckpointer() as ckpt:
    return net, ckpt.restore(path, abstract)


def load(directory: str, *, only_optimal: bool = False
         ) -> list[tuple[Any, dict, dict]]:
  """Returns ``[(net, variables, metrics), ...]`` rebuilt from ``directory``
  (the set's folder or the prune workdir holding ``pareto/``)."""
  directory, index = read_index(directory)
  index_path = os.path.join(directory, INDEX)
  out = []
  for entry in index["members"]:
    if only_optimal and not entry["pareto_optimal"]:
      continue
    net, variables = _restore(directory, entry, index_path)
    out.append((net, variables, entry["metrics"]))
  return out


@dataclasses.dataclass
class Picked:
  """The member `pick` chose, ready to run: ``picked.apply(x)`` is
  ``net.apply(variables, x)``, jitted (eval mode, logits [N, num_classes]).

  Unpacks like a `load` entry: ``net, variables, metrics = picked``.

  Attributes:
    name: the member's name (e.g. ``flops_0.47``).
    net: the sliced `PrunableNet` (plain XLA ops).
    variables: its ``{'params', 'batch_stats'}``.
    metrics: its figures as stored (see `legr_jax.family`).
    accuracy_key: the metric it was chosen on.
  """
  name: str
  net: Any
  variables: Any
  metrics: dict
  accuracy_key: str
  _forward: Any = dataclasses.field(default=None, init=False, repr=False,
                                    compare=False)

  def apply(self, x):
    """Logits of images ``x`` [N, H, W, C] (jitted once per Picked)."""
    if self._forward is None:
      self._forward = jax.jit(self.net.apply)
    return self._forward(self.variables, x)

  def __iter__(self):
    return iter((self.net, self.variables, self.metrics))


# pick's limits: keyword -> the metric it bounds.
LIMITS = {"max_flops": "flops_fraction", "max_params": "params_fraction",
          "max_latency_ms": "latency_ms"}


def _entries(source, accuracy_key):
  """``(entries, accuracy_key, where, directory)``; entries are dicts with
  name, metrics and (members) net / variables or (folders) the index
  entry."""
  if isinstance(source, (str, os.PathLike)):
    directory, index = read_index(source)
    key = accuracy_key or index.get("accuracy_key", "val_accuracy")
    return ([{"name": e["name"], "metrics": e["metrics"], "entry": e}
             for e in index["members"]], key,
            os.path.join(directory, INDEX), directory)
  out = []
  for i, m in enumerate(source):
    if isinstance(m, Member):
      out.append({"name": m.name, "metrics": m.metrics, "member": m})
    elif isinstance(m, Picked):
      out.append({"name": m.name, "metrics": m.metrics,
                  "net": m.net, "variables": m.variables})
    elif isinstance(m, (tuple, list)) and len(m) == 3:
      net, variables, metrics = m
      out.append({"name": str(metrics.get("name", f"#{i}")),
                  "metrics": metrics, "net": net, "variables": variables})
    else:
      raise TypeError(f"member #{i}: expected a pareto.Member or a (net, "
                      f"variables, metrics) tuple, got {type(m).__name__}")
  return out, accuracy_key or "val_accuracy", "the members given", None


def _figures(metrics: dict, keys) -> str:
  parts = []
  for k in keys:
    v = metrics.get(k)
    if isinstance(v, float):
      v = f"{v:.4g}"
    parts.append(f"{k} {v}")
  if "latency_ms" in keys and "latency_batch" in metrics:
    parts.append(f"latency_batch {metrics['latency_batch']}")
  if any(str(k).startswith("latency_ms") for k in keys) and (
      "device_kind" in metrics):
    parts.append(f"device_kind {metrics['device_kind']!r}")
  return ", ".join(parts)


def pick(workdir_or_members, max_flops: float | None = None,
         max_params: float | None = None,
         max_latency_ms: float | None = None, *,
         latency_batch: str = "serving",
         accuracy_key: str | None = None) -> Picked:
  """The most accurate member meeting every limit given.

  Args:
    workdir_or_members: a prune workdir, a Pareto set folder, or members
      (`Member`s or `load`'s ``(net, variables, metrics)`` tuples).
    max_flops: at most this fraction of the unpruned network's MACs (metric
      ``flops_fraction``; budgets' convention).
    max_params: at most this fraction of its parameters
      (``params_fraction``).
    max_latency_ms: at most this ``latency_ms`` (median ms of one forward
      pass of ``latency_batch`` images on the recorded ``device_kind``; all
      members must share both).
    latency_batch: which latency ``max_latency_ms`` bounds: 'serving'
      (``latency_ms``, at the recorded ``latency_batch``) or 1
      (``latency_ms_batch1``, one image per call).
    accuracy_key: the metric maximised; default the set's own
      ``accuracy_key`` (``val_accuracy``). Test-split keys are refused: the
      test split is reported, never chosen on.

  Ties in accuracy go to the fewer MACs. Only the chosen member's variables
  are read from disk. ValueError when no member qualifies (naming the
  cheapest: the least ratio figure / limit over the limits given), when a
  member lacks a limited metric (sets written before it was recorded) or
  the accuracy; TypeError / FileNotFoundError for bad sources.
  """
  if latency_batch not in ("serving", 1):
    raise ValueError(f"latency_batch must be 'serving' or 1, got "
                     f"{latency_batch!r}")
  lat_key = "latency_ms" if latency_batch == "serving" else "latency_ms_batch1"
  limit_of = dict(LIMITS, max_latency_ms=lat_key)
  limits = {limit_of[k]: v for k, v in (("max_flops", max_flops),
                                        ("max_params", max_params),
                                        ("max_latency_ms", max_latency_ms))
            if v is not None}
  for metric, v in limits.items():
    name = next(k for k, m in limit_of.items() if m == metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
        math.isfinite(v) and v > 0):
      raise ValueError(f"{name} must be a positive number, got {v!r}")
  entries, key, where, directory = _entries(workdir_or_members, accuracy_key)
  if key.startswith("test") or "_test" in key:
    raise ValueError(f"accuracy key {key!r} is a test-split figure: members "
                     "are chosen on validation figures (e.g. val_accuracy)")
  if not entries:
    raise ValueError(f"no members in {where}")
  for e in entries:
    for metric in (key, *limits):
      if metric not in e["metrics"] or e["metrics"][metric] is None:
        what = f"accuracy {metric!r}" if metric == key else (
            f"{metric!r}, which "
            f"{next(k for k, m in limit_of.items() if m == metric)} bounds "
            "(written before it was recorded: prune again)")
        raise ValueError(f"member {e['name']!r} in {where} lacks {what}")
  if lat_key in limits:
    kinds = {(e["metrics"].get("latency_batch") if lat_key == "latency_ms"
              else 1,
              e["metrics"].get("device_kind")) for e in entries}
    if len(kinds) > 1:
      raise ValueError(f"members in {where} were timed at different (batch, "
                       f"device) settings {sorted(map(str, kinds))}: their "
                       "latencies do not compare")
  ok = [e for e in entries
        if all(float(e["metrics"][m]) <= v for m, v in limits.items())]
  if not ok:
    def excess(e):
      return max(float(e["metrics"][m]) / v for m, v in limits.items())
    cheap = min(entries, key=excess)
    asked = ", ".join(f"{k}={v}" for k, v in (
        ("max_flops", max_flops), ("max_params", max_params),
        ("max_latency_ms", max_latency_ms)) if v is not None)
    raise ValueError(
        f"no member of {where} meets {asked}; the cheapest is "
        f"{cheap['name']!r}: {_figures(cheap['metrics'], [*limits, key])}")
  best = max(ok, key=lambda e: (float(e["metrics"][key]),
                                -float(e["metrics"].get("flops", 0.0))))
  if "entry" in best:
    net, variables = _restore(directory, best["entry"], where)
  elif "member" in best:
    m = best["member"]
    net, variables = models.from_config(m.net_config), m.variables
  else:
    net, variables = best["net"], best["variables"]
  return Picked(best["name"], net, variables, best["metrics"], key)


def plot(directory_or_members, path: str, *, accuracy_key: str | None = None,
         title: str = "") -> str:
  """Writes a PNG to ``path``: accuracy against the MACs (fraction of the
  unpruned network, else absolute) and against ``latency_ms`` (a note where
  no member has it), each panel's Pareto front drawn as a line with its
  members highlighted and named. Reads only pareto.json, not the
  variables. Returns ``path``. Needs matplotlib (Agg backend)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  entries, key, _, _ = _entries(directory_or_members, accuracy_key)
  rows = [(e["name"], e["metrics"]) for e in entries
          if e["metrics"].get(key) is not None]
  if not rows:
    raise ValueError(f"no member has accuracy {key!r} to plot")
  xfl = "flops_fraction" if all(m.get("flops_fraction") is not None
                                for _, m in rows) else "flops"
  panels = [(xfl, "MACs (fraction of unpruned)" if xfl == "flops_fraction"
             else "MACs")]
  timed = [m for _, m in rows if m.get("latency_ms") is not None]
  batch = sorted({str(m.get("latency_batch", "?")) for m in timed})
  kinds = sorted({str(m.get("device_kind", "?")) for m in timed})
  panels.append(("latency_ms", f"latency (ms per batch of {'/'.join(batch)}"
                 f" on {'/'.join(kinds)})" if timed else "latency (ms)"))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
  for ax, (xkey, xlabel) in zip(axes, panels):
    pts = [(n, m) for n, m in rows if m.get(xkey) is not None]
    ax.set_xlabel(xlabel)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    if not pts:
      ax.text(0.5, 0.5, f"no member has {xkey}", ha="center", va="center",
              transform=ax.transAxes, color="0.4")
      continue
    x = np.asarray([float(m[xkey]) for _, m in pts])
    y = np.asarray([float(m[key]) for _, m in pts])
    front = pareto_front(x, y)
    order = np.argsort(x[front], kind="stable")
    ax.scatter(x[~front], y[~front], s=22, color="0.6", label="dominated")
    ax.plot(x[front][order], y[front][order], "-o", color="tab:red", ms=6,
            drawstyle="steps-post", label="Pareto front")
    for (name, _), xi, yi, f in zip(pts, x, y, front):
      ax.annotate(name, (xi, yi), xytext=(4, 4), textcoords="offset points",
                  fontsize=7, color="tab:red" if f else "0.4")
    ax.legend(loc="lower right", fontsize=8)
  fig.suptitle(title or f"Pareto set: {key} against cost")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
