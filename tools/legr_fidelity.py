r"""legr_jax's LeGR against the reference code (cmu-enyac/LeGR), same weights.

Not part of CI: the reference needs PyTorch, which is no dependency of
legr_jax. It runs in a subprocess under another Python that has torch:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
  python -m tools.legr_fidelity --legr_src=/tmp/legr_orig \
      --torch_python=/tmp/torchenv/bin/python

``--legr_src``: the reference's files (e.g. ``git --git-dir=MIRROR archive
HEAD | tar x -C /tmp/legr_orig``) or its git directory. They are copied to
``--workdir`` (never into this repository) with one patch for CPU: the zeros
of ``DownsampleA`` are made on the input's device instead of ``'cuda'``.
``torchvision``, which the reference imports for an ``isinstance`` check on
ImageNet bottlenecks and for data loaders not used here, is stubbed.

One set of ResNet-56 weights (random; BatchNorm scales and biases perturbed,
running statistics measured on images) goes to WORKDIR/weights.npz, which
both sides load; the validation images are the shared CIFAR-10 subset's,
normalised as the reference's loader does. For the identity transform and a
seeded random (alpha, kappa) draw (the reference's initial-population
distribution: alpha = exp(N(0, 1)), kappa ~ N(0, std of the layer's scores))
and each FLOPs target, both sides score (squared L2 filter norms), prune
greedily with safeguard 0.1 and evaluate the tau_hat = 0 validation loss.
The table compares, for two legr_jax variants,

  ours       ``models.get('resnet56')``: centred zero-padding, each stage's
             stream scored on its own (`ranking.group_scores`);
  reference  ``models.get('resnet56', pad='append')`` with `chain_scores`:
             the reference's shortcut layout and cross-stage chain sum,

the per-layer filter scores, the aggregated score of every channel the
reference removes, the kept channels of all 55 convs, the pruned MACs and the
loss. WORKDIR/fidelity.json keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np

from legr_jax.ranking import chain_scores  # noqa: F401  (re-exported)

# The reference's CIFAR loader: ToTensor, then ImageNet mean / std.
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CUDA_LINE = "x.size(3), device='cuda')), 1)"
_CPU_LINE = "x.size(3), device=x.device)), 1)"
_TORCH_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}


# ----------------------------------------------------------------------------
# The reference's cross-stage chain, on legr_jax's spec
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# legr_jax side (main virtualenv)
# ----------------------------------------------------------------------------


def _images(path: str, n: int, seed: int):
  """``(x_val, y_val, x_calib)``: normalised NHWC float32 images."""
  if path != "random" and not os.path.exists(path):
    raise SystemExit(f"no images at {path}; pass --images=PATH.npz or "
                     "--images=random")
  if path == "random":
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, 2 * n)
  else:
    data = np.load(path)
    idx = np.random.default_rng(seed).permutation(len(data["y"]))[:2 * n]
    x = (data["x"][idx].astype(np.float32) / 255.0 - _MEAN) / _STD
    y = data["y"][idx].astype(np.int64)
  return x[:n], y[:n], x[n:]


def _weights(net, x_calib, seed: int):
  """Random variables with perturbed BN affine terms and running statistics
  measured on ``x_calib`` (so activations keep their scale)."""
  import jax  # pylint: disable=g-import-not-at-top
  variables = jax.device_get(net.init(jax.random.key(seed)))
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    key = jax.tree_util.keystr(path)
    if "bn" in key and "scale" in key:
      return leaf * rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if "bn" in key and "bias" in key:
      return leaf + rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    return leaf

  params = jax.tree_util.tree_map_with_path(perturb, variables["params"])
  old = variables["batch_stats"]
  _, new = jax.jit(lambda v, x: net.apply(v, x, train=True))(
      {"params": params, "batch_stats": old}, x_calib)
  # flax: running = 0.9 * running + 0.1 * batch -> the batch statistics
  stats = jax.tree_util.tree_map(lambda n, o: (np.asarray(n) - 0.9 * o) / 0.1,
                                 jax.device_get(new), old)
  return {"params": params, "batch_stats": stats}


def _site(tree, name):
  for part in name.split("/"):
    tree = tree[part]
  return tree


def _torch_arrays(spec, variables) -> dict:
  """Site-keyed arrays in PyTorch layouts (conv OIHW, linear [out, in])."""
  out = {}
  for c in spec.convs:
    k = np.asarray(_site(variables["params"], c.name)["conv"]["kernel"])
    out[f"{c.name}/weight"] = k.transpose(3, 2, 0, 1)
    for ours, theirs in _TORCH_BN.items():
      col = "params" if ours in ("scale", "bias") else "batch_stats"
      out[f"{c.name}/bn/{theirs}"] = np.asarray(
          _site(variables[col], c.name)["bn"][ours])
  dense = _site(variables["params"], spec.dense.name)["dense"]
  out["classifier/weight"] = np.asarray(dense["kernel"]).T
  out["classifier/bias"] = np.asarray(dense["bias"])
  return out


def _draws(spec, norms, seed: int):
  """``[(name, alpha, kappa)]``: identity and one reference-style draw."""
  names = spec.layer_names
  rng = np.random.default_rng(seed)
  alpha = {n: float(np.exp(rng.normal(0, 1))) for n in names}
  kappa = {n: float(rng.normal(0, np.std(np.asarray(norms[n]))))
           for n in names}
  return [("identity", {n: 1.0 for n in names}, {n: 0.0 for n in names}),
          (f"random{seed}", alpha, kappa)]


def _loss(logits, y) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  logp = jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1)
  return float(-np.mean(np.take_along_axis(np.asarray(logp), y[:, None], 1)))


def _macs(spec, masks) -> int:
  """Exact MACs (float64 arithmetic on integer coefficients)."""
  from legr_jax import cost  # pylint: disable=g-import-not-at-top
  q, lin, const = cost.cost_coefficients(spec, "flops")
  a = np.array([float(np.sum(np.asarray(masks[g]))) for g in spec.group_names])
  return int(round(a @ q @ a + lin @ a + const))


def _realigned_loss(net, variables, masks, x, y) -> float:
  """Loss of the sliced network whose zero-pad shortcuts copy by position
  (the i-th kept input channel to the i-th kept output channel): what the
  reference's physical pruning builds (`DownsampleA` concatenates the kept
  channels and zeros)."""
  import copy  # pylint: disable=g-import-not-at-top
  from legr_jax import models, surgery  # pylint: disable=g-import-not-at-top
  from legr_jax.models import blocks  # pylint: disable=g-import-not-at-top
  small, small_vars = surgery.slice_network(net, variables, masks)
  keep = surgery.kept_channels(net.spec, masks)
  config = copy.deepcopy(small.config)
  for s in net.spec.shortcuts:
    config["index_maps"][s.name] = list(blocks.append_pad_map(
        keep[s.in_group].size, keep[s.out_group].size))
  return _loss(models.from_config(config).apply(small_vars, x), y)


def _jax_case(net, variables, norms, alpha, kappa, target, safeguard, chain,
              apply_fn, x, y) -> dict:
  from legr_jax import ranking, surgery  # pylint: disable=g-import-not-at-top
  spec = net.spec
  layer = ranking.affine_scores(norms, alpha, kappa)
  scores = ranking.group_scores(spec, layer)
  if chain:
    scores = chain_scores(spec, scores)
  masks, _ = ranking.masks_for_budget(spec, scores, flops=target,
                                      safeguard=safeguard)
  keep = surgery.kept_channels(spec, masks)
  out = {
      "layer_scores": {n: np.asarray(v).tolist() for n, v in layer.items()},
      "scores": {c.name: np.asarray(scores[c.out_group]).tolist()
                 for c in spec.convs},
      "kept": {c.name: keep[c.out_group].tolist() for c in spec.convs},
      "macs": _macs(spec, masks),
      "loss": _loss(apply_fn(variables, x, masks), y),
  }
  if chain:
    out["loss_realigned"] = _realigned_loss(net, variables, masks, x, y)
  return out


def _prepare_reference(src: str, dst: str) -> str | None:
  """Copies the reference to ``dst`` and patches it for CPU; returns its
  commit when ``src`` is a git directory."""
  if os.path.exists(dst):
    shutil.rmtree(dst)
  commit = None
  if os.path.isdir(os.path.join(src, "objects")):
    os.makedirs(dst)
    commit = subprocess.run(["git", f"--git-dir={src}", "rev-parse", "HEAD"],
                            check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", f"--git-dir={src}", "archive", "HEAD"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", dst], input=archive, check=True)
  else:
    shutil.copytree(src, dst)
  path = os.path.join(dst, "model", "resnet_cifar10.py")
  text = open(path).read()
  if text.count(_CUDA_LINE) != 1:
    raise RuntimeError(f"{path}: expected one {_CUDA_LINE!r} to patch")
  with open(path, "w") as f:
    f.write(text.replace(_CUDA_LINE, _CPU_LINE))
  return commit


def _compare(spec, ref: dict, ours: dict) -> dict:
  """Differences of one legr_jax case from the reference's."""
  names = spec.layer_names
  ref_layer = [np.asarray(ref["layer_scores"][i], np.float64)
               for i in range(len(names))]
  scale = max(np.max(np.abs(s)) for s in ref_layer)
  layer_diff = max(np.max(np.abs(np.asarray(ours["layer_scores"][n]) - r))
                   for n, r in zip(names, ref_layer)) / scale
  removed = np.asarray(ref["removed"], np.float64)   # (layer, channel, score)
  agg = np.array([ours["scores"][names[int(l)]][int(j)]
                  for l, j, _ in removed]) if len(removed) else np.zeros(0)
  agg_diff = (float(np.max(np.abs(agg - removed[:, 2])) /
                    np.max(np.abs(removed[:, 2]))) if len(removed) else 0.0)
  equal, channels = 0, 0
  for i, n in enumerate(names):
    a, b = set(ours["kept"][n]), set(ref["kept"][i])
    equal += a == b
    channels += len(a ^ b)
  streams = [spec.group(g).members[0] for ch in spec.chains()
             if len(ch.groups) > 1 for g in ch.groups]
  return {
      "layer_score_rel": float(layer_diff), "removed_score_rel": agg_diff,
      "layers_equal": equal, "channels_differing": channels,
      "streams_ours": "/".join(str(len(ours["kept"][s])) for s in streams),
      "streams_ref": "/".join(str(len(ref["kept"][names.index(s)]))
                              for s in streams),
      "macs_ours": ours["macs"], "macs_ref": ref["macs"],
      "loss_ours": ours["loss"], "loss_ref": ref["loss"],
      "loss_realigned": ours.get("loss_realigned"),
  }


def _table(rows) -> str:
  head = ("variant   draw      target  layer-score  removed-score  layers  "
          "ch.diff  streams ours / ref     MACs ours   MACs ref  dMACs  "
          "loss ours  loss ref   loss ours,realigned")
  lines = [head, "-" * len(head)]
  for r in rows:
    realigned = ("" if r["loss_realigned"] is None else
                 f"{r['loss_realigned']:.6f}")
    lines.append(
        f"{r['variant']:9s} {r['draw']:9s} {r['target']:6s}  "
        f"{r['layer_score_rel']:11.1e}  {r['removed_score_rel']:13.1e}  "
        f"{r['layers_equal']:3d}/55  {r['channels_differing']:7d}  "
        f"{r['streams_ours'] + ' / ' + r['streams_ref']:21s} "
        f"{r['macs_ours']:11d} {r['macs_ref']:10d} "
        f"{r['macs_ours'] - r['macs_ref']:6d}  {r['loss_ours']:9.6f}  "
        f"{r['loss_ref']:9.6f}  {realigned}")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--legr_src", required=True,
                      help="the reference's files or git directory")
  parser.add_argument("--torch_python", required=True,
                      help="a Python with torch and numpy")
  parser.add_argument("--workdir", default="/tmp/legr_fidelity")
  parser.add_argument("--images", default=os.path.join(
      os.path.dirname(__file__), "..", "..", "shared", "data",
      "cifar10_train_subset.npz"), help="npz with x, y, or 'random'")
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--targets", default="0.47,0.2,0.1,0.05,0.03",
                      help="FLOPs fractions kept (residual streams lose "
                      "channels below about 0.1 with the random weights)")
  parser.add_argument("--safeguard", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  from legr_jax import cost, models, ranking

  work = os.path.abspath(args.workdir)
  os.makedirs(work, exist_ok=True)
  commit = _prepare_reference(args.legr_src, os.path.join(work, "legr"))
  targets = [float(t) for t in args.targets.split(",")]

  nets = {"ours": models.get("resnet56"),
          "reference": models.get("resnet56", pad="append")}
  ref_spec = nets["reference"].spec
  x, y, x_calib = _images(args.images, args.num_images, args.seed)
  variables = _weights(nets["reference"], x_calib, args.seed)
  np.savez(os.path.join(work, "weights.npz"),
           **_torch_arrays(ref_spec, variables))
  np.savez(os.path.join(work, "images.npz"), x=x, y=y)
  norms = ranking.filter_norms(ref_spec, variables["params"])
  draws = _draws(ref_spec, norms, args.seed + 1)
  with open(os.path.join(work, "cases.json"), "w") as f:
    json.dump({"targets": targets, "safeguard": args.safeguard,
               "layers": list(ref_spec.layer_names),
               "draws": [{"name": n, "perturbation": [
                   [a[l], k[l]] for l in ref_spec.layer_names]}
                         for n, a, k in draws]}, f)

  print(f"reference side: {args.torch_python} (log: {work}/torch.log)",
        flush=True)
  with open(os.path.join(work, "torch.log"), "w") as log:
    subprocess.run([args.torch_python, os.path.abspath(__file__),
                    "--torch_side", work], check=True, stdout=log,
                   stderr=subprocess.STDOUT)
  with open(os.path.join(work, "reference.json")) as f:
    ref = json.load(f)

  applies = {k: jax.jit(lambda v, x, m, net=net: net.apply(v, x, m))
             for k, net in nets.items()}
  unpruned = {k: _loss(applies[k](variables, x, None), y) for k in nets}
  rows, cases = [], {}
  for name, alpha, kappa in draws:
    for t in targets:
      key = f"{name}@{t}"
      for variant, net in nets.items():
        case = _jax_case(net, variables, norms, alpha, kappa, t,
                         args.safeguard, variant == "reference",
                         applies[variant], x, y)
        cases[f"{variant}:{key}"] = case
        rows.append({"variant": variant, "draw": name, "target": str(t),
                     **_compare(net.spec, ref["cases"][key], case)})
        print(f"{variant} {key} done", flush=True)

  print(f"\nreference commit {commit or '?'}; {len(y)} images; weights "
        f"{work}/weights.npz")
  print(f"unpruned MACs: legr_jax {int(cost.unpruned(ref_spec)):d}, "
        f"reference {ref['unpruned_macs']:d}")
  print(f"unpruned loss: reference {ref['unpruned_loss']:.6f}, legr_jax "
        f"pad='append' {unpruned['reference']:.6f}, pad='center' "
        f"{unpruned['ours']:.6f}")
  print("layer-score / removed-score: max |legr_jax - reference| relative to "
        "the largest reference score (per-layer transformed scores / the "
        "aggregated score of every channel the reference removes); layers: "
        "convs whose kept channels are equal; streams: kept widths of the "
        "three residual streams\n")
  print(_table(rows))
  with open(os.path.join(work, "fidelity.json"), "w") as f:
    json.dump({"commit": commit, "rows": rows, "unpruned_loss": {
        "reference": ref["unpruned_loss"], **unpruned},
               "legr_jax_cases": cases}, f)


# ----------------------------------------------------------------------------
# Reference side (run by --torch_python; numpy, torch and the reference only)
# ----------------------------------------------------------------------------


def _stub_torchvision(torch) -> None:
  """The reference imports torchvision for an isinstance check on ImageNet
  bottlenecks and for data loaders; neither is used here."""
  tv = types.ModuleType("torchvision")
  tv.models = types.ModuleType("torchvision.models")
  tv.models.resnet = types.ModuleType("torchvision.models.resnet")
  tv.models.resnet.Bottleneck = type("Bottleneck", (torch.nn.Module,), {})
  tv.transforms = types.ModuleType("torchvision.transforms")
  sys.modules.update({"torchvision": tv, "torchvision.models": tv.models,
                      "torchvision.models.resnet": tv.models.resnet,
                      "torchvision.transforms": tv.transforms})


def _torch_name(site: str) -> tuple[str, str]:
  """legr_jax conv site -> (conv, bn) module names of the reference's model."""
  if site == "stem":
    return "features.0.0", "features.0.1"
  stage, block, conv = site.replace("stage", "").replace("_block", "/").split(
      "/")
  i = {"conv1": 0, "conv2": 3}[conv]
  return (f"features.{stage}.{block}.conv.{i}",
          f"features.{stage}.{block}.conv.{i + 1}")


def torch_main(work: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  _stub_torchvision(torch)
  sys.path.insert(0, os.path.join(work, "legr"))
  # pylint: disable=g-import-not-at-top
  from model.resnet_cifar10 import ResNet56
  from pruner.fp_resnet import FilterPrunerResNet
  from utils.drivers import test

  with open(os.path.join(work, "cases.json")) as f:
    cases = json.load(f)
  arrays = dict(np.load(os.path.join(work, "weights.npz")))
  state = {}
  for site in cases["layers"]:
    conv, bn = _torch_name(site)
    state[f"{conv}.weight"] = arrays[f"{site}/weight"]
    for name in _TORCH_BN.values():
      state[f"{bn}.{name}"] = arrays[f"{site}/bn/{name}"]
  state["classifier.0.weight"] = arrays["classifier/weight"]
  state["classifier.0.bias"] = arrays["classifier/bias"]
  images = np.load(os.path.join(work, "images.npz"))
  xs = torch.from_numpy(np.ascontiguousarray(
      images["x"].transpose(0, 3, 1, 2)))
  ys = torch.from_numpy(images["y"]).long()
  loader = [(xs[i:i + 128], ys[i:i + 128]) for i in range(0, len(ys), 128)]
  zeros = torch.zeros((1, 3, 32, 32))

  def fresh():
    model = ResNet56(num_classes=10)
    own = model.state_dict()
    missing = {k for k in own if not k.endswith("num_batches_tracked")} - set(
        state)
    if missing or set(state) - set(own):
      raise RuntimeError(f"weights do not fit: {sorted(missing)[:5]}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                           state.items()}, strict=False)
    return model.eval()

  # As LeGR.__init__ / learn_ranking_ea: one pruner, scores of the unpruned
  # model kept as original_dist, the model reloaded after every candidate.
  model = fresh()
  pruner = FilterPrunerResNet(model, "l2_weight", 10, cases["safeguard"],
                              random=False, device="cpu")
  pruner.reset()
  pruner.model.eval()
  pruner.forward(zeros)
  original_dist = pruner.filter_ranks.copy()
  out = {"unpruned_macs": int(pruner.cur_flops),
         "unpruned_loss": float(np.mean(test(model, loader, device="cpu",
                                             get_loss=True)[1])),
         "cases": {}}
  sizes = {k: int(v.size(0)) for k, v in original_dist.items()}
  one_shot = pruner.one_shot_lowest_ranking_filters
  for draw in cases["draws"]:
    for target in cases["targets"]:
      captured = {}

      def capture(t, captured=captured):
        captured["selected"] = list(one_shot(t))
        return captured["selected"]

      pruner.one_shot_lowest_ranking_filters = capture
      pruner.pruning_with_transformations(original_dist, draw["perturbation"],
                                          target)
      layer_scores = [pruner.filter_ranks[k].numpy().astype(float).tolist()
                      for k in sorted(pruner.filter_ranks)]
      pruner.reset()
      pruner.model.eval()
      pruner.forward(zeros)
      _, loss = test(pruner.model, loader, device="cpu", get_loss=True)
      removed = [(int(l), int(j), float(r)) for l, j, r in
                 captured["selected"]]
      kept = [sorted(set(range(sizes[k])) -
                     {j for l, j, _ in removed if l == k})
              for k in sorted(sizes)]
      out["cases"][f"{draw['name']}@{target}"] = {
          "layer_scores": layer_scores, "removed": removed, "kept": kept,
          "macs": int(pruner.cur_flops), "loss": float(np.mean(loss))}
      print(f"case {draw['name']}@{target}: {pruner.cur_flops} MACs, loss "
            f"{np.mean(loss):.6f}", flush=True)
      model = fresh()
      pruner.model = model
      pruner.reset()
      pruner.model.eval()
      pruner.forward(zeros)
  with open(os.path.join(work, "reference.json"), "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--torch_side":
    torch_main(sys.argv[2])
  else:
    main()
