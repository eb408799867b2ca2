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

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np

from legr_jax import cost, latency, pareto, provenance, surgery
from legr_jax.methods import budget as budget_lib
from legr_jax.methods.base import Method
from legr_jax.methods.budget import Budget

SUMMARY = "summary.json"
MEMBER_JSON = "member.json"
FINAL = "final"
PARALLEL_DIR = "parallel_finetune"
FINETUNE_MODES = ("auto", "parallel", "sequential")
LATENCY_JSON = "latency_budgets.json"


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


def _key(net, variables, method, budget, round_to, artifact, finetune,
         latency_batch) -> dict:
  key = {"method": method.config(), "budget": str(budget),
         "round_to": round_to, "baseline": variables_digest(variables),
         "net": net.config, "artifact": artifact and os.path.abspath(
             artifact),
         "finetune": finetune.to_dict() if finetune is not None else None,
         "latency_batch": latency_batch}
  # The cpu_kernels setting is operational: it does not change the member.
  if key["finetune"]:
    key["finetune"].pop("cpu_kernels", None)
  return key


class _Prepared:
  """A member between its masks and its fine-tuning."""

  def __init__(self, net, variables, method, budget, *, workdir, finetune,
               artifact, round_to, latency_batch, overwrite, requested=None):
    self.budget = budget = Budget.parse(budget)
    self.requested = requested or budget   # what names the member
    self.name = member_name(self.requested, round_to)
    self.workdir = workdir
    self.key = _key(net, variables, method, budget, round_to, artifact,
                    finetune, latency_batch)
    self.key["requested"] = str(self.requested)
    os.makedirs(workdir, exist_ok=True)
    cached = _read(os.path.join(workdir, MEMBER_JSON))
    self.cached = (cached if cached is not None and
                   cached.get("key") == self.key and not overwrite else None)
    t0 = time.perf_counter()
    self.pruned = method.prune(net, variables, budget, artifact=artifact,
                               round_to=round_to)
    self.method_s = time.perf_counter() - t0
    self.full = jax.device_get(self.pruned.variables
                               if self.pruned.variables is not None
                               else variables)
    self.small, self.small_vars = surgery.slice_network(net, self.full,
                                                        self.pruned.masks)


def _finish(net, method, prep: _Prepared, dataset, tuned_vars, before: dict,
            finetune, latency_batch: int, latency_repeats: int,
            extra: dict | None = None) -> pareto.Member:
  """Evaluates, times and records a fine-tuned (or not) member."""
  small = prep.small
  if finetune is not None:
    after = _evaluate(small, tuned_vars, dataset, "")
  else:
    after = {k.replace("_pruned", ""): v for k, v in before.items()}
  lat = latency.measure(small, tuned_vars, batch=latency_batch,
                        repeats=latency_repeats)
  lat1 = latency.measure(small, tuned_vars, batch=1,
                         repeats=max(latency_repeats, 10))
  spec0 = net.spec
  metrics = {
      "method": method.name, "budget": prep.requested.fraction,
      "budget_metric": prep.requested.metric,
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
      "method_seconds": prep.method_s, "method_info": prep.pruned.info,
      "latency_ms": lat["median_ms"], "latency_batch": lat["batch"],
      "latency_ms_batch1": lat1["median_ms"],
      "device_kind": lat["device_kind"], **(extra or {}),
  }
  _save_variables(os.path.join(prep.workdir, FINAL), tuned_vars)
  _json(os.path.join(prep.workdir, MEMBER_JSON),
        {"key": prep.key, "metrics": metrics})
  return pareto.Member(prep.name, small.config, jax.device_get(tuned_vars),
                       metrics)


def _reuse(method, prep: _Prepared, dataset, finetune, log
           ) -> pareto.Member:
  from legr_jax import train  # pylint: disable=import-outside-toplevel
  final = os.path.join(prep.workdir, FINAL)
  if os.path.exists(final):
    small_vars = _restore_variables(final, prep.small)
  elif finetune is not None:   # written before final/ was kept
    small_vars = train.fit(finetune, prep.workdir, net=prep.small,
                           variables=prep.small_vars, dataset=dataset,
                           progress=False, log=lambda s: None).variables
  else:
    small_vars = prep.small_vars
  log(f"[{method.name} {prep.name}] done before; nothing to do")
  return pareto.Member(prep.name, prep.small.config,
                       jax.device_get(small_vars), prep.cached["metrics"])


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
  prep = _Prepared(net, variables, method, budget, workdir=workdir,
                   finetune=finetune, artifact=artifact, round_to=round_to,
                   latency_batch=latency_batch, overwrite=overwrite)
  if prep.cached is not None:
    return _reuse(method, prep, dataset, finetune, log)
  before = _evaluate(prep.small, prep.small_vars, dataset, "", "_pruned")
  tuned = prep.small_vars
  if finetune is not None:
    tuned = train.fit(finetune, workdir, net=prep.small,
                      variables=prep.small_vars, dataset=dataset,
                      overwrite=overwrite, progress=progress,
                      log=log).variables
  return _finish(net, method, prep, dataset, tuned, before, finetune,
                 latency_batch, latency_repeats, {"finetune_mode": "sequential"})


def default_finetune_mode(devices=None) -> str:
  """'parallel' on GPU/TPU (masked full-size members batched with vmap),
  'sequential' on CPU (sliced members one after another: cheaper there,
  benchmarks/bench_family_finetune.py)."""
  devices = devices or jax.local_devices()
  return "sequential" if devices[0].platform == "cpu" else "parallel"


def _default_latency_fn(batch: int, repeats: int):
  def fn(small, small_vars) -> float:
    return latency.measure(small, small_vars, batch=batch,
                           repeats=repeats)["median_ms"]
  return fn


def resolve_latency_budget(net, variables, method: Method,
                           budget: "latency.LatencyBudget", *, workdir: str,
                           artifact: str | None = None, round_to: int = 1,
                           latency_batch: int = 128, latency_repeats: int = 10,
                           latency_fn=None, steps: int = 10,
                           log: Callable[[str], None] = print
                           ) -> tuple[Budget, dict]:
  """The FLOPs budget that meets a latency budget on this device, found once.

  The target is ``budget.fraction`` of the unpruned network's measured
  latency (``latency_fn(net, variables) -> ms``, default: median of jitted
  forward passes at ``latency_batch``). ``steps`` bisection steps over the
  FLOPs fraction, each pruning with ``method``, slicing and measuring, keep
  the largest fraction whose sliced network met the target. The answer and
  every trial are stored in ``workdir/latency_budgets.json`` and reused on
  a rerun with the same inputs (no measuring: reproducible and resumable).
  Raises `InfeasibleBudgetError` when even the smallest feasible network is
  too slow.
  """
  path = os.path.join(workdir, LATENCY_JSON)
  stored = _read(path) or {}
  key = {"method": method.config(), "baseline": variables_digest(variables),
         "net": net.config, "round_to": round_to,
         "latency_batch": latency_batch,
         "artifact": artifact and os.path.abspath(artifact)}
  hit = stored.get(str(budget))
  if hit is not None and hit.get("key") == key:
    log(f"[{method.name} {budget.name}] FLOPs fraction "
        f"{hit['flops_fraction']:.4f} found before on {hit['device_kind']}")
    return Budget("flops", hit["flops_fraction"]), hit
  fn = latency_fn or _default_latency_fn(latency_batch,
                                         max(20, latency_repeats))
  # the reference twice, the faster kept: a first measurement on a busy
  # machine often runs slow, and it sets every trial's target
  host = jax.device_get(variables)
  full_ms = min(float(fn(net, host)), float(fn(net, host)))
  target = budget.fraction * full_ms
  trials = []

  def measured(f: float):
    try:
      pruned = method.prune(net, variables, Budget("flops", f),
                            artifact=artifact, round_to=round_to)
    except budget_lib.InfeasibleBudgetError:
      return None
    full = pruned.variables if pruned.variables is not None else variables
    small, sv = surgery.slice_network(net, jax.device_get(full),
                                      pruned.masks)
    ms = float(fn(small, sv))
    trials.append({"flops_fraction": f, "latency_ms": ms})
    log(f"[{method.name} {budget.name}] FLOPs {f:.4f}: {ms:.3f} ms "
        f"(target {target:.3f} ms)")
    return ms

  lo, hi = 0.0, 1.0       # lo: known to meet (or nothing yet); hi: too slow
  best = None
  if budget.fraction >= 1.0:
    best = 1.0
  else:
    for _ in range(steps):
      mid = (lo + hi) / 2
      ms = measured(mid)
      if ms is None or ms <= target:   # infeasible (below the safeguard's
        lo = mid                        # floor) or fast enough: go up
        best = mid if ms is not None else best
      else:
        hi = mid
    if best is None:
      fastest = min(trials, key=lambda t: t["latency_ms"], default=None)
      raise budget_lib.InfeasibleBudgetError(
          f"latency budget {budget}: no FLOPs fraction tried meets "
          f"{target:.3f} ms ({budget.fraction:g} of the unpruned "
          f"{full_ms:.3f} ms); the fastest was {fastest}; raise the budget")
  found = {"key": key, "flops_fraction": best, "target_ms": target,
           "unpruned_ms": full_ms, "device_kind": jax.devices()[0].device_kind,
           "trials": trials}
  stored[str(budget)] = found
  os.makedirs(workdir, exist_ok=True)
  _json(path, stored)
  return Budget("flops", best), found


@dataclasses.dataclass
class FamilyJob:
  """One method's family in `prune_families`: its workdir (a
  `prune_family` workdir), learned artifact and extra summary fields."""
  method: Method
  workdir: str
  artifact: str | None = None
  summary_extra: dict | None = None


def prune_family(net, variables, dataset, method: Method,
                 budgets: Sequence, *, workdir: str, finetune=None,
                 artifact: str | None = None, round_to: int = 1,
                 latency_batch: int = 128, latency_repeats: int = 10,
                 overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print,
                 summary_extra: dict | None = None,
                 finetune_mode: str = "auto", latency_fn=None) -> list[dict]:
  """Prunes to every budget, fine-tunes, stores the Pareto set in
  ``workdir/pareto`` and ``workdir/summary.json``; returns the members'
  figures in budget order.

  Budgets: `Budget`s or strings ('0.47', 'flops:0.47', 'params:0.5',
  'latency:0.5'; a latency budget is solved by measurement once:
  `resolve_latency_budget`, with ``latency_fn`` injectable). ``finetune_mode``:
  'sequential' (each sliced member with `train.fit`, in its own folder),
  'parallel' (every unfinished member at once as masked full-size networks,
  `train.members.fit_members`, spread over the local devices) or 'auto'
  (`default_finetune_mode`). Both give the same members up to float
  summation order.
  """
  return prune_families(
      net, variables, dataset, [FamilyJob(method, workdir, artifact,
                                          summary_extra)], budgets,
      finetune=finetune, round_to=round_to, latency_batch=latency_batch,
      latency_repeats=latency_repeats, overwrite=overwrite,
      progress=progress, log=log, finetune_mode=finetune_mode,
      latency_fn=latency_fn)[0]


def prune_families(net, variables, dataset, jobs: Sequence[FamilyJob],
                   budgets: Sequence, *, finetune=None, round_to: int = 1,
                   latency_batch: int = 128, latency_repeats: int = 10,
                   overwrite: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print,
                   finetune_mode: str = "auto", latency_fn=None,
                   parallel_workdir: str | None = None) -> list[list[dict]]:
  """`prune_family` of several methods at once (``experiments.compare``):
  in 'parallel' mode every unfinished member of every job (K methods x
  budgets) is fine-tuned in one `train.members.fit_members` run (in
  ``parallel_workdir``, default the first job's ``parallel_finetune``);
  returns each job's rows."""
  from legr_jax import train  # pylint: disable=import-outside-toplevel
  from legr_jax.train import members as members_lib  # pylint: disable=import-outside-toplevel
  if finetune_mode not in FINETUNE_MODES:
    raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, got "
                     f"{finetune_mode!r}")
  budgets = sorted({latency.parse_budget(b) for b in budgets},
                   key=lambda b: (b.metric, b.fraction))
  if not budgets:
    raise ValueError("give at least one budget")
  if not jobs:
    raise ValueError("give at least one method")
  mode = (default_finetune_mode() if finetune_mode == "auto"
          else finetune_mode)
  preps, extras, owner = [], [], []
  for j, job in enumerate(jobs):
    method, workdir, artifact = job.method, job.workdir, job.artifact
    os.makedirs(workdir, exist_ok=True)
    provenance.record_session(workdir, {"job": "prune_family",
                                        "method": method.config(),
                                        "finetune_mode": mode})
    for b in budgets:
      extra = {"finetune_mode": mode}
      if b.metric == "latency":
        solved, found = resolve_latency_budget(
            net, variables, method, b, workdir=workdir, artifact=artifact,
            round_to=round_to, latency_batch=latency_batch,
            latency_repeats=latency_repeats, latency_fn=latency_fn, log=log)
        extra.update(latency_budget_flops=solved.fraction,
                     latency_budget_target_ms=found["target_ms"])
      else:
        solved = b
      preps.append(_Prepared(net, variables, method, solved,
                             workdir=os.path.join(workdir,
                                                  member_name(b, round_to)),
                             finetune=finetune, artifact=artifact,
                             round_to=round_to, latency_batch=latency_batch,
                             overwrite=overwrite, requested=b))
      extras.append(extra)
      owner.append(j)
  todo = [i for i, p in enumerate(preps) if p.cached is None]
  befores = {i: _evaluate(preps[i].small, preps[i].small_vars, dataset, "",
                          "_pruned") for i in todo}
  tuned = {i: preps[i].small_vars for i in todo}
  if finetune is not None and todo and mode == "parallel":
    t0 = time.perf_counter()
    fulls = members_lib.fit_members(
        finetune, parallel_workdir or os.path.join(jobs[0].workdir,
                                                   PARALLEL_DIR),
        net=net, variables=[preps[i].full for i in todo],
        masks=[preps[i].pruned.masks for i in todo], dataset=dataset,
        progress=progress, log=log)
    for i, fv in zip(todo, fulls):
      tuned[i] = surgery.slice_network(net, fv, preps[i].pruned.masks)[1]
      extras[i]["finetune_seconds"] = (time.perf_counter() - t0) / len(todo)
      extras[i]["finetune_members_together"] = len(todo)
  elif finetune is not None:
    for i in todo:
      t0 = time.perf_counter()
      tuned[i] = train.fit(finetune, preps[i].workdir, net=preps[i].small,
                           variables=preps[i].small_vars, dataset=dataset,
                           overwrite=overwrite, progress=progress,
                           log=log).variables
      extras[i]["finetune_seconds"] = time.perf_counter() - t0
  out = []
  for j, job in enumerate(jobs):
    method, workdir = job.method, job.workdir
    members = []
    for i, p in enumerate(preps):
      if owner[i] != j:
        continue
      if p.cached is not None:
        m = _reuse(method, p, dataset, finetune, log)
      else:
        m = _finish(net, method, p, dataset, tuned[i], befores[i], finetune,
                    latency_batch, latency_repeats, extras[i])
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
        "artifact": job.artifact and os.path.abspath(job.artifact),
        "unpruned_flops": cost.unpruned(net.spec, "flops"),
        "unpruned_params": cost.unpruned(net.spec, "params"),
        **(job.summary_extra or {}), "members": rows})
    out.append(rows)
  return out
