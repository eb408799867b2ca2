"""XLA:CPU compile options of legr_jax's own jits (used by `legr_jax.cpu.ops`).

`CPU`: XLA's FAST_COMPILE preset (it also runs our training steps faster:
the default preset fuses the residual-add chain into the transposes that
feed the weight-gradient convs and recomputes it per element) and convs
kept off YNNPACK (`NO_YNN_CONVS`), so XLA's Eigen convs run them, which were
faster at our widths and let `conv_packing` fill 32 lanes. Figures:
benchmarks/RESULTS.md.
"""

from __future__ import annotations

# Keeps convolutions off YNNPACK (XLA's Eigen convs then run them all).
NO_YNN_CONVS = {"xla_cpu_experimental_ynn_fusion_type": ""}

CPU = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE", **NO_YNN_CONVS}
