"""LAE: Learning-Accumulation-Ensemble (Gao et al., ICCV 2023); docs/methods.md#lae.

An online PEFT module (trained with the head) and an offline one that accumulates it by an
exponential moving average after every optimiser step,
``theta_off <- d * theta_off + (1 - d) * theta_on`` with ``d = 0.999``. Timing as in the paper
and its reference code (github.com/gqk/LAE, ``setup_model`` / ``post_train_step``): the offline
module is created as a copy of the online one when task 1 (the second task) begins, the EMA runs
from then on, and task 0 is trained and evaluated with the online module alone. At inference both
modules run with the shared head and the prediction is the class-wise maximum of the two
softmaxes (over the classes in play). Optionally the PEFT module is frozen for the first ``k``
epochs of every task after the first, so the new head units adapt before the backbone moves;
frozen leaves are excluded from the optimiser as ``optax.masked`` / ``set_to_zero`` (or PyTorch's
``requires_grad=False``) would: no gradient and untouched optimiser moments
(:func:`hold_frozen_leaves`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from cft_jax.methods.base import Method
from cft_jax.peft import HEAD, copy_tree

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LAE(Method):
  """Online/offline PEFT with EMA accumulation and max-softmax ensemble.

  Attributes:
    ema_decay: ``d`` of the offline EMA (paper 0.999).
    freeze_epochs: epochs at the start of every task ``t >= 1`` during which the PEFT module is
      frozen and only the head trains (paper option; 0 disables).
  """

  name: str = "lae"
  ema_decay: float = 0.999
  freeze_epochs: int = 0

  def __post_init__(self):
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"method.ema_decay must be in [0, 1), got {self.ema_decay}")

  def init_state(self, params: PyTree, ctx=None) -> PyTree:
    """``{'offline': placeholder copy of the non-head leaves, 'active': 0.}``.

    ``active`` (float32 ``[]``) becomes 1 when task 1 begins (:meth:`begin_task`); until then
    the offline module does not exist (no EMA, not ensembled).
    """
    offline = {k: v for k, v in params.items() if k != HEAD}
    return {"offline": copy_tree(offline),
            "active": jnp.zeros((), jnp.float32)}

  def begin_task(self, task_id: int, params: PyTree, method_state: PyTree, ctx=None) -> PyTree:
    """At the start of task 1 the offline module becomes a copy of the online one."""
    if task_id < 1 or bool(method_state["active"] > 0):
      return method_state
    online = {k: v for k, v in params.items() if k != HEAD}
    return {**method_state, "offline": copy_tree(online),
            "active": jnp.ones((), jnp.float32)}

  def frozen_peft(self, task_id: int, epoch: int) -> bool:
    return task_id > 0 and epoch < self.freeze_epochs

  @property
  def freezes_peft(self) -> bool:
    return self.freeze_epochs > 0

  def after_step(self, params: PyTree, method_state: PyTree, batch=None, rng=None) -> PyTree:
    """EMA ``theta_off <- d theta_off + (1 - d) theta_on`` on the PEFT leaves (from task 1 on)."""
    d = self.ema_decay
    active = method_state["active"] > 0
    online = {k: v for k, v in params.items() if k != HEAD}
    offline = jax.tree_util.tree_map(
        lambda off, on: jnp.where(active, d * off + (1.0 - d) * on, off),
        method_state["offline"], online)
    return {**method_state, "offline": offline}

  def eval_params(self, params: PyTree, method_state: PyTree) -> Sequence[PyTree]:
    """``(online, offline)``: the offline set shares the online head.

    Before task 1 the offline set IS the online one (the max of two equal softmaxes: the online
    prediction alone), so the eval step compiles once for the whole run.
    """
    active = method_state["active"] > 0
    offline = {k: jax.tree_util.tree_map(lambda off, on: jnp.where(active, off, on), v, params[k])
               for k, v in method_state["offline"].items()}
    if HEAD in params:
      offline[HEAD] = params[HEAD]
    return (params, offline)


def hold_frozen_leaves(new_state: PyTree, old_state: PyTree, freeze: jax.Array,
                       frozen_key=lambda key: key != HEAD) -> PyTree:
  """Keeps the optimiser state of frozen leaves untouched (LAE's frozen first epochs).

  The optax state holds, for every parameter, entries in trees with the parameters' structure
  (Adam's ``mu``/``nu``, ...). A leaf of ``new_state`` whose key path enters a parameter tree
  through a top-level key ``k`` with ``frozen_key(k)`` (default: every key but ``head``) is
  replaced by its value in ``old_state`` when ``freeze``: the moments are neither decayed nor
  fed the (zeroed) gradient, exactly what ``optax.masked`` / ``optax.set_to_zero`` (and PyTorch
  parameters with ``requires_grad=False``, LAE's reference code) give. Leaves outside parameter
  trees (step counts) are taken from ``new_state``: like ``optax.masked``, the count is shared.

  Args:
    new_state: the optimiser state after ``tx.update``.
    old_state: the state before it (same structure).
    freeze: bool ``[]`` (traced is fine).
    frozen_key: predicate on the parameters' top-level key.

  Returns:
    A state with the structure of ``new_state``.
  """
  def pick(path, new, old):
    top = next((k.key for k in path if isinstance(k, jax.tree_util.DictKey)), None)
    if top is None or not frozen_key(top):
      return new
    return jnp.where(freeze, old, new)

  return jax.tree_util.tree_map_with_path(pick, new_state, old_state)
