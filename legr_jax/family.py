"""A pruned family: one method, several budgets, the shared path after masks.

`prune_family` runs, for every budget, what every method shares once it has
its masks: physical slicing (`surgery`), evaluation right after pruning,
fine-tuning with one recipe (`train.fit`, resumable), evaluation again, the
measured latency of the sliced network (`latency`), and finally the Pareto
set (`pareto.save`). `experiments.prune` and `experiments.compare` both call
it, so methods differ only in their masks.

Workdir layout::

  <member>/            fine-tuning run of one budget (an experiments.train
                       workdir), named after the budget (flops_0.47, ...)
  <member>/member.json its figures (reused when rerun with the same inputs)
  <member>/final/      its sliced variables when not fine-tuned (orbax)
  pareto/              the Pareto set (orbax + pareto.json; pareto.png:
                       accuracy against MACs and latency, front marked)
  summary.json         every member's figures

Accuracies: ``val_*`` on the validation split (what methods may look at),
``test_*`` on the test split (reported only; no method reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np

from legr_jax import cost, latency, pareto, provenance, surgery
from legr_jax.methods.base import Method
from legr_jax.methods.budget import Budget

SUMMARY = "summary.json"
MEMBER_JSON = "member.json"


def data_record(config) -> dict:
  """The data fields of a baseline's `TrainConfig` that a learn stage records
  (and must reuse: the same validation split)."""
  return {"dataset": config.dataset, "data_dir": config.data_dir,
          "val_size": config.val_size, "val_fraction": config.val_fraction,
          "test_size": config.test_size, "split_seed": config.split_seed}


def variables_digest(variables) -> str:
  """A short digest of a variables pytree's values (identifies a baseline)."""
  h = hashlib.sha1()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(
      jax.device_get(variables))[0], key=lambda t: jax.tree_util.keystr(t[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


def member_name(budget: Budget, round_to: int = 1) -> str:
  return budget.name + (f"_round{round_to}" if round_to > 1 else "")


def _json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def _read(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _save_variables(path: str, variables) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.PyTreeCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(path), jax.device_get(variables), force=True)


def _restore_variables(path: str, net):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  abstract = jax.eval_shape(net.init, jax.random.key(0))
  with ocp.PyTreeCheckpointer() as ckpt:
    return ckpt.restore(os.path.abspath(path), abstract)


def _evaluate(net, variables, dataset, prefix: str, suffix: str = "") -> dict:
  from legr_jax import train  # pylint: disable=import-outside-toplevel
  out = {}
  splits = [("val", dataset.val)]
  if not dataset.test_is_val:
    splits.append(("test", dataset.test))
  for split, data in splits:
    loss, acc = train.evaluate(net, variables, data, mean=dataset.mean,
                               std=dataset.std)
    out[f"{prefix}{split}_accuracy{suffix}"] = float(acc)
    out[f"{prefix}{split}_loss{suffix}"] = float(loss)
  return out


def prune_member(net, variables, dataset, method: Method, budget: Budget, *,
                 workdir: str, finetune=None, artifact: str | None = None,
                 round_to: int = 1, latency_batch: int = 128,
                 latency_repeats: int = 10, overwrite: bool = False,
                 progress: bool = True, log: Callable[[str], None] = print
                 ) -> pareto.Member:
  """Prunes ``net`` with ``method`` to ``budget``, fine-tunes the sliced
  network with ``finetune`` (a `TrainConfig`, or None: no fine-tuning) in
  ``workdir`` and measures it. Rerun with the same inputs, it reuses the
  finished work."""
  from legr_jax import train  # pylint: disable=import-outside-toplevel
  budget = Budget.parse(budget)
  name = member_name(budget, round_to)
  key = {"method": method.config(), "budget": str(budget),
         "round_to": round_to, "baseline": variables_digest(variables),
         "net": net.config, "artifact": artifact and os.path.abspath(
             artifact),
         "finetune": finetune.to_dict() if finetune is not None else None,
         "latency_batch": latency_batch}
  # The cpu_kernels setting is operational: it does not change the member.
  if key["finetune"]:
    key["finetune"].pop("cpu_kernels", None)
  os.makedirs(workdir, exist_ok=True)
  cached = _read(os.path.join(workdir, MEMBER_JSON))
  t0 = time.perf_counter()
  pruned = method.prune(net, variables, budget, artifact=artifact,
                        round_to=round_to)
  method_s = time.perf_counter() - t0
  full = pruned.variables if pruned.variables is not None else variables
  small, small_vars = surgery.slice_network(net, jax.device_get(full),
                                            pruned.masks)
  if cached is not None and cached.get("key") == key and not overwrite:
    if finetune is not None:
      small_vars = train.fit(finetune, workdir, net=small,
                             variables=small_vars, dataset=dataset,
                             progress=False, log=lambda s: None).variables
    log(f"[{method.name} {name}] done before; nothing to do")
    return pareto.Member(name, small.config, jax.device_get(small_vars),
                         cached["metrics"])
  before = _evaluate(small, small_vars, dataset, "", "_pruned")
  if finetune is not None:
    fit = train.fit(finetune, workdir, net=small, variables=small_vars,
                    dataset=dataset, overwrite=overwrite, progress=progress,
                    log=log)
    small_vars = fit.variables
    after = _evaluate(small, small_vars, dataset, "")
  else:
    after = {k.replace("_pruned", ""): v for k, v in before.items()}
  lat = latency.measure(small, small_vars, batch=latency_batch,
                        repeats=latency_repeats)
  spec0 = net.spec
  metrics = {
      "method": method.name, "budget": budget.fraction,
      "budget_metric": budget.metric,
      "flops": cost.unpruned(small.spec, "flops"),
      "flops_fraction": cost.unpruned(small.spec, "flops") /
                        cost.unpruned(spec0, "flops"),
      "params": cost.unpruned(small.spec, "params"),
      "params_fraction": cost.unpruned(small.spec, "params") /
                         cost.unpruned(spec0, "params"),
      "widths": {g.name: g.size for g in small.spec.groups},
      **before, **after,
      "test_split": "val" if dataset.test_is_val else "test",
      "finetune_epochs": finetune.epochs if finetune is not None else 0,
      "method_seconds": method_s, "method_info": pruned.info,
      "latency_ms": lat["median_ms"], "latency_batch": lat["batch"],
      "device_kind": lat["device_kind"],
  }
  if finetune is None:
    _save_variables(os.path.join(workdir, "final"), small_vars)
  _json(os.path.join(workdir, MEMBER_JSON), {"key": key, "metrics": metrics})
  return pareto.Member(name, small.config, jax.device_get(small_vars),
                       metrics)


def prune_family(net, variables, dataset, method: Method,
                 budgets: Sequence, *, workdir: str, finetune=None,
                 artifact: str | None = None, round_to: int = 1,
                 latency_batch: int = 128, latency_repeats: int = 10,
                 overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print,
                 summary_extra: dict | None = None) -> list[dict]:
  """Prunes to every budget (`prune_member`), stores the Pareto set in
  ``workdir/pareto`` and ``workdir/summary.json``; returns the members'
  figures in budget order."""
  budgets = sorted({Budget.parse(b) for b in budgets},
                   key=lambda b: (b.metric, b.fraction))
  if not budgets:
    raise ValueError("give at least one budget")
  os.makedirs(workdir, exist_ok=True)
  provenance.record_session(workdir, {"job": "prune_family",
                                      "method": method.config()})
  members = []
  for b in budgets:
    m = prune_member(net, variables, dataset, method, b,
                     workdir=os.path.join(workdir, member_name(b, round_to)),
                     finetune=finetune, artifact=artifact, round_to=round_to,
                     latency_batch=latency_batch,
                     latency_repeats=latency_repeats, overwrite=overwrite,
                     progress=progress, log=log)
    members.append(m)
    r = m.metrics
    log(f"[{method.name} {m.name}] {r['flops_fraction']:.3f} of the MACs, "
        f"{r['params_fraction']:.3f} of the params; val acc right after "
        f"pruning {r['val_accuracy_pruned']:.4f}, after fine-tuning "
        f"{r['val_accuracy']:.4f}")
  index = pareto.save(os.path.join(workdir, "pareto"), members,
                      overwrite=True)
  try:
    pareto.plot(os.path.join(workdir, "pareto"),
                os.path.join(workdir, "pareto", pareto.PLOT),
                title=f"{method.name}: {net.name}")
  except Exception as e:  # pylint: disable=broad-except
    log(f"warning: could not draw {pareto.PLOT}: {e}")
  rows = [dict(m.metrics, name=m.name, pareto_optimal=e["pareto_optimal"])
          for m, e in zip(members, index["members"])]
  _json(os.path.join(workdir, SUMMARY), {
      "method": method.config(), "round_to": round_to,
      "artifact": artifact and os.path.abspath(artifact),
      "unpruned_flops": cost.unpruned(net.spec, "flops"),
      "unpruned_params": cost.unpruned(net.spec, "params"),
      **(summary_extra or {}), "members": rows})
  return rows
