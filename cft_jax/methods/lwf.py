"""Learning without Forgetting (Li & Hoiem, ECCV 2016; a DLCFT baseline; methods.md#lwf).

Before task ``t`` the current parameters are frozen as the "old" model (kept in
``method_state["old"]``). On every batch of task ``t`` the new model's outputs on the OLD classes
are distilled towards the old model's, with temperature ``T = 2``::

  L_kd = E_x KL( softmax(z_old[:n_old] / T) || softmax(z[:n_old] / T) )

(the KL form of LwF's "modified cross-entropy": it differs by the old model's entropy, a
constant, so the gradient is the same and the term is 0 when the two models agree). ``n_old`` is
the number of classes of the previous tasks (class-/task-IL) or all ``C`` classes (data-IL, from
the second task on). Both models see the same augmented images (same rng). Weighting
(``method.weighting``): ``"dlcft"`` (default) ``L = (1/t) L_data + ((t-1)/t) lambda L_kd``;
``"plain"`` ``L = L_data + lambda L_kd`` (LwF's ``lambda_o = 1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cft_jax.methods.base import Method
from cft_jax.methods.regularizers import WEIGHTINGS, copy_tree

PyTree = Any


def distillation_kl(new_logits, old_logits, num_old, temperature: float = 2.0):
  """``KL(softmax(z_old/T) || softmax(z/T))`` over the first ``num_old`` classes, ``[B]``.

  Classes ``>= num_old`` are masked out of both softmaxes; 0 everywhere when ``num_old == 0``.
  """
  z = jnp.asarray(new_logits, jnp.float32) / temperature
  zo = jnp.asarray(old_logits, jnp.float32) / temperature
  keep = jnp.arange(z.shape[-1]) < num_old
  logp = jax.nn.log_softmax(jnp.where(keep, z, -1e9), -1)
  logq = jax.nn.log_softmax(jnp.where(keep, zo, -1e9), -1)
  q = jnp.where(keep, jnp.exp(logq), 0.0)
  kl = jnp.sum(q * jnp.where(keep, logq - logp, 0.0), -1)
  return jnp.where(num_old > 0, kl, 0.0)


@dataclasses.dataclass(frozen=True)
class LwF(Method):
  """Knowledge distillation of the previous model's outputs on the old classes.

  Attributes:
    temperature: ``T`` (LwF: 2).
    strength: ``lambda`` of the distillation term.
    weighting: ``"dlcft"`` or ``"plain"`` (see the module docstring).
  """

  name: str = "lwf"
  temperature: float = 2.0
  strength: float = 1.0
  weighting: str = "dlcft"

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"method.weighting must be one of {WEIGHTINGS}, got '{self.weighting}'")
    if self.temperature <= 0:
      raise ValueError(f"method.temperature must be > 0, got {self.temperature}")

  def init_state(self, params, ctx=None):
    """``{t, old: copy of params, num_old: 0}``."""
    return {"t": jnp.zeros((), jnp.float32), "old": copy_tree(params),
            "num_old": jnp.zeros((), jnp.int32)}

  def begin_task(self, task_id, params, method_state, ctx=None):
    """Freezes the current params as the old model; ``num_old`` = classes of tasks ``< t``."""
    lo = ctx.task_range[0] if ctx is not None and ctx.task_range is not None else 0
    c = ctx.num_classes if ctx is not None else 0
    num_old = lo if lo > 0 else (c if task_id > 0 else 0)  # data-IL: every task spans [0, C)
    return {"t": jnp.asarray(task_id + 1, jnp.float32), "old": copy_tree(params),
            "num_old": jnp.asarray(num_old, jnp.int32)}

  def data_weight(self, method_state):
    if self.weighting == "plain":
      return 1.0
    return 1.0 / jnp.maximum(method_state["t"], 1.0)

  def extra_loss(self, params, method_state, batch, logits, logits_fn, rng):
    """``reg_weight * lambda * masked-mean_b KL`` on the current batch."""
    z = logits_fn(params, batch["images"], rng)
    z_old = jax.lax.stop_gradient(logits_fn(method_state["old"], batch["images"], rng))
    kl = distillation_kl(z, z_old, method_state["num_old"], self.temperature)
    w = batch["mask"].astype(jnp.float32)
    kd = jnp.sum(kl * w) / jnp.maximum(w.sum(), 1.0)
    t = jnp.maximum(method_state["t"], 1.0)
    reg = 1.0 if self.weighting == "plain" else (t - 1.0) / t
    return self.strength * reg * kd
