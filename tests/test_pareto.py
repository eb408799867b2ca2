"""Pareto set: front selection and orbax round trip of sliced networks."""

import os

import jax
import numpy as np
import pytest

from conftest import perturbed_variables, random_masks
from legr_jax import models, pareto, surgery


def test_front_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(20):
    c = rng.integers(0, 6, 12).astype(float)
    a = rng.integers(0, 6, 12).astype(float)
    expect = [not any((c[j] <= c[i] and a[j] >= a[i]) and
                      (c[j] < c[i] or a[j] > a[i]) for j in range(12))
              for i in range(12)]
    np.testing.assert_array_equal(pareto.pareto_front(c, a), expect)


@pytest.mark.slow
def test_save_load_round_trip_and_refuse_overwrite(tmp_path):
  net = models.get("resnet20", input_shape=(8, 8, 3))
  variables = perturbed_variables(net, 0)
  members = []
  for i, keep in enumerate((0.4, 0.8)):
    masks = random_masks(net.spec, i, keep_prob=keep)
    small, small_vars = surgery.slice_network(net, variables, masks)
    members.append(pareto.Member(
        f"m{i}", small.config, small_vars,
        {"flops": float(i + 1), "val_accuracy": 0.5 + 0.1 * i}))
  d = str(tmp_path / "set")
  index = pareto.save(d, members)
  assert [m["pareto_optimal"] for m in index["members"]] == [True, True]
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  loaded = pareto.load(d)
  assert len(loaded) == 2
  for (net2, vars2, metrics), m in zip(loaded, members):
    assert metrics == m.metrics
    small = models.from_config(m.net_config)
    np.testing.assert_allclose(net2.apply(vars2, x),
                               small.apply(m.variables, x), atol=1e-6)
  with pytest.raises(FileExistsError, match="overwrite"):
    pareto.save(d, members)
  with open(os.path.join(d, pareto.INDEX), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    pareto.load(d)


def test_missing_set_and_bad_names(tmp_path):
  with pytest.raises(FileNotFoundError, match="experiments.prune"):
    pareto.load(str(tmp_path))
  net = models.get("cnn_small")
  m = pareto.Member("../x", net.config, net.init(jax.random.key(0)),
                    {"flops": 1.0, "val_accuracy": 1.0})
  with pytest.raises(ValueError, match="plain file name"):
    pareto.save(str(tmp_path / "s"), [m])
