"""The trainer's streamed input (``data.pipeline``): which path a run takes, and the grain path.

``data.pipeline``:

- ``"device"``: the in-memory path. The host gathers uint8 batches
  (:func:`cft_jax.data.pipeline.batches`), the jitted step resizes and augments them on the
  device (:class:`cft_jax.data.pipeline.Preprocess`). Fastest for small images held in memory
  (Fashion-MNIST, MNIST: the README main job).
- ``"grain"``: the streamed path. :class:`StreamInput` builds, per task, a
  :class:`cft_jax.data.loader.TaskBatches` that decodes each image in grain workers and applies
  the field's transforms to the *original* image (:mod:`cft_jax.data.preprocess`:
  RandomResizedCrop + flip for training, resize + centre crop for testing); the device then only
  normalises. Memory does not grow with the dataset.
- ``"auto"`` (default): ``grain`` for streamed datasets (``image_folder``, ``cifar100``,
  ``imagenet_r``, ``domainnet``, ``tfds:<name>``), ``device`` for the in-memory ones.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from cft_jax.data.loader import TaskBatches
from cft_jax.data.preprocess import RATIO, HostTransform
from cft_jax.data.sources import ArraySource

PIPELINES = ("auto", "device", "grain")


def uses_grain(ds: Any, pipeline: str = "auto") -> bool:
  """Whether ``data.pipeline`` sends dataset ``ds`` through the grain path.

  Raises:
    ValueError: an unknown ``pipeline``.
  """
  if pipeline not in PIPELINES:
    raise ValueError(f"data.pipeline must be one of {PIPELINES}, got {pipeline!r}")
  if pipeline == "auto":
    return bool(getattr(ds, "streaming", False))
  return pipeline == "grain"


class StreamInput:
  """Per-task train iterators and test iterators of one run on the grain path.

  Args:
    ds: a :class:`~cft_jax.data.sources.StreamingDataset` (or an in-memory
      :class:`~cft_jax.data.datasets.ImageDataset`, wrapped in array sources).
    train_labels, test_labels: the labels the steps see (relabelled by the class order).
    data_cfg: the ``config.data`` section (``image_size``, ``augment``, ``rrc_scale``,
      ``rrc_ratio``, ``test_crop_fraction``, ``resample``, ``workers``, ``read_threads``,
      ``skip_corrupt``).
    batch_size, eval_batch_size, epochs, seed: from ``config.train`` / ``config.eval``.
    process_index, process_count: this process (default: JAX's).
  """

  def __init__(self, ds: Any, train_labels: np.ndarray, test_labels: np.ndarray, data_cfg: Any,
               batch_size: int, eval_batch_size: int, epochs: int, seed: int,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    if getattr(ds, "streaming", False):
      self.train_source, self.test_source = ds.train, ds.test
    else:
      self.train_source = ArraySource(ds.train_images, ds.train_labels)
      self.test_source = ArraySource(ds.test_images, ds.test_labels)
    self.train_labels = np.asarray(train_labels, np.int32)
    self.test_labels = np.asarray(test_labels, np.int32)
    get = data_cfg.get
    S = int(get("image_size", 224))
    common = dict(crop_fraction=float(get("test_crop_fraction", 0.875)),
                  resample=str(get("resample", "bilinear")))
    self.train_transform = HostTransform(
        S, train=True, augment=str(get("augment", "rrc_flip")),
        rrc_scale=tuple(get("rrc_scale", (0.08, 1.0))),
        rrc_ratio=tuple(get("rrc_ratio", RATIO)), crop_padding=int(get("crop_padding", 4)),
        **common)
    self.test_transform = HostTransform(S, train=False, **common)
    self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
    self.epochs, self.seed = epochs, seed
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    self.kw = dict(workers=int(get("workers", 0)), read_threads=int(get("read_threads", 8)),
                   skip_corrupt=bool(get("skip_corrupt", False)), process_index=process_index,
                   process_count=process_count, global_batch=True)
    self.skipped_corrupt = 0

  def train(self, t: int, indices: Sequence[int], state: Optional[Dict[str, int]] = None,
            start_step: int = 0) -> TaskBatches:
    """Task ``t``'s batches over ``indices`` (``epochs`` passes; epoch ``e`` shuffled with
    ``(seed, t, e)``, as the device path), from ``state`` (:meth:`TaskBatches.get_state`, saved
    in the checkpoint) or ``start_step``."""
    it = TaskBatches(self.train_source, indices, self.batch_size, self.epochs, (self.seed, t),
                     self.train_transform, shuffle=True, start_step=start_step,
                     labels=self.train_labels, **self.kw)
    if state:
      it.set_state(state)
    return it

  def test(self, indices: Sequence[int], split: str = "test") -> TaskBatches:
    """One pass over the examples ``indices`` of ``split`` (``"test"``, or ``"train"`` for the
    validation split held out of the training images) with the evaluation transform (resize +
    centre crop), padded batches."""
    source, labels = ((self.train_source, self.train_labels) if split == "train"
                      else (self.test_source, self.test_labels))
    return TaskBatches(source, indices, self.eval_batch_size, 1, (0,),
                       self.test_transform, shuffle=False, labels=labels, **self.kw)

  def evaluate(self, eval_step, state, frozen, indices: Sequence[int], num_seen: int,
               task_lo: int, split: str = "test"):
    """Class-IL and task-IL accuracy (%) of the examples ``indices`` of ``split`` (the
    trainer's ``evaluate`` on streamed batches; ``eval_step`` returns the global correct
    counts)."""
    correct = np.zeros(2, np.int64)
    it = self.test(indices, split)
    for xb, yb, mb in it:
      correct += np.asarray(eval_step(state, frozen, xb, yb, mb, num_seen, task_lo))
    self.skipped_corrupt += it.skipped_corrupt
    n = max(len(indices) - it.skipped_corrupt, 1)  # skipped corrupt files are not scored
    return 100.0 * correct[0] / n, 100.0 * correct[1] / n
