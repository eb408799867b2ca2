"""Learning-rate schedules and the SGD optimizer of the LeGR reference."""

from __future__ import annotations

from typing import Sequence

import optax

SCHEDULES = ("multistep", "cosine", "constant")


def make_schedule(base_lr: float, *, epochs: int, steps_per_epoch: int,
                  schedule: str = "multistep",
                  milestones: Sequence[float] = (0.3, 0.6, 0.8),
                  gamma: float = 0.2,
                  warmup_epochs: float = 0.0) -> optax.Schedule:
  """Learning rate as a function of the optimizer step.

  Args:
    base_lr: peak learning rate.
    epochs, steps_per_epoch: length of the run.
    schedule: 'multistep' (multiply by ``gamma`` at the start of epoch
      ``int(m * epochs)`` for every m in ``milestones``), 'cosine' (cosine decay
      to 0 over the run) or 'constant'.
    warmup_epochs: linear warm-up from 0 over this many epochs (0: none).
  """
  total = max(1, epochs * steps_per_epoch)
  warmup = int(round(warmup_epochs * steps_per_epoch))
  if schedule == "multistep":
    boundaries = {}
    for m in milestones:
      step = int(m * epochs) * steps_per_epoch
      if 0 < step < total:
        boundaries[step] = boundaries.get(step, 1.0) * gamma
    main = optax.piecewise_constant_schedule(base_lr, boundaries)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(base_lr, max(1, total - warmup))
  elif schedule == "constant":
    main = optax.constant_schedule(base_lr)
  else:
    raise ValueError(f"unknown schedule {schedule!r}; known: {SCHEDULES}")
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(0.0, base_lr, warmup)
  if schedule == "cosine":
    return optax.join_schedules([ramp, main], [warmup])
  return optax.join_schedules([ramp, lambda s: main(s + warmup)], [warmup])


def make_optimizer(learning_rate, *, momentum: float = 0.9,
                   nesterov: bool = False,
                   weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """SGD with momentum and coupled L2 weight decay (PyTorch ``SGD`` semantics).

  ``weight_decay * param`` is added to the gradient *before* the momentum
  trace, as in the LeGR reference (``torch.optim.SGD(weight_decay=...)``):
  ``v <- momentum * v + (g + wd * p)``; ``p <- p - lr * v`` (Nesterov:
  ``p <- p - lr * (g + wd * p + momentum * v)``). Decay applies to every
  parameter, BatchNorm scales and biases included, like the reference.

  Args:
    learning_rate: a float or an `optax.Schedule` of the step.
  """
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(learning_rate, momentum=momentum or None,
                         nesterov=nesterov))
  return optax.chain(*parts)
