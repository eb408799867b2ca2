"""XLA compile options of legr_jax's own compiled functions.

On CPU: XLA's FAST_COMPILE preset, which also runs faster here (with the
default preset XLA fused the chain of residual additions into the transposes
feeding the weight-gradient convolutions, recomputing it per element:
ResNet-56 train step at 47% FLOPs 2.26 s -> 1.03 s), and convolutions kept
off YNNPACK, so XLA's Eigen convolutions run them (32 -> 32 channels at
16x16, 256 images: 12.5 -> 6.8 ms; 64 -> 64 at 8x8: 12.2 -> 6.7 ms), which
also lets `models.conv_packing` fill 32 lanes. Accelerators: XLA's defaults.
Measured on a 2-core AVX-512 CPU with jax 0.10.2 (benchmarks/).
"""

from __future__ import annotations

from legr_jax.models import conv_packing

CPU = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE",
       **conv_packing.NO_YNN_CONVS}


def for_devices(devices) -> dict | None:
  """`CPU` when every device is a CPU, else None (XLA's defaults)."""
  devices = list(devices)
  if devices and all(d.platform == "cpu" for d in devices):
    return dict(CPU)
  return None
