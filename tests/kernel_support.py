"""Test support for legr_jax's C++ CPU kernels (legr_jax.cpu.kernels).

`require_kernels`: skip where the kernels legitimately cannot exist (no C++
compiler, not x86-64, not the CPU backend), fail with the build error
everywhere else. `check_build`: the numerical checks a kernel build must
pass against XLA / NumPy, run in a fresh process for builds with other
flags (tests/test_cpu_kernels.py).
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from legr_jax.cpu import kernels

REPO = pathlib.Path(__file__).resolve().parent.parent


def require_kernels() -> None:
  """Skips the calling test where there is no C++ compiler, the machine is
  not x86-64 (and the kernels did not load) or JAX's backend is not the CPU;
  on x86-64 with a compiler a load/build failure FAILS it, with the
  compiler's output."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() != "cpu":
    pytest.skip(f"the C++ kernels are for XLA:CPU (backend: "
                f"{jax.default_backend()})")
  if kernels.compiler() is None:
    pytest.skip("no C++ compiler on this machine (CXX / g++ / c++ / "
                "clang++)")
  why = kernels.load()
  if why is None:
    return
  if kernels.expected():
    pytest.fail(f"legr_jax's C++ kernels failed to build or load on this "
                f"x86-64 machine with a C++ compiler:\n{why}",
                pytrace=False)
  pytest.skip(f"C++ kernels unavailable on {platform.machine()}: {why}")


def run_python(code: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter at the repository root (tests/ on
  sys.path) with ``env`` added to the environment."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  full_env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO), str(REPO / "tests")]
      + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
  return subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=full_env, cwd=REPO, timeout=timeout)


def _loaded_libraries() -> list[str]:
  with open("/proc/self/maps") as f:
    return sorted({line.split()[-1] for line in f
                   if "legr_kernels-" in line})


def check_build(extra_flags: tuple[str, ...], isas: tuple[str, ...]) -> None:
  """In a fresh process: loads the kernels built with ``extra_flags`` and
  checks that the build targets one of ``isas``, that it is the library
  loaded, and every kernel against XLA (3x3 conv forward, input and kernel
  gradients), float64 NumPy (channel moments, centered sums) and the
  jax.numpy SGD formula (bit for bit where the build has FMA, like XLA)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from legr_jax.cpu import channel_sums, direct_conv, sgd_update

  kernels.use_flags(*extra_flags)
  why = kernels.load()
  assert why is None, why
  assert kernels.available()
  isa = kernels.target_isa(extra_flags=extra_flags)
  assert isa in isas, (isa, isas)
  libs = _loaded_libraries()
  assert len(libs) == 1 and libs[0] == str(
      kernels.build(extra_flags=extra_flags)), libs
  assert pathlib.Path(libs[0]).parent == kernels.cache_dir(), libs
  print("ISA", isa, kernels.LANES[isa])

  dn = ("NHWC", "HWIO", "NHWC")

  def ref(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=dn)

  # partial channel blocks (forward 6, gradient 3), rows shorter / longer
  # than a vector block, several stacked-image chunks, all-padding taps
  for n, h, w, cin, cout in [(3, 9, 9, 5, 7), (2, 16, 16, 16, 2),
                             (37, 8, 8, 64, 46), (5, 2, 9, 7, 13),
                             (1, 1, 1, 1, 1), (2, 3, 40, 3, 8)]:
    rng = np.random.default_rng(n * 1000 + cin * 10 + cout)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(n, h, w, cout)), jnp.float32)
    y = jax.jit(direct_conv.forward)(x, k)
    gx = jax.jit(direct_conv.input_grad)(g, k)
    gk = jax.jit(direct_conv.kernel_grad)(x, g)
    ry, (rx, rk) = ref(x, k), jax.vjp(ref, x, k)[1](g)
    np.testing.assert_allclose(y, ry, rtol=1e-5,
                               atol=1e-5 * np.sqrt(9 * cin))
    np.testing.assert_allclose(gx, rx, rtol=1e-5,
                               atol=1e-5 * np.sqrt(9 * cout))
    np.testing.assert_allclose(gk, rk, rtol=1e-5,
                               atol=1e-5 * np.sqrt(n * h * w))
    # the custom VJP wires the same kernels
    vx, vk = jax.jit(lambda x, k, g: jax.vjp(direct_conv.conv3x3, x, k)[1](
        g))(x, k, g)
    np.testing.assert_array_equal(vx, gx)
    np.testing.assert_array_equal(vk, gk)

  for shape in [(128, 32, 32, 2), (37, 8, 8, 64), (5, 3, 7, 1), (3, 5)]:
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(size=shape) * 0.5 + 3).astype(np.float32)
    dy = (rng.normal(size=shape) * 0.5 + 0.2).astype(np.float32)
    c = shape[-1]
    mean, var = jax.jit(channel_sums.moments)(x)
    x64, d64 = (a.astype(np.float64).reshape(-1, c) for a in (x, dy))
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-5)
    shift = np.linspace(2.5, 3.5, c).astype(np.float32)
    inv = np.linspace(0.5, 2.0, c).astype(np.float32)
    s_dy, s_dyx = jax.jit(channel_sums.centered_sums)(dy, x, shift, inv)
    np.testing.assert_allclose(s_dy, d64.sum(0), rtol=1e-6)
    np.testing.assert_allclose(
        s_dyx, (d64 * (x64 - shift) * inv).sum(0), rtol=1e-5,
        atol=1e-6 * np.abs(d64 * x64).sum(0).max())

  hyper = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
  rng = np.random.default_rng(0)
  # > 2^16 elements: split over threads, a split point inside an array
  params = {"conv": rng.normal(size=(3, 3, 5, 7)).astype(np.float32),
            "w": rng.normal(size=(70001,)).astype(np.float32),
            "b": rng.normal(size=(1,)).astype(np.float32)}
  grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                       params)
  trace = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                       params)

  def formula(p, g, v):
    u = g + hyper["weight_decay"] * p
    v = u + hyper["momentum"] * v
    return p + (-hyper["lr"]) * v, v

  ref = jax.jit(lambda p, g, v: {key: formula(p[key], g[key], v[key])
                                  for key in p})(params, grads, trace)
  ref_p = {key: r[0] for key, r in ref.items()}
  ref_v = {key: r[1] for key, r in ref.items()}
  new_p, new_v = jax.jit(lambda p, g, v: sgd_update.sgd_update(
      p, g, v, cpu_kernel=True, **hyper))(params, grads, trace)
  hlo = jax.jit(lambda p, g, v: sgd_update.sgd_update(
      p, g, v, cpu_kernel=True, **hyper)).lower(params, grads,
                                                trace).as_text()
  assert "legr_sgd_update" in hlo
  fma = "__FMA__" in kernels.predefined_macros(extra_flags=extra_flags)
  for a, b in zip(jax.tree.leaves((new_p, new_v)),
                  jax.tree.leaves((ref_p, ref_v))):
    if fma:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # XLA contracts to FMA on this CPU, the build cannot
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  print("CHECKED", " ".join(extra_flags) or "native")
