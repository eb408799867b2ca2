"""`Ops`: how convolutions, BatchNorm and the search's SGD update are computed.

Models (`legr_jax.models`), training (`legr_jax.train`) and the search
(`legr_jax.search`) take one injected, frozen `Ops`. Its default, `XLA`, is
plain ``lax.conv_general_dilated``, ``flax.linen.BatchNorm``, jax.numpy's
momentum-SGD update and XLA's default compile options: what every backend
(CPU, GPU, TPU) runs. `legr_jax.cpu.ops` builds the CPU fast paths (output
packing, C++ kernels, CPU compile options). Only how things are computed
changes: variables, results (to float rounding) and FLOPs are the same.

The one switch is `CPU_KERNELS` (``'auto' | 'on' | 'off'``), a config field
(``cpu_kernels``) of every run, recorded in its config.json as an
operational setting; the environment variable ``LEGR_CPU_KERNELS`` overrides
it. `resolve` turns it into an `Ops`:

* ``'off'``, or any device not a CPU: `XLA`.
* ``'auto'`` (default): `legr_jax.cpu.ops`, the C++ kernels where they
  build (else one warning and XLA's own ops for those parts).
* ``'on'``: like 'auto' on CPUs, but a kernel build failure is an error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax

CPU_KERNELS = ("auto", "on", "off")
ENV = "LEGR_CPU_KERNELS"


def sgd_momentum_update(params, grads, trace, *, lr: float, momentum: float,
                        weight_decay: float):
  """SGD with momentum and coupled weight decay (the maths of
  `legr_jax.train.optim.make_optimizer` without Nesterov, in optax's order):
  ``u = g + wd * p; v = u + momentum * v; p = p + (-lr) * v``.

  params, grads, trace: pytrees of one structure and matching shapes
  (``trace``: the momentum buffer). Returns ``(params, trace)``.
  """
  def one(p, g, v):
    if not p.shape == g.shape == v.shape:
      raise ValueError(f"sgd update: shapes differ: param {p.shape}, grad "
                       f"{g.shape}, trace {v.shape}")
    v = (g + weight_decay * p) + momentum * v
    return p + (-lr) * v, v

  leaves, treedef = jax.tree.flatten(params)
  out = [one(p, g, v) for p, g, v in zip(leaves, treedef.flatten_up_to(grads),
                                          treedef.flatten_up_to(trace))]
  return (treedef.unflatten([p for p, _ in out]),
          treedef.unflatten([v for _, v in out]))


@dataclasses.dataclass(frozen=True)
class Ops:
  """The compute functions of a run (hashable; compare by identity of the
  functions).

  Attributes:
    name: a label for logs ('xla', 'cpu', ...).
    conv: eval-mode drop-in for ``lax.conv_general_dilated`` (the
      ``conv_general_dilated`` field of ``flax.linen.Conv``); None: lax's.
    train_conv: the same for training (must be differentiable); None: lax's.
    batch_norm: a Flax module class with ``flax.linen.BatchNorm``'s
      fields (use_running_average, momentum, epsilon, dtype) and variables
      (params scale, bias; batch_stats mean, var).
    sgd_update: ``(params, grads, trace, *, lr, momentum, weight_decay) ->
      (params, trace)``, as `sgd_momentum_update`.
    compiler_options: XLA options of legr_jax's own jits, as sorted
      ``(name, value)`` pairs (see `jit_options`).
  """
  name: str = "xla"
  conv: Callable | None = dataclasses.field(default=None, repr=False)
  train_conv: Callable | None = dataclasses.field(default=None, repr=False)
  batch_norm: Callable[..., nn.Module] = dataclasses.field(default=nn.BatchNorm, repr=False)
  sgd_update: Callable = dataclasses.field(default=sgd_momentum_update, repr=False)
  compiler_options: tuple[tuple[str, Any], ...] = dataclasses.field(
      default=(), repr=False)

  def jit_options(self) -> dict | None:
    """``compiler_options`` as the dict ``jax.jit`` takes (None: none)."""
    return dict(self.compiler_options) or None

  def conv_fn(self, train: bool) -> Callable | None:
    return self.train_conv if train else self.conv


XLA = Ops()


def check_setting(setting: str) -> str:
  """``setting`` if it is one of `CPU_KERNELS`, else ValueError (one line
  naming the value and the choices)."""
  if setting not in CPU_KERNELS:
    raise ValueError(f"cpu_kernels must be one of {', '.join(CPU_KERNELS)}, "
                     f"got {setting!r}")
  return setting


def effective_setting(setting: str = "auto") -> str:
  """``setting`` unless ``LEGR_CPU_KERNELS`` overrides it (both checked)."""
  env = os.environ.get(ENV)
  if env:
    try:
      return check_setting(env.strip().lower())
    except ValueError:
      raise ValueError(f"{ENV}={env!r}: must be one of "
                       f"{', '.join(CPU_KERNELS)}") from None
  return check_setting(setting)


def resolve(setting: str = "auto", devices=None) -> Ops:
  """The `Ops` for ``setting`` (see the module doc) on ``devices``
  (default ``jax.devices()``)."""
  setting = effective_setting(setting)
  devices = list(jax.devices() if devices is None else devices)
  if setting == "off" or not devices or any(d.platform != "cpu"
                                            for d in devices):
    return XLA
  from legr_jax import cpu  # pylint: disable=g-import-not-at-top
  return cpu.ops(use_kernels="required" if setting == "on" else "auto")


__all__ = ["CPU_KERNELS", "ENV", "Ops", "XLA", "check_setting",
           "effective_setting", "resolve", "sgd_momentum_update"]
