"""Projection-constrained robust fine-tuning (TPGM, FTP) and the L2-SP / WiSE-FT baselines.

Pure JAX + optax. Notation: ``theta`` the trainable parameters (a pytree, e.g. the
nested ``params`` dict of :mod:`cft_jax.train`), ``theta_0`` the frozen pre-trained *anchor*
(same structure), ``D = theta - theta_0`` the displacement, ``n = ||D||`` its norm and ``gamma``
the projection *radius*. Every method constrains each tensor to a ball around its anchor::

    Pi_gamma(theta) = theta_0 + clip(gamma / n, 0, 1) * D                          (projection)

and the two trainable-projection methods learn ``gamma`` instead of hand-tuning it:

- **TPGM** -- Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning", CVPR 2023
  (reference code: github.com/PotatoTian/TPGM). Bi-level: every ``proj_freq`` training steps,
  ``max_iters`` Adam steps on ``gamma`` minimise the *validation* loss of the projected model
  ``L_val(theta_0 + clip(gamma / n, 0, 1) * stop_gradient(D))``, then the real parameters are
  projected. Radii start at ``min(n) / 2`` and are clamped to ``[1e-8, max(n)]``.
- **FTP** -- Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023
  (Alg. 1). No validation pass: the training gradient at the projected point ``theta_{t-1}``
  already gives ``dL/dgamma_{t-1} = sum_rows <g_t, c_{t-1}> / n_{t-1}`` (chain rule through
  ``theta_{t-1} = theta_0 + gamma_{t-1} c_{t-1} / n_{t-1}``), so one Adam step on ``gamma`` per
  training step, with positive radius gradients scaled by ``k`` ("gradient annealing").

Norms (``norm=``):

- ``"l2"``: the Frobenius norm of the whole tensor, one scalar per tensor.
- ``"mars"`` (maximum absolute row sum): the L1 norm of every *output row*. In Flax layout the
  output axis is the **last** one (``Dense`` kernel ``[in, out]``, ``Conv`` kernel
  ``[kh, kw, in, out]``, ``DenseGeneral`` ``[..., out]``), so row ``j`` is ``D[..., j]`` and
  ``n_j = sum_{i...} |D[i..., j]|`` has shape ``[out]``. 0-D/1-D tensors (biases, LayerNorm
  scales) are a single row: ``n = sum |D|``, a scalar. (PyTorch's ``[out, in, ...]`` layout puts
  the rows first; the reference code sums ``dim=1..``: the same rows.) Because the row axis is the
  last one, ``[out]``-shaped ratios broadcast against the ``[..., out]`` tensor directly.

Radii. As in both reference implementations (and docs/methods.md#projection), a
radius is one scalar per tensor by default; with ``norm="mars"`` it is compared with
every row norm (``clip(gamma / n_j, 0, 1)`` row by row). ``per_row=True`` learns one radius per
output row instead (shape ``[out]``; an extension, not in the papers). Excluded leaves (e.g. the
new classification head, ``exclude=is_head``) are never projected and have **no** radius: their
entry in every radii pytree is ``None``. Divisions use ``n + 1e-8`` (as the reference code), so
``n = 0`` gives ratio ``min(1, gamma / 1e-8)`` times a zero displacement: no NaN, no movement.

optax usage::

    # TPGM: projection after the base step; needs a validation batch at every update.
    tx = optax.chain(optax.adam(1e-4), tpgm(anchor, val_loss_fn, exclude=is_head))
    updates, opt_state = tx.update(grads, opt_state, params, val_batch=val_batch)

    # FTP: wraps the base optimiser (it needs the raw gradient, which a chain element after
    # the base optimiser cannot see) -- a drop-in GradientTransformation:
    tx = ftp(anchor, base=optax.adam(1e-4), exclude=is_head)
    updates, opt_state = tx.update(grads, opt_state, params)
    # ... or as a chain element fed the gradient explicitly:
    tx = optax.chain(optax.adam(1e-4), ftp(anchor, exclude=is_head))
    updates, opt_state = tx.update(grads, opt_state, params, grads=grads)

The anchor is stored in the optimiser state (not closed over), so a jitted step does not embed
the pre-trained weights as compile-time constants, and checkpoints of ``opt_state`` carry it
(one extra copy of the trainable parameters; FTP keeps a second one, ``c_{t-1}``).
``anchor=None`` uses the parameters passed to ``init`` as the anchor.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from cft_jax import peft as peft_lib

PyTree = Any
Array = jax.Array
Path = Tuple[str, ...]
Exclude = Union[None, PyTree, Callable[[Path], bool]]

EPS = 1e-8  # Lower radius bound and norm guard (reference code: 1e-8 in both).
NORMS = ("l2", "mars")

__all__ = [
    "EPS", "NORMS", "norms", "project", "init_radii", "clamp_radii", "exclude_mask", "is_head",
    "match_paths", "TPGMRadiiState", "TPGMState", "tpgm_init_radii_state", "tpgm_projected_params",
    "tpgm_val_loss", "tpgm_radius_grad", "tpgm_project_step", "tpgm", "FTPState", "ftp",
    "l2sp_penalty", "wise_ft", "reset_base_state", "dist_to_init", "decay_toward_anchor",
]

# --------------------------------------------------------------------------------------------
# Paths and exclusion masks.
# --------------------------------------------------------------------------------------------


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path(path) -> Path:
  return tuple(_key_str(k) for k in path)


def is_head(path: Path) -> bool:
  """Exclusion predicate for the classifier: :func:`cft_jax.peft.is_head` (``path[0]`` is the
  ``head``, the trainer's convention)."""
  return peft_lib.is_head(path)


def match_paths(*patterns: str) -> Callable[[Path], bool]:
  """Exclusion predicate: True where any regex in ``patterns`` is found in ``"/".join(path)``.

  Example: ``match_paths(r"^head/", r"pos_embed")``.
  """
  compiled = [re.compile(p) for p in patterns]
  return lambda path: any(c.search("/".join(path)) for c in compiled)


def exclude_mask(params: PyTree, exclude: Exclude = None) -> PyTree:
  """Resolves ``exclude`` to a pytree of Python bools with the structure of ``params``.

  Args:
    params: the trainable parameter pytree.
    exclude: ``None`` (nothing excluded); a predicate ``f(path: tuple[str, ...]) -> bool`` on the
      leaf's key path (e.g. :func:`is_head`); or a pytree of bools that is ``params`` itself or a
      prefix of it (``{"head": True, "backbone": False}``); True = excluded.

  Returns:
    A pytree of bools (True: never projected, no radius).
  """
  if exclude is None:
    return jax.tree.map(lambda _: False, params)
  if callable(exclude):
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(exclude(_path(p))), params)
  return jax.tree.map(lambda e, sub: jax.tree.map(lambda _: bool(e), sub), exclude, params)


# --------------------------------------------------------------------------------------------
# Norms, projection, radii.
# --------------------------------------------------------------------------------------------


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"unknown norm '{norm}'; known: {list(NORMS)}")


def _row_sum(x: Array, norm: str) -> Array:
  """Sums ``x`` over each "row" of ``norm``: all axes (l2, or ndim <= 1) or all but the last."""
  if norm == "l2" or x.ndim <= 1:
    return jnp.sum(x)
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _leaf_norm(d: Array, norm: str) -> Array:
  """Norm of one displacement tensor (float32): ``[]`` for l2 / 1-D, ``[out]`` for mars."""
  d = jnp.asarray(d, jnp.float32)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(jnp.square(d)))
  return _row_sum(jnp.abs(d), norm)


def norms(diff: PyTree, norm: str = "l2") -> PyTree:
  """Per-tensor (l2) or per-output-row (mars) norms of a displacement pytree.

  Args:
    diff: pytree of arrays, typically ``D = theta - theta_0`` (a single array works too).
    norm: ``"l2"``: ``n = sqrt(sum D^2)``, shape ``[]``; ``"mars"``: ``n_j = sum_{i...}
      |D[i..., j]|`` over all axes but the last (output) one, shape ``[out]`` for ``ndim >= 2``
      and ``[]`` (one row) for 0-D/1-D leaves.

  Returns:
    Pytree of float32 norms with the structure of ``diff``.
  """
  _check_norm(norm)
  return jax.tree.map(lambda d: _leaf_norm(d, norm), diff)


def _ratio(gamma: Array, n: Array) -> Array:
  """``clip(gamma / (n + eps), 0, 1)``: the shrink factor of the projection."""
  return jnp.clip(gamma / (n + EPS), 0.0, 1.0)


def _project_leaf(p, a, g, norm):
  if g is None:
    return p
  d = jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32)
  out = jnp.asarray(a, jnp.float32) + _ratio(jnp.asarray(g, jnp.float32), _leaf_norm(d, norm)) * d
  return out.astype(jnp.result_type(p))


def _is_single_leaf(tree) -> bool:
  s = jax.tree.structure(tree)
  return s.num_leaves == 1 and s.num_nodes == 1


def _broadcast_radii(params: PyTree, gamma) -> PyTree:
  """A single number/array ``gamma`` is used for every leaf; otherwise returned unchanged."""
  if _is_single_leaf(gamma) and not _is_single_leaf(params):
    return jax.tree.map(lambda _: gamma, params)
  return gamma


def project(params: PyTree, anchor: PyTree, gamma: PyTree, norm: str = "l2") -> PyTree:
  """Projects every tensor onto its ball around the anchor (docs/methods.md#projection).

  Leaf-wise ``theta <- theta_0 + clip(gamma / n, 0, 1) * (theta - theta_0)`` with ``n`` from
  :func:`norms`: a tensor (l2) or each output row (mars) whose norm exceeds ``gamma`` is shrunk
  towards the anchor until its norm is ``gamma``; others are unchanged.

  Args:
    params: pytree of arrays ``theta``.
    anchor: pytree ``theta_0`` with the structure of ``params``.
    gamma: radii with the structure of ``params``: per leaf a scalar, an array broadcastable to
      the leaf's norm (``[out]`` per-row radii for mars), or ``None`` (leaf left untouched). A
      single scalar is used for every leaf.
    norm: ``"l2"`` or ``"mars"``.

  Returns:
    The projected pytree (dtypes of ``params``). ``n = 0`` is guarded (``n + 1e-8``).
  """
  _check_norm(norm)
  gamma = _broadcast_radii(params, gamma)
  return jax.tree.map(lambda p, a, g: _project_leaf(p, a, g, norm), params, anchor, gamma)


def clamp_radii(radii: PyTree, n: PyTree) -> PyTree:
  """Clamps radii to ``[1e-8, max(n)]`` leaf-wise (``max`` over rows for mars).

  The upper bound is ``max(max(n), 1e-8)`` so that ``n = 0`` (weights at the anchor) gives the
  valid range ``{1e-8}``. ``None`` radii stay ``None``.
  """
  def clamp(r, nn):
    if r is None:
      return None
    return jnp.clip(r, EPS, jnp.maximum(jnp.max(nn), EPS))
  return jax.tree.map(clamp, radii, n, is_leaf=lambda x: x is None)


def _radius_like(leaf, norm: str, per_row: bool, fill=0.0):
  shape = (jnp.shape(leaf)[-1],) if (per_row and norm == "mars" and jnp.ndim(leaf) >= 2) else ()
  return jnp.full(shape, fill, jnp.float32)


def init_radii(params: PyTree, anchor: PyTree, norm: str = "l2", exclude: Exclude = None,
               per_row: bool = False) -> PyTree:
  """TPGM's initial radii: ``gamma = clamp(min(n) / 2, 1e-8, max(n))`` per tensor.

  ``n`` are the norms of ``params - anchor`` *now*. At the very start of fine-tuning
  ``params == anchor`` so ``n = 0`` and the radii would collapse to ``1e-8``; TPGM therefore
  initialises lazily, at its first projection (after ``proj_freq`` unconstrained steps), exactly
  as the reference code (``constraint = norms.min() / 2`` on its first call, then clipped):
  :func:`tpgm_project_step` calls this when its state is not yet initialised.

  Args:
    params, anchor: pytrees of arrays with one structure.
    norm: ``"l2"`` or ``"mars"``.
    exclude: see :func:`exclude_mask`; excluded leaves get ``None``.
    per_row: mars only, one radius per output row (each starts at the same ``min(n) / 2``).

  Returns:
    Radii pytree: float32 ``[]`` per leaf (``[out]`` with ``per_row``), ``None`` where excluded.
  """
  _check_norm(norm)
  mask = exclude_mask(params, exclude)

  def leaf(p, a, m):
    if m:
      return None
    n = _leaf_norm(jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32), norm)
    r = _radius_like(p, norm, per_row) + jnp.min(n) / 2
    return jnp.clip(r, EPS, jnp.maximum(jnp.max(n), EPS))
  return jax.tree.map(leaf, params, anchor, mask)


def _mask_from_radii(params: PyTree, radii: PyTree) -> PyTree:
  return jax.tree.map(lambda _, r: r is None, params, radii)


def _check_same_structure(params: PyTree, anchor: PyTree) -> None:
  if jax.tree.structure(params) != jax.tree.structure(anchor):
    raise ValueError("anchor must have the structure of params; got "
                     f"{jax.tree.structure(anchor)} vs {jax.tree.structure(params)}")


# --------------------------------------------------------------------------------------------
# TPGM (CVPR 2023).
# --------------------------------------------------------------------------------------------


class TPGMRadiiState(NamedTuple):
  """State of the TPGM radii (functional route, also held by :func:`tpgm`'s optax state).

  Attributes:
    radii: pytree like ``params``: float32 ``[]`` (``[out]`` with per-row mars) radius per leaf,
      ``None`` for excluded leaves.
    opt_state: ``optax.adam`` state of ``radii``.
    initialized: bool ``[]``; False until the first projection sets ``radii = min(n) / 2``.
  """

  radii: PyTree
  opt_state: optax.OptState
  initialized: Array


def tpgm_init_radii_state(params: PyTree, *, norm: str = "l2", exclude: Exclude = None,
                          per_row: bool = False, radius_lr: float = 1e-2) -> TPGMRadiiState:
  """Uninitialised radii state (placeholders; set lazily to ``min(n)/2`` at the first projection).

  Args:
    params: trainable pytree (only shapes and the exclusion mask are used).
    norm, exclude, per_row: see :func:`init_radii`.
    radius_lr: Adam learning rate of the radii (the state structure does not depend on it).
  """
  _check_norm(norm)
  mask = exclude_mask(params, exclude)
  radii = jax.tree.map(lambda p, m: None if m else _radius_like(p, norm, per_row), params, mask)
  return TPGMRadiiState(radii=radii, opt_state=optax.adam(radius_lr).init(radii),
                        initialized=jnp.zeros((), jnp.bool_))


def tpgm_projected_params(radii: PyTree, params: PyTree, anchor: PyTree, norm: str = "l2"
                          ) -> PyTree:
  """``theta_0 + clip(gamma / n, 0, 1) * stop_gradient(D)`` leaf-wise; differentiable in ``radii``.

  Leaves with a ``None`` radius are returned as they are (excluded: the head keeps its current,
  unprojected value, as in the reference code).
  """
  def leaf(p, a, r):
    if r is None:
      return p
    d = jax.lax.stop_gradient(jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32))
    out = jnp.asarray(a, jnp.float32) + _ratio(r, _leaf_norm(d, norm)) * d
    return out.astype(jnp.result_type(p))
  return jax.tree.map(leaf, params, anchor, radii)


def tpgm_val_loss(radii: PyTree, params: PyTree, anchor: PyTree, val_loss_fn: Callable,
                  val_batch: Any, norm: str = "l2") -> Array:
  """TPGM's upper-level objective ``L_val(theta_0 + clip(gamma / n, 0, 1) * sg(D); batch)``.

  Args:
    radii: radii pytree (``None`` for excluded leaves).
    params, anchor: current ``theta`` and ``theta_0``.
    val_loss_fn: ``f(params, val_batch) -> scalar`` (e.g. mean cross-entropy on a held-out batch).
    val_batch: any pytree passed through to ``val_loss_fn``.
    norm: ``"l2"`` or ``"mars"``.
  """
  return val_loss_fn(tpgm_projected_params(radii, params, anchor, norm), val_batch)


def tpgm_radius_grad(radii: PyTree, params: PyTree, anchor: PyTree, val_loss_fn: Callable,
                     val_batch: Any, norm: str = "l2") -> PyTree:
  """``d L_val / d gamma`` (:func:`tpgm_val_loss`), a pytree like ``radii``."""
  return jax.grad(tpgm_val_loss)(radii, params, anchor, val_loss_fn, val_batch, norm)


def tpgm_project_step(params: PyTree, anchor: PyTree, radii_state: TPGMRadiiState,
                      val_loss_fn: Callable, val_batch: Any, *, norm: str = "l2",
                      max_iters: int = 1, radius_lr: float = 1e-2,
                      batch_per_iter: bool = False) -> Tuple[PyTree, TPGMRadiiState]:
  """One TPGM projection update + projection (functional route; jit-able).

  With ``D = sg(theta - theta_0)`` and ``n = norms(D)``:

  1. if not initialised: ``gamma <- min(n) / 2`` per tensor (lazy init, see :func:`init_radii`);
  2. ``max_iters`` times: ``gamma <- clamp(gamma, 1e-8, max n)``; ``g = d L_val / d gamma``
     (:func:`tpgm_radius_grad`); ``gamma <- Adam(gamma, g; radius_lr)``;
  3. ``gamma <- clamp(gamma)``; ``theta <- theta_0 + clip(gamma / n, 0, 1) * D``.

  Args:
    params: current parameters ``theta`` (after the base optimiser step).
    anchor: ``theta_0``.
    radii_state: from :func:`tpgm_init_radii_state` or a previous call; its ``None`` radii mark
      the excluded leaves.
    val_loss_fn: ``f(params, val_batch) -> scalar``.
    val_batch: validation batch (any pytree; put large non-trainable arrays such as frozen
      weights here rather than closing over them). Reused for every iteration, unless
      ``batch_per_iter``: then every leaf has a leading ``[max_iters]`` axis and iteration ``i``
      uses slice ``i`` (the reference code draws a fresh batch per iteration).
    norm: ``"l2"`` or ``"mars"``.
    max_iters: Adam steps on the radii per call (``>= 0``).
    radius_lr: Adam learning rate of the radii (TPGM / FTP papers: 1e-2).
    batch_per_iter: see ``val_batch``.

  Returns:
    ``(projected_params, new_radii_state)``.
  """
  _check_norm(norm)
  _check_same_structure(params, anchor)
  radii = radii_state.radii
  d = jax.tree.map(lambda p, a, r: None if r is None else jax.lax.stop_gradient(
      jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32)), params, anchor, radii)
  n = jax.tree.map(lambda x: None if x is None else _leaf_norm(x, norm), d,
                   is_leaf=lambda x: x is None)
  first = jax.tree.map(lambda r, nn: None if r is None else jnp.broadcast_to(
      jnp.min(nn) / 2, jnp.shape(r)).astype(jnp.float32), radii, n, is_leaf=lambda x: x is None)
  radii = jax.tree.map(lambda r, f: jnp.where(radii_state.initialized, r, f), radii, first)
  adam = optax.adam(radius_lr)

  def body(i, carry):
    r, os = carry
    r = clamp_radii(r, n)
    batch = jax.tree.map(lambda x: x[i], val_batch) if batch_per_iter else val_batch
    g = tpgm_radius_grad(r, params, anchor, val_loss_fn, batch, norm)
    upd, os = adam.update(g, os, r)
    return optax.apply_updates(r, upd), os

  radii, opt_state = jax.lax.fori_loop(0, int(max_iters), body, (radii, radii_state.opt_state))
  radii = clamp_radii(radii, n)
  projected = tpgm_projected_params(radii, params, anchor, norm)
  return projected, TPGMRadiiState(radii=radii, opt_state=opt_state,
                                   initialized=jnp.ones((), jnp.bool_))


class TPGMState(NamedTuple):
  """optax state of :func:`tpgm`.

  Attributes:
    count: int32 ``[]``, number of updates so far.
    anchor: the frozen ``theta_0`` (never updated).
    radii_state: :class:`TPGMRadiiState`.
  """

  count: Array
  anchor: PyTree
  radii_state: TPGMRadiiState


def tpgm(anchor: Optional[PyTree], val_loss_fn: Callable, *, norm: str = "l2",
         proj_freq: int = 1, max_iters: int = 1, radius_lr: float = 1e-2,
         exclude: Exclude = None, per_row: bool = False, batch_per_iter: bool = False
         ) -> optax.GradientTransformationExtraArgs:
  """TPGM as an optax transformation, chained *after* a base optimiser.

  ``update(updates, state, params, *, val_batch)`` forms ``theta' = params + updates`` (the base
  optimiser's unconstrained step); on every ``proj_freq``-th call (calls ``proj_freq - 1``,
  ``2 proj_freq - 1``, ...; every call for ``proj_freq = 1``) it runs
  :func:`tpgm_project_step` on ``theta'`` and returns the update ``Pi(theta') - params`` that
  lands on the projected parameters; on the other calls it passes ``updates`` through. Excluded
  leaves always pass through. Use::

      tx = optax.chain(optax.adam(lr), tpgm(anchor, val_loss_fn, exclude=is_head))
      updates, opt_state = tx.update(grads, opt_state, params, val_batch=val_batch)

  Args:
    anchor: ``theta_0`` pytree with the structure of the params, or ``None`` to take the params
      given to ``init``. Stored (copied) in the state.
    val_loss_fn: ``f(params, val_batch) -> scalar`` validation loss (e.g. mean CE).
    norm: ``"l2"`` or ``"mars"``.
    proj_freq: projection period in steps (``>= 1``).
    max_iters: Adam steps on the radii per projection.
    radius_lr: Adam learning rate of the radii (1e-2).
    exclude: leaves never projected and without radius (see :func:`exclude_mask`).
    per_row: one radius per output row (mars only; default one per tensor, as the paper).
    batch_per_iter: ``val_batch`` leaves have a leading ``[max_iters]`` axis.

  Returns:
    ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params`` and ``val_batch``.
  """
  _check_norm(norm)
  if int(proj_freq) < 1:
    raise ValueError(f"proj_freq must be >= 1, got {proj_freq}")
  if int(max_iters) < 0:
    raise ValueError(f"max_iters must be >= 0, got {max_iters}")

  def init_fn(params):
    anc = params if anchor is None else anchor
    _check_same_structure(params, anc)
    return TPGMState(count=jnp.zeros((), jnp.int32), anchor=peft_lib.copy_tree(anc),
                     radii_state=tpgm_init_radii_state(params, norm=norm, exclude=exclude,
                                                       per_row=per_row, radius_lr=radius_lr))

  def update_fn(updates, state, params=None, *, val_batch=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("tpgm: update() needs params (tx.update(grads, state, params, ...))")
    if val_batch is None:
      raise ValueError("tpgm: update() needs a validation batch: "
                       "tx.update(grads, state, params, val_batch=...)")
    new_params = optax.apply_updates(params, updates)

    def do_project(_):
      return tpgm_project_step(new_params, state.anchor, state.radii_state, val_loss_fn, val_batch,
                               norm=norm, max_iters=max_iters, radius_lr=radius_lr,
                               batch_per_iter=batch_per_iter)

    if proj_freq == 1:
      projected, radii_state = do_project(None)
    else:
      projected, radii_state = jax.lax.cond((state.count + 1) % proj_freq == 0, do_project,
                                            lambda _: (new_params, state.radii_state), None)
    mask = _mask_from_radii(params, radii_state.radii)
    new_updates = jax.tree.map(
        lambda q, p, u, m: u if m else (jnp.asarray(q) - jnp.asarray(p)).astype(jnp.result_type(u)),
        projected, params, updates, mask)
    return new_updates, TPGMState(count=state.count + 1, anchor=state.anchor,
                                  radii_state=radii_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# FTP (NeurIPS 2023).
# --------------------------------------------------------------------------------------------


class FTPState(NamedTuple):
  """optax state of :func:`ftp`.

  Attributes:
    count: int32 ``[]``, number of updates so far (``t - 1`` in the paper's 1-based ``t``).
    anchor: the frozen ``theta_0``.
    radii: pytree like ``params``: float32 radius per leaf (``[out]`` with per-row mars),
      ``None`` for excluded leaves.
    radius_opt_state: ``optax.adam`` state of ``radii``.
    prev_c: ``c_{t-1} = theta~_{t-1} - theta_0`` (float32; the previous *unconstrained* step's
      displacement), ``None`` for excluded leaves.
    base_state: state of the wrapped base optimiser (``optax.EmptyState()`` when chained).
  """

  count: Array
  anchor: PyTree
  radii: PyTree
  radius_opt_state: optax.OptState
  prev_c: PyTree
  base_state: optax.OptState


def ftp(anchor: Optional[PyTree] = None, *, base: Optional[optax.GradientTransformation] = None,
        k: float = 1.0, radius_lr: float = 1e-2, norm: str = "mars", exclude: Exclude = None,
        per_row: bool = False) -> optax.GradientTransformationExtraArgs:
  """FTP (Tian et al., NeurIPS 2023, Alg. 1) as an optax transformation.

  At update ``t`` (1-based) with raw gradient ``g_t = dL/dtheta`` at the current, projected
  ``theta_{t-1}`` and the base optimiser's step ``u_t``:

  1. ``theta~_t = theta_{t-1} + u_t``; ``c_t = theta~_t - theta_0``; ``n_t = norms(c_t)``;
  2. ``t = 1``: ``gamma_1 = 1e-8`` -- the first step is projected (almost) back onto the anchor,
     so training starts *exactly* at ``theta_0`` and the radii grow from zero (reference code);
     ``t > 1``: ``grad_gamma = sum_rows <g_t, c_{t-1}>_row / n_{t-1}`` (the chain rule through
     ``theta_{t-1} = theta_0 + gamma_{t-1} c_{t-1} / n_{t-1}``), scaled by ``k`` where it is
     positive (gradient annealing: ``k < 1`` slows the shrinking of the radius), then
     ``gamma_t = clamp(Adam(gamma_{t-1}, grad_gamma; radius_lr), 1e-8, max n_t)``;
  3. ``theta_t = theta_0 + clip(gamma_t / (n_t + 1e-8), 0, 1) * c_t``; return
     ``theta_t - theta_{t-1}`` (divisions by ``n`` use ``n + 1e-8`` throughout).

  With per-tensor radii (default) the row sum runs over every row of the tensor (a scalar
  gradient); with ``per_row`` each row keeps its own term. Adam on the radii uses optax's bias
  correction counted from the first radius update (the reference code counts from ``t = 1``).

  Chaining. FTP needs the raw gradient ``g_t`` *and* the base optimiser's step, which no chain
  element after the base optimiser can see, so there are two ways to use it:

  - ``ftp(anchor, base=optax.adam(lr))`` -- recommended: a drop-in transformation wrapping the
    base optimiser; ``tx.update(grads, state, params)`` as usual (the trainer needs no change).
  - ``optax.chain(optax.adam(lr), ftp(anchor))`` and
    ``tx.update(grads, state, params, grads=grads)``: the gradient is passed as an extra
    argument (raises if missing).

  Args:
    anchor: ``theta_0`` or ``None`` (the params given to ``init``); stored in the state.
    base: optional base optimiser to wrap (an ``ExtraArgs`` one gets the extra arguments).
    k: gradient-annealing factor on positive radius gradients (paper default 1).
    radius_lr: Adam learning rate of the radii (1e-2).
    norm: ``"mars"`` (paper default) or ``"l2"``.
    exclude: leaves that are never projected (no radius; their update passes through).
    per_row: one radius per output row (mars only).

  Returns:
    ``optax.GradientTransformationExtraArgs`` (``init(params)``, ``update(updates_or_grads,
    state, params, **extra)``).
  """
  _check_norm(norm)
  adam = optax.adam(radius_lr)

  def init_fn(params):
    anc = params if anchor is None else anchor
    _check_same_structure(params, anc)
    mask = exclude_mask(params, exclude)
    radii = jax.tree.map(lambda p, m: None if m else _radius_like(p, norm, per_row, EPS),
                         params, mask)
    prev_c = jax.tree.map(lambda p, m: None if m else jnp.zeros(jnp.shape(p), jnp.float32),
                          params, mask)
    return FTPState(count=jnp.zeros((), jnp.int32), anchor=peft_lib.copy_tree(anc), radii=radii,
                    radius_opt_state=adam.init(radii), prev_c=prev_c,
                    base_state=base.init(params) if base is not None else optax.EmptyState())

  def core(updates, grads, state, params, base_state):
    radii = state.radii
    first = state.count == 0
    c = jax.tree.map(lambda p, u, a, r: None if r is None else (
        jnp.asarray(p, jnp.float32) + jnp.asarray(u, jnp.float32) - jnp.asarray(a, jnp.float32)),
        params, updates, state.anchor, radii)
    n = jax.tree.map(lambda x: None if x is None else _leaf_norm(x, norm), c,
                     is_leaf=lambda x: x is None)

    def radius_grad(g, cp, r):
      if r is None:
        return None
      n_prev = _leaf_norm(cp, norm) + EPS
      gg = _row_sum(jnp.asarray(g, jnp.float32) * cp, norm) / n_prev
      if not per_row or jnp.ndim(r) == 0:
        gg = jnp.sum(gg)
      return jnp.where(gg > 0, k * gg, gg)

    g_gamma = jax.tree.map(radius_grad, grads, state.prev_c, radii)
    upd, new_os = adam.update(g_gamma, state.radius_opt_state, radii)
    stepped = clamp_radii(optax.apply_updates(radii, upd), n)
    new_radii = jax.tree.map(lambda s, r: jnp.where(first, jnp.full_like(r, EPS), s), stepped,
                             radii)
    new_os = jax.tree.map(lambda new, old: jnp.where(first, old, new), new_os,
                          state.radius_opt_state)

    def out_update(p, u, a, cc, nn, r):
      if r is None:
        return u
      theta = jnp.asarray(a, jnp.float32) + _ratio(r, nn) * cc
      return (theta - jnp.asarray(p, jnp.float32)).astype(jnp.result_type(u))

    new_updates = jax.tree.map(out_update, params, updates, state.anchor, c, n, new_radii)
    return new_updates, FTPState(count=state.count + 1, anchor=state.anchor, radii=new_radii,
                                 radius_opt_state=new_os, prev_c=c, base_state=base_state)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("ftp: update() needs params (tx.update(grads, state, params))")
    if base is not None:
      grads = updates
      if isinstance(base, optax.GradientTransformationExtraArgs):
        updates, base_state = base.update(grads, state.base_state, params, **extra_args)
      else:
        updates, base_state = base.update(grads, state.base_state, params)
    else:
      grads = extra_args.get("grads")
      if grads is None:
        raise ValueError("ftp chained after a base optimiser needs the raw gradient: "
                         "tx.update(grads, state, params, grads=grads); or use "
                         "ftp(anchor, base=optimizer)")
      base_state = state.base_state
    return core(updates, grads, state, params, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Baselines.
# --------------------------------------------------------------------------------------------


def l2sp_penalty(params: PyTree, anchor: PyTree, alpha: float = 0.01, exclude: Exclude = None,
                 beta: float = 0.0) -> Array:
  """L2-SP regulariser (Li et al., "Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks", ICML 2018).

  ``Omega(theta) = alpha / 2 * sum_{S} ||theta - theta_0||^2 + beta / 2 * sum_{excl} ||theta||^2``
  where ``S`` are the non-excluded leaves (pulled to the pre-trained starting point) and the
  excluded leaves (the new head) get plain weight decay ``beta`` (0 by default). Add it to the
  training loss.

  Args:
    params, anchor: pytrees with one structure (``anchor`` entries of excluded leaves are unused).
    alpha: strength of the pull towards the anchor.
    exclude: see :func:`exclude_mask`.
    beta: L2 strength on the excluded leaves.

  Returns:
    float32 scalar.
  """
  mask = exclude_mask(params, exclude)

  def leaf(p, a, m):
    p = jnp.asarray(p, jnp.float32)
    if m:
      return 0.5 * beta * jnp.sum(jnp.square(p))
    return 0.5 * alpha * jnp.sum(jnp.square(p - jnp.asarray(a, jnp.float32)))
  terms = jax.tree.leaves(jax.tree.map(leaf, params, anchor, mask))
  return sum(terms, jnp.zeros((), jnp.float32))


def wise_ft(params_ft: PyTree, params_zs: PyTree, alpha: float) -> PyTree:
  """WiSE-FT weight-space ensemble (Wortsman et al., "Robust fine-tuning of zero-shot models",
  CVPR 2022): ``theta = (1 - alpha) * theta_0 + alpha * theta_ft``.

  Args:
    params_ft: fine-tuned parameters ``theta_ft``.
    params_zs: zero-shot / pre-trained parameters ``theta_0`` (same structure).
    alpha: mixing coefficient (0: zero-shot, 1: fine-tuned; the paper's default 0.5).

  Returns:
    The interpolated pytree, in the dtypes of ``params_ft``.
  """
  _check_same_structure(params_ft, params_zs)
  return jax.tree.map(
      lambda f, z: ((1.0 - alpha) * jnp.asarray(z, jnp.float32)
                    + alpha * jnp.asarray(f, jnp.float32)).astype(jnp.result_type(f)),
      params_ft, params_zs)


# --------------------------------------------------------------------------------------------
# Continual use: task boundaries, monitoring, anchored weight decay.
# --------------------------------------------------------------------------------------------


def _is_projection_state(x) -> bool:
  return isinstance(x, (TPGMState, FTPState))


def reset_base_state(tx: optax.GradientTransformation, opt_state: optax.OptState,
                     params: PyTree) -> optax.OptState:
  """A fresh base-optimiser state that keeps every projection sub-state (task boundaries).

  ``optim.reset_per_task`` restarts the optimiser at every task. The projection of TPGM and FTP
  is a property of the whole fine-tuning run, not of one task: TPGM's radii (and their Adam
  state, ``initialized`` flag), FTP's radii, their Adam state, the step count and the previous
  displacement ``c_{t-1}`` must carry over. Re-initialising them would put FTP back at its
  first step (radius 1e-8: every non-head parameter snaps back onto ``theta_0``, Tian et al.,
  NeurIPS 2023, Alg. 1 line 1) and restart TPGM's radii at ``min(n) / 2`` (Tian et al., CVPR 2023),
  undoing the displacement learnt on the earlier tasks.

  Args:
    tx: the optimiser whose state this is (``ftp(anchor, base=...)``, ``optax.chain(base,
      tpgm(...))`` or any transformation without a projection).
    opt_state: its current state.
    params: the current trainable parameters (the base state is re-initialised from them).

  Returns:
    ``tx.init(params)`` with every :class:`TPGMState` taken from ``opt_state`` and every
    :class:`FTPState` taken from ``opt_state`` except its ``base_state`` (fresh). Without a
    projection this is ``tx.init(params)``.

  Raises:
    ValueError: ``opt_state`` does not have the structure of ``tx.init(params)``.
  """
  fresh = tx.init(params)

  def keep(new, old):
    if isinstance(new, FTPState):
      return old._replace(base_state=new.base_state)
    if isinstance(new, TPGMState):
      return old
    return new

  try:
    return jax.tree.map(keep, fresh, opt_state, is_leaf=_is_projection_state)
  except ValueError as e:
    raise ValueError("reset_base_state: opt_state does not match tx.init(params) "
                     f"(another optimiser?): {e}") from None


def dist_to_init(params: PyTree, anchor: PyTree, exclude: Exclude = is_head) -> Array:
  """``||theta - theta_0||_2`` over the non-excluded leaves (default: all but the head).

  The L2 norm of the displacement from the pretrained anchor, concatenated over every
  constrained tensor (the quantity TPGM/FTP bound tensor by tensor); float32 scalar. Logged as
  ``dist_to_init`` by the trainer for projection runs.

  Args:
    params: trainable pytree ``theta``.
    anchor: ``theta_0`` with the structure of ``params``.
    exclude: see :func:`exclude_mask` (default :func:`is_head`).
  """
  _check_same_structure(params, anchor)
  mask = exclude_mask(params, exclude)
  terms = jax.tree.leaves(jax.tree.map(
      lambda p, a, m: jnp.zeros((), jnp.float32) if m else jnp.sum(jnp.square(
          jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32))), params, anchor, mask))
  return jnp.sqrt(sum(terms, jnp.zeros((), jnp.float32)))


def decay_toward_anchor(weight_decay: float, exclude: Exclude = None
                        ) -> optax.GradientTransformationExtraArgs:
  """Decoupled weight decay toward an anchor: ``u <- u + wd * (theta - theta_anchor)``.

  ``optax.add_decayed_weights`` pulls parameters toward 0. For a linearized network
  ``f(theta_0) + J (theta - theta_0)`` the learnable quantity is the offset ``theta - theta_0``
  (Shon et al., "DLCFT", ECCV 2022, eq. 6 writes the model in the offset), so weight decay must
  shrink the offset: decay toward ``theta_0``. Placed where ``add_decayed_weights`` sits in
  AdamW (Loshchilov & Hutter, ICLR 2019): after the Adam scaling, before the learning rate.

  ``update(updates, state, params, *, decay_anchor, **extra)``: ``decay_anchor`` is a pytree with
  the structure of ``params`` (passed at every update, so a jitted step does not embed it as a
  constant). Excluded leaves (see :func:`exclude_mask`) are passed through undecayed.

  Raises:
    ValueError: ``update`` without ``params`` or ``decay_anchor``.
  """
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, decay_anchor=None, **extra_args):
    del extra_args
    if params is None or decay_anchor is None:
      raise ValueError("decay_toward_anchor: update() needs params and decay_anchor "
                       "(tx.update(grads, state, params, decay_anchor=theta_0))")
    mask = exclude_mask(params, exclude)
    new = jax.tree.map(
        lambda u, p, a, m: u if m else (u + weight_decay * (
            jnp.asarray(p, jnp.float32) - jnp.asarray(a, jnp.float32))).astype(u.dtype),
        updates, params, decay_anchor, mask)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
