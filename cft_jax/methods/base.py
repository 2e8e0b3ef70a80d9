"""The continual-learning method protocol shared by every learner.

A method is a small, stateless object (its hyper-parameters are static); everything that changes
lives in a pytree ``method_state`` carried inside the trainer's ``TrainState`` and saved with every
checkpoint. The lifecycle, as in mammoth / LAMDA-PILOT:

- :meth:`Method.init_state` once, from the initial trainable params;
- :meth:`Method.begin_task` (host) before task ``t``;
- inside the jitted train step: :meth:`Method.penalty` is added to the data loss and
  :meth:`Method.after_step` updates the state after the optimiser step; :meth:`Method.frozen_peft`
  (host) says whether the backbone's PEFT leaves are held fixed this epoch;
- :meth:`Method.end_task` (host) after task ``t`` (e.g. curvature estimates);
- :meth:`Method.eval_params` (inside the jitted eval step) lists the parameter sets whose
  predictions are ensembled by the class-wise maximum of their softmaxes (one set: plain argmax).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Method:
  """Sequential fine-tuning: one set of trainable (PEFT + head) params updated across tasks.

  This is the "sequential PEFT" learner of the aEPG paper (SPEC §1) and the "None" baseline of
  DLCFT (SPEC §3): no regulariser, no replay.
  """

  name: str = "sequential"

  def init_state(self, params: PyTree) -> PyTree:
    """Initial ``method_state`` (a pytree of arrays; ``{}`` when stateless)."""
    del params
    return {}

  def begin_task(self, task_id: int, params: PyTree, method_state: PyTree) -> PyTree:
    """Host-side hook before task ``task_id``; returns the new method state."""
    del task_id, params
    return method_state

  def frozen_peft(self, task_id: int, epoch: int) -> bool:
    """Whether the non-head trainable leaves are held fixed during ``epoch`` of ``task_id``."""
    del task_id, epoch
    return False

  def penalty(self, params: PyTree, method_state: PyTree) -> jax.Array:
    """Regulariser added to the data loss inside the jitted step (scalar)."""
    del params, method_state
    return 0.0

  def after_step(self, params: PyTree, method_state: PyTree) -> PyTree:
    """Updates the method state after each optimiser step (inside jit)."""
    del params
    return method_state

  def end_task(self, task_id: int, params: PyTree, method_state: PyTree) -> PyTree:
    """Host-side hook after task ``task_id``; returns the new method state."""
    del task_id, params
    return method_state

  def eval_params(self, params: PyTree, method_state: PyTree) -> Sequence[PyTree]:
    """Parameter sets used at inference (their softmaxes are combined by a class-wise max)."""
    del method_state
    return (params,)
