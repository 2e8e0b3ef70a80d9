"""Cached frozen-backbone features for learners that never change the backbone.

A linear probe (``peft.name = linear_probe``: only the ``head`` trains) and a nearest-class-mean
(NCM) classifier see the backbone only through its features, and with augmentation off those
features are the same at every epoch. Computing them once per image and training on the cache
removes the backbone from every later step: the head step is a ``[B, D] x [D, C]`` matmul instead
of a full forward pass (``benchmarks/feature_cache.py`` measures the speed-up).

Equivalence: :func:`train_linear_probe_on_features` takes the same batches (same shuffles,
``cft_jax.data.batches`` with ``shuffle_seed = (*seed, epoch)``, the seed ``train.run`` uses is
``(config.seed, task)``), the same loss function (:func:`cft_jax.objectives.make_loss_fn`) on
the same local slice ``logits[:, task_lo:task_lo + k]`` and the same optimiser as
:func:`cft_jax.steps.make_train_step` with ``peft.name = linear_probe``, so it gives the same head
(to float rounding; ``tests/test_feature_cache.py``) provided that

- the training preprocessing has no augmentation (``data.augment = none``): cached features
  come from ``preprocess(images, train=False)``;
- the backbone computes the same features in train and eval mode (BatchNorm with running
  statistics, as in :mod:`cft_jax.models.efficientnet_lite`; no dropout inside the backbone;
  head dropout, which acts on the features, is not applied here);
- the loss is one of the per-example objectives (the method adds no penalty that depends on the
  backbone).

Functions:

- :func:`extract_features`: ``module.apply(variables, x, train=False, return_features=True)``
  over fixed-shape batches (one compilation), as a host ``float32 [N, D]`` array;
- :func:`make_head_step` / :func:`train_linear_probe_on_features`: Adam/SGD on the head from
  cached features;
- :func:`head_logits`, :func:`class_means`, :func:`ncm_predict`: the head's logits and a
  nearest-class-mean classifier (cosine by default) on cached features.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cft_jax import objectives
from cft_jax.data import Preprocess, batches
from cft_jax.peft import HEAD, copy_tree
from cft_jax.steps import TrainState, make_train_step

PyTree = Any

__all__ = ["make_feature_fn", "extract_features", "head_logits", "head_apply",
           "identity_preprocess", "make_head_step",
           "train_linear_probe_on_features", "class_means", "ncm_predict"]


def make_feature_fn(apply_fn: Callable, preprocess: Preprocess) -> Callable:
  """Jitted ``features(variables, images uint8 [B,h,w,c]) -> float32 [B, D]`` (eval mode, no
  augmentation)."""

  @jax.jit
  def features(variables, images):
    x = preprocess(images, train=False)
    return apply_fn(variables, x, train=False, return_features=True).astype(jnp.float32)

  return features


def extract_features(apply_fn: Callable, variables: Dict[str, Any], images: np.ndarray,
                     preprocess: Preprocess, *, indices: Optional[np.ndarray] = None,
                     batch_size: int = 256, feature_fn: Optional[Callable] = None
                     ) -> np.ndarray:
  """Backbone features of ``images[indices]`` (all images by default), once per image.

  Args:
    apply_fn: ``module.apply`` of a model whose ``__call__`` takes ``train`` and
      ``return_features`` (EfficientNet-Lite, ViT, ResNet, TinyCNN).
    variables: the full variables (``params`` with the frozen backbone, ``batch_stats``, ...).
    images: host ``uint8 [N, h, w, c]``.
    preprocess: the run's :class:`cft_jax.data.Preprocess` (used with ``train=False``).
    indices: which images (default: all), in this order.
    batch_size: fixed batch shape (the last batch is padded), so the function compiles once.
    feature_fn: a :func:`make_feature_fn` result to reuse (avoids a new compilation).

  Returns:
    ``float32 [len(indices), D]`` on the host.
  """
  fn = feature_fn or make_feature_fn(apply_fn, preprocess)
  idx = np.arange(len(images)) if indices is None else np.asarray(indices)
  dummy = np.zeros(len(images), np.int32)
  out = []
  for xb, _, mb in batches(images, dummy, idx, batch_size):
    feats = np.asarray(fn(variables, xb))
    out.append(feats[mb])
  if not out:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(out).astype(np.float32)


def head_logits(head: Dict[str, jax.Array], features: jax.Array) -> jax.Array:
  """``features @ kernel + bias`` (a Flax ``nn.Dense`` head), float32 logits ``[B, C]``."""
  z = jnp.dot(features, head["kernel"])
  if "bias" in head:
    z = z + head["bias"]
  return z.astype(jnp.float32)


def head_apply(variables: Dict[str, Any], features: jax.Array, train: bool = False,
               **unused) -> jax.Array:
  """A ``module.apply``-shaped function of the ``head`` alone on cached features.

  ``head_apply({'params': {'head': {...}}, ...}, features [B, D]) -> logits [B, C]``: the
  model's last layer with the backbone replaced by the cache, so the library's train and eval
  steps (:func:`cft_jax.steps.make_train_step`, :func:`cft_jax.steps.make_eval_step`) run on
  cached features unchanged. ``train`` and extra keywords (``rngs``) are accepted and ignored
  (no dropout on cached features).
  """
  del train, unused
  return head_logits(variables["params"][HEAD], features)


def identity_preprocess(x: jax.Array, rng: Optional[jax.Array] = None, train: bool = False,
                        rows=None) -> jax.Array:
  """The :class:`cft_jax.data.Preprocess` of cached features: a float32 cast (they are already
  the backbone's output; ``rows``, a pmapped shard's place in the global batch, is unused)."""
  del rng, train, rows
  return jnp.asarray(x, jnp.float32)


def make_head_step(loss_fn: Callable, tx: optax.GradientTransformation,
                   classes_per_task: int, *, loss_scope: str = "local") -> Callable:
  """``step(params, opt_state, feats, labels, mask, task_lo, step_in_task, total_steps, rng)
  -> (params, opt_state, metrics)`` training ``params = {'head': {...}}`` on cached features.

  It is the library's own jitted train step (:func:`cft_jax.steps.make_train_step`, default
  method) with :func:`head_apply` as the model and :func:`identity_preprocess`: the same masked
  mean of ``loss_fn`` over valid examples on ``logits[:, task_lo:task_lo + k]`` with labels
  ``y - task_lo`` (``loss_scope='local'``) or on all logits (``'all'``), the same rng split. The
  ``params`` / ``opt_state`` passed in are donated (use the returned ones). Metrics: ``loss``,
  ``accuracy`` (% on the task's classes).

  Raises:
    ValueError: unknown ``loss_scope``.
  """
  train_step = make_train_step(head_apply, identity_preprocess, loss_fn, tx, classes_per_task,
                               loss_scope=loss_scope)
  frozen = {"params": {}, "collections": {}}

  def step(params, opt_state, feats, labels, mask, task_lo, step_in_task, total_steps, rng):
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)
    state, m = train_step(state, frozen, feats, labels, mask, task_lo, step_in_task,
                          total_steps, rng)
    return state.params, state.opt_state, {"loss": m["loss"], "accuracy": m["accuracy"]}

  step.num_traces = train_step.num_traces
  return step


def train_linear_probe_on_features(
    features: np.ndarray, labels: np.ndarray, params: Dict[str, Any],
    tx: optax.GradientTransformation, *, classes_per_task: int, task_lo: int = 0,
    indices: Optional[np.ndarray] = None, batch_size: int = 32, epochs: int = 1,
    seed: Optional[Sequence[int]] = (0, 0), loss_fn: Optional[Callable] = None,
    opt_state: Optional[PyTree] = None, rng: Optional[jax.Array] = None,
    step_offset: int = 0, total_steps: Optional[int] = None, loss_scope: str = "local",
    head_step: Optional[Callable] = None, first_epoch: int = 0
) -> Tuple[Dict[str, Any], PyTree, Dict[str, float]]:
  """Trains the head on cached features, with ``train.run``'s batches and step rngs.

  Args:
    features: ``float32 [N, D]`` (rows aligned with ``labels``; e.g. :func:`extract_features`
      of all training images).
    labels: incremental labels ``[N]``.
    params: ``{'head': {'kernel' [D, C], 'bias' [C]}}`` (the linear-probe trainable subtree).
    tx: the optimiser (its state is created unless ``opt_state`` is given).
    classes_per_task: ``k``.
    task_lo: first class of the task.
    indices: the task's training rows (default: all).
    batch_size, epochs: as ``train.batch_size`` / ``train.epochs``.
    seed: shuffle seed prefix: epoch ``e`` uses ``shuffle_seed=(*seed, e)`` (``train.run``:
      ``(config.seed, task)``); ``None``: no shuffling.
    loss_fn: ``objectives.make_loss_fn(...)`` (default cross-entropy).
    opt_state, rng: optimiser state to continue from; step rng root (step ``s`` uses
      ``fold_in(rng, s)``, as ``train.run``'s ``task_rng``; default ``PRNGKey(0)``).
    step_offset, total_steps: schedule offset (``train.run``'s global schedule) and schedule
      length (default ``(first_epoch + epochs) * ceil(len(indices) / batch_size)``), for
      scheduled objectives (aEPG).
    loss_scope: ``local`` or ``all``.
    head_step: a :func:`make_head_step` result to reuse (no recompilation across tasks).
    first_epoch: continue a task at this epoch (its shuffle seed, step counter and rngs), e.g.
      one epoch per call.

  Returns:
    ``(params, opt_state, last_metrics)``.
  """
  loss_fn = loss_fn or objectives.make_loss_fn("ce")
  step = head_step or make_head_step(loss_fn, tx, classes_per_task, loss_scope=loss_scope)
  idx = np.arange(len(features)) if indices is None else np.asarray(indices)
  nb = -(-len(idx) // batch_size)
  total = int(total_steps if total_steps is not None else (first_epoch + epochs) * nb)
  params = copy_tree(params)  # the step donates its input
  opt_state = tx.init(params) if opt_state is None else opt_state
  rng = jax.random.PRNGKey(0) if rng is None else rng
  metrics: Dict[str, float] = {}
  s = first_epoch * nb  # step in task
  for epoch in range(first_epoch, first_epoch + epochs):
    shuffle = None if seed is None else (*tuple(seed), epoch)
    for fb, yb, mb in batches(features, labels, idx, batch_size, shuffle_seed=shuffle):
      params, opt_state, m = step(params, opt_state, fb, yb, mb, task_lo, step_offset + s,
                                  total, jax.random.fold_in(rng, s))
      s += 1
      metrics = m
  return params, opt_state, {k: float(v) for k, v in jax.device_get(metrics).items()}


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                normalize: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """Per-class mean feature ``[C, D]`` and count ``[C]`` (classes without examples: zero mean,
  count 0). With ``normalize`` the features are L2-normalised first (cosine NCM)."""
  f = np.asarray(features, np.float32)
  if normalize:
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  labels = np.asarray(labels)
  onehot = np.zeros((len(labels), num_classes), np.float64)
  onehot[np.arange(len(labels)), labels] = 1.0
  sums = onehot.T @ f.astype(np.float64)
  counts = np.bincount(labels, minlength=num_classes)
  means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
  return means, counts


def ncm_predict(features: np.ndarray, means: np.ndarray, counts: Optional[np.ndarray] = None,
                *, normalize: bool = True, classes: Optional[np.ndarray] = None) -> np.ndarray:
  """Nearest-class-mean labels ``[N]``: the closest mean in Euclidean distance (of L2-normalised
  features and means with ``normalize``, i.e. cosine similarity). Only classes with
  ``counts > 0`` (and in ``classes``, e.g. the classes seen so far) are candidates.

  Raises:
    ValueError: no candidate class.
  """
  f = np.asarray(features, np.float32)
  m = np.asarray(means, np.float32)
  valid = np.ones(len(m), bool) if counts is None else np.asarray(counts) > 0
  if classes is not None:
    keep = np.zeros(len(m), bool)
    keep[np.asarray(classes)] = True
    valid &= keep
  if not valid.any():
    raise ValueError("ncm_predict: no class has a mean (counts are all zero)")
  if normalize:
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
  d2 = (np.sum(f * f, 1, keepdims=True) - 2.0 * f @ m.T + np.sum(m * m, 1)[None])
  d2[:, ~valid] = np.inf
  return np.argmin(d2, axis=1)
