"""legr_jax.gates: the soft-gate cost (exact for 0/1 gates, gradients against
finite differences in float64) and train_step's Extra hook (the plain step
unchanged; extra parameters trained beside or instead of the network's)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import enable_x64  # jax.experimental.enable_x64 in jax < 0.9
from jax.test_util import check_grads

from conftest import build, numpy_variables, random_masks
from legr_jax import cost, gates
from legr_jax.train import step as step_lib


@pytest.mark.parametrize("model_name", ["cnn_small", "resnet20",
                                        "mobilenetv2"])
@pytest.mark.parametrize("metric", ["flops", "params"])
def test_cost_fraction_is_exact_for_binary_gates(model_name, metric):
  spec = build(model_name).spec
  masks = random_masks(spec, 3)
  want = (float(getattr(cost, metric)(spec, masks))
          / cost.unpruned(spec, metric))
  got = float(gates.cost_fraction(spec, masks, metric))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(gates.cost_fraction(spec, spec.full_masks(), metric)) == \
      pytest.approx(1.0, rel=1e-6)


def _soft_gates(spec, seed):
  rng = np.random.default_rng(seed)
  return {g.name: jnp.asarray(rng.uniform(0.05, 0.95, g.size), jnp.float64)
          for g in spec.groups}


@pytest.mark.parametrize("model_name", ["cnn_small", "resnet20",
                                        "mobilenetv2"])
@pytest.mark.parametrize("penalty", ["squared", "hinge", "squared_hinge"])
def test_regularizer_gradient_matches_finite_differences(model_name,
                                                         penalty):
  spec = build(model_name).spec
  with enable_x64():
    g0 = _soft_gates(spec, 0)
    f0 = float(gates.cost_fraction(spec, g0))
    assert gates.cost_fraction(spec, g0).dtype == jnp.float64
    # away from the hinge's kink: the target is well below the fraction
    target = f0 - 0.1

    def reg(g):
      return gates.budget_penalty(gates.cost_fraction(spec, g, "flops"),
                                  target, penalty)
    check_grads(reg, (g0,), order=1, modes=("rev",), eps=1e-4, atol=1e-7,
                rtol=1e-6)
    check_grads(lambda g: gates.cost_fraction(spec, g, "params"), (g0,),
                order=2, modes=("rev",), eps=1e-4, atol=1e-7, rtol=1e-6)
    # and the gradient is not trivially zero
    grad = jax.grad(reg)(g0)
    assert all(float(jnp.abs(v).max()) > 0 for v in grad.values())
  # below the target the hinges are off, the squared form pulls up
  with enable_x64():
    g1 = {k: v * 0.1 for k, v in _soft_gates(spec, 1).items()}

    def reg_low(g):
      return gates.budget_penalty(gates.cost_fraction(spec, g), 0.9, penalty)
    grad = jax.grad(reg_low)(g1)
    top = max(float(jnp.abs(v).max()) for v in grad.values())
    if penalty == "squared":
      assert all(float(v.max()) < 0 for v in grad.values())
    else:
      assert top == 0.0


@pytest.fixture(scope="module")
def small():
  net = build("cnn_small")
  variables = numpy_variables(net, 0)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  opt = optax.sgd(0.1, momentum=0.9)
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=opt.init(variables["params"]),
      rng=step_lib.raw_key(0))
  return net, opt, state, batch


def test_extra_hook_with_fixed_masks_equals_the_plain_step(small):
  net, opt, state, batch = small
  masks = random_masks(net.spec, 0)
  plain, m_plain = jax.jit(lambda s, b: step_lib.train_step(
      net, opt, s, b, masks))(state, batch)
  extra = step_lib.Extra(optimizer=optax.sgd(0.1),
                         masks_fn=lambda p, params, step: masks)
  es = step_lib.init_extra_state(extra, {"unused": jnp.zeros(3)})
  hooked, es2, m_hooked = jax.jit(lambda s, e, b: step_lib.train_step(
      net, opt, s, b, None, extra=extra, extra_state=e))(state, es, batch)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(hooked)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                               atol=1e-7)
  np.testing.assert_allclose(m_plain["loss"], m_hooked["loss"], rtol=1e-6)
  np.testing.assert_array_equal(es2.params["unused"], np.zeros(3))
  with pytest.raises(ValueError, match="both"):
    step_lib.train_step(net, opt, state, batch, None, extra=extra)


def test_extra_hook_trains_gates_instead_of_weights(small):
  net, opt, state, batch = small
  spec = net.spec
  init = {g.name.replace("/", "|"): jnp.full((g.size,), 2.0)
          for g in spec.groups}

  def masks_fn(p, params, step):
    return {g.name: jax.nn.sigmoid(p[g.name.replace("/", "|")])
            for g in spec.groups}

  def loss_fn(p, params, masks, step):
    f = gates.cost_fraction(spec, masks)
    return 5.0 * gates.budget_penalty(f, 0.3), {"cost_fraction": f}

  extra = step_lib.Extra(optimizer=optax.adam(0.1), masks_fn=masks_fn,
                         loss_fn=loss_fn, train_params=False, bn_train=False)
  es = step_lib.init_extra_state(extra, init)
  fn = jax.jit(lambda s, e, b: step_lib.train_step(
      net, opt, s, b, None, extra=extra, extra_state=e))
  s, e = state, es
  fractions = []
  for _ in range(5):
    s, e, m = fn(s, e, batch)
    fractions.append(float(m["cost_fraction"]))
  assert int(s.step) == 5
  # the network (weights, BN statistics) is untouched, the gates moved
  for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                  jax.tree.leaves((s.params, s.batch_stats))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert fractions[-1] < fractions[0]
  assert "extra_loss" in m and float(m["extra_loss"]) > 0
  # train_params=True: the weights move too
  extra2 = step_lib.Extra(optimizer=optax.adam(0.1), masks_fn=masks_fn,
                          loss_fn=loss_fn)
  s2, _, _ = jax.jit(lambda s, e, b: step_lib.train_step(
      net, opt, s, b, None, extra=extra2, extra_state=e))(state, es, batch)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(s2.params)))
