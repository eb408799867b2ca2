"""Fake TFDS data sets on disk, offline: TFDS's own CIFAR builders with
random images instead of the download.

`write(data_dir, "cifar10", ...)` prepares ``data_dir/cifar10/3.0.2`` in the
array_record format exactly as ``tfds build`` would (features, split files
and dataset_info.json of the registered builder), so `legr_jax.data` reads
it through ``tfds.data_source`` unchanged, in this process or in any
subprocess given ``--data_dir`` / ``TFDS_DATA_DIR``. Needs neither network
nor TensorFlow (images are handed to TFDS as PIL images, which it encodes
as PNG itself).
"""

from __future__ import annotations

import numpy as np


def write(data_dir: str, name: str, num_train: int = 64,
          num_test: int = 32, seed: int = 0) -> str:
  """Prepares fake TFDS ``name`` ('cifar10' or 'cifar100': 32x32x3 uint8
  images, labels cycling over every class) in ``data_dir``; returns the
  prepared folder."""
  import PIL.Image  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=import-outside-toplevel

  base = {"cifar10": cifar.Cifar10, "cifar100": cifar.Cifar100}[name]
  classes = 10 if name == "cifar10" else 100

  def examples(n: int, split_seed: int):
    rng = np.random.default_rng([seed, split_seed])
    for i in range(n):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      ex = {"id": f"{split_seed}_{i}", "image": PIL.Image.fromarray(image),
            "label": i % classes}
      if name == "cifar100":
        ex["coarse_label"] = i % 20
      yield ex["id"], ex

  class Fake(base, skip_registration=True):  # pylint: disable=abstract-method
    """``name``'s builder generating random examples."""

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": examples(num_train, 0), "test": examples(num_test, 1)}

  Fake.name = name
  builder = Fake(data_dir=data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)
