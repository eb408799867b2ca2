"""``clr_rnf``: cross-layer ranking + k-reciprocal nearest filters.

Lin et al. 2022 (arXiv 2202.07190; reference code lmbxmu/CLR-RNF): data-free,
non-learning. The knob ``t`` is the kept fraction of the ranked weights (the
reference's ``1 - pr_target``); `budget.solve_counts` bisects it for the
FLOPs / params budget and fills the last channels, so budgets hold within
one channel, never above.

1. Cross-layer ranking (`CLRRNF.counts_fn`). Every weight ``w`` of a ranked
   conv ``l`` scores ``|w| / F_l**lam`` (computed as ``log|w| - lam log
   F_l``: the same order, no overflow). Over all ranked weights pooled, the
   threshold is the ``int(t * total)``-th largest score; a ranked group keeps
   ``int(N_g * (1 - p_g))`` channels, ``p_g`` = share of its weights (all its
   member convs pooled) scoring strictly below the threshold (ties at the
   threshold count as kept; ``int(t * total) = 0`` keeps nothing). These are
   the reference's formulas; the framework's safeguard floor then applies to
   every group (the reference has none).
2. k-reciprocal nearest filters (`k_reciprocal_nearest`) choose the kept
   channels of each group from its filters (`group_filters`: a channel's
   filters in every member conv, concatenated). Kept filters keep their
   original weights.

F_l (`relative_flops`), from `legr_jax.cost`'s MACs, relative to the whole
network's (a common scale cancels out of the ranking). ``flops_rule``:

* ``width`` (default): MACs(l) + 1/|members(g)| of the MACs of every conv
  (and the classifier) reading l's output group g, i.e. the MACs that scale
  with the layer's width (a residual chain's readers are shared equally by
  its members). For a CIFAR ResNet block's first conv this is the block's
  two convs: the unit the reference's ResNet table counts.
* ``conv``: MACs(l) alone: the unit of the reference's VGG table.

The reference hard-codes F (``flops_cfg`` in cifar.py). Its entries equal,
to their 5 digits, per-unit ``h*w*c_out*(k*k*c_in + a)`` operations relative
to the first unit: ResNet-56/110 a = 4, unit = block (conv1 + conv2, the
stem counted into block 0); VGG-16 a = 5, unit = the conv. Side by side,
normalized to the first ranked layer (`reference_comparison()`; "rebuilt" is
that reading of the table computed from our specs; F^-lam relative):

  ResNet-56 (lam 10)  ref F    rebuilt  width  conv  ref F^-lam width F^-lam
  block 0             1        1        1      1     1          1
  blocks 1-8          0.9052   0.9052   1      1     2.707      1
  block 9 (stride 2)  0.67278  0.67278  0.75   0.5   52.63      17.76
  blocks 10-17        0.89297  0.89297  1      1     3.102      1
  block 18 (stride 2) 0.66667  0.66667  0.75   0.5   57.66      17.76
  blocks 19-26        0.88685  0.88685  1      1     3.323      1

  ResNet-110 (lam 5): the same pattern with 18 blocks per stage (same F
  columns); ref F^-lam 1.645 / 7.255 / 1.761 / 7.594 / 1.823, width F^-lam
  1 / 4.214 / 1 / 4.214 / 1.

  VGG-16 (lam 0.5)  ref F    rebuilt  width    conv    ref F^-lam width F^-lam
  conv 0            1        1        1        1       1          1
  conv 1            18.156   18.156   1.4328   21.333  0.2347     0.8354
  conv 2            9.0781   9.0781   1.4328   10.667  0.3319     0.8354
  conv 3            18.078   18.078   1.4328   21.333  0.2352     0.8354
  conv 4            9.0391   9.0391   1.4328   10.667  0.3326     0.8354
  conv 5            18.039   18.039   1.9104   21.333  0.2355     0.7235
  conv 6            18.039   18.039   1.4328   21.333  0.2355     0.8354
  conv 7            9.0195   9.0195   1.4328   10.667  0.3330     0.8354
  conv 8            18.020   18.020   1.9104   21.333  0.2356     0.7235
  conv 9            18.020   18.020   1.1940   21.333  0.2356     0.9152
  conv 10, 11       4.5049   4.5049   0.47761  5.3333  0.4712     1.447
  conv 12           4.5049   4.5049   0.23894  5.3333  0.4712     2.046

``width`` reproduces the ResNet tables up to two artefacts of the
reference's counting: the stem counted into block 0 (every other block's F
is 0.905 of block 0's: 2.7x in importance at lam 10) and the per-element
term (later stages' F 1.4% / 2% lower still: 3.1x / 3.3x); ours gives every
regular block block 0's F. The decisive ratio, a stride-2 block vs a regular
one, is 0.75 (ref 0.753 / 0.752): 17.8x at lam 10 (ref 17.0x / 17.4x).
``conv`` gives 0.5 there (1024x at lam 10), but matches the VGG table up to
conv 0 (1/21.3 vs 1/18.2 of conv 1; lam 0.5 damps both). ``width`` is the
default everywhere: it is what pruning a layer's channels saves in our cost
model, and it matches where lam is large enough for F to matter most.

lam (`LAMBDAS`, by `PrunableNet.name`; ``lam=None`` resolves it in `prune`):
the reference's resnet56 10, resnet110 5, vgg16 0.5, resnet50 0.4,
mobilenetv2 1 (MobileNets). Ours: resnet20 and resnet32 10, the ResNet-56
value (same blocks, widths and F pattern; the reference lowers lam for the
deeper ResNet-110, and nothing supports extrapolating it upward; with our F,
lam only sets how strongly the stride-2 blocks' first convs are protected:
0.75**-10 = 18x); cnn_small 0.5 (a plain conv stack, like VGG); any other
name `DEFAULT_LAM` = 1.

Variants (``variant``):

* ``grouped`` (default): every group is ranked (a residual chain pools its
  member convs' weights; MobileNetV2's expansion conv and its depthwise conv
  too); BatchNorm kept. Default because it reaches low budgets on residual
  networks (``faithful`` cannot go below the full-width chains' cost) and
  keeps the pretrained BN, so the pruned network works before fine-tuning.
* ``faithful``: as the reference's cifar.py: ranks only groups off the
  residual chains (rule: no shortcut site and exactly one non-depthwise
  member conv: CIFAR ResNets' block first convs, every conv of VGG-16 and
  cnn_small, MobileNetV2's expansion groups and unchained convs, ResNet-50's
  stem, conv1 and conv2); other groups stay full; `new_variables` resets the
  BatchNorm of every ranked group's member convs (scale 1, bias 0, mean 0,
  var 1), as the reference leaves them (all ranked layers, pruned or not) at
  initialisation (its VGG path also re-initialises the classifier; we keep
  it). The reference's ImageNet script differs (ResNet-50 and
  MobileNetV2 also pool each stage's chain and keep BN): closer to
  ``grouped``.

k-reciprocal nearest filters: squared Euclidean distances in float64
(identical filters at exactly 0); neighbour lists ascending, ties by lower
index (a filter with an identical lower-index twin lists the twin first).
The reference sorts ``exp(-d)`` (rows scaled to unit norm) in float32: the
same order except where float32 ``exp(-d)`` collides (distances within
~1e-7 of each other, or above ~100, where it underflows to 0). Every filter
recommends its ``k`` nearest (itself included); ``k`` grows from ``m`` until
the intersection of all recommendations holds >= ``m``; on an overshoot the
step ``k - 1`` intersection is topped up from the filters new at step ``k``
in exactly the reference's order: CPython's ``set.pop`` order of ``new =
cur - prev``, with ``cur`` and ``prev`` built as the reference builds them
(its chained ``set.intersection`` inserts in the last filter's neighbour
order); for integer indices that is hash-table slot order (ascending index
modulo the table size, not always ascending). Checked against the literal
procedure in tests/test_clr_rnf.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from legr_jax import ranking
from legr_jax.methods import budget as budget_lib
from legr_jax.methods.base import LayerwiseCounts, group_filters, register
from legr_jax.models.spec import NetSpec

_site = ranking._site  # pylint: disable=protected-access

VARIANTS = ("grouped", "faithful")
FLOPS_RULES = ("width", "conv")

# lam per `PrunableNet.name` (see the module docstring for the choices).
LAMBDAS = {
    "resnet56": 10.0, "resnet110": 5.0, "vgg16": 0.5, "resnet50": 0.4,
    "mobilenetv2": 1.0,                       # the reference's values
    "resnet20": 10.0, "resnet32": 10.0, "cnn_small": 0.5,   # ours
}
DEFAULT_LAM = 1.0

# The reference's hard-coded F tables (cifar.py ``flops_cfg``), for
# `reference_comparison` only. ResNets: one entry per block (its first conv);
# VGG-16: one per conv.
_R56 = ((1.0,) + (0.9052,) * 8 + (0.67278,) + (0.89297,) * 8 + (0.66667,)
        + (0.88685,) * 8)
_R110 = ((1.0,) + (0.9052,) * 17 + (0.67278,) + (0.89297,) * 17
         + (0.66667,) + (0.88685,) * 17)
REFERENCE_FLOPS_CFG = {
    "vgg16": (1.0, 18.15625, 9.07812, 18.07812, 9.03906, 18.03906, 18.03906,
              9.01953, 18.01953, 18.01953, 4.50488, 4.50488, 4.50488),
    "resnet56": _R56,
    "resnet110": _R110,
}
# How the reference's table reads (see the module docstring): the extra
# operations per output element and the unit (our ``flops_rule`` names).
REFERENCE_READING = {"resnet56": (4, "width"), "resnet110": (4, "width"),
                     "vgg16": (5, "conv")}


def default_lam(model_name: str | None) -> float:
  """lam for a `PrunableNet.name` (`LAMBDAS`, else `DEFAULT_LAM`)."""
  return float(LAMBDAS.get(model_name, DEFAULT_LAM))


def ranked_groups(spec: NetSpec, variant: str) -> tuple[str, ...]:
  """Groups a variant ranks, in ``spec.groups`` order: all for ``grouped``;
  for ``faithful`` those off the residual chains (no shortcut site, exactly
  one non-depthwise member conv)."""
  if variant not in VARIANTS:
    raise ValueError(f"clr_rnf: variant must be one of {VARIANTS}, got "
                     f"{variant!r}")
  if variant == "grouped":
    return spec.group_names
  dw = {c.name: c.depthwise for c in spec.convs}
  return tuple(g.name for g in spec.groups if not g.shortcuts
               and sum(not dw[m] for m in g.members) == 1)


def conv_macs(spec: NetSpec) -> dict[str, int]:
  """Unpruned MACs of every conv (`legr_jax.cost`'s convention)."""
  return {c.name: (c.out_hw[0] * c.out_hw[1] * c.kernel[0] * c.kernel[1]
                   * c.in_channels * c.out_channels // c.feature_group_count)
          for c in spec.convs}


def relative_flops(spec: NetSpec, rule: str = "width") -> dict[str, float]:
  """F_l per conv name, relative to the unpruned network's MACs (> 0).

  ``width``: MACs(l) + (MACs of the convs and classifier reading l's output
  group) / (number of member convs of that group). ``conv``: MACs(l).
  """
  if rule not in FLOPS_RULES:
    raise ValueError(f"clr_rnf: flops_rule must be one of {FLOPS_RULES}, got "
                     f"{rule!r}")
  macs = conv_macs(spec)
  total = budget_lib.cost_of_counts(spec, budget_lib.sizes(spec), "flops")
  members = {g.name: len(g.members) for g in spec.groups}
  readers = dict.fromkeys(members, 0)
  for c in spec.convs:
    if c.in_group is not None and c.in_group != c.out_group:
      readers[c.in_group] += macs[c.name]
  d = spec.dense
  if d.in_group is not None:
    readers[d.in_group] += d.in_features * d.out_features
  out = {}
  for c in spec.convs:
    f = float(macs[c.name])
    if rule == "width":
      f += readers[c.out_group] / members[c.out_group]
    out[c.name] = f / total
  return out


def squared_distances(filters) -> np.ndarray:
  """[C, C] float64 squared Euclidean distances between the rows of
  ``filters`` [C, D]; identical rows (and the diagonal) are exactly 0."""
  f = np.asarray(filters, np.float64)
  sq = np.einsum("ij,ij->i", f, f)
  scale = sq[:, None] + sq[None, :]
  d2 = np.maximum(scale - 2.0 * (f @ f.T), 0.0)
  np.fill_diagonal(d2, 0.0)
  # Rounding can leave identical rows slightly apart: check the near-zero
  # pairs exactly.
  near = np.triu(d2 <= 1e-9 * scale, 1)
  for i, j in zip(*np.nonzero(near)):
    if np.array_equal(f[i], f[j]):
      d2[i, j] = d2[j, i] = 0.0
  return d2


def k_reciprocal_nearest(filters, m: int) -> np.ndarray:
  """[C] bool: the ``m`` filters (rows of ``filters`` [C, D]) kept by
  k-reciprocal nearest filter selection (module docstring: order, ties and
  top-up as the reference). ``1 <= m <= C``."""
  f = np.asarray(filters, np.float64)
  c = f.shape[0]
  m = int(m)
  if not 1 <= m <= c:
    raise ValueError(f"k_reciprocal_nearest: m={m} must be in [1, {c}]")
  if m == c:
    return np.ones(c, bool)
  order = np.argsort(squared_distances(f), axis=1, kind="stable")
  rank = np.empty((c, c), np.int64)
  rank[np.arange(c)[:, None], order] = np.arange(c)[None, :]
  # j is in every filter's k nearest iff its worst rank is below k.
  worst = rank.max(axis=0)
  k = max(m, int(np.sort(worst)[m - 1]) + 1)
  inside = worst < k
  if int(inside.sum()) == m:
    return inside
  # Overshoot (then k > m): the step k - 1 intersection, topped up from the
  # filters new at step k in the reference's set order. Its chained
  # intersections build the final set by inserting the last filter's
  # neighbours in order, which fixes CPython's hash-table layout.
  last = order[-1]
  cur, prev = set(), set()
  for j in last[:k]:
    if worst[j] < k:
      cur.add(int(j))
  for j in last[:k - 1]:
    if worst[j] < k - 1:
      prev.add(int(j))
  new = cur.difference(prev)
  keep = np.zeros(c, bool)
  keep[sorted(prev)] = True
  for _ in range(m - len(prev)):
    keep[new.pop()] = True
  return keep


def _copy_tree(x):
  return ({k: _copy_tree(v) for k, v in x.items()}
          if isinstance(x, Mapping) else x)


def _node(tree, site: str, what: str):
  node = tree
  for part in site.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(f"clr_rnf: variables[{what!r}] have no entry for "
                       f"conv {site!r}")
    node = node[part]
  if "bn" not in node:
    raise ValueError(f"clr_rnf: conv {site!r} has no BatchNorm in "
                     f"variables[{what!r}]")
  return node["bn"]


@register
@dataclasses.dataclass(frozen=True)
class CLRRNF(LayerwiseCounts):
  """CLR-RNF (module docstring). ``lam``: None = per architecture
  (`LAMBDAS` by ``net.name``, resolved in `prune`); ``variant``: ``grouped``
  | ``faithful``; ``flops_rule``: ``width`` | ``conv`` (F_l)."""
  lam: float | None = None
  variant: str = "grouped"
  flops_rule: str = "width"

  name = "clr_rnf"

  def __post_init__(self):
    super().__post_init__()
    if self.variant not in VARIANTS:
      raise ValueError(f"clr_rnf: variant must be one of {VARIANTS}, got "
                       f"{self.variant!r}")
    if self.flops_rule not in FLOPS_RULES:
      raise ValueError(f"clr_rnf: flops_rule must be one of {FLOPS_RULES}, "
                       f"got {self.flops_rule!r}")
    lam = self.lam
    if lam is not None and (
        isinstance(lam, bool) or not isinstance(lam, (int, float, np.number))
        or not math.isfinite(lam) or lam < 0):
      raise ValueError(f"clr_rnf: lam must be None or a finite number >= 0, "
                       f"got {lam!r}")

  def counts_fn(self, spec, params):
    """knob ``t`` (kept fraction of the ranked weights) -> [G] kept
    channels (unranked groups: full); non-decreasing in ``t``."""
    if self.lam is None:
      raise ValueError("clr_rnf: lam=None is resolved from the network's "
                       "name in prune(net, ...); pass lam explicitly to call "
                       "counts_fn")
    lam = float(self.lam)
    f = relative_flops(spec, self.flops_rule)
    ranked = set(ranked_groups(spec, self.variant))
    full = budget_lib.sizes(spec)
    idx = np.array([i for i, g in enumerate(spec.groups) if g.name in ranked],
                   np.int64)
    per_group = []
    for i in idx:
      parts = []
      for conv in spec.groups[i].members:
        w = np.abs(np.asarray(_site(params, conv), np.float64)).reshape(-1)
        if not np.all(np.isfinite(w)):
          raise ValueError(f"clr_rnf: the weights of conv {conv!r} are not "
                           "finite")
        with np.errstate(divide="ignore"):
          parts.append(np.log(w) - lam * math.log(f[conv]))
      per_group.append(np.sort(np.concatenate(parts)))
    pooled = (np.sort(np.concatenate(per_group)) if per_group
              else np.zeros(0))
    total = pooled.size
    n = np.array([s.size for s in per_group], np.float64)
    chans = full[idx].astype(np.float64)

    def counts(knob: float) -> np.ndarray:
      out = full.copy()
      if total == 0:
        return out
      keep = min(max(int(total * float(knob)), 0), total)
      thr = pooled[total - keep] if keep > 0 else np.inf
      below = np.array([np.searchsorted(s, thr, side="left")
                        for s in per_group], np.float64)
      out[idx] = np.floor(chans * (1.0 - below / n)).astype(np.int64)
      return out

    return counts

  def select(self, spec, params, counts):
    out = {}
    for g, k in zip(spec.groups, np.asarray(counts, np.int64)):
      if k >= g.size:
        out[g.name] = np.ones(g.size, np.float32)
      else:
        out[g.name] = k_reciprocal_nearest(
            group_filters(spec, params, g.name), int(k)).astype(np.float32)
    return out

  def new_variables(self, spec, variables, masks):
    """``faithful``: a copy with every ranked group's BatchNorm reset to its
    initialisation (scale 1, bias 0, mean 0, var 1); ``grouped``: None."""
    del masks
    if self.variant != "faithful":
      return None
    ranked = set(ranked_groups(spec, self.variant))
    out = _copy_tree(variables)
    for g in spec.groups:
      if g.name not in ranked:
        continue
      for site in g.members:
        bn = _node(out["params"], site, "params")
        bn["scale"] = jnp.ones_like(bn["scale"])
        bn["bias"] = jnp.zeros_like(bn["bias"])
        if "batch_stats" in out:
          st = _node(out["batch_stats"], site, "batch_stats")
          st["mean"] = jnp.zeros_like(st["mean"])
          st["var"] = jnp.ones_like(st["var"])
    return out

  def prune(self, net, variables, budget, *, artifact=None, round_to=1):
    """As `LayerwiseCounts.prune`, with ``lam=None`` resolved from
    ``net.name``; ``info`` adds lam, variant and pr_target (1 - knob)."""
    lam = (float(self.lam) if self.lam is not None
           else default_lam(getattr(net, "name", None)))
    method = dataclasses.replace(self, lam=lam)
    try:
      out = LayerwiseCounts.prune(method, net, variables, budget,
                                  artifact=artifact, round_to=round_to)
    except budget_lib.InfeasibleBudgetError as e:
      n_full = len(net.spec.groups) - len(
          ranked_groups(net.spec, self.variant))
      extra = (f" (variant 'faithful' keeps {n_full} residual-chain groups "
               "at full width; variant 'grouped' prunes them)"
               if self.variant == "faithful" and n_full else "")
      raise budget_lib.InfeasibleBudgetError(
          f"clr_rnf{extra}: {e}") from None
    out.info.update(lam=lam, variant=self.variant,
                    pr_target=1.0 - out.info["knob"])
    return out


def reference_comparison(names=("resnet56", "vgg16", "resnet110")) -> str:
  """Text table: the reference's F table, its reading rebuilt from our spec
  (module docstring), ours (``width``, ``conv``), normalized to the first
  ranked layer, and the relative multipliers F^-lam (ref, ``width``)."""
  from legr_jax import models  # pylint: disable=import-outside-toplevel
  lines = []
  for name in names:
    spec = models.get(name).spec
    lam = LAMBDAS[name]
    convs = [spec.group(g).members[0]
             for g in ranked_groups(spec, "faithful")]
    ref = np.array(REFERENCE_FLOPS_CFG[name])
    if len(ref) != len(convs):
      raise AssertionError(f"{name}: {len(convs)} ranked convs, reference "
                           f"table has {len(ref)}")
    rebuilt = np.array(reference_reading(spec, convs,
                                         *REFERENCE_READING[name]))
    width = np.array([relative_flops(spec, "width")[c] for c in convs])
    conv = np.array([relative_flops(spec, "conv")[c] for c in convs])
    cols = [ref / ref[0], rebuilt / rebuilt[0], width / width[0],
            conv / conv[0]]
    cols += [cols[0] ** -lam, cols[2] ** -lam]
    lines.append(f"{name} (lam {lam:g}): layer, ref F, rebuilt, width, conv, "
                 "ref F^-lam, width F^-lam")
    for i, c in enumerate(convs):
      lines.append(f"  {i:3d} {c:24s}" + "".join(
          f" {col[i]:10.5g}" for col in cols))
  return "\n".join(lines)


def reference_reading(spec: NetSpec, convs, extra: int,
                      unit: str) -> list[int]:
  """The reference table's reading (`REFERENCE_READING`): per conv of
  ``convs`` (the ranked ones, in trace order), the operations
  ``h*w*c_out*(k*k*c_in/groups + extra)`` of its unit (``width``: the conv
  and its readers; ``conv``: itself), the convs before the first one
  counted into the first unit."""
  ops = {c.name: c.out_hw[0] * c.out_hw[1] * c.out_channels * (
      c.kernel[0] * c.kernel[1] * c.in_channels // c.feature_group_count
      + extra) for c in spec.convs}
  names = [c.name for c in spec.convs]
  out = []
  for c in convs:
    v = ops[c]
    if unit == "width":
      g = spec.conv(c).out_group
      v += sum(ops[r.name] for r in spec.convs
               if r.in_group == g and r.out_group != g)
    out.append(v)
  out[0] += sum(ops[n] for n in names[:names.index(convs[0])])
  return out
