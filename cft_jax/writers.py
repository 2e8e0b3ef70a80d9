"""Where a run's records go: ``log.jsonl``, TensorBoard events, ``metrics.json``, PNG plots.

The trainer talks to one :class:`MetricWriter`; nothing else in the loop knows about files. A
writer built with ``enabled=False`` (e.g. on every process but process 0 of a multi-host run)
accepts the same calls and writes nothing.

Files in the workdir:

- ``config.json``: the resolved config of the run (:func:`cft_jax.config.validate_config`);
- ``log.jsonl``: one JSON object per logged training step, ``{"task", "step", "epoch",
  "global_step", <train-step metrics>}`` (``step`` counts the steps of the task, 1-based);
- ``tensorboard/``: ``train/<metric>`` and ``eval/...`` scalars against the global step;
- ``metrics.json``: the final result dict of :func:`cft_jax.train.run`;
- ``*.png``: :func:`cft_jax.plots.plot_run` of the above.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

from cft_jax import plots


def _tensorboard_writer(workdir: str):
  """A TensorBoard event-file writer on ``workdir/tensorboard`` (tensorboardX: no TensorFlow);
  None with a note if tensorboardX is not installed."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("[cft_jax] tensorboardX not installed: no TensorBoard events (pip install tensorboardX)")
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


class MetricWriter:
  """The run's output files behind one small interface.

  Args:
    workdir: the run's output folder (created by the trainer).
    tensorboard: also write TensorBoard event files (``train.tensorboard``).
    enabled: False: every call is a no-op (non-zero processes of a multi-host run).
  """

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self.log_path = os.path.join(workdir, "log.jsonl")
    self._tensorboard = tensorboard
    self._tb = None
    self._tb_opened = False
    self._log = None

  @property
  def tb(self):
    """The TensorBoard writer (opened on first use; None when off or unavailable)."""
    if self.enabled and self._tensorboard and not self._tb_opened:
      self._tb_opened = True
      self._tb = _tensorboard_writer(self.workdir)
    return self._tb

  def write_config(self, config_json: Dict[str, Any]) -> None:
    """``config.json`` (the resolved config, a JSON dict)."""
    if self.enabled:
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)

  def truncate_log(self, keep: Callable[[Dict[str, Any]], bool]) -> None:
    """Drops the ``log.jsonl`` records for which ``keep(record)`` is False (on resume: those
    written after the checkpoint the run continues from)."""
    if not self.enabled or not os.path.exists(self.log_path):
      return
    with open(self.log_path) as f:
      kept = [l for l in f if l.strip() and keep(json.loads(l))]
    with open(self.log_path, "w") as f:
      f.writelines(kept)

  def open(self) -> "MetricWriter":
    """Opens the TensorBoard writer now (otherwise opened on first use)."""
    _ = self.tb
    return self

  def train_record(self, record: Dict[str, Any], global_step: int,
                   scalars: Dict[str, float]) -> None:
    """Appends ``record`` to ``log.jsonl`` (flushed) and ``scalars`` as ``train/<key>``."""
    if not self.enabled:
      return
    if self._log is None:
      self._log = open(self.log_path, "a")
    self._log.write(json.dumps(record) + "\n")
    self._log.flush()
    if self.tb is not None:
      for key, v in scalars.items():
        self.tb.add_scalar(f"train/{key}", v, global_step)

  def end_task(self) -> None:
    """Closes ``log.jsonl`` until the next record (the file is complete on disk)."""
    if self._log is not None:
      self._log.close()
      self._log = None

  def eval_scalars(self, scalars: Dict[str, float], global_step: int) -> None:
    """TensorBoard scalars (``eval/...`` names given in full), flushed."""
    if self.enabled and self.tb is not None:
      for key, v in scalars.items():
        self.tb.add_scalar(key, v, global_step)
      self.tb.flush()

  def write_metrics(self, result: Dict[str, Any]) -> Optional[str]:
    """``metrics.json``; returns its path (None when disabled)."""
    if not self.enabled:
      return None
    path = os.path.join(self.workdir, "metrics.json")
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
    return path

  def plots(self) -> List[str]:
    """PNG plots of the workdir's records (:func:`cft_jax.plots.plot_run`); their paths."""
    if not self.enabled:
      return []
    return plots.plot_run(self.workdir)

  def close(self) -> None:
    self.end_task()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
