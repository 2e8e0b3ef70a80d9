"""Orbax checkpoints: after every task (and every ``checkpoint.every_steps`` inside one), resume.

A checkpoint holds the trainable parameters, the optimiser and method state (item ``state``) and
a JSON ``meta`` item (accuracy matrices, class order, resolved config, task / step reached).
Saving is asynchronous (orbax writes in a background thread and commits by an atomic rename, so a
process killed mid-write leaves only a temporary folder that is ignored). Restoring walks back from
the newest checkpoint: one that cannot be read is moved aside to ``<step>.corrupt`` with a
warning and the previous one is used.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class TaskCheckpointer:
  """Thin wrapper over :class:`orbax.checkpoint.CheckpointManager` (items ``state`` and ``meta``).

  Args:
    directory: checkpoint folder (created if missing); made absolute.
    max_to_keep: how many task checkpoints to keep (None: all).
  """

  def __init__(self, directory: str, max_to_keep: Optional[int] = None):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest(self) -> Optional[int]:
    """Orbax step of the latest checkpoint (``2 * global_step + task_finished``, see
    :func:`cft_jax.train.checkpoint_id`; not a task count), or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: PyTree, meta: dict, wait: bool = False) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as ``step``.

    Asynchronous unless ``wait``: the write finishes in the background (the next save or
    :meth:`close` waits for it). Steps must increase.
    """
    state = jax.device_get(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if wait:
      self._manager.wait_until_finished()

  def restore_latest(self, target: PyTree) -> Optional[Tuple[PyTree, dict]]:
    """Restores the newest readable checkpoint into ``target``'s structure, or None if none.

    Unreadable checkpoints (truncated or corrupted files) are renamed ``<step>.corrupt`` with a
    warning and the previous step is tried.

    Raises:
      ValueError: a readable checkpoint whose tree does not match ``target`` (another model).
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore(step, target)
      except ValueError as e:
        if "does not match" in str(e) and not _looks_corrupt(e):
          raise
        bad = os.path.join(self.directory, str(step))
        warnings.warn(f"checkpoint {bad} is unreadable ({type(e.__cause__ or e).__name__}: "
                      f"{str(e.__cause__ or e)[:200]}); moved to {bad}.corrupt, falling back to the "
                      f"previous one", RuntimeWarning)
        if os.path.exists(bad):
          shutil.move(bad, bad + ".corrupt")
        self._manager.reload()
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/json decode errors)
        bad = os.path.join(self.directory, str(step))
        warnings.warn(f"checkpoint {bad} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                      f"moved to {bad}.corrupt, falling back to the previous one",
                      RuntimeWarning)
        if os.path.exists(bad):
          shutil.move(bad, bad + ".corrupt")
        self._manager.reload()
    return None

  def restore(self, num_finished: int, target: PyTree) -> Tuple[PyTree, dict]:
    """Restores step ``num_finished`` into the structure of ``target``.

    Returns:
      ``(state, meta)``; state leaves are NumPy arrays with the target's shapes.

    Raises:
      ValueError: if the stored tree does not match ``target`` (e.g. a different model/peft).
    """
    target = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype),
                                    jax.device_get(target))
    try:
      restored = self._manager.restore(num_finished, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{num_finished} does not match this run's model/optimizer "
          f"({e}). Use a new --workdir for a different configuration.") from e
    return restored.state, restored.meta

  def all_steps(self) -> Tuple[int, ...]:
    """Orbax steps of every checkpoint, ascending."""
    return tuple(sorted(self._manager.all_steps()))

  def restore_untyped(self, step: int) -> Tuple[PyTree, dict]:
    """Restores checkpoint ``step`` without a target: ``(state, meta)`` with ``state`` the saved
    tree as nested dicts of NumPy arrays (``{"step", "params", "opt_state", "method_state"}``),
    for readers that need no optimiser (:mod:`cft_jax.predict`).

    Raises:
      FileNotFoundError: no checkpoint ``step``.
    """
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint {step} in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def _looks_corrupt(e: Exception) -> bool:
  text = f"{e} {e.__cause__}".lower()
  return any(w in text for w in ("corrupt", "decode", "tensorstore", "json", "eof", "no such file",
                                 "not found", "truncat", "checksum", "invalid"))
