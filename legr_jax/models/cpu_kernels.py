"""Building and loading legr_jax's C++ kernels for XLA:CPU (XLA FFI).

The kernels (`direct_conv.cc`: 3x3 convolutions; `channel_sums.cc`:
BatchNorm's per-channel sums; `../train/sgd_update.cc`: the SGD update of
every parameter in one call; shared `ffi_tasks.h`) are compiled together
into one shared library on first use with the C++ compiler (``CXX``, else
``g++``/``c++``) for the host CPU (``-march=native``) and cached under
``LEGR_KERNEL_CACHE`` (default ``~/.cache/legr_jax/kernels``), keyed by the
sources, the JAX version, the compiler and the CPU's flags. No compiler or a
failed build: `load` returns why (one warning), and callers use XLA's own
ops. Each kernel family also has its own off switch (an environment
variable, see `available`).
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

import jax

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "direct_conv.cc", _HERE / "channel_sums.cc",
           _HERE.parent / "train" / "sgd_update.cc")
HEADERS = (_HERE / "ffi_tasks.h",)
# FFI target name -> exported handler symbol
TARGETS = {
    "legr_direct_conv3x3_forward": "LegrConv3x3Forward",
    "legr_direct_conv3x3_kernel_grad": "LegrConv3x3KernelGrad",
    "legr_channel_moments": "LegrChannelMoments",
    "legr_centered_sums": "LegrCenteredSums",
    "legr_sgd_update": "LegrSgdUpdate",
}


def cache_dir() -> pathlib.Path:
  env = os.environ.get("LEGR_KERNEL_CACHE")
  if env:
    return pathlib.Path(env)
  return pathlib.Path.home() / ".cache" / "legr_jax" / "kernels"


def compiler() -> str | None:
  """The C++ compiler to build with, or None."""
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return line
  except OSError:
    pass
  return platform.processor()


def build(cxx: str | None = None) -> pathlib.Path:
  """Compiles the kernels (or reuses the cached build); returns the shared
  library's path. Raises RuntimeError with the compiler's output."""
  cxx = cxx or compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
  version = subprocess.run([cxx, "--version"], capture_output=True,
                           text=True).stdout
  flags = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-w"]
  # Include paths stay out of the key (the headers' content is in it via
  # the sources and the JAX version), so every checkout shares one build.
  includes = [f"-I{_HERE}", f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256("\0".join(
      [p.read_text() for p in SOURCES + HEADERS]
      + [jax.__version__, version, " ".join(flags), platform.machine(),
         _cpu_flags()]).encode()).hexdigest()[:16]
  target = cache_dir() / f"legr_kernels-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target, then rename: concurrent builders never see a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    proc = subprocess.run([cxx, *flags, *includes, *map(str, SOURCES), "-o",
                           tmp],
                          capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"building legr_jax's C++ kernels failed:\n"
                         f"{proc.stderr}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


@functools.lru_cache(maxsize=None)
def load() -> str | None:
  """Builds and registers every kernel once; None if that worked, else
  why."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for name, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(
          name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    # Any failure (compiler, loader, FFI registration) falls back to XLA.
    logging.warning("legr_jax: C++ CPU kernels unavailable, XLA's own ops "
                    "are used instead (%s)", e)
    return str(e)
  return None


def available(switch: str) -> bool:
  """True when kernels may be used: CPU backend, the environment variable
  ``switch`` not '0', and the library built and registered (built on the
  first call)."""
  if os.environ.get(switch, "1") == "0":
    return False
  if jax.default_backend() != "cpu":
    return False
  return load() is None


def require(what: str) -> None:
  """Raises RuntimeError (saying why) when the kernels cannot be loaded."""
  why = load()
  if why is not None:
    raise RuntimeError(f"legr_jax {what} kernel unavailable: {why}; check "
                       "available() first")
