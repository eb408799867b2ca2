"""legr_jax.export: a member as a jax.export function, run without legr_jax.

The exported module is compared with the in-process network in a fresh
subprocess that imports only jax and numpy; its StableHLO must hold none of
the CPU backend's custom calls.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax import export as jax_export

from conftest import build, numpy_variables, random_masks
from legr_jax import export, models, pareto, surgery

# Run in the subprocess: the folder's own loader, then the by-hand recipe of
# the module doc; refuses to have imported legr_jax.
CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    directory, inputs, outputs = sys.argv[1:4]
    sys.path.insert(0, directory)
    import load_exported
    f = load_exported.load(directory)
    from jax import export
    with open(directory + "/inference.jaxexport", "rb") as fh:
      exp = export.deserialize(bytearray(fh.read()))
    variables = dict(np.load(directory + "/variables.npz"))
    out = {}
    for k, x in np.load(inputs).items():
      out[k] = np.asarray(f(x))
    out["byhand"] = np.asarray(exp.call(variables, x))   # the last x
    assert "legr_jax" not in sys.modules, "the loader imported legr_jax"
    np.savez(outputs, **out)
    print("platforms", exp.platforms)
""")


def _member():
  net = build("cnn_small")
  variables = numpy_variables(net, 0)
  small, small_vars = surgery.slice_network(
      net, variables, random_masks(net.spec, 3, keep_prob=0.5))
  return pareto.Member("flops_0.5", small.config, small_vars,
                       {"flops": 1.0, "flops_fraction": 0.5,
                        "val_accuracy": 0.9})


def _custom_calls(directory):
  with open(os.path.join(directory, export.FUNCTION_FILE), "rb") as f:
    text = jax_export.deserialize(bytearray(f.read())).mlir_module()
  return set(re.findall(r"custom_call\s*@([\w.]+)", text)), text


def test_exported_member_runs_in_a_process_without_legr_jax(tmp_path):
  member = _member()
  d = str(tmp_path / "exported")
  meta = export.export(member, d)
  assert meta["batch"] == "any" and meta["name"] == "flops_0.5"
  assert {"cpu", "cuda"} <= set(meta["platforms"])
  # tpu lowers offline with this jax; if a later one refused, it is named
  assert "tpu" in set(meta["platforms"]) | set(meta["platforms_dropped"])
  with open(os.path.join(d, export.META_FILE)) as f:
    assert json.load(f)["metrics"] == member.metrics
  net = models.from_config(member.net_config)
  rng = np.random.default_rng(0)
  xs = {f"n{n}": rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
        for n in (1, 5)}                              # any batch size
  np.savez(tmp_path / "x.npz", **xs)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, "-c", CHILD, d, str(tmp_path / "x.npz"),
                      str(tmp_path / "y.npz")], cwd=str(tmp_path), env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  out = np.load(tmp_path / "y.npz")
  for k, x in xs.items():
    expect = np.asarray(jax.jit(net.apply)(member.variables, x))
    assert out[k].shape == (x.shape[0], net.num_classes)
    np.testing.assert_allclose(out[k], expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["byhand"], out["n5"], rtol=1e-6, atol=1e-6)
  # the same loader in-process
  f = export.load_exported(d)
  np.testing.assert_allclose(f(xs["n5"]), out["n5"], rtol=1e-6, atol=1e-6)


def test_exported_module_uses_plain_xla_ops_only(tmp_path):
  """Even from a network computed with the CPU backend (C++ FFI kernels
  where they build), the exported module has none of its custom calls."""
  from legr_jax import cpu  # pylint: disable=g-import-not-at-top
  from legr_jax.cpu import kernels  # pylint: disable=g-import-not-at-top
  member = _member()
  net = models.from_config(member.net_config, ops=cpu.ops("auto"))
  d = str(tmp_path / "e")
  export.export((net, member.variables), d, platforms=("cpu",))
  targets, text = _custom_calls(d)
  assert not any(t.startswith("legr") for t in targets), targets
  assert not any(t in text for t in kernels.TARGETS), targets
  # jax's own shape check of the polymorphic batch is the only custom call
  assert targets <= {"shape_assertion"}, targets
  x = np.random.default_rng(1).normal(size=(3, 8, 8, 1)).astype(np.float32)
  np.testing.assert_allclose(
      export.load_exported(d)(x),
      jax.jit(models.from_config(member.net_config).apply)(member.variables,
                                                           x),
      rtol=1e-5, atol=1e-5)


def test_fixed_batch_and_refusals(tmp_path):
  member = _member()
  d = str(tmp_path / "fixed")
  net = models.from_config(member.net_config)
  meta = export.export((net, member.variables, member.metrics), d, batch=4,
                       platforms=("cpu",))
  assert meta["batch"] == 4 and meta["platforms"] == ["cpu"]
  f = export.load_exported(d)
  x = np.ones((4, 8, 8, 1), np.float32)
  np.testing.assert_allclose(f(x), jax.jit(net.apply)(member.variables, x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception, match="shape"):
    f(np.ones((3, 8, 8, 1), np.float32))
  targets, _ = _custom_calls(d)
  assert not targets, targets                # fixed shapes: no check at all
  with pytest.raises(FileExistsError, match="overwrite"):
    export.export(member, d)
  with pytest.raises(ValueError, match="batch must be"):
    export.export(member, str(tmp_path / "b"), batch=0)
  with pytest.raises(TypeError, match="pareto.Member"):
    export.export(object(), str(tmp_path / "c"))
  path = os.path.join(d, export.META_FILE)
  with open(path) as fh:
    meta = json.load(fh)
  meta["format_version"] = 2
  with open(path, "w") as fh:
    json.dump(meta, fh)
  with pytest.raises(ValueError, match="format_version 2; this loader reads "
                     "format_version 1"):
    export.load_exported(d)


def test_export_a_picked_member(tmp_path):
  member = _member()
  pareto.save(str(tmp_path / "wd" / "pareto"), [member])
  picked = pareto.pick(str(tmp_path / "wd"), max_flops=0.6)
  d = str(tmp_path / "picked")
  assert export.export(picked, d, platforms=("cpu",))["name"] == "flops_0.5"
  x = np.zeros((2, 8, 8, 1), np.float32)
  np.testing.assert_allclose(export.load_exported(d)(x), picked.apply(x),
                             rtol=1e-5, atol=1e-5)
