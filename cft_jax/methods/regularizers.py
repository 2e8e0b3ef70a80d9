"""Quadratic parameter regularisers: EWC, MAS, OSLA and DLCFT (DLCFT paper §3).

All four penalise the distance to the previous solution ``theta_{t-1}`` under a curvature ``H``
of the old tasks' loss (paper eq. 10)::

  L_reg = 1/2 (theta - theta_{t-1})^T H (theta - theta_{t-1})

and differ in ``H``:

=========  ====================================================  ==============================
method     ``H``                                                 module
=========  ====================================================  ==============================
``ewc``    diagonal Fisher (MC or empirical; Kirkpatrick 2017)    :func:`~cft_jax.curvature.diagonal_fisher`
``mas``    MAS importance ``E|d||f||^2/dtheta|`` (Aljundi 2018)    :func:`~cft_jax.curvature.mas_importance`
``osla``   K-FAC of the NON-linear network (Ritter et al. 2018)   :func:`~cft_jax.curvature.kfac_factors`
``dlcft``  K-FAC / TK-FAC of the linearized network, MSE loss     :mod:`cft_jax.curvature.kfac`
=========  ====================================================  ==============================

Loss weighting (``method.weighting``), with ``t`` the 1-based task index:

- ``"dlcft"`` (default, paper eq. 11): ``L = (1/t) L_data + ((t-1)/t) lambda L_reg`` with the
  curvature the running MEAN over tasks (``accumulate="mean"``; K-FAC factors averaged with
  weights ``(t-1) : 1`` per factor, :func:`~cft_jax.curvature.average_factors`), so ``L_reg``
  approximates the mean old-task loss and the two terms are weighted by their task counts.
  Implemented as ``data_weight = 1/t`` and ``penalty = ((t-1)/t) lambda L_reg``.
- ``"plain"``: ``L = L_data + lambda L_reg`` (the usual EWC form; use ``accumulate="sum"`` for
  the sum of per-task Fishers).

``lambda`` is ``method.strength`` (1 by default: with the dlcft weighting the penalty IS the
quadratic model of the old loss, so no tuning is needed in principle).

Curvature is estimated on the task's training data at the end of the task (``end_task``) over the
logits the data loss uses: the task's classes ``[lo, hi)`` with ``loss.scope=local``, the seen
classes ``[0, hi)`` with ``loss.scope=all`` (all classes in data-IL). The output curvature is that
of ``config.loss.name``: MSE for ``mse`` (``y ~ N(f(x), I)`` for MC), softmax CE for any other loss.

K-FAC covers ``nn.Dense`` and ungrouped ``nn.Conv`` layers (:func:`default_layer_filter`);
trainable leaves of other modules (depthwise convs, :class:`~cft_jax.peft.lora.LoRADense`,
BatchNorm affine, ...) get the diagonal Fisher of the same model and loss when
``method.diag_fallback`` (default True), otherwise they are unregularised.

Task-IL: ``method.exclude_head=True`` regularises only the feature extractor (paper §3.2: the
per-task heads do not interfere).

Which network the curvature is taken of, by ``model.linearize`` (see :mod:`cft_jax.train`):
``False``: the network at ``theta_{t-1}`` (OSLA, EWC); ``True``/``"full"``: the whole network is
linearized, so its Jacobian is that of the network at ``theta_0`` and the output cotangents are
taken at the linearized logits at ``theta_{t-1}``
(:func:`~cft_jax.curvature.kfac_factors_linearized`);
``"features"``: paper eqs. 6-7 ``g_lin(x; psi) W + b``
(:func:`~cft_jax.curvature.kfac_factors_linearized_features` at the current ``psi, W``).
These hooks use ``ctx.apply`` (the non-linearized eval-mode model with the frozen leaves merged),
``ctx.params0``, ``ctx.linearize`` and ``ctx.loss_scope``, which :func:`cft_jax.train.run` sets on
its :class:`~cft_jax.methods.base.TaskContext`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from cft_jax import curvature
from cft_jax import objectives
from cft_jax.curvature import LayerFactors
from cft_jax.methods.base import Method, TaskContext
from cft_jax.methods.replay import buffer_sample, init_buffer, reservoir_insert
from cft_jax.peft import HEAD, copy_tree, is_head  # copy_tree: re-exported (lwf)

PyTree = Any
Path = Tuple[str, ...]
WEIGHTINGS = ("dlcft", "plain")
ACCUMULATE = ("mean", "sum")
CURVATURES = ("kfac", "tkfac")


def _jit_cache(ctx, *key) -> Optional[dict]:
  """The run's store of compiled curvature functions for this call site (``ctx.jit_cache``,
  one dict per ``key``), or None when the context has none (every call compiles)."""
  store = ctx.jit_cache if ctx is not None else None
  if store is None:
    return None
  return store.setdefault(key, {})


def _ctx(ctx: Optional[TaskContext], who: str) -> TaskContext:
  """``ctx`` itself, or a clear error when a hook that needs the run's context got none."""
  if ctx is None:
    raise ValueError(f"{who} needs a TaskContext (set by cft_jax.train.run); got None")
  return ctx


def _require(val, attr: str, who: str):
  """``val`` (the context's field ``attr``), or a clear error when it is None."""
  if val is None:
    raise ValueError(f"{who} needs TaskContext.{attr} (set by cft_jax.train.run); got None")
  return val


def _flat(tree) -> Dict[Path, Any]:
  return traverse_util.flatten_dict(tree) if tree else {}


def _select(tree: PyTree, like: PyTree) -> PyTree:
  """The leaves of ``tree`` at the paths of ``like`` (a nested-dict subset)."""
  flat = _flat(tree)
  return traverse_util.unflatten_dict({k: flat[k] for k in _flat(like)})


# -- K-FAC factors in method_state: nested like params, leaf dicts {kfac_A, kfac_G, kfac_trace}.


def nest_factors(factors: Dict[Path, LayerFactors]) -> Dict[str, Any]:
  """``{path: LayerFactors}`` -> a nested dict mirroring the param tree (checkpoint friendly)."""
  flat = {}
  for path, f in factors.items():
    flat[tuple(path) + ("kfac_A",)] = f.A
    flat[tuple(path) + ("kfac_G",)] = f.G
    flat[tuple(path) + ("kfac_trace",)] = f.fisher_trace
  return traverse_util.unflatten_dict(flat)


def unnest_factors(nested: Dict[str, Any]) -> Dict[Path, LayerFactors]:
  """Inverse of :func:`nest_factors`."""
  out = {}

  def walk(node, path):
    if "kfac_A" in node:
      out[path] = LayerFactors(node["kfac_A"], node["kfac_G"], node["kfac_trace"])
      return
    for key, child in node.items():
      walk(child, path + (key,))

  walk(nested, ())
  return out


# ------------------------------------------------------------------------------------------
# Shared machinery.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuadraticRegularizer(Method):
  """Base of EWC / MAS / OSLA / DLCFT: task counter, weighting, curvature data (see module doc).

  Attributes:
    strength: ``lambda`` multiplying ``L_reg``.
    weighting: ``"dlcft"`` (``(1/t) L_data + ((t-1)/t) lambda L_reg``) or ``"plain"``
      (``L_data + lambda L_reg``).
    accumulate: ``"mean"`` (running mean of the per-task curvatures) or ``"sum"``.
    exclude_head: leave the top-level ``head`` unregularised (task-IL).
    fisher_type: ``"mc"`` (labels sampled from the model: the true Fisher), ``"empirical"``
      or ``"exact"`` (:func:`cft_jax.curvature.output_cotangents`).
    num_samples: MC label samples per example.
    curvature_batches: training batches used for the curvature (0: the whole task).
    mse_alpha: target scale of the MSE loss (paper: 15).
    microbatch: examples per ``lax.map`` step of the per-example diagonal Fisher (0: vmap all).
    seed: PRNG seed of the MC label sampling, folded into the run's key for the task
      (``TaskContext.rng``, from ``config.seed``): every run seed draws its own labels.
  """

  name: str = "quadratic"
  strength: float = 1.0
  weighting: str = "dlcft"
  accumulate: str = "mean"
  exclude_head: bool = False
  fisher_type: str = "mc"
  num_samples: int = 1
  curvature_batches: int = 0
  mse_alpha: float = 15.0
  microbatch: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"method.weighting must be one of {WEIGHTINGS}, got '{self.weighting}'")
    if self.accumulate not in ACCUMULATE:
      raise ValueError(f"method.accumulate must be one of {ACCUMULATE}, got '{self.accumulate}'")
    if self.fisher_type not in curvature.FISHER_TYPES:
      raise ValueError(f"method.fisher_type must be one of {curvature.FISHER_TYPES}")

  # -- weighting ---------------------------------------------------------------------------

  def data_weight(self, method_state):
    """``1/t`` (dlcft weighting) or 1 (plain)."""
    if self.weighting == "plain":
      return 1.0
    return 1.0 / jnp.maximum(method_state["t"], 1.0)

  def reg_weight(self, method_state):
    """``(t-1)/t`` (dlcft weighting) or 1 (plain), times ``strength``."""
    if self.weighting == "plain":
      return self.strength
    t = jnp.maximum(method_state["t"], 1.0)
    return self.strength * (t - 1.0) / t

  def penalty(self, params, method_state):
    """``reg_weight * L_reg`` (see :meth:`quadratic`)."""
    return self.reg_weight(method_state) * self.quadratic(params, method_state)

  def quadratic(self, params, method_state):
    """``L_reg = 1/2 (theta - theta*)^T H (theta - theta*)`` (no weight)."""
    raise NotImplementedError

  def begin_task(self, task_id, params, method_state, ctx=None):
    """Sets ``t = task_id + 1``."""
    return {**method_state, "t": jnp.asarray(task_id + 1, jnp.float32)}

  def _combine(self, old, new, t: int):
    if self.accumulate == "sum":
      return jax.tree_util.tree_map(jnp.add, old, new)
    return curvature.average_factors(old, new, t)

  # -- curvature data ----------------------------------------------------------------------

  def _outputs(self, ctx: TaskContext) -> Tuple[int, int]:
    """Logit columns ``[lo, hi)`` of the loss the curvature is taken of."""
    lo, hi = ctx.task_range
    if ctx.loss_scope == "all":
      return 0, hi
    return lo, hi

  @staticmethod
  def _loss(ctx: TaskContext) -> str:
    return "mse" if ctx.loss_name == "mse" else "ce"

  def _batches_fn(self, ctx: TaskContext, lo: int) -> Callable[[], Iterator]:
    """``() -> iterator of (x preprocessed, y - lo, mask)`` over the task's training data."""
    _require(_ctx(ctx, self.name).batches, "batches", self.name)

    def gen():
      for i, (xb, yb, mb) in enumerate(ctx.batches()):
        if self.curvature_batches and i >= self.curvature_batches:
          break
        yield (ctx.preprocess(jnp.asarray(xb), train=False), jnp.asarray(yb) - lo,
               jnp.asarray(mb, jnp.float32))

    return gen

  @staticmethod
  def _dummy_batches_fn(ctx: TaskContext) -> Callable[[], Iterator]:
    """One all-zero example (to learn the state's structure in ``init_state``)."""
    shape = tuple(_require(_ctx(ctx, "init_state").image_shape, "image_shape", "init_state"))

    def gen():
      x = ctx.preprocess(jnp.zeros((1,) + shape, jnp.uint8), train=False)
      yield x, jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.float32)

    return gen

  def _rng(self, task_id: int, ctx=None):
    """The MC-label key of task ``task_id``: ``ctx.rng`` (the run's, from ``config.seed``) folded
    with :attr:`seed`; without one (a bare context), ``seed`` folded with the task id."""
    if ctx is not None and getattr(ctx, "rng", None) is not None:
      return jax.random.fold_in(ctx.rng, self.seed)
    return jax.random.fold_in(jax.random.PRNGKey(self.seed), task_id)

  def _head_filter(self, tree: PyTree) -> PyTree:
    if self.exclude_head and isinstance(tree, dict):
      return {k: v for k, v in tree.items() if k != HEAD}
    return tree


# ------------------------------------------------------------------------------------------
# EWC and MAS (diagonal).
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EWC(QuadraticRegularizer):
  """Elastic Weight Consolidation: ``L_reg = 1/2 sum_i F_i (theta_i - theta*_i)^2``.

  ``F`` is the diagonal Fisher of the model on each finished task (``fisher_type`` mc: labels
  sampled from the model; empirical: the true labels), accumulated over tasks (mean with the
  default dlcft weighting ``(1/t) L_data + ((t-1)/t) lambda L_reg``, or sum with
  ``weighting="plain"``, ``accumulate="sum"``: ``L_data + lambda/2 sum F (theta - theta*)^2``,
  Kirkpatrick et al. 2017 / online EWC). ``theta*`` is the solution of the last task.
  """

  name: str = "ewc"

  def init_state(self, params, ctx=None):
    """``{t, anchor: theta, importance: zeros like theta (head dropped if exclude_head)}``."""
    imp = self._head_filter(jax.tree_util.tree_map(
        lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params))
    return {"t": jnp.zeros((), jnp.float32), "anchor": copy_tree(params), "importance": imp}

  def quadratic(self, params, method_state):
    imp = method_state["importance"]
    return curvature.ewc_penalty(_select(params, imp), _select(method_state["anchor"], imp), imp)

  def _importance(self, task_id, params, ctx, lo, hi):
    fwd = _require(_ctx(ctx, self.name).forward, "forward", self.name)
    return curvature.diagonal_fisher(
        lambda p, x: fwd(p, x)[:, lo:hi], params, self._batches_fn(ctx, lo)(),
        loss=self._loss(ctx), fisher_type=self.fisher_type, rng=self._rng(task_id, ctx),
        num_samples=self.num_samples, mse_alpha=self.mse_alpha,
        microbatch=self.microbatch or None, jit_cache=_jit_cache(ctx, self.name, lo, hi))

  def end_task(self, task_id, params, method_state, ctx=None):
    """Estimates the task's importance at ``theta_t``, accumulates it and moves the anchor."""
    lo, hi = self._outputs(ctx)
    new = self._head_filter(self._importance(task_id, params, ctx, lo, hi))
    new = _select(new, method_state["importance"])
    imp = self._combine(method_state["importance"], new, task_id + 1)
    return {**method_state, "importance": imp, "anchor": copy_tree(params)}


@dataclasses.dataclass(frozen=True)
class MAS(EWC):
  """Memory Aware Synapses: EWC's penalty with ``Omega = E_x |d ||f(x)||^2 / d theta|``.

  Label-free importance of the logits the loss uses (Aljundi et al. 2018). Weighting as EWC
  (default dlcft: ``(1/t) L_data + ((t-1)/t) lambda L_reg``).
  """

  name: str = "mas"

  def _importance(self, task_id, params, ctx, lo, hi):
    fwd = _require(_ctx(ctx, self.name).forward, "forward", self.name)
    return curvature.mas_importance(lambda p, x: fwd(p, x)[:, lo:hi], params,
                                    self._batches_fn(ctx, lo)(),
                                    microbatch=self.microbatch or None,
                                    jit_cache=_jit_cache(ctx, self.name, lo, hi))


# ------------------------------------------------------------------------------------------
# Kronecker-factored: OSLA and DLCFT.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KroneckerRegularizer(QuadraticRegularizer):
  """OSLA (Ritter et al. 2018): K-FAC Laplace penalty ``sum_l 1/2 tr(V_l^T G_l V_l A_l)``.

  The factors of each finished task are computed at ``theta_t`` of the (non-linear) network with
  the run's loss (CE -> MC categorical Fisher) and accumulated across tasks (mean by default,
  each factor separately). Weighting: default dlcft ``(1/t) L_data + ((t-1)/t) lambda L_reg``
  (``weighting="plain"``: ``L_data + lambda L_reg``). Leaves of non-K-FAC modules get the
  diagonal Fisher (``diag_fallback``).

  ``accumulate="sum"``: the K-FAC approximation of ``sum_i F_i`` over the ``n = t - 1`` finished
  tasks is ``n (mean A) (x) (mean G)`` (Martens & Grosse 2015 factor the expectation, and a sum
  of ``n`` Fishers is ``n`` times their mean): the factors are stored as running means (as with
  ``"mean"``) and the Kronecker penalty is multiplied by ``n``. Summing ``A`` and ``G``
  separately would give ``(sum A) (x) (sum G) ~ n^2 A (x) G``. The diagonal fallback sums.

  Attributes:
    curvature: ``"kfac"`` or ``"tkfac"`` (trace-corrected, Gao et al. 2020).
    diag_fallback: diagonal Fisher for trainable leaves outside K-FAC layers.
    extend_head: class-IL head extension (paper eq. 13; MSE with ``loss.scope=all`` only):
      after task ``t`` the head block of the not-yet-seen units is ``A (x) I`` and their anchor 0.
  """

  name: str = "osla"
  curvature: str = "kfac"
  diag_fallback: bool = True
  extend_head: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.curvature not in CURVATURES:
      raise ValueError(f"method.curvature must be one of {CURVATURES}, got '{self.curvature}'")

  # -- curvature ---------------------------------------------------------------------------

  def _kfac(self, params, ctx, lo, hi, batches_fn, rng) -> Dict[Path, LayerFactors]:
    """Factors of the loss over logits ``[lo, hi)``; the head's ``G`` is embedded in ``[C, C]``."""
    apply = _require(_ctx(ctx, self.name).apply, "apply", self.name)
    mode = ctx.linearize
    kw = dict(loss=self._loss(ctx), fisher_type=self.fisher_type, rng=rng,
              num_samples=self.num_samples, mse_alpha=self.mse_alpha,
              jit_cache=_jit_cache(ctx, self.name, "kfac", mode, lo, hi))
    c = ctx.num_classes
    # only layers whose weights train (a frozen backbone's layers need no curvature)
    trainable = {k[:-1] for k in _flat(params) if k[-1] == "kernel"}
    kw["layer_filter"] = lambda m: (curvature.default_layer_filter(m)
                                    and tuple(m.path) in trainable)
    if mode == "features":
      head = params[HEAD]
      sub = {k: v[..., lo:hi] for k, v in head.items()}
      f = curvature.kfac_factors_linearized_features(
          lambda p, x: apply(p, x, return_features=True),
          _require(ctx.params0, "params0", self.name), {**params, HEAD: sub}, batches_fn(), **kw)
      hf = f[(HEAD,)]
      g = jnp.zeros((c, c), hf.G.dtype).at[lo:hi, lo:hi].set(hf.G)
      f[(HEAD,)] = LayerFactors(hf.A, g, hf.fisher_trace)
    elif mode == "full":  # J f(theta_0) taps, cotangents at the linearized logits at theta
      f = curvature.kfac_factors_linearized(
          lambda p, x: apply(p, x)[:, lo:hi], _require(ctx.params0, "params0", self.name),
          params, batches_fn(), **kw)
    else:
      f = curvature.kfac_factors(lambda p, x: apply(p, x)[:, lo:hi], params, batches_fn(), **kw)
    if self.exclude_head:
      f.pop((HEAD,), None)
    elif self.extend_head and lo == 0 and hi < c and (HEAD,) in f:
      f[(HEAD,)] = curvature.extend_head_factors(f[(HEAD,)], hi, c)
    return f

  def _uncovered(self, params, factors) -> Dict[Path, Any]:
    covered = set(factors)
    flat = _flat(params)
    out = {k: v for k, v in flat.items() if k[:-1] not in covered}
    if self.exclude_head:
      out = {k: v for k, v in out.items() if not is_head(k)}
    return out

  def _diag(self, params, ctx, lo, hi, batches_fn, rng, uncovered) -> PyTree:
    fwd = _require(_ctx(ctx, self.name).forward, "forward", self.name)
    sub = traverse_util.unflatten_dict(uncovered)
    rest = traverse_util.unflatten_dict({k: v for k, v in _flat(params).items()
                                         if k not in uncovered})

    def merged(s, x, rest):  # rest: an argument, so a cached compilation sees today's values
      flat = _flat(rest)
      flat.update(_flat(s))
      return fwd(traverse_util.unflatten_dict(flat), x)[:, lo:hi]

    return curvature.diagonal_fisher(
        merged, sub, batches_fn(), loss=self._loss(ctx), fisher_type=self.fisher_type,
        rng=rng, num_samples=self.num_samples, mse_alpha=self.mse_alpha,
        microbatch=self.microbatch or None, const=rest,
        jit_cache=_jit_cache(ctx, self.name, "diag", lo, hi, tuple(sorted(uncovered))))

  def _curvature(self, params, ctx, lo, hi, batches_fn, rng):
    f = self._kfac(params, ctx, lo, hi, batches_fn, rng)
    out = {"kfac": nest_factors(f)}
    unc = self._uncovered(params, f)
    if unc and self.diag_fallback:
      out["diag"] = self._diag(params, ctx, lo, hi, batches_fn, jax.random.fold_in(rng, 1), unc)
    return out

  # -- protocol ----------------------------------------------------------------------------

  def init_state(self, params, ctx=None):
    """``{t, anchor, kfac: zero factors, [diag: zero importances]}``.

    The factor shapes are found by running the estimator on one dummy example (so the state's
    structure is fixed from the start: one trace of the train step, checkpoint-compatible).
    """
    _require(_ctx(ctx, self.name).apply, "apply", self.name)
    c = ctx.num_classes
    shapes = self._curvature(params, ctx, 0, c, self._dummy_batches_fn(ctx), self._rng(0))
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), shapes)
    return {"t": jnp.zeros((), jnp.float32), "anchor": copy_tree(params), **zeros}

  def end_task(self, task_id, params, method_state, ctx=None):
    """K-FAC (+ diagonal fallback) of task ``task_id`` at ``theta_t``; accumulate; new anchor."""
    lo, hi = self._outputs(ctx)
    new = self._curvature(params, ctx, lo, hi, self._batches_fn(ctx, lo), self._rng(task_id, ctx))
    t = task_id + 1
    # factors: always the running mean (accumulate="sum" multiplies the penalty by t-1 instead)
    out = {**method_state, "kfac": curvature.average_factors(method_state["kfac"], new["kfac"], t)}
    if "diag" in method_state:
      out["diag"] = self._combine(method_state["diag"], new["diag"], t)
    anchor = copy_tree(params)
    if (self.extend_head and not self.exclude_head and lo == 0 and hi < ctx.num_classes
        and HEAD in anchor):
      anchor[HEAD] = curvature.extend_head_anchor(anchor[HEAD], hi, ctx.num_classes)
    out["anchor"] = anchor
    return out

  def num_accumulated(self, method_state) -> jax.Array:
    """Finished tasks whose curvature the state holds while task ``t`` trains: ``t - 1``."""
    return jnp.maximum(method_state["t"] - 1.0, 0.0)

  def quadratic(self, params, method_state):
    total = curvature.kfac_penalty(params, method_state["anchor"],
                                   unnest_factors(method_state["kfac"]),
                                   trace_correction=self.curvature == "tkfac")
    if self.accumulate == "sum":  # n (mean A) (x) (mean G), see the class docstring
      total = self.num_accumulated(method_state) * total
    if "diag" in method_state:
      d = method_state["diag"]
      total = total + curvature.ewc_penalty(_select(params, d),
                                            _select(method_state["anchor"], d), d)
    return total


@dataclasses.dataclass(frozen=True)
class DLCFT(KroneckerRegularizer):
  """Deep Linear Continual Fine-Tuning (Shon et al., ECCV 2022, eqs. 5-14; methods.md#dlcft).

  The run must be linearized (``model.linearize="full"``: the whole network around
  ``theta_0``; ``"features"``: eqs. 6-7 ``g_lin(x; psi) W + b``) and trained with the MSE loss
  ``1/2 ||alpha e_y - f(x)||^2`` (``loss.name=mse``, eq. 5) over all outputs (``loss.scope=all``).
  With ``"full"`` each old task's loss is then exactly quadratic in ``theta`` (eq. 8) and ``H`` is
  its Fisher = Gauss-Newton = Hessian. With ``"features"`` the model is bilinear in
  ``(W, psi)`` (``W . J (psi - psi_0)``): the old-task loss is quadratic in ``psi`` for a fixed
  head and in ``(W, b)`` for a fixed ``psi``, but not jointly, and the K-FAC blocks below drop the
  ``W``/``psi`` cross-curvature, so the penalty is a Gauss-Newton approximation there
  (docs/deviations.md). ``H`` is approximated per layer by K-FAC or TK-FAC (``curvature``), factors
  averaged over tasks with weights ``(t-1) : 1`` (eq. 3). Objective (eq. 11, ``weighting="dlcft"``)::

    L = (1/t) L_data + ((t-1)/t) L_reg,
    L_reg = lambda/2 (theta - theta_{t-1})^T H (theta - theta_{t-1}) + (1 - lambda) E_M[l]  (14)

  with ``lambda = 1`` and no buffer unless ``buffer_size > 0`` (class-IL: reservoir buffer of 500,
  ``lambda = replay_lambda = 1/2``; the replay loss ``l`` is the same MSE over all outputs).
  Class-IL: the units of classes not seen yet get the curvature ``E[z z^T] (x) I`` and anchor 0
  (eq. 13, ``extend_head``). Task-IL: ``exclude_head=True`` (per-task heads unregularised).
  ``strength`` multiplies the quadratic term (1 in the paper).

  Attributes:
    buffer_size: replay buffer size (0: none).
    replay_lambda: ``lambda`` of eq. 14 when a buffer is used.
    replay_batch_size: buffer examples per step.
    require_linear: raise unless the run is linearized with ``loss.name=mse``, ``loss.scope=all``
      (False: allow ablations such as the non-linear CE rows of the paper's Table 3).
  """

  name: str = "dlcft"
  curvature: str = "tkfac"
  extend_head: bool = True
  buffer_size: int = 0
  replay_lambda: float = 0.5
  replay_batch_size: int = 32
  require_linear: bool = True

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.replay_lambda <= 1.0:
      raise ValueError(f"method.replay_lambda must be in [0, 1], got {self.replay_lambda}")

  def _lam(self) -> float:
    return self.replay_lambda if self.buffer_size > 0 else 1.0

  def init_state(self, params, ctx=None):
    """Checks the run (see ``require_linear``); factors as OSLA; the buffer if ``buffer_size``.

    Raises:
      ValueError: the run is not linearized / not MSE / not ``loss.scope=all``.
    """
    if self.require_linear:
      problems, run = [], ctx or TaskContext()
      if not run.linearize:
        problems.append("model.linearize='full' or 'features' (valid values: "
                        "none | full | features)")
      if run.loss_name != "mse":
        problems.append("loss.name='mse'")
      if run.loss_scope != "all":
        problems.append("loss.scope='all'")
      if problems:
        raise ValueError("method.name='dlcft' needs " + ", ".join(problems) +
                         " (paper eqs. 5-8); set method.require_linear=False for ablations")
    state = super().init_state(params, ctx)
    if self.buffer_size > 0:
      state["buffer"] = init_buffer(self.buffer_size, ctx.image_shape, ctx.num_classes)
    return state

  def penalty(self, params, method_state):
    """``((t-1)/t) * strength * lambda * 1/2 (theta - theta*)^T H (theta - theta*)``."""
    return self._lam() * super().penalty(params, method_state)

  def extra_loss(self, params, method_state, batch, logits, logits_fn, rng):
    """``((t-1)/t) (1 - lambda) E_M[1/2 ||alpha e_y - f(x)||^2]`` (eq. 14; 0 without a buffer)."""
    if self.buffer_size <= 0:
      return 0.0
    imgs, labels, _, valid = buffer_sample(method_state["buffer"], rng, self.replay_batch_size)
    z = logits_fn(params, imgs, jax.random.fold_in(rng, 1))
    t = jnp.maximum(method_state["t"], 1.0)
    w = 1.0 if self.weighting == "plain" else (t - 1.0) / t
    return w * (1.0 - self._lam()) * valid * jnp.mean(objectives.mse(z, labels, self.mse_alpha))

  def after_step(self, params, method_state, batch=None, rng=None):
    """Reservoir insertion into the buffer (when ``buffer_size > 0``)."""
    if self.buffer_size <= 0 or batch is None:
      return method_state
    buf = reservoir_insert(method_state["buffer"], batch["images"], batch["labels"],
                           batch["logits"], batch["mask"], rng)
    return {**method_state, "buffer": buf}
