"""Matplotlib figures of a run: accuracy-matrix heatmap, accuracy vs task, entropy/alpha vs step.

Every function takes plain data (lists / NumPy arrays, as stored in ``metrics.json`` and
``log.jsonl``), draws on a new figure, saves a PNG when ``path`` is given and returns the figure.
Outside IPython/Jupyter the non-interactive ``Agg`` backend is selected, so plots work on
headless machines; inside a notebook the notebook's backend is left alone (inline display).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np


def _plt():
  import sys  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  if "IPython" not in sys.modules and "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _finish(fig, path: Optional[str]):
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
    _plt().close(fig)
  return fig


def task_labels(class_names: Sequence[str], num_tasks: int, shown: int = 2) -> List[str]:
  """Short labels of the tasks' classes, ``"t: name, name +k"``, from the class names in class
  order (``metrics.json['class_names']``); plain task ids when the classes do not split into
  ``num_tasks`` equal tasks (e.g. data-IL, an unequal first task).

  Args:
    class_names: ``C`` names, task ``t`` holding names ``t C/T .. (t+1) C/T - 1``.
    num_tasks: ``T``.
    shown: names shown per task (the rest counted).
  """
  C = len(class_names)
  if not C or C % num_tasks:
    return [f"{t}" for t in range(num_tasks)]
  k = C // num_tasks
  out = []
  for t in range(num_tasks):
    names = list(class_names[t * k:(t + 1) * k])
    more = f" +{len(names) - shown}" if len(names) > shown else ""
    out.append(f"{t}: {', '.join(names[:shown])}{more}")
  return out


def accuracy_heatmap(R, path: Optional[str] = None, title: str = "class-IL accuracy (%)",
                     class_names: Sequence[str] = ()):
  """Heatmap of the accuracy matrix ``R [T, T]`` (row: after task t, column: task i; NaN blank);
  with ``class_names`` (class order) the rows name each task's classes (:func:`task_labels`)."""
  plt = _plt()
  R = np.array(R, dtype=float)
  T = R.shape[0]
  rows = task_labels(class_names, T) if len(class_names) > T else [f"{t}" for t in range(T)]
  width = 0.8 * T + 0.09 * max(len(r) for r in rows)
  fig, ax = plt.subplots(figsize=(1.0 + width, 0.8 + 0.7 * T))
  im = ax.imshow(np.ma.masked_invalid(R), vmin=0, vmax=100, cmap="viridis")
  for t in range(T):
    for i in range(T):
      if np.isfinite(R[t, i]):
        ax.text(i, t, f"{R[t, i]:.1f}", ha="center", va="center",
                color="white" if R[t, i] < 60 else "black", fontsize=8)
  ax.set_xticks(range(T), [f"{i}" for i in range(T)])
  ax.set_yticks(range(T), rows)
  ax.set_xlabel("evaluated task i")
  ax.set_ylabel("after training task t")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  return _finish(fig, path)


def accuracy_vs_task(curves: Mapping[str, Sequence[float]], path: Optional[str] = None,
                     stds: Optional[Mapping[str, Sequence[float]]] = None,
                     ylabel: str = "average accuracy on seen tasks (%)"):
  """Lines of accuracy after each task, one per name (e.g. ``class_il``/``task_il`` or objectives).

  The x axis is the task id ``t`` (0-based, as everywhere in cft_jax), one integer tick each.

  Args:
    curves: name -> ``[T]`` accuracy after task ``t`` (mean over seen tasks).
    path: PNG path (None: do not save).
    stds: optional name -> ``[T]`` standard deviations, drawn as bands.
  """
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  T = max((len(ys) for ys in curves.values()), default=0)
  for name, ys in curves.items():
    ys = np.asarray(ys, float)
    xs = np.arange(len(ys))
    ax.plot(xs, ys, marker="o", label=name)
    if stds and name in stds:
      s = np.asarray(stds[name], float)
      ax.fill_between(xs, ys - s, ys + s, alpha=0.2)
  ax.set_xticks(range(T))
  ax.set_xlabel("after training task t")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _finish(fig, path)


def entropy_alpha_vs_step(records: Iterable[Mapping], path: Optional[str] = None):
  """Mean prediction entropy (nats) and the aEPG weight ``alpha_t`` against the global step.

  Task boundaries (dashed) are drawn at the global step where each task starts: a record's
  ``global_step - step`` (``step``: steps done in its task), not at the new task's first logged
  step (``train.log_every`` steps later).

  Args:
    records: ``log.jsonl`` records with ``global_step``, ``step``, ``entropy``, ``alpha`` and
      ``task``.
  """
  plt = _plt()
  records = list(records)
  steps = np.array([r["global_step"] for r in records])
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  ax1.plot(steps, [r["entropy"] for r in records], lw=1)
  ax1.set_ylabel("prediction entropy (nats)")
  ax2.plot(steps, [r["alpha"] for r in records], lw=1, color="tab:orange")
  ax2.set_ylabel("alpha_t (weight of CE)")
  ax2.set_xlabel("training step")
  for r0, r1 in zip(records, records[1:]):
    if r1["task"] != r0["task"]:
      start = r1["global_step"] - r1.get("step", 0)
      for ax in (ax1, ax2):
        ax.axvline(start, color="grey", lw=0.5, ls="--")
  ax1.grid(alpha=0.3)
  ax2.grid(alpha=0.3)
  return _finish(fig, path)


def entropy_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: Optional[str] = None):
  """Entropy vs step for several runs: name -> ``(steps [N], entropy [N])``."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, (xs, ys) in curves.items():
    ax.plot(xs, ys, lw=1, label=name)
  ax.set_xlabel("training step")
  ax.set_ylabel("mean prediction entropy (nats)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _finish(fig, path)


def read_log(path: str) -> List[Dict]:
  """Reads a ``log.jsonl`` file into a list of dicts."""
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def seen_task_means(R) -> np.ndarray:
  """``[T]`` mean accuracy over seen tasks after each task (row means of the lower triangle)."""
  R = np.array(R, dtype=float)
  return np.array([np.mean(R[t, :t + 1]) for t in range(R.shape[0])])


def plot_run(workdir: str) -> List[str]:
  """Writes the standard PNGs of a finished run into ``workdir`` and returns their paths.

  Files: ``accuracy_matrix.png``, ``task_il_accuracy_matrix.png``, ``accuracy_vs_task.png``,
  ``entropy_alpha.png`` (when ``log.jsonl`` has records).
  """
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  out = []
  p = os.path.join(workdir, "accuracy_matrix.png")
  names = m.get("class_names") or ()
  accuracy_heatmap(m["accuracy_matrix"], p, "class-IL accuracy (%)", names)
  out.append(p)
  p = os.path.join(workdir, "task_il_accuracy_matrix.png")
  accuracy_heatmap(m["task_il_accuracy_matrix"], p, "task-IL accuracy (%)", names)
  out.append(p)
  p = os.path.join(workdir, "accuracy_vs_task.png")
  accuracy_vs_task({"class_il": seen_task_means(m["accuracy_matrix"]),
                    "task_il": seen_task_means(m["task_il_accuracy_matrix"])}, p)
  out.append(p)
  log = os.path.join(workdir, "log.jsonl")
  if os.path.exists(log):
    records = read_log(log)
    if records:
      p = os.path.join(workdir, "entropy_alpha.png")
      entropy_alpha_vs_step(records, p)
      out.append(p)
  return out
