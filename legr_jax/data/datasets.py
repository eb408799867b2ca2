"""`get_dataset`: data sets by name with seeded train/val/test splits."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from legr_jax.data import local, tfds_data
from legr_jax.data.splits import TAG_TEST, ArraySplit, carve

KNOWN = ("cifar10", "cifar100", "imagenet2012", "caltech_birds2011", "digits",
         "npz:PATH", "cifar_dir:PATH")

# Per-channel statistics in 0..255 units.
_CIFAR10_MEAN = (125.31, 122.95, 113.87)   # (0.4914, 0.4822, 0.4465) * 255
_CIFAR10_STD = (62.99, 62.09, 66.70)       # (0.2470, 0.2435, 0.2616) * 255
_CIFAR100_MEAN = (129.30, 124.07, 112.43)  # (0.5071, 0.4865, 0.4409) * 255
_CIFAR100_STD = (68.17, 65.39, 70.42)      # (0.2673, 0.2564, 0.2762) * 255
_IMAGENET_MEAN = (123.675, 116.28, 103.53)  # (0.485, 0.456, 0.406) * 255
_IMAGENET_STD = (58.395, 57.12, 57.375)     # (0.229, 0.224, 0.225) * 255

# name -> (test split, image shape, augmentation, mean, std, resize)
_TFDS = {
    "cifar10": ("test", (32, 32, 3), "cifar", _CIFAR10_MEAN, _CIFAR10_STD,
                None),
    "cifar100": ("test", (32, 32, 3), "cifar", _CIFAR100_MEAN, _CIFAR100_STD,
                 None),
    "imagenet2012": ("validation", (224, 224, 3), "imagenet", _IMAGENET_MEAN,
                     _IMAGENET_STD, 256),
    "caltech_birds2011": ("test", (224, 224, 3), "imagenet", _IMAGENET_MEAN,
                          _IMAGENET_STD, 256),
}


@dataclasses.dataclass
class Dataset:
  """A data set with train / val / test splits.

  Attributes:
    name: the name given to `get_dataset`.
    train, val, test: splits (``len(split)``, ``split.take(indices) ->
      (uint8 [n, H, W, C], int32 [n])``). ``val`` is carved from the official
      training data with a seeded permutation.
    num_classes: number of labels.
    image_shape: (H, W, C) of the images as the model sees them.
    mean, std: per-channel normalization constants (0..255 units).
    augment: training augmentation: 'cifar', 'imagenet' or 'none'.
    test_is_val: True when the data has no test split and ``test`` is ``val``.
    note: human-readable provenance of the splits.
  """
  name: str
  train: Any
  val: Any
  test: Any
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str
  test_is_val: bool = False
  note: str = ""

  def summary(self) -> str:
    return (f"{self.name}: train {len(self.train)}, val {len(self.val)}, "
            f"test {len(self.test)}{' (= val)' if self.test_is_val else ''}, "
            f"{self.num_classes} classes, images {self.image_shape}")


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std (0..255 units) of uint8 [N, H, W, C]; the std is
  floored at 1 (one grey level) so constant channels do not divide by 0."""
  flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
  mean = flat.mean(0)
  std = np.maximum(flat.std(0), 1.0)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _default_augment(image_shape) -> str:
  h, w, c = image_shape
  return "cifar" if (h, w, c) == (32, 32, 3) else "none"


def _in_memory(name: str, x, y, x_test, y_test, *, num_classes: int | None,
               val_fraction: float, val_size: int | None, seed: int,
               augment: str | None, note: str,
               test_size: int | None = None) -> Dataset:
  """Carves val from (x, y); test = (x_test, y_test), else ``test_size``
  images carved first from (x, y), else val (with a warning). Refuses (a
  ValueError naming the data set and the setting) data too small for its
  splits: every split asked for must get at least one image."""
  y = local.as_labels(y, f"data set {name!r}: labels", num_classes)
  if y_test is not None:
    y_test = local.as_labels(y_test, f"data set {name!r}: test labels",
                             num_classes)
    if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
      raise ValueError(f"data set {name!r}: test images are "
                       f"{tuple(x_test.shape[1:])}, training images "
                       f"{tuple(x.shape[1:])}; they must have one shape")
  if test_size is not None:
    if x_test is not None:
      raise ValueError(f"data set {name!r} has its own test split; "
                       "test_size carves one only from data without it")
    if not 0 < test_size < len(x) - 1:
      raise ValueError(f"test_size={test_size} (--test_size) must be in [1, "
                       f"{len(x) - 2}] for data set {name!r} ({len(x)} "
                       "images; training and validation need some too)")
    rest, test = carve(len(x), size=test_size, seed=seed, tag=TAG_TEST)
    x, y, x_test, y_test = x[rest], y[rest], x[test], y[test]
    note += (f"; test = seeded {test_size} images carved first (seed "
             f"{seed}), val carved from the rest")
  full = ArraySplit(x, y)
  n = len(full)
  n_val = val_size if val_size is not None else int(round(val_fraction * n))
  if val_size is not None and not 0 <= val_size < n:
    raise ValueError(f"val_size={val_size} (--val_size) must be in [0, "
                     f"{n - 1}]: data set {name!r} has {n} images to carve "
                     "the validation split from")
  if val_size is None and not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} (--val_fraction) must be "
                     "in [0, 1)")
  if val_size is None and val_fraction > 0 and n_val == 0:
    raise ValueError(f"data set {name!r} is too small to carve a validation "
                     f"split: {n} images x val_fraction {val_fraction} rounds "
                     "to 0 images; give more data or --val_size")
  if n - n_val < 1:
    raise ValueError(f"data set {name!r} is too small: {n} images leave no "
                     f"training image after {n_val} validation images; give "
                     "more data or a smaller validation split")
  train_idx, val_idx = carve(n, fraction=val_fraction, size=val_size,
                             seed=seed)
  train, val = full.subset(train_idx), full.subset(val_idx)
  test_is_val = x_test is None
  if test_is_val:
    test = val
    note += ("; no test split: test is the validation split "
             "(do not report it as a test accuracy)")
    warnings.warn(f"data set {name!r} has no test split; its test split is "
                  "the validation split", stacklevel=3)
  else:
    test = ArraySplit(x_test, y_test)
  if num_classes is None:
    num_classes = int(max(full.y.max(), test.y.max(initial=0))) + 1
  mean, std = channel_stats(train.x)
  image_shape = tuple(int(d) for d in x.shape[1:])
  return Dataset(name=name, train=train, val=val, test=test,
                 num_classes=num_classes, image_shape=image_shape, mean=mean,
                 std=std, augment=augment or _default_augment(image_shape),
                 test_is_val=test_is_val, note=note)


def _tfds(name: str, *, data_dir, val_fraction, val_size, seed,
          download) -> Dataset:
  test_split, shape, aug, mean, std, resize = _TFDS[name]
  sources, info = tfds_data.open_sources(name, ["train", test_split],
                                         data_dir=data_dir, download=download)
  train_src = sources["train"]
  train_idx, val_idx = carve(len(train_src), fraction=val_fraction,
                             size=val_size, seed=seed)
  split = lambda src, idx: tfds_data.TfdsSplit(src, idx, shape, resize)
  return Dataset(
      name=name, train=split(train_src, train_idx),
      val=split(train_src, val_idx), test=split(sources[test_split], None),
      num_classes=int(info.features["label"].num_classes), image_shape=shape,
      mean=mean, std=std, augment=aug,
      note=f"TFDS {name}: val carved from 'train' (seed {seed}); test = "
           f"{test_split!r}")


def get_dataset(name: str, *, data_dir: str | None = None,
                val_fraction: float = 0.1, val_size: int | None = None,
                seed: int = 0, test_fraction: float = 0.2,
                test_size: int | None = None,
                download: bool = False) -> Dataset:
  """Returns the data set ``name`` with seeded train / val / test splits.

  Args:
    name: 'cifar10', 'cifar100', 'imagenet2012', 'caltech_birds2011' (TFDS,
      read with `tfds.data_source`), 'digits' (scikit-learn, offline),
      'npz:PATH' (arrays ``x`` [N,H,W(,C)] and ``y`` [N], optionally
      ``x_test``, ``y_test``) or 'cifar_dir:PATH' (official CIFAR python
      batches).
    data_dir: TFDS data directory (default: $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    val_fraction: share of the training data carved out as validation.
    val_size: number of validation examples (overrides ``val_fraction``).
    seed: seed of the split permutations.
    test_fraction: for 'digits' only, the share carved out first as test.
    test_size: for in-memory data without a test split ('npz:PATH' without
      x_test), this many images are carved out first (seeded by ``seed``) as
      the test split, then val from the rest: a three-way split. For
      'digits' it replaces ``test_fraction``. An error for data with their
      own test split.
    download: allow TFDS to download and prepare missing data.

  Raises:
    ValueError: unknown name; in-memory data that is unreadable, has labels
      that are not integers in [0, num_classes) or test images of another
      shape, or is too small for its splits (each message names the file or
      setting).
    FileNotFoundError: a local file or folder is missing.
    tfds_data.NotPreparedError: a TFDS data set is absent and
      ``download`` is False; the message says how to prepare it.
  """
  common = dict(val_fraction=val_fraction, val_size=val_size, seed=seed)
  if name in _TFDS:
    if test_size is not None:
      raise ValueError(f"data set {name!r} has its own test split; "
                       "test_size is for data without one")
    return _tfds(name, data_dir=data_dir, download=download, **common)
  if name == "digits":
    x, y = local.load_digits()
    if test_size is not None and not 0 < test_size < len(x) - 1:
      raise ValueError(f"test_size={test_size} (--test_size) must be in [1, "
                       f"{len(x) - 2}] for the digits ({len(x)} images)")
    rest, test = carve(len(x), fraction=test_fraction, size=test_size,
                       seed=seed, tag=TAG_TEST)
    return _in_memory(
        name, x[rest], y[rest], x[test], y[test], num_classes=10,
        augment="none",
        note=f"scikit-learn digits: test = seeded "
             f"{test_size if test_size is not None else f'{test_fraction:.0%}'} "
             f"(seed {seed}), val carved from the rest", **common)
  if name.startswith("npz:"):
    path = name[len("npz:"):]
    d = local.load_npz(path)
    return _in_memory(name, d["x"], d["y"], d.get("x_test"), d.get("y_test"),
                      num_classes=None, augment=None, test_size=test_size,
                      note=f"npz file {path}", **common)
  if name.startswith("cifar_dir:"):
    path = name[len("cifar_dir:"):]
    d = local.load_cifar_dir(path)
    return _in_memory(name, d["x"], d["y"], d["x_test"], d["y_test"],
                      num_classes=d["num_classes"], augment="cifar",
                      test_size=test_size,
                      note=f"CIFAR python batches in {path}", **common)
  raise ValueError(f"unknown data set {name!r}; known: {', '.join(KNOWN)}")
