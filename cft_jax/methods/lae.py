"""LAE: Learning-Accumulation-Ensemble (Gao et al., ICCV 2023); docs/methods.md#lae.

An online PEFT module (trained with the head) and an offline copy that accumulates it by an
exponential moving average after every optimiser step,
``theta_off <- d * theta_off + (1 - d) * theta_on`` with ``d = 0.999``. At inference both
modules run with the shared head and the prediction is the class-wise maximum of the two
softmaxes (over the classes in play). Optionally the PEFT module is frozen for the first ``k``
epochs of every task after the first, so the new head units adapt before the backbone moves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from cft_jax.methods.base import Method

PyTree = Any


def _is_head(path) -> bool:
  return str(getattr(path[0], "key", path[0])) == "head"


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
    """``{'offline': copy of the non-head trainable leaves}``."""
    offline = {k: v for k, v in params.items() if k != "head"}
    return {"offline": jax.tree_util.tree_map(lambda x: x + 0, offline)}

  def frozen_peft(self, task_id: int, epoch: int) -> bool:
    return task_id > 0 and epoch < self.freeze_epochs

  def after_step(self, params: PyTree, method_state: PyTree, batch=None, rng=None) -> PyTree:
    """EMA ``theta_off <- d theta_off + (1 - d) theta_on`` on the PEFT leaves."""
    d = self.ema_decay
    online = {k: v for k, v in params.items() if k != "head"}
    offline = jax.tree_util.tree_map(lambda off, on: d * off + (1.0 - d) * on,
                                     method_state["offline"], online)
    return {**method_state, "offline": offline}

  def eval_params(self, params: PyTree, method_state: PyTree) -> Sequence[PyTree]:
    """``(online, offline)``: the offline set shares the online head."""
    offline = dict(method_state["offline"])
    if "head" in params:
      offline["head"] = params["head"]
    return (params, offline)
