"""Orbax checkpoints between tasks: one checkpoint step per finished task, and resume.

Checkpoint step ``s`` holds the state after ``s`` finished tasks: the trainable parameters, the
optimiser state, and a JSON ``meta`` item (accuracy matrices, class order, resolved config, ...).
Re-running the same command on the same workdir restores the latest step and continues with
task ``s``.
"""

from __future__ import annotations

import os
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
    """Number of finished tasks in the latest checkpoint, or None if there is none."""
    return self._manager.latest_step()

  def save(self, num_finished: int, state: PyTree, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON-serialisable) as step ``num_finished``.

    Blocks until written, so a crash right after returns never loses the task.
    """
    state = jax.device_get(state)
    self._manager.save(num_finished, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

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

  def close(self) -> None:
    self._manager.close()
