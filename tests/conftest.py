"""Shared test set-up: the model list and small, fast input shapes."""

import jax
import numpy as np
import pytest

from legr_jax import models

# Every model at a shape that keeps the tests quick; resnet50's native 224x224
# is replaced by 32x32 (its spec and costs follow input_shape).
TEST_SHAPES = {name: (32, 32, 3) for name in models.known_models()}
TEST_SHAPES["cnn_small"] = (8, 8, 1)
# The whole zoo, and the models the parametrized tests run: one per kind of
# block and width pattern. resnet32 and resnet110 are resnet20's / resnet56's
# blocks at other depths (the same convs, shapes, groups and shortcuts);
# test_models checks their structure and costs against a closed form, and
# leaving them out of every other parametrization keeps CI under 20 minutes.
ZOO = tuple(models.known_models())
ALL_MODELS = tuple(m for m in ZOO if m not in ("resnet32", "resnet110"))


def build(name, **kwargs):
  return models.get(name, num_classes=10, input_shape=TEST_SHAPES[name],
                    **kwargs)


def check_within_one_channel(spec, masks, budget):
  """The budget contract of every method: cost at most floor(fraction *
  unpruned), and one more channel of any group would not fit."""
  from legr_jax.methods import budget as B  # pylint: disable=g-import-not-at-top
  counts = B.counts_of(spec, masks)
  got = B.cost_of_counts(spec, counts, budget.metric)
  limit = B.threshold(spec, budget)
  assert got <= limit, (budget, got, limit)
  marginal = B.marginal_costs(spec, counts, budget.metric)
  # one more channel of some group would not fit: the slack is below it
  assert limit - got < marginal.max(), (budget, limit - got, marginal.max())


def random_masks(spec, seed, keep_prob=0.6):
  """Random 0/1 masks keeping at least one channel per group."""
  rng = np.random.default_rng(seed)
  masks = {}
  for g in spec.groups:
    m = (rng.random(g.size) < keep_prob).astype(np.float32)
    m[rng.integers(g.size)] = 1.0
    masks[g.name] = jax.numpy.asarray(m)
  return masks


def perturbed_variables(net, seed):
  """init() with random BN statistics and affine terms (non-trivial BN)."""
  variables = net.init(jax.random.key(seed))
  leaves, tree = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    key = jax.tree_util.keystr(path)
    if leaf.ndim == 1 and "bn" in key:
      if "var" in key:
        leaf = leaf * rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
      elif "scale" in key:
        leaf = leaf * rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
      else:
        leaf = leaf + rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    out.append(jax.numpy.asarray(leaf))
  return jax.tree_util.tree_unflatten(tree, out)


def numpy_variables(net, seed):
  """Random variables of ``net`` drawn in numpy (shapes from eval_shape):
  He-scaled kernels, non-trivial BN (like conftest's perturbed_variables)
  without compiling an init."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    key = jax.tree_util.keystr(path)
    if "kernel" in key:
      std = np.sqrt(2.0 / max(1, int(np.prod(s.shape[:-1]))))
      return (rng.normal(size=s.shape) * std).astype(np.float32)
    if "var" in key:
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if "scale" in key:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(
      one, jax.eval_shape(net.init, jax.random.key(0)))


@pytest.fixture(params=ALL_MODELS)
def model_name(request):
  return request.param


# The edit loop (`pytest -m "not slow"`) runs the light models only; CI runs
# everything.
HEAVY_MODELS = frozenset(ALL_MODELS) - {"cnn_small", "resnet20"}


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(isinstance(v, str) and v in HEAVY_MODELS for v in params.values()):
      item.add_marker(pytest.mark.slow)
