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
