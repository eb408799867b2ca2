"""legr_jax: resource-constrained filter pruning (LeGR and friends) in JAX.

Importing the package is light: it loads the model zoo, the cost model and the
ranking functions only (no TensorFlow, TFDS or orbax). Data, training and
search live in `legr_jax.data`, `legr_jax.train`, `legr_jax.search`.
"""

from legr_jax import cost, models, ranking
from legr_jax.ranking import (affine_scores, filter_norms, group_scores,
                              masks_for_budget)

__all__ = ["affine_scores", "cost", "filter_norms", "group_scores",
           "masks_for_budget", "models", "ranking"]
__version__ = "0.1.0"
