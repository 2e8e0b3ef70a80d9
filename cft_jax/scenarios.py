"""Continual-learning scenarios: how a dataset's classes are split into a task sequence.

A scenario is a frozen, seeded description. Class-incremental learning relabels the classes so
that task ``t`` owns the contiguous label range ``[t * k, (t + 1) * k)`` with ``k`` classes per
task; the order of the original classes is a permutation drawn from ``scenario.seed``
(seed 0 with ``shuffle_classes=False`` keeps the natural order).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassIncremental:
  """A class-incremental task sequence.

  Attributes:
    class_order: ``[C]`` original class ids in the order they are learned; the class
      ``class_order[j]`` gets incremental label ``j``.
    num_tasks: number of tasks ``T``.
  """

  class_order: Tuple[int, ...]
  num_tasks: int

  @property
  def num_classes(self) -> int:
    return len(self.class_order)

  @property
  def classes_per_task(self) -> int:
    return self.num_classes // self.num_tasks

  def task_range(self, task_id: int) -> Tuple[int, int]:
    """Incremental label range ``[lo, hi)`` of task ``task_id`` (0-based)."""
    if not 0 <= task_id < self.num_tasks:
      raise ValueError(f"task_id must be in [0, {self.num_tasks}), got {task_id}")
    k = self.classes_per_task
    return task_id * k, (task_id + 1) * k

  def task_of_label(self, labels: np.ndarray) -> np.ndarray:
    """Task id ``[N]`` of incremental labels ``[N]``."""
    return np.asarray(labels) // self.classes_per_task

  def relabel(self, labels: np.ndarray) -> np.ndarray:
    """Maps original labels ``[N]`` (``0..C-1``) to incremental labels ``[N]`` (int32).

    Raises:
      ValueError: if a label is outside ``[0, C)``.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(
          f"labels must be in [0, {self.num_classes}), got range [{labels.min()}, {labels.max()}]")
    inverse = np.empty(self.num_classes, dtype=np.int32)
    inverse[np.asarray(self.class_order)] = np.arange(self.num_classes, dtype=np.int32)
    return inverse[labels]


def class_incremental(num_classes: int, num_tasks: int, seed: int = 0,
                      shuffle_classes: bool = True) -> ClassIncremental:
  """Builds a class-incremental scenario with ``num_classes / num_tasks`` classes per task.

  Args:
    num_classes: total number of classes ``C`` in the dataset.
    num_tasks: number of tasks ``T``; must divide ``C``.
    seed: seed of the class-order permutation (``scenario.seed``).
    shuffle_classes: if False the natural order ``0..C-1`` is used.

  Raises:
    ValueError: if ``T`` does not divide ``C`` or is not positive.
  """
  if num_tasks < 1:
    raise ValueError(f"scenario.num_tasks must be >= 1, got {num_tasks}")
  if num_classes % num_tasks:
    raise ValueError(
        f"scenario.num_tasks={num_tasks} does not divide the {num_classes} classes of the dataset; "
        f"choose one of {[d for d in range(1, num_classes + 1) if num_classes % d == 0]}")
  order = np.arange(num_classes)
  if shuffle_classes:
    order = np.random.default_rng(seed).permutation(num_classes)
  return ClassIncremental(class_order=tuple(int(c) for c in order), num_tasks=num_tasks)


@dataclasses.dataclass(frozen=True)
class DataIncremental:
  """Data-incremental learning: the training set is split into ``T`` random parts, every task
  has all ``C`` classes, and every task is evaluated on the whole test set (DLCFT §4.1).

  Attributes:
    num_classes: ``C``.
    num_tasks: ``T``.
    seed: seed of the split.
  """

  num_classes: int
  num_tasks: int
  seed: int = 0

  @property
  def class_order(self) -> Tuple[int, ...]:
    return tuple(range(self.num_classes))

  @property
  def classes_per_task(self) -> int:
    return self.num_classes

  def task_range(self, task_id: int) -> Tuple[int, int]:
    """All classes: ``(0, C)``."""
    if not 0 <= task_id < self.num_tasks:
      raise ValueError(f"task_id must be in [0, {self.num_tasks}), got {task_id}")
    return 0, self.num_classes

  def relabel(self, labels: np.ndarray) -> np.ndarray:
    """Identity (with the range check of :meth:`ClassIncremental.relabel`)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"labels must be in [0, {self.num_classes})")
    return labels.astype(np.int32)

  def split(self, n: int) -> list:
    """``T`` disjoint index arrays covering ``range(n)`` (seeded random, near-equal sizes)."""
    perm = np.random.default_rng(self.seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, self.num_tasks)]


SCENARIO_TYPES = ("class_il", "task_il", "data_il")


def make_scenario(kind: str, num_classes: int, num_tasks: int, seed: int = 0,
                  shuffle_classes: bool = True):
  """Builds ``scenario.type``: ``class_il`` / ``task_il`` (class splits; task-IL is evaluated with
  the task id, training is identical: per-task heads = the task's slice of one wide head) or
  ``data_il``.

  Raises:
    ValueError: unknown type, or classes not divisible into tasks.
  """
  if kind in ("class_il", "task_il"):
    return class_incremental(num_classes, num_tasks, seed, shuffle_classes)
  if kind == "data_il":
    if num_tasks < 1:
      raise ValueError(f"scenario.num_tasks must be >= 1, got {num_tasks}")
    return DataIncremental(num_classes, num_tasks, seed)
  raise ValueError(f"unknown scenario.type '{kind}'; known: {list(SCENARIO_TYPES)}")
