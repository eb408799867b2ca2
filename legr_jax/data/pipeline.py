"""Host input pipeline: seeded order, augmentation, normalization, and
device transfer ahead of the consumer."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import jax
import numpy as np

from legr_jax.data import augmentation as augment_lib
from legr_jax.data.splits import TAG_AUGMENT, TAG_ORDER


def epoch_order(n: int, *, seed: int, epoch: int,
                shuffle: bool = True) -> np.ndarray:
  """The example order of one epoch: a pure function of (n, seed, epoch)."""
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([seed, TAG_ORDER, epoch]).permutation(n)


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def augment_rng(seed: int, epoch: int, batch_index: int) -> np.random.Generator:
  """The augmentation generator of one batch: pure in (seed, epoch, index)."""
  return np.random.default_rng([seed, TAG_AUGMENT, epoch, batch_index])


def host_batch(split, order: np.ndarray, index: int, batch_size: int, *,
               seed: int, epoch: int, augment: str, mean, std,
               pad_to: int | None = None) -> dict[str, np.ndarray]:
  """Batch ``index`` of an epoch on the host (numpy).

  Returns {'image': float32 [B, H, W, C], 'label': int32 [B]}; with ``pad_to``
  the batch is zero-padded to that size and carries 'valid': bool [pad_to].
  """
  idx = order[index * batch_size:(index + 1) * batch_size]
  x, y = split.take(idx)
  x = augment_lib.augment(x, augment, augment_rng(seed, epoch, index))
  out = {"image": augment_lib.normalize(x, mean, std),
         "label": np.asarray(y, np.int32)}
  if pad_to is not None:
    n = len(idx)
    if n > pad_to:
      raise ValueError(f"batch of {n} exceeds pad_to={pad_to}")
    valid = np.zeros(pad_to, bool)
    valid[:n] = True
    out = {k: np.concatenate([v, np.zeros((pad_to - n,) + v.shape[1:],
                                          v.dtype)]) for k, v in out.items()}
    out["valid"] = valid
  return out


def _to_device(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
  if sharding is None:
    return jax.device_put(batch)
  return jax.device_put(batch, sharding)


def batches(split, batch_size: int, *, seed: int, epoch: int = 0,
            shuffle: bool = True, augment: str = "none", mean, std,
            drop_remainder: bool = True, start_batch: int = 0,
            prefetch: int = 2, sharding=None,
            pad_remainder: bool = False) -> Iterator[dict[str, Any]]:
  """Iterates over one epoch of ``split`` in batches, on device.

  Args:
    split: has ``__len__`` and ``take(indices) -> (uint8 [n,H,W,C], int [n])``.
    batch_size: examples per batch (global, across devices).
    seed, epoch: the order is ``epoch_order(len(split), seed, epoch)`` and the
      augmentation of batch i uses ``augment_rng(seed, epoch, i)``, so
      ``start_batch=k`` yields exactly batches k, k+1, ... of the full epoch.
    shuffle: if False the order is 0..n-1.
    augment: 'none', 'cifar' (pad-4 crop + flip) or 'imagenet' (resized crop
      + flip).
    mean, std: per-channel normalization constants in 0..255 units.
    drop_remainder: drop the last partial batch.
    start_batch: first batch index to produce (for resuming mid-epoch).
    prefetch: batches prepared and transferred ahead by a background thread
      (0: synchronous).
    sharding: a `jax.sharding.Sharding` for every array (e.g. batch dimension
      split over a device mesh); default: the default device.
    pad_remainder: zero-pad a last partial batch to ``batch_size`` and add
      'valid': bool [batch_size] to every batch (for exact evaluation with
      fixed shapes).

  Yields:
    {'image': float32 [B, H, W, C] normalized, 'label': int32 [B]} as jax
    arrays (plus 'valid' with ``pad_remainder``).
  """
  n = len(split)
  order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
  total = num_batches(n, batch_size, drop_remainder)
  pad_to = batch_size if pad_remainder else None

  def make(i):
    return _to_device(
        host_batch(split, order, i, batch_size, seed=seed, epoch=epoch,
                   augment=augment, mean=mean, std=std, pad_to=pad_to),
        sharding)

  if prefetch <= 0:
    for i in range(start_batch, total):
      yield make(i)
    return

  q: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def producer():
    try:
      for i in range(start_batch, total):
        if not put(make(i)):
          return
      put(done)
    except BaseException as e:  # pylint: disable=broad-except
      put(e)

  thread = threading.Thread(target=producer, daemon=True,
                            name="legr_jax-batches")
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=5.0)
