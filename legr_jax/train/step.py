"""Train state and the pure, jit-able train / eval steps.

Masks are ordinary (traced) arguments: a new mask of the same shapes does not
recompile, and masked channels are zero in every forward pass because the
network multiplies each conv's BatchNorm output by its group mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

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


@dataclasses.dataclass(frozen=True)
class Extra:
  """A hook of `train_step`: extra trainable parameters beside the network's
  and an extra loss term (e.g. soft gates and a FLOPs regularizer,
  `legr_jax.gates`). Static (hashable by identity of its functions).

  Attributes:
    optimizer: optax transformation of the extra parameters.
    masks_fn: ``(extra_params, params, step) -> masks`` (group masks, real
      values allowed) used instead of ``train_step``'s ``masks``; None: the
      given ``masks``.
    loss_fn: ``(extra_params, params, masks, step) -> (scalar, {name:
      scalar})``: added to the mean cross entropy; its dict is reported in
      the metrics. None: no extra term.
    train_params: also update the network parameters (with ``train_step``'s
      ``optimizer``); False: they (and their optimizer state) stay as they
      are and only the extra parameters learn.
    bn_train: BatchNorm in training mode (batch statistics, running
      statistics updated); False: inference mode, statistics unchanged.
  """
  optimizer: optax.GradientTransformation
  masks_fn: Callable | None = None
  loss_fn: Callable | None = None
  train_params: bool = True
  bn_train: bool = True


@flax.struct.dataclass
class ExtraState:
  """The extra parameters of an `Extra` hook and their optimizer state."""
  params: PyTree
  opt_state: PyTree


def init_extra_state(extra: Extra, params: PyTree) -> ExtraState:
  """Fresh `ExtraState` of ``params`` for ``extra.optimizer``."""
  return ExtraState(params=params, opt_state=extra.optimizer.init(params))


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


def _extra_loss_and_grads(net, params, batch_stats, batch, masks, step, *,
                          extra: Extra, extra_params, label_smoothing,
                          compute_dtype):
  """`loss_and_grads` with an `Extra` hook: ``(ce, logits, new_stats,
  grads, extra_grads, aux)``; ``grads`` is None unless
  ``extra.train_params``."""
  images, labels = batch["image"], batch["label"]
  chex.assert_rank(images, 4)
  dtype = COMPUTE_DTYPES[compute_dtype]

  def loss_fn(params, extra_params):
    m = (masks if extra.masks_fn is None
         else extra.masks_fn(extra_params, params, step))
    variables = {"params": _cast(params, dtype), "batch_stats": batch_stats}
    if extra.bn_train:
      logits, new_stats = net.apply(variables, images.astype(dtype), m,
                                    train=True)
    else:
      logits = net.apply(variables, images.astype(dtype), m, train=False)
      new_stats = batch_stats
    ce = cross_entropy(logits, labels, label_smoothing).mean()
    aux = {}
    total = ce
    if extra.loss_fn is not None:
      term, aux = extra.loss_fn(extra_params, params, m, step)
      total = ce + term
      aux = {"extra_loss": term, **aux}
    return total, (ce, logits, new_stats, aux)

  argnums = (0, 1) if extra.train_params else 1
  (_, (ce, logits, new_stats, aux)), g = jax.value_and_grad(
      loss_fn, argnums=argnums, has_aux=True)(params, extra_params)
  grads, extra_grads = g if extra.train_params else (None, g)
  new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), new_stats,
                           batch_stats)
  return ce, logits, new_stats, grads, extra_grads, aux


def train_step(net, optimizer: optax.GradientTransformation,
               state: TrainState, batch: dict, masks: dict | None, *,
               label_smoothing: float = 0.0,
               compute_dtype: str = "float32", extra: Extra | None = None,
               extra_state: ExtraState | None = None):
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
    extra, extra_state: an optional `Extra` hook and its `ExtraState`
      (both or neither): the extra parameters are trained beside (or, with
      ``extra.train_params=False``, instead of) the network's, on the cross
      entropy plus ``extra.loss_fn``.
  Returns:
    (new_state, {'loss': mean training loss, 'accuracy': top-1 accuracy}),
    both float32 scalars measured before the update. With ``extra``:
    ``(new_state, new_extra_state, metrics)``; 'loss' stays the cross
    entropy, 'extra_loss' and ``loss_fn``'s entries are added.
  """
  if (extra is None) != (extra_state is None):
    raise ValueError("train_step: give both extra and extra_state, or neither")
  if extra is not None:
    return _extra_train_step(net, optimizer, state, batch, masks, extra,
                             extra_state, label_smoothing=label_smoothing,
                             compute_dtype=compute_dtype)
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


def _extra_train_step(net, optimizer, state, batch, masks, extra,
                      extra_state, *, label_smoothing, compute_dtype):
  ce, logits, new_stats, grads, extra_grads, aux = _extra_loss_and_grads(
      net, state.params, state.batch_stats, batch, masks, state.step,
      extra=extra, extra_params=extra_state.params,
      label_smoothing=label_smoothing, compute_dtype=compute_dtype)
  params, opt_state = state.params, state.opt_state
  if extra.train_params:
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  e_updates, e_opt_state = extra.optimizer.update(
      extra_grads, extra_state.opt_state, extra_state.params)
  e_params = optax.apply_updates(extra_state.params, e_updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  rng, _ = jax.random.split(state.rng)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=new_stats, opt_state=opt_state,
                            rng=rng)
  metrics = {"loss": ce, "accuracy": accuracy.astype(jnp.float32),
             **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}}
  return (new_state, ExtraState(params=e_params, opt_state=e_opt_state),
          metrics)


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
