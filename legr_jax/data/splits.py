"""Split objects and seeded split carving.

A *split* is anything with ``__len__`` and ``take(indices) -> (x, y)`` where
``x`` is uint8 [n, H, W, C] and ``y`` is int32 [n]. Small data sets live in
memory (`ArraySplit`); TFDS data sets are read on demand (`legr_jax.data.tfds`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

# Distinct tags keep the seeded random streams of this package independent.
TAG_TEST = 0x7E57
TAG_VAL = 0x0A1
TAG_ORDER = 0x0D3
TAG_AUGMENT = 0xA06


class Split(Protocol):

  def __len__(self) -> int:
    ...

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ...


class ArraySplit:
  """An in-memory split: uint8 images [N, H, W, C] and int32 labels [N]."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype != np.uint8 or x.ndim != 4:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {x.dtype} "
                       f"{x.shape}")
    if y.ndim != 1 or len(y) != len(x):
      raise ValueError(f"labels must be [N] with N={len(x)}, got {y.shape}")
    self.x = x
    self.y = y.astype(np.int32)

  def __len__(self) -> int:
    return len(self.x)

  def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    return self.x[indices], self.y[indices]

  def subset(self, indices: np.ndarray) -> "ArraySplit":
    return ArraySplit(*self.take(indices))

  def __repr__(self):
    return f"ArraySplit(n={len(self)}, image_shape={self.x.shape[1:]})"


def carve(n: int, *, fraction: float = 0.0, size: int | None = None,
          seed: int = 0, tag: int = TAG_VAL) -> tuple[np.ndarray, np.ndarray]:
  """Seeded random split of ``range(n)`` into (rest, carved) sorted indices.

  ``size`` (a count) takes precedence over ``fraction``. The carved part has
  ``size`` or ``round(fraction * n)`` elements; the permutation depends only
  on (n, seed, tag).
  """
  if size is None:
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    size = int(round(fraction * n))
  if not 0 <= size < n:
    raise ValueError(f"cannot carve {size} of {n} examples")
  perm = np.random.default_rng([seed, tag]).permutation(n)
  return np.sort(perm[size:]), np.sort(perm[:size])
