"""Measured inference latency of a network on the device at hand.

`measure` times the jitted eval-mode forward pass at a fixed batch: compile
and ``warmup`` calls excluded, then the median (and 10th / 90th percentile)
of ``repeats`` timed calls, each ending with ``block_until_ready``. Inputs
are zeros of the network's input shape (the time of a convnet does not
depend on the values). ``timer`` is injectable for tests.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def measure(net, variables, *, batch: int = 128, repeats: int = 20,
            warmup: int = 3, device=None,
            timer: Callable[[], float] = time.perf_counter) -> dict:
  """Latency of ``net.apply(variables, x)`` for ``x`` of ``[batch, *input]``.

  Returns ``{"batch", "median_ms", "p10_ms", "p90_ms", "repeats",
  "device_kind"}`` (milliseconds per call of the whole batch).
  """
  if batch < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f"batch and repeats must be >= 1 and warmup >= 0, got "
                     f"{batch}, {repeats}, {warmup}")
  device = device or jax.devices()[0]
  x = jax.device_put(jnp.zeros((batch,) + tuple(net.input_shape),
                               jnp.float32), device)
  v = jax.device_put(variables, device)
  fwd = jax.jit(lambda v, x: net.apply(v, x))
  for _ in range(warmup + 1):           # +1: the compile
    fwd(v, x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = timer()
    fwd(v, x).block_until_ready()
    times.append((timer() - t0) * 1e3)
  t = np.asarray(times)
  return {"batch": int(batch), "median_ms": float(np.median(t)),
          "p10_ms": float(np.percentile(t, 10)),
          "p90_ms": float(np.percentile(t, 90)), "repeats": int(repeats),
          "device_kind": device.device_kind}


@dataclasses.dataclass(frozen=True)
class LatencyBudget:
  """A latency budget: ``fraction`` (0 < f <= 1) of the unpruned network's
  measured latency on the device at hand (`family.resolve_latency_budget`
  turns it into a FLOPs budget by measurement, once)."""
  fraction: float
  metric = "latency"

  def __post_init__(self):
    f = self.fraction
    if (isinstance(f, bool) or not isinstance(f, (int, float, np.floating))
        or not math.isfinite(f) or not 0 < f <= 1):
      raise ValueError(f"a latency budget must be a fraction in (0, 1] of "
                       f"the unpruned network's latency, got {f!r}")
    object.__setattr__(self, "fraction", float(f))

  @property
  def name(self) -> str:
    return f"latency_{self.fraction:g}"

  def __str__(self):
    return f"latency:{self.fraction:g}"


def parse_budget(text):
  """A `methods.Budget` ('0.47', 'flops:0.47', 'params:0.5') or a
  `LatencyBudget` ('latency:0.5')."""
  from legr_jax.methods.budget import Budget  # pylint: disable=import-outside-toplevel
  if isinstance(text, (Budget, LatencyBudget)):
    return text
  s = str(text).strip()
  if s.startswith("latency:"):
    try:
      return LatencyBudget(float(s.split(":", 1)[1]))
    except ValueError as e:
      raise ValueError(f"budget {s!r}: {e}") from None
  return Budget.parse(s)
