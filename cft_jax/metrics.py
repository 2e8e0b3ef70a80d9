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


def summarize(R, num_trained: Optional[int] = None) -> dict:
  """All scalar metrics of one accuracy matrix as a dict (keys as in ``metrics.json``)."""
  return {
      "final_accuracy": final_accuracy(R, num_trained),
      "avg_incremental_accuracy": avg_incremental_accuracy(R, num_trained),
      "forgetting": forgetting(R, num_trained),
      "bwt": bwt(R, num_trained),
  }


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
