"""Soft channel gates trained under a differentiable cost budget: the shared
machinery of the learned-gate methods (``dagger``, ``sbf``).

* Granularity: one gate per channel of a *group* (`NetSpec.groups`, the
  masks' granularity), passed to ``net.apply`` as the masks, so a gate
  multiplies its channel after BatchNorm, wherever the group's mask goes
  (every member conv, zero-pad shortcuts). A residual stream has one gate per
  channel, not one per member layer summed (no chain-sum bias).
* Cost: `cost_fraction` is the MACs (or weights) of the soft-gated network
  as a fraction of the unpruned one: `legr_jax.cost`'s quadratic form
  ``a^T Q a + l.a + c`` with the widths ``a_g = sum_j gate_gj``. It is a
  smooth function of the gates, exact for 0/1 gates, in the gates' dtype
  (float64 under ``jax.experimental.enable_x64``, for gradient checks).
* Regularizers of that fraction ``f`` against a target ``t``
  (`budget_penalty`): ``squared`` ``(f - t)^2`` (pulls from both sides),
  ``hinge`` ``max(0, f - t)`` (an additive, L1-like push while above the
  target, none below) and ``squared_hinge`` ``max(0, f - t)^2``.
* `learn`: trains a separate pytree of gate / score parameters with optax
  beside (or instead of) the network weights, through the `Extra` hook of
  `legr_jax.train.step.train_step` (no second copy of the step). Training
  split only, batches in the order of `legr_jax.data.batches` for the seed;
  orbax checkpoints every ``checkpoint_every`` steps (`legr_jax.train.
  checkpoint`): a killed run resumes from the last one and ends with
  exactly the uninterrupted run's result (same batches from the step count,
  same state). The artifact (JSON: the final per-channel scores, the
  method's configuration, the baseline's digest) is written once at the
  end; `load_scores` reads it back for any budget.

Workdir layout (a method's learn workdir)::

  learn_config.json    what is learned (method, target, data, network,
                       baseline digest): a rerun with another config is
                       refused unless ``overwrite``
  checkpoints/         orbax: {'net': TrainState, 'extra': ExtraState}
  <artifact>.json      the scores (written when the run completes)
  result.json          wall time (``search_time_s``, read by
                       experiments.compare) and final figures
  provenance.jsonl     one line per session
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from legr_jax import cost as cost_lib
from legr_jax.models.spec import NetSpec

FORMAT_VERSION = 1
LEARN_CONFIG = "learn_config.json"
RESULT_JSON = "result.json"
CHECKPOINTS = "checkpoints"
PENALTIES = ("squared", "hinge", "squared_hinge")


class LearnConflictError(RuntimeError):
  """The learn workdir holds a different run."""
  exit_code = 2


class LearnInterrupted(RuntimeError):
  """Raised by `learn`'s ``stop_after`` testing aid (a simulated kill)."""


# --- cost of soft gates ---------------------------------------------------


def widths(spec: NetSpec, gates: Mapping) -> jax.Array:
  """[G] soft widths ``sum_j gate_gj`` in ``spec.groups`` order, in the
  gates' dtype (at least float32)."""
  parts = [jnp.sum(jnp.asarray(gates[g.name])) for g in spec.groups]
  dtype = jnp.result_type(jnp.float32, *parts)
  return jnp.stack([p.astype(dtype) for p in parts])


def cost_fraction(spec: NetSpec, gates: Mapping, metric: str = "flops"
                  ) -> jax.Array:
  """Cost of the gated network / unpruned cost (scalar, differentiable).

  ``a^T Q a + l.a + c`` over `widths` (`legr_jax.cost.cost_coefficients`),
  divided by the unpruned cost; equals ``cost.flops(spec, masks) /
  cost.unpruned(spec)`` for 0/1 gates (and `cost.params` for ``params``).
  """
  q, lin, const = cost_lib.cost_coefficients(spec, metric)
  a = widths(spec, gates)
  total = cost_lib.unpruned(spec, metric)
  value = a @ jnp.asarray(q, a.dtype) @ a + a @ jnp.asarray(lin, a.dtype)
  return (value + jnp.asarray(const, a.dtype)) / jnp.asarray(total, a.dtype)


def budget_penalty(fraction, target: float, form: str = "squared"):
  """A regularizer of the cost ``fraction`` against ``target`` (see the
  module doc); 0 at the target."""
  d = fraction - target
  if form == "squared":
    return d * d
  if form == "hinge":
    return jnp.maximum(d, 0.0)
  if form == "squared_hinge":
    return jnp.square(jnp.maximum(d, 0.0))
  raise ValueError(f"penalty must be one of {PENALTIES}, got {form!r}")


# --- weights as features ------------------------------------------------------


def kernel(params, conv: str):
  """The kernel ``[kh, kw, cin/groups, cout]`` of conv ``conv``."""
  node = params
  for part in conv.split("/"):
    node = node[part]
  return node["conv"]["kernel"]


def bn_params(params, conv: str):
  """``(scale, bias)`` of the BatchNorm after conv ``conv``."""
  node = params
  for part in conv.split("/"):
    node = node[part]
  return node["bn"]["scale"], node["bn"]["bias"]


def group_filter_matrix(spec: NetSpec, params, group: str):
  """[C_g, D] (jnp, differentiable): row j concatenates channel j's
  flattened filter in every member conv of ``group`` (a narrower member
  contributes zeros); the jnp twin of `legr_jax.methods.base.group_filters`.
  """
  g = next(x for x in spec.groups if x.name == group)
  parts = []
  for m in g.members:
    k = jnp.asarray(kernel(params, m))
    k = k.reshape(-1, k.shape[-1]).T
    if k.shape[0] < g.size:
      k = jnp.pad(k, ((0, g.size - k.shape[0]), (0, 0)))
    parts.append(k)
  return jnp.concatenate(parts, axis=1)


def params_digest(params) -> str:
  """A short digest of a parameter pytree (identifies a baseline)."""
  from legr_jax.family import variables_digest  # pylint: disable=import-outside-toplevel
  return variables_digest(params)


# --- artifacts ------------------------------------------------------------------


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def load_scores(path: str, spec: NetSpec, params=None, *, method: str,
                artifact_file: str) -> dict[str, np.ndarray]:
  """``{group: [C_g] float64}`` from a learn artifact (the file or its
  workdir). Checks the method, the groups and sizes, finiteness, and, when
  ``params`` are given, that it was learned on these weights."""
  if os.path.isdir(path):
    path = os.path.join(path, artifact_file)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run the {method} learn stage "
                            "first")
  try:
    with open(path) as f:
      data = json.load(f)
    got_method = data["method"]["method"]
    scores = data["scores"]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a {method} artifact ({e}); learn again "
                     "into a new workdir") from None
  if data.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version "
                     f"{data.get('format_version')!r}; this legr_jax reads "
                     f"{FORMAT_VERSION}: learn again")
  if got_method != method:
    raise ValueError(f"{path} was learned by {got_method!r}, not {method!r}")
  out = {}
  for g in spec.groups:
    if g.name not in scores or len(scores[g.name]) != g.size:
      raise ValueError(f"{path} has no {g.size} scores for group {g.name!r}: "
                       "it was learned for a different network")
    s = np.asarray(scores[g.name], np.float64)
    if not np.all(np.isfinite(s)):
      raise ValueError(f"{path}: the scores of group {g.name!r} are not "
                       "finite")
    out[g.name] = s
  if params is not None and data.get("baseline") not in (
      None, params_digest(params)):
    raise ValueError(f"{path} was learned on other weights (baseline digest "
                     f"{data.get('baseline')}); learn again for these")
  return out


# --- the learn loop -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LearnSetup:
  """What a learned-gate method gives `learn`.

  Attributes:
    init: the initial extra (gate / score) parameters, a pytree.
    extra: the `legr_jax.train.step.Extra` hook (optimizer, masks_fn,
      loss_fn, whether the network weights train too, BatchNorm mode).
    scores: ``(extra_params, params) -> {group: [C_g] array}``: the
      final ranking scores (higher = kept longer).
    weight_lr: learning rate of the network weights (SGD, momentum 0.9,
      weight decay 5e-4) when ``extra.train_params``.
  """
  init: Any
  extra: Any
  scores: Callable
  weight_lr: float = 0.01


def _prepare(workdir: str, config: dict, artifact: str, overwrite: bool,
             log) -> bool:
  """Makes ``workdir`` ready; True when the finished artifact is there."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LEARN_CONFIG)
  config = json.loads(json.dumps(config))
  owned = [LEARN_CONFIG, CHECKPOINTS, artifact, RESULT_JSON]
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except ValueError:
      old = None
    if old != config:
      if not overwrite:
        diff = ([k for k in sorted(set(old) | set(config))
                 if old.get(k) != config.get(k)]
                if isinstance(old, dict) else ["(damaged)"])
        raise LearnConflictError(
            f"refusing to learn in {workdir}: it holds a different run "
            f"(differs in {diff}); choose another workdir or pass "
            "overwrite=True")
      log(f"overwrite: deleting the previous learn run in {workdir}")
      for name in owned:
        p = os.path.join(workdir, name)
        if os.path.isdir(p):
          shutil.rmtree(p)
        elif os.path.exists(p):
          os.remove(p)
  elif any(os.path.exists(os.path.join(workdir, n)) for n in owned[1:]):
    if not overwrite:
      raise LearnConflictError(f"refusing to learn in {workdir}: it holds "
                               f"run files but no {LEARN_CONFIG}")
    for name in owned[1:]:
      p = os.path.join(workdir, name)
      shutil.rmtree(p) if os.path.isdir(p) else (
          os.remove(p) if os.path.exists(p) else None)
  if not os.path.exists(path):
    _write_json(path, config)
  return os.path.exists(os.path.join(workdir, artifact))


def _manager(directory: str):
  """An orbax CheckpointManager keeping the last two steps ('state' and
  'meta' items, the layout of `legr_jax.train.checkpoint`)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(max_to_keep=2,
                                         enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


def learn(net, variables, dataset, workdir: str, setup: LearnSetup, *,
          config: dict, artifact_file: str, steps: int, batch_size: int,
          seed: int, checkpoint_every: int = 50, overwrite: bool = False,
          progress: bool = True, log: Callable[[str], None] = print,
          stop_after: int | None = None) -> str:
  """Trains ``setup``'s gate parameters for ``steps`` steps (resumable) and
  writes the artifact; returns its path.

  Args:
    net, variables: the pretrained network (``variables['params']`` is
      also what the scores are computed from).
    dataset: a `legr_jax.data.Dataset`; only its train split is read.
    workdir: the learn workdir (module doc).
    setup: the method's `LearnSetup`.
    config: JSON record of what is learned (the method's configuration,
      target, data record); a workdir holding another is refused.
    artifact_file: the artifact's file name in ``workdir``.
    steps, batch_size, seed: the run (seed: data order and augmentation).
    checkpoint_every: steps between orbax checkpoints.
    stop_after: testing aid: raise `LearnInterrupted` once this process
      has taken this many steps (after the step, before any checkpoint of
      it), as if killed.
  """
  from legr_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from legr_jax import provenance  # pylint: disable=import-outside-toplevel
  from legr_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from legr_jax.train import optim  # pylint: disable=import-outside-toplevel
  from legr_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from legr_jax.train.progress import Progress  # pylint: disable=import-outside-toplevel

  if steps < 1 or batch_size < 1 or checkpoint_every < 1:
    raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
  n = len(dataset.train)
  if n < batch_size:
    raise ValueError(f"the training split has {n} images, fewer than one "
                     f"batch of {batch_size}")
  artifact = os.path.join(workdir, artifact_file)
  config = {**config, "baseline": params_digest(variables["params"]),
            "net": net.config, "steps": steps, "batch_size": batch_size,
            "seed": seed}
  if _prepare(workdir, config, artifact_file, overwrite, log):
    log(f"learned already: {artifact}")
    return artifact
  name = config["method"]["method"]
  provenance.record_session(workdir, {"job": f"learn {name}"})

  optimizer = optim.make_optimizer(setup.weight_lr, momentum=0.9,
                                   weight_decay=5e-4)
  extra = setup.extra
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      opt_state=optimizer.init(variables["params"]),
      rng=step_lib.raw_key(seed))
  extra_state = step_lib.init_extra_state(extra, setup.init)
  # copies: the step donates its inputs, the caller keeps its variables
  both = jax.tree.map(lambda x: jnp.array(x, copy=True),
                      {"net": state, "extra": extra_state})
  manager = _manager(os.path.join(workdir, CHECKPOINTS))
  restored = ckpt_lib.restore_newest(manager, ckpt_lib.abstract_like(both),
                                     log=log)
  elapsed = 0.0
  if restored is not None:
    _, both, meta = restored
    elapsed = float(meta.get("elapsed_s", 0.0))
    log(f"resuming {workdir} at step {int(both['net'].step)}/{steps}")
  state, extra_state = both["net"], both["extra"]

  def one(state, extra_state, batch):
    return step_lib.train_step(net, optimizer, state, batch, None,
                               extra=extra, extra_state=extra_state)
  step_fn = jax.jit(one, donate_argnums=(0, 1))
  per_epoch = data_lib.num_batches(n, batch_size)
  start = int(state.step)
  bar = Progress(steps, initial=start, desc=f"learn {name}"
                 ) if progress else None
  t0 = time.perf_counter()
  metrics = {}
  taken = 0
  s = start
  try:
    while s < steps:
      epoch, first = divmod(s, per_epoch)
      for batch in data_lib.batches(
          dataset.train, batch_size, seed=seed, epoch=epoch,
          start_batch=first, augment=dataset.augment, mean=dataset.mean,
          std=dataset.std):
        state, extra_state, metrics = step_fn(state, extra_state, batch)
        s += 1
        taken += 1
        if bar is not None:
          bar.update(s, **{k: float(v) for k, v in metrics.items()})
        if stop_after is not None and taken >= stop_after:
          raise LearnInterrupted(f"stopped after {taken} steps (testing aid)")
        if s % checkpoint_every == 0 or s == steps:
          ckpt_lib.save(manager, s, {"net": state, "extra": extra_state},
                        {"elapsed_s": elapsed + time.perf_counter() - t0})
        if s >= steps:
          break
  finally:
    if bar is not None:
      bar.close()
    manager.close()
  elapsed += time.perf_counter() - t0
  scores = setup.scores(extra_state.params, state.params)
  final = {k: float(v) for k, v in metrics.items()}
  _write_json(artifact, {
      "format_version": FORMAT_VERSION, "method": config["method"],
      "config": config, "baseline": config["baseline"], "steps": steps,
      "final_metrics": final,
      "scores": {g.name: [float(x) for x in np.asarray(scores[g.name],
                                                       np.float64)]
                 for g in net.spec.groups}})
  _write_json(os.path.join(workdir, RESULT_JSON),
              {"search_time_s": elapsed, "steps": steps, **final})
  log(f"learned {artifact} in {elapsed:.1f} s: " + ", ".join(
      f"{k} {v:.4g}" for k, v in final.items()))
  return artifact
