"""Exact evaluation of a network on a split."""

from __future__ import annotations

import functools

import jax

from legr_jax import data as data_lib
from legr_jax.train import parallel


@functools.lru_cache(maxsize=64)
def _eval_fn(net, mesh, compute_dtype):
  return parallel.make_eval_step(net, mesh, compute_dtype=compute_dtype)


def evaluate(net, variables: dict, split, masks: dict | None = None,
             batch_size: int = 500, *, mean, std, mesh=None,
             compute_dtype: str = "float32", prefetch: int = 2,
             max_examples: int | None = None) -> tuple[float, float]:
  """Mean cross-entropy and top-1 accuracy of ``net`` on ``split``.

  Every example counts once (the last batch is padded, padding is ignored);
  BatchNorm uses its running statistics. Repeated calls with new ``masks`` or
  ``variables`` of the same shapes reuse one compiled function.

  Args:
    net, variables: the network and its ``{'params', 'batch_stats'}``.
    split: a data split (``len``, ``take``).
    masks: group masks or None.
    batch_size: evaluation batch (rounded up to a multiple of the devices).
    mean, std: the data set's normalization constants (``Dataset.mean/std``).
    mesh: device mesh (default: all local devices).
    max_examples: evaluate only the first ``max_examples`` of the split (in
      the split's order), e.g. for a quick estimate during a search.
  Returns:
    (mean loss, accuracy) as Python floats; (nan, nan) for an empty split.
  """
  mesh = mesh or parallel.make_mesh()
  n_dev = mesh.devices.size
  batch_size = -(-batch_size // n_dev) * n_dev
  if max_examples is not None and max_examples < len(split):
    split = _Prefix(split, max_examples)
  if len(split) == 0:
    return float("nan"), float("nan")
  fn = _eval_fn(net, mesh, compute_dtype)
  variables = parallel.replicate(variables, mesh)
  masks = parallel.replicate(masks, mesh) if masks is not None else None
  totals = None
  for batch in data_lib.batches(split, batch_size, seed=0, shuffle=False,
                                mean=mean, std=std, drop_remainder=False,
                                pad_remainder=True, prefetch=prefetch,
                                sharding=parallel.batch_sharding(mesh)):
    sums = fn(variables, batch, masks)
    totals = sums if totals is None else jax.tree.map(
        lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return float(totals["loss_sum"]) / count, float(totals["correct"]) / count


class _Prefix:
  """The first ``n`` examples of a split."""

  def __init__(self, split, n: int):
    self.split, self.n = split, n

  def __len__(self):
    return self.n

  def take(self, indices):
    return self.split.take(indices)
