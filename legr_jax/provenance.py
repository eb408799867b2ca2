"""What a run ran on: versions, source commit, accelerator and CPU.

`collect()` returns a JSON-serializable dict; `write(workdir)` stores it as
``WORKDIR/provenance.json`` (atomically) so that every result can be traced
to the code and hardware that produced it:

  legr_jax_version   legr_jax.__version__
  git_commit         HEAD of the git checkout this package was imported
                     from; None when it was not imported from a checkout
                     (an installed wheel, a copied tree) or git is missing
  git_dirty          tracked files differ from HEAD (None without a commit)
  python             platform.python_version()
  packages           installed versions of jax, jaxlib, flax, optax,
                     orbax-checkpoint, chex, numpy (None: not installed)
  jax_backend        the devices' platform ("cpu", "gpu", "tpu")
  device_kind        sorted distinct device kinds ("cpu", "NVIDIA H200", ...)
  device_count       number of devices (of `devices`, else jax.devices())
  process_count      jax.process_count() (hosts of a multi-host run)
  cpu_model          /proc/cpuinfo's "model name", else the platform's answer
  cpu_count          os.cpu_count()
  machine            platform.machine() ("x86_64", "aarch64", "arm64")
  cpu_isa            {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile",
                     "neon", "sve"}: True / False, None when unknown
  env                the LEGR_* / XLA_* / JAX_* environment variables
  created_utc        ISO-8601 time of the call

Cheap and without side effects beyond reading: no jax computation, git runs
as a subprocess with a short timeout. It does ask jax for its devices (which
initializes jax's backends if nothing has yet): in a multi-host run call it
after `jax.distributed.initialize`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
from typing import Any, Mapping, Sequence

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex",
            "numpy")
# /proc/cpuinfo flag -> key (x86 "flags", aarch64 "Features")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "neon",
             "sve")
ENV_PREFIXES = ("LEGR_", "XLA_", "JAX_")
GIT_TIMEOUT_S = 5.0

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def _git(args: Sequence[str], cwd: pathlib.Path) -> str | None:
  """stdout of `git ARGS` in cwd, or None on any failure."""
  try:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True,
        timeout=GIT_TIMEOUT_S, check=False,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip()


def git_state(package_dir: os.PathLike | str | None = None
              ) -> tuple[str | None, bool | None]:
  """(commit, dirty) of the checkout that holds the package, or (None, None).

  The package's own __init__.py must be tracked there: a copy of the package
  (or a wheel installed in a virtualenv) that merely lies inside some other
  git work tree is not "imported from a checkout".
  """
  pkg = pathlib.Path(package_dir) if package_dir else _PACKAGE_DIR
  if not (pkg / "__init__.py").is_file():
    return None, None
  # GIT_OPTIONAL_LOCKS=0: `git status` does not rewrite the index.
  if _git(["ls-files", "--error-unmatch", "--", "__init__.py"], pkg) is None:
    return None, None
  commit = _git(["rev-parse", "--verify", "HEAD"], pkg)
  if not commit:
    return None, None
  status = _git(["status", "--porcelain", "--untracked-files=no"], pkg)
  return commit, (None if status is None else bool(status))


def _package_versions() -> dict[str, str | None]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _cpuinfo() -> dict[str, str]:
  """First value of each key of /proc/cpuinfo ({} where there is none)."""
  info: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        key, sep, value = line.partition(":")
        if sep:
          info.setdefault(key.strip().lower(), value.strip())
  except OSError:
    pass
  return info


def _sysctl(name: str) -> str | None:
  if sys.platform != "darwin":
    return None
  try:
    out = subprocess.run(["sysctl", "-n", name], capture_output=True,
                         text=True, timeout=GIT_TIMEOUT_S, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return None
  return out.stdout.strip() or None


def _cpu(machine: str) -> tuple[str | None, dict[str, bool | None]]:
  info = _cpuinfo()
  model = (info.get("model name") or _sysctl("machdep.cpu.brand_string")
           or platform.processor() or None)
  arm = machine.lower() in ("aarch64", "arm64") or machine.lower().startswith(
      "armv8")
  flags_line = info.get("flags") or info.get("features")
  if flags_line is not None:
    flags = set(flags_line.lower().split())
    isa: dict[str, bool | None] = {f: f in flags for f in ISA_FLAGS}
    # aarch64 Linux calls Advanced SIMD (NEON) "asimd"
    isa["neon"] = "neon" in flags or "asimd" in flags
  elif arm:
    # AArch64 mandates Advanced SIMD; the rest is unknown without cpuinfo
    isa = {f: None for f in ISA_FLAGS}
    isa.update(avx2=False, fma=None, avx512f=False, avx512_bf16=False,
               amx_tile=None, neon=True)
  else:
    isa = {f: None for f in ISA_FLAGS}
  return model, isa


def _devices(devices) -> dict[str, Any]:
  try:
    import jax  # pylint: disable=import-outside-toplevel
    devs = list(jax.devices()) if devices is None else list(devices)
    process_count = jax.process_count()
  except Exception as e:  # pylint: disable=broad-except
    # no jax, or no backend could start: record why instead of failing a run
    return {"jax_backend": None, "device_kind": None, "device_count": None,
            "process_count": None, "jax_error": f"{type(e).__name__}: {e}"}
  platforms = sorted({str(d.platform) for d in devs})
  return {
      # one platform in practice; a mixed list is recorded as "cpu,gpu"
      "jax_backend": ",".join(platforms) or None,
      "device_kind": sorted({str(d.device_kind) for d in devs}),
      "device_count": len(devs),
      "process_count": process_count,
  }


def collect(devices: Sequence[Any] | None = None) -> dict[str, Any]:
  """The provenance record of this process (see the module docstring).

  Args:
    devices: the jax devices the run uses; default all of jax.devices().
  """
  from legr_jax import __version__  # pylint: disable=import-outside-toplevel
  commit, dirty = git_state()
  machine = platform.machine()
  cpu_model, isa = _cpu(machine)
  record: dict[str, Any] = {
      "legr_jax_version": __version__,
      "git_commit": commit,
      "git_dirty": dirty,
      "python": platform.python_version(),
      "packages": _package_versions(),
  }
  record.update(_devices(devices))
  record.update({
      "cpu_model": cpu_model,
      "cpu_count": os.cpu_count(),
      "machine": machine,
      "cpu_isa": isa,
      "env": {k: v for k, v in sorted(os.environ.items())
              if k.startswith(ENV_PREFIXES)},
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  })
  return record


def write(workdir: os.PathLike | str, name: str = "provenance.json",
          extra: Mapping[str, Any] | None = None,
          devices: Sequence[Any] | None = None) -> dict[str, Any]:
  """Writes `collect(devices)` (updated with `extra`) to WORKDIR/NAME.

  The file is replaced atomically (temporary file + os.replace); the
  directory is created if needed. Values of `extra` that JSON cannot encode
  are stored as their str(). Returns the record written.
  """
  record = collect(devices)
  if extra:
    record.update(extra)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f".{name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, workdir / name)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  return record


SESSIONS = "provenance.jsonl"


def record_session(workdir: os.PathLike | str,
                   extra: Mapping[str, Any] | None = None,
                   devices: Sequence[Any] | None = None) -> dict[str, Any]:
  """Appends `collect(devices)` (updated with `extra`) as one JSON line to
  WORKDIR/provenance.jsonl: one line per session of a resumable job (a
  resume on another machine adds its own line). Returns the record."""
  record = collect(devices)
  if extra:
    record.update(extra)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / SESSIONS, "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
  return record
