"""The pruning-method interface and its registry.

A method is a frozen dataclass (its configuration) with one job: turn
(network, pretrained variables, budget) into group masks and, where it
changes weights, new variables (`Pruned`). A method that must learn first
(``learns = True``: LeGR's search) has a resumable `Method.learn` stage that
writes its artifact under a workdir; `Method.prune` then uses that artifact
for any budget. Every method is a pure function of its inputs and ``seed``
(a learn stage is seeded and resumable) and never reads the test split.

Two bases cover the usual shapes, each with one function to override:

* `GlobalRanking.scores`: one score per channel of every group; the lowest
  are removed globally until the budget holds (`ranking.masks_for_budget`,
  LeGR's greedy rule).
* `LayerwiseCounts.counts_fn` (kept channels per group as a function of the
  method's own knob, solved for the budget by `budget.solve_counts`) and
  `LayerwiseCounts.select` (which channels a group keeps).

Registry: `register` (a class, usable as a decorator), `get(name, **config)`,
`names()`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import numpy as np

from legr_jax.methods import budget as budget_lib
from legr_jax.methods.budget import Budget
from legr_jax.models.spec import NetSpec

_REGISTRY: dict[str, type] = {}


@dataclasses.dataclass
class Pruned:
  """What a method returns.

  Attributes:
    masks: ``{group: [C_g] float32 0/1}`` for every group of ``net.spec``.
    variables: the full-size variables to slice, when the method changed
      them (else None: the pretrained ones are sliced).
    info: JSON-serializable facts (e.g. the knob value found).
  """
  masks: dict
  variables: Any = None
  info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
  """Base configuration: ``safeguard`` (every group keeps at least
  ``max(1, ceil(safeguard * C_g))`` channels) and ``seed``."""
  safeguard: float = 0.1
  seed: int = 0

  name = ""          # registry name (class attribute)
  learns = False     # has a learn stage and an artifact
  artifact_file = ""  # the artifact's file name inside a learn workdir

  def __post_init__(self):
    if not 0.0 <= float(self.safeguard) <= 1.0:
      raise ValueError(f"{self.name}: safeguard must be in [0, 1], got "
                       f"{self.safeguard}")
    aggregate = getattr(self, "aggregate", "sum")
    if aggregate not in ("sum", "mean", "max"):
      raise ValueError(f"{self.name}: aggregate must be 'sum', 'mean' or "
                       f"'max' (ranking.group_scores), got {aggregate!r}")

  def config(self) -> dict:
    """The configuration as JSON-able data (with the name)."""
    return {"method": self.name, **dataclasses.asdict(self)}

  def learn(self, net, variables, dataset, workdir: str, *, budget: Budget,
            record: Mapping | None = None, overwrite: bool = False,
            progress: bool = True, log: Callable[[str], None] = print) -> str:
    """Learns the method's artifact in ``workdir`` (resumable); returns the
    artifact path. ``record``: the baseline's data settings, for the record
    (`legr_jax.family.data_record`)."""
    raise NotImplementedError(f"method {self.name!r} has no learn stage")

  def prune(self, net, variables, budget: Budget, *,
            artifact: str | None = None, round_to: int = 1) -> Pruned:
    raise NotImplementedError

  def _check_artifact(self, artifact):
    if self.learns and artifact is None:
      raise ValueError(f"method {self.name!r} needs its learned artifact "
                       f"({self.artifact_file}): run its learn stage first")


@dataclasses.dataclass(frozen=True)
class GlobalRanking(Method):
  """A global channel ranking; override `scores`."""

  def scores(self, spec: NetSpec, params, artifact: str | None
             ) -> dict[str, Any]:
    """``{group: [C_g] scores}``: the lowest are pruned first."""
    raise NotImplementedError

  def prune(self, net, variables, budget: Budget, *,
            artifact: str | None = None, round_to: int = 1) -> Pruned:
    from legr_jax import ranking  # pylint: disable=import-outside-toplevel
    self._check_artifact(artifact)
    budget = Budget.parse(budget)
    scores = self.scores(net.spec, variables["params"], artifact)
    for g, s in scores.items():
      if not np.all(np.isfinite(np.asarray(s))):
        raise ValueError(f"{self.name}: the scores of group {g!r} are not "
                         "finite (NaN/inf weights or ranking?)")
    try:
      masks, _ = ranking.masks_for_budget(net.spec, scores,
                                          safeguard=self.safeguard,
                                          round_to=round_to,
                                          **budget.kwargs())
    except ValueError as e:
      if "infeasible" in str(e):
        raise budget_lib.InfeasibleBudgetError(str(e)) from None
      raise
    return Pruned({k: np.asarray(v, np.float32) for k, v in masks.items()})


@dataclasses.dataclass(frozen=True)
class LayerwiseCounts(Method):
  """Kept channels per group from the method's own knob; override
  `counts_fn` (knob in [0, 1] -> [G] counts, non-decreasing) and `select`."""

  def counts_fn(self, spec: NetSpec, params) -> Callable[[float], np.ndarray]:
    raise NotImplementedError

  def select(self, spec: NetSpec, params, counts) -> dict[str, np.ndarray]:
    """``{group: [C_g] 0/1}`` keeping ``counts[g]`` channels of each."""
    raise NotImplementedError

  def new_variables(self, spec: NetSpec, variables, masks):
    """Variables to slice (default: unchanged, returns None)."""
    del spec, variables, masks
    return None

  def prune(self, net, variables, budget: Budget, *,
            artifact: str | None = None, round_to: int = 1) -> Pruned:
    self._check_artifact(artifact)
    if round_to != 1:
      raise ValueError(f"round_to={round_to}: method {self.name!r} keeps "
                       "per-layer counts; round_to is for global rankings")
    budget = Budget.parse(budget)
    params = variables["params"]
    counts, knob = budget_lib.solve_counts(
        net.spec, self.counts_fn(net.spec, params), budget, self.safeguard)
    masks = self.select(net.spec, params, counts)
    got = budget_lib.counts_of(net.spec, masks)
    if not np.array_equal(got, counts):
      raise AssertionError(f"{self.name}.select kept {got}, asked {counts}")
    return Pruned(masks, self.new_variables(net.spec, variables, masks),
                  {"knob": float(knob)})


def register(cls: type) -> type:
  """Adds a `Method` subclass to the registry under ``cls.name``."""
  if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
    raise TypeError(f"register expects a Method subclass with a name, got "
                    f"{cls!r}")
  _REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  """Registered method names, sorted."""
  return tuple(sorted(_REGISTRY))


def get(name: str, **config) -> Method:
  """The method ``name`` configured with ``config`` (its dataclass fields)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown pruning method {name!r}; known: "
                     f"{', '.join(names())}")
  cls = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise ValueError(f"method {name!r} has no option(s) {unknown}; its "
                     f"options: {sorted(fields)}")
  return cls(**config)


def parse_spec(text: str) -> tuple[str, str, dict]:
  """``'l2'`` or ``'l2@aggregate=mean+safeguard=0.2'`` -> ``(label, name,
  options)``; values are read as JSON where they parse (numbers, true,
  null), else kept as strings. The label is the text itself (path-safe)."""
  text = str(text).strip()
  name, _, rest = text.partition("@")
  options = {}
  for item in filter(None, rest.split("+")):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"method spec {text!r}: options are key=value joined "
                       "by '+', e.g. l2@aggregate=mean")
    try:
      options[key] = json.loads(value)
    except ValueError:
      options[key] = value
  if not name or "/" in text:
    raise ValueError(f"method spec {text!r}: expected NAME or "
                     "NAME@key=value+key=value")
  return text, name, options


def group_filters(spec: NetSpec, params, group: str) -> np.ndarray:
  """[C_g, D] float64: row j concatenates channel j's flattened filter in
  every member conv of ``group`` (a member narrower than the group
  contributes zeros)."""
  from legr_jax import ranking  # pylint: disable=import-outside-toplevel
  g = next(x for x in spec.groups if x.name == group)
  parts = []
  for m in g.members:
    k = np.asarray(ranking._site(params, m), np.float64)  # pylint: disable=protected-access
    k = k.reshape(-1, k.shape[-1]).T               # [cout, kh*kw*cin]
    if k.shape[0] < g.size:
      k = np.pad(k, ((0, g.size - k.shape[0]), (0, 0)))
    parts.append(k)
  return np.concatenate(parts, axis=1)
