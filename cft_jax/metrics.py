"""Continual-learning metrics on the accuracy matrix (docs/methods.md#metrics).

All functions are pure NumPy. ``R`` is the accuracy matrix ``[T, T]`` in percent (or any unit):
``R[t, i]`` is the accuracy on the test data of task ``i`` after training task ``t``. Entries
with ``i > t`` (tasks not seen yet) are ignored and may hold NaN. Functions accept a partially
filled matrix: only the first ``num_trained`` rows are used (``num_trained`` defaults to all rows).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _rows(R, num_trained: Optional[int]) -> np.ndarray:
  R = np.asarray(R, dtype=np.float64)
  if R.ndim != 2 or R.shape[0] != R.shape[1]:
    raise ValueError(f"accuracy matrix must be square [T, T], got shape {R.shape}")
  n = R.shape[0] if num_trained is None else int(num_trained)
  if not 1 <= n <= R.shape[0]:
    raise ValueError(f"num_trained must be in [1, {R.shape[0]}], got {n}")
  return R[:n, :n]


def final_accuracy(R, num_trained: Optional[int] = None) -> float:
  """Final accuracy ``A_T = mean_i R[T-1, i]`` over the ``T`` tasks trained so far.

  Args:
    R: accuracy matrix ``[T, T]``.
    num_trained: number of trained tasks ``T`` (rows used); default all.

  Returns:
    The mean of the last row over seen tasks, in the unit of ``R``.
  """
  R = _rows(R, num_trained)
  return float(np.mean(R[-1, :]))


def avg_incremental_accuracy(R, num_trained: Optional[int] = None) -> float:
  """Average incremental accuracy ``mean_t mean_{i<=t} R[t, i]`` (Rebuffi et al., iCaRL)."""
  R = _rows(R, num_trained)
  return float(np.mean([np.mean(R[t, : t + 1]) for t in range(R.shape[0])]))


def forgetting(R, num_trained: Optional[int] = None) -> float:
  """Average forgetting ``mean_{i<T-1} (max_{t<T-1} R[t, i] - R[T-1, i])`` (Chaudhry et al. 2018).

  The max runs over the rows ``t`` in ``[i, T-2]`` in which task ``i`` had been seen.
  Returns 0.0 when only one task was trained.
  """
  R = _rows(R, num_trained)
  T = R.shape[0]
  if T < 2:
    return 0.0
  return float(np.mean([np.max(R[i:T - 1, i]) - R[T - 1, i] for i in range(T - 1)]))


def bwt(R, num_trained: Optional[int] = None) -> float:
  """Backward transfer ``BWT = mean_{i<T-1} (R[T-1, i] - R[i, i])`` (Lopez-Paz & Ranzato 2017).

  Negative values mean forgetting. Returns 0.0 when only one task was trained.
  """
  R = _rows(R, num_trained)
  T = R.shape[0]
  if T < 2:
    return 0.0
  return float(np.mean([R[T - 1, i] - R[i, i] for i in range(T - 1)]))


def _sizes(test_sizes, T: int) -> np.ndarray:
  n = np.asarray(test_sizes, dtype=np.float64)
  if n.ndim != 1 or len(n) < T or np.any(n[:T] < 0) or not np.all(np.isfinite(n[:T])):
    raise ValueError(f"test_sizes must list a non-negative test-set size for each of the {T} "
                     f"tasks, got {test_sizes!r}")
  return n[:T]


def sample_weighted_accuracies(R, test_sizes, num_trained: Optional[int] = None) -> np.ndarray:
  """Accuracy over the union of the seen tasks' test samples after every task ``[T]``.

  ``a_t = sum_{i<=t} n_i R[t, i] / sum_{i<=t} n_i``: each task weighted by its test-set size
  ``n_i`` (the accuracy over all seen test images, as LAE, Gao et al. ICCV 2023, and the
  continual PEFT literature report it). Equals the per-task mean when all ``n_i`` are equal; on
  unequal tasks (ImageNet-R) the two differ.

  Args:
    R: accuracy matrix ``[T, T]``.
    test_sizes: number of test samples of each task (``[T]``, or longer: the first ``T`` used).
    num_trained: number of trained tasks (rows used); default all.

  Raises:
    ValueError: sizes missing / negative, or a row whose seen tasks have no test sample.
  """
  R = _rows(R, num_trained)
  T = R.shape[0]
  n = _sizes(test_sizes, T)
  out = []
  for t in range(T):
    w = n[:t + 1]
    if w.sum() <= 0:
      raise ValueError(f"no test samples among the first {t + 1} tasks")
    out.append(float(np.sum(w * R[t, :t + 1]) / w.sum()))
  return np.asarray(out)


def final_accuracy_sample_weighted(R, test_sizes, num_trained: Optional[int] = None) -> float:
  """Final accuracy over the union of all seen test samples (see
  :func:`sample_weighted_accuracies`)."""
  return float(sample_weighted_accuracies(R, test_sizes, num_trained)[-1])


def avg_incremental_accuracy_sample_weighted(R, test_sizes,
                                             num_trained: Optional[int] = None) -> float:
  """Mean over tasks ``t`` of the sample-weighted accuracy after task ``t`` (the average
  incremental accuracy of Rebuffi et al., iCaRL, with each row sample-weighted)."""
  return float(np.mean(sample_weighted_accuracies(R, test_sizes, num_trained)))


def _summarize_tasks(R, tasks, num_trained: Optional[int], test_sizes) -> dict:
  """:func:`summarize` over the columns ``i`` with ``tasks[i]`` only (the formulas of
  :func:`final_accuracy` ... :func:`bwt` with their means restricted to those tasks)."""
  R = _rows(R, num_trained)
  T = R.shape[0]
  keep = np.asarray(tasks, bool)[:T]
  if not keep.any():
    raise ValueError("no task holds data: nothing to summarize")
  rows = [R[t, :t + 1][keep[:t + 1]] for t in range(T) if keep[:t + 1].any()]
  old = [i for i in range(T - 1) if keep[i]]
  out = {"final_accuracy": float(np.mean(R[-1, keep])),
         "avg_incremental_accuracy": float(np.mean([np.mean(r) for r in rows])),
         "forgetting": float(np.mean([np.max(R[i:T - 1, i]) - R[T - 1, i] for i in old]))
                       if old else 0.0,
         "bwt": float(np.mean([R[T - 1, i] - R[i, i] for i in old])) if old else 0.0}
  if test_sizes is not None:
    n = _sizes(test_sizes, T)
    acc = [float(np.sum(n[:t + 1][keep[:t + 1]] * R[t, :t + 1][keep[:t + 1]])
                 / n[:t + 1][keep[:t + 1]].sum())
           for t in range(T) if n[:t + 1][keep[:t + 1]].sum() > 0]
    out["final_accuracy_sample_weighted"] = acc[-1]
    out["avg_incremental_accuracy_sample_weighted"] = float(np.mean(acc))
  return out


def summarize(R, num_trained: Optional[int] = None, test_sizes=None, tasks=None) -> dict:
  """All scalar metrics of one accuracy matrix as a dict (keys as in ``metrics.json``).

  With ``test_sizes`` (test samples per task) it also holds
  ``final_accuracy_sample_weighted`` and ``avg_incremental_accuracy_sample_weighted``
  (:func:`sample_weighted_accuracies`); the other values do not depend on it.

  ``tasks``: ``[T]`` bools, the tasks whose column holds data (e.g. a validation split: a task
  without validation images has a NaN column); every mean then runs over those tasks only
  (None: all).

  Raises:
    ValueError: a non-square matrix, bad sizes, or no task in ``tasks``.
  """
  if tasks is not None:
    return _summarize_tasks(R, tasks, num_trained, test_sizes)
  out = {
      "final_accuracy": final_accuracy(R, num_trained),
      "avg_incremental_accuracy": avg_incremental_accuracy(R, num_trained),
      "forgetting": forgetting(R, num_trained),
      "bwt": bwt(R, num_trained),
  }
  if test_sizes is not None:
    out["final_accuracy_sample_weighted"] = final_accuracy_sample_weighted(R, test_sizes,
                                                                           num_trained)
    out["avg_incremental_accuracy_sample_weighted"] = avg_incremental_accuracy_sample_weighted(
        R, test_sizes, num_trained)
  return out


def format_matrix(R, num_trained: Optional[int] = None, title: str = "accuracy (%)") -> str:
  """Renders the lower triangle of ``R`` as a text table (rows: after task t; cols: task i)."""
  R = _rows(R, num_trained)
  T = R.shape[0]
  head = f"{title:<18}" + "".join(f"{'task ' + str(i):>9}" for i in range(T))
  lines = [head]
  for t in range(T):
    cells = "".join(f"{R[t, i]:9.2f}" if i <= t else f"{'':>9}" for i in range(T))
    lines.append(f"{'after task ' + str(t):<18}" + cells)
  return "\n".join(lines)
