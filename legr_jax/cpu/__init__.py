"""The CPU backend: XLA:CPU fast paths behind one `legr_jax.ops.Ops`.

* `conv_packing`: narrow convs computed as wider ones (output packing).
* `direct_conv`: 3x3 stride-1 convs as a C++ FFI kernel.
* `batchnorm`: BatchNorm with per-channel sums laid out for XLA:CPU, or one
  pass in C++ (`channel_sums`).
* `sgd_update`: the search's momentum-SGD update in one C++ call.
* `compile_options`: XLA:CPU options of our jits; `malloc_tuning`: glibc
  settings the experiment scripts apply first thing.
* `kernels`: builds the C++ sources (`csrc/`) on first use, for what the
  compiler targets (AVX-512, AVX2, or portable vectors), cached.

`ops` assembles them. Users normally get it through
``legr_jax.ops.resolve(cpu_kernels)``; the rule for what 'auto' uses on
which CPU is `packing_lanes`'s and `ops`'s docstrings.
"""

from __future__ import annotations

import functools
import os
import platform
import re

from legr_jax import ops as ops_lib
from legr_jax.cpu import batchnorm, compile_options, conv_packing, kernels
from legr_jax.cpu import sgd_update as sgd_update_lib

KERNEL_MODES = ("auto", "required", "never")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def xla_isa() -> str:
  """The widest x86 vector ISA XLA:CPU compiles for here: 'avx512', 'avx2'
  or 'other' (not x86-64, or older). Honours ``--xla_cpu_max_isa`` in
  ``XLA_FLAGS``."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return "other"
  flags = _cpu_flags()
  isa = ("avx512" if "avx512f" in flags else
         "avx2" if "avx2" in flags else "other")
  m = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  if m:
    cap = m.group(1).upper()
    if cap.startswith("AVX512"):
      pass
    elif cap.startswith("AVX2") and isa == "avx512":
      isa = "avx2"
    elif not cap.startswith(("AVX512", "AVX2")):
      isa = "other"
  return isa


def kernel_isa() -> str:
  """What the C++ kernels are (or would be) built for here: 'avx512',
  'avx2', 'avx', 'neon', 'generic'; 'none' without a compiler."""
  try:
    return kernels.target_isa(extra_flags=kernels.flags())
  except RuntimeError:
    return "none"


def packing_lanes(compiler_options: dict | None = None,
                  isa: str | None = None) -> int:
  """Output-packing width (`conv_packing`) that pays on this CPU; 0: off.

  The rule, measured (benchmarks/RESULTS.md): with convs kept off YNNPACK
  (`compile_options.CPU`, what `ops` compiles with) 32 on AVX-512 and 16 on
  AVX2 (32 there nearly doubled the SGD step); without it 16 on AVX-512
  (wider convs go to YNNPACK, where packing does not pay) and 0 on AVX2
  (not measured). Other CPUs (aarch64, pre-AVX2 x86): 0, not measured.
  ``isa``: `xla_isa()`'s answer (default: asked).
  """
  isa = isa or xla_isa()
  opts = compiler_options or {}
  no_ynn = opts.get("xla_cpu_experimental_ynn_fusion_type", None) == ""
  if isa == "avx512":
    return 32 if no_ynn else 16
  if isa == "avx2":
    return 16 if no_ynn else 0
  return 0


@functools.lru_cache(maxsize=None)
def ops(use_kernels: str = "auto", lanes: int | None = None,
        direct_conv: bool = True, channel_sums: bool = True,
        sgd_kernel: bool = True) -> ops_lib.Ops:
  """The CPU `Ops`: `compile_options.CPU`, output packing to ``lanes``
  (default `packing_lanes`), and where the C++ kernels are available the
  direct 3x3 convs, one-pass BatchNorm sums and one-call SGD update (each
  may be turned off, e.g. by benchmarks).

  use_kernels: 'auto' (use them where they build; a failed build logs one
    warning and XLA's own ops are used), 'required' (RuntimeError naming
    why they are unavailable) or 'never'.
  """
  if use_kernels not in KERNEL_MODES:
    raise ValueError(f"use_kernels must be one of {KERNEL_MODES}, got "
                     f"{use_kernels!r}")
  have = False
  if use_kernels != "never":
    have = kernels.available()
    if use_kernels == "required" and not have:
      raise RuntimeError(
          "cpu_kernels='on' but legr_jax's C++ CPU kernels are unavailable ("
          f"{kernels.load() or 'not a CPU backend'}); install a "
          "C++ compiler (g++) or use cpu_kernels='auto' or 'off'")
  options = dict(compile_options.CPU)
  lanes = packing_lanes(options) if lanes is None else int(lanes)
  direct = have and direct_conv
  sums = have and channel_sums
  parts = [f"lanes={lanes}"] + [n for n, on in (("direct_conv", direct),
                                                ("channel_sums", sums),
                                                ("sgd_kernel",
                                                 have and sgd_kernel)) if on]
  return ops_lib.Ops(
      name="cpu(" + ",".join(parts) + ")",
      conv=conv_packing.conv_fn(lanes, direct),
      train_conv=conv_packing.train_conv_fn(lanes, direct),
      batch_norm=_batch_norm_class(sums),
      sgd_update=(_kernel_sgd_update if have and sgd_kernel
                  else ops_lib.sgd_momentum_update),
      compiler_options=tuple(sorted(options.items())))


@functools.lru_cache(maxsize=None)
def _batch_norm_class(cpu_kernel: bool):
  return functools.partial(batchnorm.BatchNorm, cpu_kernel=cpu_kernel)


def _kernel_sgd_update(params, grads, trace, *, lr, momentum, weight_decay):
  return sgd_update_lib.sgd_update(params, grads, trace, lr=lr,
                                   momentum=momentum,
                                   weight_decay=weight_decay, cpu_kernel=True)


__all__ = ["KERNEL_MODES", "kernel_isa", "ops", "packing_lanes", "xla_isa"]
