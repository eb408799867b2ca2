"""``dagger``: data-agnostic filter gating (Dagger module), a RECONSTRUCTION.

Paper: "Data Agnostic Filter Gating for Efficient Deep Networks", arXiv
2010.15041. Only the abstract is public (no code, no equations): an
auxiliary "Dagger module" takes the *pretrained weights* (not feature maps)
and outputs one gate per filter, the gates multiply the filters' outputs
while training, and an explicit FLOPs-aware regularizer pushes the expected
FLOPs to the target. Everything below the abstract is our choice:

* Granularity: one gate per channel of a group (`legr_jax.gates`), applied
  after BatchNorm as the group's mask; a residual stream's channel has one
  gate, computed from the features of its member convs *averaged* (not
  summed: no chain-sum bias).
* Module (`DaggerModule`): one MLP shared by every layer, over a fixed,
  fan-in-independent embedding of each channel's pretrained weights (so
  layers of different fan-in share it), plus a learned bias per group
  (the per-layer handling: how prunable a layer is as a whole). Features
  (`channel_features`, computed once in numpy from the weights only, then
  standardized over all channels of the network):

    1. log RMS of the filter, z-scored within its layer;
    2. log L2 norm of the filter (LeGR's l2 signal), across layers;
    3. the filter's mean / RMS (its DC share);
    4. redundancy: max cosine similarity to another filter of its layer;
    5. log |BatchNorm scale|, z-scored within the layer;
    6. BatchNorm bias / |scale| (clipped to +-3): how often the unit is on;
    7. outgoing weights: log RMS of the weights reading the channel in
       every consumer (non-depthwise convs of matching width, classifier),
       z-scored within the consumer, averaged over consumers (0 if none);
    8. log of the group's cost per channel (d cost / d width at full
       widths) relative to the average channel: the FLOPs at stake.

  1-7 are averaged over the group's member convs. MLP: 8 -> 32 (tanh) -> 1.
  BatchNorm's running statistics are not used (they summarize data).
* Gate: ``sigmoid(logit / T)`` with a temperature annealed geometrically
  from ``temperature`` to ``final_temperature`` over the run (soft at
  first, so every gate gets a gradient; nearly binary at the end, so the
  task loss sees close-to-pruned networks). Initial logits ~ ``init_logit``
  (3: gates ~0.95, a near-dense start). The ranking score is the logit
  (a monotone map of the gate without sigmoid saturation ties).
* Regularizer: ``strength * (f - t)^2`` with ``f`` the expected FLOPs (or
  params) fraction of the soft gates (`gates.cost_fraction`: the cost
  model's quadratic form in the soft widths) and ``t`` the learn budget;
  two-sided, so it pulls to the target rather than below it.
* Schedule / training: only the module trains (Adam, ``lr``); the network's
  weights stay the pretrained ones and BatchNorm runs in inference mode, so
  the loss is the pretrained network's under soft gates (the module reads
  the pretrained weights; training them would make its input drift) and the
  gates cannot be normalized away by the next layer's batch statistics.
  Default 300 steps of 64 training images (CPU-sized; the paper fine-tunes
  for epochs).
* Ending: the learned logits are a global ranking; `ranking.masks_for_budget`
  meets any budget exactly (within one channel), the pretrained weights are
  sliced and fine-tuned by the shared path (`legr_jax.family`).

The gates are data-agnostic by construction: no input batch enters
`DaggerModule.logits`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from legr_jax import cost as cost_lib
from legr_jax import gates
from legr_jax.methods.base import register
from legr_jax.methods.budget import Budget
from legr_jax.methods.gated import LearnedGates
from legr_jax.models.spec import NetSpec

ARTIFACT = "dagger_scores.json"
NUM_FEATURES = 8
HIDDEN = 32


def _zscore(x):
  x = np.asarray(x, np.float64)
  if x.size < 2:
    return np.zeros_like(x)
  s = x.std()
  return (x - x.mean()) / s if s > 1e-12 else np.zeros_like(x)


def _log(x):
  return np.log(np.maximum(np.asarray(x, np.float64), 1e-12))


def channel_features(spec: NetSpec, params) -> list[np.ndarray]:
  """Per group (``spec.groups`` order) ``[C_g, 8]`` float32 features of
  every channel, from the weights only (see the module doc)."""
  q, lin, _ = cost_lib.cost_coefficients(spec, "flops")
  full = np.array([g.size for g in spec.groups], np.float64)
  marginal = (q + q.T) @ full + lin                # d cost / d width
  per_channel = marginal / max(1e-12, float(marginal @ full / full.sum()))
  member_feats, log_norms = {}, []
  for c in spec.convs:
    w = np.asarray(gates.kernel(params, c.name), np.float64)
    w = w.reshape(-1, w.shape[-1]).T                # [cout, fan_in]
    l2 = np.sqrt(np.sum(w * w, axis=1))
    rms = l2 / np.sqrt(w.shape[1])
    unit = w / np.maximum(l2[:, None], 1e-12)
    if len(w) > 1:
      cos = unit @ unit.T
      np.fill_diagonal(cos, -np.inf)
      red = cos.max(axis=1)
    else:
      red = np.zeros(1)
    scale, bias = (np.asarray(a, np.float64) for a in
                   gates.bn_params(params, c.name))
    member_feats[c.name] = np.stack([
        _zscore(_log(rms)), _log(l2), w.mean(axis=1) / np.maximum(rms, 1e-12),
        red, _zscore(_log(np.abs(scale))),
        np.clip(bias / np.maximum(np.abs(scale), 1e-12), -3, 3)], axis=1)
    log_norms.append(_log(l2))
  # feature 2 across layers: standardized over every filter of the network
  all_norms = np.concatenate(log_norms)
  mu, sd = all_norms.mean(), max(all_norms.std(), 1e-12)
  for f in member_feats.values():
    f[:, 1] = (f[:, 1] - mu) / sd
  out = []
  for gi, g in enumerate(spec.groups):
    acc = np.zeros((g.size, 6))
    cnt = np.zeros((g.size, 1))
    for m in g.members:
      f = member_feats[m]
      acc[:len(f)] += f
      cnt[:len(f)] += 1
    mean = acc / np.maximum(cnt, 1)
    consumers = []
    for c in spec.convs:
      if (c.in_group == g.name and not c.depthwise
          and c.in_channels == g.size):
        k = np.asarray(gates.kernel(params, c.name), np.float64)
        rms_in = np.sqrt(np.mean(k * k, axis=(0, 1, 3)))
        consumers.append(_zscore(_log(rms_in)))
    d = spec.dense
    if d.in_group == g.name and d.in_features == g.size:
      k = np.asarray(params[d.name]["dense"]["kernel"], np.float64)
      consumers.append(_zscore(_log(np.sqrt(np.mean(k * k, axis=1)))))
    outgoing = (np.mean(consumers, axis=0) if consumers
                else np.zeros(g.size))
    cost = np.full(g.size, _log(per_channel[gi]))
    out.append(np.concatenate([mean, outgoing[:, None], cost[:, None]],
                              axis=1))
  # standardize every feature over all channels of the network
  stacked = np.concatenate(out)
  mu = stacked.mean(axis=0)
  sd = np.where(stacked.std(axis=0) > 1e-12, stacked.std(axis=0), 1.0)
  return [((f - mu) / sd).astype(np.float32) for f in out]


@dataclasses.dataclass(frozen=True)
class DaggerModule:
  """The gate generator: fixed per-channel features -> logits."""
  spec: NetSpec
  features: tuple   # per group [C_g, F] float32

  def init(self, seed: int, init_logit: float) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w1": jax.random.normal(k1, (NUM_FEATURES, HIDDEN), jnp.float32)
              / np.sqrt(NUM_FEATURES),
        "b1": jnp.zeros((HIDDEN,), jnp.float32),
        "w2": jax.random.normal(k2, (HIDDEN,), jnp.float32)
              * (0.1 / np.sqrt(HIDDEN)),
        "b2": jnp.asarray(init_logit, jnp.float32),
        "group_bias": jnp.zeros((len(self.spec.groups),), jnp.float32),
    }

  def logits(self, p) -> dict:
    """``{group: [C_g] logits}``: a function of the module's parameters and
    the pretrained weights' features only (no data)."""
    out = {}
    for i, (g, f) in enumerate(zip(self.spec.groups, self.features)):
      h = jnp.tanh(jnp.asarray(f) @ p["w1"] + p["b1"])
      out[g.name] = h @ p["w2"] + p["b2"] + p["group_bias"][i]
    return out


def temperature(step, steps: int, t0: float, t1: float):
  """Geometric annealing from ``t0`` (step 0) to ``t1`` (step ``steps``)."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(1, steps), 0.0, 1.0)
  return t0 * (t1 / t0) ** frac


@register
@dataclasses.dataclass(frozen=True)
class Dagger(LearnedGates):
  """Data-agnostic gates from the pretrained weights (reconstruction; see
  the module doc for every choice)."""
  name = "dagger"
  artifact_file = ARTIFACT

  strength: float = 20.0          # regularizer weight
  penalty: str = "squared"        # gates.budget_penalty form
  temperature: float = 1.0        # gate temperature at the start ...
  final_temperature: float = 0.2  # ... and at the end (geometric)
  init_logit: float = 3.0         # initial gate ~ sigmoid(3) = 0.95

  def __post_init__(self):
    super().__post_init__()
    if self.penalty not in gates.PENALTIES:
      raise ValueError(f"dagger: penalty must be one of {gates.PENALTIES}")
    if not (self.temperature > 0 and self.final_temperature > 0):
      raise ValueError("dagger: temperatures must be > 0")
    if not self.strength >= 0:
      raise ValueError("dagger: strength must be >= 0")

  def module(self, spec: NetSpec, params) -> DaggerModule:
    return DaggerModule(spec, tuple(channel_features(spec, params)))

  def gates(self, module: DaggerModule, p, step):
    t = temperature(step, self.steps, self.temperature,
                    self.final_temperature)
    return {k: jax.nn.sigmoid(v / t) for k, v in module.logits(p).items()}

  def setup(self, net, variables, budget: Budget) -> gates.LearnSetup:
    import optax  # pylint: disable=import-outside-toplevel
    from legr_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
    spec = net.spec
    module = self.module(spec, variables["params"])

    def masks_fn(p, params, step):
      del params   # the module reads the pretrained weights' features
      return self.gates(module, p, step)

    def loss_fn(p, params, masks, step):
      del p, params, step
      f = gates.cost_fraction(spec, masks, budget.metric)
      reg = self.strength * gates.budget_penalty(f, budget.fraction,
                                                 self.penalty)
      return reg, {"cost_fraction": f}

    extra = step_lib.Extra(optimizer=optax.adam(self.lr), masks_fn=masks_fn,
                           loss_fn=loss_fn, train_params=False,
                           bn_train=False)
    return gates.LearnSetup(
        init=module.init(self.seed, self.init_logit), extra=extra,
        scores=lambda p, params: {k: np.asarray(v) for k, v in
                                  module.logits(p).items()})
