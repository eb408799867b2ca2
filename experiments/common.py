"""Flags and process set-up shared by the experiment scripts."""

from __future__ import annotations

from absl import app, flags

# legr_jax.ops.CPU_KERNELS, spelled out so that importing this module does
# not import JAX (learn_ranking sets XLA_FLAGS before it does).
_CPU_KERNELS = ("auto", "on", "off")

CPU_KERNELS = flags.DEFINE_enum(
    "cpu_kernels", "auto", list(_CPU_KERNELS),
    "CPU fast paths (output packing, C++ kernels, CPU compile options): "
    "'auto' uses the C++ kernels where they build, 'on' requires them, "
    "'off' runs plain XLA/flax everywhere. Operational: recorded in the "
    "workdir, a run resumes under another value. The LEGR_CPU_KERNELS "
    "environment variable overrides it.")


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
