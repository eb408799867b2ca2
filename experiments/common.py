"""Flags, validation, errors and process set-up shared by the experiments.

Importing this module (or any experiment module) does not import JAX. Each
script refuses bad input in this order, before it writes anything:

1. flag values, while absl parses them (validators registered with the
   helpers below; ``--only_check_args`` stops right after, which
   experiments.legr_pipeline uses to check every stage's flags first);
2. input files that exist already (`check_dataset_files`,
   `check_train_workdir`, `read_json`, `check_output_workdir`), still
   without JAX;
3. after importing JAX: data, networks, checkpoints, rankings and budgets
   against the safeguard floor (`check_budgets_reachable`);
4. then it locks its workdir (`lock_workdir`) and starts writing.

Every error a user can cause ends as one line on stderr, ``error: ...``,
naming the flag or file and what to do, with exit status 2 (1 for a run that
failed on its own, e.g. a diverged training); `run` does that for every
script. ``--verbosity=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from typing import Any, Callable, Iterable

from absl import app, flags

EXIT_USAGE = 2    # the input is wrong: fix it and rerun
EXIT_FAILED = 1   # the run failed on its own (diverged, nothing feasible)

# legr_jax.ops.CPU_KERNELS, spelled out so that importing this module does
# not import JAX (learn_ranking sets XLA_FLAGS before it does).
_CPU_KERNELS = ("auto", "on", "off")
# legr_jax.data.KNOWN's fixed names (tests/test_bad_input.py keeps them equal).
DATASETS = ("cifar10", "cifar100", "imagenet2012", "caltech_birds2011",
            "digits")
DATASET_PREFIXES = ("npz:", "cifar_dir:")
BUDGET_METRICS = ("flops", "params", "latency")

CPU_KERNELS = flags.DEFINE_enum(
    "cpu_kernels", "auto", list(_CPU_KERNELS),
    "CPU fast paths (output packing, C++ kernels, CPU compile options): "
    "'auto' uses the C++ kernels where they build, 'on' requires them, "
    "'off' runs plain XLA/flax everywhere. Operational: recorded in the "
    "workdir, a run resumes under another value. The LEGR_CPU_KERNELS "
    "environment variable overrides it.")


class UserError(Exception):
  """Input the user must fix; `run` prints it as one line and exits with
  ``exit_code`` (2)."""
  exit_code = EXIT_USAGE

  def __init__(self, message: str, exit_code: int | None = None):
    super().__init__(message)
    if exit_code is not None:
      self.exit_code = exit_code


# --- running a script ------------------------------------------------------


def run(main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run` with one-line errors: flag errors and positional
  arguments exit 2 at parse time; in ``main``, `UserError`, ``UsageError``,
  ``ValueError`` (validation, JSON), ``OSError`` (files) and exceptions with
  an ``exit_code`` attribute print ``error: <message>`` and exit with their
  code (2 unless they say otherwise). ``--verbosity=1`` re-raises them."""
  _quiet_orbax_aftermath()
  app.run(_guarded(main), flags_parser=_parse_flags)


def _quiet_orbax_aftermath() -> None:
  """A checkpoint that fails to restore (reported once, as a warning or an
  error) leaves orbax's other reads failing in the background: asyncio
  logs each unawaited task and TensorStore's callbacks hit the closed event
  loop, each with a traceback. Those echoes are dropped (not with
  --verbosity=1)."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  def keep(record) -> bool:
    if _traceback_wanted():
      return True
    text = str(record.msg)
    return not (text.startswith("Task exception was never retrieved")
                and "orbax" in str(getattr(record, "args", "")) + text)

  std_logging.getLogger("asyncio").addFilter(keep)
  default = sys.unraisablehook

  def unraisable(u) -> None:
    if (isinstance(u.exc_value, RuntimeError)
        and str(u.exc_value) == "Event loop is closed"
        and not _traceback_wanted()):
      return
    default(u)

  sys.unraisablehook = unraisable


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _exit(f"{str(e).rstrip('. ')} (--helpfull lists the flags)", EXIT_USAGE)
  if len(rest) > 1:
    _exit(f"unexpected arguments {rest[1:]}: every input is a flag, "
          "--name=value (--helpfull lists them)", EXIT_USAGE)
  return rest


def _exit(message: str, code: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def exit_code_of(e: BaseException) -> int | None:
  """The exit status of a user-caused exception, None for others."""
  if isinstance(e, app.UsageError):
    return EXIT_USAGE
  code = getattr(e, "exit_code", None)
  if isinstance(code, int) and not isinstance(code, bool):
    return code
  if isinstance(e, (ValueError, OSError)):
    return EXIT_USAGE
  return None


def message_of(e: BaseException) -> str:
  """One line for ``e``: OSErrors name their file."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = (f"{e.filename}: {e.strerror.lower()}; check the path and its "
            "permissions")
  else:
    text = str(e) or type(e).__name__
  if isinstance(e, KeyError) and text.startswith("'"):
    text = text.strip("'")
  return text


def _traceback_wanted() -> bool:
  try:
    return flags.FLAGS.verbosity >= 1
  except (AttributeError, flags.Error):
    return False


def _guarded(main):
  @functools.wraps(main)
  def wrapper(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      code = exit_code_of(e)
      if code is None or _traceback_wanted():
        raise
      print(f"error: {message_of(e)}", file=sys.stderr, flush=True)
      return code
  return wrapper


def log(message: str) -> None:
  """Status lines of the library (its ``log=`` argument): warnings to
  stderr, the rest to stdout."""
  stream = sys.stderr if message.startswith("warning:") else sys.stdout
  print(message, file=stream, flush=True)


# --- flag validators (run while absl parses) -------------------------------


def _fmt(x: float) -> str:
  return format(x, "g")


def _range_text(low, high, low_open, high_open) -> str:
  if low is not None and high is not None:
    return (f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}"
            f"{')' if high_open else ']'}")
  if low is not None:
    return f"{'>' if low_open else '>='} {_fmt(low)}"
  if high is not None:
    return f"{'<' if high_open else '<='} {_fmt(high)}"
  return "finite"


def in_range(x, low=None, high=None, low_open=False, high_open=False) -> bool:
  """``x`` is a finite number within the bounds."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return False
  if not math.isfinite(x):
    return False
  if low is not None and (x < low or (low_open and x == low)):
    return False
  if high is not None and (x > high or (high_open and x == high)):
    return False
  return True


def number(name: str, low=None, high=None, *, low_open: bool = False,
           high_open: bool = False, optional: bool = False,
           hint: str = "") -> None:
  """Validates flag ``--name``: a finite number in the bounds (None allowed
  when ``optional``)."""
  message = (f"must be {_range_text(low, high, low_open, high_open)}"
             + (" (or unset)" if optional else "")
             + (f"; {hint}" if hint else ""))
  flags.register_validator(
      name, lambda v: (v is None and optional) or in_range(
          v, low, high, low_open, high_open), message=message)


def parse_budget(text: str) -> tuple[str, float]:
  """``'0.47'`` / ``'flops:0.47'`` / ``'params:0.5'`` -> (metric, fraction),
  the rules of `legr_jax.methods.Budget`; raises ValueError."""
  s = str(text).strip()
  metric, _, value = s.rpartition(":")
  metric = metric or "flops"
  if metric not in BUDGET_METRICS:
    raise ValueError(f"budget {s!r}: the metric must be flops, params or "
                     "latency (flops:0.47, params:0.5, latency:0.5, or just "
                     "0.47 for FLOPs)")
  try:
    fraction = float(value)
  except ValueError:
    raise ValueError(f"budget {s!r}: expected a fraction such as 0.47, "
                     "flops:0.47 or params:0.5") from None
  if not in_range(fraction, 0, 1, low_open=True):
    raise ValueError(f"budget {s!r}: a fraction in (0, 1] of the unpruned "
                     "network's cost, e.g. 0.47")
  return metric, fraction


def budget_list(name: str) -> None:
  """Validates list flag ``--name``: one or more budgets (`parse_budget`)."""
  def check(values):
    if not values:
      raise flags.ValidationError("give at least one budget, e.g. 0.47,0.7")
    for v in values:
      try:
        parse_budget(v)
      except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True
  flags.register_validator(name, check)


def number_list(name: str, low=None, high=None, *, integer: bool = False,
                low_open: bool = False, nonempty: bool = True) -> None:
  """Validates list flag ``--name``: numbers (integers) in the bounds."""
  what = "integers" if integer else "numbers"
  def check(values):
    if nonempty and not values:
      raise flags.ValidationError("give at least one value")
    for v in values:
      try:
        x = int(v) if integer else float(v)
      except ValueError:
        raise flags.ValidationError(f"{v!r} is not a number; give "
                                    f"comma-separated {what}") from None
      if not in_range(x, low, high, low_open):
        raise flags.ValidationError(
            f"{v} is not {_range_text(low, high, low_open, False)}")
    return True
  flags.register_validator(name, check)


def json_dict(name: str) -> None:
  """Validates flag ``--name``: a JSON object, e.g. '{"shortcut": "B"}'."""
  def check(value):
    try:
      d = json.loads(value)
    except ValueError as e:
      raise flags.ValidationError(
          f"not valid JSON ({e}); give an object such as "
          "'{\"shortcut\": \"B\"}'") from None
    if not isinstance(d, dict):
      raise flags.ValidationError("must be a JSON object such as "
                                  "'{\"shortcut\": \"B\"}'")
    return True
  flags.register_validator(name, check)


def dataset_name(name: str, optional: bool = False) -> None:
  """Validates flag ``--name``: a `legr_jax.data.get_dataset` name."""
  def check(value):
    if value is None and optional:
      return True
    if value in DATASETS:
      return True
    for p in DATASET_PREFIXES:
      if str(value).startswith(p) and len(value) > len(p):
        return True
    raise flags.ValidationError(
        f"unknown data set; known: {', '.join(DATASETS)}, npz:PATH (arrays "
        "x, y), cifar_dir:PATH (CIFAR python batches)")
  flags.register_validator(name, check)


def distinct_paths(names: Iterable[str]) -> None:
  """Validates that the path flags ``names`` (if set) name different
  folders."""
  names = list(names)
  def check(d):
    seen = {}
    for n in names:
      p = d[n]
      if p is None:
        continue
      key = os.path.realpath(os.path.expanduser(p))
      if key in seen:
        raise flags.ValidationError(
            f"--{seen[key]} and --{n} name the same folder {p}; every "
            "experiment writes only its own --workdir")
      seen[key] = n
    return True
  flags.register_multi_flags_validator(names, check)


def require(names: Iterable[str], check: Callable[[dict], bool],
            message: str) -> None:
  """Validates a relation between the flags ``names``."""
  flags.register_multi_flags_validator(list(names), check, message=message)


# --- input files (before JAX) ----------------------------------------------


def read_json(path: str, fix: str) -> Any:
  """The JSON document in ``path``; `UserError` naming it (with ``fix``,
  what to do) when it is missing or not valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} is missing: {fix}") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is damaged (not valid JSON: {e}): {fix}"
                    ) from None


def check_dataset_files(dataset: str | None, flag: str = "--dataset") -> None:
  """A ``npz:PATH`` / ``cifar_dir:PATH`` data set's file or folder exists."""
  if dataset is None:
    return
  if dataset.startswith("npz:"):
    path = dataset[len("npz:"):]
    if not os.path.exists(path):
      raise UserError(f"{flag}={dataset}: {path} does not exist; give an "
                      ".npz file with arrays x (images) and y (labels)")
    if not os.path.isfile(path):
      raise UserError(f"{flag}={dataset}: {path} is not a file; give an "
                      ".npz file with arrays x (images) and y (labels)")
  elif dataset.startswith("cifar_dir:"):
    path = dataset[len("cifar_dir:"):]
    if not os.path.isdir(path):
      raise UserError(f"{flag}={dataset}: {path} is not a folder; give the "
                      "extracted cifar-10-batches-py (or cifar-100-python)")


TRAIN_HINT = ("pass the --workdir of an experiments.train run "
              "(python -m experiments.train --workdir=...)")


def check_train_workdir(path: str, flag: str = "--checkpoint"
                        ) -> tuple[dict, dict]:
  """``path`` is an experiments.train workdir with checkpoints; returns its
  (config.json, net.json) documents. `UserError` naming the flag, the file
  and what to do otherwise."""
  if not os.path.exists(path):
    raise UserError(f"{flag}={path} does not exist: {TRAIN_HINT}")
  if not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file, not a folder: {TRAIN_HINT}")
  has = lambda f: os.path.exists(os.path.join(path, f))  # noqa: E731
  if not has("config.json"):
    what = ("a LeGR search (experiments.learn_ranking)"
            if has("search_config.json") else
            "a pruned family (experiments.prune)" if has("summary.json") else
            "a comparison (experiments.compare)" if has("baseline") else
            None)
    raise UserError(
        f"{flag}={path} is not an experiments.train workdir (it has no "
        f"config.json{'; it holds ' + what if what else ''}): {TRAIN_HINT}")
  rerun = ("rerun the training into a new workdir (or with --overwrite) to "
           "rewrite it")
  config = read_json(os.path.join(path, "config.json"), rerun)
  net = read_json(os.path.join(path, "net.json"), rerun)
  if not isinstance(config, dict) or not isinstance(net, dict):
    raise UserError(f"{path}: config.json / net.json are not the files "
                    f"experiments.train writes: {rerun}")
  ckpt = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt) or not any(
      e.isdigit() for e in os.listdir(ckpt)):
    raise UserError(f"{flag}={path} has no checkpoint yet ({ckpt}): finish "
                    "its training first (rerun the same experiments.train "
                    "command to resume it)")
  return config, net


def check_output_workdir(path: str, flag: str = "--workdir") -> None:
  """``path`` is a folder or does not exist yet (it is not a file)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={path} is a file; give a folder (it is "
                    "created if missing)")


def check_run_config(workdir: str, name: str) -> None:
  """A run file ``name`` already in ``workdir`` is readable JSON (a damaged
  one is refused here; --overwrite replaces it)."""
  path = os.path.join(workdir, name)
  if os.path.exists(path) and not flags.FLAGS["overwrite"].value:
    read_json(path, "pass --overwrite to delete that run and start over, or "
              "choose another --workdir")


# --- after JAX ---------------------------------------------------------------


def start_process() -> str:
  """Call first thing in ``main``, before JAX's first computation: returns
  the effective ``cpu_kernels`` setting (flag, or ``LEGR_CPU_KERNELS``) and,
  unless it is 'off', keeps freed host memory in the process
  (`legr_jax.cpu.malloc_tuning`)."""
  from legr_jax import ops  # pylint: disable=g-import-not-at-top
  try:
    setting = ops.effective_setting(CPU_KERNELS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if setting != "off":
    from legr_jax.cpu import malloc_tuning  # pylint: disable=g-import-not-at-top
    malloc_tuning.retain_freed_memory()
  return setting


def check_train_runs(workdirs, config, fix: str) -> None:
  """Each of ``workdirs`` that holds an experiments.train run (config.json)
  holds one of ``config`` (a `TrainConfig`; None: nothing to check), up to
  operational fields: a conflict is refused now, read only, not when the
  work reaches it. ``fix``: what to do."""
  if config is None:
    return
  from legr_jax import train  # pylint: disable=g-import-not-at-top
  for wd in workdirs:
    path = os.path.join(wd, "config.json")
    if not os.path.exists(path):
      continue
    try:
      old = train.TrainConfig.from_dict(read_json(path, fix))
    except (TypeError, ValueError) as e:
      raise UserError(f"{path} is damaged ({e}): {fix}") from None
    diff = train.differences(old, config)
    if diff:
      raise UserError(
          f"{wd} holds a different training run ("
          + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
          + f"): {fix}")


def protected_floor(spec, safeguard: float, metric: str,
                    round_to: int = 1) -> tuple[int, int]:
  """(cost, unpruned cost) of the cheapest network the safeguard allows:
  every group at ``max(1, ceil(safeguard * C_g))`` channels (rounded up to
  whole units of ``round_to`` in groups it divides), exactly as
  `legr_jax.ranking.masks_for_budget` protects them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from legr_jax.methods import budget as budget_lib  # pylint: disable=g-import-not-at-top
  keep = budget_lib.protected_counts(spec, safeguard)
  sizes = budget_lib.sizes(spec)
  if round_to > 1:
    unit = np.where(sizes % round_to == 0, round_to, 1)
    keep = -(-keep // unit) * unit
  return (budget_lib.cost_of_counts(spec, keep, metric),
          budget_lib.cost_of_counts(spec, sizes, metric))


def check_budgets_reachable(spec, budgets, safeguard: float, flag: str,
                            safeguard_flag: str = "--safeguard",
                            round_to: int = 1) -> None:
  """Every budget (``(metric, fraction)`` or `Budget`) is at or above the
  safeguard floor (`protected_floor`), compared exactly as the methods do
  (cost <= floor(fraction * unpruned)); `UserError` naming the flags and
  the smallest reachable fraction otherwise."""
  for b in budgets:
    metric, fraction = ((b.metric, b.fraction) if hasattr(b, "metric")
                        else b)
    if metric == "latency":   # met by measurement (family), not by a floor
      continue
    low, total = protected_floor(spec, safeguard, metric, round_to)
    if low > math.floor(fraction * total):
      raise UserError(
          f"{flag}: a {metric} budget of {_fmt(fraction)} is below "
          f"{low / total:.4g}, the smallest {metric} fraction this network "
          f"reaches with {safeguard_flag}={_fmt(safeguard)} (every group "
          f"keeps max(1, ceil({_fmt(safeguard)} * its channels))"
          f"{f', in units of {round_to}' if round_to > 1 else ''}); raise "
          f"the budget or lower {safeguard_flag}")


def lock_workdir(workdir: str, job: str, primary: bool = True):
  """The held `legr_jax.workdir.WorkdirLock` of ``workdir`` for ``job``
  (release it, or use it as a context manager); only ``primary`` (process
  0) holds it."""
  from legr_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  return workdir_lib.WorkdirLock(workdir, job, primary=primary).acquire()


# --- fine-tuning flags -----------------------------------------------------


def define_finetune_flags(epochs_default: int = 40) -> None:
  """The fine-tuning recipe's flags (LeGR's: Nesterov SGD, lr 0.01, x0.2 at
  30/60/80% of the epochs), shared by experiments.prune and compare."""
  flags.DEFINE_integer("epochs", epochs_default, "Fine-tuning epochs per "
                       "pruned network (0: no fine-tuning, evaluate right "
                       "after pruning).")
  flags.DEFINE_float("lr", 0.01, "Fine-tuning learning rate (LeGR: 0.01, "
                     "Nesterov, x0.2 at 30/60/80%).")
  flags.DEFINE_integer("batch_size", 128, "Fine-tuning batch size.")
  flags.DEFINE_enum("finetune_mode", "auto", ["auto", "parallel",
                                               "sequential"],
                    "How a family's members are fine-tuned: 'parallel' "
                    "(all at once, masked full-size networks batched with "
                    "vmap over the local devices), 'sequential' (sliced "
                    "networks one after another), 'auto': sequential on CPU, "
                    "parallel on GPU/TPU (legr_jax.family).")
  number("epochs", 0)
  number("lr", 0, low_open=True)
  number("batch_size", 1)


def finetune_config(base_config, cpu_kernels: str, seed: int | None = None):
  """The fine-tuning `TrainConfig` from the baseline's and the flags above
  (None when --epochs=0)."""
  f = flags.FLAGS
  if f.epochs <= 0:
    return None
  kw = {} if seed is None else {"seed": seed}
  return base_config.replace(epochs=f.epochs, lr=f.lr, nesterov=True,
                             schedule="multistep", milestones=(0.3, 0.6, 0.8),
                             gamma=0.2, warmup_epochs=0.0,
                             batch_size=f.batch_size, cpu_kernels=cpu_kernels,
                             **kw)
