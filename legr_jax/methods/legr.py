"""``legr``: LeGR's learned global ranking (Chin et al., CVPR 2020).

Learn stage: the regularized-evolution search of `legr_jax.search` at a
FLOPs target (LeGR learns once, at the lowest target, and reuses the ranking
for every other budget); its artifact is ``ranking.json`` (layer ->
alpha, kappa) in the learn workdir, resumable like `experiments.learn_ranking`
(which writes the same file). Prune stage: score every filter by
``alpha_l * ||W||^2 + kappa_l``, sum coupled channels and remove the lowest
globally (`ranking`). ``l2`` is this method with alpha = 1, kappa = 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from legr_jax import ranking
from legr_jax.methods.base import GlobalRanking, register
from legr_jax.methods.budget import Budget

RANKING_JSON = "ranking.json"
FORMAT_VERSION = 1   # of ranking.json; files without one are version 1


def check_format_version(data: dict, path: str) -> None:
  """ValueError naming ``path`` and both versions unless ranking.json's
  ``format_version`` (absent: 1) is `FORMAT_VERSION`."""
  version = data.get("format_version", 1)
  if version != FORMAT_VERSION:
    raise ValueError(f"{path} has format_version {version!r}; this legr_jax "
                     f"reads format_version {FORMAT_VERSION}: use the "
                     "legr_jax that wrote it, or learn the ranking again")


def load_affine(path: str, layer_names) -> tuple[dict, dict]:
  """Reads a learned ranking: ``({layer: alpha}, {layer: kappa})``.

  ``path`` is a search workdir (holding ranking.json) or the file. Its layers
  must be the network's conv layers; every value and its loss finite.
  """
  if os.path.isdir(path):
    path = os.path.join(path, RANKING_JSON)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: run python -m "
                            "experiments.learn_ranking first, or pass "
                            "--ranking=l2")
  try:
    with open(path) as f:
      data = json.load(f)
    layers = data.get("layers", data)
    missing = set(layer_names) - set(layers)
  except (json.JSONDecodeError, AttributeError, TypeError) as e:
    raise ValueError(f"{path} is not a LeGR ranking ({e}); rerun "
                     "experiments.learn_ranking into a new workdir") from None
  check_format_version(data, path)
  if missing:
    raise ValueError(f"{path} lacks layers {sorted(missing)[:5]}: it was "
                     "learned for a different network")
  loss = data.get("loss") if isinstance(data, dict) else None
  if loss is not None and not math.isfinite(float(loss)):
    raise ValueError(f"{path}: the search found no feasible candidate (loss "
                     f"{loss}); learn again with a reachable --target_flops")
  alpha = {n: float(layers[n]["alpha"]) for n in layer_names}
  kappa = {n: float(layers[n]["kappa"]) for n in layer_names}
  bad = [n for n in layer_names
         if not (math.isfinite(alpha[n]) and math.isfinite(kappa[n]))]
  if bad:
    raise ValueError(f"{path}: alpha/kappa of {bad[:3]} are not finite")
  return alpha, kappa


@register
@dataclasses.dataclass(frozen=True)
class LeGR(GlobalRanking):
  """Learned (alpha, kappa) per layer. Search options follow
  `legr_jax.search.SearchConfig` (LeGR's defaults)."""
  name = "legr"
  learns = True
  artifact_file = RANKING_JSON

  aggregate: str = "sum"   # coupled channels (ranking.group_scores)
  chains: bool = False     # + cross-stage chains (ranking.chain_scores)
  tau_hat: int = 0
  evaluations: int = 400
  population: int = 64
  sample: int = 16
  mutate_fraction: float = 0.1
  candidates_per_round: int = 1
  lr: float = 0.01
  batch_size: int = 128
  val_examples: int | None = None
  backend: str = "auto"
  cpu_kernels: str = "auto"

  def search_config(self, net, budget: Budget, record=None):
    from legr_jax import search  # pylint: disable=import-outside-toplevel
    budget = Budget.parse(budget)
    if budget.metric != "flops":
      raise ValueError("LeGR's search learns at a FLOPs target: give a flops "
                       "budget to learn (the ranking then serves params "
                       "budgets too)")
    record = dict(record or {})
    return search.SearchConfig(
        net_config=net.config, flops=budget.fraction,
        safeguard=self.safeguard, aggregate=self.aggregate,
        chains=self.chains, tau_hat=self.tau_hat, lr=self.lr,
        batch_size=self.batch_size, val_examples=self.val_examples,
        population=self.population, sample=self.sample,
        evaluations=self.evaluations, mutate_fraction=self.mutate_fraction,
        candidates_per_round=self.candidates_per_round, seed=self.seed,
        backend=self.backend, cpu_kernels=self.cpu_kernels, **record)

  def learn(self, net, variables, dataset, workdir, *, budget, record=None,
            overwrite=False, progress=True, log=print):
    from legr_jax import search  # pylint: disable=import-outside-toplevel
    config = self.search_config(net, budget, record)
    search.search(config, workdir, net=net, variables=variables,
                  dataset=dataset, overwrite=overwrite, progress=progress,
                  log=log)
    return os.path.join(workdir, RANKING_JSON)

  def __post_init__(self):
    super().__post_init__()
    if self.chains and self.aggregate == "max":
      raise ValueError("legr: chains aggregate by 'sum' or 'mean' "
                       "(ranking.chain_scores), not 'max'")

  def scores(self, spec, params, artifact):
    alpha, kappa = load_affine(artifact, spec.layer_names)
    learned = learned_settings(artifact)
    mine = {"aggregate": self.aggregate, "chains": self.chains}
    diff = {k: v for k, v in learned.items() if mine[k] != v}
    if diff:
      raise ValueError(
          f"{artifact} was learned with {learned}, this legr method has "
          f"{mine}: prune with the settings it was learned with (e.g. "
          + "legr@" + "+".join(f"{k}={v}" for k, v in learned.items()) + ")")
    norms = ranking.filter_norms(spec, params)
    scores = ranking.group_scores(
        spec, ranking.affine_scores(norms, alpha, kappa), self.aggregate)
    if self.chains:
      scores = ranking.chain_scores(spec, scores, self.aggregate)
    return {k: np.asarray(v) for k, v in scores.items()}


def learned_settings(artifact: str) -> dict:
  """``{'aggregate', 'chains'}`` a ranking.json was learned with (rankings
  written before they were recorded: LeGR's sum, no chains)."""
  path = artifact
  if os.path.isdir(path):
    path = os.path.join(path, RANKING_JSON)
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return {"aggregate": "sum", "chains": False}
  return {"aggregate": data.get("aggregate", "sum"),
          "chains": bool(data.get("chains", False))}
