"""legr_jax: resource-constrained filter pruning (LeGR and friends) in JAX.

Importing the package is light: it loads the model zoo (`models`), the cost
model (`cost`) and the ranking functions (`ranking`) only -- no TensorFlow,
TFDS or orbax. The other submodules are attributes of the package too, but
are imported on first access (PEP 562):

  surgery     slice_network: masked network -> smaller dense network
  pareto      Pareto front + orbax storage of sliced networks, `pick`,
              `plot`
  export      a member as a jax.export (StableHLO) inference function
  data        data sets by name, seeded splits, augmentation, batches
  train       optax SGD, masked sharded train/eval steps, `fit`
  search      LeGR's regularized evolution over (alpha, kappa)
  ops         the backend-specific operations (`Ops`, `XLA`, `resolve`)
  cpu         XLA:CPU fast paths (C++ FFI kernels, BatchNorm, packing)
  provenance  versions / commit / hardware record of a run

so `legr_jax.surgery.slice_network(...)` works after a bare
`import legr_jax`. `from legr_jax import *` imports the light names only.
"""

import importlib as _importlib
import typing as _typing

from legr_jax import cost, models, ranking
from legr_jax.ranking import (affine_scores, chain_scores, filter_norms,
                              group_scores, masks_for_budget)

__version__ = "0.1.0"

__all__ = ["affine_scores", "chain_scores", "cost", "filter_norms",
           "group_scores",
           "masks_for_budget", "models", "ranking"]

# Imported on first attribute access (heavier, or optional dependencies).
_LAZY_SUBMODULES = ("cpu", "data", "export", "family", "latency", "methods",
                    "ops", "pareto", "provenance", "search", "surgery",
                    "train")

if _typing.TYPE_CHECKING:  # static analysers and IDEs see them eagerly
  from legr_jax import (cpu, data, export, family, latency,  # noqa: F401
                        methods, ops, pareto, provenance, search, surgery,
                        train)


def __getattr__(name: str):
  if name in _LAZY_SUBMODULES:
    # import_module also binds the submodule as a package attribute, so this
    # hook runs once per name.
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))
