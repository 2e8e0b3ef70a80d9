"""Continual-learning scenarios: how a dataset's classes are split into a task sequence.

A scenario is a frozen, seeded description. Class-incremental learning relabels the classes so
that task ``t`` owns the contiguous label range ``[t * k, (t + 1) * k)`` with ``k`` classes per
task; the order of the original classes is a permutation drawn from ``scenario.seed``
(seed 0 with ``shuffle_classes=False`` keeps the natural order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from cft_jax.data import subsample
from cft_jax.errors import ConfigError
from cft_jax.schema import Key


@dataclasses.dataclass(frozen=True)
class ClassIncremental:
  """A class-incremental task sequence.

  Attributes:
    class_order: ``[C]`` original class ids in the order they are learned; the class
      ``class_order[j]`` gets incremental label ``j``.
    num_tasks: number of tasks ``T``.
    sizes: classes of each task (``()``: ``C / T`` each); e.g. ``(50, 10, 10, 10, 10, 10)``,
      the "B50-Inc10" protocol (``scenario.first_task_classes=50``).
  """

  class_order: Tuple[int, ...]
  num_tasks: int
  sizes: Tuple[int, ...] = ()
  shares_test_set = False  # every task has its own test set (its classes)

  @property
  def num_classes(self) -> int:
    return len(self.class_order)

  def num_seen(self, task_id: int) -> int:
    """Classes seen after task ``task_id``: ``(task_id + 1) k`` (class-IL predicts among them)."""
    return self.task_range(task_id)[1]

  def task_indices(self, task_id: int, labels: np.ndarray) -> np.ndarray:
    """Indices of the examples (incremental ``labels [N]``) of task ``task_id``'s classes."""
    lo, hi = self.task_range(task_id)
    labels = np.asarray(labels)
    return np.flatnonzero((labels >= lo) & (labels < hi))

  @property
  def task_sizes(self) -> Tuple[int, ...]:
    """Classes of each task (equal: ``(C / T,) * T``)."""
    if self.sizes:
      return tuple(int(k) for k in self.sizes)
    return (self.num_classes // self.num_tasks,) * self.num_tasks

  @property
  def classes_per_task(self) -> int:
    """``k``: classes per task (unequal tasks: the widest task's)."""
    if self.sizes:
      return max(self.task_sizes)
    return self.num_classes // self.num_tasks

  def task_range(self, task_id: int) -> Tuple[int, int]:
    """Incremental label range ``[lo, hi)`` of task ``task_id`` (0-based)."""
    if not 0 <= task_id < self.num_tasks:
      raise ValueError(f"task_id must be in [0, {self.num_tasks}), got {task_id}")
    if self.sizes:
      lo = sum(self.task_sizes[:task_id])
      return lo, lo + self.task_sizes[task_id]
    k = self.classes_per_task
    return task_id * k, (task_id + 1) * k

  def task_of_label(self, labels: np.ndarray) -> np.ndarray:
    """Task id ``[N]`` of incremental labels ``[N]``."""
    if self.sizes:
      return np.searchsorted(np.cumsum(self.task_sizes), np.asarray(labels), side="right")
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
                      shuffle_classes: bool = True, class_order: Sequence[int] = (),
                      first_task_classes: int = 0) -> ClassIncremental:
  """Builds a class-incremental scenario with ``num_classes / num_tasks`` classes per task.

  Args:
    num_classes: total number of classes ``C`` in the dataset.
    num_tasks: number of tasks ``T``; must divide ``C``.
    seed: seed of the class-order permutation (``scenario.seed``).
    shuffle_classes: if False the natural order ``0..C-1`` is used.
    class_order: ``scenario.class_order``: an explicit order (a permutation of ``0..C-1``, e.g.
      a paper's published order); overrides ``seed`` / ``shuffle_classes``.
    first_task_classes: ``scenario.first_task_classes`` ``B > 0``: the first task has ``B``
      classes and the other ``T - 1`` tasks share the rest equally ("B50-Inc10" on CIFAR-100:
      ``B = 50``, ``T = 6``; Hou et al. 2019, PyCIL's ``init_cls`` / ``increment``).

  Raises:
    ConfigError (a ValueError): if ``T`` does not divide ``C`` or is not positive, or
      ``class_order`` is not a permutation of the dataset's class ids.
  """
  if num_tasks < 1:
    raise ConfigError(f"scenario.num_tasks must be >= 1, got {num_tasks}")
  sizes: Tuple[int, ...] = ()
  if first_task_classes:
    rest = num_classes - first_task_classes
    if num_tasks < 2 or not 0 < first_task_classes < num_classes or rest % (num_tasks - 1):
      raise ConfigError(
          f"scenario.first_task_classes={first_task_classes} with scenario.num_tasks={num_tasks}: "
          f"the other {num_tasks - 1} tasks must share the remaining {rest} of the "
          f"{num_classes} classes equally (e.g. first_task_classes=50, num_tasks=6 on 100 "
          f"classes: B50-Inc10)")
    sizes = (first_task_classes,) + (rest // (num_tasks - 1),) * (num_tasks - 1)
  elif num_classes % num_tasks:
    raise ConfigError(
        f"scenario.num_tasks={num_tasks} does not divide the {num_classes} classes of the dataset; "
        f"choose one of {[d for d in range(1, num_classes + 1) if num_classes % d == 0]}")
  order = np.arange(num_classes)
  if class_order:
    given = [int(c) for c in class_order]
    if sorted(given) != list(range(num_classes)):
      missing = sorted(set(range(num_classes)) - set(given))[:10]
      extra = sorted(set(given) - set(range(num_classes)))[:10]
      dup = sorted({c for c in given if given.count(c) > 1})[:10]
      raise ConfigError(f"scenario.class_order must list each of the dataset's {num_classes} class "
                        f"ids 0..{num_classes - 1} once (missing {missing}, out of range "
                        f"{extra}, repeated {dup})")
    order = np.asarray(given)
  elif shuffle_classes:
    order = np.random.default_rng(seed).permutation(num_classes)
  return ClassIncremental(class_order=tuple(int(c) for c in order), num_tasks=num_tasks,
                          sizes=sizes)


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
  shares_test_set = True  # every task is evaluated on the whole test set

  @property
  def class_order(self) -> Tuple[int, ...]:
    return tuple(range(self.num_classes))

  def num_seen(self, task_id: int) -> int:
    """All ``C`` classes are seen from the first task on."""
    del task_id
    return self.num_classes

  def task_indices(self, task_id: int, labels: np.ndarray) -> np.ndarray:
    """Training part ``task_id`` of :meth:`split` over ``len(labels)`` examples."""
    return self.split(len(labels))[task_id]

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

# The ``scenario`` section of the config: keys, defaults and allowed values
# (:mod:`cft_jax.schema`; assembled by :mod:`cft_jax.registry`).
CONFIG_KEYS = (
    Key("type", "class_il", "class_il | task_il (evaluated with the task id) | data_il (all "
        "classes in every task, one shared test set)", choices=SCENARIO_TYPES),
    Key("num_tasks", 5, "number of tasks T (class-/task-IL: must divide the classes)",
        positive=True),
    Key("seed", 1993, "class-order permutation seed"),
    Key("shuffle_classes", True, "permute the class order with scenario.seed (False: natural)"),
    Key("class_order", (), "explicit class order (each class id once); () -> seeded shuffle"),
    Key("first_task_classes", 0, ">0: first task's classes, the rest split equally (B50-Inc10)",
        non_negative=True),
)


def make_scenario(kind: str, num_classes: int, num_tasks: int, seed: int = 0,
                  shuffle_classes: bool = True, class_order: Sequence[int] = (),
                  first_task_classes: int = 0):
  """Builds ``scenario.type``: ``class_il`` / ``task_il`` (class splits; task-IL is evaluated with
  the task id, training is identical: per-task heads = the task's slice of one wide head) or
  ``data_il``.

  Raises:
    ConfigError (a ValueError): unknown type, or classes not divisible into tasks.
  """
  if kind in ("class_il", "task_il"):
    return class_incremental(num_classes, num_tasks, seed, shuffle_classes, class_order,
                             first_task_classes)
  if kind == "data_il":
    if num_tasks < 1:
      raise ConfigError(f"scenario.num_tasks must be >= 1, got {num_tasks}")
    return DataIncremental(num_classes, num_tasks, seed)
  raise ConfigError(f"unknown scenario.type '{kind}'; known: {list(SCENARIO_TYPES)}")


@dataclasses.dataclass
class Scenario:
  """A scenario applied to a dataset: what each task trains on and is tested on.

  The trainer asks this object, never the scenario type: the task splits, the test set of each
  task, how many classes a class-IL prediction ranges over (:meth:`num_seen`), and whether the
  tasks share one test set (data-IL: evaluated once, copied to every seen task).

  Attributes:
    spec: the task sequence (:class:`ClassIncremental` or :class:`DataIncremental`).
    train_labels: ``[N_train]`` incremental labels of the whole training set.
    test_labels: ``[N_test]`` incremental labels of the whole test set.
    train_idx: per task, indices into the training set (after ``data.train_limit``, without the
      validation part; tasks ``0..t`` for a method with ``cumulative_data``).
    val_idx: per task, held-out training indices (``data.val_fraction``; empty when 0).
    test_idx: per task, indices into the test set (after ``data.test_limit``).
    radius_idx: per task, held-out training indices for TPGM's radius updates
      (``data.radius_fraction``), disjoint from ``val_idx``; None when that fraction is 0 (TPGM
      then uses ``val_idx``: :meth:`radius_split`).
  """

  spec: Union[ClassIncremental, DataIncremental]
  train_labels: np.ndarray
  test_labels: np.ndarray
  train_idx: List[np.ndarray]
  val_idx: List[np.ndarray]
  test_idx: List[np.ndarray]
  radius_idx: Optional[List[np.ndarray]] = None

  def radius_split(self, t: int) -> np.ndarray:
    """Task ``t``'s held-out indices for TPGM's radii: ``radius_idx[t]``, or ``val_idx[t]``
    when no separate split was drawn (``data.radius_fraction = 0``)."""
    return self.val_idx[t] if self.radius_idx is None else self.radius_idx[t]

  @property
  def num_tasks(self) -> int:
    return self.spec.num_tasks

  @property
  def num_classes(self) -> int:
    return len(self.spec.class_order)

  @property
  def classes_per_task(self) -> int:
    return self.spec.classes_per_task

  @property
  def task_sizes(self) -> Tuple[int, ...]:
    """Classes of each task (what the steps slice; data-IL: every class in every task)."""
    return tuple(getattr(self.spec, "task_sizes", (self.spec.classes_per_task,) * self.num_tasks))

  @property
  def class_order(self) -> Tuple[int, ...]:
    return tuple(self.spec.class_order)

  @property
  def shares_test_set(self) -> bool:
    return self.spec.shares_test_set

  def task_range(self, task_id: int) -> Tuple[int, int]:
    return self.spec.task_range(task_id)

  def num_seen(self, task_id: int) -> int:
    """Head columns a class-IL prediction after task ``task_id`` ranges over."""
    return self.spec.num_seen(task_id)

  def relabel(self, labels: np.ndarray) -> np.ndarray:
    return self.spec.relabel(labels)

  def knn_memory(self, task_id: int) -> np.ndarray:
    """Training indices a k-NN probe after ``task_id`` may use: the data seen so far (data-IL:
    the whole training set, every part has every class)."""
    parts = self.train_idx if self.shares_test_set else self.train_idx[:task_id + 1]
    return np.unique(np.concatenate(parts))

  def seen_test(self, task_id: int) -> np.ndarray:
    """Test indices of tasks ``0..task_id`` (sorted, unique)."""
    return np.unique(np.concatenate(self.test_idx[:task_id + 1]))

  def all_test(self) -> np.ndarray:
    """Every task's test indices once (the in-distribution set of the OOD evaluation)."""
    return self.test_idx[0] if self.shares_test_set else np.concatenate(self.test_idx)


def _subsample(idx: np.ndarray, limit: Any, seed: int) -> np.ndarray:
  return subsample(idx, limit, seed=seed)


def build_scenario(config: Any, train_labels: np.ndarray, test_labels: np.ndarray,
                   num_classes: int, cumulative_data: bool = False) -> Scenario:
  """The :class:`Scenario` of a resolved config on a dataset's original labels.

  Task ``t``'s training indices are subsampled to ``data.train_limit`` (seed
  ``1000 seed + t``) and split into a validation part of ``data.val_fraction`` (seed
  ``(seed, t, 99)``), a TPGM radius part of ``data.radius_fraction`` (seed ``(seed, t, 98)``,
  from what validation left) and the rest; its test indices to ``data.test_limit`` (seed
  ``1000 seed + 7 + t``, with ``t = 0`` for a shared test set).

  Args:
    config: resolved config (``scenario.*``, ``data.train_limit/test_limit/val_fraction``,
      ``seed``).
    train_labels, test_labels: original labels ``[N]`` of the dataset's splits.
    num_classes: ``C``.
    cumulative_data: task ``t`` trains on the data of tasks ``0..t`` (joint training).

  Raises:
    ConfigError: tasks that do not divide the classes, or a task without training images.
  """
  spec = make_scenario(config.scenario.type, num_classes, config.scenario.num_tasks,
                       seed=config.scenario.seed, shuffle_classes=config.scenario.shuffle_classes,
                       class_order=tuple(config.scenario.class_order),
                       first_task_classes=int(config.scenario.first_task_classes))
  tr_labels, te_labels = spec.relabel(train_labels), spec.relabel(test_labels)
  train_idx, val_idx, test_idx, radius_idx = [], [], [], []
  seed = config.seed
  for t in range(spec.num_tasks):
    tr = _subsample(spec.task_indices(t, tr_labels), config.data.train_limit, seed * 1000 + t)
    n_task = len(tr)
    val, tr = _hold_out(tr, int(round(config.data.val_fraction * n_task)), (seed, t, 99))
    rad, tr = _hold_out(tr, int(round(config.data.radius_fraction * n_task)), (seed, t, 98))
    val_idx.append(val)  # held out from the task's training data (never the test data)
    radius_idx.append(rad)
    train_idx.append(tr)
    test_task = 0 if spec.shares_test_set else t
    test_idx.append(_subsample(spec.task_indices(test_task, te_labels) if not spec.shares_test_set
                               else np.arange(len(te_labels)), config.data.test_limit,
                               seed * 1000 + test_task + 7))
    if len(tr) == 0:
      raise ConfigError(f"task {t} has no training images (data.train_limit="
                        f"{config.data.train_limit}, data.val_fraction={config.data.val_fraction})")
  if cumulative_data:  # joint training: task t sees the data of tasks 0..t
    train_idx = [np.concatenate(train_idx[:t + 1]) for t in range(spec.num_tasks)]
  return Scenario(spec, tr_labels, te_labels, train_idx, val_idx, test_idx,
                  radius_idx if config.data.radius_fraction > 0 else None)


def _hold_out(idx: np.ndarray, n: int, seed) -> Tuple[np.ndarray, np.ndarray]:
  """``(n of idx drawn with default_rng(seed), the rest)``, both sorted; n = 0: nothing held."""
  if not n:
    return np.zeros(0, np.int64), idx
  perm = np.random.default_rng(seed).permutation(len(idx))
  return np.sort(idx[perm[:n]]), np.sort(idx[perm[n:]])
