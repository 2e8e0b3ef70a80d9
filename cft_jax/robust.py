"""Robust fine-tuning as composable components of the training protocol.

A robust fine-tuning rule keeps the fine-tuned weights ``theta`` near the pretrained ``theta_0``
(the *anchor*: the trainable leaves at initialisation). It may act at three points, each a hook
of :class:`RobustFT`, and any continual method (:mod:`cft_jax.methods`) combines with any of
them, because the trainer calls the hooks of every component of the run the same way:

- :meth:`RobustFT.wrap_optimizer` (host, once): the optimiser ``tx`` -> a projected optimiser.
  TPGM (Tian et al., CVPR 2023, Alg. 1: per-layer radii learned on validation data, weights
  projected into the ball) and FTP (Tian et al., NeurIPS 2023, Alg. 1: radii that grow only while
  the gradients agree). Their state lives in the optimiser state and survives
  ``optim.reset_per_task`` (:func:`cft_jax.projection.reset_base_state`).
- :meth:`RobustFT.penalty` (inside the jitted step): a loss term; L2-SP (Li et al., ICML 2018,
  Eq. 3) ``alpha/2 ||theta - theta_0||^2``.
- :meth:`RobustFT.eval_params` (host, before evaluation): the parameters evaluated; WiSE-FT
  (Wortsman et al., CVPR 2022, Eq. 1) ``(1 - a) theta_0 + a theta``.

The head is excluded from every rule (it has no pretrained value: the anchor's head is its
random initialisation). :func:`from_config` builds the components from the user-facing keys
``method.projection`` (``tpgm`` | ``ftp`` | ``l2sp``), ``method.l2sp_alpha``,
``method.projection_norm``/``proj_freq``/``max_iters``/``radius_lr``/``ftp_k`` and
``eval.wise_ft_alpha``; e.g. ``method.name=sequential method.projection=ftp`` or
``method.name=lae eval.wise_ft_alpha=0.5`` are configurations, not special cases.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cft_jax import objectives
from cft_jax import projection
from cft_jax.linearize import make_forward
from cft_jax.objectives import task_slice, task_widths
from cft_jax.peft import HEAD
from cft_jax.schema import Key, ReadBy

PyTree = Any

PROJECTIONS = ("", "none", "tpgm", "ftp", "l2sp")

# The components' config keys (:mod:`cft_jax.schema`), read by :func:`from_config`: METHOD_KEYS
# belong to the ``method`` section (every method accepts them, :data:`cft_jax.methods.SECTION_KEYS`)
# and EVAL_KEYS to the ``eval`` section (:mod:`cft_jax.registry` places them).
METHOD_KEYS = (
    Key("projection", "", '"" | tpgm | ftp | l2sp: robust fine-tuning toward theta_0',
        choices=PROJECTIONS),
    Key("projection_norm", "", 'l2 | mars ("" -> tpgm: l2, ftp: mars)', choices=("", "l2", "mars")),
    Key("proj_freq", 1, "tpgm: project every n steps"),
    Key("max_iters", 1, "tpgm: radius updates per projection"),
    Key("radius_lr", 1e-2, "tpgm / ftp: Adam lr of the radii"),
    Key("ftp_k", 1.0, "ftp: positive-gradient gain k"),
    Key("l2sp_alpha", 0.01, "l2sp: penalty alpha"),
)
# Who reads which ``method`` key of the components (:class:`cft_jax.schema.ReadBy`; the registry
# refuses a key that is set but not read): each ``method.projection`` its own (:func:`from_config`).
PROJECTION_READS = ReadBy("method.projection", {
    "": (), "none": (),
    "tpgm": ("projection_norm", "proj_freq", "max_iters", "radius_lr"),
    "ftp": ("projection_norm", "radius_lr", "ftp_k"),
    "l2sp": ("l2sp_alpha",),
})
EVAL_KEYS = (
    Key("wise_ft_alpha", 1.0, "WiSE-FT: evaluate (1 - a) theta_0 + a theta (1.0: off)",
        unit=(0.0, 1.0, True)),
)


@dataclasses.dataclass(frozen=True)
class OptimizerContext:
  """What :meth:`RobustFT.wrap_optimizer` may use.

  Attributes:
    anchor: ``theta_0``, the trainable leaves at initialisation (a copy: never donated).
    apply_fn: the flax ``module.apply``.
    classes_per_task: ``k`` (an int, or a tuple of per-task sizes for unequal tasks).
    linearized: ``None``, ``"full"`` or ``"features"`` (:func:`cft_jax.linearize.linearize_mode`).
    axis_name: the pmap axis name (None: jit / sharded jit).
  """

  anchor: PyTree
  apply_fn: Callable[..., jax.Array]
  classes_per_task: Any
  linearized: Optional[str] = None
  axis_name: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class RobustFT:
  """A robust fine-tuning component; every hook defaults to "no effect"."""

  name: str = "none"
  needs_val_batch: bool = False
  """Whether the wrapped optimiser reads a validation batch each step (``tx.update(...,
  val_batch=...)``; the trainer then needs ``data.val_fraction > 0``)."""

  def wrap_optimizer(self, tx: optax.GradientTransformation,
                     ctx: OptimizerContext) -> optax.GradientTransformation:
    """The optimiser of the run (host, once); ``tx`` unchanged by default."""
    del ctx
    return tx

  def penalty(self, params: PyTree, anchor: PyTree) -> jax.Array:
    """Scalar loss term added inside the jitted step (0 by default)."""
    del params, anchor
    return 0.0

  def eval_params(self, params: PyTree, anchor: PyTree) -> PyTree:
    """The trainable params evaluated (host, before each evaluation); ``params`` by default."""
    del anchor
    return params


@dataclasses.dataclass(frozen=True)
class TPGM(RobustFT):
  """Trainable projected gradient method (Tian et al., CVPR 2023, Alg. 1), chained after ``tx``
  with the task's local validation cross-entropy as the radius objective."""

  name: str = "tpgm"
  needs_val_batch: bool = True
  norm: str = "l2"
  proj_freq: int = 1
  max_iters: int = 1
  radius_lr: float = 1e-2

  def wrap_optimizer(self, tx, ctx):
    """``optax.chain(tx, projection.tpgm(anchor, val_loss_fn, ...))``, head excluded."""
    forward = make_forward(ctx.apply_fn, ctx.linearized)
    k, bounds = task_widths(ctx.classes_per_task)
    axis_name = ctx.axis_name

    def val_loss_fn(params, vb):
      logits = forward(params, vb["frozen"], vb["x"])
      local = task_slice(logits, vb["task_lo"], k, bounds)
      ce = objectives.ce(local, vb["labels"])
      num, den = jnp.sum(ce * vb["mask"]), vb["mask"].sum()
      if axis_name:  # the global validation batch: identical radii on every replica
        num, den = jax.lax.psum(num, axis_name), jax.lax.psum(den, axis_name)
      return num / jnp.maximum(den, 1.0)

    return optax.chain(tx, projection.tpgm(
        ctx.anchor, val_loss_fn, norm=self.norm, proj_freq=self.proj_freq,
        max_iters=self.max_iters, radius_lr=self.radius_lr, exclude=projection.is_head))


@dataclasses.dataclass(frozen=True)
class FTP(RobustFT):
  """Fast trainable projection (Tian et al., NeurIPS 2023, Alg. 1) wrapping ``tx``."""

  name: str = "ftp"
  norm: str = "mars"
  k: float = 1.0
  radius_lr: float = 1e-2

  def wrap_optimizer(self, tx, ctx):
    """``projection.ftp(anchor, base=tx, ...)``, head excluded."""
    return projection.ftp(ctx.anchor, base=tx, k=self.k, radius_lr=self.radius_lr,
                          norm=self.norm, exclude=projection.is_head)


@dataclasses.dataclass(frozen=True)
class L2SP(RobustFT):
  """L2-SP (Li et al., ICML 2018, Eq. 3): ``alpha/2 ||theta - theta_0||^2``, head excluded."""

  name: str = "l2sp"
  alpha: float = 0.01

  def penalty(self, params, anchor):
    return projection.l2sp_penalty(params, anchor, self.alpha, exclude=projection.is_head)


@dataclasses.dataclass(frozen=True)
class WiSEFT(RobustFT):
  """WiSE-FT (Wortsman et al., CVPR 2022, Eq. 1): evaluates ``(1 - alpha) theta_0 + alpha
  theta`` on the non-head leaves (the fine-tuned head is kept)."""

  name: str = "wise_ft"
  alpha: float = 1.0

  def eval_params(self, params, anchor):
    return wise_ft_params(params, anchor, self.alpha)


def wise_ft_params(params: PyTree, anchor: PyTree, alpha: float) -> PyTree:
  """WiSE-FT ``(1 - alpha) theta_0 + alpha theta`` on the non-head leaves (the head is kept)."""
  mixed = projection.wise_ft(params, anchor, alpha)
  if HEAD in params:
    mixed = {**mixed, HEAD: params[HEAD]}
  return mixed


def from_config(config: ml_collections.ConfigDict) -> Tuple[RobustFT, ...]:
  """The robust fine-tuning components of a resolved config, in hook order.

  ``method.projection`` selects TPGM / FTP / L2-SP (``""``/``"none"``: none) and
  ``eval.wise_ft_alpha != 1`` adds WiSE-FT.

  Raises:
    ValueError: unknown ``method.projection``.
  """
  m = config.method
  name = m.projection or ""
  if name not in PROJECTIONS:
    raise ValueError(f"unknown method.projection '{name}'; known: tpgm, ftp, l2sp or ''")
  parts = []
  norm = m.projection_norm or ("l2" if name == "tpgm" else "mars")
  if name == "tpgm":
    parts.append(TPGM(norm=norm, proj_freq=m.proj_freq, max_iters=m.max_iters,
                      radius_lr=m.radius_lr))
  elif name == "ftp":
    parts.append(FTP(norm=norm, k=m.ftp_k, radius_lr=m.radius_lr))
  elif name == "l2sp":
    parts.append(L2SP(alpha=m.l2sp_alpha))
  if config.eval.wise_ft_alpha != 1.0:
    parts.append(WiSEFT(alpha=config.eval.wise_ft_alpha))
  return tuple(parts)


def wrap_optimizer(components: Sequence[RobustFT], tx: optax.GradientTransformation,
                   ctx: OptimizerContext) -> optax.GradientTransformation:
  """``tx`` wrapped by every component in order."""
  for c in components:
    tx = c.wrap_optimizer(tx, ctx)
  return tx


def penalty(components: Sequence[RobustFT], params: PyTree,
            anchor: Optional[PyTree]) -> Optional[jax.Array]:
  """Sum of the components' penalties; None when no component adds one (nothing is traced)."""
  total = None
  for c in components:
    if type(c).penalty is not RobustFT.penalty:
      term = c.penalty(params, anchor)
      total = term if total is None else total + term
  return total


def eval_params(components: Sequence[RobustFT], params: PyTree, anchor: PyTree) -> PyTree:
  """The params evaluated: each component's :meth:`RobustFT.eval_params` in order."""
  for c in components:
    params = c.eval_params(params, anchor)
  return params


def needs_anchor(components: Sequence[RobustFT]) -> bool:
  """Whether the run keeps ``theta_0`` as ``frozen["anchor"]`` (any component)."""
  return bool(components)
