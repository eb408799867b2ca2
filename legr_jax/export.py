"""A pruned member as a self-contained inference function (`jax.export`).

`export` writes, into one folder:

  inference.jaxexport  the eval-mode forward pass ``f(variables, x) ->
                       logits`` lowered to StableHLO and serialized by
                       `jax.export` (``Exported.serialize``), for the
                       platforms in export.json (default cpu, cuda and tpu:
                       jax lowers for all three offline, no accelerator
                       needed; one that fails to lower is dropped, with the
                       reason in export.json)
  variables.npz        its variables as separate arguments, flat names
                       ``params/conv0/conv/kernel``, ... (numpy-readable;
                       kept out of the module so it stays small and the
                       weights stay inspectable)
  export.json          format_version, platforms, batch, input shape and
                       dtype, num_classes, the member's name, net_config
                       and metrics, jax version
  load_exported.py     the loader (`LOADER_SOURCE`): imports only jax and
                       numpy

``x`` is what ``net.apply`` takes: float32 ``[N, H, W, C]``, normalized as
in training; N is any batch (``batch=None``, shape-polymorphic) or the fixed
``batch``. Logits come back float32 ``[N, num_classes]``. The function is
built from ``net.with_ops(legr_jax.ops.XLA)``: plain XLA ops only, never the
CPU backend's custom calls. Load it anywhere, without legr_jax, with a jax
at least as new as the exporting one (within jax's export compatibility
window)::

  import sys; sys.path.insert(0, DIR)
  import load_exported
  f = load_exported.load(DIR)       # or: legr_jax.export.load_exported(DIR)
  logits = f(x)

or by hand::

  import numpy as np
  from jax import export
  exp = export.deserialize(bytearray(open(DIR + "/inference.jaxexport",
                                          "rb").read()))
  variables = dict(np.load(DIR + "/variables.npz"))
  logits = exp.call(variables, x)

Serialization needs the ``flatbuffers`` package (jax imports it lazily).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax import export as jax_export

from legr_jax import models
from legr_jax import ops as ops_lib

FORMAT_VERSION = 1
FUNCTION_FILE = "inference.jaxexport"
VARIABLES_FILE = "variables.npz"
META_FILE = "export.json"
LOADER_FILE = "load_exported.py"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")

LOADER_SOURCE = '''\
"""Loads a network exported by legr_jax.export; imports only jax and numpy.

  f = load(DIRECTORY)      # DIRECTORY: the export folder
  logits = f(x)            # x: float32 [N, H, W, C], logits [N, classes]

f.exported (jax.export.Exported), f.variables and f.meta (export.json) are
attached. `python load_exported.py DIRECTORY` runs zeros through it.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

FORMAT_VERSION = 1


def load(directory):
  """The exported forward pass as a function of x (see the module doc)."""
  meta_path = os.path.join(directory, "export.json")
  with open(meta_path) as fh:
    meta = json.load(fh)
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{meta_path} has format_version {version!r}; this "
                     f"loader reads format_version {FORMAT_VERSION}")
  with open(os.path.join(directory, meta["function_file"]), "rb") as fh:
    exported = jax_export.deserialize(bytearray(fh.read()))
  with np.load(os.path.join(directory, meta["variables_file"])) as z:
    variables = jax.device_put({k: z[k] for k in z.files})
  call = jax.jit(exported.call)

  def infer(x):
    return call(variables, jnp.asarray(x, meta["input_dtype"]))

  infer.exported, infer.variables, infer.meta = exported, variables, meta
  return infer


if __name__ == "__main__":
  f = load(sys.argv[1] if len(sys.argv) > 1 else
           os.path.dirname(os.path.abspath(__file__)))
  n = f.meta["batch"] if isinstance(f.meta["batch"], int) else 1
  y = f(np.zeros([n] + f.meta["input_shape"], f.meta["input_dtype"]))
  print(f"{f.meta['name']}: logits {tuple(y.shape)} on "
        f"{jax.devices()[0].platform}")
'''


def _resolve(member) -> tuple[Any, Any, str, dict]:
  """``(net, variables, name, metrics)`` of a `pareto.Member`, a
  `pareto.Picked` (or anything with ``net`` and ``variables``), or a
  ``(net, variables[, metrics])`` tuple."""
  from legr_jax import pareto  # pylint: disable=import-outside-toplevel
  if isinstance(member, pareto.Member):
    return (models.from_config(member.net_config), member.variables,
            member.name, dict(member.metrics))
  if hasattr(member, "net") and hasattr(member, "variables"):
    return (member.net, member.variables, getattr(member, "name", "member"),
            dict(getattr(member, "metrics", {}) or {}))
  if isinstance(member, (tuple, list)) and len(member) in (2, 3):
    metrics = dict(member[2]) if len(member) == 3 else {}
    return member[0], member[1], str(metrics.get("name", "member")), metrics
  raise TypeError("export: expected a pareto.Member, a pareto.Picked or a "
                  f"(net, variables[, metrics]) tuple, got "
                  f"{type(member).__name__}")


def flat_variables(variables) -> dict[str, np.ndarray]:
  """``{'params/conv0/conv/kernel': array, ...}``: the leaves as numpy
  arrays, named by their '/'-joined path, in the tree's leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]
  out = {}
  for path, leaf in leaves:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k)))
                    for k in path)
    out[name] = np.asarray(leaf)
  return out


def _lower(fn, args, platforms):
  return jax_export.export(jax.jit(fn), platforms=tuple(platforms))(*args)


def export(member, directory: str, *, batch: int | None = None,
           platforms: Sequence[str] | None = None,
           overwrite: bool = False) -> dict:
  """Writes ``member`` into ``directory`` (layout in the module doc).

  Args:
    member: a `pareto.Member`, a `pareto.Picked`, or ``(net, variables)`` /
      ``(net, variables, metrics)`` (a `PrunableNet`; any ops: it is
      exported with `legr_jax.ops.XLA`).
    directory: created if missing.
    batch: None: any batch size (a symbolic dimension ``batch`` >= 1); an
      int: only that batch.
    platforms: a subset of 'cpu', 'cuda', 'rocm', 'tpu'; default
      `DEFAULT_PLATFORMS`, less any that fails to lower here (named in
      export.json under ``platforms_dropped``). Given ones must all lower.
    overwrite: replace an existing export (else FileExistsError).

  Returns the export.json record.
  """
  try:
    # pylint: disable-next=import-outside-toplevel,unused-import
    import flatbuffers  # noqa: F401
  except ImportError:
    raise ImportError("legr_jax.export needs the flatbuffers package for "
                      "jax.export's serialization: pip install flatbuffers"
                      ) from None
  net, variables, name, metrics = _resolve(member)
  if not hasattr(net, "with_ops"):
    raise TypeError(f"export: {type(net).__name__} is not a PrunableNet "
                    "(no with_ops); export a pareto member or a sliced net")
  if batch is not None and (isinstance(batch, bool) or
                            not isinstance(batch, int) or batch < 1):
    raise ValueError(f"batch must be None (any) or an int >= 1, got "
                     f"{batch!r}")
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, META_FILE)
  if os.path.exists(meta_path) and not overwrite:
    raise FileExistsError(f"{meta_path} exists; pass overwrite=True (or a "
                          "new directory) to replace that export")
  xla_net = net.with_ops(ops_lib.XLA)
  flat = flat_variables(variables)
  treedef = jax.tree_util.tree_structure(jax.device_get(variables))
  names = list(flat)
  if len(names) != treedef.num_leaves:
    raise ValueError("export: variable paths are not unique as '/' names")

  def forward(flat_vars, x):
    v = jax.tree_util.tree_unflatten(treedef, [flat_vars[k] for k in names])
    return xla_net.apply(v, x)

  if batch is None:
    n, = jax_export.symbolic_shape("batch", constraints=("batch >= 1",))
  else:
    n = batch
  args = ({k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in flat.items()},
          jax.ShapeDtypeStruct((n,) + tuple(net.input_shape), np.float32))
  dropped = {}
  if platforms is None:
    platforms = list(DEFAULT_PLATFORMS)
    try:
      exported = _lower(forward, args, platforms)
    except Exception:  # pylint: disable=broad-except
      for p in DEFAULT_PLATFORMS[1:]:   # keep cpu: its failure is an error
        try:
          _lower(forward, args, [p])
        except Exception as e:  # pylint: disable=broad-except
          dropped[p] = f"{type(e).__name__}: {e}"[:300]
      platforms = [p for p in platforms if p not in dropped]
      exported = _lower(forward, args, platforms)
  else:
    exported = _lower(forward, args, list(platforms))
  blob = exported.serialize()
  os.makedirs(directory, exist_ok=True)
  _write(os.path.join(directory, FUNCTION_FILE), bytes(blob))
  tmp = os.path.join(directory, VARIABLES_FILE + ".tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, os.path.join(directory, VARIABLES_FILE))
  _write(os.path.join(directory, LOADER_FILE), LOADER_SOURCE.encode())
  meta = {
      "format_version": FORMAT_VERSION, "name": name,
      "function_file": FUNCTION_FILE, "variables_file": VARIABLES_FILE,
      "platforms": list(exported.platforms),
      "platforms_dropped": dropped,
      "batch": batch if batch is not None else "any",
      "input_shape": list(net.input_shape), "input_dtype": "float32",
      "num_classes": int(net.num_classes),
      "output_shape": ["N" if batch is None else batch, int(net.num_classes)],
      "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "net_config": net.config, "metrics": metrics,
  }
  _write(meta_path, (json.dumps(meta, indent=2, sort_keys=True, default=str)
                     + "\n").encode())
  return meta


def _write(path: str, data: bytes) -> None:
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def load_exported(directory: str):
  """``f(x) -> logits`` from an export folder: the code of its
  load_exported.py (`LOADER_SOURCE`, which imports only jax and numpy) run
  here. ``f.exported``, ``f.variables`` and ``f.meta`` are attached."""
  namespace = {"__name__": "legr_jax_exported_loader"}
  code = compile(LOADER_SOURCE, LOADER_FILE, "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace["load"](directory)


__all__ = ["DEFAULT_PLATFORMS", "FORMAT_VERSION", "LOADER_SOURCE", "export",
           "flat_variables", "load_exported"]
