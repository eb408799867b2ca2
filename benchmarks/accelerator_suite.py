r"""One prepared accelerator check: the population-parallel design measured in
a single short run (issue 19), to be launched the moment a GPU is lent.

  python -m benchmarks.accelerator_suite --workdir=/tmp/acc      # all parts
  python -m benchmarks.accelerator_suite --tiny --workdir=/tmp/acc  # CPU check
  python -m benchmarks.accelerator_suite --parts=latency --workdir=/tmp/acc
  python -m benchmarks.accelerator_suite --workdir=/tmp/acc --table_only

On the lent GPU machine the device tool runs a command in the repository root
and brings back what it writes under $OUT; its Python is ``python3`` (jax
with CUDA, flax, optax, orbax, chex, absl, matplotlib; no TFDS, no network).
Paste as the tool's command, with timeout_s=600:

  python3 -m benchmarks.accelerator_suite --workdir=$OUT

The suite ends on its own within --total_timeout_s (540 s), so the JSON and
the table come back before the tool's limit. A quick rerun of one part, e.g.
``--parts=search_tau200 --tau_k=32``; the figures land in
benchmarks/RESULTS.md with the GPU model.

Parts (``--parts``, default all, in this order), each run in its own
subprocess (jax cannot reset its peak-memory counter, and a hung or crashed
part must not take the others with it), capped at ``--part_timeout_s``
(``--part_timeouts``: per-part caps) and at what is left of
``--total_timeout_s``:

  search_tau0      LeGR search (`legr_jax.search.search`, masked backend) of
                   ``--evaluations`` (400) at tau_hat = 0 for each K of
                   ``--ks`` (16, 32, 64): wall time, the evaluations that
                   were unique after the loss memo, and the masked batch
                   sizes met (the masked backend evaluates only a round's
                   fresh candidates, so every new count of them is a new
                   shape and a compile: the seconds of the rounds that met a
                   new size against the others show what that costs); the
                   best K (lowest wall time).
  search_tau200    ``--tau_rounds`` rounds of K candidates with distinct
                   masks at ``--tau_hat`` (200), `fitness.Evaluator`'s masked
                   backend (K: ``--tau_k``, default search_tau0's best K):
                   seconds per candidate (the rounds after the first), the
                   first round's extra (compile) and the projected wall time
                   of an ``--evaluations`` search: one compile and every
                   candidate evaluated, and with search_tau0's memo rate and
                   number of batch sizes (one compile each) at that K.
  family_finetune  a family of ``--family_budgets`` (8) L2-pruned budgets
                   fine-tuned ``--family_steps`` (30) steps one after
                   another (sliced) against all at once (`train.members`:
                   masked, vmapped, split over the devices): wall seconds
                   with compiles and steady seconds per step; decides
                   `family.default_finetune_mode` on that device.
  latency          forward-pass latency of the L2-ranked (LeGR's identity
                   candidate), physically sliced ``--flops`` network against
                   the unpruned one at ``--latency_batches`` (1, 128, 1024),
                   float32 and bfloat16 (params and inputs cast), timed by
                   `legr_jax.latency.measure`: median of
                   ``--latency_repeats`` jitted passes after the warm-up.

The network is a randomly initialised ``--model`` (ResNet-56; He-normal
kernels drawn in numpy, `random_variables`) and the data are random
CIFAR-10-shaped uint8 images with random labels (``--val_images`` 1,000
validation images): fine for timing, meaningless as losses. Nothing is
downloaded and nothing imports TensorFlow or tensorflow_datasets (each part
records the ones loaded in its process: ``tensorflow_modules``, empty).
Goals (issue 19), printed beside the figures when the flags are the issue's
set-up: 400 candidates at tau_hat = 0 in under 1 minute; a 400-candidate
tau_hat = 200 search projected under 10 minutes.

Output: WORKDIR/accelerator_suite.json, rewritten after every part (a killed
run keeps what it measured; a part killed by its cap keeps the figures it had
written, status 'timeout'; SIGTERM / SIGINT: status 'killed'), the parts' own
files WORKDIR/parts/PART.json (rewritten after every figure) and
WORKDIR/logs/PART.log (output), and a table printed at the end. Peak device memory per part is
``memory_stats()['peak_bytes_in_use']`` of the part's process; null where the
backend has no memory statistics (CPU). The exit status is 0 when every part
is 'ok' or not available, 1 otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_search
from legr_jax import cost, data, latency, models, ops, provenance, ranking
from legr_jax import search, surgery
from legr_jax.cpu import malloc_tuning
from legr_jax.search import fitness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("search_tau0", "search_tau200", "family_finetune", "latency")
SUMMARY_JSON = "accelerator_suite.json"
DATA_NOTE = ("random CIFAR-10-shaped uint8 images with random labels: fine "
             "for timing, the losses mean nothing")
GOALS = {"search_tau0": ("400 candidates at tau_hat = 0 in under 1 minute",
                         60.0),
         "search_tau200": ("a 400-candidate tau_hat = 200 search projected "
                           "under 10 minutes", 600.0)}
# The set-up the goals are stated for (other set-ups print no verdict).
GOAL_SETUP = {"model": "resnet56", "image_size": 32, "val_images": 1000,
              "evaluations": 400, "flops": 0.47, "safeguard": 0.1}

# --tiny: CPU-sized values of the flags not given explicitly.
TINY = {"model": "cnn_small", "image_size": 8, "val_images": 64,
        "train_images": 64, "evaluations": 16, "population": 8, "sample": 4,
        "ks": ["8"], "tau_hat": 2, "tau_rounds": 2, "batch_size": 16,
        "eval_batch_size": 32, "latency_batches": ["1", "8"],
        "family_budgets": 3, "family_steps": 3,
        "latency_repeats": 3}

FLAGS = flags.FLAGS
flags.DEFINE_bool("tiny", False, "CPU-sized model, data and counts (the "
                  "whole suite in well under a minute on 2 cores); flags "
                  "given explicitly still win.")
flags.DEFINE_list("parts", list(PARTS), "Parts to run, in this order: " +
                  ", ".join(PARTS))
flags.DEFINE_float("part_timeout_s", 180.0, "Each part's process is killed "
                   "after this many seconds (status 'timeout').")
flags.DEFINE_list("part_timeouts", ["search_tau0=240", "latency=100"],
                  "PART=SECONDS caps that replace --part_timeout_s for those "
                  "parts.")
flags.DEFINE_float("total_timeout_s", 540.0, "The suite's own time cap: a "
                   "part gets at most what is left of it (0: none).")
flags.DEFINE_string("workdir", os.path.join("workdirs", "accelerator_suite"),
                    "Where the JSON summary and the logs are written.")
flags.DEFINE_bool("table_only", False, "Only print the table of the "
                  "summary already in --workdir.")
flags.DEFINE_string("model", "resnet56", "Model (legr_jax.models.get).")
flags.DEFINE_integer("image_size", 32, "Height and width of the random "
                     "images (3 channels).")
flags.DEFINE_integer("val_images", 1000, "Validation images.")
flags.DEFINE_integer("train_images", 5000, "Training images (tau_hat "
                     "batches are drawn from them).")
flags.DEFINE_float("flops", 0.47, "FLOPs target (kept fraction).")
flags.DEFINE_float("safeguard", 0.1, "Minimum kept fraction per group.")
flags.DEFINE_integer("evaluations", 400, "Evaluations of a search.")
flags.DEFINE_integer("population", 64, "Population P of the search.")
flags.DEFINE_integer("sample", 16, "Tournament sample S of the search.")
flags.DEFINE_list("ks", ["16", "32", "64"], "search_tau0: candidates per "
                  "round (K) to try.")
flags.DEFINE_integer("batch_size", 128, "Training batch of the tau_hat "
                     "steps.")
flags.DEFINE_integer("eval_batch_size", 128, "Validation batch.")
flags.DEFINE_integer("tau_hat", 200, "search_tau200: SGD steps per "
                     "candidate.")
flags.DEFINE_integer("tau_rounds", 2, "search_tau200: rounds of K "
                     "candidates (the first includes the compile).")
flags.DEFINE_integer("tau_k", 0, "search_tau200: K (0: search_tau0's best "
                     "K, else the middle of --ks).")
flags.DEFINE_integer("family_budgets", 8, "family_finetune: budgets.")
flags.DEFINE_integer("family_steps", 30, "family_finetune: training steps "
                     "of every member.")
flags.DEFINE_list("latency_batches", ["1", "128", "1024"], "latency: batch "
                  "sizes.")
flags.DEFINE_integer("latency_repeats", 20, "latency: timed passes per "
                     "figure (median).")
flags.DEFINE_list("latency_dtypes", ["float32", "bfloat16"], "latency: "
                  "dtypes of params and inputs.")
flags.DEFINE_enum("cpu_kernels", "off", ["auto", "on", "off"],
                  "legr_jax.ops.resolve setting on CPU (accelerators always "
                  "run plain XLA).")
flags.DEFINE_string("jax_cache_dir", "", "Persistent compilation cache of "
                    "the parts (a rerun on a warm machine skips compiles).")
flags.DEFINE_string("child_part", None, "Internal: run this part here.")
flags.DEFINE_string("child_out", None, "Internal: the part's result file.")
flags.DEFINE_string("child_context", "{}", "Internal: JSON from earlier "
                    "parts (search_tau0's best K, memo rates, batch sizes).")


def apply_tiny() -> None:
  """--tiny: sets every TINY flag that was not given explicitly."""
  if FLAGS.tiny:
    for name, value in TINY.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value


def _write_json(path: str, obj) -> None:
  """Atomic JSON write (temporary file + os.replace)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
    f.write("\n")
  os.replace(tmp, path)


def _read_json(path: str) -> dict:
  """The JSON object in ``path``; {} when it is absent or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def goal_setup() -> bool:
  """True when the flags are the set-up the issue's goals are stated for."""
  return not FLAGS.tiny and all(FLAGS[k].value == v
                                for k, v in GOAL_SETUP.items())


# --- the parts (each in its own process) ------------------------------------


class PartResult(dict):
  """A part's figures, rewritten to ``path`` on every `save` (with the
  process's peak device memory), so a killed part keeps what it measured."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def save(self) -> None:
    self.update(memory())
    # the lent machine has no TFDS: nothing here may need it
    self["tensorflow_modules"] = sorted(
        m for m in sys.modules
        if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
    _write_json(self.path, dict(self))


def memory() -> dict:
  """This process's peak device memory: ``{'peak_bytes_in_use': int or None,
  'bytes_limit': int or None, 'memory_note': str}``."""
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats or "peak_bytes_in_use" not in stats:
    return {"peak_bytes_in_use": None, "bytes_limit": None,
            "memory_note": f"memory_stats() has no peak on {dev.platform}"}
  return {"peak_bytes_in_use": int(stats["peak_bytes_in_use"]),
          "bytes_limit": stats.get("bytes_limit"),
          "memory_note": "peak of this part's own process"}


def random_dataset(image_shape, n_train: int, n_val: int, seed: int = 0):
  """A `legr_jax.data.Dataset` of uniform random uint8 images and labels
  (10 classes); 'cifar' augmentation at 32x32x3, else none."""
  rng = np.random.default_rng(seed)
  split = lambda n: data.ArraySplit(  # noqa: E731
      rng.integers(0, 256, (n,) + tuple(image_shape), dtype=np.uint8),
      rng.integers(0, 10, (n,), dtype=np.int32))
  train, val = split(n_train), split(n_val)
  mean, std = data.channel_stats(train.x)
  return data.Dataset(
      name="random", train=train, val=val, test=val, num_classes=10,
      image_shape=tuple(image_shape), mean=mean, std=std,
      augment="cifar" if tuple(image_shape) == (32, 32, 3) else "none",
      test_is_val=True, note=DATA_NOTE)


def random_variables(net, seed: int = 0) -> dict:
  """Variables shaped like ``net.init``'s, drawn in numpy (no compile: an
  init compiles for seconds on a small CPU): He-normal kernels (std
  sqrt(2 / fan_in), fan_in the product of all but the last axis),
  BatchNorm scales and running variances 1, biases and running means 0."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    if path[-1].key == "kernel":
      std = math.sqrt(2.0 / math.prod(s.shape[:-1]))
      return (std * rng.standard_normal(s.shape)).astype(s.dtype)
    fill = np.ones if path[-1].key in ("scale", "var") else np.zeros
    return fill(s.shape, s.dtype)

  shapes = jax.eval_shape(net.init, jax.random.key(seed))
  return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


def setup(res: dict):
  """``(net, variables, dataset)``: ``--model`` with `random_variables`,
  computed with ``--cpu_kernels``' ops, and `random_dataset`; records the
  seconds taken as ``res['setup_s']``."""
  t0 = time.perf_counter()
  shape = (FLAGS.image_size, FLAGS.image_size, 3)
  net = models.get(FLAGS.model, num_classes=10, input_shape=shape)
  net = net.with_ops(ops.resolve(FLAGS.cpu_kernels))
  out = (net, random_variables(net), random_dataset(
      shape, FLAGS.train_images, FLAGS.val_images))
  res["setup_s"] = time.perf_counter() - t0
  return out


def _search_config(k: int, tau_hat: int):
  return search.SearchConfig(
      dataset="random", flops=FLAGS.flops, safeguard=FLAGS.safeguard,
      tau_hat=tau_hat, batch_size=FLAGS.batch_size,
      eval_batch_size=FLAGS.eval_batch_size, population=FLAGS.population,
      sample=FLAGS.sample, evaluations=FLAGS.evaluations,
      candidates_per_round=k, backend="masked", checkpoint_every=64,
      cpu_kernels=FLAGS.cpu_kernels)


def log_figures(records: list, n_devices: int) -> dict:
  """What a search's evaluations.jsonl says about the memo and the masked
  backend's compiles: ``unique`` (feasible, not memoized), ``memoized``,
  ``infeasible``, ``rounds``, ``first_round_s``, ``masked_batch_sizes`` (the
  distinct numbers of fresh candidates in a round, padded to the device
  count: one compile each), ``new_size_rounds_s`` (seconds of the rounds
  that met a new size, compiles included) and ``seen_size_rounds_s``."""
  rounds: dict = {}
  for r in records:
    fresh, size, secs = rounds.get(r["round"], (0, 0, 0.0))
    rounds[r["round"]] = (fresh + int(r["feasible"] and not r["cached"]),
                          size + 1, secs + r["seconds_per_candidate"])
  seen, new_s, seen_s = set(), 0.0, 0.0
  for fresh, _, secs in (rounds[i] for i in sorted(rounds)):
    padded = -(-fresh // n_devices) * n_devices
    if padded and padded not in seen:
      seen.add(padded)
      new_s += secs
    else:
      seen_s += secs
  return {"unique": sum(rounds[i][0] for i in rounds),
          "memoized": sum(1 for r in records if r["cached"]),
          "infeasible": sum(1 for r in records if not r["feasible"]),
          "rounds": len(rounds),
          "first_round_s": rounds[min(rounds)][2] if rounds else None,
          "masked_batch_sizes": sorted(seen), "new_size_rounds_s": new_s,
          "seen_size_rounds_s": seen_s}


def part_search_tau0(res: PartResult, context: dict) -> None:
  """LeGR searches at tau_hat = 0, masked backend, one per K of --ks."""
  del context
  net, variables, ds = setup(res)
  res.update(model=net.name, data=DATA_NOTE, val_images=len(ds.val),
             evaluations=FLAGS.evaluations, flops=FLAGS.flops,
             safeguard=FLAGS.safeguard, backend="masked", tau_hat=0,
             runs={})
  res.save()
  for k in [int(k) for k in FLAGS.ks]:
    wd = tempfile.mkdtemp(prefix=f"acc_tau0_k{k}_")
    try:
      t0 = time.perf_counter()
      out = search.search(_search_config(k, 0), wd, net=net,
                          variables=variables, dataset=ds, progress=False,
                          log=lambda s: None)
      wall = time.perf_counter() - t0
      with open(os.path.join(wd, "evaluations.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    finally:
      shutil.rmtree(wd, ignore_errors=True)
    # the driver's own counts: 'evaluated' = not memoized (infeasible ones
    # included), 'memoized' = repeats answered by the loss memo
    run = {"wall_s": wall, "search_time_s": out.result["search_time_s"],
           "best_loss": out.loss, "driver_evaluated": out.result["evaluated"],
           "driver_memoized": out.result["memoized"],
           **log_figures(records, len(jax.devices()))}
    res["runs"][str(k)] = run
    best = min(res["runs"], key=lambda s: res["runs"][s]["wall_s"])
    res.update(best_k=int(best), best_wall_s=res["runs"][best]["wall_s"])
    if goal_setup():
      res["goal_met"] = res["best_wall_s"] < GOALS["search_tau0"][1]
    res.save()
    print(f"tau_hat=0 K={k}: {FLAGS.evaluations} evaluations in "
          f"{wall:.1f} s ({run['unique']} unique after the memo, "
          f"{run['memoized']} memoized, {run['infeasible']} infeasible; "
          f"masked batch sizes {run['masked_batch_sizes']})", flush=True)


def distinct_candidates(ev, n: int):
  """``n`` feasible candidates of LeGR's initial population (identity first,
  then random) with pairwise different masks: ``(alpha, kappa)`` [n, L]."""
  pool = 2 * n + 8
  while True:
    alpha, kappa = bench_search._candidates(  # pylint: disable=protected-access
        ev.net, ev.variables, pool)
    masks, feasible, _ = ev.masks(alpha, kappa)
    keep, seen = [], set()
    for i in range(pool):
      d = fitness.mask_digest(ev.net.spec,
                              {g: m[i] for g, m in masks.items()})
      if feasible[i] and d not in seen:
        seen.add(d)
        keep.append(i)
    if len(keep) >= n:
      keep = np.asarray(keep[:n])
      return alpha[keep], kappa[keep]
    pool *= 2


def part_search_tau200(res: PartResult, context: dict) -> None:
  """Rounds of K distinct candidates at tau_hat = --tau_hat (masked)."""
  ks = [int(k) for k in FLAGS.ks]
  k = FLAGS.tau_k or context.get("best_k") or ks[len(ks) // 2]
  net, variables, ds = setup(res)
  fcfg = _search_config(k, FLAGS.tau_hat).fitness_config()
  t0 = time.perf_counter()
  fdata = fitness.prepare_data(ds, fcfg)
  ev = fitness.Evaluator(net, variables, fdata, fcfg, backend="masked")
  res.update(model=net.name, data=DATA_NOTE, tau_hat=FLAGS.tau_hat, k=k,
             k_from=("--tau_k" if FLAGS.tau_k else "search_tau0's best K"
                     if context.get("best_k") else "the middle of --ks"),
             backend="masked", prepare_data_s=time.perf_counter() - t0,
             rounds=[])
  res.save()
  alpha, kappa = distinct_candidates(ev, k * FLAGS.tau_rounds)
  for r in range(FLAGS.tau_rounds):
    t = time.perf_counter()
    out = ev.evaluate(alpha[r * k:(r + 1) * k], kappa[r * k:(r + 1) * k])
    secs = time.perf_counter() - t
    fresh = int(np.sum(out["feasible"] & ~out["cached"]))
    res["rounds"].append({"candidates": k, "evaluated": fresh,
                          "seconds": secs})
    last = res["rounds"][-1]
    steady = res["rounds"][1:] or res["rounds"]
    per = float(np.median([x["seconds"] / x["evaluated"] for x in steady]))
    compile_s = max(0.0, res["rounds"][0]["seconds"] - per * k)
    n = FLAGS.evaluations
    res.update(s_per_candidate=per, steady=len(res["rounds"]) > 1,
               compile_overhead_s=compile_s,
               projected_evaluations=n,
               projected_search_s=compile_s + n * per)
    seen = context.get("runs", {}).get(str(k))
    if seen:   # search_tau0 ran this K: its memo rate and batch sizes
      res["projected_search_with_memo_s"] = (
          compile_s * seen["sizes"] + n * seen["unique_fraction"] * per)
    if goal_setup() and FLAGS.tau_hat == 200:
      res["goal_met"] = res["projected_search_s"] < GOALS["search_tau200"][1]
    res.save()
    print(f"tau_hat={FLAGS.tau_hat} K={k} round {r}: {last['seconds']:.1f} s"
          f" for {fresh} candidates", flush=True)
  ev.close()


def part_family_finetune(res: PartResult, context: dict) -> None:
  """A family of --family_budgets L2-pruned members fine-tuned
  --family_steps steps: one after another (sliced networks, one jitted
  `train.train_step` each) against all at once (`train.members`: masked
  full-size networks, vmapped, split over the local devices). Times include
  each side's compiles (a user meets them); the steady-state seconds per
  step (the steps after the first) are given too."""
  del context
  from legr_jax import methods, train  # pylint: disable=import-outside-toplevel
  from legr_jax.train import members as members_lib  # pylint: disable=import-outside-toplevel
  net, variables, ds = setup(res)
  k, steps = FLAGS.family_budgets, FLAGS.family_steps
  budgets = [round(0.3 + 0.6 * i / max(1, k - 1), 3) for i in range(k)]
  l2 = methods.get("l2", safeguard=FLAGS.safeguard)
  masks = [l2.prune(net, variables, b).masks for b in budgets]
  config = train.TrainConfig(model=net.name, epochs=1,
                             batch_size=FLAGS.batch_size, lr=0.01,
                             nesterov=True, cpu_kernels=FLAGS.cpu_kernels)
  spe = data.num_batches(len(ds.train), config.batch_size)
  optimizer, _ = train.build_optimizer(config, spe)
  res.update(model=net.name, budgets=budgets, steps=steps,
             devices=len(jax.local_devices()))

  def batches():
    while True:
      for epoch in range(1000):
        yield from data.batches(ds.train, config.batch_size, seed=0,
                                epoch=epoch, augment=ds.augment,
                                mean=ds.mean, std=ds.std, prefetch=2)

  t0 = time.perf_counter()
  seq_steady = 0.0
  for m in masks:
    small, sv = surgery.slice_network(net, variables, m)
    state = train.init_train_state(small, jax.random.PRNGKey(0), optimizer,
                                   sv)
    step = jax.jit(functools.partial(train.train_step, small, optimizer),
                   donate_argnums=(0,))
    it = batches()
    for i in range(steps):
      t1 = time.perf_counter()
      state, metrics = step(state, next(it), None)
      jax.block_until_ready(metrics)
      if i:
        seq_steady += time.perf_counter() - t1
  res["sequential_s"] = time.perf_counter() - t0
  res["sequential_steady_s_per_step"] = seq_steady / (k * max(1, steps - 1))
  res.save()
  print(f"family of {k}: sequential {res['sequential_s']:.1f} s", flush=True)

  mesh = members_lib.member_mesh()
  par_net = net.with_ops(ops.XLA)
  padded = -(-k // mesh.devices.size) * mesh.devices.size
  stacked = members_lib._stack(  # pylint: disable=protected-access
      [jax.device_get(train.init_train_state(par_net, jax.random.PRNGKey(0),
                                             optimizer, variables))]
      * padded)
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(members_lib.MEMBER_AXIS))
  t0 = time.perf_counter()
  state = jax.device_put(stacked, sharding)
  dev_masks = jax.device_put(members_lib._stack(  # pylint: disable=protected-access
      [{g: np.asarray(v) for g, v in m.items()} for m in masks]
      + [masks[-1]] * (padded - k)), sharding)
  step = members_lib.make_members_step(par_net, optimizer, mesh)
  it = batches()
  par_steady = 0.0
  for i in range(steps):
    t1 = time.perf_counter()
    state, metrics = step(state, next(it), dev_masks)
    jax.block_until_ready(metrics)
    if i:
      par_steady += time.perf_counter() - t1
  res["parallel_s"] = time.perf_counter() - t0
  res["parallel_steady_s_per_step"] = par_steady / max(1, steps - 1)
  res["parallel_over_sequential"] = res["parallel_s"] / res["sequential_s"]
  res["faster"] = ("parallel" if res["parallel_s"] < res["sequential_s"]
                   else "sequential")
  res.save()
  print(f"family of {k}: parallel {res['parallel_s']:.1f} s (ratio "
        f"{res['parallel_over_sequential']:.2f}; faster: {res['faster']})",
        flush=True)


def _cast(tree, dtype):
  """``tree`` with its floating leaves cast to ``dtype``."""
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
      else a, tree)


class CastInput:
  """``net`` whose input is cast to ``dtype`` first, inside the jitted pass
  (`legr_jax.latency.measure` feeds float32 images; with bfloat16 variables
  the whole pass then runs in bfloat16)."""

  def __init__(self, net, dtype):
    self.net, self.dtype, self.input_shape = net, dtype, net.input_shape

  def apply(self, variables, x):
    return self.net.apply(variables, x.astype(self.dtype))


def part_latency(res: PartResult, context: dict) -> None:
  """Sliced (L2 ranking, --flops) vs unpruned forward latency, timed by
  `legr_jax.latency.measure`."""
  del context
  net, variables, _ = setup(res)
  spec = net.spec
  n_layers = len(spec.layer_names)
  # LeGR's identity candidate (alpha = 1, kappa = 0): the plain L2 ranking
  masks, feasible, frac = jax.jit(functools.partial(
      fitness.candidate_masks, spec,
      ranking.filter_norms(spec, variables["params"]),
      config=fitness.FitnessConfig(flops=FLAGS.flops,
                                   safeguard=FLAGS.safeguard)))(
          jnp.ones((n_layers,)), jnp.zeros((n_layers,)))
  if not bool(feasible):
    raise ValueError(f"no L2 pruning of {net.name} meets {FLAGS.flops}")
  small, small_vars = surgery.slice_network(net, variables, masks)
  res.update(model=net.name, ranking="L2 (alpha=1, kappa=0)",
             flops_fraction=float(frac),
             unpruned_macs=int(cost.unpruned(spec)),
             sliced_macs=int(cost.unpruned(small.spec)),
             repeats=FLAGS.latency_repeats, rows=[])
  res.save()
  for dtype in FLAGS.latency_dtypes:
    dt = jnp.dtype(dtype)
    nets = {"unpruned": (CastInput(net, dt), _cast(variables, dt)),
            "sliced": (CastInput(small, dt), _cast(small_vars, dt))}
    for batch in [int(b) for b in FLAGS.latency_batches]:
      row = {"dtype": dtype, "batch": batch}
      for name, (n, v) in nets.items():
        m = latency.measure(n, v, batch=batch,
                            repeats=FLAGS.latency_repeats)
        row.update({f"{name}_ms": m["median_ms"],
                    f"{name}_p10_ms": m["p10_ms"],
                    f"{name}_p90_ms": m["p90_ms"],
                    f"{name}_images_s": 1e3 * batch / m["median_ms"]})
      row["sliced_over_unpruned"] = row["sliced_ms"] / row["unpruned_ms"]
      res["rows"].append(row)
      res.save()
      print(f"latency {dtype} batch {batch}: unpruned "
            f"{row['unpruned_ms']:.3f} ms, sliced {row['sliced_ms']:.3f} ms "
            f"(ratio {row['sliced_over_unpruned']:.2f})", flush=True)


PART_FNS = {"search_tau0": part_search_tau0,
            "search_tau200": part_search_tau200,
            "family_finetune": part_family_finetune,
            "latency": part_latency}


def run_child() -> None:
  """The ``--child_part`` process: provenance, then the part, saving its
  figures as it goes. Exceptions propagate (non-zero exit)."""
  res = PartResult(FLAGS.child_out)
  res["provenance"] = provenance.collect()
  res.save()
  PART_FNS[FLAGS.child_part](res, json.loads(FLAGS.child_context))
  res["finished"] = True
  res.save()


# --- the driver ------------------------------------------------------------


def _die_with_parent() -> None:
  """preexec_fn of a part: killed when the driver dies (Linux)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
  except Exception:  # pylint: disable=broad-except
    pass


_CURRENT = {"proc": None}


def _kill_current(*_):
  proc = _CURRENT["proc"]
  if proc is not None and proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
      pass


def _on_term(signum, frame):
  del frame
  _kill_current()
  sys.exit(128 + signum)


def run_part(part: str, cap_s: float, context: dict, argv: list,
             workdir: str) -> dict:
  """Runs ``part`` in a subprocess (its own process group, killed after
  ``cap_s``), streaming its output to stdout and WORKDIR/logs/PART.log.
  Returns the part's entry of the summary."""
  out = os.path.join(workdir, "parts", f"{part}.json")
  log_path = os.path.join(workdir, "logs", f"{part}.log")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  if os.path.exists(out):
    os.remove(out)
  cmd = [sys.executable, "-m", "benchmarks.accelerator_suite", *argv,
         f"--child_part={part}", f"--child_out={out}",
         f"--child_context={json.dumps(context)}"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  if FLAGS.jax_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(FLAGS.jax_cache_dir)
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          start_new_session=True,
                          preexec_fn=_die_with_parent)
  _CURRENT["proc"] = proc
  tail: list[str] = []

  def pump():
    with open(log_path, "w") as log:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        sys.stdout.write(f"  [{part}] {line}")
        sys.stdout.flush()
        tail.append(line.rstrip())
        del tail[:-30]

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  timed_out = False
  try:
    rc = proc.wait(timeout=cap_s)
  except subprocess.TimeoutExpired:
    timed_out = True
    _kill_current()
    rc = proc.wait()
  _CURRENT["proc"] = None
  reader.join(10)
  entry = {"seconds": time.perf_counter() - t0, "log": log_path,
           **_read_json(out)}
  finished = entry.pop("finished", False)
  if timed_out:
    entry.update(status="timeout", message=f"killed after {cap_s:.0f} s "
                 "(its cap: --part_timeout_s, --part_timeouts or what was "
                 "left of --total_timeout_s); the figures above are what it "
                 "had measured")
  elif rc != 0 or not finished:
    lines = [l for l in tail if l.strip()]
    entry.update(status="error", message=f"exit status {rc}: " + (
        lines[-1] if lines else "no output"), output_tail=lines[-12:])
  else:
    entry.setdefault("status", "ok")
  return entry


def _fmt(x, unit="", digits=1):
  if x is None:
    return "n/a"
  return f"{x:.{digits}f}{unit}"


def _goal(part: str, entry: dict) -> str:
  text = GOALS[part][0]
  if "goal_met" not in entry:
    return f"goal: {text} (no verdict: not the goal's set-up)"
  return f"goal: {text}: {'MET' if entry['goal_met'] else 'NOT MET'}"


def _figure_lines(part: str, e: dict) -> list[str]:
  if part == "search_tau0":
    lines = []
    for k, r in e.get("runs", {}).items():
      lines += [f"K={k}: {r['wall_s']:.1f} s wall, {r['unique']} unique "
                f"evaluations ({r['memoized']} memoized, {r['infeasible']} "
                f"infeasible) of {e['evaluations']}, {r['rounds']} rounds",
                f"  {len(r['masked_batch_sizes'])} masked batch sizes "
                f"{r['masked_batch_sizes']}: rounds meeting a new size "
                f"{r['new_size_rounds_s']:.1f} s (compiles), the others "
                f"{r['seen_size_rounds_s']:.1f} s"]
    if "best_k" in e:
      lines.append(f"best K={e['best_k']}: {e['best_wall_s']:.1f} s; "
                   + _goal(part, e))
    return lines
  if part == "search_tau200":
    lines = [f"round {i}: {r['seconds']:.2f} s for {r['evaluated']} "
             "candidates" for i, r in enumerate(e.get("rounds", []))]
    if "s_per_candidate" in e:
      memo = ""
      if "projected_search_with_memo_s" in e:
        memo = (f" ({e['projected_search_with_memo_s']:.0f} s with "
                "search_tau0's memo rate and compiles at this K)")
      lines.append(
          f"K={e['k']}, tau_hat={e['tau_hat']}: "
          f"{e['s_per_candidate']:.3f} s/candidate"
          f"{'' if e['steady'] else ' (first round only)'}; compile "
          f"{e['compile_overhead_s']:.1f} s; {e['projected_evaluations']}-"
          f"candidate search projected {e['projected_search_s']:.0f} s"
          f"{memo}")
      lines.append(_goal(part, e))
    return lines
  if part == "latency":
    lines = []
    if "flops_fraction" in e:
      lines.append(f"{e['model']} sliced to {e['flops_fraction']:.1%} of "
                   f"{e['unpruned_macs'] / 1e6:.1f} M MACs (L2 ranking)")
    lines += [f"{r['dtype']:8s} batch {r['batch']:5d}: unpruned "
              f"{r['unpruned_ms']:9.3f} ms, sliced {r['sliced_ms']:9.3f} ms,"
              f" ratio {r['sliced_over_unpruned']:.2f}"
              for r in e.get("rows", [])]
    return lines
  if part == "family_finetune":
    lines = []
    if "sequential_s" in e:
      lines.append(f"{len(e['budgets'])} members x {e['steps']} steps: "
                   f"sequential {e['sequential_s']:.1f} s "
                   f"({e['sequential_steady_s_per_step'] * 1e3:.1f} ms per "
                   "member-step steady)")
    if "parallel_s" in e:
      lines.append(f"parallel {e['parallel_s']:.1f} s "
                   f"({e['parallel_steady_s_per_step'] * 1e3:.1f} ms per "
                   f"step of all members, {e['devices']} device(s)); "
                   f"ratio {e['parallel_over_sequential']:.2f}, faster: "
                   f"{e['faster']}")
    return lines
  return []


def format_table(summary: dict) -> str:
  """The readable table of a summary (one row per part, figures below)."""
  head = (f"accelerator suite{' (--tiny)' if summary.get('tiny') else ''}: "
          f"{summary.get('device_kind')}, jax {summary.get('jax_version')};"
          f" data: {DATA_NOTE}")
  rows = [head, f"{'part':16s} {'status':10s} {'time s':>8s} "
          f"{'peak MiB':>9s}  figures"]
  for part, e in summary["parts"].items():
    peak = e.get("peak_bytes_in_use")
    status = e.get("status", "?")
    short = "n/a" if status.startswith("not available") else status
    rows.append(f"{part:16s} {short:10s} {_fmt(e.get('seconds')):>8s} "
                f"{_fmt(None if peak is None else peak / 2**20):>9s}")
    for line in ([status] if short == "n/a" else []) + _figure_lines(
        part, e) + ([e["message"]] if "message" in e else []):
      rows.append(" " * 4 + line)
  notes = {e.get("memory_note") for e in summary["parts"].values()
           if e.get("peak_bytes_in_use") is None and e.get("memory_note")}
  rows += [f"peak MiB n/a: {n}" for n in sorted(notes)]
  return "\n".join(rows)


def _take_provenance(summary: dict, entry: dict) -> dict:
  """Moves a part's provenance record to the summary (the first one seen:
  device kind, jax version) and keeps its device kind; returns ``entry``."""
  prov = entry.pop("provenance", None)
  if prov and summary["provenance"] is None:
    summary["provenance"] = prov
    summary["device_kind"] = ",".join(prov.get("device_kind") or [])
    summary["jax_version"] = prov.get("packages", {}).get("jax")
  if prov:
    entry["device_kind"] = ",".join(prov.get("device_kind") or [])
  return entry


def run_suite(argv: list) -> int:
  """Runs the chosen parts one process each; returns the exit status."""
  unknown = [p for p in FLAGS.parts if p not in PARTS]
  if unknown:
    raise app.UsageError(f"unknown parts {unknown}; known: {PARTS}")
  try:
    caps = {p: float(c) for p, c in (i.split("=") for i in FLAGS.part_timeouts)}
  except ValueError:
    raise app.UsageError("--part_timeouts takes PART=SECONDS items") from None
  if set(caps) - set(PARTS):
    raise app.UsageError(f"--part_timeouts: unknown parts in {caps}")
  workdir = os.path.abspath(FLAGS.workdir)
  path = os.path.join(workdir, SUMMARY_JSON)
  summary = {
      "suite": "benchmarks.accelerator_suite", "tiny": FLAGS.tiny,
      "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "command": " ".join(["python -m benchmarks.accelerator_suite"] + argv),
      "flags": {f: FLAGS[f].value for f in sorted(TINY) + [
          "flops", "safeguard", "tau_k", "family_budgets", "latency_dtypes",
          "cpu_kernels", "part_timeout_s", "part_timeouts",
          "total_timeout_s"]},
      "data": DATA_NOTE, "goals": {p: g[0] for p, g in GOALS.items()},
      "device_kind": None, "jax_version": None, "provenance": None,
      "parts": {p: {"status": "pending"} for p in FLAGS.parts}}
  _write_json(path, summary)
  signal.signal(signal.SIGTERM, _on_term)
  t_start = time.perf_counter()
  context: dict = {}
  for part in FLAGS.parts:
    cap = caps.get(part, FLAGS.part_timeout_s)
    if FLAGS.total_timeout_s:
      cap = min(cap, FLAGS.total_timeout_s - (time.perf_counter() - t_start))
    if cap <= 0:
      summary["parts"][part] = {"status": "timeout", "message": "not run: "
                                "--total_timeout_s reached"}
      _write_json(path, summary)
      continue
    print(f"== {part} (cap {cap:.0f} s)", flush=True)
    try:
      entry = run_part(part, cap, context, argv, workdir)
    except (SystemExit, KeyboardInterrupt):   # SIGTERM / SIGINT
      _kill_current()
      entry = _read_json(os.path.join(workdir, "parts", f"{part}.json"))
      entry.update(status="killed", message="the suite was stopped "
                   "(SIGTERM / SIGINT) during this part; the figures above "
                   "are what it had measured")
      summary["parts"][part] = _take_provenance(summary, entry)
      _write_json(path, summary)
      raise
    _take_provenance(summary, entry)
    if part == "search_tau0" and "best_k" in entry:
      context = {"best_k": entry["best_k"], "runs": {
          k: {"unique_fraction": r["unique"] / entry["evaluations"],
              "sizes": len(r["masked_batch_sizes"])}
          for k, r in entry["runs"].items()}}
    summary["parts"][part] = entry
    summary["elapsed_s"] = time.perf_counter() - t_start
    _write_json(path, summary)
    print(f"== {part}: {entry['status']} in {entry['seconds']:.1f} s",
          flush=True)
  print(format_table(summary))
  print(f"summary: {path}")
  ok = all(e["status"] == "ok" or e["status"].startswith("not available")
           for e in summary["parts"].values())
  return 0 if ok else 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  apply_tiny()
  if not FLAGS["verbosity"].present:   # orbax's INFO lines drown the figures
    logging.set_verbosity(logging.WARNING)
  if FLAGS.table_only:
    with open(os.path.join(FLAGS.workdir, SUMMARY_JSON)) as f:
      print(format_table(json.load(f)))
    return 0
  if FLAGS.child_part:
    if FLAGS.child_part not in PART_FNS or not FLAGS.child_out:
      raise app.UsageError("--child_part needs a known part and --child_out")
    if FLAGS.cpu_kernels != "off":   # before JAX's first computation
      malloc_tuning.retain_freed_memory()
    try:
      run_child()
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      sys.stdout.flush()
      return 1
    return 0
  argv_in = [a for a in sys.argv[1:] if not a.startswith("--child_")]
  return run_suite(argv_in)


if __name__ == "__main__":
  app.run(main)
