"""legr_jax: resource-constrained filter pruning (LeGR and friends) in JAX.

Importing the package is light: it loads the model zoo, the cost model and the
ranking functions only (no TensorFlow, TFDS or orbax).
"""

from legr_jax import cost, models
from legr_jax.ranking import affine_scores, filter_norms, group_scores, masks_for_budget  # noqa: E501  (also binds legr_jax.ranking)

__all__ = ["cost", "models"]
__version__ = "0.1.0"
