"""The continual-learning method protocol shared by every learner.

A method is a small, stateless object (its hyper-parameters are static); everything that changes
lives in a pytree ``method_state`` carried inside the trainer's ``TrainState`` and saved with every
checkpoint. The lifecycle, as in mammoth / LAMDA-PILOT:

- :meth:`Method.wrap_optimizer` once (host), before the robust fine-tuning components
  (:mod:`cft_jax.robust`: TPGM / FTP projections, L2-SP penalty, WiSE-FT evaluation params), which
  compose with every method through the same three points (optimiser, penalty, eval params);
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
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
import optax

if TYPE_CHECKING:
  from cft_jax import robust

PyTree = Any


@dataclasses.dataclass
class TaskContext:
  """What host-side hooks may use: the model, the data of a task, the scenario geometry.

  Typed fields, read as attributes (a hook that needs one checks it is not None).

  Attributes:
    task_id: current task (None in ``init_state``).
    task_range: ``(lo, hi)`` incremental labels of the task.
    num_classes: head width ``C``.
    classes_per_task: ``k``.
    image_shape: ``(h, w, c)`` of stored uint8 images.
    forward: ``forward(params, x [B,S,S,3] float) -> logits [B, C]`` (eval mode, frozen merged,
      linearized when the run is).
    preprocess: uint8 -> normalised float images (``preprocess(images, rng, train)``).
    batches: ``batches()`` iterates the task's training data as ``(images uint8, labels, mask)``.
    loss_name: ``config.loss.name`` (curvature estimators choose CE or MSE Fisher from it).
    apply: ``apply(params, x, **kw) -> logits [B, C]`` (or ``[B, D]`` features with
      ``return_features=True``): the NON-linearized model in eval mode with the frozen leaves
      merged (K-FAC layer taps, feature extraction).
    params0: ``theta_0``, the expansion point of a linearized run (trainable leaves; None when
      the run is not linearized).
    linearize: ``None``, ``"full"`` or ``"features"`` (:func:`cft_jax.linearize.linearize_mode`).
    loss_scope: ``"local"`` (the task's ``k`` logits) or ``"all"`` (all ``C`` outputs).
    jit_cache: a dict that lives as long as the run (None: none): hooks keep compiled
      functions in it (e.g. the curvature estimators, :mod:`cft_jax.curvature`) so later tasks
      reuse them instead of compiling again; valid because a run's model, frozen weights and
      ``forward``/``apply`` never change.
    rng: a PRNG key of the run for this task's host hooks (e.g. the Monte-Carlo labels of a
      Fisher estimate in ``end_task``), derived from ``config.seed`` and the task id, so runs of
      different seeds draw differently (None: the hook falls back to its own seed).
  """

  task_id: Optional[int] = None
  task_range: Optional[Tuple[int, int]] = None
  num_classes: int = 0
  classes_per_task: int = 0
  image_shape: Optional[Tuple[int, ...]] = None
  forward: Optional[Callable[[PyTree, jax.Array], jax.Array]] = None
  preprocess: Optional[Callable[..., jax.Array]] = None
  batches: Optional[Callable[[], Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]]] = None
  loss_name: str = "ce"
  apply: Optional[Callable[..., jax.Array]] = None
  params0: Optional[PyTree] = None
  linearize: Optional[str] = None
  loss_scope: str = "local"
  jit_cache: Optional[Dict[Any, Any]] = None
  rng: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class Method:
  """Sequential fine-tuning: one set of trainable (PEFT + head) params updated across tasks.

  This is the "sequential PEFT" learner of the aEPG paper and the "None" baseline of DLCFT
  (docs/methods.md#sequential): no regulariser, no replay.
  """

  name: str = "sequential"

  def wrap_optimizer(self, tx: optax.GradientTransformation,
                     ctx: "robust.OptimizerContext") -> optax.GradientTransformation:
    """The method's optimiser (host, once, before the robust components wrap it); ``tx`` by
    default. ``ctx`` holds ``theta_0`` (``anchor``), the model's ``apply_fn``, ``k``, the
    linearization mode and the pmap axis name."""
    del ctx
    return tx

  def init_state(self, params: PyTree, ctx: "TaskContext" = None) -> PyTree:
    """Initial ``method_state`` (a pytree of arrays; ``{}`` when stateless).

    The structure must not change over the run (it is checkpointed and traced once).
    """
    del params, ctx
    return {}

  def begin_task(self, task_id: int, params: PyTree, method_state: PyTree,
                 ctx: "TaskContext" = None) -> PyTree:
    """Host-side hook before task ``task_id``; returns the new method state."""
    del task_id, params, ctx
    return method_state

  def frozen_peft(self, task_id: int, epoch: int) -> bool:
    """Whether the non-head trainable leaves are held fixed during ``epoch`` of ``task_id``."""
    del task_id, epoch
    return False

  @property
  def freezes_peft(self) -> bool:
    """Whether :meth:`frozen_peft` can be True in this run (the trainer then gives the head and
    the other leaves separate optimiser states, :func:`cft_jax.steps.make_optimizer`)."""
    return False

  cumulative_data: bool = False
  """If True the trainer trains task ``t`` on the union of tasks ``0..t`` (joint upper bound)."""

  def data_weight(self, method_state: PyTree) -> jax.Array:
    """Weight of the current task's data loss inside the jitted step (e.g. DLCFT's ``1/t``)."""
    del method_state
    return 1.0

  def penalty(self, params: PyTree, method_state: PyTree) -> jax.Array:
    """Parameter regulariser added to the loss inside the jitted step (scalar)."""
    del params, method_state
    return 0.0

  def extra_loss(self, params: PyTree, method_state: PyTree, batch: dict, logits: jax.Array,
                 logits_fn, rng: jax.Array) -> jax.Array:
    """Data-dependent extra loss inside the jitted step (distillation, replay), scalar.

    Args:
      params: trainable params being differentiated.
      method_state: the method's state (constants here).
      batch: ``images [B,h,w,c] uint8``, incremental ``labels [B]``, ``mask [B]``, ``task_lo``.
      logits: ``[B, C]`` logits of ``params`` on the (augmented) current batch.
      logits_fn: ``logits_fn(params, images_uint8, rng) -> [B', C]`` (preprocess + forward).
      rng: PRNG key for sampling (e.g. replay batches).
    """
    del params, method_state, batch, logits, logits_fn, rng
    return 0.0

  def after_step(self, params: PyTree, method_state: PyTree, batch: dict = None,
                 rng: jax.Array = None) -> PyTree:
    """Updates the method state after each optimiser step (inside jit).

    ``batch`` is the step's batch plus ``logits [B, C]`` (before the update, no gradient);
    e.g. a reservoir buffer inserts it here.
    """
    del params, batch, rng
    return method_state

  def end_task(self, task_id: int, params: PyTree, method_state: PyTree,
               ctx: "TaskContext" = None) -> PyTree:
    """Host-side hook after task ``task_id`` (e.g. curvature estimation); returns the new state."""
    del task_id, params, ctx
    return method_state

  def eval_params(self, params: PyTree, method_state: PyTree) -> Sequence[PyTree]:
    """Parameter sets used at inference (their softmaxes are combined by a class-wise max)."""
    del method_state
    return (params,)
