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
import shutil
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cft_jax import methods as methods_lib
from cft_jax import knn as knn_lib
from cft_jax import metrics as metrics_lib
from cft_jax import objectives
from cft_jax import peft
from cft_jax import scenarios
from cft_jax.checkpoint import TaskCheckpointer
from cft_jax.config import ConfigError, validate_config
from cft_jax.data import Preprocess, batches, load_dataset, num_batches, subsample
from cft_jax.linearize import linearize_mode
from cft_jax.models import build_model
from cft_jax.steps import (PROJECTIONS, TrainState, make_eval_step, make_forward,  # re-exported
                           make_optimizer, make_projected_optimizer, make_train_step,
                           wise_ft_params)

PyTree = Any
LOSS_TRAINER_KEYS = ("name", "schedule_scope", "scope")


class ConfigMismatchError(ValueError):
  """Resuming a workdir with a configuration that changes what was trained."""


RESUME_KEYS = ("seed", "scenario", "data", "model", "peft", "method", "loss", "optim", "train")
# Keys that may change between a run and its resumption (they do not change what is computed).
RESUME_IGNORED = ("train.progress", "train.verbose", "train.log_every", "train.stop_after_task",
                  "train.plots", "train.tensorboard")


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
  if config.model.name.startswith("efficientnet_lite") and config.peft.name == "adapter":
    return {"adapter_hidden": config.peft.get("adapter_hidden", 5)}
  if not config.model.name.startswith("vit_"):
    if config.peft.name in ("adapter", "prefix"):
      raise ValueError(f"peft.name='{config.peft.name}' is implemented for the ViT backbones "
                       f"(and adapter for EfficientNet-Lite); {config.model.name} supports "
                       f"lora | linear_probe | full")
    return {}
  p = config.peft
  kw = {"peft": p.name if p.name in ("lora", "adapter", "prefix") else "none",
        "peft_blocks": tuple(p.get("blocks", (0, 1, 2, 3, 4))),
        "lora_targets": tuple(p.get("lora_targets", ("k", "v"))),
        "adapter_hidden": p.get("adapter_hidden", 5),
        "adapter_position": p.get("adapter_position", "attn"),
        "prefix_length": p.get("prefix_length", 10),
        "head_init_std": config.model.get("head_init_std", 1e-3),
        "remat": bool(config.model.get("remat", False))}
  if config.model.get("checkpoint"):
    kw["path"] = config.model.checkpoint
  return kw


def _loss_hparams(loss_cfg: ml_collections.ConfigDict) -> Dict[str, Any]:
  return {k: v for k, v in loss_cfg.items() if k not in LOSS_TRAINER_KEYS}


def _progress(iterable, total: int, desc: str, enabled: bool, initial: int = 0):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, initial=initial)


def _init_distributed(cfg: ml_collections.ConfigDict) -> None:
  """Multi-host start-up: ``jax.distributed.initialize`` from ``config.distributed``
  (``coordinator_address`` host:port, ``num_processes``, ``process_id``; on TPU pods and SLURM
  clusters these may be left empty and are auto-detected). Idempotent."""
  if jax.process_count() > 1:
    return
  kwargs = {k: cfg.get(k) for k in ("coordinator_address", "num_processes", "process_id")
            if cfg.get(k) not in (None, "", -1)}
  jax.distributed.initialize(**kwargs)


def _tensorboard_writer(workdir: str):
  """A TensorBoard event-file writer on ``workdir/tensorboard`` (tensorboardX: no TensorFlow);
  None with a note if tensorboardX is not installed."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("[cft_jax] tensorboardX not installed: no TensorBoard events (pip install tensorboardX)")
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))


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


class DeviceLayout:
  """How a global batch maps onto devices and hosts (``train.num_devices``, ``distributed.*``).

  One device: steps are ``jit``-ted, arrays pass through unchanged. ``n > 1`` local devices:
  steps are ``pmap``-ped over ``axis_name="batch"``, state and frozen weights are replicated once,
  and each global batch ``[B, ...]`` is cut into this host's slice ``[B / P]`` (``P`` processes)
  and reshaped to ``[n, B / (P n), ...]``.
  """

  def __init__(self, num_devices: int = 1, process_index: int = 0, process_count: int = 1):
    self.n = num_devices
    self.process_index, self.process_count = process_index, process_count
    self.axis_name = "batch" if num_devices * process_count > 1 else None
    self.devices = jax.local_devices()[:num_devices]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "DeviceLayout":
    """Reads ``train.num_devices`` (0: all local devices) and checks batch divisibility.

    Raises:
      ValueError: more devices requested than present, or batch sizes not divisible.
    """
    local = jax.local_device_count()
    n = int(config.train.get("num_devices", 1) or local)
    if n > local:
      raise ValueError(f"train.num_devices={n} but only {local} local devices exist")
    layout = cls(n, jax.process_index(), jax.process_count())
    per = n * layout.process_count
    for key, b in (("train.batch_size", config.train.batch_size),
                   ("eval.batch_size", config.eval.batch_size)):
      if b % per:
        raise ValueError(f"{key}={b} must be divisible by the {per} devices it is split over")
    return layout

  def shard(self, arrays):
    """Host slice of each global-batch array, reshaped ``[n, B/(P n), ...]`` when pmapped."""
    if self.axis_name is None:
      return arrays

    def one(x):
      x = np.asarray(x)
      per_host = x.shape[0] // self.process_count
      x = x[self.process_index * per_host:(self.process_index + 1) * per_host]
      return x.reshape((self.n, per_host // self.n) + x.shape[1:])

    return tuple(one(x) for x in arrays)

  def replicate(self, tree):
    """Copies of ``tree`` on every local device (leading axis ``n``), placed once."""
    if self.axis_name is None:
      return tree
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(self.devices), ("batch",)),
                                          jax.sharding.PartitionSpec("batch"))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)),
                                 sharding), jax.device_get(tree))

  def unreplicate(self, tree):
    if self.axis_name is None:
      return tree
    return jax.tree_util.tree_map(lambda x: x[0], tree)

  def first(self, x):
    return x[0] if self.axis_name is not None else x

  def wrap_eval(self, eval_step):
    """Eval step taking a global batch (sharded here) and returning global counts."""
    if self.axis_name is None:
      return eval_step

    def wrapped(state, frozen, images, labels, mask, num_seen, task_lo):
      out = eval_step(state, frozen, *self.shard((images, labels, mask)), num_seen, task_lo)
      return np.asarray(out)[0]

    return wrapped


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
  if config.data.get("augment", "none") != "none":
    problems.append(f"data.augment='none' (got '{config.data.augment}': features change "
                    "every epoch)")
  if linearize_mode(config.model.get("linearize", "none")):
    problems.append("model.linearize='none'")
  if config.model.get("dropout_rate", 0.0):
    problems.append("model.dropout_rate=0 (dropout acts on the features before the head)")
  if config.method.name not in ("sequential", "joint"):
    problems.append(f"method.name in ('sequential', 'joint') (got '{config.method.name}': it "
                    "needs images or the backbone)")
  if config.method.get("projection", "") not in ("", "none"):
    problems.append("method.projection=''")
  if problems:
    raise ConfigError("train.cache_features=True needs " + "; ".join(problems)
                      + ". Change those settings or set train.cache_features=False.")


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False
        ) -> Dict[str, Any]:
  """Runs (or resumes) a class-incremental fine-tuning job and writes ``workdir/metrics.json``.

  Args:
    config: the experiment config (see ``configs/default.py``).
    workdir: output folder: ``config.json``, ``checkpoints/``, ``log.jsonl``, ``metrics.json``.
    overwrite: delete what the workdir holds and train from scratch (otherwise a finished run is
      only re-reported and an unfinished one resumes).

  Returns:
    The metrics dict written to ``metrics.json``.

  Raises:
    ConfigMismatchError: the workdir holds a run with another configuration.
    ValueError / DatasetNotFoundError: bad config values or missing data, with the fix.
  """
  t_start = time.time()
  validate_config(config)
  if config.get("distributed") and config.distributed.get("coordinator_address"):
    _init_distributed(config.distributed)
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
  linearized = linearize_mode(config.model.get("linearize", "none"))  # None | full | features
  if linearized:
    frozen["params0"] = jax.tree_util.tree_map(jnp.array, params0)
  preprocess = Preprocess(image_size=config.data.image_size, mean=built.mean, std=built.std,
                          augment=config.data.get("augment", "none"),
                          rrc_scale=tuple(config.data.get("rrc_scale", (0.05, 1.0))))
  loss_fn = objectives.make_loss_fn(config.loss.name, **_loss_hparams(config.loss))
  tx = make_optimizer(config.optim, linearized)  # linearized: decay toward params0
  bs = config.train.batch_size
  wise_alpha = config.eval.get("wise_ft_alpha", 1.0)
  l2sp_alpha = (config.method.get("l2sp_alpha", 0.01)
                if config.method.get("projection", "") == "l2sp" else 0.0)
  if config.method.get("projection", "") or wise_alpha != 1.0:
    frozen["anchor"] = jax.tree_util.tree_map(jnp.array, params0)  # pretrained theta_0
  dev = DeviceLayout.from_config(config)
  tx, needs_val = make_projected_optimizer(  # a copy: the state's params are donated
      tx, config.method, jax.tree_util.tree_map(jnp.array, params0), built.module.apply, k,
      linearized, axis_name=dev.axis_name)
  if needs_val and not any(len(v) for v in val_idx):
    raise ValueError("method.projection=tpgm learns its radii on held-out training data: set "
                     "data.val_fraction > 0 (e.g. 0.1)")
  train_step = make_train_step(built.module.apply, preprocess, loss_fn, tx, k, method,
                               axis_name=dev.axis_name,
                               linearized=linearized,
                               loss_scope=config.loss.get("scope", "local"),
                               l2sp_alpha=l2sp_alpha, needs_val_batch=needs_val)
  eval_step = dev.wrap_eval(make_eval_step(built.module.apply, preprocess, k, C, method,
                                           linearized=linearized, axis_name=dev.axis_name))
  forward = jax.jit(make_forward(built.module.apply, linearized))
  # Data the train / eval loops index: the images, or (train.cache_features) the backbone
  # features computed once, with `*_map` taking an image index to its row.
  train_x, train_y, train_map = ds.train_images, train_labels, np.arange(len(train_labels))
  test_x, test_y, test_map = ds.test_images, test_labels, np.arange(len(test_labels))
  id_eval_step = eval_step  # in-distribution evaluation (OOD sets always go through images)
  if config.train.get("cache_features", False):
    _check_cache_features(config)
    from cft_jax import feature_cache as fc  # pylint: disable=g-import-not-at-top
    t_cache = time.time()
    full_vars = dict(frozen["collections"], params=peft.merge_params(params0, frozen["params"]))
    feat_fn = fc.make_feature_fn(built.module.apply, preprocess)

    def cache(images, labels, index_lists):
      used = np.unique(np.concatenate([np.asarray(i, np.int64) for i in index_lists]))
      feats = fc.extract_features(built.module.apply, full_vars, images, preprocess,
                                  indices=used, batch_size=config.eval.batch_size,
                                  feature_fn=feat_fn)
      row = np.full(len(images), -1, np.int64)
      row[used] = np.arange(len(used))
      return feats, labels[used], row

    train_x, train_y, train_map = cache(ds.train_images, train_labels, train_idx)
    test_x, test_y, test_map = cache(ds.test_images, test_labels, test_idx)
    train_step = make_train_step(fc.head_apply, fc.identity_preprocess, loss_fn, tx, k, method,
                                 axis_name=dev.axis_name,
                                 loss_scope=config.loss.get("scope", "local"))
    id_eval_step = dev.wrap_eval(make_eval_step(fc.head_apply, fc.identity_preprocess, k, C,
                                                method, axis_name=dev.axis_name))
    if verbose:
      print(f"[cft_jax] train.cache_features: {len(train_x)} train + {len(test_x)} test "
            f"features [{train_x.shape[-1]}] computed once in {time.time() - t_cache:.1f} s; "
            f"the head trains on them")

  def apply_eval(p, x, **kw):  # the NON-linearized model, eval mode (K-FAC layer taps, features)
    variables = dict(frozen["collections"], params=peft.merge_params(p, frozen["params"]))
    return built.module.apply(variables, x, train=False, **kw)

  jit_cache: Dict[Any, Any] = {}  # compiled curvature functions, reused across tasks

  def task_context(t: Optional[int]) -> methods_lib.TaskContext:
    ctx = methods_lib.TaskContext(
        task_id=t, task_range=None if t is None else scenario.task_range(t), num_classes=C,
        classes_per_task=k, image_shape=ds.train_images.shape[1:],
        forward=lambda p, x: forward(p, frozen, x), preprocess=preprocess,
        batches=None if t is None else functools.partial(
            batches, ds.train_images, train_labels, train_idx[t], bs),
        loss_name=config.loss.name, apply=apply_eval, params0=frozen.get("params0"),
        linearize=linearized, loss_scope=config.loss.get("scope", "local"),
        jit_cache=jit_cache)
    return ctx
  knn_k = int(config.eval.get("knn_k", 0) or 0)
  feature_fn = (jax.jit(knn_lib.make_feature_fn(built.module.apply, linearized))
                if knn_k else None)
  knn_acc: List[float] = []
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

  # Resume (from the newest readable checkpoint; a finished run is only re-reported).
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params0, opt_state=tx.init(params0),
                     method_state=method.init_state(params0, task_context(None)))
  R = np.full((T, T), np.nan)
  R_task = np.full((T, T), np.nan)
  entropy_end: List[float] = []
  ckpt = TaskCheckpointer(os.path.join(workdir, "checkpoints"),
                          max_to_keep=config.checkpoint.get("max_to_keep", 0) or None)
  start_task, resume_step = 0, 0
  config_json = json.loads(config.to_json())
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state_np, meta = restored
    _check_resume_config(meta["config"], config)
    if list(meta["class_order"]) != list(scenario.class_order):
      raise ConfigMismatchError("saved class order differs from this run's; use a new --workdir")
    state = jax.tree_util.tree_map(jnp.asarray, state_np)
    R = np.array(meta["accuracy_matrix"], dtype=float)
    R_task = np.array(meta["task_il_accuracy_matrix"], dtype=float)
    entropy_end = list(meta.get("entropy_end_of_task", []))
    knn_acc = list(meta.get("knn_accuracy", []))
    start_task = meta["num_finished_tasks"]
    resume_step = meta.get("step_in_task", 0) if not meta.get("task_finished", True) else 0
    metrics_path = os.path.join(workdir, "metrics.json")
    if start_task >= T and os.path.exists(metrics_path):
      with open(metrics_path) as f:
        result = json.load(f)
      ckpt.close()
      if verbose:
        print(f"[cft_jax] {workdir} holds a finished run; its saved results (pass --overwrite to "
              f"train again):")
        print(report(result))
      return result
    if verbose:
      where = f", task {start_task + 1} step {resume_step}" if resume_step else ""
      print(f"[cft_jax] resuming from {ckpt.directory}: {start_task}/{T} tasks done{where}")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)

  log_path = os.path.join(workdir, "log.jsonl")
  if os.path.exists(log_path):  # drop records written after the checkpoint we resume from
    with open(log_path) as f:
      keep = [l for l in f if l.strip() and _before(json.loads(l), start_task, resume_step)]
    with open(log_path, "w") as f:
      f.writelines(keep)
  log_every = max(1, config.train.get("log_every", 10))
  tb = _tensorboard_writer(workdir) if config.train.get("tensorboard", True) else None
  every_steps = int(config.checkpoint.get("every_steps", 0) or 0)
  frozen_dev = dev.replicate(frozen)
  state = dev.replicate(state)

  def save(t, step_in_task, finished, epoch=0):
    meta = {"accuracy_matrix": _nan_to_none(R), "task_il_accuracy_matrix": _nan_to_none(R_task),
            "class_order": list(scenario.class_order), "config": config_json,
            "entropy_end_of_task": entropy_end, "num_finished_tasks": t + 1 if finished else t,
            "task_finished": finished, "step_in_task": step_in_task, "epoch": epoch}
    if knn_k:
      meta["knn_accuracy"] = knn_acc
    ckpt.save(checkpoint_id(int(dev.unreplicate(state).step), finished), dev.unreplicate(state),
              meta)

  stop_after = config.train.get("stop_after_task", 0) or T
  with _GracefulExit() as stop_signal:
    for t in range(start_task, min(T, stop_after)):
      lo, hi = scenario.task_range(t)
      nb = num_batches(len(train_idx[t]), bs)
      skip_steps = resume_step if t == start_task else 0
      if not skip_steps:  # a fresh task (a resumed one restored its optimiser/method state)
        host = dev.unreplicate(state)
        if config.optim.get("reset_per_task", True):  # TPGM/FTP projection state carries over
          from cft_jax.projection import reset_base_state  # pylint: disable=g-import-not-at-top
          host = host.replace(opt_state=reset_base_state(tx, host.opt_state, host.params))
        host = host.replace(method_state=method.begin_task(t, host.params, host.method_state,
                                                           task_context(t)))
        state = dev.replicate(host)
      task_rng = jax.random.fold_in(rng, t)
      total = steps_per_task[t] if not global_schedule else sum(steps_per_task)
      offset = 0 if not global_schedule else sum(steps_per_task[:t])
      step_in_task = skip_steps
      bar = _progress(range(steps_per_task[t]), steps_per_task[t], f"task {t + 1}/{T}", show_bar,
                      initial=skip_steps)
      last = {}
      with open(log_path, "a") as log_f:
        for epoch in range(skip_steps // nb, config.train.epochs):
          val_iter = (_cycle(ds.train_images, train_labels, val_idx[t], bs,
                             (config.seed, t, epoch)) if needs_val else None)
          for b, (xb, yb, mb) in enumerate(batches(train_x, train_y, train_map[train_idx[t]],
                                                   bs, shuffle_seed=(config.seed, t, epoch))):
            extra = {"val_batch": dev.shard(next(val_iter))} if needs_val else {}
            if epoch * nb + b < skip_steps:
              continue  # replayed data order of a resumed task
            step_rng = jax.random.fold_in(task_rng, step_in_task)
            state, m = train_step(state, frozen_dev, *dev.shard((xb, yb, mb)), lo,
                                  offset + step_in_task, total, step_rng,
                                  method.frozen_peft(t, epoch), **extra)
            step_in_task += 1
            loss = float(dev.first(m["loss"]))
            if not np.isfinite(loss):
              raise FloatingPointError(
                  f"non-finite loss {loss} at task {t} (0-based), step {step_in_task}; stopped. "
                  f"The last good checkpoint in {ckpt.directory} is kept: lower "
                  f"optim.learning_rate or set optim.grad_clip, then re-run the command.")
            if hasattr(bar, "update"):
              bar.update(1)
            if step_in_task % log_every == 0 or step_in_task == steps_per_task[t]:
              last = {key: float(dev.first(v)) for key, v in jax.device_get(m).items()}
              log_f.write(json.dumps({"task": t, "step": step_in_task, "epoch": epoch,
                                      "global_step": int(dev.first(state.step)), **last}) + "\n")
              log_f.flush()
              if tb is not None:
                gstep = int(dev.first(state.step))
                for key, v in last.items():
                  tb.add_scalar(f"train/{key}", v, gstep)
              if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.1f}",
                                H=f"{last['entropy']:.3f}", alpha=f"{last['alpha']:.3f}")
            if step_in_task < steps_per_task[t] and (
                stop_signal.requested or (every_steps and step_in_task % every_steps == 0)):
              save(t, step_in_task, finished=False, epoch=epoch)
              if stop_signal.requested:
                ckpt.close()
                raise KeyboardInterrupt(
                    f"stopped by signal {stop_signal.requested} at task {t}, step "
                    f"{step_in_task}; saved. Re-run the same command to resume.")
      if hasattr(bar, "close"):
        bar.close()
      entropy_end.append(last.get("entropy", float("nan")))
      host = dev.unreplicate(state)
      host = host.replace(method_state=method.end_task(t, host.params, host.method_state,
                                                       task_context(t)))
      state = dev.replicate(host)

      eval_state = host
      if wise_alpha != 1.0:
        eval_state = host.replace(params=wise_ft_params(host.params, frozen["anchor"],
                                                        wise_alpha))
      eval_state = dev.replicate(eval_state)
      for i in range(t + 1):
        if kind == "data_il" and i > 0:  # data-IL tasks share one test set: evaluate it once
          R[t, i], R_task[t, i] = R[t, 0], R_task[t, 0]
          continue
        ilo, _ = scenario.task_range(i)
        num_seen = hi if kind != "data_il" else C
        R[t, i], R_task[t, i] = evaluate(id_eval_step, eval_state, frozen_dev, test_x, test_y,
                                         test_map[test_idx[i]], config.eval.batch_size,
                                         num_seen, ilo)
      if knn_k:  # k-NN probe of the features (DLCFT Fig. 6): memory = training data seen so far
        mem = np.unique(np.concatenate(train_idx if kind == "data_il" else train_idx[:t + 1]))
        qry = np.unique(np.concatenate(test_idx[:t + 1]))
        knn_acc.append(knn_lib.knn_probe(feature_fn, host.params, frozen, ds.train_images,
                                         train_labels, mem, ds.test_images, test_labels, qry,
                                         preprocess, k=knn_k, batch_size=config.eval.batch_size))
      if verbose:
        print(metrics_lib.format_matrix(R, t + 1, "class-IL acc (%)"))
        print(f"  after task {t + 1}: class-IL avg {np.mean(R[t, :t + 1]):.2f}%, task-IL avg "
              f"{np.mean(R_task[t, :t + 1]):.2f}%"
              + (f", {knn_k}-NN probe {knn_acc[-1]:.2f}%" if knn_k else ""))
      if tb is not None:
        gstep = int(dev.first(state.step))
        tb.add_scalar("eval/class_il_avg_accuracy", float(np.mean(R[t, :t + 1])), gstep)
        tb.add_scalar("eval/task_il_avg_accuracy", float(np.mean(R_task[t, :t + 1])), gstep)
        for i in range(t + 1):
          tb.add_scalar(f"eval/class_il_accuracy_task{i}", float(R[t, i]), gstep)
        tb.flush()
      save(t, steps_per_task[t], finished=True)
      if stop_signal.requested:
        ckpt.close()
        raise KeyboardInterrupt(f"stopped by signal {stop_signal.requested} after task {t}; "
                                f"saved. Re-run the same command to resume.")

  ckpt.close()
  if tb is not None:
    tb.close()
  state = dev.unreplicate(state)
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
    ood = evaluate_ood(config, eval_step, dev.replicate(eval_state), frozen_dev, ds, test_labels,
                       all_test, scenario, C, verbose)
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
      "train_step_compilations": train_step.num_traces(),
      "num_devices": dev.n * dev.process_count,
  }
  if ood:
    result["ood"] = ood
  if knn_k:
    result["knn_accuracy"] = knn_acc
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
