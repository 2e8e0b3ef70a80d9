"""Files checked before the first step (issue 26, item 2): every bad file of a run named at once
before anything trains, skip counts per split in metrics.json; hidden files, 16-bit PNGs and
empty files."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from cft_jax import data, train
from cft_jax.data import check, preprocess, sources
from tests.data.test_input_pipeline import _folder, _stream_config, _write_jpgs


def _jpeg(seed=0, size=(24, 32)) -> bytes:
  buf = io.BytesIO()
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def _truncate(path, keep=3):
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // keep])


def test_check_image_bytes_reasons():
  assert sources.check_image_bytes(_jpeg()) is None
  assert sources.check_image_bytes(_png(np.zeros((5, 7, 3), np.uint8))) is None
  assert "truncated" in sources.check_image_bytes(_jpeg()[:len(_jpeg()) // 2]).lower()
  png = _png(np.arange(300, dtype=np.uint8).reshape(10, 10, 3))
  assert sources.check_image_bytes(png[:len(png) - 20]) is not None  # truncated PNG
  assert sources.check_image_bytes(b"") == "empty file (0 bytes)"
  assert sources.check_image_bytes(b"not an image") == (
      "UnidentifiedImageError: cannot identify image file")


def test_empty_file_message_names_the_path_not_a_buffer(tmp_path):
  path = str(tmp_path / "empty.jpg")
  open(path, "wb").close()
  src = sources.FileSource([path], [0])
  with pytest.raises(data.BadDataError) as e:
    src[0]
  assert str(e.value).startswith(f"cannot decode image {path}: empty file (0 bytes).")
  assert "BytesIO" not in str(e.value)
  with open(path, "wb") as f:
    f.write(b"junk")
  with pytest.raises(data.BadDataError, match=r"UnidentifiedImageError: cannot identify image "
                                              r"file\. Remove") as e:
    src[0]
  assert "BytesIO" not in str(e.value)


def test_find_corrupt_and_check_splits_name_every_bad_file(tmp_path):
  _write_jpgs(str(tmp_path / "c"), 6)
  files = sorted(str(tmp_path / "c" / f) for f in os.listdir(tmp_path / "c"))
  _truncate(files[1])
  open(files[4], "wb").close()
  src = sources.FileSource(files, [0] * 6)
  bad = check.find_corrupt(src, [5, 4, 1, 0, 1], threads=3)
  assert [i for i, _ in bad] == [1, 4]
  assert bad[0][1].startswith(f"{files[1]}: OSError: ") and "truncated" in bad[0][1].lower()
  assert bad[1][1] == f"{files[4]}: empty file (0 bytes)"
  splits = {"train": (src, [0, 1, 2]), "val": (src, []), "test": (src, [3, 4, 5])}
  with pytest.raises(data.BadDataError) as e:
    check.check_splits(splits, skip_corrupt=False)
  lines = str(e.value).splitlines()
  assert lines[0].startswith("2 of the 6 images this run uses cannot be decoded (train 1, "
                             "test 1); nothing was trained.")
  assert lines[1].startswith(f"  train: {files[1]}: OSError") and lines[2] == (
      f"  test: {files[4]}: empty file (0 bytes)")
  counts, lines = check.check_splits(splits, skip_corrupt=True, limit=1)
  assert counts == {"train": 1, "val": 0, "test": 1}
  assert len(lines) == 2 and lines[1] == "  ... and 1 more"


def test_hidden_files_and_folders_are_not_images(tmp_path):
  root = _folder(str(tmp_path / "f"), classes=("a", "b"), n=(2, 1))
  for split in ("train", "test"):
    with open(os.path.join(root, split, "a", "._000.jpg"), "wb") as f:
      f.write(b"\x00\x05\x16\x07 macOS AppleDouble resource fork")
    os.makedirs(os.path.join(root, split, ".ipynb_checkpoints"))
  ds = data.load_dataset("image_folder", root=root, image_size=8)
  assert ds.class_names == ("a", "b") and len(ds.train_labels) == 4 and len(ds.test_labels) == 2
  assert not any(os.path.basename(p).startswith(".") for p in ds.train.paths + ds.test.paths)


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
  grey16 = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))  # a ramp 0..65535
  path = str(tmp_path / "ramp16.png")
  Image.fromarray(grey16).save(path)
  im = sources.FileSource([path], [0])[0]
  assert im.mode == "I;16"
  x = data.HostTransform(16, crop_fraction=1.0)(im, None)
  np.testing.assert_array_equal(x[..., 0], np.round(grey16 / 257.0).astype(np.uint8))
  assert x.mean() == pytest.approx(127.5, abs=1)  # PIL's own convert: 250 (almost all white)
  assert np.asarray(preprocess.to_rgb_image(im)).dtype == np.uint8


def _run(tmp_path, name, **overrides):
  config = _stream_config(str(tmp_path / "f"), **overrides)
  return train.run(config, str(tmp_path / name))


def test_corrupt_test_image_stops_the_run_before_training(tmp_path):
  root = _folder(str(tmp_path / "f"), classes=("a", "b", "c", "d"), n=(4, 2))
  bad = os.path.join(root, "test", "d", "001.jpg")  # last task's test split
  _truncate(bad)
  with pytest.raises(data.BadDataError) as e:
    _run(tmp_path, "r1")
  assert str(e.value).startswith(f"cannot decode image {bad}: OSError")
  assert "(test split); nothing was trained." in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "r1" / "log.jsonl")  # not one step was taken
  assert not os.listdir(tmp_path / "r1" / "checkpoints") if os.path.isdir(
      tmp_path / "r1" / "checkpoints") else True
  m = _run(tmp_path, "r2", **{"data.skip_corrupt": True})
  assert m["skipped_corrupt"] == {"train": 0, "val": 0, "test": 1}
  with open(tmp_path / "r2" / "metrics.json") as f:
    assert json.load(f)["skipped_corrupt"] == {"train": 0, "val": 0, "test": 1}
  # the skipped image is not scored: its task's test accuracy is over its 3 other images
  t = m["class_names"].index("d") // 2
  assert all(abs(r[t] * 3 / 100 - round(r[t] * 3 / 100)) < 1e-5
             for r in m["accuracy_matrix"] if r[t] is not None)

