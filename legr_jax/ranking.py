"""LeGR ranking: filter norms, per-layer affine scores, globally budgeted masks.

Pure functions over pytrees (dicts of arrays). The `NetSpec` is the only
static argument; every function can be jitted with it static and vmapped over
a population of score sets or ``(alpha, kappa)`` sets::

  norms = ranking.filter_norms(net.spec, variables["params"])   # once
  def prune(alpha, kappa):
    layer = ranking.affine_scores(norms, alpha, kappa)
    scores = ranking.group_scores(net.spec, layer)
    return ranking.masks_for_budget(net.spec, scores, flops=0.47,
                                    safeguard=0.1)
  masks, feasible = jax.jit(jax.vmap(prune))(alphas, kappas)  # [P, ...]

Terminology. A *layer* is a conv of ``spec.convs`` (each owns its output
filters; depthwise convs too, one filter per channel). A *group* is a set of
layers whose output channels share one mask (``spec.groups``), e.g. the convs
added into one residual stream. Costs are the exact counts of `legr_jax.cost`
(MACs for ``flops``, weights for ``params``); budgets are fractions of the
unpruned cost.

`masks_for_budget` does its budget arithmetic exactly, in int32 limbs (costs
are integers), so the masks equal those of a float64 greedy search whenever the
budget is a concrete Python / NumPy / JAX scalar. A budget traced by
`jax.jit` or `jax.vmap` is turned into a MAC / weight threshold in float32
(relative error ~1e-7) and compared exactly from there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from legr_jax import cost as cost_lib
from legr_jax.models.spec import NetSpec

__all__ = ["filter_norms", "affine_scores", "group_scores", "chain_scores",
           "masks_for_budget"]

# Relative slack in ``ceil(safeguard * C)``: absorbs float rounding, e.g.
# 0.1 * 30 = 3.0000000000000004 keeps 3 channels, not 4.
_SAFEGUARD_RTOL = 1e-6


def _check_keys(tree: Mapping, expected, what: str) -> None:
  if not isinstance(tree, Mapping):
    raise ValueError(f"{what} must be a dict name -> array, got "
                     f"{type(tree).__name__}")
  missing = [k for k in expected if k not in tree]
  extra = sorted(set(tree) - set(expected))
  if missing or extra:
    raise ValueError(f"{what} keys do not match: missing {missing}, unknown "
                     f"{extra}")


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_finite(x, what: str) -> None:
  """Raises ValueError when the concrete array ``x`` holds NaN or inf (a
  traced one is left to the caller's ``feasible`` flag)."""
  if _is_traced(x):
    return
  a = np.asarray(x)
  if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
    bad = a[~np.isfinite(a)].ravel()[0]
    raise ValueError(f"{what} is not finite ({bad}); NaN/inf weights, "
                     "scores or affine parameters cannot be ranked")


def _site(params: Mapping, name: str):
  node = params
  for part in name.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise ValueError(f"params have no entry for conv {name!r} (looked for "
                       f"params[{']['.join(map(repr, name.split('/')))}]"
                       "['conv']['kernel']); pass variables['params'] of the "
                       "network the spec came from.")
    node = node[part]
  return node["conv"]["kernel"]


def filter_norms(spec: NetSpec, params,
                 ord: int = 2) -> dict[str, jax.Array]:  # pylint: disable=redefined-builtin
  """Per-filter norms of every prunable conv layer.

  Args:
    spec: the network's `NetSpec` (static).
    params: the ``'params'`` collection (``variables['params']``); a full
      ``variables`` dict is accepted too. Kernels are ``[kh, kw, cin/groups,
      cout]``.
    ord: ``2``: squared L2 norm of each filter (LeGR's ``l2_weight``);
      ``1``: L1 norm. A Python int (static under jit).

  Returns:
    ``{layer name: [cout] array}`` for every layer in ``spec.layer_names``,
    in float32 (or the kernel dtype if wider).
  """
  if isinstance(ord, bool) or ord not in (1, 2):
    raise ValueError(f"ord must be the Python int 1 or 2, got {ord!r}")
  if (isinstance(params, Mapping) and "params" in params and
      spec.convs[0].name.split("/")[0] not in params):
    params = params["params"]
  out = {}
  for c in spec.convs:
    kernel = jnp.asarray(_site(params, c.name))
    cin = c.in_channels // c.feature_group_count
    chex.assert_shape(kernel, (*c.kernel, cin, c.out_channels),
                      custom_message=f"kernel of {c.name}")
    w = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
    out[c.name] = (jnp.sum(w * w, axis=(0, 1, 2)) if ord == 2 else
                   jnp.sum(jnp.abs(w), axis=(0, 1, 2)))
  return out


def affine_scores(norms: Mapping, alpha: Mapping, kappa: Mapping
                  ) -> dict[str, jax.Array]:
  """LeGR's per-layer affine transform ``alpha_l * norm + kappa_l``.

  Args:
    norms: ``{layer: [C_l] array}``, e.g. from `filter_norms`.
    alpha, kappa: ``{layer: scalar}`` with the same keys (one pair per layer).
      ``alpha = 1, kappa = 0`` everywhere leaves the norms unchanged.

  Returns:
    ``{layer: [C_l] array}`` (dtype promoted from the inputs).

  Raises:
    ValueError: called eagerly with a NaN or infinite norm, alpha or kappa.
      Under jit / vmap they pass through into the scores, and
      `masks_for_budget` then returns ``feasible = False``.
  """
  _check_keys(alpha, list(norms), "alpha")
  _check_keys(kappa, list(norms), "kappa")
  out = {}
  for name, n in norms.items():
    _check_finite(alpha[name], f"alpha[{name!r}]")
    _check_finite(kappa[name], f"kappa[{name!r}]")
    _check_finite(n, f"norms[{name!r}]")
    n = jnp.asarray(n)
    a, k = jnp.asarray(alpha[name]), jnp.asarray(kappa[name])
    chex.assert_rank(n, 1, custom_message=f"norms[{name!r}]")
    chex.assert_shape([a, k], (), custom_message=f"alpha/kappa[{name!r}]")
    out[name] = a * n + k
  return out


AGGREGATES = ("sum", "mean", "max")


def group_scores(spec: NetSpec, layer_scores: Mapping,
                 reduce: str = "sum") -> dict[str, jax.Array]:
  """One score per channel of every group: by default the sum of its layers'
  scores (``reduce='mean'`` / ``'max'``: their mean / max over the member
  layers having the channel).

  Layers coupled by a residual sum (or an expansion conv and its depthwise
  conv) share a mask; a shared channel's score here is the sum of the group's
  member layers' (transformed) scores. A member narrower than its group
  contributes zeros to the channels it lacks.

  The LeGR reference also sums (``one_shot_lowest_ranking_filters``), over
  its *chains*, zero-padded to the widest member; its multi-target variant
  (``..._multi_targets``) takes the mean over the members that have the
  channel. On CIFAR ResNets its chain is the stem and every block's second
  conv of all three stages (its zero-pad shortcut appends, so channel ``j`` is
  one channel through the stages): ResNet-56's channels 0-15 sum 28 layers,
  16-31 18 and 32-63 9. Here a group is one stage's stream (one mask: the
  reference's per-layer safeguard also lets stages keep different channels),
  so stage 1 sums 10 layers, stages 2 and 3 nine each. `NetSpec.chains`
  gives the cross-stage positions for the reference's sum (with
  ``models.get(..., pad='append')``; `chain_scores` aggregates over them;
  ``tools/legr_fidelity.py`` compares with the reference).

  Args:
    spec: the `NetSpec` (static).
    layer_scores: ``{layer: [C_l] array}`` for every layer of
      ``spec.layer_names``.
    reduce: 'sum' (LeGR's), 'mean' or 'max' (static). With 'sum' a chain of
      many layers outranks a single layer of similar filters, so greedy
      pruning keeps residual streams whole and cuts block-internal convs
      first; 'mean' / 'max' compare a chain's channel with a layer's filter
      on one scale.

  Returns:
    ``{group: [C_g] array}`` in ``spec.groups`` order.
  """
  _check_keys(layer_scores, spec.layer_names, "layer_scores")
  if reduce not in AGGREGATES:
    raise ValueError(f"reduce must be one of {AGGREGATES}, got {reduce!r}")
  out = {}
  for g in spec.groups:
    total, count = None, np.zeros(g.size, np.float32)
    for m in g.members:
      s = jnp.asarray(layer_scores[m])
      chex.assert_rank(s, 1, custom_message=f"layer_scores[{m!r}]")
      if s.shape[0] > g.size:
        raise ValueError(f"layer_scores[{m!r}] has {s.shape[0]} entries, but "
                         f"its group {g.name!r} has {g.size} channels")
      count[:s.shape[0]] += 1
      if s.shape[0] < g.size:
        fill = -jnp.inf if reduce == "max" else 0.0
        s = jnp.pad(s, (0, g.size - s.shape[0]), constant_values=fill)
      if total is None:
        total = s
      elif reduce == "max":
        total = jnp.maximum(total, s)
      else:
        total = total + s
    if reduce == "mean":
      total = total / np.maximum(count, 1)
    out[g.name] = total
  return out


def chain_scores(spec: NetSpec, scores: Mapping, reduce: str = "sum"
                 ) -> dict[str, jax.Array]:
  """Group scores aggregated over `NetSpec.chains` (the reference's chains).

  Args:
    spec: the `NetSpec`.
    scores: ``{group: [C_g]}``, e.g. `ranking.group_scores` (each group's
      members already summed).
    reduce: ``'sum'``: every channel of a chain position gets the sum over
      all member layers having that position (the reference's
      ``one_shot_lowest_ranking_filters``); ``'mean'``: divided by their
      number (its ``..._multi_targets``).
  Returns:
    ``{group: [C_g]}`` with the same keys; groups no shortcut links are
    unchanged (``'sum'``) or divided by their member count (``'mean'``).
  """
  if reduce not in ("sum", "mean"):
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
  out = {}
  for ch in spec.chains():
    total = None
    count = np.zeros(ch.size, np.float32)
    for g, p in zip(ch.groups, ch.positions):
      s = jnp.asarray(scores[g])
      if total is None:
        total = jnp.zeros((ch.size,), s.dtype)
      total = total.at[np.array(p)].add(s)
      count[np.array(p)] += len(spec.group(g).members)
    if reduce == "mean":
      total = total / count
    for g, p in zip(ch.groups, ch.positions):
      out[g] = total[np.array(p)]
  return {g: out[g] for g in spec.group_names}


# ----------------------------------------------------------------------------
# masks_for_budget
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CostTable:
  """Integer cost coefficients of one metric, ready for limb arithmetic."""
  pair: np.ndarray   # int32 [G, G]: Q + Q^T
  diag: np.ndarray   # int32 [G]: diag(Q)
  lin: np.ndarray    # int32 [G]
  q: np.ndarray      # int64 [G, G] (host-side exact costs)
  lin64: np.ndarray  # int64 [G]
  const: int
  total: int         # unpruned cost
  bits: int          # limb size: a value v is (v >> bits, v & (2**bits - 1))


@functools.lru_cache(maxsize=256)
def _cost_table(spec: NetSpec, metric: str,
                granularity: tuple[int, ...] | None = None) -> _CostTable:
  """Costs as a quadratic form in the group widths, or with ``granularity``
  (channels per unit, per group) in the numbers of kept units."""
  q, lin, const = cost_lib.cost_coefficients(spec, metric)
  if not (np.all(q == np.round(q)) and np.all(lin == np.round(lin)) and
          const == round(const) and np.all(q >= 0) and np.all(lin >= 0)):
    raise ValueError("cost coefficients must be non-negative integers")
  q64, lin64, const = q.astype(np.int64), lin.astype(np.int64), int(const)
  sizes = np.array([g.size for g in spec.groups], np.int64)
  if granularity is not None:
    r = np.array(granularity, np.int64)
    q64, lin64, sizes = q64 * np.outer(r, r), lin64 * r, sizes // r
  total = int(sizes @ q64 @ sizes + lin64 @ sizes + const)
  pair = q64 + q64.T
  n = int(sizes.sum())
  bits = max(0, total.bit_length() - 30)        # total >> bits < 2**30
  # Largest cost of one channel (widths at most the group sizes).
  max_delta = int(np.max(pair @ sizes + lin64))
  if max_delta >= 2**31 or (n + 2) << bits > 2**31:
    raise ValueError(
        f"network too large for the exact int32 ranking: {n} channels, "
        f"unpruned {metric} {total:.3e}, largest per-channel {metric} "
        f"{max_delta:.3e}")
  return _CostTable(pair=pair.astype(np.int32), diag=np.diag(q64).astype(
      np.int32), lin=lin64.astype(np.int32), q=q64, lin64=lin64, const=const,
                    total=total, bits=bits)


def _concrete_scalar(x, what: str):
  """``float(x)`` for a concrete scalar, None for a tracer."""
  if isinstance(x, jax.core.Tracer):
    return None
  if np.ndim(x) != 0:
    raise ValueError(f"{what} must be a scalar, got shape {np.shape(x)}; "
                     "use jax.vmap for a batch")
  return float(x)


def _keep_counts(spec: NetSpec, safeguard):
  """Channels protected per group: ``[G]`` int32 and its NumPy value (or
  None when ``safeguard`` is traced)."""
  sizes = np.array([g.size for g in spec.groups], np.int64)
  s = _concrete_scalar(safeguard, "safeguard")
  if s is not None:
    if not 0.0 <= s <= 1.0:
      raise ValueError(f"safeguard must be in [0, 1], got {s}")
    keep = np.clip(np.ceil(s * sizes - _SAFEGUARD_RTOL * sizes), 1, sizes)
    keep = keep.astype(np.int32)
    return jnp.asarray(keep), keep
  s = jnp.clip(jnp.asarray(safeguard, jnp.float32), 0.0, 1.0)
  keep = jnp.ceil(s * sizes.astype(np.float32) -
                  np.float32(_SAFEGUARD_RTOL) * sizes.astype(np.float32))
  return jnp.clip(keep, 1, sizes.astype(np.float32)).astype(jnp.int32), None


def _threshold(table: _CostTable, budget, what: str):
  """``floor(budget * unpruned)`` as int32 limbs ``(hi, lo)``.

  A cost C (an integer) meets the budget iff ``C <= budget * unpruned`` iff
  ``C <= floor(budget * unpruned)``.
  """
  b = _concrete_scalar(budget, what)
  lo_mask = (1 << table.bits) - 1
  if b is not None:
    if not math.isfinite(b) or b < 0:
      raise ValueError(f"{what} budget must be a finite fraction >= 0 of the "
                       f"unpruned cost, got {b}")
    x = min(max(math.floor(b * table.total), -1), table.total)
    return b, (jnp.int32(x >> table.bits), jnp.int32(x & lo_mask))
  x = jnp.floor(jnp.asarray(budget, jnp.float32) * np.float32(table.total))
  x = jnp.where(jnp.isnan(x), -1.0, x)  # NaN budget: infeasible
  x = jnp.clip(x, -1.0, np.float32(table.total))
  hi = jnp.floor(x / np.float32(2.0**table.bits))
  lo = x - hi * np.float32(2.0**table.bits)  # exact: the low bits of x
  return None, (hi.astype(jnp.int32), lo.astype(jnp.int32))


def _sort_key(x):
  """Integer key with the order of the real scores ``x`` (-0.0 == +0.0,
  NaN highest)."""
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    return x.astype(jnp.promote_types(x.dtype, jnp.int32))
  if x.dtype != jnp.float64:
    x = x.astype(jnp.float32)   # exact for bf16 / f16
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  x = jnp.where(jnp.isnan(x), jnp.full_like(x, jnp.nan), x)
  ibits = jnp.int64 if x.dtype == jnp.float64 else jnp.int32
  b = jax.lax.bitcast_convert_type(x, ibits)
  flip = np.array(np.iinfo(ibits).max, ibits)
  return jnp.where(b < 0, b ^ flip, b)       # negatives: reverse magnitude


def _stable_argsort(key):
  """``argsort(key)`` with ties in index order, for a 1-D integer key.

  XLA:CPU sorts a single int32 array several times faster than (key, index)
  pairs, so the index is packed with the key's dense rank into one int32.
  """
  n = key.shape[0]
  if n * n >= 2**31 or key.dtype != jnp.int32:
    return jnp.argsort(key, stable=True).astype(jnp.int32)
  rank = jnp.searchsorted(jnp.sort(key), key, side="left",
                          method="scan_unrolled").astype(jnp.int32)
  return jnp.sort(rank * n + jnp.arange(n, dtype=jnp.int32)) % n


def _exclusive_cumsum(x):
  """Exclusive prefix sum over axis 0 (a scan: XLA:CPU's cumsum is slower)."""
  def step(carry, row):
    return carry + row, carry
  return jax.lax.scan(step, jnp.zeros(x.shape[1:], x.dtype), x)[1]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _masks_core(spec: NetSpec, metrics: tuple[str, ...],
                granularity: tuple[int, ...] | None, scores, keep,
                thresholds):
  """Greedy global pruning, all prefixes at once. See `masks_for_budget`.
  With ``granularity`` the entries of ``scores`` and ``keep`` are units of
  that many channels per group (``C_g / granularity_g`` per group)."""
  sizes = np.array([g.size for g in spec.groups], np.int32)
  if granularity is not None:
    sizes = sizes // np.array(granularity, np.int32)
  num_groups, n = len(sizes), int(sizes.sum())
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
  gid = np.repeat(np.arange(num_groups, dtype=np.int32), sizes)  # flat layout

  flat = jnp.concatenate([jnp.asarray(scores[g.name]) for g in spec.groups])
  # 1) Global order by score; ties by flat position = (group, channel).
  order = _stable_argsort(_sort_key(flat))    # i-th position -> flat index
  g_of = jnp.asarray(gid)[order]
  # 2) Channels of each group seen before position i: [N, G]. The first
  #    C_g - keep_g of a group in this order are removable, the rest protected.
  onehot = jax.nn.one_hot(g_of, num_groups, dtype=jnp.int32)
  before = _exclusive_cumsum(onehot)
  cap = sizes - keep                           # removable per group
  removable = jnp.sum(before * onehot, axis=1) < cap[g_of]
  widths = sizes - jnp.minimum(before, cap)    # before removing position i
  # 3) Exact cost decrease of each removal, prefix sums in two int32 limbs:
  #    cost(a) - cost(a - e_g) = ((Q + Q^T) a)_g - Q_gg + l_g >= 0.
  ok = jnp.ones((n + 1,), bool)
  zero = jnp.zeros((1,), jnp.int32)
  for metric, (x_hi, x_lo) in zip(metrics, thresholds):
    t = _cost_table(spec, metric, granularity)
    delta = (jnp.sum(jnp.asarray(t.pair)[g_of] * widths, axis=1) -
             jnp.asarray(t.diag)[g_of] + jnp.asarray(t.lin)[g_of])
    delta = jnp.where(removable, delta, 0)
    lo_mask = (1 << t.bits) - 1
    hi_sum = jnp.concatenate([zero, jnp.cumsum(delta >> t.bits)])
    lo_sum = jnp.concatenate([zero, jnp.cumsum(delta & lo_mask)]) + x_lo
    hi_sum = hi_sum + x_hi + (lo_sum >> t.bits)
    lo_sum = lo_sum & lo_mask
    # cost after the first i positions = total - D(i) <= x <=> D(i) + x >= total
    u_hi, u_lo = t.total >> t.bits, t.total & lo_mask
    ok &= (hi_sum > u_hi) | ((hi_sum == u_hi) & (lo_sum >= u_lo))
  feasible = ok[n]                             # all removable removed
  cut = jnp.where(jnp.any(ok), jnp.argmax(ok), n)
  removed = removable & (jnp.arange(n) < cut)
  kept = jnp.ones((n,), jnp.float32).at[order].set(
      jnp.where(removed, 0.0, 1.0), unique_indices=True)
  masks = {g.name: kept[s:s + int(c)]
           for g, s, c in zip(spec.groups, starts, sizes)}
  return masks, feasible


def _min_cost(table: _CostTable, keep: np.ndarray) -> int:
  """Exact cost with every group at its protected width."""
  k = keep.astype(np.int64)
  return int(k @ table.q @ k + table.lin64 @ k + table.const)


def _units(scores, r: int):
  """A group's channels in ascending score order (ties: channel index) cut
  into units of ``r`` from the bottom: ``(order [C], unit scores [C / r])``;
  a unit's score is its best member's, so it goes once all of it would."""
  order = _stable_argsort(_sort_key(scores))
  return order, scores[order].reshape(-1, r)[:, -1]


def masks_for_budget(spec: NetSpec, scores: Mapping, *, flops=None,
                     params=None, safeguard=0.0, round_to: int = 1):
  """Globally ranked masks meeting a FLOPs and/or parameter budget.

  All channels of all groups are ranked by score; the lowest-scored are
  removed, one at a time in that order, until the cost is at most
  ``budget * unpruned`` (LeGR's greedy rule; removing a channel also shrinks
  the convs reading it, so the cost is recomputed exactly after every step).
  Every group keeps its ``max(1, ceil(safeguard * C_g))`` best channels (the
  ceil forgives a relative 1e-6 of float rounding). Ties in score are removed
  in ``spec.groups`` order, then channel index. Scores must be finite:
  eagerly NaN / inf raise; under jit / vmap they make ``feasible`` False
  (the masks are then computed with NaN ranked highest, and meaningless).

  The result is the shortest prefix of that order that fits: its cost is
  ``<= budget`` and exceeds the budget minus the cost of its last removed
  channel. Runs in O(N G) for N channels and G groups, no Python loop at run
  time; jittable (``spec`` static) and vmappable over ``scores``. Costs are
  integers and compared exactly (int32 limbs) with ``floor(budget *
  unpruned)``; a traced budget is turned into that threshold in float32.

  Args:
    spec: the `NetSpec` (static).
    scores: ``{group: [C_g] array}`` for every group (e.g. from
      `group_scores`); any real dtype.
    flops: budget as a fraction of the unpruned MACs (e.g. 0.47), or None.
    params: budget as a fraction of the unpruned parameter count, or None.
      At least one of ``flops``/``params``; with both, both must hold.
    safeguard: fraction of every group's channels that is never removed.
    round_to: channel granularity (static int >= 1). With ``round_to = r``
      every group whose size is a multiple of ``r`` keeps a multiple of
      ``r`` channels: its channels, in ascending score order, are removed in
      units of ``r`` (a unit ranks by its best channel's score), the greedy
      rule above runs over units, and the safeguard is rounded up to whole
      units. Other groups stay channel by channel. Hardware runs aligned
      widths faster (benchmarks/bench_sliced_inference.py).

  Returns:
    ``(masks, feasible)``, always a pair: ``masks`` is ``{group: [C_g]
    float32 0/1}``; ``feasible`` a bool scalar array, False when the budget
    is below the cheapest network the safeguard allows (the masks then keep
    only the protected channels, the cheapest such network), or when a score
    is NaN or infinite.

  Raises:
    ValueError: when called eagerly (no jit/vmap tracing) with an infeasible
      budget or a NaN / infinite score; under jit or vmap check ``feasible``
      instead. Also on bad keys, shapes, a negative budget or a safeguard
      outside [0, 1].
  """
  if flops is None and params is None:
    raise ValueError("give a budget: flops=... and/or params=... (a fraction "
                     "of the unpruned cost, e.g. flops=0.47)")
  _check_keys(scores, spec.group_names, "scores")
  for g in spec.groups:
    chex.assert_shape(scores[g.name], (g.size,),
                      custom_message=f"scores[{g.name!r}]")
    _check_finite(scores[g.name], f"scores[{g.name!r}]")
  if (isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer))
      or round_to < 1):
    raise ValueError(f"round_to must be an int >= 1 (channels per pruning "
                     f"unit), got {round_to!r}")
  granularity = None
  if round_to > 1:
    granularity = tuple(int(round_to) if g.size % round_to == 0 else 1
                        for g in spec.groups)
  keep, keep_np = _keep_counts(spec, safeguard)
  metrics, thresholds, budgets = [], [], []
  for metric, budget in (("flops", flops), ("params", params)):
    if budget is not None:
      b, limbs = _threshold(_cost_table(spec, metric), budget, metric)
      metrics.append(metric)
      thresholds.append(limbs)
      budgets.append(b)
  scores = {g.name: scores[g.name] for g in spec.groups}
  if granularity is None:
    masks, feasible = _masks_core(spec, tuple(metrics), None, scores, keep,
                                  tuple(thresholds))
  else:
    r = np.array(granularity, np.int32)
    units = {g.name: _units(jnp.asarray(scores[g.name]), int(rg))
             for g, rg in zip(spec.groups, granularity)}
    keep = (keep + r - 1) // r
    keep_np = None if keep_np is None else (keep_np + r - 1) // r
    unit_masks, feasible = _masks_core(
        spec, tuple(metrics), granularity,
        {g: u[1] for g, u in units.items()}, keep, tuple(thresholds))
    masks = {}
    for g, rg in zip(spec.groups, granularity):
      order = units[g.name][0]
      masks[g.name] = jnp.zeros((g.size,), jnp.float32).at[order].set(
          jnp.repeat(unit_masks[g.name], int(rg)), unique_indices=True)
  if any(_is_traced(s) for s in scores.values()):   # eagerly: raised above
    feasible = feasible & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(jnp.asarray(s))) for s in scores.values()]))
  if not isinstance(feasible, jax.core.Tracer) and not bool(feasible):
    problems = []
    for metric, b in zip(metrics, budgets):
      table = _cost_table(spec, metric, granularity)
      low = _min_cost(table, keep_np) / table.total
      if math.floor(b * table.total) < _min_cost(table, keep_np):
        problems.append(f"a {metric} budget of {b:.6g} is below {low:.6g}, the "
                        f"smallest {metric} fraction reachable")
    raise ValueError(
        f"masks_for_budget: infeasible budget: {'; '.join(problems)} with "
        f"safeguard={float(safeguard)} (every group keeps at least "
        "max(1, ceil(safeguard * C_g)) channels). Raise the budget or lower "
        "the safeguard.")
  return masks, feasible
