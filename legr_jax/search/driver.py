"""The resumable LeGR search loop.

``search(config, workdir, net=..., variables=..., dataset=...)`` runs
regularized evolution (`evolution`) with candidates evaluated K at a time
(`fitness.Evaluator`), checkpoints the evolution state every
``checkpoint_every`` evaluations and resumes a killed search from its last
checkpoint; a resumed search ends with the same result as an uninterrupted
one (randomness is a pure function of the seed and the evaluation index, and
a candidate's loss is a pure function of the candidate).

Workdir layout::

  search_config.json   the SearchConfig (a different search is refused)
  state/               orbax checkpoints of the evolution state
  evaluations.jsonl    one record per evaluation (index, generation, digest of
                       alpha/kappa, FLOPs fraction, loss)
  progress.png         best and mean population loss over the search
  ranking.json         learned ranking: layer name -> alpha, kappa (+ info)
  ranking/             the same arrays, orbax
  result.json          summary, written when the search completes

A target below the cheapest network the safeguard allows is refused before
anything is written; a search in which no candidate got a finite loss raises
`SearchInfeasibleError` and writes no ranking. A resumed search whose newest
state checkpoint is damaged continues from the newest one that restores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from legr_jax import ops as ops_lib
from legr_jax import provenance
from legr_jax.methods import budget as budget_lib
from legr_jax.search import evolution, fitness, multihost
from legr_jax.search import state as state_lib
from legr_jax.train.progress import Progress

CONFIG_JSON = "search_config.json"
RESULT_JSON = "result.json"
PLOT_PNG = "progress.png"
RUN_FILES = (CONFIG_JSON, provenance.SESSIONS, state_lib.STATE_DIR,
             state_lib.EVALUATIONS, PLOT_PNG,
             state_lib.RANKING_JSON, state_lib.RANKING_DIR, RESULT_JSON)

# Fields that do not change the result (beyond float rounding of losses).
OPERATIONAL_FIELDS = ("backend", "bucket", "workers", "checkpoint_every",
                      "data_dir", "cpu_kernels")


class SearchConflictError(RuntimeError):
  """The workdir holds a different search."""
  exit_code = 2   # experiments' exit status


class SearchInfeasibleError(RuntimeError):
  """No candidate of the search got a finite loss; no ranking is written."""
  exit_code = 1


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """A search, as data (saved as search_config.json).

  Baseline: ``baseline`` (the `experiments.train` workdir it came from, for
  the record) and ``net_config``. Data: ``dataset``, validation carved with
  ``val_size``/``val_fraction`` and ``split_seed`` (default: the baseline's
  own split, so the search never validates on training images).
  ``aggregate``: how coupled channels' scores combine (`ranking.group_scores`:
  'sum', LeGR's, 'mean' or 'max'); ``chains``: then also over the LeGR
  reference's cross-stage chains (`ranking.chain_scores`, 'sum' or 'mean';
  CIFAR ResNets built with ``pad='append'``). Fitness and
  evolution: see `fitness.FitnessConfig`, `evolution.EvolutionConfig`;
  ``candidates_per_round`` is K of the batched variant (1: sequential).
  Compute (operational): ``backend``, ``bucket``, ``workers`` (see
  `fitness.Evaluator`) and ``cpu_kernels`` ('auto' | 'on' | 'off',
  `legr_jax.ops.resolve`).
  """
  baseline: str = ""
  net_config: dict = dataclasses.field(default_factory=dict)
  dataset: str = "digits"
  data_dir: str | None = None
  val_size: int | None = None
  val_fraction: float = 0.1
  test_size: int | None = None
  split_seed: int = 0
  flops: float = 0.47
  safeguard: float = 0.1
  aggregate: str = "sum"
  chains: bool = False
  tau_hat: int = 0
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 128
  eval_batch_size: int = 128
  val_examples: int | None = None
  population: int = 64
  sample: int = 16
  evaluations: int = 400
  mutate_fraction: float = 0.1
  candidates_per_round: int = 1
  seed: int = 0
  backend: str = "auto"
  bucket: int = 4
  workers: int | None = None
  checkpoint_every: int = 16
  cpu_kernels: str = "auto"

  def __post_init__(self):
    f = self.flops
    if (isinstance(f, bool) or not isinstance(f, (int, float))
        or not math.isfinite(f) or not 0.0 < f < 1.0):
      raise ValueError(f"the search's FLOPs target (--target_flops) must be "
                       f"a fraction in (0, 1), got {f!r}: at 1 nothing is "
                       "pruned and every candidate is the same network")
    if not 0.0 <= float(self.safeguard) <= 1.0:
      raise ValueError(f"safeguard (--safeguard) must be in [0, 1], got "
                       f"{self.safeguard!r}")
    if self.aggregate not in ("sum", "mean", "max"):
      raise ValueError(f"aggregate must be 'sum', 'mean' or 'max' "
                       f"(ranking.group_scores), got {self.aggregate!r}")
    if self.chains and self.aggregate == "max":
      raise ValueError("chains aggregate by 'sum' or 'mean' "
                       "(ranking.chain_scores), not 'max'")
    if self.candidates_per_round < 1:
      raise ValueError("candidates_per_round must be >= 1")
    if self.backend not in fitness.BACKENDS:
      raise ValueError(f"backend must be one of {fitness.BACKENDS}")
    ops_lib.check_setting(self.cpu_kernels)
    self.evolution_config()  # validates

  def evolution_config(self) -> evolution.EvolutionConfig:
    return evolution.EvolutionConfig(
        population=self.population, sample=self.sample,
        evaluations=self.evaluations, mutate_fraction=self.mutate_fraction)

  def fitness_config(self) -> fitness.FitnessConfig:
    return fitness.FitnessConfig(
        flops=self.flops, safeguard=self.safeguard, aggregate=self.aggregate,
        chains=self.chains, tau_hat=self.tau_hat,
        lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
        batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
        val_examples=self.val_examples, data_seed=self.seed)

  def to_dict(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict) -> "SearchConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown SearchConfig fields {sorted(unknown)}")
    return cls(**d)


def differences(a: SearchConfig, b: SearchConfig) -> dict:
  da, db = a.to_dict(), b.to_dict()
  return {k: (da[k], db[k]) for k in da
          if k not in OPERATIONAL_FIELDS and da[k] != db[k]}


@dataclasses.dataclass
class SearchResult:
  alpha: np.ndarray          # [L]
  kappa: np.ndarray          # [L]
  loss: float
  layer_names: tuple
  state: Any                 # final EvolutionState
  result: dict
  workdir: str

  def ranking(self) -> dict:
    return {n: (float(a), float(k))
            for n, a, k in zip(self.layer_names, self.alpha, self.kappa)}


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(path + ".tmp", path)


def prepare_workdir(workdir: str, config: SearchConfig, *,
                    overwrite: bool = False,
                    log: Callable[[str], None] = print) -> bool:
  """Returns True when ``workdir`` holds this search (resume); writes the
  config of a new one; refuses a different one unless ``overwrite``."""
  os.makedirs(workdir, exist_ok=True)
  present = [f for f in RUN_FILES if os.path.exists(os.path.join(workdir, f))]
  conflict = None
  if present and CONFIG_JSON not in present:
    conflict = f"it holds {present} but no {CONFIG_JSON}"
  elif present:
    path = os.path.join(workdir, CONFIG_JSON)
    try:
      with open(path) as f:
        old = SearchConfig.from_dict(json.load(f))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
      old = None
      conflict = f"its {CONFIG_JSON} is damaged ({e})"
    diff = differences(old, config) if old is not None else {}
    if diff:
      conflict = "it holds a different search: " + "; ".join(
          f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
  if conflict and not overwrite:
    raise SearchConflictError(
        f"refusing to search in {workdir}: {conflict}. Choose another "
        "workdir, or pass --overwrite to delete that search and start over.")
  if present and (overwrite or conflict):
    log(f"overwrite: deleting the previous search in {workdir}: {present}")
    for f in present:
      p = os.path.join(workdir, f)
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    present = []
  _write_json(os.path.join(workdir, CONFIG_JSON), config.to_dict())
  return bool(present)


def check_reachable(spec, config: SearchConfig) -> None:
  """Raises `legr_jax.methods.InfeasibleBudgetError` (a ValueError) when
  ``config.flops`` is below the cheapest network the safeguard allows
  (every group at ``max(1, ceil(safeguard * C_g))`` channels): no candidate
  could meet it."""
  keep = budget_lib.protected_counts(spec, config.safeguard)
  low = budget_lib.cost_of_counts(spec, keep, "flops")
  total = budget_lib.cost_of_counts(spec, budget_lib.sizes(spec), "flops")
  if low > math.floor(config.flops * total):
    raise budget_lib.InfeasibleBudgetError(
        f"the search's FLOPs target {config.flops:g} (--target_flops) is "
        f"below {low / total:.4g}, the smallest FLOPs fraction this network "
        f"reaches with safeguard {config.safeguard:g} (--safeguard; every "
        "group keeps max(1, ceil(safeguard * its channels))): no candidate "
        "could meet it. Raise the target or lower the safeguard.")


def population_curves(records: list[dict], population: int):
  """Best and mean loss of the population after each evaluation.

  Regularized evolution always removes the oldest member, so the population
  after n evaluations is exactly evaluations max(0, n - P) .. n - 1.
  Returns ``(n [E], best [E], mean [E])`` (non-finite losses ignored).
  """
  records = sorted(records, key=lambda r: r["evaluation"])
  loss = np.array([np.inf if r["loss"] is None else r["loss"]
                   for r in records], np.float64)
  n = np.arange(1, len(loss) + 1)
  best, mean = [], []
  for i in n:
    window = loss[max(0, i - population):i]
    finite = window[np.isfinite(window)]
    best.append(finite.min() if finite.size else np.nan)
    mean.append(finite.mean() if finite.size else np.nan)
  return n, np.array(best), np.array(mean)


def plot_progress(records: list[dict], population: int, path: str,
                  title: str = "") -> None:
  """PNG: every candidate's loss, and the population's best and mean."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n, best, mean = population_curves(records, population)
  loss = [np.nan if r["loss"] is None else r["loss"]
          for r in sorted(records, key=lambda r: r["evaluation"])]
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  ax.scatter(n, loss, s=5, color="0.65", label="candidate")
  ax.plot(n, mean, color="tab:blue", label="population mean")
  ax.plot(n, best, color="tab:red", label="population best")
  for g in range(population, int(n[-1]) if len(n) else 0, population):
    ax.axvline(g, color="0.85", lw=0.8, zorder=0)
  ax.set_xlabel(f"evaluations (generation = {population} evaluations)")
  ax.set_ylabel("validation loss")
  finite = np.asarray(loss, float)
  finite = finite[np.isfinite(finite)]
  if finite.size:
    lo, hi = np.percentile(finite, [0, 95])
    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
  ax.set_title(title or "LeGR search")
  ax.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def search(config: SearchConfig, workdir: str, *, net, variables, dataset,
           devices=None, overwrite: bool = False, progress: bool = True,
           log: Callable[[str], None] = print,
           crash_after: int | None = None) -> SearchResult:
  """Runs (or resumes) the search ``config`` in ``workdir``.

  Args:
    config: the search.
    workdir: where its files live (see the module doc).
    net, variables: the pretrained network (computed with
      ``config.cpu_kernels``'s `legr_jax.ops.Ops`).
    dataset: a `legr_jax.data.Dataset` (its train split feeds the tau_hat
      steps, its val split the loss).
    devices: devices to spread candidates over (default: all).
    overwrite: delete a different search found in ``workdir``.
    progress: progress bar on stderr (evaluations, best loss, ETA).
    log: status lines.
    crash_after: testing aid: SIGKILL this process once this many
      evaluations are done (after logging, before any later checkpoint).
  Returns:
    `SearchResult` with the best member's alpha / kappa.
  Raises:
    SearchConflictError: ``workdir`` holds a different search.
    legr_jax.methods.InfeasibleBudgetError: the target is below what the
      safeguard allows (before anything is written).
    SearchInfeasibleError: no candidate got a finite loss (no ranking is
      written).
  """
  check_reachable(net.spec, config)
  evo_cfg = config.evolution_config()
  fit_cfg = config.fitness_config()
  data = fitness.prepare_data(dataset, fit_cfg)   # its errors: before writing
  # Several processes (multihost): the primary prepares the workdir and
  # writes the plain files; all of them read, evaluate and write orbax.
  primary = multihost.is_primary()
  if not primary:
    log, progress = (lambda s: None), False
  status = {"resuming": False, "error": None}
  if primary:
    try:
      status["resuming"] = prepare_workdir(workdir, config,
                                           overwrite=overwrite, log=log)
    except SearchConflictError as e:
      status["error"] = str(e)
  status = multihost.broadcast_json(status)
  if status["error"]:
    raise SearchConflictError(status["error"])
  resuming = status["resuming"]
  net = net.with_ops(ops_lib.resolve(
      config.cpu_kernels, devices if devices is not None else jax.devices()))
  evaluator = fitness.Evaluator(net, variables, data, fit_cfg,
                                backend=config.backend, devices=devices,
                                bucket=config.bucket, workers=config.workers)
  if primary:
    provenance.record_session(workdir, {
        "job": "search", "resumed": resuming, "ops": net.ops.name,
        "backend": evaluator.backend}, devices=evaluator.devices)
  layer_names = evaluator.layer_names
  manager = state_lib.make_manager(workdir)
  evlog = state_lib.EvaluationLog(workdir)
  state = evolution.init_state(config.seed, evaluator.layer_std,
                               config.population)
  # Every process restores; only the primary removes damaged checkpoints.
  restored = (state_lib.restore_state(manager, state, log=log,
                                      remove_broken=primary)
              if resuming else None)
  multihost.sync("legr_search_restored")
  if resuming and not primary:
    manager.reload()
  if restored is not None:
    state, meta = restored
    if not np.allclose(np.asarray(state.kappa_std), evaluator.layer_std,
                       rtol=1e-6):
      raise SearchConflictError(
          f"the checkpoint in {workdir} was made for a network with other "
          "filter norms; the baseline changed")
    log(f"resuming {workdir} at evaluation {int(state.count)}/"
        f"{config.evaluations}")
    elapsed = float(meta.get("elapsed_s", 0.0))
  else:
    elapsed = 0.0
  count = int(state.count)
  if primary:
    evlog.truncate(count)
  multihost.sync("legr_search_log_ready")
  # Losses already known (a resumed search): the memo starts where it was.
  logged = evlog.read()
  evaluator.cache.update(
      (r["mask_digest"], float("inf") if r["loss"] is None else r["loss"])
      for r in logged if r.get("feasible") and "mask_digest" in r)
  log(f"search: {net!r}, {len(layer_names)} layers; target FLOPs "
      f"{config.flops}, safeguard {config.safeguard}, tau_hat "
      f"{config.tau_hat}; {len(data.val_labels) * data.val_labels.shape[1]} "
      f"validation slots ({int(data.val_valid.sum())} images); backend "
      f"{evaluator.backend}, K={config.candidates_per_round}, "
      f"{len(evaluator.devices)} device(s) on {jax.process_count()} "
      f"process(es), {evaluator.workers} worker(s)")

  best_loss = min([r["loss"] for r in logged if r["loss"] is not None],
                  default=float("inf"))
  bar = Progress(config.evaluations, initial=count, desc="search",
                 stream=None if progress else open(os.devnull, "w"))
  last_ckpt = count
  t_session = time.perf_counter()
  memo_hits = 0
  while count < config.evaluations:
    k = evo_cfg.round_size(count, config.candidates_per_round)
    t0 = time.perf_counter()
    alpha, kappa, index = evolution.propose_jit(state, evo_cfg, k)
    alpha, kappa = np.asarray(alpha), np.asarray(kappa)
    res = evaluator.evaluate(alpha, kappa)
    state = evolution.insert_jit(state, alpha, kappa, res["loss"])
    count += k
    dt = time.perf_counter() - t0
    if primary:
      evlog.write(state_lib.evaluation_records(
          index, alpha, kappa, res, population=config.population,
          round_index=round_index_of(count - k, config), seconds=dt))
    finite = res["loss"][np.isfinite(res["loss"])]
    if finite.size:
      best_loss = min(best_loss, float(finite.min()))
    if (count // config.checkpoint_every > last_ckpt // config.checkpoint_every
        or count == config.evaluations):
      state_lib.save_state(manager, state, {
          "elapsed_s": elapsed + time.perf_counter() - t_session,
          "count": count})
      last_ckpt = count
    memo_hits += int(np.sum(res["cached"]))
    bar.update(count, best_loss=best_loss, s_per_cand=round(dt / k, 3),
               memoized=memo_hits)
    if crash_after is not None and count >= crash_after:
      os.kill(os.getpid(), signal.SIGKILL)
  bar.close()
  evaluator.close()
  elapsed += time.perf_counter() - t_session

  alpha, kappa, loss, birth = jax.device_get(evolution.best(state))
  multihost.sync("legr_search_done")
  records = evlog.read()
  if not np.isfinite(loss):
    manager.close()
    feasible = sum(1 for r in records if r.get("feasible"))
    fix = ("raise --target_flops or lower --safeguard" if not feasible else
           "every loss was NaN/inf: lower --lr of the tau_hat steps (or "
           "--tau_hat), or check the baseline")
    raise SearchInfeasibleError(
        f"no candidate of the search in {workdir} got a finite validation "
        f"loss ({feasible} of {len(records)} evaluations met FLOPs "
        f"{config.flops:g} with safeguard {config.safeguard:g}), so no "
        f"ranking was written: {fix}, then rerun with --overwrite")
  info = {"loss": float(loss), "evaluation": int(birth),
          "flops_target": config.flops, "safeguard": config.safeguard,
          "tau_hat": config.tau_hat, "model": net.name,
          "baseline": config.baseline, "seed": config.seed,
          "evaluations": config.evaluations, "aggregate": config.aggregate,
          "chains": config.chains}
  state_lib.save_ranking(workdir, layer_names, alpha, kappa, info)
  try:
    if primary:
      plot_progress(records, config.population,
                    os.path.join(workdir, PLOT_PNG),
                    title=f"LeGR search: {net.name}, FLOPs {config.flops}, "
                          f"tau_hat {config.tau_hat}")
  except Exception as e:  # pylint: disable=broad-except
    log(f"warning: could not draw {PLOT_PNG}: {e}")
  secs = [r["seconds_per_candidate"] for r in records]
  fresh = sum(1 for r in records if not r.get("cached"))
  identity = [r for r in records if r["evaluation"] == 0]
  result = {**info, "identity_loss": identity[0]["loss"] if identity else None,
            "search_time_s": round(elapsed, 2),
            "median_seconds_per_candidate": float(np.median(secs)) if secs
            else None,
            "mean_seconds_per_candidate": round(elapsed / max(1, len(
                records)), 4) if secs else None,
            "evaluated": fresh, "memoized": len(records) - fresh,
            "backend": evaluator.backend, "devices": len(evaluator.devices),
            "processes": jax.process_count(),
            "candidates_per_round": config.candidates_per_round}
  if primary:
    _write_json(os.path.join(workdir, RESULT_JSON), result)
  manager.close()
  log(f"best loss {float(loss):.4f} (evaluation {int(birth)}; identity "
      f"ranking {result['identity_loss']}); ranking in "
      f"{os.path.join(workdir, state_lib.RANKING_JSON)}")
  return SearchResult(alpha=np.asarray(alpha), kappa=np.asarray(kappa),
                      loss=float(loss), layer_names=tuple(layer_names),
                      state=state, result=result, workdir=workdir)


def round_index_of(count: int, config: SearchConfig) -> int:
  """Index of the round that starts at evaluation ``count``."""
  evo = config.evolution_config()
  k, c, r = config.candidates_per_round, 0, 0
  while c < count:
    c += evo.round_size(c, k)
    r += 1
  return r
