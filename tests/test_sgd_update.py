"""legr_jax.cpu.sgd_update: the one-call SGD update (C++ kernel and its
jax.numpy twin) equals optax's `optim.make_optimizer` update, and the sliced
search step built on it equals `train_step` with optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kernel_support import require_kernels
from legr_jax import models
from legr_jax.cpu import sgd_update
from legr_jax.search import fitness
from legr_jax.train import optim
from legr_jax.train import step as step_lib

HYPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def _tree(rng):
  # > 2^16 elements in all: the kernel splits the work over threads, with a
  # split point inside an array
  return {"conv": rng.normal(size=(3, 3, 5, 7)).astype(np.float32),
          "big": {"w": rng.normal(size=(70001,)).astype(np.float32),
                  "b": rng.normal(size=(1,)).astype(np.float32)}}


@pytest.mark.parametrize("cpu_kernel", [True, False])
@pytest.mark.parametrize("donate", [False, True])
def test_update_equals_optax(cpu_kernel, donate):
  if cpu_kernel:
    require_kernels()   # skip without a compiler; fail if the build does
  rng = np.random.default_rng(0)
  params = _tree(rng)
  opt = optim.make_optimizer(HYPER["lr"], momentum=HYPER["momentum"],
                             weight_decay=HYPER["weight_decay"])

  @jax.jit
  def reference(p, g, s):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  ours = jax.jit(lambda p, g, v: sgd_update.sgd_update(
      p, g, v, cpu_kernel=cpu_kernel, **HYPER),
                 donate_argnums=(0, 2) if donate else ())
  ref_p, ref_s = params, opt.init(params)
  p, v = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.zeros_like,
                                                           params)
  for _ in range(4):
    g = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                     params)
    ref_p, ref_s = reference(ref_p, g, ref_s)
    p, v = ours(p, g, v)
    trace = ref_s[1][0].trace   # chain(add_decayed_weights, sgd(trace, lr))
    for a, b in zip(jax.tree.leaves(p) + jax.tree.leaves(v),
                    jax.tree.leaves(ref_p) + jax.tree.leaves(trace)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(p) == jax.tree.structure(params)


def test_update_rejects_mismatched_shapes():
  p = {"a": jnp.ones((3,))}
  with pytest.raises(ValueError, match="shapes differ"):
    sgd_update.sgd_update(p, {"a": jnp.ones((4,))}, p, **HYPER)


def test_sliced_step_equals_train_step_with_optax():
  net = models.get("cnn_small", num_classes=10, input_shape=(8, 8, 1))
  variables = net.init(jax.random.key(0))
  masks = {g.name: np.ones((g.size,), np.float32) for g in net.spec.groups}
  cfg = fitness.FitnessConfig(lr=0.05)
  state, step = fitness.sliced_sgd(net, variables, masks, cfg)
  opt = fitness.make_optimizer(cfg)
  ref = step_lib.init_train_state(net, 0, opt, variables)
  ref_step = jax.jit(lambda s, b: step_lib.train_step(net, opt, s, b, None))
  rng = np.random.default_rng(1)
  mean, inv_std = np.float32([0.5]), np.float32([4.0])
  for _ in range(3):
    x = rng.integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    y = rng.integers(0, 10, size=(16,)).astype(np.int32)
    state = step(state, x, y, mean, inv_std)
    ref, _ = ref_step(ref, {"image": (x.astype(np.float32) - mean) * inv_std,
                            "label": y})
  for a, b in zip(jax.tree.leaves(state.variables),
                  jax.tree.leaves(ref.variables)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 3
  # moved away from the start: the steps did something
  assert not np.allclose(jax.tree.leaves(state.params)[0],
                         jax.tree.leaves(variables["params"])[0])
