"""tfds datasets through tfds's real builder / prepare code (no mock): a tiny local builder.

``tfds.testing.mock_data`` skips ``download_and_prepare``; this builder goes through it (the
path ``data.name=cifar100`` / ``tfds:<name>`` / ImageNet-R / the Fashion-MNIST fallback take),
so a package tfds imports lazily there and that the install lacks fails here (issue 26, item 1:
``importlib_resources``).
"""

import importlib.metadata
import re

import numpy as np
import pytest
from PIL import Image

from cft_jax import data

tfds = pytest.importorskip("tensorflow_datasets")

_COLOURS = [(i * 20, 255 - i * 20, 7 * i) for i in range(10)]


class CftJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """10 train / 6 test RGB images of 12 x 10 px, 2 classes; image ``i`` is filled with
  ``_COLOURS[i]``. Defined in a package module (``tests.data...``), so tfds resolves its
  ``code_path`` the way it does for its own builders."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=["ant", "bee"])}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(range(10)),
            "test": self._generate_examples(range(6))}

  def _generate_examples(self, ids):
    for i in ids:
      img = Image.fromarray(np.full((10, 12, 3), _COLOURS[i], np.uint8))  # PIL: no TensorFlow
      yield i, {"image": img, "label": i % 2}


def test_importlib_resources_is_an_install_requirement():
  requires = [re.split(r"[<>=!~ ;\[]", r)[0].lower().replace("-", "_")
              for r in importlib.metadata.requires("cft_jax") or []]
  assert "importlib_resources" in requires


def test_tfds_builder_prepares_and_streams(tmp_path):
  ds = data.load_dataset("tfds:cft_jax_tiny_images", root=str(tmp_path), image_size=10)
  assert ds.class_names == ("ant", "bee")
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [5, 5])
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [3, 3])
  assert (tmp_path / "cft_jax_tiny_images" / "1.0.0").is_dir()
  x, y, m = next(iter(data.eval_batches(ds.test, np.arange(6), 8, data.HostTransform(10),
                                        process_index=0, process_count=1)))
  assert m.tolist() == [True] * 6 + [False] * 2
  # tfds shuffles the records: find each image's id by its (lossless PNG) colour
  ids = [_COLOURS.index(tuple(int(v) for v in px)) for px in x[:6, 4, 5]]
  assert sorted(ids) == list(range(6))
  np.testing.assert_array_equal(y[:6], np.asarray(ids) % 2)


def test_missing_module_message_names_it_not_the_network(tmp_path, monkeypatch):
  def prepare(self, *a, **k):
    raise ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
  with pytest.raises(data.MissingDependencyError) as e:
    data.load_dataset("tfds:cft_jax_tiny_images", root=str(tmp_path))
  msg = str(e.value)
  assert "'importlib_resources' is not installed" in msg and "pip install importlib_resources" in msg
  assert "internet" not in msg
  with pytest.raises(data.MissingDependencyError, match="importlib_resources.*dataset-fashion"):
    data.load_dataset("fashion_mnist", root=str(tmp_path))  # no IDX files: the tfds fallback
