"""Data sets and the host input pipeline.

>>> ds = legr_jax.data.get_dataset("digits", seed=0)
>>> for batch in legr_jax.data.batches(ds.train, 128, seed=0, epoch=0,
...                                   augment=ds.augment, mean=ds.mean,
...                                   std=ds.std):
...   batch["image"]  # float32 [128, 8, 8, 1] on device
"""

from legr_jax.data.augmentation import AUGMENTATIONS, augment, normalize
from legr_jax.data.datasets import KNOWN, Dataset, channel_stats, get_dataset
from legr_jax.data.pipeline import (augment_rng, batches, epoch_order,
                                    host_batch, num_batches)
from legr_jax.data.splits import ArraySplit, carve
from legr_jax.data.tfds_data import NotPreparedError, TfdsSplit

__all__ = [
    "AUGMENTATIONS", "ArraySplit", "Dataset", "KNOWN", "NotPreparedError",
    "TfdsSplit", "augment", "augment_rng", "batches", "carve", "channel_stats",
    "epoch_order", "get_dataset", "host_batch", "normalize", "num_batches",
]
