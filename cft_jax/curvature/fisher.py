"""Diagonal Fisher (EWC), MAS importance and the shared output-curvature sampling (methods.md#ewc).

Notation: a model ``f(x; theta)`` gives logits ``z [B, C]``; ``l(z, y)`` is the per-example loss;
``J = dz/dtheta`` the per-example Jacobian. Every curvature here is an average over examples
(``E_x``), matching losses that average over the batch.

Output cotangents (:func:`output_cotangents`): the Fisher of the model's predictive
distribution is ``F = E_x[J^T H_z J]`` with ``H_z = E_{y~p(y|x)}[dl/dz dl/dz^T]`` (paper eq. 4,
eq. 1). We represent ``H_z`` by ``K`` logit-space vectors ``q_k`` with ``sum_k q_k q_k^T ~ H_z``
and backpropagate them (``J^T q_k`` is one vector-Jacobian product):

======================  =========================================  ============================
``fisher_type``         ``loss="ce"`` (``p = softmax z``)          ``loss="mse"`` (eq. 5)
======================  =========================================  ============================
``"empirical"`` (K=1)   ``p - e_y`` at the TRUE label              ``z - alpha e_y``
``"mc"`` (K samples)    ``(p - e_yhat) / sqrt K``, yhat ~ Cat(p)   ``-eps / sqrt K``, eps~N(0,I)
``"exact"`` (K=C)       ``sqrt(p_c) (p - e_c)``, c = 1..C          ``e_c`` (``H_z = I``)
======================  =========================================  ============================

For MSE, ``"mc"`` is the Fisher of ``y ~ N(f(x), I)`` (methods.md#ewc: sampled targets ``yhat = z +
eps``, ``dl/dz = z - yhat = -eps``) and ``"exact"`` is its expectation, the Gauss-Newton matrix
``E[J^T J]`` — for a model linear in ``theta`` (DLCFT) the exact Hessian of the MSE loss (eq. 8).
The empirical Fisher is NOT a Fisher (its scale follows the residuals and vanishes at a perfect
fit); it is what the EWC literature often computes, so it is offered. MSE labels may also be
float targets ``[B, C]`` (then ``alpha`` is unused).

Batches: an iterable of ``(x, y)`` or ``(x, y, mask)`` tuples (the trainer's batches), ``x``
already preprocessed, ``y`` int ``[B]`` (or float targets ``[B, C]`` for MSE), ``mask`` ``[B]``
weights (0 for padding). Expectations are ``sum_b mask_b (.) / sum_b mask_b``.

Per-example gradients use ``vmap`` over examples (``apply_fn`` is called on batches of one), so
memory is ``B * K * |theta|`` floats per batch: pick the batch size accordingly (or
``microbatch``). Models must be deterministic (eval-mode BN, no dropout).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp

PyTree = Any
Array = jax.Array
ApplyFn = Callable[[PyTree, Array], Array]

LOSSES = ("ce", "mse")
FISHER_TYPES = ("empirical", "mc", "exact")


def _float(x) -> Array:
  """``x`` as an array of at least float32 precision (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(loss: str, fisher_type: str, rng) -> None:
  if loss not in LOSSES:
    raise ValueError(f"unknown loss '{loss}'; known: {list(LOSSES)}")
  if fisher_type not in FISHER_TYPES:
    raise ValueError(f"unknown fisher_type '{fisher_type}'; known: {list(FISHER_TYPES)}")
  if fisher_type == "mc" and rng is None:
    raise ValueError("fisher_type='mc' samples labels from the model: pass rng")


def output_cotangents(logits: Array, labels: Array, *, loss: str, fisher_type: str,
                      rng: Optional[Array] = None, num_samples: int = 1,
                      mse_alpha: float = 15.0) -> Array:
  """Logit-space vectors ``q [K, B, C]`` with ``sum_k q_k q_k^T`` = the output curvature.

  See the module table. ``K`` is 1 (empirical), ``num_samples`` (mc) or ``C`` (exact).

  Args:
    logits: ``z [B, C]``.
    labels: int ``[B]``; for MSE also float targets ``[B, C]``.
    loss: ``"ce"`` (softmax cross-entropy) or ``"mse"`` (``0.5 ||alpha e_y - z||^2``).
    fisher_type: ``"empirical"``, ``"mc"`` or ``"exact"``.
    rng: PRNG key (``"mc"`` only).
    num_samples: ``K`` for ``"mc"``.
    mse_alpha: target scale ``alpha`` of the MSE loss (paper: 15).

  Raises:
    ValueError: unknown loss / fisher_type, or ``"mc"`` without ``rng``.
  """
  _check(loss, fisher_type, rng)
  z = _float(logits)
  b, c = z.shape
  if loss == "ce":
    p = jax.nn.softmax(z, axis=-1)
    if fisher_type == "empirical":
      return (p - jax.nn.one_hot(labels, c, dtype=z.dtype))[None]
    if fisher_type == "mc":
      yhat = jax.random.categorical(rng, z, axis=-1, shape=(num_samples, b))
      return (p[None] - jax.nn.one_hot(yhat, c, dtype=z.dtype)) / jnp.sqrt(num_samples)
    # exact: q_c = sqrt(p_c) (p - e_c), so sum_c q_c q_c^T = diag(p) - p p^T (the CE Hessian)
    eye = jnp.eye(c, dtype=z.dtype)
    return jnp.sqrt(p).T[:, :, None] * (p[None] - eye[:, None, :])
  if fisher_type == "empirical":
    labels = jnp.asarray(labels)
    target = (labels.astype(z.dtype) if labels.ndim == 2
              else mse_alpha * jax.nn.one_hot(labels, c, dtype=z.dtype))
    return (z - target)[None]
  if fisher_type == "mc":
    return -jax.random.normal(rng, (num_samples, b, c), z.dtype) / jnp.sqrt(num_samples)
  return jnp.broadcast_to(jnp.eye(c, dtype=z.dtype)[:, None, :], (c, b, c))


def iterate_batches(batches: Iterable) -> Iterator[Tuple[Array, Array, Array]]:
  """Yields ``(x, y, mask)`` from ``(x, y)`` / ``(x, y, mask)`` tuples (mask defaults to ones).

  Raises:
    ValueError: a batch that is not a 2- or 3-tuple.
  """
  for batch in batches:
    if len(batch) == 2:
      x, y = batch
      mask = jnp.ones((len(y),), jnp.float32)
    elif len(batch) == 3:
      x, y, mask = batch
    else:
      raise ValueError(f"a batch must be (x, y) or (x, y, mask), got {len(batch)} items")
    yield jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask, jnp.float32)


def _per_example_reduce(apply_fn: ApplyFn, params: PyTree, x: Array, q: Array, w: Array,
                        reduce: str, microbatch: Optional[int]) -> PyTree:
  """``sum_b w_b sum_k r(J_b^T q_kb)`` leaf-wise, ``r`` = square or abs.

  Args:
    x: inputs ``[B, ...]``; q: cotangents ``[K, B, C]``; w: weights ``[B]``.
  """

  def one(args):
    xb, qb = args  # [...], [K, C]
    out, vjp = jax.vjp(lambda p: apply_fn(p, xb[None])[0], params)
    grads = jax.vmap(lambda c: vjp(c.astype(out.dtype))[0])(qb)  # leaves [K, ...]
    fn = jnp.square if reduce == "square" else jnp.abs
    return jax.tree_util.tree_map(lambda g: jnp.sum(fn(_float(g)), axis=0), grads)

  qt = jnp.swapaxes(q, 0, 1)  # [B, K, C]
  if microbatch:
    per_ex = jax.lax.map(one, (x, qt), batch_size=microbatch)
  else:
    per_ex = jax.vmap(one)((x, qt))
  return jax.tree_util.tree_map(lambda g: jnp.tensordot(w.astype(g.dtype), g, axes=1), per_ex)


def cached_batch_fn(jit_cache: Optional[dict], key: Tuple, build: Callable[[], Callable]
                    ) -> Callable:
  """``build()`` (a jitted per-batch function), or the one stored under ``key`` in ``jit_cache``.

  Every estimator here compiles a fresh function per call; a caller that calls one again with
  the SAME model function (e.g. once per task of a run: the network and its frozen weights never
  change) passes a dict it keeps for that purpose, and the second call reuses the compiled code
  instead of tracing and compiling again. The estimator's own settings are part of ``key``; the
  caller keeps one dict per model function (a cached entry closes over the first call's
  ``apply_fn``). ``jit_cache=None``: no caching.
  """
  if jit_cache is None:
    return build()
  if key not in jit_cache:
    jit_cache[key] = build()
  return jit_cache[key]


def accumulate(batch_fn, params, batches, rng, what: str = "") -> PyTree:
  """``sum_i batch_fn(params, x_i, y_i, w_i, fold_in(rng, i)) / sum_i sum(w_i)`` over batches.

  The loop every curvature estimator shares (diagonal Fisher, MAS, K-FAC): ``batch_fn`` returns
  the weighted per-batch sums of a pytree; the result is their example-weighted mean.

  Raises:
    ValueError: no examples (empty batches or all-zero masks), or ``batch_fn`` found nothing
      to measure (``what``, e.g. "K-FAC layers", names it in the message).
  """
  total, weight = None, 0.0
  for i, (x, y, w) in enumerate(iterate_batches(batches)):
    key = None if rng is None else jax.random.fold_in(rng, i)
    s = batch_fn(params, x, y, w, key)
    total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
    weight += float(jnp.sum(w))
  if total is None or weight <= 0 or (what and not total):
    raise ValueError("no examples (empty batches or all-zero masks)"
                     + (f" or no {what} found" if what else ""))
  return jax.tree_util.tree_map(lambda t: t / weight, total)


def diagonal_fisher(apply_fn: ApplyFn, params: PyTree, batches: Iterable, *, loss: str,
                    fisher_type: str = "mc", rng: Optional[Array] = None,
                    num_samples: int = 1, mse_alpha: float = 15.0,
                    microbatch: Optional[int] = None, const: Optional[PyTree] = None,
                    jit_cache: Optional[dict] = None) -> PyTree:
  """Diagonal Fisher ``F_ii = E_x sum_k (J^T q_k)_i^2`` (EWC, Kirkpatrick et al. 2017).

  ``fisher_type="empirical"``: ``E_x[(d l(x, y_true) / d theta)^2]``; ``"mc"``: labels sampled
  from the model (true Fisher, eq. 4; categorical for CE, ``y ~ N(f(x), I)`` for MSE);
  ``"exact"``: the expectation over labels in closed form (``C`` backward passes per example).

  Args:
    apply_fn: ``apply_fn(params, x [B, ...]) -> logits [B, C]`` (deterministic).
    params: the pytree to take the Fisher of (e.g. the trainable subtree; close over the rest).
    batches: iterable of ``(x, y)`` / ``(x, y, mask)``.
    loss: ``"ce"`` or ``"mse"``.
    fisher_type: see :func:`output_cotangents`.
    rng: PRNG key (``"mc"``); folded with the batch index.
    num_samples: label samples per example (``"mc"``).
    mse_alpha: MSE target scale.
    microbatch: examples per ``lax.map`` step instead of one ``vmap`` over the batch.
    const: optional pytree passed as ``apply_fn(params, x, const)`` (not differentiated): values
      that change between calls (e.g. the other parameters) without a new compilation.
    jit_cache: see :func:`cached_batch_fn`.

  Returns:
    A pytree like ``params`` (at least float32) of non-negative importances.
  """
  _check(loss, fisher_type, rng)

  def build():
    @jax.jit
    def batch_fn(params_and_const, x, y, w, key):
      params, const = params_and_const
      fn = apply_fn if const is None else (lambda p, xx: apply_fn(p, xx, const))
      logits = fn(params, x)
      q = output_cotangents(logits, y, loss=loss, fisher_type=fisher_type, rng=key,
                            num_samples=num_samples, mse_alpha=mse_alpha)
      return _per_example_reduce(fn, params, x, q, w, "square", microbatch)
    return batch_fn

  batch_fn = cached_batch_fn(jit_cache, ("diagonal_fisher", loss, fisher_type, num_samples,
                                         mse_alpha, microbatch, const is None), build)
  return accumulate(batch_fn, (params, const), batches, rng)


def mas_importance(apply_fn: ApplyFn, params: PyTree, batches: Iterable,
                   microbatch: Optional[int] = None, jit_cache: Optional[dict] = None) -> PyTree:
  """MAS importance ``Omega = E_x |d ||f(x)||_2^2 / d theta|`` (Aljundi et al. 2018, eq. 4).

  The gradient of the squared L2 norm of the output (``J^T 2 f(x)``) is taken per example and its
  absolute value averaged; no labels are used (``y`` of the batches is ignored).

  ``jit_cache``: see :func:`cached_batch_fn`.

  Returns:
    A pytree like ``params`` (at least float32).
  """

  def build():
    @jax.jit
    def batch_fn(params, x, y, w, key):
      del y, key
      z = _float(apply_fn(params, x))
      return _per_example_reduce(apply_fn, params, x, (2.0 * z)[None], w, "abs", microbatch)
    return batch_fn

  batch_fn = cached_batch_fn(jit_cache, ("mas", microbatch), build)
  return accumulate(batch_fn, params, batches, None)


def ewc_penalty(params: PyTree, anchor: PyTree, importance: PyTree) -> Array:
  """``1/2 sum_i F_i (theta_i - theta*_i)^2`` (EWC / MAS quadratic penalty, eq. 10 diagonal).

  Args:
    params: current ``theta``; anchor: ``theta*`` (previous task's solution); importance: ``F``
      (or MAS ``Omega``) — three pytrees of the same structure.

  Returns:
    Scalar (no ``lambda``; the caller weights it, e.g. ``(t-1)/t`` of eq. 11).
  """
  terms = jax.tree_util.tree_map(
      lambda p, a, f: jnp.sum(f * jnp.square(_float(p) - a)),
      params, anchor, importance)
  return 0.5 * sum(jax.tree_util.tree_leaves(terms))
