"""Fitness of LeGR candidates: prune, optionally fine-tune tau_hat steps, and
measure the mean validation loss.

A candidate is a set of per-layer affine pairs (alpha [L], kappa [L]). Its
fitness: the pretrained network pruned to the FLOPs target with
`ranking.masks_for_budget` (scores ``alpha_l * ||w||^2 + kappa_l``, summed over
coupled layers), then ``tau_hat`` SGD steps (lr 0.01, momentum 0.9, coupled
weight decay 5e-4, BatchNorm in training mode, so its running statistics are
updated) on fixed training batches, then the mean cross-entropy over the
validation split with BatchNorm in eval mode. Lower is better.

Every candidate sees the same ``tau_hat`` training batches (the first batches
of the seeded epoch order, with the data set's augmentation), so candidates
are compared on equal terms and a result is a pure function of the candidate.

Two interchangeable backends compute the same losses (to float tolerance):

* ``'masked'``: full-size networks with 0/1 channel masks, K candidates
  batched with `jax.vmap` (each with its own params and optimizer state when
  tau_hat > 0) inside `jax.shard_map` over a 1-D device mesh (axis
  'candidates'); K is padded to a multiple of the device count. Best on
  GPU/TPU, where the full-size compute is cheap and batching fills the chip.
* ``'sliced'``: each candidate physically sliced (`surgery.slice_network`).
  The validation pass: widths rounded up to a multiple of ``bucket`` (the
  extra channels are masked to zero) and run block by block with compiled
  blocks shared across candidates (`BlockwiseExecutor`), so no
  per-candidate compile. tau_hat > 0: the SGD steps at exact widths, one
  compiled step per candidate (compile amortised over tau_hat steps), then
  the trained weights go back into a full-size copy
  (`surgery.embed_arrays`) for that bucketed validation pass. Candidates
  run concurrently on a thread pool, one device each (round robin). Best on
  CPU.

``'auto'`` picks 'sliced' on CPU (the faster there: benchmarks/RESULTS.md)
and 'masked' on accelerators.

Both backends memoize losses by a digest of the candidate's masks (the loss
is a pure function of the masks): in a search, most children prune exactly
like an earlier candidate and cost nothing. Everything is computed and
compiled with the network's `legr_jax.ops.Ops` (on CPU: `legr_jax.cpu`'s
fast paths and compile options).

Beyond one host: after `jax.distributed.initialize()`, ``jax.devices()``
spans every host; the 'masked' backend's mesh is built over all of them, every
host runs the same search (same seed, identical evolution state) and feeds the
same candidates, and the loss array comes back replicated. The 'sliced'
backend splits each round's candidates round robin over the processes, each
evaluating its share on its own devices, and gathers the losses
(`multihost`). Both are tested with two local CPU processes
(tests/test_search.py::test_two_processes_give_the_one_process_result).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from legr_jax import cost as cost_lib
from legr_jax import data as data_lib
from legr_jax import ranking, surgery
from legr_jax.search import multihost, slicing
from legr_jax.search.blockwise import BlockwiseExecutor
from legr_jax.train import optim
from legr_jax.train import step as step_lib

BACKENDS = ("auto", "masked", "sliced")
CANDIDATE_AXIS = "candidates"


@dataclasses.dataclass(frozen=True)
class FitnessConfig:
  """What a candidate's loss means (saved with a search; hashable)."""
  flops: float = 0.47
  safeguard: float = 0.1
  tau_hat: int = 0
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 128        # training batch of the tau_hat steps
  eval_batch_size: int = 128   # validation batch (the loss does not depend on it)
  val_examples: int | None = None  # first n of the validation split (None: all)
  data_seed: int = 0           # order and augmentation of the training batches
  aggregate: str = "sum"       # coupled channels' score (ranking.group_scores)
  chains: bool = False         # + the reference's cross-stage chains
                               # (ranking.chain_scores; pad='append' nets)


@dataclasses.dataclass
class FitnessData:
  """Device-ready data. val_*: [nb, B, ...] padded batches (``val_valid`` marks
  real rows); train_*: [tau_hat, B, ...] uint8 augmented images and labels."""
  val_images: np.ndarray
  val_labels: np.ndarray
  val_valid: np.ndarray
  train_images: np.ndarray
  train_labels: np.ndarray
  mean: np.ndarray
  inv_std: np.ndarray


def prepare_data(dataset, config: FitnessConfig) -> FitnessData:
  """Validation batches (normalized float32) and the tau_hat training batches
  (augmented uint8) of ``dataset`` (a `legr_jax.data.Dataset`)."""
  val = dataset.val
  n = len(val) if config.val_examples is None else min(config.val_examples,
                                                        len(val))
  if n == 0:
    raise ValueError("the validation split is empty")
  bsz = config.eval_batch_size
  nb = -(-n // bsz)
  order = np.arange(n)
  vals = [data_lib.host_batch(val, order, i, bsz, seed=0, epoch=0,
                              augment="none", mean=dataset.mean,
                              std=dataset.std, pad_to=bsz) for i in range(nb)]
  train_x, train_y = [], []
  if config.tau_hat:
    tb = config.batch_size
    per_epoch = len(dataset.train) // tb
    if per_epoch == 0:
      raise ValueError(f"the training split ({len(dataset.train)}) is smaller "
                       f"than one batch ({tb})")
    for t in range(config.tau_hat):
      epoch, i = divmod(t, per_epoch)
      idx = data_lib.epoch_order(len(dataset.train), seed=config.data_seed,
                                 epoch=epoch)[i * tb:(i + 1) * tb]
      x, y = dataset.train.take(idx)
      x = data_lib.augment(x, dataset.augment,
                           data_lib.augment_rng(config.data_seed, epoch, i))
      train_x.append(x)
      train_y.append(np.asarray(y, np.int32))
  shape = tuple(dataset.image_shape)
  return FitnessData(
      val_images=np.stack([b["image"] for b in vals]),
      val_labels=np.stack([b["label"] for b in vals]),
      val_valid=np.stack([b["valid"] for b in vals]).astype(np.float32),
      train_images=(np.stack(train_x) if train_x else
                    np.zeros((0, 1) + shape, np.uint8)),
      train_labels=(np.stack(train_y) if train_y else
                    np.zeros((0, 1), np.int32)),
      mean=np.asarray(dataset.mean, np.float32),
      inv_std=(1.0 / np.asarray(dataset.std, np.float32)).astype(np.float32))


# --- pure pieces ------------------------------------------------------------------


def candidate_masks(spec, norms, alpha, kappa, config: FitnessConfig):
  """Masks of one candidate: ``(masks, feasible, flops fraction)``.

  alpha, kappa: [L] in ``spec.layer_names`` order. Jit/vmap-able.
  """
  layers = spec.layer_names
  chex.assert_shape([alpha, kappa], (len(layers),))
  scores = ranking.group_scores(spec, ranking.affine_scores(
      norms, dict(zip(layers, alpha)), dict(zip(layers, kappa))),
                                reduce=config.aggregate)
  if config.chains:
    scores = ranking.chain_scores(spec, scores, reduce=config.aggregate)
  masks, feasible = ranking.masks_for_budget(
      spec, scores, flops=config.flops, safeguard=config.safeguard)
  frac = cost_lib.flops(spec, masks) / cost_lib.unpruned(spec)
  return masks, feasible, frac


def make_optimizer(config: FitnessConfig) -> optax.GradientTransformation:
  return optim.make_optimizer(config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)


def _normalize(x, mean, inv_std):
  return (x.astype(jnp.float32) - mean) * inv_std


def finetune(net, variables, masks, train_images, train_labels, mean,
             inv_std, config: FitnessConfig):
  """``tau_hat`` SGD steps (BatchNorm in training mode) -> variables."""
  if not config.tau_hat:
    return variables
  opt = make_optimizer(config)
  state = step_lib.init_train_state(net, 0, opt, variables)

  def body(state, batch):
    x, y = batch
    state, _ = step_lib.train_step(
        net, opt, state, {"image": _normalize(x, mean, inv_std), "label": y},
        masks)
    return state, None

  state, _ = jax.lax.scan(body, state, (train_images, train_labels))
  return state.variables


def validation_loss(net, variables, masks, val_images, val_labels, val_valid):
  """Mean cross-entropy over the valid rows of all validation batches."""

  def body(carry, batch):
    x, y, valid = batch
    sums = step_lib.eval_step(net, variables,
                              {"image": x, "label": y, "valid": valid}, masks)
    return carry + sums["loss_sum"], None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                          (val_images, val_labels, val_valid))
  return total / jnp.sum(val_valid)


def masked_loss(net, config: FitnessConfig, variables, data: dict, masks):
  """Fitness of one candidate given as full-size 0/1 ``masks`` (pure)."""
  trained = finetune(net, variables, masks, data["train_images"],
                     data["train_labels"], data["mean"], data["inv_std"],
                     config)
  return validation_loss(net, trained, masks, data["val_images"],
                         data["val_labels"], data["val_valid"])


# --- evaluator ----------------------------------------------------------------------


def mask_digest(spec, masks: dict) -> str:
  """Short content hash of one candidate's 0/1 group masks."""
  h = hashlib.sha1()
  for g in spec.groups:
    h.update(np.packbits(np.asarray(masks[g.name]) > 0).tobytes())
  return h.hexdigest()[:16]


def default_backend() -> str:
  return "sliced" if jax.default_backend() == "cpu" else "masked"


def bucket_masks(spec, masks: dict, bucket: int) -> dict:
  """Rounds every group's kept count up to a multiple of ``bucket`` (capped
  at the group size) by also keeping its lowest-index pruned channels.
  Returns numpy 0/1 masks (a superset of ``masks``)."""
  out = {}
  for g in spec.groups:
    m = np.asarray(masks[g.name], np.float32).copy()
    k = int(m.sum())
    target = min(g.size, -(-k // bucket) * bucket) if bucket > 1 else k
    fill = np.flatnonzero(m == 0)[:target - k]
    m[fill] = 1.0
    out[g.name] = m
  return out


class Evaluator:
  """Evaluates batches of candidates for one pretrained network and target.

  Args:
    net, variables: the pretrained network and its variables.
    data: from `prepare_data`.
    config: the fitness definition.
    backend: 'auto', 'masked' or 'sliced' (see the module doc).
    devices: devices to spread candidates over (default: ``jax.devices()``,
      all hosts' devices after `jax.distributed.initialize()`).
    bucket: 'sliced': width rounding of the validation pass (1: exact
      widths).
    workers: 'sliced': candidates evaluated concurrently (default: the device
      count, or the CPU core count on a single CPU device).
    compiler_options: XLA options of the masked backend's functions and of
      the sliced SGD steps; default ``net.ops``'s (`legr_jax.ops.Ops`,
      which also says how convs, BatchNorm and the SGD update are
      computed); {} for XLA's defaults. The sliced validation blocks are
      compiled by ``block_executor``.
    memo: memoize losses by mask digest (see `evaluate`); ``cache`` (digest
      -> loss) may be pre-filled, e.g. from a resumed search's log.
    block_executor: 'sliced': the `BlockwiseExecutor` of the validation
      passes, whose compiled blocks may be shared with other evaluators of
      the same network (default: a new one with ``net.ops``).
  """

  def __init__(self, net, variables, data: FitnessData, config: FitnessConfig,
               *, backend: str = "auto", devices=None, bucket: int = 4,
               workers: int | None = None,
               compiler_options: dict | None = None, memo: bool = True,
               block_executor: BlockwiseExecutor | None = None):
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    self.net, self.config = net, config
    self.backend = default_backend() if backend == "auto" else backend
    self.devices = list(devices if devices is not None else jax.devices())
    self.bucket = max(1, int(bucket))
    if workers is None:
      workers = len(self.devices)
      if workers == 1 and self.devices[0].platform == "cpu":
        workers = os.cpu_count() or 1
    self.workers = max(1, int(workers))
    if compiler_options is None:
      compiler_options = net.ops.jit_options() or {}
    self.compiler_options = dict(compiler_options) or None
    self.variables = jax.tree.map(np.asarray, jax.device_get(
        {"params": variables["params"],
         "batch_stats": variables.get("batch_stats", {})}))
    self.data = data
    spec = net.spec
    self.norms = ranking.filter_norms(spec, self.variables["params"])
    self.layer_names = spec.layer_names
    self.layer_std = np.array([float(np.std(np.asarray(self.norms[l])))
                               for l in self.layer_names], np.float32)
    self.memo = memo
    self.cache: dict[str, float] = {}   # mask digest -> loss
    self._masks_fn = jax.jit(jax.vmap(functools.partial(
        candidate_masks, spec, self.norms, config=config)))
    self._executor = block_executor or BlockwiseExecutor(net.ops)
    self._per_device: dict = {}
    self._lock = threading.Lock()
    # 'sliced', tau_hat > 0: one dict per fresh candidate, in completion
    # order: prepare_s (slice, init, lower and compile its SGD step),
    # first_step_s, steps_s (the other steps and embedding the weights
    # back), steps (their count), eval_s (the validation pass); seconds
    self.phase_seconds: list[dict] = []
    self._pool = None
    self._masked_fn = None

  # -- masks ---------------------------------------------------------------

  def masks(self, alpha, kappa):
    """Vectorized masks: ``(masks {group: [k, C]}, feasible [k], flops
    fraction [k])`` as numpy arrays."""
    masks, feasible, frac = self._masks_fn(jnp.asarray(alpha, jnp.float32),
                                           jnp.asarray(kappa, jnp.float32))
    return jax.device_get((masks, feasible, frac))

  # -- evaluation ------------------------------------------------------------

  def evaluate(self, alpha, kappa) -> dict:
    """Losses of K candidates (alpha, kappa: [K, L]).

    A candidate's loss is a pure function of its masks (the training batches
    are fixed), so losses are memoized by a digest of the masks: candidates
    whose pruned network was already evaluated (common: a child whose
    mutations do not move the global cut-off prunes exactly like its
    parent) cost no evaluation, and duplicates within a round are evaluated
    once. ``memo=False`` in the constructor turns this off.

    Returns numpy arrays ``{'loss': [K] (inf when infeasible), 'flops': [K]
    kept FLOPs fraction, 'feasible': [K] bool, 'mask_digest': [K] str,
    'cached': [K] bool}``.
    """
    alpha, kappa = np.asarray(alpha, np.float32), np.asarray(kappa,
                                                             np.float32)
    chex.assert_shape(alpha, (None, len(self.layer_names)))
    masks, feasible, frac = self.masks(alpha, kappa)
    k = alpha.shape[0]
    digests = [mask_digest(self.net.spec, {g: v[i] for g, v in masks.items()})
               for i in range(k)]
    loss = np.full((k,), np.inf, np.float32)
    cached = np.zeros((k,), bool)
    todo, first = [], {}
    for i in range(k):
      if not feasible[i]:
        continue
      if self.memo and digests[i] in self.cache:
        loss[i], cached[i] = self.cache[digests[i]], True
      elif digests[i] in first:
        cached[i] = True          # a duplicate within this round
      else:
        first[digests[i]] = i
        todo.append(i)
    if todo:
      sub = {g: v[todo] for g, v in masks.items()}
      if self.backend == "masked":
        vals = self._masked_losses(sub)
      else:
        vals = self._sliced_losses(sub)
      loss[todo] = vals
      if self.memo:
        self.cache.update((digests[i], float(v)) for i, v in zip(todo, vals))
    for i in range(k):
      if feasible[i] and not np.isfinite(loss[i]) and digests[i] in first:
        loss[i] = loss[first[digests[i]]]
    return {"loss": loss, "flops": np.asarray(frac, np.float32),
            "feasible": np.asarray(feasible, bool),
            "mask_digest": np.asarray(digests), "cached": cached}

  # -- masked backend --------------------------------------------------------

  def _mesh(self) -> Mesh:
    return Mesh(np.array(self.devices), (CANDIDATE_AXIS,))

  def _masked_losses(self, masks: dict) -> np.ndarray:
    k = next(iter(masks.values())).shape[0]
    n_dev = len(self.devices)
    # A round evaluates only its fresh (not memoized) candidates; padding
    # their count to a power of two bounds the compiled shapes to
    # log2(K) + 1 at most twice the work (every count its own shape was the
    # main cost of short searches: benchmarks/RESULTS.md, accelerator suite).
    padded = -(-(1 << (k - 1).bit_length()) // n_dev) * n_dev
    masks = {g: np.concatenate([v, np.repeat(v[-1:], padded - k, 0)])
             for g, v in masks.items()}
    mesh = self._mesh()
    if self._masked_fn is None:
      one = functools.partial(masked_loss, self.net, self.config)
      batched = jax.vmap(one, in_axes=(None, None, 0))
      sharded = jax.shard_map(
          batched, mesh=mesh, in_specs=(P(), P(), P(CANDIDATE_AXIS)),
          out_specs=P(CANDIDATE_AXIS), check_vma=False)
      rep = NamedSharding(mesh, P())
      self._masked_fn = jax.jit(sharded, out_shardings=rep,
                                compiler_options=self.compiler_options)
      d = self.data
      self._masked_args = jax.device_put(
          (self.variables,
           {"val_images": d.val_images, "val_labels": d.val_labels,
            "val_valid": d.val_valid, "train_images": d.train_images,
            "train_labels": d.train_labels, "mean": d.mean,
            "inv_std": d.inv_std}), rep)
    cand = NamedSharding(mesh, P(CANDIDATE_AXIS))
    masks = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, cand,
                                               lambda idx: a[idx]), masks)
    out = self._masked_fn(*self._masked_args, masks)
    return np.asarray(jax.device_get(out))[:k]

  # -- sliced backend ----------------------------------------------------------

  def _device_data(self, device):
    with self._lock:
      if device not in self._per_device:
        d = self.data
        put = lambda a: jax.device_put(a, device)  # noqa: E731
        # Per-batch arrays for the sliced backend; the padded rows of the
        # last batch are dropped (1,000 images: 7 x 128 + 104, not 1,024).
        val = []
        for i in range(len(d.val_images)):
          n = int(d.val_valid[i].sum())
          val.append((put(d.val_images[i][:n]), put(d.val_labels[i][:n]),
                      put(d.val_valid[i][:n])))
        self._per_device[device] = {
            "val": val,
            "stats": (put(d.mean), put(d.inv_std)),
            "train_steps": [(put(d.train_images[t]), put(d.train_labels[t]))
                            for t in range(len(d.train_images))],
        }
      return self._per_device[device]

  def _sliced_one(self, masks_np: dict, device) -> float:
    net, cfg = self.net, self.config
    dd = self._device_data(device)
    if cfg.tau_hat == 0:
      return self._blockwise_loss(masks_np, self.variables, dd, device)
    # tau_hat > 0: exact widths, one compiled SGD step per candidate, driven
    # from Python (a lax.scan over the steps ran far slower on XLA:CPU:
    # benchmarks/RESULTS.md), then the trained weights are put back into a
    # full-size copy and evaluated like a tau_hat = 0 candidate (bucketed
    # widths: compiled blocks shared across candidates, instead of new ones
    # for every candidate's exact widths).
    state, step, prepare_s = self._prepare_sgd(masks_np, device)
    mean, inv_std = dd["stats"]
    t1 = time.perf_counter()
    steps = dd["train_steps"]
    state = jax.block_until_ready(step(state, *steps[0], mean, inv_std))
    t2 = time.perf_counter()
    for x, y in steps[1:]:
      state = step(state, x, y, mean, inv_std)
    trained = surgery.embed_arrays(
        net.spec, self.variables, jax.device_get(state.variables),
        surgery.kept_channels(net.spec, masks_np))
    t3 = time.perf_counter()
    loss = self._blockwise_loss(masks_np, trained, dd, device)
    with self._lock:
      self.phase_seconds.append({
          "prepare_s": prepare_s, "first_step_s": t2 - t1,
          "steps_s": t3 - t2, "steps": len(steps) - 1,
          "eval_s": time.perf_counter() - t3})
    return loss

  def _prepare_sgd(self, masks_np: dict, device):
    """The candidate's sliced train state on ``device`` and its compiled SGD
    step: ``(state, compiled step, seconds taken)``."""
    t0 = time.perf_counter()
    state, step = sliced_sgd(self.net, self.variables, masks_np, self.config,
                             compiler_options=self.compiler_options)
    state = jax.device_put(state, device)
    dd = self._device_data(device)
    x, y = dd["train_steps"][0]
    compiled = step.lower(state, x, y, *dd["stats"]).compile()
    return state, compiled, time.perf_counter() - t0

  def _blockwise_loss(self, masks_np: dict, variables: dict, dd: dict,
                      device) -> float:
    """Mean validation loss of the full-size ``variables`` pruned by 0/1
    ``masks_np``: sliced to widths rounded up to ``self.bucket`` (the
    filler channels masked to zero), run block by block."""
    spec = self.net.spec
    keep = bucket_masks(spec, masks_np, self.bucket)
    widths, index_maps, small_vars = slicing.slice_candidate(
        spec, variables, keep)
    site_masks = None
    if any(np.any(keep[g] != masks_np[g]) for g in keep):
      site_masks = slicing.sliced_site_masks(spec, masks_np, keep)
    small_vars, index_maps, site_masks = jax.device_put(
        (small_vars, {k: np.asarray(v, np.int32)
                      for k, v in index_maps.items()}, site_masks), device)
    total = None
    for x, y, valid in dd["val"]:
      logits = self._executor.apply_module(
          self.net.module, small_vars, x, widths=widths,
          index_maps=index_maps, site_masks=site_masks)
      s = _loss_sum(logits, y, valid)
      total = s if total is None else total + s
    return float(total) / float(self.data.val_valid.sum())

  def _sliced_losses(self, masks: dict) -> np.ndarray:
    k = next(iter(masks.values())).shape[0]
    # Several processes: each evaluates its share on its own devices and
    # the losses are gathered (multihost.gather_owned).
    mine = multihost.owned(k)
    per = [{g: np.asarray(v[i]) for g, v in masks.items()} for i in mine]
    local = [d for d in self.devices
             if d.process_index == jax.process_index()] or jax.local_devices()
    devs = [local[i % len(local)] for i in range(len(per))]
    if self.workers == 1 or len(per) <= 1:
      vals = [self._sliced_one(m, d) for m, d in zip(per, devs)]
    else:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="legr_fitness")
      futures = [self._pool.submit(self._sliced_one, m, d)
                 for m, d in zip(per, devs)]
      vals = [f.result() for f in futures]
    return multihost.gather_owned(np.array(vals, np.float32), k)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None


@jax.jit
def _loss_sum(logits, labels, valid):
  return jnp.sum(step_lib.cross_entropy(logits, labels) * valid)


def sgd_step(net, config: FitnessConfig, state: step_lib.TrainState, x, y,
             mean, inv_std):
  """One SGD step of `finetune` on uint8 images ``x`` [B, H, W, C] (normalized
  here with ``mean``, ``inv_std``) and labels ``y`` [B] -> new state; what
  the 'sliced' backend compiles per candidate when tau_hat > 0.

  ``state.opt_state`` is the momentum trace itself (shaped like the params),
  updated by ``net.ops.sgd_update``: the maths of `make_optimizer` (on CPU
  one C++ call instead of hundreds of small XLA fusions that every candidate's
  compile would generate code for).
  """
  _, _, stats, grads = step_lib.loss_and_grads(
      net, state.params, state.batch_stats,
      {"image": _normalize(x, mean, inv_std), "label": y}, None)
  params, trace = net.ops.sgd_update(
      state.params, grads, state.opt_state, lr=config.lr,
      momentum=config.momentum, weight_decay=config.weight_decay)
  return state.replace(step=state.step + 1, params=params,
                       batch_stats=stats, opt_state=trace)


def sliced_sgd(net, variables, masks, config: FitnessConfig, *,
               compiler_options: dict | None = None):
  """``net`` physically sliced to 0/1 ``masks`` (`slicing.SlicedNet`), ready
  for the tau_hat steps: ``(state, step)``, the train state of the sliced
  network (zero momentum trace as its ``opt_state``) and its jitted
  `sgd_step` (``step(state, x, y, mean, inv_std) -> state``; the state is
  donated), computed with ``net.ops`` and compiled with ``compiler_options``
  (default ``net.ops``'s)."""
  widths, index_maps, small_vars = slicing.slice_candidate(
      net.spec, jax.device_get(variables), masks)
  small = slicing.SlicedNet(net, widths, index_maps)
  if compiler_options is None:
    compiler_options = net.ops.jit_options()
  params = small_vars["params"]
  # built in numpy and put on the device in one transfer
  state = jax.device_put(step_lib.TrainState(
      step=np.zeros((), np.int32), params=params,
      batch_stats=small_vars.get("batch_stats", {}),
      opt_state=jax.tree.map(np.zeros_like, params),
      rng=np.zeros((2,), np.uint32)))
  step = jax.jit(functools.partial(sgd_step, small, config),
                 compiler_options=compiler_options, donate_argnums=0)
  return state, step


def layer_norm_std(net, variables) -> np.ndarray:
  """Per-layer std of the filter norms [L] (the kappa scale of LeGR)."""
  norms = ranking.filter_norms(net.spec, variables["params"])
  return np.array([float(np.std(np.asarray(norms[l])))
                   for l in net.spec.layer_names], np.float32)


__all__ = ["BACKENDS", "Evaluator", "FitnessConfig", "FitnessData",
           "bucket_masks", "candidate_masks", "default_backend", "finetune",
           "layer_norm_std", "mask_digest", "masked_loss", "prepare_data",
           "sgd_step", "sliced_sgd", "validation_loss"]
