"""Physical surgery: sliced network == masked network."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build, perturbed_variables, random_masks
from legr_jax import models, surgery


def test_sliced_logits_equal_masked_logits(model_name):
  seed = sum(map(ord, model_name))
  net = build(model_name)
  variables = perturbed_variables(net, seed)
  masks = random_masks(net.spec, seed + 10)
  x = jax.random.normal(jax.random.key(seed), (4,) + net.input_shape)
  masked = jax.jit(lambda v, x: net.apply(v, x, masks))(variables, x)
  small, small_vars = surgery.slice_network(net, variables, masks)
  sliced = jax.jit(lambda v, x: small.apply(v, x))(small_vars, x)
  assert float(jnp.std(masked)) > 1e-3  # the comparison is not vacuous
  np.testing.assert_allclose(sliced, masked, atol=1e-4, rtol=1e-4)
  # the small network is dense: every group at its kept width
  for g in small.spec.groups:
    assert g.size == int(np.sum(np.asarray(masks[g.name])))


def test_config_rebuilds_without_the_original():
  net = build("resnet20")
  variables = perturbed_variables(net, 0)
  masks = random_masks(net.spec, 3)
  small, small_vars = surgery.slice_network(net, variables, masks)
  config = json.loads(json.dumps(small.config))
  rebuilt = models.from_config(config)
  assert rebuilt.spec == small.spec
  x = jax.random.normal(jax.random.key(0), (2,) + net.input_shape)
  np.testing.assert_allclose(
      jax.jit(rebuilt.apply)(small_vars, x),
      jax.jit(lambda v, x: net.apply(v, x, masks))(variables, x), atol=1e-4)


def test_slicing_twice_composes():
  net = build("resnet20")
  variables = perturbed_variables(net, 0)
  m1 = random_masks(net.spec, 1, keep_prob=0.8)
  small, small_vars = surgery.slice_network(net, variables, m1)
  m2 = random_masks(small.spec, 2, keep_prob=0.8)
  smaller, smaller_vars = surgery.slice_network(small, small_vars, m2)
  x = jax.random.normal(jax.random.key(0), (2,) + net.input_shape)
  np.testing.assert_allclose(
      jax.jit(smaller.apply)(smaller_vars, x),
      jax.jit(lambda v, x: small.apply(v, x, m2))(small_vars, x), atol=1e-4)


def test_soft_or_empty_masks_are_refused():
  net = build("resnet20")
  variables = net.init(jax.random.key(0))
  masks = net.spec.full_masks()
  with pytest.raises(ValueError, match="not 0/1"):
    surgery.slice_network(net, variables, dict(masks,
                                               stem=masks["stem"] * 0.5))
  with pytest.raises(ValueError, match="every channel of group 'stem'"):
    surgery.slice_network(net, variables, dict(masks,
                                               stem=masks["stem"] * 0))


def test_embedding_trained_slices_back_is_the_inverse_of_slicing(model_name):
  seed = sum(map(ord, model_name)) + 1
  net = build(model_name)
  variables = jax.device_get(perturbed_variables(net, seed))
  masks = random_masks(net.spec, seed + 20)
  keep = surgery.kept_channels(net.spec, masks)
  _, _, small = surgery.slice_arrays(net.spec, variables, keep)
  # embedding the unchanged slices gives the original variables back
  same = surgery.embed_arrays(net.spec, variables, small, keep)
  jax.tree.map(np.testing.assert_array_equal, same,
               {"params": variables["params"],
                "batch_stats": variables["batch_stats"]})
  # "trained" slices: every entry changed
  rng = np.random.default_rng(seed)
  trained = jax.tree.map(
      lambda a: (a * rng.uniform(0.9, 1.1, a.shape)
                 + rng.uniform(1e-3, 2e-3, a.shape)).astype(a.dtype), small)
  full = surgery.embed_arrays(net.spec, variables, trained, keep)
  _, _, back = surgery.slice_arrays(net.spec, full, keep)
  jax.tree.map(np.testing.assert_array_equal, back, trained)
  # only the kept entries were written: putting the original slices back
  # restores the original variables exactly
  restored = surgery.embed_arrays(net.spec, full, small, keep)
  jax.tree.map(np.testing.assert_array_equal, restored,
               {"params": variables["params"],
                "batch_stats": variables["batch_stats"]})
  # the masked full network runs the trained small one (eval mode)
  small_net, _ = surgery.slice_network(net, variables, masks)
  x = jax.random.normal(jax.random.key(seed), (3,) + net.input_shape)
  want = jax.jit(small_net.apply)(jax.tree.map(jnp.asarray, trained), x)
  got = jax.jit(lambda v, x: net.apply(v, x, masks))(full, x)
  assert float(jnp.std(want)) > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
