"""`fit`: the training driver (checkpoints, resume, NaN stop, metrics), and
`load_trained` to get a trained network back from its workdir.

Workdir layout::

  workdir/config.json     TrainConfig of the run
  workdir/net.json        network config (`legr_jax.models.from_config`)
  workdir/masks.npz       group masks the run trained with (if any)
  workdir/checkpoints/    orbax CheckpointManager (last k + best by val acc)
  workdir/metrics.jsonl   one JSON record per line (train / val / test / event)
  workdir/result.json     final metrics, written when the run completes
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from legr_jax import data as data_lib
from legr_jax import models
from legr_jax import ops as ops_lib
from legr_jax import provenance
from legr_jax.train import checkpoint as ckpt_lib
from legr_jax.train import optim, parallel
from legr_jax.train import step as step_lib
from legr_jax.train.config import TrainConfig, differences
from legr_jax.train.evaluate import evaluate
from legr_jax.train.progress import Progress

RUN_FILES = ("config.json", "net.json", "masks.npz", "checkpoints",
             "metrics.jsonl", "result.json", provenance.SESSIONS)


class TrainingDivergedError(FloatingPointError):
  """The loss (or the parameters) became NaN or infinite."""
  exit_code = 1   # experiments' exit status


class WorkdirConflictError(RuntimeError):
  """The workdir holds a different run."""
  exit_code = 2


@dataclasses.dataclass
class FitResult:
  net: Any
  variables: dict
  result: dict
  workdir: str


# --- workdir ------------------------------------------------------------------


def _path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _read_json(path: str, fix: str = "rerun into a new workdir, or with "
               "overwrite=True (--overwrite) to start over"):
  """The JSON document in ``path``; a damaged file is a ValueError naming it
  and ``fix`` (what to do)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is damaged (not valid JSON: {e}): {fix}"
                     ) from None


def _masks_to_numpy(masks) -> dict[str, np.ndarray] | None:
  if masks is None:
    return None
  return {k: np.asarray(v, np.float32) for k, v in masks.items()}


def load_masks(workdir: str) -> dict[str, np.ndarray] | None:
  """The masks a run trained with (None if it trained unmasked)."""
  path = _path(workdir, "masks.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return {k.replace("|", "/"): f[k] for k in f.files}


def _save_masks(workdir: str, masks) -> None:
  np.savez(_path(workdir, "masks.npz"),
           **{k.replace("/", "|"): v for k, v in masks.items()})


def _same_masks(a, b) -> bool:
  if a is None or b is None:
    return a is None and b is None
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def prepare_workdir(workdir: str, config: TrainConfig, net_config: dict,
                    masks, *, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> bool:
  """Makes ``workdir`` ready for this run. Returns True when resuming.

  A workdir holding the same run (equal config apart from operational
  fields, same network and masks) is resumed. A different run raises
  `WorkdirConflictError` unless ``overwrite``, which deletes that run's files
  (only the files a run writes, see `RUN_FILES`) and starts over.
  """
  os.makedirs(workdir, exist_ok=True)
  present = [f for f in RUN_FILES if os.path.exists(_path(workdir, f))]
  conflict = None
  if present and "config.json" not in present:
    conflict = f"it holds {present} but no config.json"
  elif present:
    try:
      old = TrainConfig.from_dict(_read_json(_path(workdir, "config.json")))
      old_net = (_read_json(_path(workdir, "net.json"))
                 if "net.json" in present else None)
      old_masks = load_masks(workdir)
    except (ValueError, TypeError, OSError) as e:
      old = None
      conflict = f"its run files are damaged ({e})"
    if old is not None:
      diff = differences(old, config)
      if old_net is not None and old_net != json.loads(json.dumps(
          net_config)):
        diff["network"] = ("(saved net.json)", "(this network)")
      if not _same_masks(old_masks, masks):
        diff["masks"] = ("(saved masks.npz)", "(these masks)")
      if diff:
        conflict = "it holds a different run: " + "; ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
  if conflict and not overwrite:
    raise WorkdirConflictError(
        f"refusing to train in {workdir}: {conflict}. Choose another workdir,"
        " or pass overwrite=True (--overwrite) to delete that run and start "
        "over.")
  if present and (overwrite or conflict):
    log(f"overwrite: deleting the previous run in {workdir}: {present}")
    for f in present:
      p = _path(workdir, f)
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    present = []
  if present:
    return True
  _write_json(_path(workdir, "config.json"), config.to_dict())
  _write_json(_path(workdir, "net.json"), net_config)
  if masks is not None:
    _save_masks(workdir, masks)
  return False


class MetricsLog:
  """Appends JSON records to workdir/metrics.jsonl (flushed per record). A
  last line cut short by a killed process is ended first, so it stays one
  unreadable line (skipped by `read_metrics`) instead of spoiling the next
  record."""

  def __init__(self, path: str):
    self.path = path
    if os.path.exists(path) and os.path.getsize(path):
      with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b"\n"
      if torn:
        with open(path, "a") as f:
          f.write("\n")

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: str) -> list[dict]:
  """The JSON records of a log, one per line; a line that does not parse
  (cut short by a killed process) is skipped."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        out.append(record)
  return out


def read_metrics(workdir: str) -> list[dict]:
  """Records of metrics.jsonl; records that a resume superseded (written
  after the checkpoint the run resumed from) are dropped, and so are lines
  cut short by a killed process."""
  records = read_jsonl(_path(workdir, "metrics.jsonl"))
  out = []
  for r in records:
    if r.get("event") == "resume":
      out = [o for o in out if o.get("step", 0) <= r.get("step", 0)]
    out.append(r)
  return out


# --- training -----------------------------------------------------------------


def _tree_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


_all_finite = jax.jit(_tree_finite)


def build_optimizer(config: TrainConfig, steps_per_epoch: int):
  """(optimizer, schedule) of ``config`` for ``steps_per_epoch``."""
  schedule = optim.make_schedule(
      config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
      schedule=config.schedule, milestones=config.milestones,
      gamma=config.gamma, warmup_epochs=config.warmup_epochs)
  optimizer = optim.make_optimizer(schedule, momentum=config.momentum,
                                   nesterov=config.nesterov,
                                   weight_decay=config.weight_decay)
  return optimizer, schedule


def load_dataset(config: TrainConfig, **kw) -> data_lib.Dataset:
  return data_lib.get_dataset(config.dataset, data_dir=config.data_dir,
                              val_fraction=config.val_fraction,
                              val_size=config.val_size, seed=config.split_seed,
                              test_size=config.test_size, **kw)


def check_fit_inputs(config: TrainConfig, dataset: data_lib.Dataset,
                     mesh=None) -> None:
  """Raises ValueError (naming the setting) when ``config`` cannot train on
  ``dataset``: a training split smaller than one batch, or a batch that the
  devices do not divide. `fit` calls it before it writes anything."""
  n = len(dataset.train)
  if data_lib.num_batches(n, config.batch_size) == 0:
    raise ValueError(
        f"the training split of {dataset.name} has {n} images, fewer than one"
        f" batch (batch_size={config.batch_size}, --batch_size): lower the "
        "batch size, or give more training data (a smaller validation / test "
        "split)")
  mesh = mesh or parallel.make_mesh()
  if config.batch_size % mesh.devices.size:
    raise ValueError(
        f"batch_size={config.batch_size} (--batch_size) is not divisible by "
        f"the {mesh.devices.size} devices; give a multiple of "
        f"{mesh.devices.size}")


def fit(config: TrainConfig, workdir: str, *, net=None,
        variables: dict | None = None, masks: dict | None = None,
        dataset: data_lib.Dataset | None = None, overwrite: bool = False,
        download: bool = False, mesh=None, progress: bool = True,
        log: Callable[[str], None] = print,
        crash_at_step: int | None = None) -> FitResult:
  """Trains ``config`` in ``workdir``, resuming if it holds the same run.

  Args:
    config: the run.
    workdir: where config, checkpoints, metrics and results live.
    net: the network (default: ``models.get(config.model, ...)`` sized for
      the data set); e.g. a sliced network for fine-tuning. It is computed
      with ``config.cpu_kernels``'s `legr_jax.ops.Ops` (`PrunableNet.with_ops`).
    variables: initial variables (default: ``net.init``), e.g. pretrained.
    masks: group masks applied in every forward pass (saved to masks.npz).
    dataset: the data (default: `load_dataset(config)`).
    overwrite: delete a different run found in ``workdir`` and start over.
    download: let TFDS download missing data.
    mesh: device mesh (default: all local devices, batch split over them).
    progress: show a progress bar on stderr.
    log: where status lines go.
    crash_at_step: testing aid: SIGKILL this process right after this step.
  Returns:
    `FitResult` with the final variables and the result dict (also in
    workdir/result.json).
  Raises:
    WorkdirConflictError: ``workdir`` holds a different run.
    TrainingDivergedError: NaN/inf loss; the last good checkpoint is kept.
  """
  session_t0 = time.perf_counter()
  ds = dataset or load_dataset(config, download=download)
  if net is None:
    net = models.get(config.model, num_classes=ds.num_classes,
                     input_shape=ds.image_shape, **config.model_kwargs)
  mesh = mesh or parallel.make_mesh()
  net = net.with_ops(ops_lib.resolve(config.cpu_kernels,
                                     list(mesh.devices.flat)))
  np_masks = _masks_to_numpy(masks)
  check_fit_inputs(config, ds, mesh)   # before anything is written
  resuming = prepare_workdir(workdir, config, net.config, np_masks,
                             overwrite=overwrite, log=log)
  if jax.process_index() == 0:
    provenance.record_session(workdir, {
        "job": "train", "resumed": resuming, "ops": net.ops.name},
        devices=list(mesh.devices.flat))
  metrics_log = MetricsLog(_path(workdir, "metrics.jsonl"))
  manager = ckpt_lib.make_manager(_path(workdir, "checkpoints"),
                                  keep=config.keep_checkpoints)

  spe = data_lib.num_batches(len(ds.train), config.batch_size)
  total_steps = config.epochs * spe
  optimizer, schedule = build_optimizer(config, spe)
  rep = parallel.replicated(mesh)
  init = lambda: step_lib.init_train_state(  # noqa: E731
      net, jax.random.PRNGKey(config.seed), optimizer, variables)
  dev_masks = (parallel.replicate(jax.tree.map(jnp.asarray, np_masks), mesh)
               if np_masks is not None else None)

  # Finished already? (A damaged result.json is recomputed.)
  result_path = _path(workdir, "result.json")
  result = None
  if resuming and os.path.exists(result_path):
    try:
      result = _read_json(result_path)
    except ValueError as e:
      log(f"warning: {e}; evaluating the final checkpoint again")
  abstract = ckpt_lib.abstract_like(jax.eval_shape(init), rep)
  if isinstance(result, dict):
    log(f"{workdir} holds a finished run of this config "
        f"(test accuracy {result.get('test_accuracy')}); nothing to do.")
    latest = manager.latest_step()
    try:
      state, _ = ckpt_lib.restore(manager, latest, abstract)
    except ckpt_lib.CheckpointError as e:
      raise ckpt_lib.CheckpointError(
          f"{e}: it holds the final weights of the finished run in "
          f"{workdir}; rerun with overwrite=True (--overwrite) to train "
          "again") from None
    finally:
      manager.close()
    return FitResult(net, state.variables, result, workdir)

  meta0 = {"train_time_s": 0.0}
  restored = (ckpt_lib.restore_newest(manager, abstract, log=log)
              if resuming else None)
  latest = None
  if restored is not None:
    latest, state, meta0 = restored
    if meta0.get("steps_per_epoch") != spe:
      raise WorkdirConflictError(
          f"checkpoint {latest} in {workdir} was made with "
          f"{meta0.get('steps_per_epoch')} steps per epoch, this data gives "
          f"{spe}; the data set changed")
    log(f"resuming {workdir} from step {latest} (epoch {latest / spe:.2f})")
    metrics_log.write({"event": "resume", "step": latest, "time": time.time()})
  else:
    state = parallel.replicate(init(), mesh)
    if resuming:
      log(f"{workdir} holds this run's config but no checkpoint; starting at "
          "step 0")
    metrics_log.write({"event": "start", "step": 0, "time": time.time(),
                       "devices": mesh.devices.size,
                       "dataset": ds.summary()})
  start = latest or 0
  train_time = float(meta0.get("train_time_s", 0.0))
  best = {"val_accuracy": meta0.get("best_val_accuracy"),
          "step": meta0.get("best_step")}

  step_fn = parallel.make_train_step(
      net, optimizer, mesh, label_smoothing=config.label_smoothing,
      compute_dtype=config.compute_dtype)
  augment = ds.augment if config.augment is None else config.augment
  eval_kw = dict(mean=ds.mean, std=ds.std, mesh=mesh,
                 compute_dtype=config.compute_dtype)
  bar = Progress(total_steps, initial=start, desc="train",
                 stream=None if progress else open(os.devnull, "w"))
  log(f"data: {ds.summary()}; model: {net!r}; {mesh.devices.size} device(s); "
      f"{spe} steps/epoch, {total_steps} steps")

  pending: list = []
  window_t0 = time.perf_counter()
  window_images = 0
  last_val = {}

  def flush(s: int) -> None:
    """Checks the pending step metrics and logs their mean."""
    nonlocal pending, window_t0, window_images
    if not pending:
      return
    values = jax.device_get(pending)
    losses = np.array([v["loss"] for v in values])
    if not np.all(np.isfinite(losses)):
      bad = s - len(values) + int(np.argmax(~np.isfinite(losses))) + 1
      _diverged(f"loss is {losses[~np.isfinite(losses)][0]} at step {bad}")
    dt = time.perf_counter() - window_t0
    record = {"split": "train", "step": s, "epoch": round(s / spe, 4),
              "loss": float(losses.mean()),
              "accuracy": float(np.mean([v["accuracy"] for v in values])),
              "lr": float(schedule(s - 1)),
              "images_per_s": round(window_images / max(dt, 1e-9), 2),
              "time": time.time()}
    metrics_log.write(record)
    bar.update(s, loss=record["loss"], acc=record["accuracy"],
               epoch=f"{s / spe:.2f}")
    pending, window_t0, window_images = [], time.perf_counter(), 0

  def _diverged(what: str) -> None:
    latest_ok = manager.latest_step()
    metrics_log.write({"event": "diverged", "detail": what,
                       "last_checkpoint": latest_ok, "time": time.time()})
    bar.close()
    manager.close()
    raise TrainingDivergedError(
        f"training diverged: {what}. Stopped; the last good checkpoint "
        f"(step {latest_ok}) is kept in {_path(workdir, 'checkpoints')}. "
        "Lower the learning rate (--lr) or check the data, then rerun with a "
        "new workdir or --overwrite.")

  def save(s: int, metrics: dict | None) -> None:
    if not bool(_all_finite(state.variables)):
      _diverged(f"parameters are not finite after step {s}")
    meta = {"step": s, "epoch": s // spe, "batch_in_epoch": s % spe,
            "steps_per_epoch": spe, "seed": config.seed,
            "train_time_s": train_time + (time.perf_counter() - seg_t0),
            "best_val_accuracy": best["val_accuracy"],
            "best_step": best["step"]}
    ckpt_lib.save(manager, s, state, meta, metrics)

  seg_t0 = time.perf_counter()
  s = start
  for epoch in range(start // spe, config.epochs):
    first = start % spe if epoch == start // spe else 0
    for batch in data_lib.batches(
        ds.train, config.batch_size, seed=config.seed, epoch=epoch,
        start_batch=first, augment=augment, mean=ds.mean, std=ds.std,
        prefetch=config.prefetch, sharding=parallel.batch_sharding(mesh)):
      state, m = step_fn(state, batch, dev_masks)
      s += 1
      pending.append(m)
      window_images += config.batch_size
      end_of_epoch = s % spe == 0
      if s % config.log_every_steps == 0 or end_of_epoch:
        flush(s)
      if (config.ckpt_every_steps and s % config.ckpt_every_steps == 0
          and not end_of_epoch):
        save(s, None)
      if crash_at_step is not None and s == crash_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    metrics = None
    if ((epoch + 1) % config.eval_every_epochs == 0
        or epoch + 1 == config.epochs) and len(ds.val):
      vl, va = evaluate(net, state.variables, ds.val, dev_masks,
                        config.eval_batch_size, **eval_kw)
      last_val = {"val_loss": vl, "val_accuracy": va}
      metrics_log.write({"split": "val", "step": s, "epoch": epoch + 1,
                         "loss": vl, "accuracy": va, "time": time.time()})
      if best["val_accuracy"] is None or va > best["val_accuracy"]:
        best = {"val_accuracy": va, "step": s}
      bar.write(f"epoch {epoch + 1}/{config.epochs}: val loss {vl:.4f}, "
                f"val accuracy {va:.4f}")
      metrics = {"val_accuracy": va}
    save(s, metrics)
    window_t0 = time.perf_counter()  # images/s excludes eval and saving
  bar.close()
  train_time += time.perf_counter() - seg_t0

  tl, ta = evaluate(net, state.variables, ds.test, dev_masks,
                    config.eval_batch_size, **eval_kw)
  test_name = "val (no test split)" if ds.test_is_val else "test"
  metrics_log.write({"split": "test", "step": s, "loss": tl, "accuracy": ta,
                     "test_split": test_name, "time": time.time()})
  result = {"test_accuracy": ta, "test_loss": tl, "test_split": test_name,
            **last_val, "best_val_accuracy": best["val_accuracy"],
            "best_step": best["step"], "steps": s, "epochs": config.epochs,
            "train_time_s": round(train_time, 2),
            "session_wall_time_s": round(time.perf_counter() - session_t0, 2),
            "devices": mesh.devices.size, "dataset": ds.summary()}
  _write_json(result_path, result)
  metrics_log.write({"event": "done", "step": s, "time": time.time()})
  manager.close()
  log(f"final {test_name} accuracy {ta:.4f} (loss {tl:.4f}); "
      f"training time {train_time:.1f}s; results in {result_path}")
  return FitResult(net, jax.device_get(state.variables), result, workdir)


def load_trained(workdir: str, *, which: str = "best",
                 mesh=None) -> tuple[Any, dict, TrainConfig]:
  """Rebuilds the network of a run and restores its variables.

  Args:
    workdir: a `fit` workdir.
    which: 'best' (highest validation accuracy; the latest checkpoint when
      none has one) or 'latest'.
  Returns:
    (net, variables, config); the masks the run used are `load_masks(workdir)`.
  Raises:
    FileNotFoundError: ``workdir`` or its checkpoints are missing.
    ValueError: config.json / net.json are damaged; `CheckpointError` (a
      ValueError): the checkpoint does not restore. Each names the file and
      what to do.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{workdir} is not a folder: give the workdir of "
                            "an experiments.train run")
  fix = ("rerun its training (python -m experiments.train) into a new "
         "workdir, or with --overwrite")
  for name in ("config.json", "net.json"):
    if not os.path.exists(_path(workdir, name)):
      raise FileNotFoundError(f"{_path(workdir, name)} is missing: {workdir} "
                              "is not an experiments.train workdir")
  try:
    config = TrainConfig.from_dict(_read_json(_path(workdir, "config.json"),
                                              fix))
    net = models.from_config(_read_json(_path(workdir, "net.json"), fix))
  except (TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"{workdir}: config.json / net.json are not the files "
                     f"experiments.train writes ({e}): {fix}") from None
  ckdir = _path(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    raise FileNotFoundError(f"no checkpoints in {workdir}: finish its "
                            "training first (rerun the same experiments.train"
                            " command to resume it)")
  manager = ckpt_lib.make_manager(ckdir, keep=config.keep_checkpoints,
                                  read_only=True)
  if which == "best":
    step = manager.best_step()
    if step is None:  # no checkpoint has a validation metric
      step = manager.latest_step()
  elif which == "latest":
    step = manager.latest_step()
  else:
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  if step is None:
    raise FileNotFoundError(f"no checkpoints in {ckdir}")
  optimizer = optim.make_optimizer(optax.constant_schedule(config.lr),
                                   momentum=config.momentum,
                                   nesterov=config.nesterov,
                                   weight_decay=config.weight_decay)
  mesh = mesh or parallel.make_mesh()
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(
      net, jax.random.PRNGKey(0), optimizer))
  try:
    state, _ = ckpt_lib.restore(manager, step, ckpt_lib.abstract_like(
        abstract, parallel.replicated(mesh)))
  except ckpt_lib.CheckpointError as e:
    raise ckpt_lib.CheckpointError(
        f"{e}: the {which} checkpoint of {workdir} is damaged; {fix}, or "
        f"delete {ckpt_lib.step_dir(manager, step)} to fall back to another "
        "checkpoint") from None
  finally:
    manager.close()
  return net, state.variables, config
