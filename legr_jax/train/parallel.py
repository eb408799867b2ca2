"""Data parallelism: a 1-D device mesh, shardings, and jitted steps.

The batch is split over the 'data' axis of the mesh; the train state and the
masks are replicated. Under `jax.jit` with these shardings XLA computes the
loss, the gradients and the BatchNorm batch statistics over the *global*
batch, so N devices give the same result as one (up to float summation order).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from legr_jax.train import step as step_lib

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all local devices)."""
  devices = list(devices if devices is not None else jax.local_devices())
  return Mesh(devices, (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the "
                     f"{n} devices of the mesh")


def make_train_step(net, optimizer, mesh: Mesh, *,
                    label_smoothing: float = 0.0,
                    compute_dtype: str = "float32", donate: bool = True):
  """Jitted ``(state, batch, masks) -> (state, metrics)`` sharded over
  ``mesh`` (see `step.train_step`), compiled with ``net.ops``'s options.
  With ``donate`` the input state's buffers
  are reused for the output; do not use the old state afterwards."""
  fn = functools.partial(step_lib.train_step, net, optimizer,
                         label_smoothing=label_smoothing,
                         compute_dtype=compute_dtype)
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,) if donate else (),
                 compiler_options=net.ops.jit_options())


def make_eval_step(net, mesh: Mesh, *, compute_dtype: str = "float32"):
  """Jitted ``(variables, batch, masks) -> sums`` (see `step.eval_step`)."""
  fn = functools.partial(step_lib.eval_step, net, compute_dtype=compute_dtype)
  rep, data = replicated(mesh), batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=rep,
                 compiler_options=net.ops.jit_options())


def replicate(tree, mesh: Mesh):
  """Places a pytree (state, masks) on every device of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))
