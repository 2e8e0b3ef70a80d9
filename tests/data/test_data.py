"""Dataset readers and the device-side preprocessing."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cft_jax import data


def _write_idx(path, arr):
  arr = np.asarray(arr, np.uint8)
  header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + arr.tobytes())


def test_read_idx_roundtrip_and_corruption(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (5, 4, 3))
  p = str(tmp_path / "a-idx3-ubyte.gz")
  _write_idx(p, x)
  np.testing.assert_array_equal(data.read_idx(p), x)
  with gzip.open(p, "rb") as f:
    raw = f.read()
  with gzip.open(p, "wb") as f:
    f.write(raw[:-3])
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(p)
  with open(p, "wb") as f:
    f.write(b"junk")
  with pytest.raises(ValueError):
    data.read_idx(p)


def test_fashion_mnist_from_idx_dir(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 12), ("t10k", 6)):
    _write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
    _write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
  ds = data.load_dataset("fashion_mnist", root=str(tmp_path))
  assert ds.train_images.shape == (12, 28, 28, 1) and ds.test_labels.shape == (6,)
  assert ds.num_classes == 10 and ds.class_names[9] == "ankle boot"


def test_missing_dataset_says_how_to_install(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="image_folder"):
    data.load_dataset("image_folder", root=str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="known"):
    data.load_dataset("cifar1000")


@pytest.mark.skipif(not os.path.isdir(data.datasets.FASHION_MNIST_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
  ds = data.load_dataset("fashion_mnist")
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))


def make_image_folder(root, classes=("b_cls", "a_cls", "c_cls"), n_train=4, n_test=2, size=20):
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    for ci, c in enumerate(classes):
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for j in range(n):
        img = np.full((size + j, size, 3), 40 * ci, np.uint8) + rng.integers(0, 30, (size + j, size, 3),
                                                                              dtype=np.uint8)
        ext = "jpg" if j % 2 else "png"
        Image.fromarray(img).save(os.path.join(root, split, c, f"{j}.{ext}"))
  return root


def test_image_folder(tmp_path):
  root = make_image_folder(str(tmp_path))
  ds = data.load_dataset("image_folder", root=root, image_size=16)
  assert ds.class_names == ("a_cls", "b_cls", "c_cls")
  assert ds.train_images.shape == (12, 16, 16, 3) and ds.train_images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [4, 4, 4])
  # the folder "b_cls" was written with ci=0 (dark), and is label 1 after sorting
  assert ds.train_images[ds.train_labels == 1].mean() < ds.train_images[ds.train_labels == 2].mean()


def test_cifar10_is_registered_image_folder_or_tfds(tmp_path, monkeypatch):
  """``data.name=cifar10``: a folder with ``train/`` is read as an image folder; without one,
  tfds ``cifar10``; when tfds cannot provide it, the error says how and points to
  ``configs/cifar10.py`` / ``data.name=image_folder`` for the cifar10-mini folder."""
  assert "cifar10" in data.REGISTRY and "cifar10" in data.STREAMED
  root = make_image_folder(str(tmp_path / "mini"))
  ds = data.load_dataset("cifar10", root=root, image_size=16)
  assert ds.class_names == ("a_cls", "b_cls", "c_cls") and ds.name == "cifar10"
  asked = []

  def no_tfds(name, data_dir):
    asked.append((name, data_dir))
    raise data.DatasetNotFoundError(f"tfds could not provide '{name}' (offline).")

  monkeypatch.setattr(data.datasets, "_tfds_builder", no_tfds)
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.load_dataset("cifar10", root=str(tmp_path / "tfds_dir"), image_size=16)
  assert asked == [("cifar10", str(tmp_path / "tfds_dir"))]
  assert str(e.value) == (
      "data.name='cifar10': tfds could not provide 'cifar10' (offline). For the cifar10-mini "
      "image folder use --config configs/cifar10.py, or data.name=image_folder (or cifar10) with "
      "data.root=DIR holding DIR/{train,test}/<class>/.")


def test_preprocess_shapes_and_normalisation():
  prep = data.Preprocess(image_size=8, mean=127.0, std=128.0, augment="crop_flip", crop_padding=2)
  x = jnp.full((3, 4, 4, 1), 255, jnp.uint8)
  y = prep(x, train=False)
  assert y.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(y, (255 - 127) / 128, rtol=1e-6)
  ya = prep(x, jax.random.PRNGKey(0), train=True)
  assert ya.shape == (3, 8, 8, 3)
  # translation pads with zeros -> some pixels become (0 - 127) / 128
  assert float(ya.min()) == pytest.approx(-127 / 128)


def test_batches_pad_with_mask():
  x = np.arange(10)[:, None, None, None].astype(np.uint8)
  y = np.arange(10, dtype=np.int32)
  out = list(data.batches(x, y, np.arange(10), 4, shuffle_seed=(0, 1)))
  assert len(out) == 3 and all(b[0].shape[0] == 4 for b in out)
  seen = np.concatenate([b[1][b[2]] for b in out])
  assert sorted(seen) == list(range(10))
  assert out[-1][2].tolist() == [True, True, False, False]


def test_random_resized_crop_flip():
  prep = data.Preprocess(image_size=8, mean=0.0, std=1.0, augment="rrc_flip", rrc_scale=(1.0, 1.0))
  # a horizontal ramp; with the full-area crop the output is the (possibly flipped) ramp
  ramp = np.tile(np.linspace(0, 240, 16).astype(np.uint8)[None, :, None], (16, 1, 3))
  x = jnp.asarray(np.stack([ramp] * 6))
  y = np.asarray(prep(x, jax.random.PRNGKey(0), train=True))
  assert y.shape == (6, 8, 8, 3)
  rows = y[:, 4, :, 0]
  inc = np.all(np.diff(rows, axis=1) >= -1e-3, axis=1)
  dec = np.all(np.diff(rows, axis=1) <= 1e-3, axis=1)
  assert np.all(inc | dec) and inc.any() and dec.any()
  # small crops zoom in: the value range inside a crop shrinks
  small = data.Preprocess(8, 0.0, 1.0, augment="rrc_flip", rrc_scale=(0.05, 0.06))
  ys = np.asarray(small(x, jax.random.PRNGKey(1), train=True))
  assert np.ptp(ys[:, 4, :, 0], axis=1).max() < 0.6 * np.ptp(rows, axis=1).min()
