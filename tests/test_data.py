"""Tests of legr_jax.data: data sets by name, splits, augmentation, batches."""

import collections
import os
import pickle
import threading
import warnings

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from legr_jax import data

SHARED_NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                          "data", "cifar10_train_subset.npz")


def _write_npz(path, n=50, shape=(6, 5, 3), num_classes=4, seed=0, **extra):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, size=(n,) + shape).astype(np.uint8)
  y = rng.integers(0, num_classes, size=n)
  np.savez(path, x=x, y=y, **extra)
  return x, y


def _rows_of(split):
  x, y = split.take(np.arange(len(split)))
  return {(xi.tobytes(), int(yi)) for xi, yi in zip(x, y)}


# --- splits -----------------------------------------------------------------


def test_carve_is_a_seeded_partition():
  rest, val = data.carve(103, fraction=0.1, seed=3)
  assert len(val) == 10 and len(rest) == 93
  assert sorted(np.concatenate([rest, val]).tolist()) == list(range(103))
  rest2, val2 = data.carve(103, fraction=0.1, seed=3)
  np.testing.assert_array_equal(val, val2)
  _, val3 = data.carve(103, fraction=0.1, seed=4)
  assert set(val3.tolist()) != set(val.tolist())
  _, val4 = data.carve(103, size=7, seed=3)
  assert len(val4) == 7
  with pytest.raises(ValueError):
    data.carve(10, size=10)


def test_digits_splits_are_real_disjoint_and_seeded():
  ds = data.get_dataset("digits", seed=0)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (1294, 144, 359)
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert ds.augment == "none" and not ds.test_is_val
  x, y = ds.train.take(np.arange(len(ds.train)))
  assert x.dtype == np.uint8 and y.dtype == np.int32
  assert x.max() == 255 and x.min() == 0
  assert set(np.unique(y).tolist()) == set(range(10))
  # Values 0..16 scaled to 0..255: every pixel is a multiple of 255/16.
  assert np.allclose(np.round(x / (255 / 16)) * (255 / 16), x, atol=0.5)
  # The three splits partition the 1797 images (as a multiset: digits has a
  # few exact duplicate images).
  from legr_jax.data.local import load_digits
  xa, ya = load_digits()
  everything = collections.Counter(
      (xi.tobytes(), int(yi)) for xi, yi in zip(xa, ya))
  parts = collections.Counter()
  for split in (ds.train, ds.val, ds.test):
    xs, ys = split.take(np.arange(len(split)))
    parts.update((xi.tobytes(), int(yi)) for xi, yi in zip(xs, ys))
  assert parts == everything
  te = _rows_of(ds.test)
  ds1 = data.get_dataset("digits", seed=1)
  assert _rows_of(ds1.test) != te
  assert _rows_of(data.get_dataset("digits", seed=0).test) == te
  np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-6)


def test_npz_with_val_size_and_no_test_split(tmp_path):
  path = str(tmp_path / "d.npz")
  x, y = _write_npz(path, n=50)
  with pytest.warns(UserWarning, match="no test split"):
    ds = data.get_dataset(f"npz:{path}", val_size=12, seed=0)
  assert (len(ds.train), len(ds.val)) == (38, 12)
  assert ds.test is ds.val and ds.test_is_val and "validation" in ds.note
  assert ds.image_shape == (6, 5, 3) and ds.num_classes == 4
  assert ds.augment == "none"
  all_rows = {(xi.tobytes(), int(yi)) for xi, yi in zip(x, y)}
  tr, va = _rows_of(ds.train), _rows_of(ds.val)
  assert not (tr & va) and (tr | va) == all_rows
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ds_frac = data.get_dataset(f"npz:{path}", val_fraction=0.2, seed=0)
  assert len(ds_frac.val) == 10


def test_npz_grayscale_and_explicit_test(tmp_path):
  path = str(tmp_path / "g.npz")
  rng = np.random.default_rng(0)
  _write_npz(path, n=20, shape=(4, 4), num_classes=3,
             x_test=rng.integers(0, 256, (7, 4, 4)).astype(np.uint8),
             y_test=np.arange(7) % 3)
  ds = data.get_dataset(f"npz:{path}")
  assert ds.image_shape == (4, 4, 1) and not ds.test_is_val
  assert len(ds.test) == 7 and len(ds.std) == 1


def test_npz_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    data.get_dataset(f"npz:{tmp_path}/missing.npz")
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, images=np.zeros((3, 2, 2, 1)))
  with pytest.raises(ValueError, match="'x'"):
    data.get_dataset(f"npz:{bad}")


def test_unknown_name_lists_known_ones():
  with pytest.raises(ValueError) as e:
    data.get_dataset("mnist")
  for name in ("cifar10", "digits", "npz:PATH", "cifar_dir:PATH",
               "imagenet2012", "caltech_birds2011"):
    assert name in str(e.value)


@pytest.mark.skipif(not os.path.exists(SHARED_NPZ),
                    reason="shared CIFAR-10 subset ../shared/data absent")
def test_shared_cifar10_subset_split():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ds = data.get_dataset(f"npz:{SHARED_NPZ}", val_size=1000, seed=0)
  assert (len(ds.train), len(ds.val)) == (4085, 1000)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert ds.augment == "cifar"
  assert all(100 < m < 140 for m in ds.mean)


def _write_cifar10_batches(root, per_batch=4):
  folder = root / "cifar-10-batches-py"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    planes = np.zeros((per_batch, 3, 32, 32), np.uint8)
    planes[:, 0], planes[:, 1], planes[:, 2] = 10, 20, 30  # R, G, B
    planes[:, 0, 0, 1] = 200  # red pixel at row 0, column 1
    labels = rng.integers(0, 10, per_batch).tolist()
    with open(folder / name, "wb") as f:
      pickle.dump({b"data": planes.reshape(per_batch, -1),
                   b"labels": labels}, f)


def test_cifar_dir_reads_official_batches(tmp_path):
  _write_cifar10_batches(tmp_path)
  ds = data.get_dataset(f"cifar_dir:{tmp_path}", val_fraction=0.1, seed=0)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 2, 4)
  assert ds.num_classes == 10 and ds.augment == "cifar"
  x, _ = ds.test.take(np.arange(4))
  assert x.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(x[0, 5, 5], [10, 20, 30])  # HWC, RGB order
  assert x[0, 0, 1, 0] == 200 and x[0, 1, 0, 0] == 10
  with pytest.raises(FileNotFoundError, match="CIFAR"):
    data.get_dataset(f"cifar_dir:{tmp_path / 'cifar-10-batches-py' / 'x'}")


# --- TFDS (mock data only; nothing downloads) ---------------------------------


@pytest.mark.parametrize("name,classes,shape", [
    ("cifar10", 10, (32, 32, 3)),
    ("cifar100", 100, (32, 32, 3)),
    ("imagenet2012", 1000, (224, 224, 3)),
    ("caltech_birds2011", 200, (224, 224, 3)),
])
def test_tfds_datasets_on_mock_data(name, classes, shape):
  with tfds.testing.mock_data(num_examples=20):
    ds = data.get_dataset(name, data_dir="/nonexistent", seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 2, 20)
    assert ds.num_classes == classes and ds.image_shape == shape
    assert isinstance(ds.train, data.TfdsSplit)
    x, y = ds.train.take(np.array([3, 0, 7]))
    assert x.shape == (3,) + shape and x.dtype == np.uint8
    assert y.dtype == np.int32 and ((0 <= y) & (y < classes)).all()
    b = next(data.batches(ds.train, 4, seed=0, augment=ds.augment,
                          mean=ds.mean, std=ds.std))
    assert b["image"].shape == (4,) + shape
    assert b["image"].dtype == np.float32


def test_tfds_missing_data_gives_instructions(tmp_path):
  with pytest.raises(data.NotPreparedError) as e:
    data.get_dataset("cifar10", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "download=True" in msg and "digits" in msg and "cifar_dir:" in msg
  assert not (tmp_path / "downloads").exists()


def test_resize_center_crop_shape_and_content():
  from legr_jax.data.tfds_data import resize_center_crop
  img = np.zeros((40, 80, 3), np.uint8)
  img[:, 40:] = 255  # right half white
  out = resize_center_crop(img, 32, 28)
  assert out.shape == (28, 28, 3)
  assert out[:, :10].max() == 0 and out[:, -10:].min() == 255


# --- augmentation -------------------------------------------------------------


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  x = rng.integers(1, 256, size=(16, 8, 8, 3)).astype(np.uint8)
  from legr_jax.data.augmentation import crop_flip
  out = crop_flip(x, np.random.default_rng(1), pad=4)
  assert out.shape == x.shape and out.dtype == np.uint8
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips = 0
  for i in range(len(x)):
    matches = [(oy, ox, f) for oy in range(9) for ox in range(9)
               for f in (False, True)
               if np.array_equal(out[i], (padded[i, oy:oy + 8, ox:ox + 8]
                                          [:, ::-1] if f else
                                          padded[i, oy:oy + 8, ox:ox + 8]))]
    assert matches, f"image {i} is not a crop of the padded image"
    flips += matches[0][2]
  assert 0 < flips < len(x)
  np.testing.assert_array_equal(
      out, crop_flip(x, np.random.default_rng(1), pad=4))


def test_resized_crop_flip_keeps_shape_and_pixels():
  from legr_jax.data.augmentation import resized_crop_flip
  x = np.random.default_rng(0).integers(0, 256, (5, 24, 24, 3)).astype(
      np.uint8)
  out = resized_crop_flip(x, np.random.default_rng(0))
  assert out.shape == x.shape
  for i in range(5):  # nearest neighbour: every output pixel is an input one
    src = {tuple(p) for p in x[i].reshape(-1, 3)}
    assert all(tuple(p) in src for p in out[i].reshape(-1, 3))
  with pytest.raises(ValueError):
    data.augment(x, "mixup", np.random.default_rng(0))


def test_normalize_units():
  x = np.full((2, 3, 3, 3), 100, np.uint8)
  out = data.normalize(x, (100.0, 50.0, 0.0), (1.0, 10.0, 50.0))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 5.0, 2.0], rtol=1e-6)


# --- batches ------------------------------------------------------------------


def _split(n=37, shape=(4, 4, 3)):
  x = np.zeros((n,) + shape, np.uint8)
  x[:, 0, 0, 0] = np.arange(n)  # example id in a pixel
  return data.ArraySplit(x, np.arange(n) % 5)


def _ids(batch):
  return np.asarray(batch["image"])[:, 0, 0, 0].round().astype(int).tolist()


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  kw = dict(seed=0, mean=(0.0,) * 3, std=(1.0,) * 3)
  split = _split()
  e0 = [i for b in data.batches(split, 8, epoch=0, **kw) for i in _ids(b)]
  assert len(e0) == 32 and len(set(e0)) == 32  # 4 full batches, no repeats
  e0b = [i for b in data.batches(split, 8, epoch=0, **kw) for i in _ids(b)]
  e1 = [i for b in data.batches(split, 8, epoch=1, **kw) for i in _ids(b)]
  assert e0 == e0b and e0 != e1
  tail = [i for b in data.batches(split, 8, epoch=0, start_batch=2, **kw)
          for i in _ids(b)]
  assert tail == e0[16:]
  labels = [np.asarray(b["label"]).tolist()
            for b in data.batches(split, 8, epoch=0, **kw)]
  assert sum(labels, []) == [i % 5 for i in e0]


def test_resume_reproduces_augmented_batches():
  rng = np.random.default_rng(0)
  split = data.ArraySplit(rng.integers(0, 256, (40, 8, 8, 3)).astype(np.uint8),
                          np.zeros(40, int))
  kw = dict(seed=5, epoch=3, augment="cifar", mean=(0.0,) * 3,
            std=(1.0,) * 3)
  full = [np.asarray(b["image"]) for b in data.batches(split, 8, **kw)]
  tail = [np.asarray(b["image"]) for b in data.batches(split, 8,
                                                       start_batch=3, **kw)]
  assert len(full) == 5 and len(tail) == 2
  for a, b in zip(full[3:], tail):
    np.testing.assert_array_equal(a, b)
  other = [np.asarray(b["image"]) for b in data.batches(
      split, 8, **{**kw, "seed": 6})]
  assert not np.array_equal(full[0], other[0])


def test_unshuffled_remainder_padding_and_normalization():
  split = _split(n=10)
  mean, std = (2.0, 0.0, 0.0), (4.0, 1.0, 1.0)
  got = list(data.batches(split, 4, seed=0, shuffle=False, mean=mean, std=std,
                          drop_remainder=False))
  assert [b["image"].shape[0] for b in got] == [4, 4, 2]
  np.testing.assert_allclose(np.asarray(got[2]["image"])[:, 0, 0, 0],
                             (np.array([8, 9]) - 2.0) / 4.0)
  padded = list(data.batches(split, 4, seed=0, shuffle=False, mean=mean,
                             std=std, drop_remainder=False,
                             pad_remainder=True, prefetch=0))
  assert [b["image"].shape[0] for b in padded] == [4, 4, 4]
  np.testing.assert_array_equal(np.asarray(padded[2]["valid"]),
                                [True, True, False, False])
  np.testing.assert_array_equal(np.asarray(padded[2]["label"])[:2], [3, 4])


def test_batches_on_a_sharding():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data"))
  b = next(data.batches(_split(), 8, seed=0, mean=(0.0,) * 3, std=(1.0,) * 3,
                        sharding=sharding))
  assert b["image"].sharding == sharding and b["label"].sharding == sharding


def test_early_stop_and_errors_do_not_hang():
  it = data.batches(_split(), 2, seed=0, mean=(0.0,) * 3, std=(1.0,) * 3,
                    prefetch=1)
  next(it)
  it.close()
  assert not any(t.name == "legr_jax-batches" and t.is_alive()
                 for t in threading.enumerate())

  class Broken(data.ArraySplit):

    def take(self, indices):
      raise OSError("disk on fire")

  broken = Broken(np.zeros((8, 2, 2, 1), np.uint8), np.zeros(8))
  with pytest.raises(OSError, match="disk on fire"):
    list(data.batches(broken, 2, seed=0, mean=(0.0,), std=(1.0,)))


def test_npz_three_way_split_with_test_size(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (200, 6, 6, 3), dtype=np.uint8)
  y = (np.arange(200) % 5).astype(np.int32)
  path = tmp_path / "d.npz"
  np.savez(path, x=x, y=y)
  ds = data.get_dataset(f"npz:{path}", val_size=40, test_size=50, seed=3)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (110, 40, 50)
  assert not ds.test_is_val
  # the three splits partition the file's images (rows are unique here)
  rows = lambda s: {s.x[i].tobytes() for i in range(len(s))}
  tr, va, te = rows(ds.train), rows(ds.val), rows(ds.test)
  assert not (tr & va or tr & te or va & te)
  assert tr | va | te == {x[i].tobytes() for i in range(200)}
  # seeded: the same call gives the same test split, another seed another
  again = data.get_dataset(f"npz:{path}", val_size=40, test_size=50, seed=3)
  np.testing.assert_array_equal(again.test.x, ds.test.x)
  other = data.get_dataset(f"npz:{path}", val_size=40, test_size=50, seed=4)
  assert rows(other.test) != te
  with pytest.raises(ValueError, match="test_size"):
    data.get_dataset(f"npz:{path}", test_size=200)
  np.savez(path, x=x, y=y, x_test=x[:10], y_test=y[:10])
  with pytest.raises(ValueError, match="own test split"):
    data.get_dataset(f"npz:{path}", test_size=20)


def test_latency_measure_with_an_injected_timer():
  from legr_jax import latency, models  # pylint: disable=g-import-not-at-top
  net = models.get("cnn_small", num_classes=10, input_shape=(8, 8, 1))
  ticks = iter(np.cumsum([0.0] + [0.001, 0.003] * 50))   # start, stop pairs
  out = latency.measure(net, net.init(jax.random.key(0)), batch=4, repeats=5,
                        warmup=1, timer=lambda: next(ticks))
  # each timed call spans one 0.001 s then the next starts 0.003 s later
  assert out["median_ms"] == pytest.approx(1.0)
  assert out["batch"] == 4 and out["repeats"] == 5
  assert out["device_kind"] == jax.devices()[0].device_kind
