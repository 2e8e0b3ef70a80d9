"""Pure, jit-compiled (or pmapped) training and evaluation steps, optimisers and projections.

The train step is a pure function of ``(state, frozen, batch, task_lo, step, total_steps, rng)``;
``task_lo``, ``step`` and ``total_steps`` are traced scalars, so it compiles once per run (every
task has the same number of classes ``k``; the local loss slices ``logits[:, task_lo:task_lo + k]``
with ``lax.dynamic_slice_in_dim``; with an unequal first task, B50-Inc10, the slice is as wide as
the widest task and the columns past the task's end are masked, :func:`task_slice`).

Data parallelism (see :mod:`cft_jax.parallel`), two interchangeable layouts:

- ``sharding`` (``shardings=(replicated, batch)``): the single-device step under ``jax.jit`` with
  the batch sharded ``P("data")`` over a 1-D mesh and state replicated ``P()``; XLA inserts the
  gradient all-reduce. The program is the one-device program, so results do not depend on the
  device count.
- ``pmap`` (``axis_name="batch"``): the step is ``jax.pmap``-ped; each device gets ``B / n``
  examples, losses are normalised by the global number of valid examples (``lax.psum``),
  gradients are summed across devices and state stays replicated.

Device-count invariance: every random draw is the draw of a one-device run on the global batch.
Under ``pmap`` the augmentation parameters and dropout masks are drawn for the global batch and
each device keeps its rows ``[i B/n, (i+1) B/n)`` (no key is ever folded with the device index),
and a loss that samples (``reinforce``) is evaluated on the all-gathered logits. Multi-host runs
use the same code after ``jax.distributed.initialize``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cft_jax import methods as methods_lib
from cft_jax import objectives
from cft_jax import projection
from cft_jax import robust as robust_lib
from cft_jax.data import Preprocess
from cft_jax.linearize import linearize_mode, make_forward  # make_forward: re-exported
from cft_jax.methods.lae import hold_frozen_leaves
from cft_jax.objectives import task_hi, task_slice, task_widths  # re-exported
from cft_jax.peft import HEAD
from cft_jax.schema import Key, fill_defaults

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Trainable state; frozen weights live outside it (they never change).

  Attributes:
    step: global optimisation step (int32 scalar).
    params: the trainable parameter subtree (see :func:`cft_jax.peft.split_params`).
    opt_state: optax state of ``params`` only.
    method_state: the continual method's state (e.g. LAE's offline PEFT copy).
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  method_state: PyTree = flax.struct.field(default_factory=dict)


# The ``optim`` section of the config (read by :func:`make_optimizer`): keys, defaults and
# allowed values (:mod:`cft_jax.schema`; assembled by :mod:`cft_jax.registry`).
OPTIM_KEYS = (
    Key("name", "adam", "optimiser", choices=("adam", "adamw", "sgd")),
    Key("learning_rate", 1e-3, "learning rate", positive=True),
    Key("weight_decay", 0.0, "weight decay (adam / adamw: decoupled, optax.adamw; sgd: added to "
        "the gradient; linearized runs: toward theta_0)",
        non_negative=True),
    Key("grad_clip", 0.0, "global gradient-norm clip (0: off)", non_negative=True),
    Key("reset_per_task", True, "fresh optimiser state at every task (TPGM/FTP radii kept)"),
    Key("momentum", 0.9, "sgd"),
    Key("backbone_lr_scale", 1.0, "learning rate of the non-head leaves = scale x learning_rate",
        non_negative=True),
)


def make_optimizer(optim: ml_collections.ConfigDict, linearized: Any = None,
                   split_head: bool = False) -> optax.GradientTransformation:
  """Adam / AdamW / SGD from ``config.optim`` (``name``, ``learning_rate``, ``weight_decay``,
  ``grad_clip``, ``momentum``, ``backbone_lr_scale``).

  With ``linearized`` (``model.linearize`` ``full``/``features``) weight decay shrinks the
  offset ``theta - theta_0`` of the linearized parameters, not ``theta``
  (:func:`cft_jax.projection.decay_toward_anchor`; the step passes ``decay_anchor``, see
  :func:`make_train_step`).

  ``backbone_lr_scale`` ``s != 1`` multiplies the updates of every leaf outside the top-level
  ``head`` by ``s`` (``optax.masked(optax.scale(s))`` after the optimiser): the backbone then
  learns at ``s * learning_rate`` while a fresh head keeps ``learning_rate``, the usual recipe
  for fully fine-tuning a pretrained network.

  ``split_head``: one optimiser instance for the top-level ``head`` and one for the other leaves
  (``optax.multi_transform`` with labels ``"head"`` / ``"backbone"``), each with its own state and
  Adam step count (the same updates as one optimiser otherwise). Methods that freeze the
  backbone for some epochs (LAE, :attr:`cft_jax.methods.Method.freezes_peft`) need it so that
  the backbone's Adam state, count included, stays untouched while frozen and its bias
  correction restarts when it is unfrozen, as with PyTorch's per-parameter Adam state
  (:func:`cft_jax.methods.lae.hold_frozen_leaves`).

  Raises:
    ValueError: for an unknown optimiser name.
  """
  optim = fill_defaults(OPTIM_KEYS, optim)  # keys a partial section lacks: their defaults
  name = optim.name
  lr = optim.learning_rate
  wd = optim.weight_decay
  if wd and linearized and name in ("adam", "adamw", "sgd"):
    decay = projection.decay_toward_anchor(wd)
    tx = (optax.chain(decay, optax.sgd(lr, momentum=optim.momentum)) if name == "sgd"
          else optax.chain(optax.scale_by_adam(), decay, optax.scale_by_learning_rate(lr)))
  elif name == "adam":
    tx = optax.adam(lr) if not wd else optax.adamw(lr, weight_decay=wd)
  elif name == "adamw":
    tx = optax.adamw(lr, weight_decay=wd)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                     optax.sgd(lr, momentum=optim.momentum))
  else:
    raise ValueError(f"unknown optim.name '{name}'; known: adam, adamw, sgd")
  if split_head:
    def labels(params):
      return {k: jax.tree_util.tree_map(lambda _, lab=(HEAD if k == HEAD else "backbone"):
                                        lab, v) for k, v in params.items()}
    tx = optax.multi_transform({HEAD: tx, "backbone": tx}, labels,
                               mask_compatible_extra_args=True)
  clip = optim.grad_clip
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  scale = optim.backbone_lr_scale
  if scale != 1.0:
    def not_head(params):
      return {k: jax.tree_util.tree_map(lambda _, keep=(k != HEAD): keep, v)
              for k, v in params.items()}
    tx = optax.chain(tx, optax.masked(optax.scale(scale), not_head))
  return tx


def _global_rows_dropout(offset, total: int):
  """A ``flax.linen.intercept_methods`` interceptor: every ``nn.Dropout`` whose input holds rows
  ``[offset, offset + B)`` of a global batch of ``total`` draws its mask for the global batch
  (same key, shape ``[total, ...]``) and keeps those rows, so a pmapped shard is masked exactly
  as the same examples in a one-device run (Srivastava et al. 2014 dropout, inverted scaling)."""

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if not (isinstance(mod, nn.Dropout) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    inputs = args[0]
    deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
    rng = kwargs.get("rng", args[2] if len(args) > 2 else None)
    deterministic = nn.merge_param("deterministic", mod.deterministic, deterministic)
    bdims = {d % inputs.ndim for d in mod.broadcast_dims}
    if mod.rate == 0.0 or deterministic or mod.rate == 1.0 or 0 in bdims or inputs.ndim == 0:
      return next_fun(*args, **kwargs)
    keep_prob = 1.0 - mod.rate
    if rng is None:
      rng = mod.make_rng(mod.rng_collection)
    shape = [1 if d in bdims else n for d, n in enumerate(inputs.shape)]
    b = shape[0]
    mask = jax.random.bernoulli(rng, p=keep_prob, shape=[total] + shape[1:])
    mask = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(mask, offset, b, axis=0), inputs.shape)
    return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))

  return interceptor


class _TraceCounter:
  """Wraps a step function; ``num_traces`` counts how often JAX traced (compiled) it."""

  def __init__(self, fn):
    self.fn = fn
    self.num_traces = 0

  def __call__(self, *args, **kwargs):
    self.num_traces += 1
    return self.fn(*args, **kwargs)


def make_train_step(apply_fn: Callable, preprocess: Preprocess, loss_fn: Callable,
                    tx: optax.GradientTransformation, classes_per_task: int,
                    method: Optional[methods_lib.Method] = None, *, linearized: Any = None,
                    loss_scope: str = "local",
                    robust: Sequence[robust_lib.RobustFT] = (), axis_name: Optional[str] = None,
                    shardings: Optional[Tuple[Any, Any]] = None) -> Callable:
  """Builds the jitted (or, with ``axis_name``, pmapped) train step.

  The returned ``train_step(state, frozen, images, labels, mask, task_lo, step_in_task,
  total_steps, rng, freeze_peft=False, val_batch=None) -> (state, metrics)`` takes
  ``images [B,h,w,c] uint8``, incremental ``labels [B]`` inside ``[task_lo, task_lo + k)``,
  ``mask [B]`` (False: padding), and returns the new state and scalar metrics ``loss``,
  ``data_loss``, ``accuracy`` (on the task's classes, %), ``entropy`` (nats), ``alpha`` (aEPG
  weight of CE). Under pmap, ``state``/``frozen`` are replicated (leading device axis), the batch
  arrays are ``[n, B/n, ...]`` and the scalars/``rng`` are shared; metrics come back per device
  (identical). ``train_step.num_traces`` counts compilations. With ``shardings = (replicated,
  batch)`` (two ``jax.sharding.Sharding``s, :mod:`cft_jax.parallel`) the jitted step takes global
  arrays: state, frozen weights, scalars and ``rng`` replicated, the batch arrays (and
  ``val_batch``) sharded along their first axis; state and metrics come back replicated. Either
  way the random draws are those of a one-device run on the global batch (module docstring).

  The objective is ``method.data_weight * L_data + method.penalty + method.extra_loss`` where
  ``L_data`` is the masked mean of the per-example loss over the task's ``k`` classes
  (``loss_scope='local'``, aEPG "local loss": ``z[:, task_lo:task_lo + k]``, ``y - task_lo``) or
  over all ``C`` outputs (``loss_scope='all'``, e.g. DLCFT's MSE). With ``freeze_peft`` True only
  the ``head`` leaves move (LAE's frozen first epochs).

  Robust fine-tuning (docs/methods.md#robust-ft, :mod:`cft_jax.robust`): the ``robust``
  components' penalties (e.g. L2-SP toward ``frozen['anchor']``) are added to the loss; when one
  ``needs_val_batch`` (TPGM, whose projection ``tx`` already wraps) the step takes ``val_batch =
  (images, labels, mask)`` and passes the validation loss inputs to ``tx.update(...,
  val_batch=...)``.

  Raises:
    ValueError: unknown ``loss_scope``.
  """
  if loss_scope not in ("local", "all"):
    raise ValueError(f"loss.scope must be 'local' or 'all', got '{loss_scope}'")
  k, bounds = task_widths(classes_per_task)  # bounds: unequal tasks (B50-Inc10), else None
  method = method or methods_lib.Method()
  forward = make_forward(apply_fn, linearized)
  lin_mode = linearize_mode(linearized)
  tx_extra = optax.with_extra_args_support(tx)
  # methods that freeze their PEFT leaves for some epochs (LAE) override ``frozen_peft``
  can_freeze = type(method).frozen_peft is not methods_lib.Method.frozen_peft
  robust = tuple(robust)
  needs_val_batch = any(c.needs_val_batch for c in robust)
  psum = functools.partial(_psum, axis_name=axis_name)
  loss_and_metrics = _make_objective(forward, preprocess, loss_fn, method, k, bounds, loss_scope,
                                     robust, axis_name)

  def train_step(state, frozen, images, labels, mask, task_lo, step_in_task, total_steps, rng,
                 freeze_peft=False, val_batch=None):
    # 1. gradient of the objective, summed over devices
    grads, m = jax.grad(loss_and_metrics, has_aux=True)(
        state.params, state.method_state, frozen, images, labels, mask, task_lo, step_in_task,
        total_steps, rng)
    grads = psum(grads)
    # 2. optimizer update (PEFT leaves held while LAE freezes them; TPGM / linearized extras)
    keep = 1.0 - jnp.asarray(freeze_peft, jnp.float32)
    if can_freeze:  # frozen PEFT leaves: no gradient (global-norm clipping) and held moments
      grads = _scale_non_head(grads, keep)
    extra = _optimizer_extra_args(frozen, val_batch if needs_val_batch else None, task_lo,
                                  preprocess, lin_mode)
    updates, opt_state = tx_extra.update(grads, state.opt_state, state.params, **extra)
    if can_freeze:
      opt_state = hold_frozen_leaves(opt_state, state.opt_state, keep == 0.0)
    updates = _scale_non_head(updates, keep)
    params = optax.apply_updates(state.params, updates)
    # 3. the method's state (e.g. a replay buffer) from the global batch
    batch = _global_batch(images, labels, mask, task_lo, m["logits"], axis_name)
    method_state = method.after_step(params, state.method_state, batch=batch,
                                     rng=jax.random.fold_in(rng, 1))
    metrics = _step_metrics(m, params, frozen, axis_name)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         method_state=method_state), metrics

  return _compile_train_step(train_step, axis_name, shardings)


def _psum(x, axis_name: Optional[str]):
  """``lax.psum`` over ``axis_name`` under pmap; the identity otherwise."""
  return jax.lax.psum(x, axis_name) if axis_name else x


def _make_objective(forward: Callable, preprocess: Preprocess, loss_fn: Callable,
                    method: methods_lib.Method, k: int, bounds: Optional[Tuple[int, ...]],
                    loss_scope: str, robust: Tuple[robust_lib.RobustFT, ...],
                    axis_name: Optional[str]) -> Callable:
  """The objective of :func:`make_train_step` as ``loss_and_metrics(params, method_state, frozen,
  images, labels, mask, task_lo, step_in_task, total_steps, rng) -> (loss, aux)``: ``loss`` the
  scalar objective (this device's share under pmap), ``aux`` the unreduced sums the metrics are
  made of (``correct``, ``entropy_sum``, ``denom``), the aEPG ``alpha`` and the ``[B, C]`` logits
  (stop-gradient) for the method's ``after_step``."""
  psum = functools.partial(_psum, axis_name=axis_name)

  def loss_and_metrics(params, method_state, frozen, images, labels, mask, task_lo,
                       step_in_task, total_steps, rng):
    rng_aug, rng_drop, rng_loss, rng_method = jax.random.split(rng, 4)
    n_dev = psum(1.0)
    rows = None
    if axis_name:  # this device holds rows [offset, offset + b) of the global batch
      b = images.shape[0]
      rows = (jax.lax.axis_index(axis_name) * b, b * jax.lax.axis_size(axis_name))
    # (a preprocess without randomness need not know `rows`: it is passed only under pmap)
    x = preprocess(images, rng_aug, train=True, **({} if rows is None else {"rows": rows}))
    if rows is None:
      logits = forward(params, frozen, x, True, rng_drop)
    else:
      with nn.intercept_methods(_global_rows_dropout(*rows)):
        logits = forward(params, frozen, x, True, rng_drop)
    local = task_slice(logits, task_lo, k, bounds)
    # A padding row (mask False) gets the valid index 0 (its weight is 0): a label outside
    # [0, k) would be gathered out of range, and a loss whose gradient multiplies by the gathered
    # value (focal) would turn 0 x NaN into NaN parameters.
    local_labels = jnp.where(mask, labels - task_lo, 0)
    z, y = (local, local_labels) if loss_scope == "local" else (logits, labels)
    per_example, aux = _per_example_loss(loss_fn, z, y, step_in_task, total_steps, rng_loss,
                                         rows, axis_name)
    w = mask.astype(jnp.float32)
    denom = jnp.maximum(psum(w.sum()), 1.0)  # global number of valid examples
    data_loss = jnp.sum(per_example * w) / denom  # this device's share of the global mean
    batch = {"images": images, "labels": labels, "mask": mask, "task_lo": task_lo}

    def logits_fn(p, imgs, r):
      r_aug, r_drop = jax.random.split(r)  # independent augmentation and dropout draws
      if rows is None or imgs is not images:  # a replicated batch (e.g. replay): no slicing
        return forward(p, frozen, preprocess(imgs, r_aug, train=True), True, r_drop)
      with nn.intercept_methods(_global_rows_dropout(*rows)):
        return forward(p, frozen, preprocess(imgs, r_aug, train=True, rows=rows), True, r_drop)

    # Terms that do not depend on this device's shard are divided by the device count, so the
    # psum of the gradients counts them once.
    reg = method.penalty(params, method_state) + method.extra_loss(
        params, method_state, batch, logits, logits_fn, rng_method)
    robust_reg = robust_lib.penalty(robust, params, frozen.get("anchor"))
    if robust_reg is not None:
      reg = reg + robust_reg
    loss = method.data_weight(method_state) * data_loss + reg / n_dev
    correct = jnp.sum((jnp.argmax(local, -1) == local_labels) * w)
    ent = jnp.sum(objectives.entropy(local) * w)
    return loss, dict(loss=loss, data_loss=data_loss, correct=correct, entropy_sum=ent,
                      denom=denom, alpha=aux["alpha"], logits=jax.lax.stop_gradient(logits))

  return loss_and_metrics


def _per_example_loss(loss_fn: Callable, z: jax.Array, y: jax.Array, step_in_task, total_steps,
                      rng: jax.Array, rows: Optional[Tuple[Any, int]], axis_name: Optional[str]
                      ) -> Tuple[jax.Array, Dict[str, Any]]:
  """``loss_fn`` on logits ``z [b, K]`` and labels ``y [b]``: ``([b] per-example loss, aux)``.
  Under pmap (``rows``) a sampling loss (``loss_fn.uses_rng``) draws for the global batch: the
  logits are all-gathered, the loss evaluated on ``[B, K]`` and this device's rows kept."""
  if rows is not None and getattr(loss_fn, "uses_rng", False):
    zg = jax.lax.all_gather(z, axis_name, tiled=True)
    yg = jax.lax.all_gather(y, axis_name, tiled=True)
    per_example, aux = loss_fn(zg, yg, step=step_in_task, total_steps=total_steps, rng=rng)
    return jax.lax.dynamic_slice_in_dim(per_example, rows[0], z.shape[0], axis=0), aux
  return loss_fn(z, y, step=step_in_task, total_steps=total_steps, rng=rng)


def _global_batch(images, labels, mask, task_lo, logits, axis_name: Optional[str]
                  ) -> Dict[str, Any]:
  """The batch handed to ``method.after_step``; under pmap all-gathered (every replica sees the
  global batch, so replicated method state stays identical)."""
  batch = {"images": images, "labels": labels, "mask": mask, "task_lo": task_lo,
           "logits": logits}
  if axis_name:
    batch = {key: (v if key == "task_lo" else jax.lax.all_gather(v, axis_name, tiled=True))
             for key, v in batch.items()}
  return batch


def _step_metrics(m: Dict[str, Any], params, frozen, axis_name: Optional[str]
                  ) -> Dict[str, jax.Array]:
  """The step's scalar metrics from the objective's aux ``m``: global ``loss``, ``data_loss``,
  ``accuracy`` (%), ``entropy`` (nats), ``alpha``, and ``dist_to_init`` (``||theta - theta_0||``
  over non-head leaves) when ``frozen`` holds an ``anchor`` (projection / WiSE-FT runs)."""
  psum = functools.partial(_psum, axis_name=axis_name)
  metrics = dict(loss=psum(m["loss"]), data_loss=psum(m["data_loss"]),
                 accuracy=100.0 * psum(m["correct"]) / m["denom"],
                 entropy=psum(m["entropy_sum"]) / m["denom"], alpha=m["alpha"])
  if "anchor" in frozen:
    metrics["dist_to_init"] = projection.dist_to_init(params, frozen["anchor"])
  return metrics


def _scale_non_head(tree: Dict[str, Any], keep: jax.Array) -> Dict[str, Any]:
  """``tree`` with every non-head top-level entry multiplied by ``keep`` (0: frozen, 1: free)."""
  return {key: (v if key == HEAD else jax.tree_util.tree_map(lambda x: x * keep, v))
          for key, v in tree.items()}


def _optimizer_extra_args(frozen, val_batch, task_lo, preprocess, lin_mode) -> Dict[str, Any]:
  """Extra ``tx.update`` arguments: TPGM's validation batch (``val_batch = (images, labels,
  mask)`` or None) and, for a linearized model, the weight-decay anchor ``psi_0`` (an ordinary
  head of the ``features`` mode decays toward 0)."""
  extra = {}
  if val_batch is not None:
    vx, vy, vm = val_batch
    extra["val_batch"] = {"frozen": frozen, "x": preprocess(vx, train=False),
                          "labels": jnp.where(vm, vy - task_lo, 0),  # padding: index 0
                          "mask": vm.astype(jnp.float32),
                          "task_lo": task_lo}
  if lin_mode:
    a0 = frozen["params0"]
    if lin_mode == "features" and HEAD in a0:
      a0 = {**a0, HEAD: jax.tree_util.tree_map(jnp.zeros_like, a0[HEAD])}
    extra["decay_anchor"] = a0
  return extra


def _compile_train_step(train_step: Callable, axis_name: Optional[str],
                        shardings: Optional[Tuple[Any, Any]]) -> Callable:
  """``train_step`` under ``pmap`` (``axis_name``), sharded ``jit`` (``shardings = (replicated,
  batch)``) or plain ``jit``; the state argument is donated. The returned step carries
  ``num_traces()`` (compilations), ``pmapped``, ``sharded`` and ``lower``."""
  counted = _TraceCounter(train_step)
  if axis_name:
    compiled = jax.pmap(counted, axis_name=axis_name,
                        in_axes=(0, 0, 0, 0, 0, None, None, None, None, None, 0),
                        donate_argnums=(0,))
  elif shardings is not None:
    rep, data = shardings
    compiled = jax.jit(counted, donate_argnums=(0,),
                       in_shardings=(rep, rep, data, data, data, rep, rep, rep, rep, rep, data),
                       out_shardings=(rep, rep))
  else:
    compiled = jax.jit(counted, donate_argnums=(0,))

  def step(state, frozen, images, labels, mask, task_lo, step_in_task, total_steps, rng,
           freeze_peft=False, val_batch=None):
    return compiled(state, frozen, images, labels, mask, task_lo, step_in_task, total_steps, rng,
                    freeze_peft, val_batch)

  step.num_traces = lambda: counted.num_traces
  step.pmapped = bool(axis_name)
  step.sharded = shardings is not None
  step.lower = compiled.lower  # ahead-of-time lowering: memory_analysis(), HLO text, cost
  return step


def make_eval_step(apply_fn: Callable, preprocess: Preprocess, classes_per_task: int,
                   num_classes: int, method: Optional[methods_lib.Method] = None, *,
                   linearized: Any = None, axis_name: Optional[str] = None,
                   shardings: Optional[Tuple[Any, Any]] = None) -> Callable:
  """Builds the jitted (or pmapped, or with ``shardings`` sharded-jit) evaluation step.

  ``eval_step(state, frozen, images, labels, mask, num_seen, task_lo) -> [2] int32`` returns the
  number of correct class-IL predictions (over the ``num_seen`` classes seen so far) and task-IL
  predictions (over the task's ``k`` classes ``[task_lo, task_lo + k)``), counting only ``mask``
  entries (summed over devices under pmap). With several parameter sets
  (``method.eval_params``, e.g. LAE's online and offline modules) the score of class ``c`` is
  ``max_m softmax(z_m)_c`` over the classes in play.
  """
  k, bounds = task_widths(classes_per_task)
  method = method or methods_lib.Method()
  forward = make_forward(apply_fn, linearized)

  def eval_step(state, frozen, images, labels, mask, num_seen, task_lo):
    x = preprocess(images, train=False)
    cls = jnp.arange(num_classes)
    in_task = (cls >= task_lo) & (cls < task_hi(task_lo, k, bounds))
    seen = cls < num_seen
    all_logits = [forward(p, frozen, x) for p in method.eval_params(state.params,
                                                                    state.method_state)]
    class_il, task_il = class_scores(all_logits, seen)[0], class_scores(all_logits, in_task)[0]
    out = jnp.stack([jnp.sum((class_il == labels) & mask), jnp.sum((task_il == labels) & mask)])
    return jax.lax.psum(out, axis_name) if axis_name else out

  if axis_name:
    return jax.pmap(eval_step, axis_name=axis_name, in_axes=(0, 0, 0, 0, 0, None, None))
  if shardings is not None:
    rep, data = shardings
    return jax.jit(eval_step, in_shardings=(rep, rep, data, data, data, rep, rep),
                   out_shardings=rep)
  return jax.jit(eval_step)


def class_scores(all_logits: Sequence[jax.Array], valid: jax.Array
                 ) -> Tuple[jax.Array, jax.Array]:
  """The prediction among the ``valid`` classes and its class scores (what evaluation and
  :mod:`cft_jax.predict` compute).

  One parameter set: ``argmax`` of the logits with the other classes masked, scores
  ``softmax`` over the valid classes. Several (``method.eval_params``, e.g. LAE's online and
  offline modules, docs/methods.md#lae): the score of class ``c`` is ``max_m softmax(z_m)_c``
  over the valid classes, the prediction its argmax.

  Args:
    all_logits: ``M`` arrays ``[B, C]`` (one per parameter set).
    valid: ``[C]`` bool, the classes in play (class-IL: every seen class).

  Returns:
    ``(prediction [B] int32, scores [B, C])`` (scores 0 outside ``valid``).
  """
  if len(all_logits) == 1:
    z = all_logits[0]
    pred = jnp.argmax(jnp.where(valid, z, jnp.finfo(z.dtype).min), -1)
    return pred, jax.nn.softmax(jnp.where(valid, z, -jnp.inf), -1)
  scores = jnp.max(jnp.stack([jax.nn.softmax(jnp.where(valid, z, -jnp.inf), -1)
                              for z in all_logits]), 0)
  return jnp.argmax(scores, -1), scores


def make_predict_step(apply_fn: Callable, preprocess: Preprocess, num_classes: int,
                      method: Optional[methods_lib.Method] = None, *,
                      linearized: Any = None) -> Callable:
  """Builds the jitted class-IL prediction of :class:`cft_jax.predict.Predictor`.

  ``predict_step(params, method_state, frozen, images, num_seen) -> (ids [B] int32,
  probs [B, C] float32)``: ``images`` uint8 ``[B, H, W, C]`` go through the evaluation
  preprocessing; the prediction ranges over the ``num_seen`` classes seen so far, exactly as
  :func:`make_eval_step` scores it (:func:`class_scores`); ``probs`` are the class scores
  normalised to sum to 1 over the seen classes (the softmax for one parameter set).
  """
  method = method or methods_lib.Method()
  forward = make_forward(apply_fn, linearized)

  def predict_step(params, method_state, frozen, images, num_seen):
    x = preprocess(images, train=False)
    all_logits = [forward(p, frozen, x) for p in method.eval_params(params, method_state)]
    ids, scores = class_scores(all_logits, jnp.arange(num_classes) < num_seen)
    return ids.astype(jnp.int32), scores / jnp.sum(scores, -1, keepdims=True)

  return jax.jit(predict_step)


PROJECTIONS = robust_lib.PROJECTIONS  # method.projection names (cft_jax.robust)
