"""Building and loading legr_jax's C++ kernels for XLA:CPU (XLA FFI).

The kernels (``csrc/direct_conv.cc``: 3x3 convolutions;
``csrc/channel_sums.cc``: BatchNorm's per-channel sums;
``csrc/sgd_update.cc``: the SGD update of every parameter in one call;
shared ``csrc/ffi_tasks.h``) are compiled together into one shared library
on first use and cached under ``LEGR_KERNEL_CACHE`` (default
``~/.cache/legr_jax/kernels``), keyed by the sources, the JAX version, the
compiler, the flags and the CPU's flags. The sources are found next to this
module (package data), never through a git checkout.

Compiler (`compiler`): ``CXX`` if set (empty or ``none``: no compiler; a
``CXX`` that does not resolve is no compiler either, with no fallback),
else ``g++``, ``c++``, ``clang++``. Target: ``-march=native``, so the
kernels use the host's vector width (`target_isa`: AVX-512 16 floats,
AVX/AVX2 8, otherwise 4; see ``csrc/direct_conv.cc``).

No compiler or a failed build: `load` returns why (and logs one warning),
`available` is False, and callers use XLA's own ops. Where a failure is a
bug rather than a missing tool (x86-64 with a compiler), `expected` is True
(the tests then fail instead of skipping).

Other flags, for tests and benchmarks (e.g. an AVX2 build on an AVX-512
machine): call ``use_flags("-mno-avx512f")`` in a fresh process before
anything loads the kernels; `build` takes them directly (``extra_flags``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import jax

_HERE = pathlib.Path(__file__).parent / "csrc"
SOURCES = (_HERE / "direct_conv.cc", _HERE / "channel_sums.cc",
           _HERE / "sgd_update.cc")
HEADERS = (_HERE / "ffi_tasks.h",)
# FFI target name -> exported handler symbol
TARGETS = {
    "legr_direct_conv3x3_forward": "LegrConv3x3Forward",
    "legr_direct_conv3x3_kernel_grad": "LegrConv3x3KernelGrad",
    "legr_channel_moments": "LegrChannelMoments",
    "legr_centered_sums": "LegrCenteredSums",
    "legr_sgd_update": "LegrSgdUpdate",
}
# Flags every build gets; `extra_flags` come after them (so a later
# ``-march=...`` or ``-mno-...`` overrides ``-march=native``).
ARCH_FLAGS = ("-march=native",)
FLAGS = ("-O3", *ARCH_FLAGS, "-fPIC", "-std=c++17")
# `target_isa` -> floats per vector of direct_conv.cc's kernels.
LANES = {"avx512": 16, "avx2": 8, "avx": 8, "neon": 4, "generic": 4}

# Extra flags of the library `load` builds (`use_flags`).
_flags: tuple[str, ...] = ()


def cache_dir() -> pathlib.Path:
  env = os.environ.get("LEGR_KERNEL_CACHE")
  if env:
    return pathlib.Path(env)
  return pathlib.Path.home() / ".cache" / "legr_jax" / "kernels"


def compiler() -> str | None:
  """The C++ compiler to build with (its full path), or None.

  ``CXX`` set: empty or ``none`` (any case) means no compiler; otherwise
  it is used if it resolves on PATH (or is a path to an executable), else
  None (no fallback to another compiler). ``CXX`` unset: the first of
  ``g++``, ``c++``, ``clang++`` found."""
  env = os.environ.get("CXX")
  if env is not None:
    env = env.strip()
    if not env or env.lower() == "none":
      return None
    return shutil.which(env)
  for name in ("g++", "c++", "clang++"):
    path = shutil.which(name)
    if path:
      return path
  return None


def expected() -> bool:
  """True where the kernels must build: an x86-64 machine with a C++
  compiler (then a build failure is a bug, and a test failure)."""
  return (platform.machine().lower() in ("x86_64", "amd64")
          and compiler() is not None)


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor()


def _resolve(cxx: str | None) -> str:
  cxx = cxx or compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
  return cxx


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
  try:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  except OSError as e:  # not executable, vanished
    raise RuntimeError(f"cannot run the C++ compiler {cmd[0]}: {e}") from e


def predefined_macros(cxx: str | None = None,
                      extra_flags: Sequence[str] = ()) -> dict[str, str]:
  """The preprocessor macros the compiler predefines for a kernel build
  with ``extra_flags`` (``-dM -E``): name -> value. RuntimeError with the
  compiler's output when there is no compiler or it fails."""
  cxx = _resolve(cxx)
  proc = _run([cxx, *ARCH_FLAGS, *extra_flags, "-std=c++17", "-x", "c++",
               "-dM", "-E", "-"], input="")
  if proc.returncode != 0:
    raise RuntimeError(f"{cxx} {' '.join(extra_flags)} -dM -E failed:\n"
                       f"{proc.stderr}")
  macros = {}
  for line in proc.stdout.splitlines():
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[0] == "#define":
      macros[parts[1]] = parts[2] if len(parts) == 3 else ""
  return macros


def target_isa(cxx: str | None = None,
               extra_flags: Sequence[str] = ()) -> str:
  """The vector instruction set a kernel build with ``extra_flags`` targets:
  'avx512' (``__AVX512F__``), 'avx2', 'avx', 'neon' (aarch64) or 'generic'
  (e.g. SSE2-only x86-64); `LANES` gives the vector width of each.
  RuntimeError where there is no compiler."""
  macros = predefined_macros(cxx, extra_flags)
  for macro, isa in (("__AVX512F__", "avx512"), ("__AVX2__", "avx2"),
                     ("__AVX__", "avx")):
    if macro in macros:
      return isa
  if "__aarch64__" in macros and "__ARM_NEON" in macros:
    return "neon"
  return "generic"


def build(cxx: str | None = None,
          extra_flags: Sequence[str] = ()) -> pathlib.Path:
  """Compiles the kernels with ``extra_flags`` after the usual flags (or
  reuses the cached build of the same sources, compiler and flags);
  returns the shared library's path. Raises RuntimeError with the
  compiler's output."""
  cxx = _resolve(cxx)
  extra_flags = tuple(extra_flags)
  version = _run([cxx, "--version"]).stdout
  flags = [*FLAGS, *extra_flags]
  # Include paths stay out of the key (the headers' content is in it via
  # the sources and the JAX version), so every checkout shares one build.
  # XLA's headers are system headers: their warnings are not ours.
  includes = [f"-I{_HERE}", "-isystem", str(jax.ffi.include_dir())]
  key = hashlib.sha256("\0".join(
      [p.read_text() for p in SOURCES + HEADERS]
      + [jax.__version__, cxx, version, " ".join(flags), platform.machine(),
         _cpu_flags()]).encode()).hexdigest()[:16]
  target = cache_dir() / f"legr_kernels-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target, then rename: concurrent builders never see a
  # half-written library. The sources compile in parallel, then link.
  work = tempfile.mkdtemp(prefix="build-", dir=target.parent)
  try:
    objects = [os.path.join(work, f"{src.stem}.o") for src in SOURCES]
    procs = []
    try:
      for src, obj in zip(SOURCES, objects):
        procs.append(subprocess.Popen(
            [cxx, *flags, "-c", *includes, str(src), "-o", obj],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    except OSError as e:
      for proc in procs:
        proc.kill()
        proc.wait()
      raise RuntimeError(f"cannot run the C++ compiler {cxx}: {e}") from e
    logs = [proc.communicate()[0] for proc in procs]
    failed = [log for proc, log in zip(procs, logs) if proc.returncode != 0]
    tmp = os.path.join(work, target.name)
    if not failed:
      link = _run([cxx, *flags, "-shared", *objects, "-o", tmp])
      if link.returncode != 0:
        failed = [link.stderr + link.stdout]
    if failed:
      raise RuntimeError(
          f"building legr_jax's C++ kernels failed ({cxx} "
          f"{' '.join(flags)}):\n" + "".join(dict.fromkeys(failed)))
    if any(log.strip() for log in logs):
      logging.debug("legr_jax: C++ kernel build warnings:\n%s",
                    "".join(logs))
    os.replace(tmp, target)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return target


def use_flags(*extra_flags: str) -> None:
  """Makes `load` build with ``extra_flags`` (e.g. ``"-mno-avx512f"`` for
  an AVX2 build on an AVX-512 CPU, ``"-march=x86-64"`` for a generic one).
  XLA registers each FFI target once per process, so call this in a fresh
  process before anything loads the kernels; RuntimeError if they are
  already loaded with other flags."""
  global _flags
  extra_flags = tuple(extra_flags)
  if extra_flags != _flags and load.cache_info().currsize:
    raise RuntimeError("legr_jax's C++ kernels are already loaded with "
                       f"flags {_flags}; call use_flags() first")
  _flags = extra_flags


def flags() -> tuple[str, ...]:
  """The extra flags `load` builds with (`use_flags`; default none)."""
  return _flags


@functools.lru_cache(maxsize=None)
def load() -> str | None:
  """Builds (with `use_flags`' flags) and registers every kernel once; None
  if that worked, else why (logged once as a warning)."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(build(extra_flags=_flags)))
    for name, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(
          name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    # Any failure (compiler, loader, FFI registration) falls back to XLA.
    logging.warning("legr_jax: C++ CPU kernels unavailable, XLA's own ops "
                    "are used instead (%s)", e)
    return str(e)
  return None


def available() -> bool:
  """True when kernels may be used: CPU backend and the library built and
  registered (built on the first call)."""
  if jax.default_backend() != "cpu":
    return False
  return load() is None


def require(what: str) -> None:
  """Raises RuntimeError (saying why) when the kernels cannot be loaded."""
  why = load()
  if why is not None:
    raise RuntimeError(f"legr_jax {what} kernel unavailable: {why}; check "
                       "available() first")
