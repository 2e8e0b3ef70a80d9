"""Rehearsal: a reservoir buffer and ER, DER, DER++ (DLCFT's replay baselines; methods.md#er).

The buffer lives in ``method_state`` as fixed-shape arrays (so it is traced once and saved with
every checkpoint)::

  {"images": [M, h, w, c] uint8,   # stored un-augmented; replay re-augments them
   "labels": [M] int32,            # incremental labels
   "logits": [M, C] float32,       # the network's logits when the example was stored (DER)
   "seen":   [] int32}             # examples of the stream seen so far

Reservoir sampling (Vitter 1985, as in mammoth / DER): the ``n``-th example of the stream
(0-based) is stored at slot ``n`` while ``n < M``; afterwards it draws ``j ~ U{0..n}`` and replaces
slot ``j`` if ``j < M``. Every example seen so far is then in the buffer with probability
``M / N``. Insertion runs inside the jitted train step (:meth:`ReplayMethod.after_step`), for a
whole batch at once: the stream positions are ``seen + cumsum(mask) - 1`` and the draws are
independent, so the only sequential effect — two examples of one batch drawing the same slot —
is resolved by letting the later one win.

Methods (mammoth's defaults for Seq-CIFAR-100, buffer 500):

- ER (Riemer et al. 2019; Chaudhry et al. 2019): ``L = L_data + w_er E_M[CE(f(x_m), y_m)]``.
- DER (Buzzega et al. 2020, eq. 4): ``L = L_data + alpha E_M[||f(x_m) - z_m||^2 / C]``
  (``F.mse_loss``: mean over examples and the ``C`` logits), ``alpha = 0.3``.
- DER++ (eq. 6): ``L = L_data + alpha E_M[||f(x_m) - z_m||^2 / C] + beta E_M'[CE(f(x_m'), y_m')]``
  with two independent buffer batches, ``alpha = 0.1``, ``beta = 0.5``.

The replay CE is over the classes seen so far (``[0, hi)`` of the current task; all ``C`` in
data-IL). The data loss of the current batch is the trainer's (``loss.scope`` local or all; mammoth
uses all outputs). No ``(1/t)`` weighting: ``data_weight`` is 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from cft_jax import objectives
from cft_jax.methods.base import Method

PyTree = Any


# ------------------------------------------------------------------------------------------
# Reservoir buffer (pure functions on the buffer dict).
# ------------------------------------------------------------------------------------------


def init_buffer(size: int, image_shape: Tuple[int, ...], num_classes: int) -> Dict[str, jax.Array]:
  """An empty buffer of ``size`` slots for uint8 images ``image_shape`` and ``num_classes`` logits.

  Raises:
    ValueError: ``size < 1``.
  """
  if size < 1:
    raise ValueError(f"buffer size must be >= 1, got {size}")
  return {"images": jnp.zeros((size,) + tuple(image_shape), jnp.uint8),
          "labels": jnp.zeros((size,), jnp.int32),
          "logits": jnp.zeros((size, num_classes), jnp.float32),
          "seen": jnp.zeros((), jnp.int32)}


def reservoir_slots(seen: jax.Array, mask: jax.Array, size: int, rng: jax.Array) -> jax.Array:
  """Buffer slot of every batch example under reservoir sampling; ``size`` means "not stored".

  Args:
    seen: examples of the stream before this batch (int32 scalar).
    mask: ``[B]`` bool, False for padding (never stored, not counted).
    size: buffer size ``M``.
    rng: PRNG key.

  Returns:
    ``[B]`` int32 slots in ``[0, M]``; among examples of the batch that drew the same slot only
    the last keeps it (the sequential algorithm's outcome).
  """
  mask = mask.astype(bool)
  n = seen + jnp.cumsum(mask.astype(jnp.int32)) - 1  # stream position of each valid example
  j = jax.random.randint(rng, n.shape, 0, jnp.maximum(n, 0) + 1)  # U{0..n}
  slot = jnp.where(n < size, n, jnp.where(j < size, j, size))
  slot = jnp.where(mask, slot, size)
  b = slot.shape[0]
  later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]  # later[i, i'] = i' > i
  overwritten = jnp.any(later & (slot[None, :] == slot[:, None]), axis=1)
  return jnp.where(overwritten, size, slot).astype(jnp.int32)


def reservoir_insert(buffer: Dict[str, jax.Array], images: jax.Array, labels: jax.Array,
                     logits: jax.Array, mask: jax.Array, rng: jax.Array) -> Dict[str, jax.Array]:
  """Inserts a batch by reservoir sampling (jit-able, fixed shapes).

  Args:
    buffer: see :func:`init_buffer`.
    images: ``[B, h, w, c]`` uint8; labels: ``[B]``; logits: ``[B, C]``; mask: ``[B]`` bool.
    rng: PRNG key.
  """
  size = buffer["labels"].shape[0]
  slot = reservoir_slots(buffer["seen"], mask, size, rng)
  put = lambda arr, val: arr.at[slot].set(val.astype(arr.dtype), mode="drop")
  return {"images": put(buffer["images"], images), "labels": put(buffer["labels"], labels),
          "logits": put(buffer["logits"], jax.lax.stop_gradient(logits)),
          "seen": buffer["seen"] + jnp.sum(mask.astype(jnp.int32))}


def buffer_sample(buffer: Dict[str, jax.Array], rng: jax.Array, n: int):
  """``n`` examples drawn uniformly (with replacement) from the filled slots.

  Returns:
    ``(images [n, ...], labels [n], logits [n, C], valid)``; ``valid`` is a float 0/1 scalar, 0
    while the buffer is empty (multiply the replay loss by it).
  """
  size = buffer["labels"].shape[0]
  filled = jnp.minimum(buffer["seen"], size)
  idx = jax.random.randint(rng, (n,), 0, jnp.maximum(filled, 1))
  return (buffer["images"][idx], buffer["labels"][idx], buffer["logits"][idx],
          (filled > 0).astype(jnp.float32))


def _seen_ce(logits: jax.Array, labels: jax.Array, num_seen: jax.Array) -> jax.Array:
  """Mean CE over the classes ``[0, num_seen)`` (the others masked out)."""
  z = jnp.asarray(logits, jnp.float32)
  z = jnp.where(jnp.arange(z.shape[-1]) < num_seen, z, -1e9)
  return jnp.mean(objectives.ce(z, labels))


# ------------------------------------------------------------------------------------------
# Methods.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReplayMethod(Method):
  """Shared buffer handling of ER / DER / DER++ (see the module docstring).

  Attributes:
    buffer_size: ``M`` (paper: 500).
    replay_batch_size: examples drawn from the buffer per step (per replay term).
  """

  name: str = "replay"
  buffer_size: int = 500
  replay_batch_size: int = 32

  def __post_init__(self):
    if self.buffer_size < 1 or self.replay_batch_size < 1:
      raise ValueError("method.buffer_size and method.replay_batch_size must be >= 1")

  def init_state(self, params: PyTree, ctx=None) -> PyTree:
    """``{"buffer": init_buffer(M, ctx.image_shape, ctx.num_classes), "num_seen": 0}``.

    Raises:
      ValueError: without a :class:`TaskContext` giving ``image_shape`` and ``num_classes``.
    """
    del params
    if ctx is None or ctx.image_shape is None or not ctx.num_classes:
      raise ValueError(f"{self.name} needs the TaskContext (image_shape, num_classes) in init_state")
    return {"buffer": init_buffer(self.buffer_size, ctx.image_shape, ctx.num_classes),
            "num_seen": jnp.zeros((), jnp.int32)}

  def begin_task(self, task_id, params, method_state, ctx=None):
    """Records ``num_seen`` = the end of the task's class range (all classes in data-IL)."""
    hi = ctx.task_range[1] if ctx is not None and ctx.task_range is not None else None
    if hi is None:
      return method_state
    return {**method_state, "num_seen": jnp.asarray(hi, jnp.int32)}

  def after_step(self, params, method_state, batch=None, rng=None):
    """Reservoir insertion of the step's (un-augmented) images, labels and pre-update logits."""
    if batch is None:
      return method_state
    buf = reservoir_insert(method_state["buffer"], batch["images"], batch["labels"],
                           batch["logits"], batch["mask"], rng)
    return {**method_state, "buffer": buf}

  def _replay(self, params, method_state, logits_fn, rng):
    imgs, labels, old_logits, valid = buffer_sample(method_state["buffer"], rng,
                                                    self.replay_batch_size)
    z = logits_fn(params, imgs, jax.random.fold_in(rng, 1))
    return z, labels, old_logits, valid


@dataclasses.dataclass(frozen=True)
class ER(ReplayMethod):
  """Experience replay: ``L = L_data + weight * E_M[CE]`` on a reservoir buffer.

  Weighting: the data loss keeps weight 1 (no ``1/t``); the replay CE is over the seen classes.

  Attributes:
    weight: replay loss weight (1: the mean of a joint batch of current and replayed examples up
      to the batch sizes).
  """

  name: str = "er"
  weight: float = 1.0

  def extra_loss(self, params, method_state, batch, logits, logits_fn, rng):
    z, labels, _, valid = self._replay(params, method_state, logits_fn, rng)
    return self.weight * valid * _seen_ce(z, labels, method_state["num_seen"])


@dataclasses.dataclass(frozen=True)
class DER(ReplayMethod):
  """Dark Experience Replay: ``L = L_data + alpha * mean_{m, c} (f_c(x_m) - z_mc)^2``.

  ``z_m`` are the logits stored with ``x_m`` (all ``C`` outputs). Weighting: data loss weight 1.

  Attributes:
    alpha: logit-matching weight (mammoth, Seq-CIFAR-100 buffer 500: 0.3).
  """

  name: str = "der"
  alpha: float = 0.3

  def extra_loss(self, params, method_state, batch, logits, logits_fn, rng):
    z, _, old_logits, valid = self._replay(params, method_state, logits_fn, rng)
    return self.alpha * valid * jnp.mean(jnp.square(jnp.asarray(z, jnp.float32) - old_logits))


@dataclasses.dataclass(frozen=True)
class DERPP(DER):
  """DER++: DER plus ``beta * E_M'[CE(f(x_m'), y_m')]`` on a second, independent buffer batch.

  Weighting: data loss weight 1.

  Attributes:
    alpha: logit-matching weight (0.1); beta: replay CE weight (0.5).
  """

  name: str = "derpp"
  alpha: float = 0.1
  beta: float = 0.5

  def extra_loss(self, params, method_state, batch, logits, logits_fn, rng):
    r1, r2 = jax.random.split(rng)
    der = super().extra_loss(params, method_state, batch, logits, logits_fn, r1)
    z, labels, _, valid = self._replay(params, method_state, logits_fn, r2)
    return der + self.beta * valid * _seen_ce(z, labels, method_state["num_seen"])
