"""Class-incremental fine-tuning: jitted pure steps, the per-task loop, evaluation, resume.

:func:`run` is a sequence of named stages: :func:`build_experiment` (data, :class:`Scenario
<cft_jax.scenarios.Scenario>`, model, PEFT split, method, optimiser, steps) ->
:func:`restore_or_init` -> per task :func:`train_task` -> :func:`evaluate_seen` -> checkpoint ->
the final report (OOD evaluation, ``metrics.json``, plots). Files are written through a
:class:`~cft_jax.writers.MetricWriter`; the config is the resolved one
(:func:`cft_jax.config.validate_config`), read by attribute, never with inline defaults.

The train step is a pure function of ``(state, frozen, batch, task_lo, step, total_steps, rng)``;
``task_lo``, ``step`` and ``total_steps`` are traced scalars, so the step compiles once for the
whole run (every task has the same number of classes ``k``; the local loss slices
``logits[:, task_lo:task_lo + k]`` with ``lax.dynamic_slice_in_dim``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cft_jax import config as config_lib
from cft_jax import feature_cache as fc
from cft_jax import methods as methods_lib
from cft_jax import knn as knn_lib
from cft_jax import metrics as metrics_lib
from cft_jax import objectives
from cft_jax import peft
from cft_jax import robust as robust_lib
from cft_jax import scenarios
from cft_jax.checkpoint import TaskCheckpointer
from cft_jax.config import (RUN_IGNORED, RUN_SECTIONS, ConfigError, describe_diffs, mse_alpha,
                            same_run, validate_config)
from cft_jax.data import (Preprocess, batches, corruptions, data_options, load_dataset,
                          num_batches, subsample)
from cft_jax.data.check import check_splits
from cft_jax.data.stream import StreamInput, uses_grain
from cft_jax.linearize import linearize_mode
from cft_jax.models import build_model
from cft_jax.projection import reset_base_state
from cft_jax.provenance import provenance
from cft_jax.parallel import DeviceLayout, init_distributed, layout_from_config  # re-exported
from cft_jax.writers import MetricWriter
from cft_jax.robust import PROJECTIONS, wise_ft_params  # re-exported
from cft_jax.steps import (TrainState, make_eval_step, make_forward,  # re-exported
                           make_optimizer, make_train_step)

PyTree = Any
LOSS_TRAINER_KEYS = config_lib.LOSS_TRAINER_KEYS


class ConfigMismatchError(ValueError):
  """Resuming a workdir with a configuration that changes what was trained."""


RESUME_KEYS = RUN_SECTIONS  # compared on resume (cft_jax.config.same_run)
RESUME_IGNORED = RUN_IGNORED  # may change between a run and its resumption


def _check_resume_config(saved: dict, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigMismatchError when ``config`` is not the saved run (:func:`same_run`)."""
  diffs = same_run(saved, config)
  if diffs:
    raise ConfigMismatchError(
        "the workdir holds a run with a different configuration:\n  "
        + describe_diffs(saved, config, diffs).replace("\n", "\n  ")
        + "\nUse a new --workdir, or the saved values to resume.")


def _model_kwargs(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Extra ViT arguments from ``config.model`` (the PEFT settings travel as one
  :class:`cft_jax.peft.PeftSpec`, see :func:`_model_and_frozen`)."""
  if not config.model.name.startswith("vit_"):
    return {}
  kw = {"head_init_std": config.model.head_init_std, "remat": bool(config.model.remat)}
  if config.model.checkpoint:
    kw["path"] = config.model.checkpoint
  if config.model.pretrained:
    kw["checkpoint_format"] = config.model.checkpoint_format
    kw["pre_logits"] = config.model.pre_logits
  return kw


_loss_hparams = config_lib.loss_hparams


def _progress(iterable, total: int, desc: str, enabled: bool, initial: int = 0):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, initial=initial)


def checkpoint_id(global_step: int, task_finished: bool) -> int:
  """Orbax step of a checkpoint: ``2 * global_step + task_finished`` (monotone in progress; the
  end-of-task checkpoint sorts after a mid-task one taken at the same optimiser step)."""
  return 2 * global_step + int(task_finished)


def _before(record: Dict[str, Any], task: int, step_in_task: int) -> bool:
  """Whether a log record precedes the checkpoint ``(task, step_in_task)``."""
  return (record.get("task", 0) < task
          or (record.get("task", 0) == task and record.get("step", 0) <= step_in_task))


class _GracefulExit:
  """Context manager turning SIGINT/SIGTERM into a flag the loop checks after every step, so the
  run saves a checkpoint before exiting (a second signal exits at once)."""

  def __init__(self):
    self.requested = None
    self._old = {}

  def _handler(self, signum, frame):
    if self.requested is not None:  # second signal: default behaviour
      signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    print(f"[cft_jax] {self.requested} received: saving a checkpoint after this step ...",
          flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


def evaluate(eval_step, state, frozen, images, labels, indices, batch_size, num_seen,
             task_lo) -> Tuple[float, float]:
  """Class-IL and task-IL accuracy (%) of one task's test examples ``indices``."""
  correct = np.zeros(2, np.int64)
  for xb, yb, mb in batches(images, labels, indices, batch_size):
    correct += np.asarray(eval_step(state, frozen, xb, yb, mb, num_seen, task_lo))
  n = max(len(indices), 1)
  return 100.0 * correct[0] / n, 100.0 * correct[1] / n


def _check_cache_features(config: ml_collections.ConfigDict) -> None:
  """``train.cache_features`` is exact only when nothing but the head sees the backbone's output.

  Raises:
    ConfigError: naming the setting that rules the cache out and what to change.
  """
  problems = []
  if config.peft.name != "linear_probe":
    problems.append(f"peft.name='linear_probe' (got '{config.peft.name}': the backbone trains)")
  if config.data.augment != "none":
    problems.append(f"data.augment='none' (got '{config.data.augment}': features change "
                    "every epoch)")
  if linearize_mode(config.model.linearize):
    problems.append("model.linearize='none'")
  if config.model.dropout_rate:
    problems.append("model.dropout_rate=0 (dropout acts on the features before the head)")
  if config.method.name not in ("sequential", "joint"):
    problems.append(f"method.name in ('sequential', 'joint') (got '{config.method.name}': it "
                    "needs images or the backbone)")
  if config.method.projection not in ("", "none"):
    problems.append("method.projection=''")
  if problems:
    raise ConfigError("train.cache_features=True needs " + "; ".join(problems)
                      + ". Change those settings or set train.cache_features=False.")


@dataclasses.dataclass
class Experiment:
  """What :func:`build_experiment` makes from a resolved config, before any training: data and
  scenario, model and frozen weights, method, optimiser, jitted steps, device layout.

  Attributes:
    config: the resolved config (:func:`cft_jax.config.validate_config`).
    ds: the dataset (uint8 images, original labels, class names).
    scenario: task splits, per-task test sets, ``num_seen`` (:class:`cft_jax.scenarios.Scenario`).
    method: the continual method (:mod:`cft_jax.methods`).
    module: the flax model (``module.apply(variables, x, train=...)``).
    preprocess: uint8 -> normalised float images (augmentation in training).
    params0: trainable leaves at initialisation (``theta_0`` of the trainable part).
    frozen: host copy of the non-trained inputs of the steps: ``{"params", "collections"}``, plus
      ``"params0"`` (linearized runs) and ``"anchor"`` (``theta_0``; runs with robust
      fine-tuning components).
    frozen_dev: ``frozen`` placed on the devices.
    tx: the optimiser (wrapped by the method and the robust components, e.g. TPGM / FTP).
    train_step, eval_step: jitted steps (``eval_step`` on images, used for OOD sets);
      ``id_eval_step`` evaluates the in-distribution test data (cached features when
      ``train.cache_features``).
    train_data, test_data: ``(x, y, row_of_image)``: what the loops index (images, or cached
      features with the map from an image index to its row).
    dev: the device layout.
    forward: jitted ``forward(params, frozen, x) -> logits`` (eval mode).
    linearized: ``None``, ``"full"`` or ``"features"``.
    needs_val: the optimiser takes a validation batch each step (a robust component's
      ``needs_val_batch``, TPGM).
    rng: the run's PRNG key (task ``t`` uses ``fold_in(rng, t)``).
    n_train, n_total: trainable / all parameter counts.
    feature_fn: jitted feature extractor of the k-NN probe (None when ``eval.knn_k == 0``).
    jit_cache: compiled functions the method hooks reuse across tasks.
    robust: the robust fine-tuning components (:mod:`cft_jax.robust`: TPGM, FTP, L2-SP, WiSE-FT);
      their hooks wrap the optimiser, add a penalty and choose the evaluated params.
  """

  config: ml_collections.ConfigDict
  ds: Any
  scenario: scenarios.Scenario
  method: methods_lib.Method
  module: Any
  preprocess: Preprocess
  params0: PyTree
  frozen: Dict[str, Any]
  frozen_dev: Any
  tx: Any
  train_step: Any
  eval_step: Any
  id_eval_step: Any
  train_data: Tuple[Any, np.ndarray, np.ndarray]
  test_data: Tuple[Any, np.ndarray, np.ndarray]
  dev: Any  # a cft_jax.parallel layout (single / sharding / pmap)
  forward: Any
  linearized: Optional[str]
  needs_val: bool
  rng: jax.Array
  n_train: int
  n_total: int
  feature_fn: Any = None
  stream: Optional[StreamInput] = None  # data.pipeline grain: streamed batches (host augments)
  jit_cache: Dict[Any, Any] = dataclasses.field(default_factory=dict)
  robust: Tuple[robust_lib.RobustFT, ...] = ()
  skipped_corrupt: Optional[Dict[str, int]] = None  # per split (streamed data: _check_files)

  @property
  def steps_per_task(self) -> List[int]:
    bs = self.config.train.batch_size
    return [self.config.train.epochs * num_batches(len(ix), bs) for ix in self.scenario.train_idx]

  @property
  def config_json(self) -> Dict[str, Any]:
    return json.loads(self.config.to_json())

  @property
  def global_schedule(self) -> bool:
    return self.config.loss.schedule_scope == "global"

  def apply_eval(self, p, x, **kw):
    """The NON-linearized model in eval mode (K-FAC layer taps, features)."""
    variables = dict(self.frozen["collections"],
                     params=peft.merge_params(p, self.frozen["params"]))
    return self.module.apply(variables, x, train=False, **kw)

  def task_context(self, t: Optional[int]) -> methods_lib.TaskContext:
    """What the method's host hooks see for task ``t`` (None: ``init_state``)."""
    sc, frozen = self.scenario, self.frozen
    return methods_lib.TaskContext(
        task_id=t, task_range=None if t is None else sc.task_range(t),
        num_classes=sc.num_classes, classes_per_task=sc.classes_per_task,
        image_shape=self.ds.train_images.shape[1:],
        forward=lambda p, x: self.forward(p, frozen, x), preprocess=self.preprocess,
        batches=None if t is None else functools.partial(
            batches, self.ds.train_images, sc.train_labels, sc.train_idx[t],
            self.config.train.batch_size),
        loss_name=self.config.loss.name, apply=self.apply_eval, params0=frozen.get("params0"),
        linearize=self.linearized, loss_scope=self.config.loss.scope, jit_cache=self.jit_cache,
        # the run's key (config.seed) for host-hook sampling, apart from the training steps'
        rng=None if t is None else jax.random.fold_in(jax.random.split(self.rng)[1], t))

  def eval_state(self, host_state: TrainState) -> TrainState:
    """The state evaluated: its params passed through every robust component's
    :meth:`~cft_jax.robust.RobustFT.eval_params` (e.g. WiSE-FT's ``(1 - a) theta_0 + a theta``);
    ``host_state`` itself when no component changes them."""
    if not any(type(c).eval_params is not robust_lib.RobustFT.eval_params for c in self.robust):
      return host_state
    return host_state.replace(params=robust_lib.eval_params(self.robust, host_state.params,
                                                            self.frozen["anchor"]))


@dataclasses.dataclass
class Progress:
  """Where a run stands: the device-placed train state and the results so far (what a
  checkpoint's metadata holds).

  Attributes:
    state: the :class:`TrainState` (replicated when pmapped).
    R, R_task: ``[T, T]`` class-IL / task-IL accuracy matrices (%; NaN: not yet evaluated).
    entropy_end: mean prediction entropy at the last logged step of each finished task.
    knn_acc: k-NN probe accuracy after each finished task (``eval.knn_k > 0``).
    start_task: the first task this invocation trains.
    resume_step: steps of ``start_task`` already done (a mid-task checkpoint).
    V, V_task: ``[T, T]`` class-IL / task-IL accuracy (%) on the validation split of every seen
      task (``data.val_fraction`` of its training images; None when there is none).
    wall_before: wall seconds the earlier invocations of a resumed run spent up to the restored
      checkpoint (0 for a fresh run).
    t_start: ``time.time()`` at which this invocation started.
    resumed: whether this invocation restored a checkpoint.
  """

  state: Any
  R: np.ndarray
  R_task: np.ndarray
  entropy_end: List[float]
  knn_acc: List[float]
  start_task: int = 0
  resume_step: int = 0
  input_state: Optional[Dict[str, int]] = None  # grain iterator state of a mid-task checkpoint
  V: Optional[np.ndarray] = None       # [T, T] validation class-IL accuracy (data.val_fraction)
  V_task: Optional[np.ndarray] = None  # [T, T] validation task-IL accuracy
  wall_before: float = 0.0  # seconds of earlier invocations, up to the restored checkpoint
  t_start: float = dataclasses.field(default_factory=time.time)
  resumed: bool = False

  def wall_time_s(self) -> float:
    """Wall seconds of the run so far, summed over its invocations (each up to the checkpoint
    the next one restored: work redone after an interruption counts once, in the new one)."""
    return self.wall_before + time.time() - self.t_start


def _model_and_frozen(config: ml_collections.ConfigDict, num_classes: int, rng: jax.Array):
  """The model, its trainable/frozen split and the preprocessing of a resolved config.

  Returns:
    ``(built, params0, frozen, linearized, preprocess)`` (see :class:`Experiment`).
  """
  built = build_model(config.model.name, num_classes,
                      peft=peft.PeftSpec.from_config(config.peft),
                      pretrained=config.model.pretrained,
                      image_size=config.data.image_size, rng=rng,
                      dropout_rate=config.model.dropout_rate,
                      dtype=None if config.train.compute_dtype == "float32" else jnp.bfloat16,
                      **_model_kwargs(config))
  variables = dict(built.variables)
  params0, frozen_params = peft.split_params(variables.pop("params"), config.peft.name)
  frozen = {"params": frozen_params, "collections": variables}
  linearized = linearize_mode(config.model.linearize)  # None | full | features
  if linearized:
    frozen["params0"] = peft.copy_tree(params0)
  if robust_lib.needs_anchor(robust_lib.from_config(config)):
    frozen["anchor"] = peft.copy_tree(params0)  # pretrained theta_0
  preprocess = Preprocess(image_size=config.data.image_size, mean=built.mean, std=built.std,
                          augment=config.data.augment, rrc_scale=tuple(config.data.rrc_scale))
  return built, params0, frozen, linearized, preprocess


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Stage 1 of :func:`run`: data, scenario, model, method, optimiser and steps.

  Args:
    config: a resolved config (:func:`cft_jax.config.validate_config`).

  Raises:
    ConfigError: settings that do not fit the data (e.g. tasks that do not divide the classes).
    DatasetNotFoundError: the data is not installed (the message says how to get it).
  """
  ds = load_dataset(config.data.name, root=config.data.root or None,
                    image_size=config.data.image_size, **data_options(config.data))
  method = methods_lib.get_method(config.method, mse_alpha=mse_alpha(config))
  sc = scenarios.build_scenario(config, ds.train_labels, ds.test_labels, ds.num_classes,
                                cumulative_data=method.cumulative_data)
  skipped_corrupt = _check_files(config, ds, sc)  # before anything trains (None: in memory)
  k, C = sc.task_sizes, sc.num_classes  # classes of each task (the steps slice the task's)
  rng, init_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  built, params0, frozen, linearized, preprocess = _model_and_frozen(config, C, init_rng)
  stream = None
  if uses_grain(ds, config.data.pipeline) and not config.train.cache_features:
    # decode + augment on the host (grain workers); cached features train on the feature rows
    stream = StreamInput(ds, sc.train_labels, sc.test_labels, config.data,
                         config.train.batch_size, config.eval.batch_size, config.train.epochs,
                         config.seed)
    preprocess = dataclasses.replace(preprocess, augment="none")
  loss_fn = objectives.make_loss_fn(config.loss.name, **_loss_hparams(config.loss))
  try:
    dev = layout_from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  robust = robust_lib.from_config(config)  # TPGM / FTP / L2-SP / WiSE-FT components
  opt_ctx = robust_lib.OptimizerContext(  # anchor: a copy, the state's params are donated
      anchor=peft.copy_tree(params0), apply_fn=built.module.apply,
      classes_per_task=k, linearized=linearized, axis_name=dev.axis_name)
  tx = make_optimizer(config.optim, linearized,  # linearized: decay toward params0
                      split_head=method.freezes_peft)  # LAE: own Adam state for the backbone
  tx = robust_lib.wrap_optimizer(robust, method.wrap_optimizer(tx, opt_ctx), opt_ctx)
  needs_val = any(c.needs_val_batch for c in robust)
  if needs_val and not any(len(sc.radius_split(t)) for t in range(sc.num_tasks)):
    name = next(c.name for c in robust if c.needs_val_batch)
    raise ConfigError(f"method.projection={name} learns its radii on held-out "
                      "training data: set data.radius_fraction > 0 (e.g. 0.1)")
  train_step = make_train_step(built.module.apply, preprocess, loss_fn, tx, k, method,
                               axis_name=dev.axis_name, shardings=dev.shardings,
                               linearized=linearized, loss_scope=config.loss.scope,
                               robust=robust)
  eval_step = dev.wrap_eval(make_eval_step(built.module.apply, preprocess, k, C, method,
                                           linearized=linearized, axis_name=dev.axis_name,
                                           shardings=dev.shardings))
  n_train = peft.count_params(params0)
  exp = Experiment(
      config=config, ds=ds, scenario=sc, method=method, module=built.module,
      preprocess=preprocess, params0=params0, frozen=frozen, frozen_dev=dev.replicate(frozen),
      tx=tx, train_step=train_step, eval_step=eval_step, id_eval_step=eval_step,
      train_data=(ds.train_images, sc.train_labels, np.arange(len(sc.train_labels))),
      test_data=(ds.test_images, sc.test_labels, np.arange(len(sc.test_labels))), dev=dev,
      forward=jax.jit(make_forward(built.module.apply, linearized)), linearized=linearized,
      needs_val=needs_val, rng=rng, n_train=n_train,
      n_total=n_train + peft.count_params(frozen["params"]),
      feature_fn=(jax.jit(knn_lib.make_feature_fn(built.module.apply, linearized))
                  if config.eval.knn_k else None), stream=stream, robust=robust,
      skipped_corrupt=skipped_corrupt)
  if config.train.cache_features:
    _use_cached_features(exp, loss_fn)
  if config.train.verbose:
    print(f"[cft_jax] {config.data.name}: {sc.num_tasks} tasks x {_sizes_text(k)} classes, "
          f"class order {list(sc.class_order)}; train/test images per task "
          f"{[len(i) for i in sc.train_idx]} / {[len(i) for i in sc.test_idx]}")
    print(f"[cft_jax] {config.model.name} + {config.peft.name}: {exp.n_train:,} trainable of "
          f"{exp.n_total:,} parameters ({100.0 * exp.n_train / exp.n_total:.2f}%); loss "
          f"{config.loss.name}")
  return exp


def _check_files(config: ml_collections.ConfigDict, ds: Any, sc: scenarios.Scenario
                 ) -> Optional[Dict[str, int]]:
  """Checks every image file (or record) of a streamed dataset that the run uses — its tasks'
  train, validation and test examples — before anything trains (:mod:`cft_jax.data.check`).

  Returns:
    Bad examples per split (``{"train", "val", "test"}``; all 0 for clean data), skipped with
    ``data.skip_corrupt``; None for in-memory datasets (nothing to decode).

  Raises:
    BadDataError: naming every bad file (up to 20), unless ``data.skip_corrupt``.
  """
  if not getattr(ds, "streaming", False):
    return None
  cat = lambda ix: np.concatenate([np.asarray(i, np.int64) for i in ix] + [np.zeros(0, np.int64)])
  verbose = config.train.verbose
  counts, lines = check_splits(
      {"train": (ds.train, cat(sc.train_idx)),
       "val": (ds.train, cat(list(sc.val_idx) + list(sc.radius_idx or ()))),  # + TPGM's split
       "test": (ds.test, cat(sc.test_idx))}, skip_corrupt=config.data.skip_corrupt,
      threads=config.data.read_threads, progress=verbose and config.train.progress)
  if lines and verbose:
    print(f"[cft_jax] data.skip_corrupt=True: skipping {sum(counts.values())} image(s) that "
          f"cannot be decoded (train {counts['train']}, val {counts['val']}, test "
          f"{counts['test']}):\n" + "\n".join(lines))
  return counts


def _sizes_text(sizes) -> str:
  """``10`` for equal tasks, ``50+10x5`` for a first task of 50 then five of 10."""
  sizes = tuple(sizes)
  if len(set(sizes)) == 1:
    return str(sizes[0])
  if len(set(sizes[1:])) == 1:
    return f"{sizes[0]}+{sizes[1]}x{len(sizes) - 1}"
  return "+".join(map(str, sizes))


def _use_cached_features(exp: Experiment, loss_fn) -> None:
  """``train.cache_features``: the backbone features of every used image computed once; the
  head's train / in-distribution eval steps run on them (OOD sets still go through images)."""
  config, dev, sc = exp.config, exp.dev, exp.scenario
  _check_cache_features(config)
  t_cache = time.time()
  full_vars = dict(exp.frozen["collections"],
                   params=peft.merge_params(exp.params0, exp.frozen["params"]))
  feat_fn = fc.make_feature_fn(exp.module.apply, exp.preprocess)

  def cache(images, labels, index_lists):
    used = np.unique(np.concatenate([np.asarray(i, np.int64) for i in index_lists]))
    feats = fc.extract_features(exp.module.apply, full_vars, images, exp.preprocess,
                                indices=used, batch_size=config.eval.batch_size,
                                feature_fn=feat_fn)
    row = np.full(len(images), -1, np.int64)
    row[used] = np.arange(len(used))
    return feats, labels[used], row

  exp.train_data = cache(exp.ds.train_images, sc.train_labels, sc.train_idx)
  exp.test_data = cache(exp.ds.test_images, sc.test_labels, sc.test_idx)
  k, C = sc.task_sizes, sc.num_classes
  exp.train_step = make_train_step(fc.head_apply, fc.identity_preprocess, loss_fn, exp.tx, k,
                                   exp.method, axis_name=dev.axis_name,
                                   shardings=dev.shardings, loss_scope=config.loss.scope,
                                   robust=exp.robust)
  exp.id_eval_step = dev.wrap_eval(make_eval_step(fc.head_apply, fc.identity_preprocess, k, C,
                                                  exp.method, axis_name=dev.axis_name,
                                                  shardings=dev.shardings))
  if config.train.verbose:
    print(f"[cft_jax] train.cache_features: {len(exp.train_data[0])} train + "
          f"{len(exp.test_data[0])} test features [{exp.train_data[0].shape[-1]}] computed once "
          f"in {time.time() - t_cache:.1f} s; the head trains on them")


def restore_or_init(exp: Experiment, ckpt: TaskCheckpointer, workdir: str
                    ) -> Tuple[Progress, Optional[Dict[str, Any]]]:
  """Stage 2 of :func:`run`: the newest readable checkpoint, or a fresh state.

  Returns:
    ``(progress, None)`` to train on, or ``(progress, result)`` when the workdir holds a
    finished run (its saved ``metrics.json``; ``ckpt`` is then closed).

  Raises:
    ConfigMismatchError: the checkpoint is of a run with another configuration.
  """
  T, verbose = exp.scenario.num_tasks, exp.config.train.verbose
  state = TrainState(step=jnp.zeros((), jnp.int32), params=exp.params0,
                     opt_state=exp.tx.init(exp.params0),
                     method_state=exp.method.init_state(exp.params0, exp.task_context(None)))
  prog = Progress(state, np.full((T, T), np.nan), np.full((T, T), np.nan), [], [])
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state_np, meta = restored
    _check_resume_config(meta["config"], exp.config)
    if list(meta["class_order"]) != list(exp.scenario.class_order):
      raise ConfigMismatchError("saved class order differs from this run's; use a new --workdir")
    prog = Progress(
        jax.tree_util.tree_map(jnp.asarray, state_np),
        np.array(meta["accuracy_matrix"], dtype=float),
        np.array(meta["task_il_accuracy_matrix"], dtype=float),
        list(meta.get("entropy_end_of_task", [])), list(meta.get("knn_accuracy", [])),
        start_task=meta["num_finished_tasks"],
        resume_step=meta.get("step_in_task", 0) if not meta.get("task_finished", True) else 0,
        input_state=meta.get("input_state") if not meta.get("task_finished", True) else None)
    prog.wall_before, prog.resumed = float(meta.get("wall_time_s", 0.0)), True
    if meta.get("val_accuracy_matrix") is not None:
      prog.V = np.array(meta["val_accuracy_matrix"], dtype=float)
      prog.V_task = np.array(meta["val_task_il_accuracy_matrix"], dtype=float)
    metrics_path = os.path.join(workdir, "metrics.json")
    if prog.start_task >= T and os.path.exists(metrics_path):
      with open(metrics_path) as f:
        result = json.load(f)
      ckpt.close()
      if verbose:
        print(f"[cft_jax] {workdir} holds a finished run; its saved results (pass --overwrite to "
              f"train again):")
        print(report(result))
      return prog, result
    if verbose:
      where = f", task {prog.start_task} step {prog.resume_step}" if prog.resume_step else ""
      print(f"[cft_jax] resuming from {ckpt.directory}: {prog.start_task}/{T} tasks done{where}")
  prog.state = exp.dev.replicate(prog.state)
  return prog, None


def _save(exp: Experiment, prog: Progress, ckpt: TaskCheckpointer, t: int, step_in_task: int,
          finished: bool, epoch: int = 0) -> None:
  """Checkpoint ``checkpoint_id(global_step, finished)`` with the progress as metadata."""
  # unrounded (``decimals=None``): a resume restores these, and must equal an uninterrupted run
  meta = {"accuracy_matrix": _nan_to_none(prog.R, None),
          "task_il_accuracy_matrix": _nan_to_none(prog.R_task, None),
          "class_order": list(exp.scenario.class_order), "config": exp.config_json,
          "class_names": [exp.ds.class_names[c] for c in exp.scenario.class_order],
          "entropy_end_of_task": prog.entropy_end,
          "num_finished_tasks": t + 1 if finished else t, "task_finished": finished,
          "step_in_task": step_in_task, "epoch": epoch, "wall_time_s": prog.wall_time_s()}
  if exp.stream is not None and not finished and prog.input_state is not None:
    meta["input_state"] = prog.input_state  # the grain iterator: resume at the next batch
  if exp.config.eval.knn_k:
    meta["knn_accuracy"] = prog.knn_acc
  if prog.V is not None:
    meta["val_accuracy_matrix"] = _nan_to_none(prog.V, None)
    meta["val_task_il_accuracy_matrix"] = _nan_to_none(prog.V_task, None)
  host = exp.dev.unreplicate(prog.state)
  # A snapshot: the save is asynchronous, and the live lists (entropy_end, knn_acc) grow at the
  # task's end, which would let a mid-task checkpoint record the next finished task's entry.
  ckpt.save(checkpoint_id(int(host.step), finished), host, json.loads(json.dumps(meta)))


def _begin_task(exp: Experiment, prog: Progress, t: int) -> None:
  """Fresh optimiser state (``optim.reset_per_task``; TPGM/FTP projection state carries over)
  and the method's ``begin_task`` hook."""
  host = exp.dev.unreplicate(prog.state)
  if exp.config.optim.reset_per_task:
    host = host.replace(opt_state=reset_base_state(exp.tx, host.opt_state, host.params))
  host = host.replace(method_state=exp.method.begin_task(t, host.params, host.method_state,
                                                         exp.task_context(t)))
  prog.state = exp.dev.replicate(host)


def _check_finite(loss: float, t: int, step_in_task: int, ckpt_dir: str) -> None:
  """Raises FloatingPointError for a non-finite loss (naming the task, step and the kept
  checkpoint folder)."""
  if not np.isfinite(loss):
    raise FloatingPointError(
        f"non-finite loss {loss} at task {t} (0-based), step {step_in_task}; stopped. "
        f"The last good checkpoint in {ckpt_dir} is kept: lower "
        f"optim.learning_rate or set optim.grad_clip, then re-run the command.")


def _log_step(exp: Experiment, prog: Progress, writer: MetricWriter, bar, t: int, epoch: int,
              step_in_task: int, m: Dict[str, Any], ckpt_dir: str = ""
              ) -> Optional[Dict[str, float]]:
  """Every ``train.log_every`` steps (and at the task's end) reads the step's metrics from the
  device, stops on a non-finite loss (:func:`_check_finite`), writes a ``log.jsonl`` record and
  returns the logged metrics (None otherwise: no device-to-host sync on the other steps)."""
  dev = exp.dev
  if hasattr(bar, "update"):
    bar.update(1)
  if step_in_task % max(1, exp.config.train.log_every) and step_in_task != exp.steps_per_task[t]:
    return None
  last = {key: float(np.asarray(dev.first(v))) for key, v in m.items()}
  _check_finite(last["loss"], t, step_in_task, ckpt_dir)
  gstep = int(np.asarray(dev.first(prog.state.step)))
  writer.train_record({"task": t, "step": step_in_task, "epoch": epoch, "global_step": gstep,
                       **last}, gstep, last)
  if hasattr(bar, "set_postfix"):
    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.1f}",
                    H=f"{last['entropy']:.3f}", alpha=f"{last['alpha']:.3f}")
  return last


def _task_batches(exp: Experiment, prog: Progress, t: int, skip_steps: int):
  """``(epoch, (images, labels, mask), extra)`` for the steps of task ``t`` from ``skip_steps``.

  Device path: the in-memory batches of :func:`cft_jax.data.batches` (epoch ``e`` shuffled with
  ``(seed, t, e)``; a resumed task replays the order and skips the done steps). Grain path
  (``exp.stream``): a :class:`cft_jax.data.TaskBatches` started from the checkpoint's iterator
  state (nothing replayed); ``prog.input_state`` follows it for mid-task checkpoints.
  ``extra`` holds TPGM's validation batch (``exp.needs_val``).
  """
  config, dev, sc = exp.config, exp.dev, exp.scenario
  bs = config.train.batch_size
  nb = num_batches(len(sc.train_idx[t]), bs)

  def val_iter(epoch, skip):
    it = _cycle(exp.ds.train_images, sc.train_labels, sc.radius_split(t), bs,
                (config.seed, t, epoch))
    for _ in range(skip):
      next(it)
    return it

  if exp.stream is not None:
    state = prog.input_state if (skip_steps and prog.input_state
                                 and prog.input_state.get("next_step") == skip_steps) else None
    it = exp.stream.train(t, sc.train_idx[t], state=state, start_step=skip_steps)
    vals, val_epoch = None, -1
    for step, batch in enumerate(it, skip_steps):
      epoch = step // nb
      if exp.needs_val and epoch != val_epoch:
        vals, val_epoch = val_iter(epoch, step - epoch * nb), epoch
      prog.input_state = it.get_state()
      yield epoch, batch, ({"val_batch": dev.shard(next(vals))} if exp.needs_val else {})
    if it.skipped_corrupt and config.train.verbose:
      print(f"[cft_jax] task {t}: skipped {it.skipped_corrupt} corrupt image(s) "
            f"(data.skip_corrupt=True)")
    prog.input_state = None
    return
  train_x, train_y, train_map = exp.train_data
  for epoch in range(skip_steps // nb, config.train.epochs):
    vals = val_iter(epoch, 0) if exp.needs_val else None
    for b, batch in enumerate(batches(train_x, train_y, train_map[sc.train_idx[t]], bs,
                                      shuffle_seed=(config.seed, t, epoch))):
      extra = {"val_batch": dev.shard(next(vals))} if exp.needs_val else {}
      if epoch * nb + b < skip_steps:
        continue  # replayed data order of a resumed task
      yield epoch, batch, extra


def train_task(exp: Experiment, prog: Progress, t: int, ckpt: TaskCheckpointer,
               writer: MetricWriter, stop_signal: "_GracefulExit") -> None:
  """Stage 3 of :func:`run`: trains task ``t`` (from ``prog.resume_step`` when resuming it),
  then runs the method's ``end_task`` hook.

  Checkpoints mid-task every ``checkpoint.every_steps`` steps and when a signal arrives (then
  raises ``KeyboardInterrupt``).

  Raises:
    FloatingPointError: a non-finite loss (the last good checkpoint is kept).
    KeyboardInterrupt: SIGINT/SIGTERM received (a checkpoint was saved first).
  """
  config, dev, sc = exp.config, exp.dev, exp.scenario
  bs, steps = config.train.batch_size, exp.steps_per_task
  lo, _ = sc.task_range(t)
  skip_steps = prog.resume_step if t == prog.start_task else 0
  if not skip_steps:  # a fresh task (a resumed one restored its optimiser/method state)
    _begin_task(exp, prog, t)
  task_rng = jax.random.fold_in(exp.rng, t)
  total = steps[t] if not exp.global_schedule else sum(steps)
  offset = 0 if not exp.global_schedule else sum(steps[:t])
  every_steps = config.checkpoint.every_steps
  show_bar = config.train.verbose and config.train.progress
  bar = _progress(range(steps[t]), steps[t], f"task {t} [0-{sc.num_tasks - 1}]", show_bar,
                  initial=skip_steps)
  step_in_task, last = skip_steps, {}
  for epoch, (xb, yb, mb), extra in _task_batches(exp, prog, t, skip_steps):
    step_rng = jax.random.fold_in(task_rng, step_in_task)
    prog.state, m = exp.train_step(prog.state, exp.frozen_dev, *dev.shard((xb, yb, mb)), lo,
                                   offset + step_in_task, total, step_rng,
                                   exp.method.frozen_peft(t, epoch), **extra)
    step_in_task += 1
    # Metrics and the NaN check only at log steps and before a checkpoint: no per-step sync.
    logged = _log_step(exp, prog, writer, bar, t, epoch, step_in_task, m, ckpt.directory)
    last = logged or last
    if step_in_task < steps[t] and (
        stop_signal.requested or (every_steps and step_in_task % every_steps == 0)):
      if logged is None:  # never save a non-finite state: the last good checkpoint stays
        _check_finite(float(np.asarray(dev.first(m["loss"]))), t, step_in_task, ckpt.directory)
      _save(exp, prog, ckpt, t, step_in_task, finished=False, epoch=epoch)
      if stop_signal.requested:
        raise KeyboardInterrupt(
            f"stopped by signal {stop_signal.requested} at task {t}, step "
            f"{step_in_task}; saved. Re-run the same command to resume.")
  if hasattr(bar, "close"):
    bar.close()
  writer.end_task()
  prog.entropy_end.append(last.get("entropy", float("nan")))
  host = dev.unreplicate(prog.state)
  host = host.replace(method_state=exp.method.end_task(t, host.params, host.method_state,
                                                       exp.task_context(t)))
  prog.state = dev.replicate(host)


def evaluate_seen(exp: Experiment, prog: Progress, t: int, writer: MetricWriter) -> None:
  """Stage 4 of :func:`run`: after task ``t``, fills row ``t`` of the class-IL / task-IL
  accuracy matrices (every seen task's test set; a shared test set is evaluated once) and the
  k-NN probe, prints them (``train.verbose``) and writes the TensorBoard scalars."""
  config, dev, sc = exp.config, exp.dev, exp.scenario
  R, R_task = prog.R, prog.R_task
  host = dev.unreplicate(prog.state)
  eval_state = dev.replicate(exp.eval_state(host))
  test_x, test_y, test_map = exp.test_data
  for i in range(t + 1 if config.eval.test else 0):  # eval.test=False: validation only
    if sc.shares_test_set and i > 0:  # one test set for every task: evaluated once
      R[t, i], R_task[t, i] = R[t, 0], R_task[t, 0]
      continue
    ilo, _ = sc.task_range(i)
    if exp.stream is not None and not config.train.cache_features:  # streamed test images
      R[t, i], R_task[t, i] = exp.stream.evaluate(exp.id_eval_step, eval_state, exp.frozen_dev,
                                                  sc.test_idx[i], sc.num_seen(t), ilo)
      continue
    R[t, i], R_task[t, i] = evaluate(exp.id_eval_step, eval_state, exp.frozen_dev, test_x,
                                     test_y, test_map[sc.test_idx[i]], config.eval.batch_size,
                                     sc.num_seen(t), ilo)
  if any(len(v) for v in sc.val_idx):  # the validation split (tuning never reads the test data)
    T = sc.num_tasks
    if prog.V is None:
      prog.V, prog.V_task = np.full((T, T), np.nan), np.full((T, T), np.nan)
    for i in range(t + 1):  # on images (exp.eval_step): cached features cover train_idx only
      if not len(sc.val_idx[i]):
        continue
      ilo = sc.task_range(i)[0]
      prog.V[t, i], prog.V_task[t, i] = (
          exp.stream.evaluate(exp.eval_step, eval_state, exp.frozen_dev, sc.val_idx[i],
                              sc.num_seen(t), ilo, split="train") if exp.stream is not None
          else evaluate(exp.eval_step, eval_state, exp.frozen_dev, exp.ds.train_images,
                        sc.train_labels, sc.val_idx[i], config.eval.batch_size,
                        sc.num_seen(t), ilo))
  knn_k = config.eval.knn_k
  if knn_k:  # k-NN probe of the features (DLCFT Fig. 6): memory = training data seen so far
    shown = exp.eval_state(host)  # the evaluated params (WiSE-FT), each of the method's sets
    prog.knn_acc.append(knn_lib.knn_probe(
        exp.feature_fn, tuple(exp.method.eval_params(shown.params, shown.method_state)),
        exp.frozen, exp.ds.train_images, sc.train_labels,
        sc.knn_memory(t), exp.ds.test_images, sc.test_labels, sc.seen_test(t), exp.preprocess,
        k=knn_k, batch_size=config.eval.batch_size))
  if config.train.verbose and config.eval.test:
    print(metrics_lib.format_matrix(R, t + 1, "class-IL acc (%)"))
    print(f"  after task {t}: class-IL avg {np.mean(R[t, :t + 1]):.2f}%, task-IL avg "
          f"{np.mean(R_task[t, :t + 1]):.2f}%"
          + (f", {knn_k}-NN probe {prog.knn_acc[-1]:.2f}%" if knn_k else "")
          + (f"; validation class-IL avg {np.nanmean(prog.V[t, :t + 1]):.2f}%"
             if prog.V is not None else ""))
  if not config.eval.test:
    return
  writer.eval_scalars({"eval/class_il_avg_accuracy": float(np.mean(R[t, :t + 1])),
                       "eval/task_il_avg_accuracy": float(np.mean(R_task[t, :t + 1])),
                       **{f"eval/class_il_accuracy_task{i}": float(R[t, i])
                          for i in range(t + 1)}}, int(dev.first(prog.state.step)))


def _final_result(exp: Experiment, prog: Progress, writer: MetricWriter,
                  workdir: str) -> Dict[str, Any]:
  """Stage 5 of :func:`run`: OOD evaluation, ``metrics.json``, plots and the report."""
  config, sc, dev = exp.config, exp.scenario, exp.dev
  state = dev.unreplicate(prog.state)
  ood = {}
  if config.eval.ood_corruptions or config.eval.ood_dataset:
    ood = evaluate_ood(config, exp.eval_step, dev.replicate(exp.eval_state(state)),
                       exp.frozen_dev, exp.ds, sc.test_labels, sc.all_test(), sc.spec,
                       sc.num_classes, config.train.verbose)
  test_sizes = [len(i) for i in sc.test_idx]
  result = {
      "accuracy_matrix": _nan_to_none(prog.R),
      "task_il_accuracy_matrix": _nan_to_none(prog.R_task),
      # per-task means, plus *_sample_weighted: accuracy over the union of seen test samples
      # (eval.test=False, a tuning run: no test summaries, the test images were never read)
      **(metrics_lib.summarize(prog.R, test_sizes=test_sizes) if config.eval.test else {}),
      **({"task_il": metrics_lib.summarize(prog.R_task, test_sizes=test_sizes)}
         if config.eval.test else {}),
      "entropy_end_of_task": prog.entropy_end,
      "class_order": list(sc.class_order),
      "class_names": [exp.ds.class_names[c] for c in sc.class_order],
      "trainable_params": exp.n_train,
      "total_params": exp.n_total,
      # summed over the invocations of a resumed run ("resumed": true), see Progress.wall_time_s
      "wall_time_s": prog.wall_time_s(),
      "resumed": prog.resumed,
      "train_step_compilations": exp.train_step.num_traces(),
      "num_devices": dev.num_devices,
      "num_processes": dev.process_count,
      "parallelism": dev.kind,
      "provenance": provenance(),  # commit, CPU model, package versions (pairing in studies)
  }
  if ood:
    result["ood"] = ood
  if exp.skipped_corrupt is not None:  # streamed data: files that could not be decoded, skipped
    result["skipped_corrupt"] = dict(exp.skipped_corrupt)
  if config.eval.knn_k:
    result["knn_accuracy"] = prog.knn_acc
  if prog.V is not None:  # data.val_fraction > 0: the same metrics on the validation split
    val_sizes = [len(v) for v in sc.val_idx]
    result["val_accuracy_matrix"] = _nan_to_none(prog.V)
    result["val_task_il_accuracy_matrix"] = _nan_to_none(prog.V_task)
    has_val = [n > 0 for n in val_sizes]  # a task without validation images is left out
    result["val"] = metrics_lib.summarize(prog.V, test_sizes=val_sizes, tasks=has_val)
    result["val_task_il"] = metrics_lib.summarize(prog.V_task, test_sizes=val_sizes,
                                                  tasks=has_val)
  writer.write_metrics(result)
  pngs = writer.plots() if config.train.plots and config.eval.test else []
  if config.train.verbose and config.eval.test:
    print(report(result))
    print(f"[cft_jax] wrote {os.path.join(workdir, 'metrics.json')}"
          + (f" and {len(pngs)} plots" if pngs else ""))
  return result


def _prepare_workdir(workdir: str, overwrite: bool) -> None:
  """Creates ``workdir``; with ``overwrite`` first deletes its checkpoints, records and plots."""
  if overwrite and os.path.isdir(workdir):
    for name in ("checkpoints", "metrics.json", "log.jsonl", "config.json", "tensorboard"):
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    for fn in os.listdir(workdir):
      if fn.endswith(".png"):
        os.remove(os.path.join(workdir, fn))
  os.makedirs(workdir, exist_ok=True)


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False
        ) -> Dict[str, Any]:
  """Runs (or resumes) a continual fine-tuning job and writes ``workdir/metrics.json``.

  Stages: :func:`build_experiment` (data, scenario, model, method, steps) ->
  :func:`restore_or_init` -> per task :func:`train_task` -> :func:`evaluate_seen` -> checkpoint
  -> the final report (OOD evaluation, ``metrics.json``, plots).

  Args:
    config: the experiment config (see ``configs/default.py``); resolved and checked by
      :func:`cft_jax.config.validate_config` first.
    workdir: output folder: ``config.json``, ``checkpoints/``, ``log.jsonl``, ``metrics.json``
      (see :mod:`cft_jax.writers`). Checkpoints are numbered ``2 * global_step + finished``
      (:func:`checkpoint_id`).
    overwrite: delete what the workdir holds and train from scratch (otherwise a finished run is
      only re-reported and an unfinished one resumes).

  Returns:
    The metrics dict written to ``metrics.json``.

  Raises:
    ConfigError: an invalid configuration (one line naming the key and the fix).
    ConfigMismatchError: the workdir holds a run with another configuration.
    DatasetNotFoundError: missing data, with the fix.
  """
  t_start = time.time()
  config = validate_config(config)
  try:  # a no-op when cft_jax.main already started it (it must precede every JAX call)
    init_distributed(config.distributed)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if jax.process_index() != 0:  # one process prints (tables, bars); the others run quietly
    config.train.verbose = False
  if jax.process_index() == 0:  # one process prepares the (shared) workdir
    _prepare_workdir(workdir, overwrite)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("cft_jax: workdir prepared")
    os.makedirs(workdir, exist_ok=True)
  exp = build_experiment(config)
  ckpt = TaskCheckpointer(os.path.join(workdir, "checkpoints"),
                          max_to_keep=config.checkpoint.max_to_keep or None)
  prog, finished = restore_or_init(exp, ckpt, workdir)
  if finished is not None:
    return finished
  prog.t_start = t_start
  # Only process 0 writes log.jsonl, TensorBoard, config.json, metrics.json and plots; every
  # process takes part in the (collective) orbax checkpoint saves and restores.
  writer = MetricWriter(workdir, tensorboard=config.train.tensorboard, enabled=exp.dev.is_main)
  writer.write_config(exp.config_json)
  writer.truncate_log(lambda r: _before(r, prog.start_task, prog.resume_step))
  writer.open()
  T = exp.scenario.num_tasks
  stop_after = config.train.stop_after_task or T
  try:
    with _GracefulExit() as stop_signal:
      for t in range(prog.start_task, min(T, stop_after)):
        train_task(exp, prog, t, ckpt, writer, stop_signal)
        evaluate_seen(exp, prog, t, writer)
        _save(exp, prog, ckpt, t, exp.steps_per_task[t], finished=True)
        if stop_signal.requested:
          raise KeyboardInterrupt(f"stopped by signal {stop_signal.requested} after task {t}; "
                                  f"saved. Re-run the same command to resume.")
  finally:
    ckpt.close()
    writer.close()
  if stop_after < T and prog.start_task < stop_after:
    if config.train.verbose:
      print(f"[cft_jax] stopped after {stop_after} of {T} tasks (train.stop_after_task); run "
            f"the same command without it to continue")
    return {"accuracy_matrix": _nan_to_none(prog.R), "num_finished_tasks": stop_after}
  return _final_result(exp, prog, writer, workdir)


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
  bs = config.eval.batch_size

  def acc(images, labels, idx):
    return evaluate(eval_step, state, frozen, images, labels, idx, bs, num_classes, 0)[0]

  out = {"id": acc(ds.test_images, test_labels, test_idx)}
  names = list(config.eval.ood_corruptions)
  if names:
    sevs = list(config.eval.ood_severities)
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
  if config.eval.ood_dataset:
    other = load_dataset(config.eval.ood_dataset, root=config.eval.ood_root or None,
                         image_size=config.data.image_size)
    if other.num_classes != num_classes:
      raise ConfigError(f"eval.ood_dataset '{config.eval.ood_dataset}' has {other.num_classes} "
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


def _nan_to_none(R: np.ndarray, decimals: Optional[int] = 4) -> List[List[Optional[float]]]:
  """``[T, T]`` matrix -> JSON lists, NaN -> None, rounded to ``decimals`` (None: exact)."""
  return [[None if np.isnan(v) else (float(v) if decimals is None else round(float(v), decimals))
           for v in row] for row in R]


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
