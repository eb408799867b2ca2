"""``uniform`` and ``fpgm``: the same kept fraction in every group.

Both keep ``ceil(t * C_g)`` channels of every group (at least the safeguard),
with ``t`` solved for the budget by bisection and the last channels filled
group by group (`budget.solve_counts`); so kept fractions differ between
groups only by rounding and that fill. They differ in which channels a group
keeps:

* ``uniform``: the highest squared-L2-norm channels (summed over a group's
  member convs, as `norms.L2`).
* ``fpgm`` (He et al., CVPR 2019, filter pruning via geometric median): the
  channels farthest from the group's geometric median are kept; as in the
  paper's implementation, a filter's distance to the median is approximated
  by the sum of its Euclidean distances to the other filters of the layer,
  and the smallest sums go first. A channel of a group of several convs is
  the concatenation of its filters in every member (choice: one geometric
  median per group, since the group shares one mask). The paper prunes all
  layers at one rate; here that rate is solved for the FLOPs / params budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from legr_jax import ranking
from legr_jax.methods import budget as budget_lib
from legr_jax.methods.base import LayerwiseCounts, group_filters, register


@register
@dataclasses.dataclass(frozen=True)
class Uniform(LayerwiseCounts):
  """The same kept fraction in every group; keeps the largest L2 norms."""
  name = "uniform"

  def counts_fn(self, spec, params):
    c = budget_lib.sizes(spec).astype(np.float64)
    # 1e-9 absorbs float rounding of t * C (t = 0.5 keeps exactly C / 2).
    return lambda t: np.ceil(t * c - 1e-9).astype(np.int64)

  def channel_scores(self, spec, params) -> dict[str, np.ndarray]:
    norms = ranking.filter_norms(spec, params, ord=2)
    return {k: np.asarray(v) for k, v in
            ranking.group_scores(spec, norms).items()}

  def select(self, spec, params, counts):
    return budget_lib.top_k_masks(spec, self.channel_scores(spec, params),
                                  counts)


def geometric_median_distances(filters: np.ndarray) -> np.ndarray:
  """[N] sum of Euclidean distances from each row of ``filters`` [N, D] to
  all rows (FPGM's criterion: small = near the median = redundant)."""
  f = np.asarray(filters, np.float64)
  sq = np.sum(f * f, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
  np.fill_diagonal(d2, 0.0)
  return np.sqrt(d2).sum(axis=1)


@register
@dataclasses.dataclass(frozen=True)
class FPGM(Uniform):
  """Uniform rate; the filters nearest the group's geometric median go
  first."""
  name = "fpgm"

  def channel_scores(self, spec, params):
    return {g.name: geometric_median_distances(
        group_filters(spec, params, g.name)) for g in spec.groups}
