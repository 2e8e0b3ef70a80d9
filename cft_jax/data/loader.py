"""The streaming input pipeline: grain ``DataLoader`` over a task's batch plan.

For one task the trainer asks for ``epochs x ceil(n / B)`` fixed-shape batches of the task's
example indices. Epoch ``e`` visits them in the order
``np.random.default_rng((*seed, e)).permutation(n)`` (the same order as
:func:`cft_jax.data.pipeline.batches` with ``shuffle_seed=(*seed, e)``), and the last batch of
every epoch is padded with ``mask=False`` slots (no example dropped, one compiled step).

The plan is a grain ``RandomAccessDataSource`` whose record ``r`` is one process's slice of one
batch: reading it decodes the slice's examples (lazily, in a grain worker process or read thread) and applies
the :class:`~cft_jax.data.preprocess.HostTransform` with a generator seeded by
``(*seed, step, slot)``, so batches are identical for any number of workers or processes
(grain prefetches whole batches in parallel: ``data.workers`` processes, or
``data.read_threads`` threads when ``workers=0``). Records are laid out process-major and read
through ``grain.python.ShardOptions(jax.process_index(), jax.process_count())``: process ``p``
reads (and decodes) only slots ``[p B/P, (p+1) B/P)`` of every global batch.

The iterator state is ``{"next_step": k, "skipped_corrupt": m}``: :meth:`TaskBatches.get_state`
goes into the checkpoint and :meth:`TaskBatches.set_state` (or ``start_step``) resumes at
batch ``k`` exactly (bit-identical to the uninterrupted run, nothing replayed or decoded
twice, valid for any worker count).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from cft_jax.data.preprocess import HostTransform
from cft_jax.data.sources import BadDataError


def resolve_workers(workers: int) -> int:
  """``data.workers``: ``-1`` -> one worker process per CPU core, ``0`` -> read threads in the
  main process, ``n`` -> ``n`` worker processes."""
  if workers is None or workers < 0:
    return os.cpu_count() or 1
  return int(workers)


class _PlanSource:
  """Record ``r`` = one process's slice of one batch of the task plan (module docstring)."""

  def __init__(self, source: Any, indices: np.ndarray, batch_size: int, epochs: int,
               seed: Tuple[int, ...], transform: HostTransform, shuffle: bool,
               start_step: int, process_count: int, skip_corrupt: bool,
               labels: Optional[np.ndarray] = None):
    self.source, self.transform = source, transform
    self.indices = np.asarray(indices, np.int64)
    self.labels = np.asarray(source.labels if labels is None else labels, np.int32)
    self.B, self.P = batch_size, process_count
    self.b = batch_size // process_count
    self.n = len(self.indices)
    self.nb = -(-self.n // batch_size)
    self.total_steps = epochs * self.nb
    self.start_step = start_step
    self.seed, self.shuffle, self.skip_corrupt = tuple(int(s) for s in seed), shuffle, skip_corrupt
    self._order_epoch, self._order = -1, None

  def __len__(self) -> int:
    return self.P * (self.total_steps - self.start_step)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if epoch != self._order_epoch:
      self._order = (np.random.default_rng((*self.seed, epoch)).permutation(self.n)
                     if self.shuffle else np.arange(self.n))
      self._order_epoch = epoch
    return self._order

  def __getitem__(self, r: int) -> Dict[str, np.ndarray]:
    """Process ``p``'s slice of global batch ``step``, ``r = p * steps + step - start``."""
    p, step = divmod(int(r), self.total_steps - self.start_step)
    step += self.start_step
    epoch, sb = divmod(step, self.nb)
    order = self._epoch_order(epoch)
    S = self.transform.image_size
    out = {"image": np.zeros((self.b, S, S, 3), np.uint8), "label": np.zeros(self.b, np.int32),
           "mask": np.zeros(self.b, bool), "bad": np.zeros(self.b, bool)}
    for j in range(self.b):
      slot = p * self.b + j
      within = sb * self.B + slot
      if within >= self.n:
        continue  # padding of the epoch's last batch
      i = int(self.indices[order[within]])
      out["label"][j] = self.labels[i]
      rng = np.random.default_rng((*self.seed, step, slot)) if self.transform.train else None
      try:
        out["image"][j] = self.transform(self.source[i], rng)
      except BadDataError:
        if not self.skip_corrupt:
          raise
        out["bad"][j] = True
        continue
      out["mask"][j] = True
    return out

  def __repr__(self) -> str:  # grain records it in its own iterator state
    return (f"_PlanSource({self.source!r}, n={self.n}, B={self.B}, P={self.P}, "
            f"steps={self.start_step}..{self.total_steps}, seed={self.seed})")


class TaskBatches:
  """Iterator of one task's batches ``(images uint8 [B/P, S, S, 3], labels int32 [B/P],
  mask bool [B/P])`` for this process, from step ``start_step`` to ``epochs x nb``.

  Args:
    source: a random-access source (:mod:`cft_jax.data.sources`).
    indices: the task's example indices into ``source``.
    batch_size: global batch ``B`` (divisible by ``process_count``).
    epochs: passes over ``indices``.
    seed: seed tuple, e.g. ``(config.seed, task)``; epoch ``e`` shuffles with ``(*seed, e)``.
    transform: the per-example :class:`HostTransform` (train or test).
    shuffle: reshuffle every epoch (False: index order, for evaluation).
    start_step: first batch to produce (resume).
    workers: grain worker processes (0: read threads in this process; -1: one per core).
    read_threads: grain read threads per process (``grain.python.ReadOptions.num_threads``).
    process_index, process_count: this process's shard (default: ``jax.process_index()`` /
      ``jax.process_count()``).
    skip_corrupt: a file that cannot be decoded becomes a masked-out slot counted in
      :attr:`skipped_corrupt` instead of raising.
    labels: ``[len(source)]`` labels to use instead of ``source.labels`` (e.g. relabelled by
      the scenario's class order).
    global_batch: yield ``[B, ...]`` arrays holding this process's rows
      ``[p B/P, (p+1) B/P)`` (the other rows zero, masked out) instead of ``[B/P, ...]``: the
      layout of :mod:`cft_jax.parallel`, whose ``shard`` takes each process's own rows.

  Raises:
    BadDataError: (while iterating) an undecodable file, unless ``skip_corrupt``.
    ValueError: ``batch_size`` not divisible by ``process_count``.
  """

  def __init__(self, source: Any, indices: Sequence[int], batch_size: int, epochs: int,
               seed: Tuple[int, ...], transform: HostTransform, shuffle: bool = True,
               start_step: int = 0, workers: int = 0, read_threads: int = 8,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               skip_corrupt: bool = False, labels: Optional[np.ndarray] = None,
               global_batch: bool = False):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index, process_count = jax.process_index(), jax.process_count()
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} must be divisible by the {process_count} "
                       f"processes reading it")
    indices = np.asarray(indices, np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(source)):
      raise ValueError(f"indices out of range [0, {len(source)}) of {source!r}")
    self._args = dict(source=source, indices=indices, batch_size=batch_size,
                      epochs=epochs, seed=tuple(seed), transform=transform, shuffle=shuffle,
                      process_count=process_count, skip_corrupt=skip_corrupt, labels=labels)
    if labels is not None and len(labels) != len(source):
      raise ValueError(f"{len(labels)} labels for a source of {len(source)} examples")
    self.global_batch = global_batch and process_count > 1
    self.batch_size = batch_size
    self.process_index, self.process_count = process_index, process_count
    self.workers, self.read_threads = resolve_workers(workers), read_threads
    self.skipped_corrupt = 0
    self.total_steps = epochs * (-(-len(indices) // batch_size))
    self._start(start_step)

  def _start(self, step: int) -> None:
    import grain.python as pygrain  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app: defaults
      flags.FLAGS.mark_as_parsed()
    self.next_step = step
    self._it = None
    if step >= self.total_steps:
      return
    plan = _PlanSource(start_step=step, **self._args)
    sampler = pygrain.IndexSampler(
        num_records=len(plan), shuffle=False, num_epochs=1, seed=0,
        shard_options=pygrain.ShardOptions(self.process_index, self.process_count,
                                           drop_remainder=True))
    loader = pygrain.DataLoader(
        data_source=plan, sampler=sampler, operations=(),
        worker_count=self.workers,
        read_options=pygrain.ReadOptions(num_threads=max(1, self.read_threads),
                                         prefetch_buffer_size=max(2, 2 * self.read_threads)))
    self._it = iter(loader)

  def __len__(self) -> int:
    return self.total_steps - self.next_step

  def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return self

  def __next__(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    if self._it is None or self.next_step >= self.total_steps:
      raise StopIteration
    batch = next(self._it)
    self.next_step += 1
    bad = np.asarray(batch["bad"])
    self.skipped_corrupt += int(bad.sum())
    out = (np.asarray(batch["image"]), np.asarray(batch["label"], np.int32),
           np.asarray(batch["mask"], bool) & ~bad)
    if self.global_batch:
      b = self.batch_size // self.process_count
      rows = slice(self.process_index * b, (self.process_index + 1) * b)
      full = tuple(np.zeros((self.batch_size,) + x.shape[1:], x.dtype) for x in out)
      for f, x in zip(full, out):
        f[rows] = x
      out = full
    return out

  def get_state(self) -> Dict[str, int]:
    """JSON-serialisable state: the next batch to produce and the corrupt files skipped."""
    return {"next_step": int(self.next_step), "skipped_corrupt": int(self.skipped_corrupt)}

  def set_state(self, state: Dict[str, int]) -> None:
    """Continues from a :meth:`get_state` dict (the next batch is ``state["next_step"]``)."""
    self.skipped_corrupt = int(state.get("skipped_corrupt", 0))
    self._start(int(state["next_step"]))


def eval_batches(source: Any, indices: Sequence[int], batch_size: int, transform: HostTransform,
                 **kwargs) -> TaskBatches:
  """One pass over ``indices`` in order, padded to full batches (evaluation)."""
  return TaskBatches(source, indices, batch_size, 1, (0,), transform, shuffle=False, **kwargs)
