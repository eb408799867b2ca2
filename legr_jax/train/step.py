"""Train state and the pure, jit-able train / eval steps.

Masks are ordinary (traced) arguments: a new mask of the same shapes does not
recompile, and masked channels are zero in every forward pass because the
network multiplies each conv's BatchNorm output by its group mask.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  """Everything that evolves during training.

  step: int32 scalar, optimizer steps taken. params, batch_stats: the network
  variables. opt_state: optax state (holds the schedule's step count).
  rng: uint32 [2] raw PRNG key (split per step for stochastic layers).
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def raw_key(rng) -> jax.Array:
  """An int seed, a typed key or a raw uint32 [2] key -> raw uint32 [2] key."""
  if isinstance(rng, int):
    return jax.random.PRNGKey(rng)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def init_train_state(net, rng: jax.Array,
                     optimizer: optax.GradientTransformation,
                     variables: dict | None = None) -> TrainState:
  """A fresh state: ``net.init(init_rng)`` (or the given ``variables``, e.g. a
  pretrained network to fine-tune), zero step and a fresh optimizer state."""
  rng = raw_key(rng)
  init_rng, rng = jax.random.split(rng)
  if variables is None:
    variables = net.init(init_rng)
  params = variables["params"]
  # one compiled init instead of an eager op (and its compile) per leaf
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=jax.jit(optimizer.init)(params), rng=rng)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross entropy [B] of float logits [B, K] and int
  labels [B], with optional label smoothing (computed in float32)."""
  chex.assert_rank(logits, 2)
  chex.assert_shape(labels, logits.shape[:1])
  logits = logits.astype(jnp.float32)
  targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _cast(tree: PyTree, dtype) -> PyTree:
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
      else a, tree)


def loss_and_grads(net, params, batch_stats, batch: dict, masks: dict | None,
                   *, label_smoothing: float = 0.0,
                   compute_dtype: str = "float32"):
  """Mean training loss (BatchNorm in training mode) and its gradient.

  Returns ``(loss, logits, new_batch_stats, grads)``: float32 scalar, [B, K]
  logits, the updated running statistics (dtypes of ``batch_stats``) and
  gradients shaped like ``params``. Arguments as in `train_step`.
  """
  images, labels = batch["image"], batch["label"]
  chex.assert_rank(images, 4)
  dtype = COMPUTE_DTYPES[compute_dtype]

  def loss_fn(params):
    variables = {"params": _cast(params, dtype), "batch_stats": batch_stats}
    logits, new_stats = net.apply(variables, images.astype(dtype), masks,
                                  train=True)
    loss = cross_entropy(logits, labels, label_smoothing).mean()
    return loss, (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), new_stats,
                           batch_stats)
  return loss, logits, new_stats, grads


def train_step(net, optimizer: optax.GradientTransformation,
               state: TrainState, batch: dict, masks: dict | None, *,
               label_smoothing: float = 0.0,
               compute_dtype: str = "float32") -> tuple[TrainState, dict]:
  """One SGD step on ``batch`` with BatchNorm in training mode.

  Args:
    net: a `legr_jax.models.PrunableNet`-like object (``apply(variables, x,
      masks, train=True) -> (logits, new_batch_stats)``).
    optimizer: from `make_optimizer`.
    state: the current `TrainState`.
    batch: {'image': float32 [B, H, W, C], 'label': int32 [B]}.
    masks: group masks (dict of 1-D float arrays) or None.
    label_smoothing: smoothing of the one-hot targets.
    compute_dtype: 'float32' or 'bfloat16': parameters and images are cast to
      it for the forward/backward pass (master weights, BatchNorm statistics
      and the loss stay float32).
  Returns:
    (new_state, {'loss': mean training loss, 'accuracy': top-1 accuracy}),
    both float32 scalars measured before the update.
  """
  labels = batch["label"]
  loss, logits, new_stats, grads = loss_and_grads(
      net, state.params, state.batch_stats, batch, masks,
      label_smoothing=label_smoothing, compute_dtype=compute_dtype)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  rng, _ = jax.random.split(state.rng)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=new_stats, opt_state=opt_state,
                            rng=rng)
  return new_state, {"loss": loss, "accuracy": accuracy.astype(jnp.float32)}


def eval_step(net, variables: dict, batch: dict, masks: dict | None, *,
              compute_dtype: str = "float32") -> dict:
  """Sums over one batch with BatchNorm in inference mode.

  ``batch`` may carry 'valid': bool [B] (padding); invalid rows count for
  nothing. Returns float32 {'loss_sum', 'correct', 'count'}.
  """
  images, labels = batch["image"], batch["label"]
  dtype = COMPUTE_DTYPES[compute_dtype]
  variables = {**variables, "params": _cast(variables["params"], dtype)}
  logits = net.apply(variables, images.astype(dtype), masks, train=False)
  valid = batch.get("valid")
  valid = (jnp.ones(labels.shape, jnp.float32) if valid is None
           else valid.astype(jnp.float32))
  loss = cross_entropy(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss_sum": jnp.sum(loss * valid),
          "correct": jnp.sum(correct * valid), "count": jnp.sum(valid)}
