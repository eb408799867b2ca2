"""What a search needs to run as one program on several hosts.

After `jax.distributed.initialize()` every host (JAX process) runs the same
search with the same seed. The evolution state is identical everywhere, the
candidates' evaluations are split across hosts and their losses gathered, and
only the primary host (process 0) writes plain files; orbax checkpoints are
written by all hosts together, as orbax requires. The work directory must be
shared by all hosts (a network file system or a bucket), as for any
multi-host orbax checkpoint.

On one process every function here is a no-op or the identity.
"""

from __future__ import annotations

import json

import jax
import numpy as np


def is_primary() -> bool:
  """True on the process that writes the search's plain files."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def broadcast_json(obj):
  """The primary's JSON-serializable ``obj`` on every process."""
  if jax.process_count() == 1:
    return obj
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(
      np.array([raw.size], np.int64))[0])
  buf = np.zeros((size,), np.uint8)
  if is_primary():
    buf[:] = raw
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return json.loads(buf.tobytes().decode())


def owned(k: int) -> np.ndarray:
  """Indices of the K candidates this process evaluates (round robin)."""
  return np.arange(jax.process_index(), k, jax.process_count())


def gather_owned(values: np.ndarray, k: int) -> np.ndarray:
  """Combines each process's ``values`` for its `owned` (k) candidates into
  the full [k] float32 array, identical on every process."""
  values = np.asarray(values, np.float32)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = jax.process_count()
  local = np.full((-(-k // n),), np.nan, np.float32)
  local[:values.size] = values
  every = np.asarray(multihost_utils.process_allgather(local))  # [n, ceil]
  out = np.empty((k,), np.float32)
  for p in range(n):
    idx = np.arange(p, k, n)
    out[idx] = every[p, :idx.size]
  return out
