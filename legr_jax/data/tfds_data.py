"""TFDS data sets read through `tfds.data_source` (random access, no
TensorFlow needed). The data must be prepared in the ``array_record`` format."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

PREPARE_HINT = """\
TFDS data set {name!r} is not prepared in {data_dir} (array_record format).
Reading needs no network, but preparing it does. Either
  * on a machine with network run
      python -c "import tensorflow_datasets as tfds; \
tfds.data_source('{name}', data_dir='{data_dir}', download=True)"
    (or `tfds build {name} --file_format=array_record --data_dir={data_dir}`)
    and copy {data_dir}/{name} to this machine; or
  * pass download=True (CLI: --download) on a machine with network; or
  * use a local copy instead: --dataset=cifar_dir:PATH (the official CIFAR
    python batches) or --dataset=npz:PATH (arrays x, y); or
  * use --dataset=digits (bundled with scikit-learn, no network at all).
{extra}"""


class NotPreparedError(FileNotFoundError):
  """A TFDS data set is missing from ``data_dir`` and may not be downloaded."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR",
                        os.path.join(os.path.expanduser("~"),
                                     "tensorflow_datasets"))


def open_sources(name: str, splits: Sequence[str], *, data_dir: str | None,
                 download: bool) -> tuple[dict[str, Any], Any]:
  """Returns ({split: random-access source}, tfds builder info)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = data_dir or default_data_dir()
  try:
    sources = tfds.data_source(name, split=list(splits), data_dir=data_dir,
                               download=download)
    info = tfds.builder(name, data_dir=data_dir).info
  except Exception as e:  # tfds raises several types for a missing data set.
    if download:
      raise RuntimeError(f"could not download/prepare TFDS {name!r} into "
                         f"{data_dir}: {e}") from e
    existing = os.path.join(data_dir, name)
    extra = (f"A copy exists in {existing} but cannot be read ({e}); "
             "tfds.data_source needs the array_record format."
             if os.path.isdir(existing) else "")
    if name == "imagenet2012":
      extra += ("\nimagenet2012 cannot be downloaded automatically: put "
                "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                f"{data_dir}/downloads/manual first, then prepare it as "
                "above.")
    raise NotPreparedError(PREPARE_HINT.format(
        name=name, data_dir=data_dir, extra=extra)) from e
  return dict(zip(splits, sources)), info


def resize_center_crop(image: np.ndarray, resize: int, crop: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [crop, crop, C]: shorter side to ``resize``
  (bilinear), then the central ``crop`` x ``crop`` window."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  h, w = image.shape[:2]
  scale = resize / min(h, w)
  nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
  if squeeze:
    out = out[..., None]
  top, left = (nh - crop) // 2, (nw - crop) // 2
  return out[top:top + crop, left:left + crop]


class TfdsSplit:
  """A view of a TFDS random-access source restricted to ``indices``.

  ``take`` decodes the records and returns uint8 [n, *image_shape] and int32
  labels; images whose size differs from ``image_shape`` are resized (shorter
  side to ``resize``) and center-cropped.
  """

  def __init__(self, source, indices: np.ndarray | None,
               image_shape: tuple[int, int, int], resize: int | None = None):
    self.source = source
    self.indices = (np.arange(len(source)) if indices is None
                    else np.asarray(indices, np.int64))
    self.image_shape = tuple(image_shape)
    self.resize = resize

  def __len__(self) -> int:
    return len(self.indices)

  def _image(self, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    h, w, c = self.image_shape
    if image.shape[-1] != c:
      image = np.broadcast_to(image[..., :1], image.shape[:2] + (c,))
    if image.shape != self.image_shape:
      image = resize_center_crop(image, self.resize or max(h, w), h)
    return image

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = self.indices[np.asarray(indices, np.int64)]
    records = [self.source[int(i)] for i in rows]
    x = np.empty((len(rows),) + self.image_shape, np.uint8)
    for j, r in enumerate(records):
      x[j] = self._image(r["image"])
    y = np.array([r["label"] for r in records], np.int32)
    return x, y

  def __repr__(self):
    return f"TfdsSplit(n={len(self)}, image_shape={self.image_shape})"
