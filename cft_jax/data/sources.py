"""Random-access image sources (grain ``RandomAccessDataSource`` protocol) and lazy datasets.

A source holds what is cheap (a file list, a tfds array_record reader, or an in-memory array)
plus every example's label; ``source[i]`` decodes example ``i`` on demand, in whichever grain
worker asks for it. Nothing holds the decoded dataset, so host memory does not grow with the
number of images.

- :class:`FileSource`: image files (JPEG/PNG/BMP/...), decoded with PIL;
- :class:`TfdsSource`: a ``tfds`` ``data_source`` split read with the image left encoded
  (``tfds.decode.SkipDecoding``) and decoded here with PIL (no TensorFlow);
- :class:`ArraySource`: an in-memory ``uint8 [N, H, W, C]`` array (the small IDX sets).

:class:`StreamingDataset` pairs a train and a test source with the class names; its
``train_images`` / ``test_images`` are :class:`LazyImages` views (indexing decodes and applies
the test transform), so code written for the in-memory :class:`ImageDataset` keeps working.
"""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from cft_jax.data.preprocess import HostTransform
from cft_jax.errors import (  # noqa: F401  (re-exported)
    BadDataError, DatasetNotFoundError, MissingDependencyError)


def _reason(error: BaseException) -> str:
  """``Type: message`` of a decoder error, without the repr of the in-memory buffer PIL names
  (``cannot identify image file <_io.BytesIO object at 0x...>``)."""
  msg = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error))
  return f"{type(error).__name__}: {msg}"


def decode_image_bytes(data: bytes, what: str) -> Image.Image:
  """Decodes encoded image bytes fully (truncated files fail here, not later).

  Raises:
    BadDataError: naming ``what`` (the file or record) and the decoder's complaint (an empty
      file is called one).
  """
  reason = "empty file (0 bytes)" if not data else None
  if reason is None:
    try:
      im = Image.open(io.BytesIO(data))
      im.load()
      return im
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many types on bad files)
      reason = _reason(e)
  raise BadDataError(f"cannot decode image {what}: {reason}. Remove or replace the file, or set "
                     f"data.skip_corrupt=True to skip such files.")


def check_image_bytes(data: bytes) -> Optional[str]:
  """Why encoded image bytes cannot be used, or None when they decode; a cheap check.

  JPEG: decoded at 1/8 scale (``Image.draft``: the whole entropy-coded stream is read, so a
  truncated file fails, at a fraction of the cost of a full decode); PNG: ``Image.verify``
  (every chunk and its CRC); other formats: a full decode.

  Returns:
    ``None``, or a one-line reason (``"empty file (0 bytes)"``, ``"OSError: image file is
    truncated ..."``, ``"UnidentifiedImageError: cannot identify image file"``).
  """
  if not data:
    return "empty file (0 bytes)"
  try:
    im = Image.open(io.BytesIO(data))
    if im.format == "JPEG":
      im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
      im.load()
    elif im.format == "PNG":
      im.verify()
    else:
      im.load()
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types on bad files)
    return _reason(e)
  return None


def check_example(source: Any, i: int) -> Optional[str]:
  """Why example ``i`` of ``source`` cannot be used, or None: ``source.check(i)`` (a cheap
  check, see :func:`check_image_bytes`) when the source has one, else a full decode.

  Returns:
    ``None`` or a one-line reason.
  """
  check = getattr(source, "check", None)
  if check is not None:
    return check(int(i))
  try:
    source[int(i)]
  except BadDataError as e:
    return str(e)
  return None


class FileSource:
  """Image files with labels; ``source[i]`` opens and fully decodes ``paths[i]``.

  Args:
    paths: file paths.
    labels: ``[N]`` int class ids.
  """

  def __init__(self, paths: Sequence[str], labels: Sequence[int]):
    self.paths = tuple(paths)
    self.labels = np.asarray(labels, np.int32)
    if len(self.paths) != len(self.labels):
      raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> Image.Image:
    """The decoded original image (PIL, any mode and size).

    Raises:
      BadDataError: an unreadable or corrupt file (named).
    """
    path = self.paths[int(i)]
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadDataError(f"cannot read image {path}: {e}") from e
    return decode_image_bytes(data, path)

  def check(self, i: int) -> Optional[str]:
    """Why file ``i`` cannot be used (unreadable, empty, corrupt), or None
    (:func:`check_image_bytes`: cheaper than decoding it)."""
    try:
      with open(self.paths[int(i)], "rb") as f:
        return check_image_bytes(f.read())
    except OSError as e:
      return f"cannot read: {e.strerror or e}"

  def describe(self, i: int) -> str:
    return self.paths[int(i)]

  def __repr__(self) -> str:
    return f"FileSource({len(self)} files)"


class ArraySource:
  """In-memory ``uint8 [N, H, W, C]`` images (a view; nothing is copied)."""

  def __init__(self, images: np.ndarray, labels: Sequence[int]):
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> np.ndarray:
    return self.images[int(i)]

  def check(self, i: int) -> Optional[str]:  # pylint: disable=unused-argument
    """Decoded arrays cannot be corrupt: always None."""
    return None

  def describe(self, i: int) -> str:
    return f"array row {int(i)}"

  def __repr__(self) -> str:
    return f"ArraySource({len(self)} images)"


class TfdsSource:
  """One split of a tfds dataset through ``tfds.data_source`` with the image kept encoded.

  Labels are read once at construction (the image bytes are not decoded then).

  Args:
    data_source: what ``builder.as_data_source(split, decoders={image_key: SkipDecoding()})``
      returns (random access over array_record files).
    image_key, label_key: feature names.
    name: ``"<dataset>/<split>"`` for error messages.
  """

  def __init__(self, data_source: Any, image_key: str = "image", label_key: str = "label",
               name: str = "tfds", labels: Optional[np.ndarray] = None):
    self.data_source = data_source
    self.image_key, self.label_key, self.name = image_key, label_key, name
    if labels is None:
      labels = np.fromiter((int(data_source[i][label_key]) for i in range(len(data_source))),
                           np.int32, count=len(data_source))
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int):
    x = self.data_source[int(i)][self.image_key]
    if isinstance(x, (bytes, np.bytes_)):
      return decode_image_bytes(bytes(x), self.describe(i))
    return np.asarray(x, np.uint8)

  def check(self, i: int) -> Optional[str]:
    """Why record ``i``'s image cannot be used, or None (:func:`check_image_bytes`)."""
    try:
      x = self.data_source[int(i)][self.image_key]
    except Exception as e:  # pylint: disable=broad-except  (array_record / tfds read errors)
      return f"cannot read: {_reason(e)}"
    return check_image_bytes(bytes(x)) if isinstance(x, (bytes, np.bytes_)) else None

  def describe(self, i: int) -> str:
    return f"{self.name}[{int(i)}]"

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {len(self)} records)"


class SubsetSource:
  """``base`` restricted to ``indices`` (e.g. the seeded 80/20 split of one tfds split)."""

  def __init__(self, base: Any, indices: np.ndarray):
    self.base = base
    self.indices = np.asarray(indices, np.int64)
    self.labels = np.asarray(base.labels)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.base[int(self.indices[int(i)])]

  def check(self, i: int) -> Optional[str]:
    """:func:`check_example` of the base example ``i`` stands for."""
    return check_example(self.base, int(self.indices[int(i)]))

  def describe(self, i: int) -> str:
    return self.base.describe(int(self.indices[int(i)]))

  def __repr__(self) -> str:
    return f"SubsetSource({self.base!r}, {len(self)})"


class LazyImages:
  """Array-like ``uint8 [N, S, S, 3]`` view of a source: ``images[idx]`` decodes the requested
  examples (serially, in this process) and applies the evaluation transform.

  For code that gathers a few batches from ``ds.train_images`` (curvature estimators, k-NN
  probes, corruption benchmarks); the training and evaluation loops stream through
  :mod:`cft_jax.data.loader` instead.
  """

  def __init__(self, source: Any, transform: HostTransform):
    self.source, self.transform = source, transform
    S = transform.image_size
    self.shape = (len(source), S, S, 3)
    self.dtype = np.dtype(np.uint8)
    self.ndim = 4

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx):
    if isinstance(idx, (int, np.integer)):
      return self.transform(self.source[int(idx)], None)
    if isinstance(idx, slice):
      idx = np.arange(len(self))[idx]
    idx = np.asarray(idx)
    if idx.dtype == bool:
      idx = np.flatnonzero(idx)
    out = np.empty((len(idx),) + self.shape[1:], np.uint8)
    for j, i in enumerate(idx):
      out[j] = self.transform(self.source[int(i)], None)
    return out

  def __array__(self, dtype=None, copy=None):
    raise TypeError("LazyImages would decode the whole dataset: index it (images[idx]) or stream "
                    "it with cft_jax.data.loader")


@dataclasses.dataclass(frozen=True)
class StreamingDataset:
  """A dataset read lazily from sources (image folders, tfds array_record files).

  Attributes:
    train, test: sources (``len``, ``[i]`` -> decoded image, ``.labels [N]`` int32).
    class_names: ``C`` names, index = class id.
    name: registry name.
    image_size: side ``S`` of :attr:`train_images` / :attr:`test_images` views.
    crop_fraction: evaluation centre-crop fraction of those views.
  """

  train: Any
  test: Any
  class_names: Tuple[str, ...]
  name: str = ""
  image_size: int = 224
  crop_fraction: float = 0.875
  streaming = True

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def train_labels(self) -> np.ndarray:
    return self.train.labels

  @property
  def test_labels(self) -> np.ndarray:
    return self.test.labels

  def _view(self, source) -> LazyImages:
    return LazyImages(source, HostTransform(self.image_size, train=False,
                                            crop_fraction=self.crop_fraction))

  @property
  def train_images(self) -> LazyImages:
    return self._view(self.train)

  @property
  def test_images(self) -> LazyImages:
    return self._view(self.test)

  def validate(self) -> "StreamingDataset":
    """Checks that both splits have images, labels are in range, and every class has images in
    both splits.

    Raises:
      BadDataError: naming the split or the classes.
    """
    C = self.num_classes
    for split in ("train", "test"):
      y = getattr(self, split).labels
      if not len(y):
        raise BadDataError(f"{self.name}: the {split} split has no images")
      if y.min() < 0 or y.max() >= C:
        bad = sorted(set(int(v) for v in y[(y < 0) | (y >= C)]))[:5]
        raise BadDataError(f"{self.name}: {split} labels {bad} out of range [0, {C}) "
                           f"({C} class names)")
      missing = sorted(set(range(C)) - set(np.unique(y).tolist()))
      if missing:
        names = [self.class_names[c] for c in missing[:10]]
        raise BadDataError(f"{self.name}: {len(missing)} class(es) have no {split} images: "
                           f"{names}{' ...' if len(missing) > 10 else ''}. Every class needs "
                           f"images in both splits (remove the class or add images).")
    return self
