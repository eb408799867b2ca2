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


def define_finetune_flags(epochs_default: int = 40) -> None:
  """The fine-tuning recipe's flags (LeGR's: Nesterov SGD, lr 0.01, x0.2 at
  30/60/80% of the epochs), shared by experiments.prune and compare."""
  flags.DEFINE_integer("epochs", epochs_default, "Fine-tuning epochs per "
                       "pruned network (0: no fine-tuning, evaluate right "
                       "after pruning).")
  flags.DEFINE_float("lr", 0.01, "Fine-tuning learning rate (LeGR: 0.01, "
                     "Nesterov, x0.2 at 30/60/80%).")
  flags.DEFINE_integer("batch_size", 128, "Fine-tuning batch size.")


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
