"""Budgets and the exact integer cost arithmetic every method shares.

A `Budget` is a fraction of the unpruned network's MACs (``flops``) or
weights (``params``), `legr_jax.cost`'s counts. Every method meets it the
same way: the pruned cost is at most ``floor(fraction * unpruned)`` and within
one channel of it, i.e. the slack left is smaller than what one more channel
of the group that would grow next costs.

Methods whose own knob is not a channel order (a kept fraction per layer, a
weight threshold) describe themselves by ``counts_fn(knob) -> [G] kept
channels``, non-decreasing in ``knob`` in [0, 1]; `solve_counts` bisects the
knob for the largest value that fits, then fills channel by channel: the
groups that grow at the next step of the knob get one channel each, in
``spec.groups`` order, while the budget holds. Costs are exact integers here
(int64 / Python ints), never floats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from legr_jax import cost as cost_lib
from legr_jax.models.spec import NetSpec

METRICS = ("flops", "params")
# Relative slack of ceil(safeguard * C), as in `legr_jax.ranking`.
_SAFEGUARD_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Budget:
  """A cost budget: ``fraction`` (0 < f <= 1) of the unpruned ``metric``."""
  metric: str
  fraction: float

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"budget metric must be one of {METRICS}, got "
                       f"{self.metric!r}")
    f = self.fraction
    if (isinstance(f, bool) or not isinstance(f, (int, float, np.floating))
        or not math.isfinite(f) or not 0 < f <= 1):
      raise ValueError(f"a {self.metric} budget must be a fraction in (0, 1] "
                       f"of the unpruned network, got {f!r}")
    object.__setattr__(self, "fraction", float(f))

  @classmethod
  def parse(cls, text) -> "Budget":
    """``'0.47'`` (FLOPs), ``'flops:0.47'`` or ``'params:0.5'``."""
    if isinstance(text, Budget):
      return text
    s = str(text).strip()
    metric, _, value = s.rpartition(":")
    try:
      fraction = float(value)
    except ValueError:
      raise ValueError(f"budget {s!r}: expected a fraction such as 0.47, "
                       "flops:0.47 or params:0.5") from None
    return cls(metric or "flops", fraction)

  @property
  def name(self) -> str:
    """Path-safe label, e.g. ``flops_0.47``."""
    return f"{self.metric}_{self.fraction:g}"

  def kwargs(self) -> dict:
    """``{metric: fraction}``, the keyword of `ranking.masks_for_budget`."""
    return {self.metric: self.fraction}

  def __str__(self):
    return f"{self.metric}:{self.fraction:g}"


def sizes(spec: NetSpec) -> np.ndarray:
  """[G] int64 group sizes in ``spec.groups`` order."""
  return np.array([g.size for g in spec.groups], np.int64)


def protected_counts(spec: NetSpec, safeguard: float) -> np.ndarray:
  """[G] channels every group keeps: ``max(1, ceil(safeguard * C_g))``."""
  if not 0.0 <= float(safeguard) <= 1.0:
    raise ValueError(f"safeguard must be in [0, 1], got {safeguard}")
  c = sizes(spec)
  keep = np.ceil(float(safeguard) * c - _SAFEGUARD_RTOL * c)
  return np.clip(keep, 1, c).astype(np.int64)


def cost_of_counts(spec: NetSpec, counts, metric: str) -> int:
  """Exact cost (a Python int) of the network with ``counts`` [G] channels."""
  q, lin, const = cost_lib.cost_coefficients(spec, metric)
  a = np.asarray(counts, np.int64)
  q = q.astype(np.int64)
  return int(a @ q @ a) + int(lin.astype(np.int64) @ a) + int(const)


def threshold(spec: NetSpec, budget: Budget) -> int:
  """The largest cost meeting ``budget``: ``floor(fraction * unpruned)``."""
  total = cost_of_counts(spec, sizes(spec), budget.metric)
  return math.floor(budget.fraction * total)


def marginal_costs(spec: NetSpec, counts, metric: str) -> np.ndarray:
  """[G] int64: what one more channel of each group costs at ``counts``
  (0 for groups already full)."""
  a = np.asarray(counts, np.int64)
  base = cost_of_counts(spec, a, metric)
  out = np.zeros(len(a), np.int64)
  for g, c in enumerate(sizes(spec)):
    if a[g] < c:
      b = a.copy()
      b[g] += 1
      out[g] = cost_of_counts(spec, b, metric) - base
  return out


class InfeasibleBudgetError(ValueError):
  """No network the method can produce meets the budget."""


def check_feasible(spec: NetSpec, budget: Budget, counts, what: str) -> None:
  """Raises `InfeasibleBudgetError` when ``counts`` (the cheapest network the
  method allows) already exceeds ``budget``."""
  low = cost_of_counts(spec, counts, budget.metric)
  if low > threshold(spec, budget):
    total = cost_of_counts(spec, sizes(spec), budget.metric)
    raise InfeasibleBudgetError(
        f"budget {budget} is below {low / total:.4g}, the smallest "
        f"{budget.metric} fraction {what} can reach; raise the budget or "
        "lower the safeguard")


def solve_counts(spec: NetSpec, counts_fn: Callable[[float], np.ndarray],
                 budget: Budget, safeguard: float, *,
                 iterations: int = 64) -> tuple[np.ndarray, float]:
  """Kept channels per group meeting ``budget`` within one channel.

  Args:
    spec: the network's `NetSpec`.
    counts_fn: ``knob -> [G]`` kept channels, non-decreasing in ``knob``
      (0..1); clipped to [protected, C_g] here.
    budget: the `Budget`.
    safeguard: every group keeps at least ``protected_counts``.
    iterations: bisection steps on the knob (float64).

  Returns:
    ``(counts [G] int64, knob)``: the counts, and the largest knob found whose
    counts fit (before the fill).

  Raises:
    InfeasibleBudgetError: even ``counts_fn(0)`` (at the safeguard) is too
      costly.
  """
  low = protected_counts(spec, safeguard)
  full = sizes(spec)
  limit = threshold(spec, budget)

  def counts(knob):
    c = np.asarray(counts_fn(float(knob)), np.int64).reshape(-1)
    if c.shape != full.shape:
      raise ValueError(f"counts_fn returned shape {c.shape}, expected "
                       f"{full.shape} (one count per group)")
    return np.clip(c, low, full)

  fits = lambda c: cost_of_counts(spec, c, budget.metric) <= limit
  lo_c = counts(0.0)
  check_feasible(spec, budget, lo_c, "this method")
  if fits(counts(1.0)):
    return counts(1.0), 1.0
  lo, hi = 0.0, 1.0
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    if mid in (lo, hi):
      break
    if fits(counts(mid)):
      lo = mid
    else:
      hi = mid
  result, hi_c = counts(lo), counts(hi)
  for g in np.flatnonzero(hi_c > result):   # the next step's growth
    while result[g] < hi_c[g]:
      result[g] += 1
      if not fits(result):
        result[g] -= 1
        break
  return result, lo


def top_k_masks(spec: NetSpec, scores: dict, counts) -> dict[str, np.ndarray]:
  """Per group, keeps the ``counts[g]`` highest-scored channels (ties: lower
  index first). Returns ``{group: [C_g] float32 0/1}``."""
  out = {}
  for g, k in zip(spec.groups, np.asarray(counts, np.int64)):
    s = np.asarray(scores[g.name], np.float64)
    if s.shape != (g.size,):
      raise ValueError(f"scores[{g.name!r}] has shape {s.shape}, expected "
                       f"({g.size},)")
    if np.isnan(s).any():
      raise ValueError(f"scores[{g.name!r}] holds NaN")
    order = np.lexsort((np.arange(g.size), -s))  # descending, stable
    m = np.zeros(g.size, np.float32)
    m[order[:int(k)]] = 1.0
    out[g.name] = m
  return out


def counts_of(spec: NetSpec, masks) -> np.ndarray:
  """[G] int64 kept channels of 0/1 ``masks``."""
  return np.array([int(round(float(np.sum(masks[g.name]))))
                   for g in spec.groups], np.int64)
