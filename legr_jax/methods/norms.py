"""Data-free global rankings: ``l1``, ``l2`` (filter norms, no affine
transform; ``l2`` is LeGR's identity member) and ``random`` (a seeded random
ranking, the floor any method must clear).

Coupled channels (a residual chain, an expansion conv and its depthwise
conv) score the sum of their member layers' norms, as LeGR does
(`ranking.group_scores`); option ``aggregate='mean'`` or ``'max'``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from legr_jax import ranking
from legr_jax.methods.base import GlobalRanking, register


@register
@dataclasses.dataclass(frozen=True)
class L2(GlobalRanking):
  """Global ranking by squared L2 filter norm (LeGR's ``l2_weight``)."""
  name = "l2"
  ord = 2
  aggregate: str = "sum"   # coupled channels: 'sum' (LeGR's), 'mean', 'max'

  def scores(self, spec, params, artifact):
    del artifact
    norms = ranking.filter_norms(spec, params, ord=self.ord)
    return {k: np.asarray(v) for k, v in
            ranking.group_scores(spec, norms, self.aggregate).items()}


@register
@dataclasses.dataclass(frozen=True)
class L1(L2):
  """Global ranking by L1 filter norm."""
  name = "l1"
  ord = 1


@register
@dataclasses.dataclass(frozen=True)
class Random(GlobalRanking):
  """Seeded random global ranking: i.i.d. uniform scores per channel."""
  name = "random"

  def scores(self, spec, params, artifact):
    del params, artifact
    keys = jax.random.split(jax.random.key(self.seed), len(spec.groups))
    return {g.name: np.asarray(jax.random.uniform(k, (g.size,)))
            for g, k in zip(spec.groups, keys)}
