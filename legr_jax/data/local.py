"""Data sets that need no network: scikit-learn digits, `.npz` files and the
official CIFAR python batch files. All return in-memory uint8 arrays."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np

NPZ_HINT = ("write it with numpy.savez(path, x=images, y=labels) (optionally "
            "x_test=..., y_test=...)")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 digits: uint8 [1797, 8, 8, 1] in 0..255, int32.

  The raw values 0..16 are scaled by 255/16 and rounded.
  """
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  d = datasets.load_digits()
  x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return x, d.target.astype(np.int32)


def _as_images(x: np.ndarray, path: str, key: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == np.bool_ or x.dtype.kind not in "iuf":
    raise ValueError(f"{path}: array {key!r} must hold images (integers in "
                     f"0..255), got dtype {x.dtype}")
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{path}: array {key!r} must be [N, H, W] or "
                     f"[N, H, W, C], got shape {x.shape}")
  if x.dtype != np.uint8 and x.size:
    if (not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 255
        or not np.all(np.mod(x, 1) == 0)):
      raise ValueError(f"{path}: array {key!r} must hold integers in 0..255 "
                       f"(dtype {x.dtype}, range {x.min()}..{x.max()})")
    x = x.astype(np.uint8)
  return x


def as_labels(y, where: str, num_classes: int | None = None) -> np.ndarray:
  """``y`` as int32 [N]: integer values >= 0 (and < ``num_classes`` when
  given); a ValueError naming ``where`` otherwise (fractional, negative,
  non-finite or non-numeric labels)."""
  y = np.asarray(y)
  if y.dtype == np.bool_ or y.dtype.kind not in "iuf":
    raise ValueError(f"{where} must hold integer class labels, got dtype "
                     f"{y.dtype}")
  if y.ndim > 1 and y.size != y.shape[0]:
    raise ValueError(f"{where} must be one label per image, shape [N], got "
                     f"{y.shape} (one-hot labels: pass argmax(y, -1))")
  y = y.reshape(-1)
  if y.dtype.kind == "f":
    bad = ~np.isfinite(y) | (y != np.round(y))
    if np.any(bad):
      raise ValueError(f"{where} must hold integer class labels; "
                       f"{int(bad.sum())} are not (e.g. {y[bad][0].item()!r})")
  if y.size and y.min() < 0:
    raise ValueError(f"{where}: labels must be class indices 0, 1, ...; "
                     f"found {y.min().item()!r}")
  if num_classes is not None and y.size and y.max() >= num_classes:
    raise ValueError(f"{where}: labels must be below the {num_classes} "
                     f"classes; found {y.max().item()!r}")
  if y.size and y.max() >= 2**31:
    raise ValueError(f"{where}: label {y.max().item()!r} is too large")
  return y.astype(np.int32)


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Reads ``x`` [N, H, W(, C)] (0..255) and ``y`` [N] (optionally ``x_test``,
  ``y_test``) from an ``.npz`` file. Returns uint8 images and int32 labels.

  Raises ValueError naming the file for unreadable files and for arrays that
  are not images / integer labels >= 0, of different lengths, test images of
  another shape than the training images, or a test split half given;
  FileNotFoundError when it is missing."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"npz data set not found: {path}")
  if os.path.isdir(path):
    raise ValueError(f"npz data set {path} is a folder; give an .npz file")
  try:
    with np.load(path, allow_pickle=False) as f:
      names = list(f.files)
      raw = {k: f[k] for k in ("x", "y", "x_test", "y_test") if k in names}
  except (zipfile.BadZipFile, EOFError, OSError, pickle.UnpicklingError,
          ValueError) as e:
    raise ValueError(f"{path} is not a readable .npz file ({e}); "
                     f"{NPZ_HINT}") from None
  missing = {"x", "y"} - set(names)
  if missing:
    raise ValueError(f"{path}: missing arrays {sorted(missing)}; an npz data "
                     f"set needs 'x' (images) and 'y' (labels), has {names}")
  if ("x_test" in raw) != ("y_test" in raw):
    have, lack = (("x_test", "y_test") if "x_test" in raw else
                  ("y_test", "x_test"))
    raise ValueError(f"{path} has {have} but no {lack}: give both (a test "
                     "split) or neither")
  out = {"x": _as_images(raw["x"], path, "x"),
         "y": as_labels(raw["y"], f"{path}: array 'y'")}
  if "x_test" in raw:
    out["x_test"] = _as_images(raw["x_test"], path, "x_test")
    out["y_test"] = as_labels(raw["y_test"], f"{path}: array 'y_test'")
    if out["x_test"].shape[1:] != out["x"].shape[1:]:
      raise ValueError(f"{path}: test images x_test are "
                       f"{out['x_test'].shape[1:]}, training images x are "
                       f"{out['x'].shape[1:]}; they must have one shape")
  for k in ("", "_test"):
    if "x" + k in out and len(out["x" + k]) != len(out["y" + k]):
      raise ValueError(f"{path}: x{k} and y{k} differ in length "
                       f"({len(out['x' + k])} images, {len(out['y' + k])} "
                       "labels)")
  if not len(out["x"]):
    raise ValueError(f"{path}: array 'x' holds no images")
  return out


def _unpickle(path: str) -> dict:
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_images(rows: np.ndarray) -> np.ndarray:
  """CIFAR rows [N, 3072] (R plane, G plane, B plane) -> uint8 [N, 32, 32, 3]."""
  rows = np.asarray(rows, dtype=np.uint8)
  return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def load_cifar_dir(path: str) -> dict:
  """Reads the official CIFAR-10 / CIFAR-100 "python version" batch files.

  ``path`` is the extracted folder (``cifar-10-batches-py`` with
  ``data_batch_1..5`` and ``test_batch``, or ``cifar-100-python`` with
  ``train`` and ``test``), or a folder holding one of those.
  Returns dict with x, y, x_test, y_test (uint8 NHWC, int32) and num_classes.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CIFAR folder not found: {path}")
  for sub in ("cifar-10-batches-py", "cifar-100-python"):
    if os.path.isdir(os.path.join(path, sub)):
      path = os.path.join(path, sub)
      break
  files = set(os.listdir(path))
  if "data_batch_1" in files:  # CIFAR-10
    train = sorted(f for f in files if f.startswith("data_batch_"))
    parts = [_unpickle(os.path.join(path, f)) for f in train]
    test = _unpickle(os.path.join(path, "test_batch"))
    key, num_classes = "labels", 10
  elif "train" in files and "test" in files:  # CIFAR-100
    parts = [_unpickle(os.path.join(path, "train"))]
    test = _unpickle(os.path.join(path, "test"))
    key, num_classes = "fine_labels", 100
  else:
    raise FileNotFoundError(
        f"{path} holds neither CIFAR-10 (data_batch_1..5, test_batch) nor "
        "CIFAR-100 (train, test) python batch files; download "
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        "and extract it")
  return {
      "x": np.concatenate([_cifar_images(p["data"]) for p in parts]),
      "y": np.concatenate([np.asarray(p[key]) for p in parts]).astype(np.int32),
      "x_test": _cifar_images(test["data"]),
      "y_test": np.asarray(test[key]).astype(np.int32),
      "num_classes": num_classes,
  }
