"""legr_jax.ops: the one switch (cpu_kernels) and the injected `Ops`.

The CPU fast paths must change how things are computed, never what: a
network computed with `legr_jax.cpu.ops` gives XLA's logits and gradients.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_MODELS, build, perturbed_variables, random_masks

from legr_jax import cpu, models, ops, surgery, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_models_default_to_plain_xla_ops():
  net = models.get("resnet20", num_classes=10, input_shape=(8, 8, 3))
  assert net.ops is ops.XLA
  jaxpr = str(jax.make_jaxpr(lambda v, x: net.apply(v, x, train=True))(
      net.init(jax.random.key(0)), jnp.zeros((2, 8, 8, 3))))
  # flax's BatchNorm and lax's convs: no custom VJPs, no FFI calls
  assert "custom_vjp" not in jaxpr and "ffi" not in jaxpr
  assert "window_strides=(1, 1)" in jaxpr


def test_resolve_settings_and_environment_override(monkeypatch):
  monkeypatch.delenv(ops.ENV, raising=False)
  assert ops.resolve("off") is ops.XLA
  fast = ops.resolve("auto")
  assert fast is not ops.XLA and fast.name.startswith("cpu(")
  assert fast.jit_options()["xla_cpu_opt_preset"].endswith("FAST_COMPILE")
  assert ops.resolve("auto") is fast      # cached: compiled code is reused
  monkeypatch.setenv(ops.ENV, "off")
  assert ops.resolve("auto") is ops.XLA
  monkeypatch.setenv(ops.ENV, "sometimes")
  with pytest.raises(ValueError, match="LEGR_CPU_KERNELS='sometimes'"):
    ops.resolve("auto")
  monkeypatch.delenv(ops.ENV)
  with pytest.raises(ValueError, match="cpu_kernels must be one of"):
    ops.resolve("fast")
  with pytest.raises(ValueError, match="cpu_kernels must be one of"):
    train.TrainConfig(cpu_kernels="fast")


def test_non_cpu_devices_get_xla_ops():
  class FakeGpu:
    platform = "gpu"
  assert ops.resolve("on", devices=[FakeGpu()]) is ops.XLA


def test_cpu_kernels_is_an_operational_setting():
  a = train.TrainConfig(cpu_kernels="on")
  b = train.TrainConfig(cpu_kernels="off")
  assert train.differences(a, b) == {}
  assert json.loads(a.to_json())["cpu_kernels"] == "on"
  assert train.differences(a, b.replace(lr=0.5)) == {"lr": (0.1, 0.5)}


def test_sgd_momentum_update_equals_optax_optimizer():
  opt = train.make_optimizer(0.05, momentum=0.9, weight_decay=1e-3)
  rng = np.random.default_rng(0)
  p = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  state = opt.init(p)
  trace = jax.tree.map(jnp.zeros_like, p)
  ours = p
  for _ in range(3):
    g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape),
                                           jnp.float32), p)
    updates, state = opt.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    ours, trace = ops.sgd_momentum_update(ours, g, trace, lr=0.05,
                                          momentum=0.9, weight_decay=1e-3)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _max_rel_err(a, b):
  """Largest |a - b| of any leaf, relative to that leaf's largest |b|."""
  return max(float(np.max(np.abs(np.asarray(u, np.float64) - w)))
             / (float(np.max(np.abs(w))) + 1e-6)
             for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# resnet32/56/110 are resnet20's blocks at other depths (the same convs,
# shapes and BatchNorms): leaving them out keeps CI's time; every block type
# (basic, bottleneck, VGG, inverted residual + depthwise) is covered.
_OPS_MODELS = tuple(m for m in ALL_MODELS
                    if m not in ("resnet32", "resnet56", "resnet110"))


@pytest.mark.parametrize("model_name", _OPS_MODELS)
def test_cpu_ops_give_xla_results(model_name):
  """Sliced (narrow convs: packing and kernels engage) network: eval logits,
  gradients and training-mode batch statistics, CPU ops vs XLA ops; and
  training-mode gradients for the shallow models. In deep or narrow ones at
  batch 8 (ResNet-110, MobileNetV2) float32 training gradients differ from
  float64 ones by 1-14% with flax's own BatchNorm as with ours, depending
  on the seed (rounding flips ReLU kinks, BatchNorm over few values
  amplifies them), so no two float32 implementations agree there."""
  # 16x16 images: every kind of conv the fast paths take, at a quarter of
  # the 32x32 cost
  net = (build(model_name) if model_name == "cnn_small" else
         models.get(model_name, num_classes=10, input_shape=(16, 16, 3)))
  variables = perturbed_variables(net, 1)
  masks = random_masks(net.spec, 2, keep_prob=0.4)
  small, small_vars = surgery.slice_network(net, variables, masks)
  x = jax.random.normal(jax.random.key(3), (8,) + net.input_shape)

  train_grads_compared = model_name in ("cnn_small", "resnet20", "vgg16")

  def run(variant):
    n = small.with_ops(variant)

    def loss(v, train):
      out = n.apply(v, x, train=train)
      return jnp.mean(jnp.sin(out[0] if train else out)), (
          out[1] if train else None)
    opts = variant.jit_options()
    logits = jax.jit(lambda v: n.apply(v, x), compiler_options=opts)(
        small_vars)
    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1,
                   compiler_options=opts)
    eval_grads, _ = grad(small_vars, False)
    if train_grads_compared:
      train_grads, stats = grad(small_vars, True)
      return logits, eval_grads["params"], stats, train_grads["params"]
    # (the deep ones' training gradients are not compared: no compile)
    stats = jax.jit(lambda v: n.apply(v, x, train=True)[1],
                    compiler_options=opts)(small_vars)
    return logits, eval_grads["params"], stats, None

  fast, plain = run(ops.resolve("auto")), run(ops.XLA)
  np.testing.assert_allclose(fast[0], plain[0], rtol=2e-4, atol=2e-4)
  assert _max_rel_err(fast[1], plain[1]) < 1e-3
  for a, b in zip(jax.tree.leaves(fast[2]), jax.tree.leaves(plain[2])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
  if train_grads_compared:
    assert _max_rel_err(fast[3], plain[3]) < 1e-3


_NO_COMPILER = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    from legr_jax import ops
    from legr_jax.cpu import kernels
    assert kernels.compiler() is None, kernels.compiler()
    auto = ops.resolve("auto")
    assert "direct_conv" not in auto.name and "sgd_kernel" not in auto.name
    try:
      ops.resolve("on")
    except RuntimeError as e:
      print("ON:", e)
    else:
      sys.exit("cpu_kernels='on' without a compiler did not fail")
    print("AUTO:", auto.name)
""")


def test_without_a_compiler_auto_falls_back_and_on_fails(tmp_path):
  env = dict(os.environ, CXX="none", LEGR_KERNEL_CACHE=str(tmp_path),
             JAX_PLATFORMS="cpu")
  env.pop(ops.ENV, None)
  r = subprocess.run([sys.executable, "-c", _NO_COMPILER], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "ON: cpu_kernels='on' but legr_jax's C++ CPU kernels are " \
         "unavailable" in r.stdout
  assert "AUTO: cpu(lanes=" in r.stdout
  # one warning says why the kernels are not used
  assert r.stderr.count("C++ CPU kernels unavailable") == 1, r.stderr


def test_xla_isa_honours_the_max_isa_flag(monkeypatch):
  if cpu.xla_isa() not in ("avx512", "avx2"):
    pytest.skip("needs an x86-64 CPU with AVX2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
  assert cpu.xla_isa() == "avx2"
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=SSE4_2")
  assert cpu.xla_isa() == "other"
  assert cpu.packing_lanes({"xla_cpu_experimental_ynn_fusion_type": ""},
                           isa="avx2") == 16


def test_cpu_ops_name_lists_what_is_on():
  plain = cpu.ops(use_kernels="never", lanes=0)
  assert plain.name == "cpu(lanes=0)"
  assert plain.conv is None and plain.train_conv is None
  with pytest.raises(ValueError, match="use_kernels"):
    cpu.ops(use_kernels="maybe")


@pytest.mark.slow
def test_train_experiment_records_switch_and_provenance(tmp_path):
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={wd}",
         "--epochs=1", "--batch_size=64", "--cpu_kernels=off",
         "--noprogress"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(ops.ENV, None)
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  config = json.loads((wd / "config.json").read_text())
  assert config["cpu_kernels"] == "off"
  sessions = [json.loads(l) for l in
              (wd / "provenance.jsonl").read_text().splitlines()]
  assert len(sessions) == 1 and sessions[0]["ops"] == "xla"
  assert sessions[0]["job"] == "train" and not sessions[0]["resumed"]
  # resuming under another setting is the same run (operational field)
  r = subprocess.run(cmd[:-2] + ["--cpu_kernels=auto", "--noprogress"],
                     cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "nothing to do" in r.stdout + r.stderr
