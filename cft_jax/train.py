"""Class-incremental fine-tuning: jitted pure steps, the per-task loop, evaluation, resume.

Reads top to bottom in stages: data -> scenario -> model -> PEFT split -> optimiser -> steps ->
checkpoint/resume -> task loop (train, evaluate every seen task, save) -> metrics.

The train step is a pure function of ``(state, frozen, batch, task_lo, step, total_steps, rng)``;
``task_lo``, ``step`` and ``total_steps`` are traced scalars, so the step compiles once for the
whole run (every task has the same number of classes ``k``; the local loss slices
``logits[:, task_lo:task_lo + k]`` with ``lax.dynamic_slice_in_dim``).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cft_jax import methods as methods_lib
from cft_jax import metrics as metrics_lib
from cft_jax import objectives
from cft_jax import peft
from cft_jax import scenarios
from cft_jax.checkpoint import TaskCheckpointer
from cft_jax.data import Preprocess, batches, load_dataset, num_batches, subsample
from cft_jax.models import build_model

PyTree = Any
LOSS_TRAINER_KEYS = ("name", "schedule_scope")


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


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam / AdamW / SGD from ``config.optim`` (``name``, ``learning_rate``, ``weight_decay``,
  ``grad_clip``, ``momentum``).

  Raises:
    ValueError: for an unknown optimiser name.
  """
  name = optim.get("name", "adam")
  lr = optim.learning_rate
  wd = optim.get("weight_decay", 0.0)
  if name == "adam":
    tx = optax.adam(lr) if not wd else optax.adamw(lr, weight_decay=wd)
  elif name == "adamw":
    tx = optax.adamw(lr, weight_decay=wd)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                     optax.sgd(lr, momentum=optim.get("momentum", 0.9)))
  else:
    raise ValueError(f"unknown optim.name '{name}'; known: adam, adamw, sgd")
  clip = optim.get("grad_clip", 0.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx


def make_forward(apply_fn: Callable, linearized: bool = False) -> Callable:
  """``forward(params, frozen, x, train, rng) -> logits [B, C]`` of the (optionally linearized) model.

  ``frozen`` holds the frozen parameter subtree (``frozen['params']``), the other variable
  collections (``frozen['collections']``, e.g. BatchNorm statistics) and, for a linearized model,
  the expansion point of the trainable leaves (``frozen['params0']``). The linearized model is
  ``f(theta_0, x) + J f(theta_0, x) (theta - theta_0)`` computed with one ``jax.jvp`` in eval mode
  (DLCFT, SPEC §3; :func:`cft_jax.linearize.linearized_apply`).
  """

  def forward(params, frozen, x, train=False, rng=None):
    def f(p):
      variables = dict(frozen["collections"], params=peft.merge_params(p, frozen["params"]))
      if train and not linearized and rng is not None:
        return apply_fn(variables, x, train=True, rngs={"dropout": rng})
      return apply_fn(variables, x, train=False)

    if linearized:
      from cft_jax.linearize import linearized_apply  # pylint: disable=g-import-not-at-top
      return linearized_apply(f, frozen["params0"], params)
    return f(params)

  return forward


def make_train_step(apply_fn: Callable, preprocess: Preprocess, loss_fn: Callable,
                    tx: optax.GradientTransformation, classes_per_task: int,
                    method: Optional[methods_lib.Method] = None, *, linearized: bool = False,
                    loss_scope: str = "local", l2sp_alpha: float = 0.0,
                    needs_val_batch: bool = False) -> Callable:
  """Builds the jitted train step.

  The returned ``train_step(state, frozen, images, labels, mask, task_lo, step_in_task,
  total_steps, rng, freeze_peft=False) -> (state, metrics)`` takes ``images [B,h,w,c] uint8``,
  incremental ``labels [B]`` inside ``[task_lo, task_lo + k)``, ``mask [B]`` (False: padding), and
  returns the new state and scalar metrics ``loss``, ``data_loss``, ``accuracy`` (on the task's
  classes, %), ``entropy`` (nats), ``alpha`` (aEPG weight of CE).

  The objective is ``method.data_weight * L_data + method.penalty + method.extra_loss`` where
  ``L_data`` is the masked mean of the per-example loss over the task's ``k`` classes
  (``loss_scope='local'``, SPEC §1 "Local loss": ``z[:, task_lo:task_lo + k]``, ``y - task_lo``) or
  over all ``C`` outputs (``loss_scope='all'``, e.g. DLCFT's MSE). With ``freeze_peft`` True only
  the ``head`` leaves move (LAE's frozen first epochs). ``task_lo``, ``step_in_task`` and
  ``total_steps`` are traced, so the step compiles once per run.

  Robust fine-tuning (SPEC §4): ``l2sp_alpha > 0`` adds L2-SP
  ``alpha/2 ||theta - theta_0||^2`` toward ``frozen['anchor']`` (head excluded); with
  ``needs_val_batch`` (TPGM) the step takes ``val_batch = (images, labels, mask)`` and passes the
  validation loss inputs to ``tx.update(..., val_batch=...)``.

  Raises:
    ValueError: unknown ``loss_scope``.
  """
  if loss_scope not in ("local", "all"):
    raise ValueError(f"loss.scope must be 'local' or 'all', got '{loss_scope}'")
  k = classes_per_task
  method = method or methods_lib.Method()
  forward = make_forward(apply_fn, linearized)

  def loss_and_metrics(params, method_state, frozen, images, labels, mask, task_lo,
                       step_in_task, total_steps, rng):
    rng_aug, rng_drop, rng_loss, rng_method = jax.random.split(rng, 4)
    x = preprocess(images, rng_aug, train=True)
    logits = forward(params, frozen, x, True, rng_drop)
    local = jax.lax.dynamic_slice_in_dim(logits, task_lo, k, axis=1)
    local_labels = labels - task_lo
    if loss_scope == "local":
      per_example, aux = loss_fn(local, local_labels, step=step_in_task, total_steps=total_steps,
                                 rng=rng_loss)
    else:
      per_example, aux = loss_fn(logits, labels, step=step_in_task, total_steps=total_steps,
                                 rng=rng_loss)
    w = mask.astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0)
    data_loss = jnp.sum(per_example * w) / denom
    batch = {"images": images, "labels": labels, "mask": mask, "task_lo": task_lo}

    def logits_fn(p, imgs, r):
      return forward(p, frozen, preprocess(imgs, r, train=True), True, r)

    loss = (method.data_weight(method_state) * data_loss + method.penalty(params, method_state)
            + method.extra_loss(params, method_state, batch, logits, logits_fn, rng_method))
    if l2sp_alpha:
      from cft_jax import projection  # pylint: disable=g-import-not-at-top
      loss = loss + projection.l2sp_penalty(params, frozen["anchor"], l2sp_alpha,
                                            exclude=projection.is_head)
    acc = 100.0 * jnp.sum((jnp.argmax(local, -1) == local_labels) * w) / denom
    return loss, dict(loss=loss, data_loss=data_loss, accuracy=acc, entropy=aux["entropy"],
                      alpha=aux["alpha"], logits=jax.lax.stop_gradient(logits))

  def train_step(state, frozen, images, labels, mask, task_lo, step_in_task, total_steps, rng,
                 freeze_peft=False, val_batch=None):
    grads, metrics = jax.grad(loss_and_metrics, has_aux=True)(
        state.params, state.method_state, frozen, images, labels, mask, task_lo, step_in_task,
        total_steps, rng)
    if needs_val_batch:
      vx, vy, vm = val_batch
      updates, opt_state = tx.update(
          grads, state.opt_state, state.params,
          val_batch={"frozen": frozen, "x": preprocess(vx, train=False), "labels": vy - task_lo,
                     "mask": vm.astype(jnp.float32), "task_lo": task_lo})
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    keep = 1.0 - jnp.asarray(freeze_peft, jnp.float32)
    updates = {key: (u if key == "head" else jax.tree_util.tree_map(lambda x: x * keep, u))
               for key, u in updates.items()}
    params = optax.apply_updates(state.params, updates)
    batch = {"images": images, "labels": labels, "mask": mask, "task_lo": task_lo,
             "logits": metrics.pop("logits")}
    method_state = method.after_step(params, state.method_state, batch=batch,
                                     rng=jax.random.fold_in(rng, 1))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         method_state=method_state), metrics

  return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(apply_fn: Callable, preprocess: Preprocess, classes_per_task: int,
                   num_classes: int, method: Optional[methods_lib.Method] = None, *,
                   linearized: bool = False) -> Callable:
  """Builds the jitted evaluation step.

  ``eval_step(state, frozen, images, labels, mask, num_seen, task_lo) -> [2] int32`` returns the
  number of correct class-IL predictions (over the ``num_seen`` classes seen so far) and task-IL
  predictions (over the task's ``k`` classes ``[task_lo, task_lo + k)``), counting only ``mask``
  entries. With several parameter sets (``method.eval_params``, e.g. LAE's online and offline
  modules) the score of class ``c`` is ``max_m softmax(z_m)_c`` over the classes in play.
  """
  k = classes_per_task
  method = method or methods_lib.Method()
  forward = make_forward(apply_fn, linearized)

  def eval_step(state, frozen, images, labels, mask, num_seen, task_lo):
    x = preprocess(images, train=False)
    cls = jnp.arange(num_classes)
    in_task = (cls >= task_lo) & (cls < task_lo + k)
    seen = cls < num_seen
    all_logits = [forward(p, frozen, x) for p in method.eval_params(state.params,
                                                                    state.method_state)]

    def predict(valid):
      if len(all_logits) == 1:
        z = all_logits[0]
        return jnp.argmax(jnp.where(valid, z, jnp.finfo(z.dtype).min), -1)
      probs = [jax.nn.softmax(jnp.where(valid, z, -jnp.inf), -1) for z in all_logits]
      return jnp.argmax(jnp.max(jnp.stack(probs), 0), -1)

    class_il, task_il = predict(seen), predict(in_task)
    return jnp.stack([jnp.sum((class_il == labels) & mask), jnp.sum((task_il == labels) & mask)])

  return jax.jit(eval_step)


PROJECTIONS = ("", "none", "tpgm", "ftp", "l2sp")


def make_projected_optimizer(tx: optax.GradientTransformation, method_cfg, anchor: PyTree,
                             apply_fn: Callable, classes_per_task: int,
                             linearized: bool = False) -> Tuple[Any, bool]:
  """Wraps ``tx`` with ``method.projection`` (SPEC §4), anchored at the pretrained ``anchor``.

  - ``tpgm``: ``optax.chain(tx, projection.tpgm(...))`` with the local validation CE as
    ``val_loss_fn`` (needs a validation batch each step: ``data.val_fraction > 0``);
  - ``ftp``: ``projection.ftp(anchor, base=tx, k=method.ftp_k)``;
  - ``l2sp`` / ``""``: ``tx`` unchanged (L2-SP is a loss term).
  The head is excluded from every constraint. Returns ``(tx, needs_val_batch)``.

  Raises:
    ValueError: unknown projection name.
  """
  from cft_jax import projection  # pylint: disable=g-import-not-at-top
  name = method_cfg.get("projection", "") or ""
  if name not in PROJECTIONS:
    raise ValueError(f"unknown method.projection '{name}'; known: tpgm, ftp, l2sp or ''")
  norm = method_cfg.get("projection_norm", "") or ("l2" if name == "tpgm" else "mars")
  if name == "ftp":
    return projection.ftp(anchor, base=tx, k=method_cfg.get("ftp_k", 1.0),
                          radius_lr=method_cfg.get("radius_lr", 1e-2), norm=norm,
                          exclude=projection.is_head), False
  if name == "tpgm":
    forward = make_forward(apply_fn, linearized)
    k = classes_per_task

    def val_loss_fn(params, vb):
      logits = forward(params, vb["frozen"], vb["x"])
      local = jax.lax.dynamic_slice_in_dim(logits, vb["task_lo"], k, axis=1)
      ce = objectives.ce(local, vb["labels"])
      return jnp.sum(ce * vb["mask"]) / jnp.maximum(vb["mask"].sum(), 1.0)

    return optax.chain(tx, projection.tpgm(
        anchor, val_loss_fn, norm=norm, proj_freq=method_cfg.get("proj_freq", 1),
        max_iters=method_cfg.get("max_iters", 1), radius_lr=method_cfg.get("radius_lr", 1e-2),
        exclude=projection.is_head)), True
  return tx, False


def wise_ft_params(params: PyTree, anchor: PyTree, alpha: float) -> PyTree:
  """WiSE-FT ``(1 - alpha) theta_0 + alpha theta`` on the non-head leaves (the head is kept)."""
  from cft_jax import projection  # pylint: disable=g-import-not-at-top
  mixed = projection.wise_ft(params, anchor, alpha)
  if "head" in params:
    mixed = dict(mixed, head=params["head"])
  return mixed


class ConfigMismatchError(ValueError):
  """Resuming a workdir with a configuration that changes what was trained."""


RESUME_KEYS = ("seed", "scenario", "data", "model", "peft", "method", "loss", "optim", "train")
# Keys that may change between a run and its resumption (they do not change what is computed).
RESUME_IGNORED = ("train.progress", "train.verbose", "train.log_every", "train.stop_after_task")


def _check_resume_config(saved: dict, config: ml_collections.ConfigDict) -> None:
  now = json.loads(config.to_json())
  diffs = []
  for section in RESUME_KEYS:
    a, b = saved.get(section), now.get(section)
    if isinstance(a, dict) and isinstance(b, dict):
      for key in sorted(set(a) | set(b)):
        if f"{section}.{key}" in RESUME_IGNORED:
          continue
        if a.get(key) != b.get(key):
          diffs.append(f"{section}.{key}: saved {a.get(key)!r}, now {b.get(key)!r}")
    elif a != b:
      diffs.append(f"{section}: saved {a!r}, now {b!r}")
  if diffs:
    raise ConfigMismatchError(
        "the workdir holds a run with a different configuration:\n  " + "\n  ".join(diffs) +
        "\nUse a new --workdir, or the saved values to resume.")


def _model_kwargs(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Extra backbone arguments from ``config.peft``/``config.model`` (ViT PEFT placement)."""
  if not config.model.name.startswith("vit_"):
    if config.peft.name in ("adapter", "prefix"):
      raise ValueError(f"peft.name='{config.peft.name}' is implemented for the ViT backbones "
                       f"(model.name=vit_*); {config.model.name} supports lora | linear_probe | full")
    return {}
  p = config.peft
  kw = {"peft": p.name if p.name in ("lora", "adapter", "prefix") else "none",
        "peft_blocks": tuple(p.get("blocks", (0, 1, 2, 3, 4))),
        "lora_targets": tuple(p.get("lora_targets", ("k", "v"))),
        "adapter_hidden": p.get("adapter_hidden", 5),
        "adapter_position": p.get("adapter_position", "attn"),
        "prefix_length": p.get("prefix_length", 10),
        "head_init_std": config.model.get("head_init_std", 1e-3)}
  if config.model.get("checkpoint"):
    kw["path"] = config.model.checkpoint
  return kw


def _loss_hparams(loss_cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  return {k: v for k, v in loss_cfg.items() if k not in LOSS_TRAINER_KEYS}


def _progress(iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, leave=True, dynamic_ncols=True)


def evaluate(eval_step, state, frozen, images, labels, indices, batch_size, num_seen,
             task_lo) -> Tuple[float, float]:
  """Class-IL and task-IL accuracy (%) of one task's test examples ``indices``."""
  correct = np.zeros(2, np.int64)
  for xb, yb, mb in batches(images, labels, indices, batch_size):
    correct += np.asarray(eval_step(state, frozen, xb, yb, mb, num_seen, task_lo))
  n = max(len(indices), 1)
  return 100.0 * correct[0] / n, 100.0 * correct[1] / n


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) a class-incremental fine-tuning job and writes ``workdir/metrics.json``.

  Args:
    config: the experiment config (see ``configs/default.py``).
    workdir: output folder: ``config.json``, ``checkpoints/``, ``log.jsonl``, ``metrics.json``.

  Returns:
    The metrics dict written to ``metrics.json``.

  Raises:
    ConfigMismatchError: the workdir holds a run with another configuration.
    ValueError / DatasetNotFoundError: bad config values or missing data, with the fix.
  """
  t_start = time.time()
  verbose = config.train.get("verbose", True)
  show_bar = verbose and config.train.get("progress", True)
  os.makedirs(workdir, exist_ok=True)

  # Data and scenario.
  ds = load_dataset(config.data.name, root=config.data.get("root") or None,
                    image_size=config.data.image_size)
  kind = config.scenario.get("type", "class_il")
  scenario = scenarios.make_scenario(kind, ds.num_classes, config.scenario.num_tasks,
                                     seed=config.scenario.seed,
                                     shuffle_classes=config.scenario.get("shuffle_classes", True))
  k, T, C = scenario.classes_per_task, scenario.num_tasks, len(scenario.class_order)
  train_labels = scenario.relabel(ds.train_labels)
  test_labels = scenario.relabel(ds.test_labels)
  method = methods_lib.get_method(config.method)
  train_limit, test_limit = config.data.get("train_limit"), config.data.get("test_limit")
  train_idx, val_idx, test_idx = [], [], []
  parts = scenario.split(len(train_labels)) if kind == "data_il" else None
  for t in range(T):
    lo, hi = scenario.task_range(t)
    if kind == "data_il":
      tr, te = parts[t], np.arange(len(test_labels))
    else:
      tr = np.flatnonzero((train_labels >= lo) & (train_labels < hi))
      te = np.flatnonzero((test_labels >= lo) & (test_labels < hi))
    tr = subsample(tr, train_limit, seed=config.seed * 1000 + t)
    n_val = int(round(config.data.get("val_fraction", 0.0) * len(tr)))
    if n_val:  # held out from the task's training data (never the test data)
      perm = np.random.default_rng((config.seed, t, 99)).permutation(len(tr))
      val_idx.append(np.sort(tr[perm[:n_val]]))
      tr = np.sort(tr[perm[n_val:]])
    else:
      val_idx.append(np.zeros(0, np.int64))
    train_idx.append(tr)
    test_idx.append(subsample(te, test_limit, seed=config.seed * 1000 + (7 if kind == "data_il"
                                                                         else t + 7)))
    if len(train_idx[-1]) == 0:
      raise ValueError(f"task {t} has no training images")
  if method.cumulative_data:  # joint training: task t sees the data of tasks 0..t
    train_idx = [np.concatenate(train_idx[:t + 1]) for t in range(T)]

  # Model, PEFT split, optimiser, steps.
  rng = jax.random.PRNGKey(config.seed)
  rng, init_rng = jax.random.split(rng)
  peft_name = config.peft.name
  built = build_model(config.model.name, C,
                      lora_rank=config.peft.rank if peft_name == "lora" else 0,
                      lora_alpha=config.peft.get("alpha") or None,
                      pretrained=config.model.get("pretrained", True),
                      image_size=config.data.image_size, rng=init_rng,
                      dropout_rate=config.model.get("dropout_rate", 0.0),
                      **_model_kwargs(config))
  variables = dict(built.variables)
  params0, frozen_params = peft.split_params(variables.pop("params"), peft_name)
  frozen = {"params": frozen_params, "collections": variables}
  linearized = bool(config.model.get("linearize", False))
  if linearized:
    frozen["params0"] = jax.tree_util.tree_map(jnp.array, params0)
  preprocess = Preprocess(image_size=config.data.image_size, mean=built.mean, std=built.std,
                          augment=config.data.get("augment", "none"),
                          rrc_scale=tuple(config.data.get("rrc_scale", (0.05, 1.0))))
  loss_fn = objectives.make_loss_fn(config.loss.name, **_loss_hparams(config.loss))
  tx = make_optimizer(config.optim)
  bs = config.train.batch_size
  wise_alpha = config.eval.get("wise_ft_alpha", 1.0)
  l2sp_alpha = (config.method.get("l2sp_alpha", 0.01)
                if config.method.get("projection", "") == "l2sp" else 0.0)
  if config.method.get("projection", "") or wise_alpha != 1.0:
    frozen["anchor"] = jax.tree_util.tree_map(jnp.array, params0)  # pretrained theta_0
  tx, needs_val = make_projected_optimizer(  # a copy: the state's params are donated
      tx, config.method, jax.tree_util.tree_map(jnp.array, params0), built.module.apply, k,
      linearized)
  if needs_val and not any(len(v) for v in val_idx):
    raise ValueError("method.projection=tpgm learns its radii on held-out training data: set "
                     "data.val_fraction > 0 (e.g. 0.1)")
  train_step = make_train_step(built.module.apply, preprocess, loss_fn, tx, k, method,
                               linearized=linearized,
                               loss_scope=config.loss.get("scope", "local"),
                               l2sp_alpha=l2sp_alpha, needs_val_batch=needs_val)
  eval_step = make_eval_step(built.module.apply, preprocess, k, C, method, linearized=linearized)
  forward = jax.jit(make_forward(built.module.apply, linearized))

  def task_context(t: Optional[int]) -> methods_lib.TaskContext:
    return methods_lib.TaskContext(
        task_id=t, task_range=None if t is None else scenario.task_range(t), num_classes=C,
        classes_per_task=k, image_shape=ds.train_images.shape[1:],
        forward=lambda p, x: forward(p, frozen, x), preprocess=preprocess,
        batches=None if t is None else functools.partial(
            batches, ds.train_images, train_labels, train_idx[t], bs),
        loss_name=config.loss.name)
  steps_per_task = [config.train.epochs * num_batches(len(ix), bs) for ix in train_idx]
  if config.loss.get("schedule_scope", "task") not in ("task", "global"):
    raise ValueError("loss.schedule_scope must be 'task' or 'global', got "
                     f"'{config.loss.schedule_scope}'")
  global_schedule = config.loss.get("schedule_scope", "task") == "global"

  n_train = peft.count_params(params0)
  n_total = n_train + peft.count_params(frozen_params)
  if verbose:
    print(f"[cft_jax] {config.data.name}: {T} tasks x {k} classes, class order "
          f"{list(scenario.class_order)}; train/test images per task "
          f"{[len(i) for i in train_idx]} / {[len(i) for i in test_idx]}")
    print(f"[cft_jax] {config.model.name} + {peft_name}: {n_train:,} trainable of {n_total:,} "
          f"parameters ({100.0 * n_train / n_total:.2f}%); loss {config.loss.name}")

  # Resume.
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params0, opt_state=tx.init(params0),
                     method_state=method.init_state(params0, task_context(None)))
  R = np.full((T, T), np.nan)
  R_task = np.full((T, T), np.nan)
  entropy_end: List[float] = []
  ckpt = TaskCheckpointer(os.path.join(workdir, "checkpoints"))
  start_task = 0
  latest = ckpt.latest()
  config_json = json.loads(config.to_json())
  if latest is not None:
    state_np, meta = ckpt.restore(latest, state)
    _check_resume_config(meta["config"], config)
    if list(meta["class_order"]) != list(scenario.class_order):
      raise ConfigMismatchError("saved class order differs from this run's; use a new --workdir")
    state = jax.tree_util.tree_map(jnp.asarray, state_np)
    R = np.array(meta["accuracy_matrix"], dtype=float)
    R_task = np.array(meta["task_il_accuracy_matrix"], dtype=float)
    entropy_end = list(meta.get("entropy_end_of_task", []))
    start_task = latest
    if verbose:
      print(f"[cft_jax] resuming from {ckpt.directory}: {latest}/{T} tasks done")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)

  log_path = os.path.join(workdir, "log.jsonl")
  if os.path.exists(log_path):  # drop records of a task that was interrupted
    with open(log_path) as f:
      keep = [l for l in f if l.strip() and json.loads(l).get("task", 0) < start_task]
    with open(log_path, "w") as f:
      f.writelines(keep)
  log_every = max(1, config.train.get("log_every", 10))

  stop_after = config.train.get("stop_after_task", 0) or T
  for t in range(start_task, min(T, stop_after)):
    lo, hi = scenario.task_range(t)
    if config.optim.get("reset_per_task", True):
      state = state.replace(opt_state=tx.init(state.params))
    state = state.replace(method_state=method.begin_task(t, state.params, state.method_state,
                                                         task_context(t)))
    task_rng = jax.random.fold_in(rng, t)
    total = steps_per_task[t] if not global_schedule else sum(steps_per_task)
    offset = 0 if not global_schedule else sum(steps_per_task[:t])
    step_in_task = 0
    bar = _progress(range(steps_per_task[t]), steps_per_task[t], f"task {t + 1}/{T}", show_bar)
    bar_iter = iter(bar)
    last = {}
    with open(log_path, "a") as log_f:
      for epoch in range(config.train.epochs):
        val_iter = (_cycle(ds.train_images, train_labels, val_idx[t], bs, (config.seed, t, epoch))
                    if needs_val else None)
        for xb, yb, mb in batches(ds.train_images, train_labels, train_idx[t], bs,
                                  shuffle_seed=(config.seed, t, epoch)):
          step_rng = jax.random.fold_in(task_rng, step_in_task)
          extra = {"val_batch": next(val_iter)} if needs_val else {}
          state, m = train_step(state, frozen, xb, yb, mb, lo, offset + step_in_task, total,
                                step_rng, method.frozen_peft(t, epoch), **extra)
          step_in_task += 1
          next(bar_iter, None)
          if step_in_task % log_every == 0 or step_in_task == steps_per_task[t]:
            last = {key: float(v) for key, v in jax.device_get(m).items()}
            if not np.isfinite(last["loss"]):
              raise FloatingPointError(f"non-finite loss {last['loss']} at task {t}, step "
                                       f"{step_in_task}; the last good checkpoint is kept")
            log_f.write(json.dumps({"task": t, "step": step_in_task, "epoch": epoch,
                                    "global_step": int(state.step), **last}) + "\n")
            if hasattr(bar, "set_postfix"):
              bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.1f}",
                              H=f"{last['entropy']:.3f}", alpha=f"{last['alpha']:.3f}")
    if hasattr(bar, "close"):
      bar.close()
    entropy_end.append(last.get("entropy", float("nan")))
    state = state.replace(method_state=method.end_task(t, state.params, state.method_state,
                                                       task_context(t)))

    eval_state = state
    if wise_alpha != 1.0:
      eval_state = state.replace(params=wise_ft_params(state.params, frozen["anchor"], wise_alpha))
    for i in range(t + 1):
      ilo, _ = scenario.task_range(i)
      num_seen = hi if kind != "data_il" else C
      R[t, i], R_task[t, i] = evaluate(eval_step, eval_state, frozen, ds.test_images,
                                       test_labels, test_idx[i], config.eval.batch_size,
                                       num_seen, ilo)
    if verbose:
      print(metrics_lib.format_matrix(R, t + 1, "class-IL acc (%)"))
      print(f"  after task {t + 1}: class-IL avg {np.mean(R[t, :t + 1]):.2f}%, task-IL avg "
            f"{np.mean(R_task[t, :t + 1]):.2f}%")
    meta = {"accuracy_matrix": _nan_to_none(R), "task_il_accuracy_matrix": _nan_to_none(R_task),
            "class_order": list(scenario.class_order), "config": config_json,
            "entropy_end_of_task": entropy_end, "num_finished_tasks": t + 1}
    ckpt.save(t + 1, state, meta)

  ckpt.close()
  if stop_after < T and start_task < stop_after:
    if verbose:
      print(f"[cft_jax] stopped after task {stop_after}/{T} (train.stop_after_task); run the same "
            f"command without it to continue")
    return {"accuracy_matrix": _nan_to_none(R), "num_finished_tasks": stop_after}
  ood = {}
  if config.eval.get("ood_corruptions") or config.eval.get("ood_dataset"):
    eval_state = state
    if wise_alpha != 1.0:
      eval_state = state.replace(params=wise_ft_params(state.params, frozen["anchor"], wise_alpha))
    all_test = np.concatenate(test_idx[:T]) if kind != "data_il" else test_idx[0]
    ood = evaluate_ood(config, eval_step, eval_state, frozen, ds, test_labels, all_test, scenario,
                       C, verbose)
  result = {
      "accuracy_matrix": _nan_to_none(R),
      "task_il_accuracy_matrix": _nan_to_none(R_task),
      **metrics_lib.summarize(R),
      "task_il": metrics_lib.summarize(R_task),
      "entropy_end_of_task": entropy_end,
      "class_order": list(scenario.class_order),
      "class_names": [ds.class_names[c] for c in scenario.class_order],
      "trainable_params": n_train,
      "total_params": n_total,
      "wall_time_s": time.time() - t_start,
  }
  if ood:
    result["ood"] = ood
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  pngs = []
  if config.train.get("plots", True):
    from cft_jax import plots  # pylint: disable=g-import-not-at-top
    pngs = plots.plot_run(workdir)
  if verbose:
    print(report(result))
    print(f"[cft_jax] wrote {os.path.join(workdir, 'metrics.json')}"
          + (f" and {len(pngs)} plots" if pngs else ""))
  return result


def _cycle(images, labels, indices, batch_size, seed):
  """Endless batches over ``indices`` (reshuffled every pass), for TPGM's validation data."""
  n = 0
  while True:
    yield from batches(images, labels, indices, batch_size, shuffle_seed=(*seed, n))
    n += 1


def evaluate_ood(config, eval_step, state, frozen, ds, test_labels, test_idx, scenario,
                 num_classes, verbose=True) -> Dict[str, Any]:
  """In-distribution and out-of-distribution class-IL accuracy (%) over all tasks' test images.

  Corrupted copies (``eval.ood_corruptions`` x ``eval.ood_severities``, see
  :mod:`cft_jax.data.corruptions`) of the test images, and the test split of
  ``eval.ood_dataset`` (a dataset with the same classes, relabelled with the same class order).

  Returns:
    ``{"id": acc, "corruptions": {name: {severity: acc}}, "corruption_mean": acc,
    "dataset": acc}`` (keys present when computed).
  """
  from cft_jax.data import corruptions  # pylint: disable=g-import-not-at-top
  bs = config.eval.batch_size

  def acc(images, labels, idx):
    return evaluate(eval_step, state, frozen, images, labels, idx, bs, num_classes, 0)[0]

  out = {"id": acc(ds.test_images, test_labels, test_idx)}
  names = list(config.eval.get("ood_corruptions") or ())
  if names:
    sevs = list(config.eval.get("ood_severities") or (1, 2, 3, 4, 5))
    clean = ds.test_images[test_idx]
    labels = test_labels[test_idx]
    table = {}
    for name in names:
      table[name] = {}
      for sev in sevs:
        imgs = corruptions.corrupt(clean, name, int(sev), seed=config.seed)
        table[name][str(sev)] = acc(imgs, labels, np.arange(len(labels)))
    out["corruptions"] = table
    out["corruption_mean"] = float(np.mean([v for d in table.values() for v in d.values()]))
  if config.eval.get("ood_dataset"):
    other = load_dataset(config.eval.ood_dataset, root=config.eval.get("ood_root") or None,
                         image_size=config.data.image_size)
    if other.num_classes != num_classes:
      raise ValueError(f"eval.ood_dataset '{config.eval.ood_dataset}' has {other.num_classes} "
                       f"classes, the training data {num_classes}: it must share the classes")
    olabels = scenario.relabel(other.test_labels)
    out["dataset"] = acc(other.test_images, olabels, np.arange(len(olabels)))
  if verbose:
    line = f"[cft_jax] in-distribution {out['id']:.2f}%"
    if "corruption_mean" in out:
      line += f", corruptions (mean of {len(names)} x severities) {out['corruption_mean']:.2f}%"
    if "dataset" in out:
      line += f", {config.eval.ood_dataset} {out['dataset']:.2f}%"
    print(line)
  return out


def _nan_to_none(R: np.ndarray) -> List[List[Optional[float]]]:
  return [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in R]


def report(result: Dict[str, Any]) -> str:
  """Text table of the final metrics (class-IL and task-IL) and both accuracy matrices."""
  R = np.array(result["accuracy_matrix"], dtype=float)
  R_task = np.array(result["task_il_accuracy_matrix"], dtype=float)
  lines = [metrics_lib.format_matrix(R, title="class-IL acc (%)"),
           metrics_lib.format_matrix(R_task, title="task-IL acc (%)"), "",
           f"{'metric':<28}{'class-IL':>10}{'task-IL':>10}"]
  til = result["task_il"]
  for key in ("final_accuracy", "avg_incremental_accuracy", "forgetting", "bwt"):
    lines.append(f"{key:<28}{result[key]:10.2f}{til[key]:10.2f}")
  return "\n".join(lines)
