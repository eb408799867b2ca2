"""Several members of a family fine-tuned at once (the accelerator path).

K full-size networks with their own group masks share one training recipe;
their params, BatchNorm statistics and optimizer states are stacked on a
leading member axis and trained by one vmapped `step.train_step`, the member
axis split over the local devices (members padded to a multiple of the
device count by repeating the last one; the copies are dropped at the end).
Every member sees the batches that `fit` would give it (same
``config.seed``, same order and augmentation), so each member's result is
`fit`'s on its sliced network up to float summation order: masked channels
are exact zeros in every forward pass and get zero gradients (weight decay
shrinks their weights, which the slicing then drops).

Computed with `legr_jax.ops.XLA` (the CPU backend's custom calls are not
batched). Resumable: the stacked state is checkpointed with orbax every
epoch (and every ``config.ckpt_every_steps``) under ``workdir``; a rerun of
the same members resumes, a rerun of different ones starts over in that
folder (it only ever holds unfinished work). No per-epoch validation: the
caller evaluates the members it slices afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from legr_jax import data as data_lib
from legr_jax import ops as ops_lib
from legr_jax.train import checkpoint as ckpt_lib
from legr_jax.train import step as step_lib
from legr_jax.train.config import TrainConfig
from legr_jax.train.loop import TrainingDivergedError, build_optimizer
from legr_jax.train.progress import Progress

MEMBER_AXIS = "members"
KEY_FILE = "members.json"


def member_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: the local devices) whose axis
  splits the members."""
  devices = list(devices if devices is not None else jax.local_devices())
  return Mesh(np.asarray(devices), (MEMBER_AXIS,))


def _stack(trees):
  return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


def _digest(trees) -> str:
  h = hashlib.sha1()
  for tree in trees:
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0],
        key=lambda t: jax.tree_util.keystr(t[0])):
      h.update(jax.tree_util.keystr(path).encode())
      h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


def make_members_step(net, optimizer, mesh: Mesh, *,
                      label_smoothing: float = 0.0,
                      compute_dtype: str = "float32"):
  """Jitted ``(stacked_state, batch, stacked_masks) -> (state, metrics)``:
  `step.train_step` vmapped over the leading member axis (split over
  ``mesh``), the batch shared (replicated). Metrics are ``[K]`` arrays."""
  def one(state, batch, masks):
    return step_lib.train_step(net, optimizer, state, batch, masks,
                               label_smoothing=label_smoothing,
                               compute_dtype=compute_dtype)
  members = NamedSharding(mesh, P(MEMBER_AXIS))
  rep = NamedSharding(mesh, P())
  return jax.jit(jax.vmap(one, in_axes=(0, None, 0)),
                 in_shardings=(members, rep, members),
                 out_shardings=(members, members), donate_argnums=(0,))


def fit_members(config: TrainConfig, workdir: str, *, net,
                variables: Sequence[dict], masks: Sequence[dict], dataset,
                mesh: Mesh | None = None, max_steps: int | None = None,
                progress: bool = True, log: Callable[[str], None] = print,
                crash_at_step: int | None = None) -> list[dict]:
  """Fine-tunes K masked copies of ``net`` together with ``config``'s recipe.

  Args:
    config: the recipe (epochs, lr, schedule, batch, seed, ...); its
      ``cpu_kernels`` is ignored (plain XLA ops).
    workdir: the folder of this job's checkpoints (shared by every host
      when several JAX processes run it).
    net: the full-size `PrunableNet`.
    variables: K full-size variables (e.g. a method's output, or the
      pretrained ones for every member).
    masks: K group-mask dicts (0/1, ``{group: [C_g]}``).
    dataset: a `legr_jax.data.Dataset`.
    mesh: a 1-D mesh of this process's devices splitting its members
      (default `member_mesh()`).
    max_steps: stop after this many steps (tests).
    crash_at_step: testing aid: SIGKILL this process right after this step.
  Returns:
    K full-size variables (host numpy), member order kept, on every process.

  Several hosts: after `jax.distributed.initialize()` every process calls
  this with the same arguments; process i fine-tunes members i, i + P, ...
  on its local devices (checkpoints in ``workdir/process_<i>``), writes
  them to ``workdir/out/``, and after a barrier every process reads all K.
  """
  k = len(variables)
  if k == 0 or len(masks) != k:
    raise ValueError(f"give as many masks as variables (>= 1), got "
                     f"{len(masks)} masks for {k} variables")
  n_proc = jax.process_count()
  if n_proc == 1:
    return _fit_local(config, workdir, net=net, variables=variables,
                      masks=masks, dataset=dataset, mesh=mesh,
                      max_steps=max_steps, progress=progress, log=log,
                      crash_at_step=crash_at_step)
  from legr_jax.search import multihost  # pylint: disable=import-outside-toplevel
  me = jax.process_index()
  mine = list(range(me, k, n_proc))
  out_dir = os.path.join(workdir, "out")
  os.makedirs(out_dir, exist_ok=True)
  if mine:
    done = _fit_local(config, os.path.join(workdir, f"process_{me}"),
                      net=net, variables=[variables[j] for j in mine],
                      masks=[masks[j] for j in mine], dataset=dataset,
                      mesh=mesh, max_steps=max_steps, progress=progress,
                      log=log, crash_at_step=crash_at_step,
                      process_local=True)
    for j, v in zip(mine, done):
      path = os.path.join(out_dir, f"member_{j}.npz")
      np.savez(path + ".tmp.npz", *jax.tree.leaves(v))
      os.replace(path + ".tmp.npz", path)
  multihost.sync("legr_jax.fit_members")
  treedef = jax.tree.structure(jax.device_get(variables[0]))
  result = []
  for j in range(k):
    with np.load(os.path.join(out_dir, f"member_{j}.npz")) as z:
      result.append(jax.tree.unflatten(
          treedef, [z[f"arr_{i}"] for i in range(len(z.files))]))
  return result


def _fit_local(config: TrainConfig, workdir: str, *, net,
               variables: Sequence[dict], masks: Sequence[dict], dataset,
               mesh: Mesh | None = None, max_steps: int | None = None,
               progress: bool = True, log: Callable[[str], None] = print,
               crash_at_step: int | None = None,
               process_local: bool = False) -> list[dict]:
  """`fit_members` on this process's devices only."""
  k = len(variables)
  if k == 0 or len(masks) != k:
    raise ValueError(f"give as many masks as variables (>= 1), got "
                     f"{len(masks)} masks for {k} variables")
  mesh = mesh or member_mesh()
  n_dev = mesh.devices.size
  padded = -(-k // n_dev) * n_dev
  variables = list(variables) + [variables[-1]] * (padded - k)
  masks = [{g: np.asarray(m, np.float32) for g, m in mk.items()}
           for mk in list(masks) + [masks[-1]] * (padded - k)]
  net = net.with_ops(ops_lib.XLA)
  ds = dataset
  spe = data_lib.num_batches(len(ds.train), config.batch_size)
  if spe == 0:
    raise ValueError(f"the training split has {len(ds.train)} images, fewer "
                     f"than one batch (batch_size={config.batch_size})")
  total = config.epochs * spe
  if max_steps is not None:
    total = min(total, max_steps)
  optimizer, _ = build_optimizer(config, spe)

  cfg = config.to_dict()
  cfg.pop("cpu_kernels", None)
  key = {"config": cfg, "net": net.config, "members": k,
         "variables": _digest(variables[:k]), "masks": _digest(masks[:k]),
         "devices": n_dev}
  os.makedirs(workdir, exist_ok=True)
  key_path = os.path.join(workdir, KEY_FILE)
  try:
    with open(key_path) as f:
      same = json.load(f) == json.loads(json.dumps(key))
  except (OSError, ValueError):
    same = False
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not same and os.path.exists(ckpt_dir):
    log(f"{workdir} holds another set of members' unfinished fine-tuning; "
        "starting over")
    shutil.rmtree(ckpt_dir)
  with open(key_path + ".tmp", "w") as f:
    json.dump(key, f, indent=2, sort_keys=True)
  os.replace(key_path + ".tmp", key_path)

  members = NamedSharding(mesh, P(MEMBER_AXIS))
  states = [step_lib.init_train_state(net, jax.random.PRNGKey(config.seed),
                                      optimizer, v) for v in variables]
  manager = ckpt_lib.make_manager(ckpt_dir, keep=2,
                                  process_local=process_local)
  start, state = 0, None
  template = jax.eval_shape(lambda: _stack(jax.device_get(states)))
  # Saved and restored as host arrays: orbax refuses process-local device
  # arrays when several processes run.
  restored = ckpt_lib.restore_newest(
      manager, ckpt_lib.abstract_like(template), log=log)
  if restored is not None:
    start, state, meta = restored
    if meta.get("steps_per_epoch") != spe:
      start, state = 0, None
    else:
      log(f"resuming the {k} members' fine-tuning from step {start}")
      state = jax.device_put(jax.device_get(state), members)
  if state is None:
    state = jax.device_put(_stack(jax.device_get(states)), members)
  dev_masks = jax.device_put(_stack(masks), members)
  step_fn = make_members_step(net, optimizer, mesh,
                              label_smoothing=config.label_smoothing,
                              compute_dtype=config.compute_dtype)
  augment = ds.augment if config.augment is None else config.augment
  bar = Progress(total, initial=start, desc=f"fine-tune x{k}",
                 stream=None if progress else open(os.devnull, "w"))
  rep = NamedSharding(mesh, P())

  def save(s):
    ckpt_lib.save(manager, s, jax.device_get(state),
                  {"step": s, "steps_per_epoch": spe}, None)

  t0 = time.perf_counter()
  s = start
  pending = []
  for epoch in range(start // spe, config.epochs):
    if s >= total:
      break
    first = start % spe if epoch == start // spe else 0
    for batch in data_lib.batches(
        ds.train, config.batch_size, seed=config.seed, epoch=epoch,
        start_batch=first, augment=augment, mean=ds.mean, std=ds.std,
        prefetch=config.prefetch, sharding=rep):
      state, m = step_fn(state, batch, dev_masks)
      s += 1
      pending.append(m["loss"])
      if s % config.log_every_steps == 0 or s % spe == 0 or s == total:
        losses = np.asarray(jax.device_get(pending))[:, :k]
        pending = []
        if not np.all(np.isfinite(losses)):
          bad = int(np.argmax(~np.all(np.isfinite(losses), axis=0)))
          manager.close()
          bar.close()
          raise TrainingDivergedError(
              f"member #{bad}'s fine-tuning diverged (loss not finite near "
              f"step {s}); lower the learning rate (--finetune_lr)")
        bar.update(s, loss=float(losses[-1].mean()),
                   epoch=f"{s / spe:.2f}")
      if crash_at_step is not None and s == crash_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
      if s >= total:
        break
      if config.ckpt_every_steps and s % config.ckpt_every_steps == 0 \
          and s % spe:
        save(s)
    if s % spe == 0 or s >= total:
      save(s)
  bar.close()
  manager.close()
  log(f"fine-tuned {k} members together in {time.perf_counter() - t0:.1f}s "
      f"({s - start} steps on {n_dev} device(s))")
  host = jax.device_get({"params": state.params,
                         "batch_stats": state.batch_stats})
  return [jax.tree.map(lambda a, i=i: np.asarray(a[i]), host)
          for i in range(k)]
