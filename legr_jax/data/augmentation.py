"""Vectorized numpy image augmentation and normalization.

All functions take a uint8 batch [B, H, W, C] and a `np.random.Generator`
and return a batch of the same shape and dtype; randomness comes only from
the generator, so a seeded generator makes them deterministic.
"""

from __future__ import annotations

import numpy as np

AUGMENTATIONS = ("none", "cifar", "imagenet")


def _gather(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """out[b, i, j] = x[b, rows[b, i], cols[b, j]] for rows [B, H'], cols [B, W']."""
  b = np.arange(len(x))[:, None, None]
  return x[b, rows[:, :, None], cols[:, None, :]]


def crop_flip(x: np.ndarray, rng: np.random.Generator,
              pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: zero-pad by ``pad`` pixels, take a random crop of the
  original size, and flip horizontally with probability 1/2."""
  bsz, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oy = rng.integers(0, 2 * pad + 1, size=bsz)
  ox = rng.integers(0, 2 * pad + 1, size=bsz)
  flip = rng.random(bsz) < 0.5
  rows = oy[:, None] + np.arange(h)[None]
  cols = ox[:, None] + np.arange(w)[None]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return _gather(padded, rows, cols)


def resized_crop_flip(x: np.ndarray, rng: np.random.Generator,
                      scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style augmentation: a random box covering ``scale`` of the area
  with aspect ratio in ``ratio`` (log-uniform), resized back to the input size
  (nearest neighbour), then a horizontal flip with probability 1/2."""
  bsz, h, w, _ = x.shape
  area = rng.uniform(*scale, size=bsz) * h * w
  log_r = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=bsz)
  aspect = np.exp(log_r)
  ch = np.clip(np.round(np.sqrt(area / aspect)), 1, h).astype(np.int64)
  cw = np.clip(np.round(np.sqrt(area * aspect)), 1, w).astype(np.int64)
  y0 = (rng.random(bsz) * (h - ch + 1)).astype(np.int64)
  x0 = (rng.random(bsz) * (w - cw + 1)).astype(np.int64)
  flip = rng.random(bsz) < 0.5
  fy = (np.arange(h) + 0.5) / h
  fx = (np.arange(w) + 0.5) / w
  rows = y0[:, None] + np.floor(fy[None] * ch[:, None]).astype(np.int64)
  cols = x0[:, None] + np.floor(fx[None] * cw[:, None]).astype(np.int64)
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return _gather(x, rows, cols)


def augment(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  """Applies augmentation ``kind`` ('none', 'cifar' or 'imagenet')."""
  if kind == "none":
    return x
  if kind == "cifar":
    return crop_flip(x, rng)
  if kind == "imagenet":
    return resized_crop_flip(x, rng)
  raise ValueError(f"unknown augmentation {kind!r}; known: {AUGMENTATIONS}")


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
  """uint8 [..., C] -> float32 (x - mean) / std; mean, std in 0..255 units."""
  mean = np.asarray(mean, np.float32)
  inv = 1.0 / np.asarray(std, np.float32)
  return (x.astype(np.float32) - mean) * inv
