"""Pruning methods behind one interface, by name.

  from legr_jax import methods
  method = methods.get("fpgm", safeguard=0.1)
  pruned = method.prune(net, variables, methods.Budget("flops", 0.47))
  pruned.masks      # {group: [C_g] 0/1}; slice with legr_jax.surgery

Registered: ``legr`` (learned ranking; learn stage = the search), ``l1``,
``l2``, ``random``, ``uniform``, ``fpgm``, ``clr_rnf``, and the learned-gate
methods ``dagger`` and ``sbf`` (learn stage = `legr_jax.gates.learn`). Add your own with
`register` on a subclass of `GlobalRanking` (override ``scores``) or
`LayerwiseCounts` (override ``counts_fn`` and ``select``). Every method meets
a FLOPs or params `Budget` within one channel, never above it
(`legr_jax.methods.budget`).
"""

from legr_jax.methods import budget
from legr_jax.methods.base import (GlobalRanking, LayerwiseCounts, Method,
                                   Pruned, get, group_filters, names,
                                   parse_spec, register)
from legr_jax.methods.budget import Budget, InfeasibleBudgetError
# Registration happens on import of each method module.
from legr_jax.methods import (clr_rnf, dagger, legr, norms,  # noqa: F401
                              sbf, uniform)

__all__ = ["Budget", "GlobalRanking", "InfeasibleBudgetError",
           "LayerwiseCounts", "Method", "Pruned", "budget", "get",
           "group_filters", "names", "parse_spec", "register"]
