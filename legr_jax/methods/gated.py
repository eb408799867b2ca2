"""`LearnedGates`: the method plumbing shared by ``dagger`` and ``sbf``.

A learned-gate method is a `GlobalRanking` with a learn stage: `learn`
trains its gate / score parameters under a differentiable cost regularizer
(`legr_jax.gates.learn`: resumable, seeded, training split only) at the
learn budget and writes one score per channel of every group into its
artifact; `scores` reads them back, and `GlobalRanking.prune` removes the
lowest globally (`ranking.masks_for_budget`) until any FLOPs / params budget
holds within one channel. One learn run therefore serves every budget; the
budget it was learned at only sets where the regularizer pulls.
Subclasses implement `setup` (the `legr_jax.gates.LearnSetup`).
"""

from __future__ import annotations

import dataclasses

from legr_jax import gates
from legr_jax.methods.base import GlobalRanking
from legr_jax.methods.budget import Budget


@dataclasses.dataclass(frozen=True)
class LearnedGates(GlobalRanking):
  """Options shared by the learned-gate methods (the learn stage's length:
  small enough for a CPU by default)."""
  learns = True

  steps: int = 300            # optimizer steps of the learn stage
  batch_size: int = 64        # training images per step
  lr: float = 0.01            # Adam learning rate of the gate parameters
  checkpoint_every: int = 50  # steps between orbax checkpoints

  def __post_init__(self):
    super().__post_init__()
    for f in ("steps", "batch_size", "checkpoint_every"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{self.name}: {f} must be an int >= 1, got {v!r}")
    if not float(self.lr) > 0:
      raise ValueError(f"{self.name}: lr must be > 0, got {self.lr!r}")

  def setup(self, net, variables, budget: Budget) -> gates.LearnSetup:
    """The gate parameters, hook and scores of this method at ``budget``."""
    raise NotImplementedError

  def learn(self, net, variables, dataset, workdir, *, budget, record=None,
            overwrite=False, progress=True, log=print, stop_after=None):
    """Learns the scores at ``budget`` (the regularizer's target) into
    ``workdir``; resumable. ``stop_after``: testing aid (`gates.learn`)."""
    budget = Budget.parse(budget)
    config = {"method": self.config(), "target": str(budget),
              "data": dict(record or {})}
    return gates.learn(net, variables, dataset, workdir,
                       self.setup(net, variables, budget), config=config,
                       artifact_file=self.artifact_file, steps=self.steps,
                       batch_size=self.batch_size, seed=self.seed,
                       checkpoint_every=self.checkpoint_every,
                       overwrite=overwrite, progress=progress, log=log,
                       stop_after=stop_after)

  def scores(self, spec, params, artifact):
    return gates.load_scores(artifact, spec, params, method=self.name,
                             artifact_file=self.artifact_file)
