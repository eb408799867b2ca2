"""``sbf``: SbF-Pruner, end-to-end sensitivity-based filter scores, a
RECONSTRUCTION.

Paper: "End-to-End Sensitivity-Based Filter Pruning", arXiv 2204.07412 (the
same work as "Pruning by Active Attention Manipulation", PAAM, arXiv
2210.11114). No code and no exact equations are public. What is known: per
layer an attention network over the layer's filters (input: the flattened
filter weights, so correlations between filters count) outputs one score per
filter; scores start at 1 and multiply the feature maps (A' = S * A); the
activation is a "leaky-exponential" (softmax and sigmoid were rejected); the
loss adds a term on the scores; all layers train jointly, in one stage; no
per-layer budgets. Our choices:

* Granularity: one score per channel of a group (`legr_jax.gates`), applied
  after BatchNorm as the group's mask; a group's "layer" input is the
  concatenation of its member convs' filters (`gates.group_filter_matrix`),
  so a residual stream's channel gets one score from all its filters.
* Attention network, one per group (`group_scores_fn`): rows X (C_g
  filters, D_g weights each) scaled to unit RMS over the layer;
  ``Q, K, V = X Wq, X Wk, X Wv`` (D_g x ``dim``, N(0, 1/D_g)); ``H = V +
  softmax(Q K^T / sqrt(dim)) V`` (every filter attends to all filters of its
  layer); ``z = tanh(H) wo + bo`` with ``wo = 0, bo = 0`` at the start;
  score ``s = lexp(z)``.
* Leaky-exponential (`lexp`): ``exp(z)`` for ``z <= 0``, ``1 + z`` for
  ``z > 0`` (= ELU(z) + 1): positive, 1 at z = 0 (so every score starts at
  exactly 1: the dense network), C^1, exponential decay towards 0 for
  pruned filters (never exactly 0, gradients keep flowing), a linear
  ("leaky") unbounded part above 1 where the task loss wants a filter
  amplified (a sigmoid would cap it at 1 and saturate; a softmax would make
  the scores of a layer compete for a fixed sum).
* Regularizer on the scores' sum: ``strength * max(0, f(s) - t)`` where
  ``f(s)`` is `gates.cost_fraction` with widths ``a_g = sum_j s_gj``: the
  scores' per-layer sums, weighted by the cost model (a channel's score
  counts as much as its layer's channel costs; ``cost_weighted=False``: the
  plain mean score ``sum s / N`` instead, the paper's literal sum). It is
  additive and L1-like (constant push per unit of score) while above the
  target and off below it. Budget relation: ``t`` is the learn budget, the
  fraction where the push stops; ``strength`` only sets how fast the sums
  fall (gradient ``strength * d f / d s_gj`` = strength times the
  channel's cost share against the task loss's sensitivity), so it trades
  learning speed against how long the task loss has to sort the filters;
  the exact budget is imposed at the end by global selection by score
  (`ranking.masks_for_budget`), which is why no per-layer budgets and no
  exact ``t`` are needed during training.
* Training: all groups' attention networks jointly, one stage, Adam (``lr``),
  from the given (pretrained) network. Default ``train_weights=False``: the
  weights stay pretrained and BatchNorm runs in inference mode, so the loss
  measures the pretrained network's sensitivity to each score (and a
  layer's scores cannot shrink together for free, which batch statistics of
  the next BatchNorm would allow). ``train_weights=True`` is the paper's
  end-to-end variant: weights train too (SGD 0.01, momentum 0.9, batch
  statistics), the attention reads the current weights; the trained weights
  are not kept (scores are soft multipliers the weights co-adapted to;
  every method's pruned network is sliced from the same baseline and
  fine-tuned with the same recipe by `legr_jax.family`).
* Ending: ``z`` (monotone in ``s``) is a global ranking; any FLOPs / params
  budget is met within one channel. The paper chooses filters during
  training from the cumulative score distribution; we choose once, at the
  end.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from legr_jax import gates
from legr_jax.methods.base import register
from legr_jax.methods.budget import Budget
from legr_jax.methods.gated import LearnedGates
from legr_jax.models.spec import NetSpec

ARTIFACT = "sbf_scores.json"


def lexp(z):
  """Leaky-exponential: ``exp(z)`` for ``z <= 0``, ``1 + z`` above."""
  # where, not minimum: minimum's gradient at the tie z = 0 (every score's
  # start) is 1/2; this one is 1 from both sides
  return jnp.where(z > 0, 1.0 + z, jnp.exp(jnp.where(z > 0, 0.0, z)))


def init_attention(spec: NetSpec, params, seed: int, dim: int) -> list:
  """Per group (``spec.groups`` order) the attention network's parameters
  (a list: group names hold '/', which checkpoints keep as paths)."""
  keys = jax.random.split(jax.random.key(seed), len(spec.groups))
  out = []
  for g, key in zip(spec.groups, keys):
    d_in = int(gates.group_filter_matrix(spec, params, g.name).shape[1])
    kq, kk, kv = jax.random.split(key, 3)
    std = 1.0 / np.sqrt(d_in)
    out.append({
        "wq": jax.random.normal(kq, (d_in, dim), jnp.float32) * std,
        "wk": jax.random.normal(kk, (d_in, dim), jnp.float32) * std,
        "wv": jax.random.normal(kv, (d_in, dim), jnp.float32) * std,
        "wo": jnp.zeros((dim,), jnp.float32),
        "bo": jnp.zeros((), jnp.float32)})
  return out


def pre_scores(spec: NetSpec, attention: list, params) -> dict:
  """``{group: [C_g] z}`` (scores before `lexp`) from the filter weights."""
  out = {}
  for g, p in zip(spec.groups, attention):
    x = gates.group_filter_matrix(spec, params, g.name).astype(jnp.float32)
    x = x / (jnp.sqrt(jnp.mean(x * x)) + 1e-12)
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    a = jax.nn.softmax(q @ k.T / np.sqrt(q.shape[1]), axis=-1)
    h = v + a @ v
    out[g.name] = jnp.tanh(h) @ p["wo"] + p["bo"]
  return out


@register
@dataclasses.dataclass(frozen=True)
class SbF(LearnedGates):
  """SbF-Pruner scores (reconstruction; see the module doc)."""
  name = "sbf"
  artifact_file = ARTIFACT

  strength: float = 2.0        # regularizer weight
  dim: int = 16                # attention width
  cost_weighted: bool = True   # the sum weighted by the cost model
  train_weights: bool = False  # the paper's end-to-end variant

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.dim, bool) or not isinstance(self.dim, int) or \
        self.dim < 1:
      raise ValueError("sbf: dim must be an int >= 1")
    if not self.strength >= 0:
      raise ValueError("sbf: strength must be >= 0")

  def setup(self, net, variables, budget: Budget) -> gates.LearnSetup:
    import optax  # pylint: disable=import-outside-toplevel
    from legr_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
    spec = net.spec
    total = sum(g.size for g in spec.groups)

    def masks_fn(p, params, step):
      del step
      return {k: lexp(z) for k, z in pre_scores(spec, p, params).items()}

    def loss_fn(p, params, masks, step):
      del p, params, step
      if self.cost_weighted:
        f = gates.cost_fraction(spec, masks, budget.metric)
      else:
        f = sum(jnp.sum(m) for m in masks.values()) / total
      reg = self.strength * gates.budget_penalty(f, budget.fraction, "hinge")
      return reg, {"score_fraction": f}

    extra = step_lib.Extra(optimizer=optax.adam(self.lr), masks_fn=masks_fn,
                           loss_fn=loss_fn,
                           train_params=self.train_weights,
                           bn_train=self.train_weights)
    return gates.LearnSetup(
        init=init_attention(spec, variables["params"], self.seed, self.dim),
        extra=extra,
        scores=lambda p, params: {k: np.asarray(v) for k, v in pre_scores(
            spec, p, params).items()})
