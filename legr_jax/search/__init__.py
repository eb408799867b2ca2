"""LeGR's search for per-layer affine ranking transforms.

* `evolution`: regularized evolution (sequential and batched) as pure
  transitions of an `EvolutionState` pytree.
* `fitness`: candidate evaluation (prune -> tau_hat SGD steps -> validation
  loss), 'masked' (vmap + shard_map) and 'sliced' (physical slicing, compiled
  blocks shared across candidates) backends.
* `blockwise`: block-by-block execution with shape-keyed compiled blocks.
* `state`: checkpoints, evaluation log, ranking files.
* `driver`: the resumable search loop (`search`).
"""

from legr_jax.search.driver import (SearchConfig, SearchConflictError,
                                    SearchResult, search)
from legr_jax.search.evolution import (EvolutionConfig, EvolutionState, best,
                                       init_state, insert, propose)
from legr_jax.search.fitness import (BACKENDS, Evaluator, FitnessConfig,
                                     prepare_data)
from legr_jax.search import slicing
from legr_jax.search.state import load_ranking, load_ranking_orbax

__all__ = [
    "BACKENDS", "Evaluator", "EvolutionConfig", "EvolutionState",
    "FitnessConfig", "SearchConfig", "SearchConflictError", "SearchResult",
    "best", "init_state", "insert", "load_ranking", "load_ranking_orbax",
    "prepare_data", "propose", "search", "slicing",
]
