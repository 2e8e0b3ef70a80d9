"""Host preprocessing, the grain input pipeline, the dataset registry and bad-data errors."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from cft_jax import data
from cft_jax.data import loader, preprocess, sources


# ----------------------------------------------------------------------------- preprocessing


def test_to_rgb_any_mode():
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  for img in (grey, grey[..., None], np.dstack([grey] * 3 + [np.full_like(grey, 7)]),
              Image.fromarray(grey, "L").convert("P"), Image.fromarray(grey).convert("CMYK")):
    a = np.asarray(preprocess.to_rgb_image(img))
    assert a.shape == (3, 4, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(preprocess.to_rgb_image(grey))[..., 1], grey)
  np.testing.assert_array_equal(
      np.asarray(preprocess.to_rgb_image(np.dstack([grey] * 3 + [grey])))[..., 0], grey)
  with pytest.raises(ValueError, match="image"):
    preprocess.to_rgb_image(np.zeros((2, 3, 5), np.uint8))


def test_resize_center_crop_is_resize_shorter_side_then_crop():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)  # H 40, W 80
  out = preprocess.resize_center_crop(img, 16, crop_fraction=0.875)
  # shorter side 40 -> round(16 / 0.875) = 18, so 80 -> 36; centre 16 x 16 at (1, 10)
  ref = np.asarray(Image.fromarray(img).resize((36, 18), Image.BILINEAR))[1:17, 10:26]
  assert out.shape == (16, 16, 3)
  assert np.abs(out.astype(int) - ref.astype(int)).max() <= 2
  assert np.abs(out.astype(int) - ref.astype(int)).mean() < 0.5
  # images no larger than the output: a plain resize (no crop)
  small = rng.integers(0, 256, (10, 12), dtype=np.uint8)
  np.testing.assert_array_equal(
      preprocess.resize_center_crop(small, 16),
      np.asarray(Image.fromarray(small).convert("RGB").resize((16, 16), Image.BILINEAR)))
  with pytest.raises(ValueError, match="test_crop_fraction"):
    preprocess.resize_center_crop(img, 16, crop_fraction=1.5)


def test_random_resized_crop_box_ranges():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = preprocess.random_resized_crop_box(60, 90, rng, (0.1, 0.5))
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
    assert 0.1 * 5400 * 0.9 <= h * w <= 0.5 * 5400 * 1.1
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # full area at the image's own ratio: the whole image
  assert preprocess.random_resized_crop_box(30, 30, rng, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 30, 30)
  # impossible ratio: torchvision's fallback, a centre crop at the clamped ratio
  assert preprocess.random_resized_crop_box(10, 100, rng, (1.0, 1.0)) == (0, 43, 10, 13)


def test_rrc_flip_works_on_the_original_image():
  ramp = np.tile(np.linspace(0, 250, 64).astype(np.uint8)[None, :, None], (64, 1, 3))
  seen = set()
  for seed in range(8):
    out = preprocess.random_resized_crop_flip(ramp, 16, np.random.default_rng(seed),
                                              scale=(1.0, 1.0), ratio=(1.0, 1.0))
    row = out[8, :, 0].astype(int)
    assert out.shape == (16, 16, 3)
    assert np.all(np.diff(row) >= 0) or np.all(np.diff(row) <= 0)
    seen.add(bool(row[0] < row[-1]))
    # full-area crop of the original = its resize (up to the flip)
    ref = np.asarray(Image.fromarray(ramp).resize((16, 16), Image.BILINEAR))[8, :, 0]
    assert np.array_equal(row, ref) or np.array_equal(row, ref[::-1])
  assert seen == {True, False}  # both flips occur
  t = preprocess.HostTransform(16, train=True, augment="rrc_flip", rrc_scale=(0.05, 0.06))
  zoom = t(ramp, np.random.default_rng(0))
  assert np.ptp(zoom[8, :, 0]) < 0.5 * 250  # a small crop of the ramp spans a small range


# ----------------------------------------------------------------------------- pipeline


def _array_source(n=23, size=(10, 12)):
  rng = np.random.default_rng(0)
  return sources.ArraySource(rng.integers(0, 256, (n, *size, 3), dtype=np.uint8),
                             np.arange(n) % 5)


def _all(it):
  return [tuple(np.copy(a) for a in b) for b in it]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for u, v in zip(x, y):
      np.testing.assert_array_equal(u, v)


def test_task_batches_order_padding_and_exact_resume():
  src, idx = _array_source(), np.arange(3, 20)
  tr = data.HostTransform(16, train=True, augment="rrc_flip")
  kw = dict(process_index=0, process_count=1)
  full = _all(data.TaskBatches(src, idx, 4, 2, (0, 1), tr, **kw))
  assert len(full) == 10  # 2 epochs x ceil(17 / 4)
  # same example order and padding as the in-memory batches() of the device path
  for e in range(2):
    ref = list(data.batches(src.images, src.labels, idx, 4, shuffle_seed=(0, 1, e)))
    for (x, y, m), (_, ry, rm) in zip(full[5 * e:5 * e + 5], ref):
      np.testing.assert_array_equal(m, rm)
      np.testing.assert_array_equal(y[m], ry[rm])
      assert x.shape == (4, 16, 16, 3) and x.dtype == np.uint8 and not x[~m].any()
  # interrupted after 3 batches; a new iterator continues from the saved state
  it = data.TaskBatches(src, idx, 4, 2, (0, 1), tr, **kw)
  head = [tuple(np.copy(a) for a in next(it)) for _ in range(3)]
  state = it.get_state()
  assert state == {"next_step": 3, "skipped_corrupt": 0}
  resumed = data.TaskBatches(src, idx, 4, 2, (0, 1), tr, **kw)
  resumed.set_state(state)
  _same(head + _all(resumed), full)
  _same(_all(data.TaskBatches(src, idx, 4, 2, (0, 1), tr, start_step=7, **kw)), full[7:])


def test_task_batches_process_shards_make_the_global_batch():
  src, idx = _array_source(), np.arange(17)
  tr = data.HostTransform(8, train=True, augment="crop_flip")
  full = _all(data.TaskBatches(src, idx, 4, 1, (3, 0), tr, process_index=0, process_count=1))
  shards = [_all(data.TaskBatches(src, idx, 4, 1, (3, 0), tr, process_index=p, process_count=2))
            for p in range(2)]
  assert shards[0][0][0].shape == (2, 8, 8, 3)
  _same([tuple(np.concatenate([a, b]) for a, b in zip(s0, s1)) for s0, s1 in zip(*shards)], full)
  # global_batch: [B] arrays with this process's rows (cft_jax.parallel's layout), zeros elsewhere
  g1 = _all(data.TaskBatches(src, idx, 4, 1, (3, 0), tr, process_index=1, process_count=2,
                             global_batch=True))
  np.testing.assert_array_equal(g1[0][0][2:], full[0][0][2:])
  assert not g1[0][0][:2].any() and not g1[0][2][:2].any()
  with pytest.raises(ValueError, match="divisible"):
    data.TaskBatches(src, idx, 5, 1, (0,), tr, process_index=0, process_count=2)


def _write_jpgs(d, n, size=(20, 24), start=0):
  os.makedirs(d, exist_ok=True)
  rng = np.random.default_rng(len(d) + start)
  for j in range(start, start + n):
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
        os.path.join(d, f"{j:03d}.jpg"))


def test_worker_processes_give_the_same_batches(tmp_path):
  _write_jpgs(str(tmp_path / "a"), 6)
  files = sorted(str(tmp_path / "a" / f) for f in os.listdir(tmp_path / "a"))
  src = sources.FileSource(files, [0] * 6)
  tr = data.HostTransform(8, train=True, augment="rrc_flip")
  kw = dict(process_index=0, process_count=1)
  threads = _all(data.TaskBatches(src, np.arange(6), 4, 1, (0, 0), tr, workers=0, **kw))
  procs = _all(data.TaskBatches(src, np.arange(6), 4, 1, (0, 0), tr, workers=1, **kw))
  _same(threads, procs)


def test_corrupt_file_is_named_or_skipped(tmp_path):
  _write_jpgs(str(tmp_path / "c"), 5)
  bad = str(tmp_path / "c" / "002.jpg")
  with open(bad, "rb") as f:
    raw = f.read()
  with open(bad, "wb") as f:
    f.write(raw[:len(raw) // 3])  # truncated JPEG
  files = sorted(str(tmp_path / "c" / f) for f in os.listdir(tmp_path / "c"))
  src = sources.FileSource(files, [0] * 5)
  tr = data.HostTransform(8)
  kw = dict(process_index=0, process_count=1)
  with pytest.raises(data.BadDataError, match="002.jpg.*skip_corrupt"):
    _all(data.eval_batches(src, np.arange(5), 4, tr, **kw))
  it = data.eval_batches(src, np.arange(5), 4, tr, skip_corrupt=True, **kw)
  out = _all(it)
  assert it.skipped_corrupt == 1 and it.get_state()["skipped_corrupt"] == 1
  np.testing.assert_array_equal(np.concatenate([m for _, _, m in out]),
                                [True, True, False, True, True, False, False, False])


# ----------------------------------------------------------------------------- datasets


def _folder(root, classes=("b", "a"), n=(3, 2), size=(20, 24), splits=("train", "test")):
  for split, k in zip(splits, n):
    for c in classes:
      _write_jpgs(os.path.join(root, split, c) if split else os.path.join(root, c), k, size)
  return root


def test_image_folder_streams_and_crops(tmp_path):
  root = _folder(str(tmp_path / "f"), size=(30, 60))
  ds = data.load_dataset("image_folder", root=root, image_size=16)
  assert isinstance(ds, data.StreamingDataset) and ds.class_names == ("a", "b")
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 1])
  assert isinstance(ds.train.paths[0], str)  # a file list: nothing decoded at load
  x = ds.test_images[[0, 3]]
  ref = preprocess.resize_center_crop(Image.open(ds.test.paths[3]), 16, 0.875)
  assert x.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(x[1], ref)


def test_image_folder_single_tree_split_and_lists(tmp_path):
  root = _folder(str(tmp_path / "one"), classes=("x", "y", "z"), n=(10,), splits=("",))
  ds = data.load_dataset("image_folder", root=root, image_size=8, split_seed=3)
  assert len(ds.train_labels) == 24 and len(ds.test_labels) == 6
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2])
  again = data.load_dataset("image_folder", root=root, image_size=8, split_seed=3)
  np.testing.assert_array_equal(ds.test.indices, again.test.indices)
  other = data.load_dataset("image_folder", root=root, image_size=8, split_seed=4)
  assert not np.array_equal(ds.test.indices, other.test.indices)
  # explicit split lists with labels
  with open(tmp_path / "tr.txt", "w") as f:
    f.write("x/000.jpg 1\ny/000.jpg 0\n")
  with open(tmp_path / "te.txt", "w") as f:
    f.write("x/001.jpg 1\ny/001.jpg 0\n")
  ds = data.load_dataset("image_folder", root=root, image_size=8,
                         train_list=str(tmp_path / "tr.txt"), test_list=str(tmp_path / "te.txt"))
  assert ds.class_names == ("y", "x") and list(ds.test_labels) == [1, 0]


@pytest.mark.parametrize("case, match", [
    ("test_missing_class", "class 'a' has no test images"),
    ("empty_class", "class 'b' has no train images"),
    ("extra_test_class", r"test classes \['q'\] are not in"),
    ("no_classes", "no class folders"),
    ("label_out_of_range", r"test labels \[7\] out of range"),
    ("split_without_images", "class 'a' has no test images"),
])
def test_bad_folders_name_the_class_or_split(tmp_path, case, match):
  root = str(tmp_path / "d")
  if case == "no_classes":
    os.makedirs(os.path.join(root, "train"))
    os.makedirs(os.path.join(root, "test"))
  else:
    _folder(root)
  if case == "test_missing_class":
    for f in os.listdir(os.path.join(root, "test", "a")):
      os.remove(os.path.join(root, "test", "a", f))
    os.rmdir(os.path.join(root, "test", "a"))
  if case == "empty_class":
    for f in os.listdir(os.path.join(root, "train", "b")):
      os.remove(os.path.join(root, "train", "b", f))
  if case == "extra_test_class":
    _write_jpgs(os.path.join(root, "test", "q"), 1)
  if case == "split_without_images":
    for c in ("a", "b"):
      for f in os.listdir(os.path.join(root, "test", c)):
        os.rename(os.path.join(root, "test", c, f), os.path.join(root, "test", c, f + ".txt"))
  kw = {}
  if case == "label_out_of_range":
    for name, lab in (("tr", 1), ("te", 7)):
      with open(tmp_path / f"{name}.txt", "w") as f:
        f.write(f"train/a/000.jpg 0\ntrain/b/000.jpg {lab}\n")
    kw = dict(train_list=str(tmp_path / "tr.txt"), test_list=str(tmp_path / "te.txt"))
  err = data.DatasetNotFoundError if case == "no_classes" else data.BadDataError
  with pytest.raises(err, match=match):
    data.load_dataset("image_folder", root=root, image_size=8, **kw)


def test_imagenet_r_folder_layout_80_20(tmp_path):
  wnids = ("n01443537", "n01484850", "n01494475")
  root = _folder(str(tmp_path / "imagenet-r"), classes=wnids, n=(5,), splits=("",),
                 size=(33, 21))
  ds = data.load_dataset("imagenet_r", root=str(tmp_path), image_size=16)
  assert ds.class_names == wnids and ds.name == "imagenet_r"
  assert len(ds.train_labels) == 12 and len(ds.test_labels) == 3  # 4 / 1 of 5 per class
  assert data.stratified_split(np.repeat(np.arange(200), 150), 0.2, 0)[1].size == 6000


def test_domainnet_official_split_files(tmp_path):
  root = str(tmp_path / "dn")
  for dom in ("clipart", "sketch"):
    for split in ("train", "test"):
      lines = []
      for label, cls in enumerate(("aircraft_carrier", "zebra")):
        d = os.path.join(root, dom, cls)
        start = 0 if split == "train" else 2
        _write_jpgs(d, 2, start=start)
        lines += [f"{dom}/{cls}/{j:03d}.jpg {label}" for j in range(start, start + 2)]
      with open(os.path.join(root, f"{dom}_{split}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
  ds = data.load_dataset("domainnet", root=root, image_size=8, domains=("clipart", "sketch"))
  assert ds.class_names == ("aircraft_carrier", "zebra")
  assert len(ds.train_labels) == 8 and len(ds.test_labels) == 8
  assert ds.test_images[[7]].shape == (1, 8, 8, 3)
  with pytest.raises(data.BadDataError, match="unknown DomainNet"):
    data.load_dataset("domainnet", root=root, domains=("photos",))


class _FakeTfdsSplit:
  """What ``builder.as_data_source(split, decoders={'image': SkipDecoding()})`` returns: records
  with PNG bytes (mock_data's own generator needs TensorFlow to encode images)."""

  def __init__(self, labels, size):
    self.labels, self.size = list(labels), size

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    buf = io.BytesIO()
    h, w = self.size if i % 2 else self.size[::-1]
    Image.fromarray(np.full((h, w, 3), i % 256, np.uint8)).save(buf, "PNG")
    return {"image": buf.getvalue(), "label": self.labels[i]}


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100),
                                               ("imagenet_r", 3), ("domainnet", 345),
                                               ("tfds:cifar100", 100)])
def test_named_tfds_datasets_under_mock_data(tmp_path, name, num_classes):
  tfds = pytest.importorskip("tensorflow_datasets")

  def as_data_source(builder, split=None, decoders=None, **_):
    assert decoders and "image" in decoders  # images stay encoded until a worker decodes them
    if builder.name == "imagenet_r":  # one split; labels: 3 of the 1000 ImageNet ids
      assert split == "test"
      return _FakeTfdsSplit([5, 9, 700] * 5, (40, 30))
    n = builder.info.features["label"].num_classes
    return _FakeTfdsSplit(list(range(n)) * (2 if split == "train" else 1), (32, 32))

  with tfds.testing.mock_data(as_data_source_fn=as_data_source, data_dir=str(tmp_path)):
    ds = data.load_dataset(name, image_size=16, domains=("real",))
  assert ds.num_classes == num_classes
  if name == "imagenet_r":
    assert len(ds.train_labels) == 12 and len(ds.test_labels) == 3
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1, 1, 1])
  else:
    assert len(ds.train_labels) == 2 * num_classes and len(ds.test_labels) == num_classes
  x, y, m = next(iter(data.eval_batches(ds.test, np.arange(3), 4, data.HostTransform(16),
                                        process_index=0, process_count=1)))
  assert x.shape == (4, 16, 16, 3) and m.tolist() == [True, True, True, False]
  np.testing.assert_array_equal(y[:3], ds.test_labels[:3])
  record = getattr(ds.test, "indices", np.arange(3))[:3]  # record i is a PNG filled with i
  np.testing.assert_array_equal(x[:3], np.broadcast_to(record[:, None, None, None], (3, 16, 16, 3)))


# ----------------------------------------------------------------------------- trainer


def _stream_config(root, **overrides):
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config(**{"data.name": "image_folder", "scenario.num_tasks": 2, "train.epochs": 2,
                     "train.batch_size": 4, "eval.batch_size": 5, "data.augment": "rrc_flip",
                     "data.train_limit": 0, "data.test_limit": 0, "train.log_every": 1})
  c.data.root = root
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


class _StopAtAccess:
  """Stands in for train._GracefulExit: ``requested`` turns to SIGTERM at its n-th read."""
  n = 0

  def __init__(self):
    self.reads = 0

  @property
  def requested(self):
    self.reads += 1
    return "SIGTERM" if self.reads >= self.n else None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def test_streamed_run_resumes_mid_task_bit_exact(tmp_path, monkeypatch):
  from cft_jax import train  # pylint: disable=g-import-not-at-top
  root = _folder(str(tmp_path / "f"), classes=("a", "b", "c", "d"), n=(6, 2), size=(30, 40))
  full = train.run(_stream_config(root), str(tmp_path / "full"))
  monkeypatch.setattr(train, "_GracefulExit", _StopAtAccess)
  _StopAtAccess.n = 8  # 6 reads per task (after steps 1-5 of 6, after the task): task 1, step 2
  with pytest.raises(KeyboardInterrupt, match="task 1, step 2"):
    train.run(_stream_config(root), str(tmp_path / "part"))
  monkeypatch.undo()
  metas = [open(os.path.join(d, f)).read() for d, _, fs in os.walk(tmp_path / "part")
           for f in fs if "meta" in d and not f.startswith("_")]
  assert any('"input_state": {"next_step": 2, "skipped_corrupt": 0}' in m for m in metas)
  resumed = train.run(_stream_config(root), str(tmp_path / "part"))
  np.testing.assert_array_equal(np.array(resumed["accuracy_matrix"], float),
                                np.array(full["accuracy_matrix"], float))

  def losses(d):
    import json  # pylint: disable=g-import-not-at-top
    return [(r["task"], r["step"], r["loss"]) for r in map(json.loads, open(d / "log.jsonl"))]

  assert losses(tmp_path / "part") == losses(tmp_path / "full")
  assert len(losses(tmp_path / "full")) == 12


def test_explicit_class_order_from_the_config():
  from cft_jax import scenarios  # pylint: disable=g-import-not-at-top
  from cft_jax.config import ConfigError, base_config, validate_config  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.scenario.class_order = (3, 1, 0, 2)
  c.scenario.num_tasks = 2
  c = validate_config(c)
  sc = scenarios.build_scenario(c, np.array([0, 1, 2, 3, 3]), np.array([2, 3]), 4)
  assert sc.class_order == (3, 1, 0, 2)
  np.testing.assert_array_equal(sc.train_labels, [2, 1, 3, 0, 0])  # class 3 learned first
  np.testing.assert_array_equal(sc.train_idx[0], [1, 3, 4])
  with pytest.raises(ConfigError, match=r"missing \[2\].*repeated \[1\]"):
    scenarios.class_incremental(4, 2, class_order=(3, 1, 0, 1))


def test_cli_bad_data_is_one_clean_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  root = _folder(str(tmp_path / "f"), classes=("a", "b"), n=(4, 2))
  bad = os.path.join(root, "train", "b", "001.jpg")
  with open(bad, "rb") as f:
    raw = f.read()
  with open(bad, "wb") as f:
    f.write(raw[:len(raw) // 3])
  base = [sys.executable, "-m", "cft_jax.main", "--config", "configs/default.py",
          "--config.data.name=image_folder", f"--config.data.root={root}",
          "--config.data.image_size=16", "--config.model.name=tiny_cnn",
          "--config.model.pretrained=False", "--config.scenario.num_tasks=2",
          "--config.train.batch_size=4", "--config.train.progress=False",
          "--config.train.plots=False"]
  out = subprocess.run(base + ["--workdir", str(tmp_path / "r1")], cwd=repo, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(f"cft_jax: error: cannot decode image {bad}")
  out = subprocess.run(base + ["--workdir", str(tmp_path / "r2"), "--config.data.skip_corrupt=True"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "task 1: skipped 1 corrupt image(s)" in out.stdout  # task ids from 0
  # a class with training images but none to test on
  for f in os.listdir(os.path.join(root, "test", "a")):
    os.remove(os.path.join(root, "test", "a", f))
  out = subprocess.run(base + ["--workdir", str(tmp_path / "r3")], cwd=repo, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "cft_jax: error: image_folder: class 'a' has no test images in "
      f"{os.path.join(root, 'test', 'a')} (.jpg/.jpeg/.png/.bmp/.webp); every class needs images "
      "in both splits")


def test_cached_features_on_a_streamed_dataset_equal_the_streamed_run(tmp_path):
  from cft_jax import train  # pylint: disable=g-import-not-at-top
  root = _folder(str(tmp_path / "f"), classes=("a", "b", "c", "d"), n=(6, 2), size=(30, 40))
  kw = {"peft.name": "linear_probe", "data.augment": "none", "train.epochs": 1}
  plain = train.run(_stream_config(root, **kw), str(tmp_path / "plain"))
  cached = train.run(_stream_config(root, **kw, **{"train.cache_features": True}),
                     str(tmp_path / "cached"))
  np.testing.assert_allclose(np.array(cached["accuracy_matrix"], float),
                             np.array(plain["accuracy_matrix"], float), atol=1e-6)


def test_unequal_first_task_b50_inc10():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cft_jax import scenarios, steps  # pylint: disable=g-import-not-at-top
  from cft_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  sc = scenarios.class_incremental(100, 6, seed=1993, first_task_classes=50)
  assert sc.task_sizes == (50, 10, 10, 10, 10, 10) and sc.classes_per_task == 50
  assert [sc.task_range(t) for t in (0, 1, 5)] == [(0, 50), (50, 60), (90, 100)]
  assert sc.num_seen(1) == 60
  np.testing.assert_array_equal(sc.task_of_label(np.array([0, 49, 50, 59, 60, 99])),
                                [0, 0, 1, 1, 2, 5])
  with pytest.raises(ConfigError, match="share the remaining 50"):
    scenarios.class_incremental(100, 5, first_task_classes=50)
  # the steps' task slice: widest task wide, columns past the task's end at -1e9
  k, bounds = steps.task_widths((3, 1, 1, 1))
  assert (k, bounds) == (3, (3, 4, 5, 6))
  assert steps.task_widths((2, 2)) == (2, None)
  z = jnp.arange(12.0).reshape(2, 6)
  np.testing.assert_array_equal(steps.task_slice(z, 0, k, bounds)[0], [0, 1, 2])
  np.testing.assert_array_equal(steps.task_slice(z, 5, k, bounds)[1], [11, -1e9, -1e9])
  np.testing.assert_array_equal(steps.task_slice(z, 3, k, bounds)[0], [3, -1e9, -1e9])
  assert int(steps.task_hi(4, k, bounds)) == 5 and int(steps.task_hi(0, k, bounds)) == 3


def test_b50_inc10_style_run_compiles_once(tmp_path):
  from cft_jax import train  # pylint: disable=g-import-not-at-top
  root = _folder(str(tmp_path / "f"), classes=("a", "b", "c", "d"), n=(4, 2))
  c = _stream_config(root, **{"scenario.num_tasks": 3, "scenario.first_task_classes": 2,
                              "train.epochs": 1, "loss.name": "ce"})
  m = train.run(c, str(tmp_path / "run"))
  R = np.array(m["accuracy_matrix"], float)
  assert R.shape == (3, 3) and np.all(np.isfinite(np.tril(R)))
  assert m["train_step_compilations"] == 1
  R_task = np.array(m["task_il_accuracy_matrix"], float)
  assert R_task[2, 1] == 100.0 and R_task[2, 2] == 100.0  # one-class tasks: task-IL is trivial
