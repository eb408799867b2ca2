"""legr_jax: resource-constrained filter pruning (LeGR and friends) in JAX.

Importing the package is light: it loads the model zoo, the cost model and the
ranking functions only (no TensorFlow, TFDS or orbax).
"""

from legr_jax import cost, models

__all__ = ["cost", "models"]
__version__ = "0.1.0"
