"""Library defaults for every config key, and validation of user configs.

:func:`base_config` is the single list of keys the trainer understands (experiment files in
``configs/`` start from it and override values); :func:`validate_config` checks a config against
it before anything runs, with messages that name the key and the fix.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Union

import ml_collections


class ConfigError(ValueError):
  """A config key or value is invalid; the message names the key and how to fix it."""


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with its default (Split Fashion-MNIST, Lite0 + LoRA, aEPG)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.scenario = ml_collections.ConfigDict()
  c.scenario.type = "class_il"
  c.scenario.num_tasks = 5
  c.scenario.seed = 1993          # class-order permutation seed
  c.scenario.shuffle_classes = True
  c.scenario.class_order = ()     # explicit class order (each class id once); () -> seeded shuffle
  c.scenario.first_task_classes = 0  # >0: first task's classes, the rest split equally (B50-Inc10)

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.root = ""                # "" -> the loader's default location
  c.data.image_size = 64          # pixels; Lite0's native 224 is too slow for a 2-core CPU
  c.data.train_limit = 1000       # max training images per task (0 / None: all)
  c.data.test_limit = 500         # max test images per task (0 / None: all)
  c.data.augment = "crop_flip"    # none | crop_flip | rrc_flip
  c.data.rrc_scale = (0.05, 1.0)  # rrc_flip: area-fraction range of RandomResizedCrop
  c.data.val_fraction = 0.0       # held-out share of each task's training data (TPGM radii)
  c.data.pipeline = "auto"        # auto (grain for streamed datasets) | device | grain
  c.data.workers = 0              # grain worker processes (-1: one per core; 0: read threads)
  c.data.read_threads = 8         # grain read threads per process
  c.data.skip_corrupt = False     # skip (and count) undecodable image files instead of stopping
  c.data.test_crop_fraction = 0.875  # test: shorter side to image_size / f, centre crop
  c.data.rrc_ratio = (0.75, 4.0 / 3.0)  # rrc_flip: aspect-ratio range of RandomResizedCrop
  c.data.resample = "bilinear"    # host resizing filter: bilinear | bicubic | nearest
  c.data.train_list = ""          # split lists "relative/path [label]" (image_folder, imagenet_r)
  c.data.test_list = ""
  c.data.split_seed = 0           # seed of the per-class 80/20 split of one-split datasets
  c.data.test_fraction = 0.2      # test share of that split (ImageNet-R: 0.2)
  c.data.domains = ()             # domainnet: domains pooled (() -> all six)

  c.model = ml_collections.ConfigDict()
  c.model.name = "efficientnet_lite0"
  c.model.pretrained = True
  c.model.dropout_rate = 0.0
  c.model.checkpoint = ""         # ViT: .npz file or its folder ("" -> $CFT_JAX_VIT_DIR lookup)
  c.model.head_init_std = 1e-3    # ViT: incremental head N(0, 0.001)
  c.model.checkpoint_format = "auto"  # ViT: auto | augreg | i21k (ViT-B_16.npz, pre_logits)
  c.model.pre_logits = "drop"     # ViT i21k file: drop (vit_jax fine-tuning) | keep (Dense+tanh)

  c.peft = ml_collections.ConfigDict()
  c.peft.name = "lora"            # lora | adapter | prefix (ViT) | linear_probe | full
  c.peft.rank = 4
  c.peft.alpha = 0.0              # LoRA scale alpha / rank; 0 -> alpha = rank
  c.peft.blocks = (0, 1, 2, 3, 4)  # ViT: blocks that get the PEFT module (paper: 0-4)
  c.peft.lora_targets = ("k", "v")  # ViT LoRA targets among q, k, v, o
  c.peft.adapter_hidden = 5       # ViT adapter bottleneck
  c.peft.adapter_position = "attn"  # ViT adapter parallel to attn | mlp
  c.peft.prefix_length = 10       # ViT prefix length L

  c.method = ml_collections.ConfigDict()
  c.method.name = "sequential"    # sequential | lae
  c.method.ema_decay = 0.999      # lae: offline EMA decay
  c.method.freeze_epochs = 0      # lae: PEFT frozen for the first k epochs of tasks t >= 1
  c.method.projection = ""        # "" | tpgm | ftp | l2sp: robust fine-tuning toward theta_0
  c.method.projection_norm = ""   # l2 | mars ("" -> tpgm: l2, ftp: mars)
  c.method.proj_freq = 1          # tpgm: project every n steps
  c.method.max_iters = 1          # tpgm: radius updates per projection
  c.method.radius_lr = 1e-2       # tpgm / ftp: Adam lr of the radii
  c.method.ftp_k = 1.0            # ftp: positive-gradient gain k
  c.method.l2sp_alpha = 0.01      # l2sp: penalty alpha

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "aepg"            # ce | epg | aepg | confidence_penalty | label_smoothing | ...
  c.loss.schedule = "sigmoid"     # aepg: sigmoid | linear | cosine | constant
  c.loss.tau = 6.0                # aepg sigmoid temperature
  c.loss.schedule_scope = "task"  # T counts steps of the current task, or of the whole run

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0
  c.optim.reset_per_task = True

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 1
  c.train.batch_size = 32         # global batch, split over train.num_devices
  c.train.num_devices = 1         # local devices per process the batch is split over (0: all)
  c.train.parallelism = "auto"    # auto (sharding if > 1 device) | sharding (jit + Mesh) | pmap
  c.train.compute_dtype = "float32"  # float32 | bfloat16 activations (params, losses: float32)
  c.train.log_every = 5          # steps between log.jsonl records
  c.train.stop_after_task = 0    # >0: stop after this many tasks (resume later); 0: run all
  c.train.progress = True        # a progress bar per task
  c.train.tensorboard = True     # TensorBoard event files in workdir/tensorboard
  c.train.plots = True           # write PNG plots into the workdir at the end
  c.train.verbose = True         # print the accuracy matrix after every task
  c.train.cache_features = False  # linear probe: backbone features computed once, head trains on them

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 250
  c.eval.wise_ft_alpha = 1.0      # WiSE-FT: evaluate (1 - a) theta_0 + a theta (1.0: off)
  c.eval.ood_corruptions = ()     # e.g. ("gaussian_noise", "contrast"): OOD test sets at the end
  c.eval.ood_severities = (1, 2, 3, 4, 5)
  c.eval.ood_dataset = ""         # a second dataset with the same classes (data registry name)
  c.eval.ood_root = ""

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 0    # 0 -> keep every checkpoint
  c.checkpoint.every_steps = 0    # >0: also checkpoint every n steps inside a task
  c.eval.knn_k = 0                # >0: k-NN probe of the features after each task
  c.distributed = ml_collections.ConfigDict()  # multi-host: jax.distributed.initialize(...)
  c.distributed.coordinator_address = ""  # "host:port" of process 0 ("" : single host)
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  c.model.remat = False           # ViT: recompute each block in the backward pass (less memory)
  c.model.linearize = "none"      # DLCFT: none | full (whole network) | features (eqs. 6-7)
  c.loss.scope = "local"          # local: current task's classes (aEPG paper) | all: every output
  c.optim.momentum = 0.9          # sgd
  c.optim.backbone_lr_scale = 1.0  # learning rate of the non-head leaves = scale x learning_rate
  return c


# Enumerated values: key -> allowed values (None: looked up in a registry at validation time).
_CHOICES = {
    "scenario.type": ("class_il", "task_il", "data_il"),
    "data.augment": ("none", "crop_flip", "rrc_flip"),
    "data.pipeline": ("auto", "device", "grain"),
    "data.resample": ("bilinear", "bicubic", "nearest"),
    "model.checkpoint_format": ("auto", "augreg", "i21k"),
    "model.pre_logits": ("drop", "keep"),
    "peft.name": ("lora", "adapter", "prefix", "linear_probe", "full"),
    "loss.schedule": ("sigmoid", "linear", "cosine", "constant"),
    "loss.schedule_scope": ("task", "global"),
    "loss.scope": ("local", "all"),
    "optim.name": ("adam", "adamw", "sgd"),
    "method.projection": ("", "none", "tpgm", "ftp", "l2sp"),
    "method.projection_norm": ("", "l2", "mars"),
    "peft.adapter_position": ("attn", "mlp"),
    "model.linearize": ("none", "full", "features"),
    "train.parallelism": ("auto", "sharding", "pmap"),
    "train.compute_dtype": ("float32", "bfloat16"),
}
_POSITIVE = ("scenario.num_tasks", "data.image_size", "train.epochs", "train.batch_size",
             "eval.batch_size", "optim.learning_rate", "train.log_every")
_NON_NEGATIVE = ("scenario.first_task_classes", "distributed.num_processes", "data.train_limit", "data.test_limit", "peft.rank", "train.num_devices",
                 "checkpoint.every_steps", "checkpoint.max_to_keep", "train.stop_after_task",
                 "eval.knn_k", "method.freeze_epochs", "optim.weight_decay", "optim.grad_clip", "optim.backbone_lr_scale",
                 "model.dropout_rate")
_UNIT = {"data.test_fraction": (0.0, 1.0, False), "data.test_crop_fraction": (1e-6, 1.0, True),
         "data.val_fraction": (0.0, 1.0, False), "eval.wise_ft_alpha": (0.0, 1.0, True),
         "method.ema_decay": (0.0, 1.0, False), "model.dropout_rate": (0.0, 1.0, False)}


# Keys that may differ between a run and its resumption / reuse: they do not change what is
# computed (see :func:`same_run`).
RUN_SECTIONS = ("seed", "scenario", "data", "model", "peft", "method", "loss", "optim", "train")
# Sections that decide a finished run's metrics (a study reuses a finished workdir when equal).
RESULT_SECTIONS = RUN_SECTIONS + ("eval",)
RUN_IGNORED = ("train.progress", "train.verbose", "train.log_every", "train.stop_after_task",
               "train.plots", "train.tensorboard",
               # the device layout: results are device-count invariant (cft_jax.parallel)
               "train.num_devices", "train.parallelism")
# One-line meanings of keys whose base_config line carries no comment (see :func:`config_schema`).
_DOC = {
    "seed": "seed of the model init, data subsets, batch order and augmentation",
    "data.name": "dataset (fashion_mnist, mnist, image_folder, cifar100, imagenet_r, domainnet, "
                 "tfds:<name>)",
    "model.name": "backbone (efficientnet_lite0, vit_*, resnet*, tiny_cnn)",
    "model.pretrained": "load the pretrained backbone weights (False: random init)",
    "model.dropout_rate": "dropout before the head",
    "method.name": "continual-learning method (see cft_jax.methods)",
    "loss.name": "training objective (see cft_jax.objectives)",
    "optim.name": "optimiser",
    "optim.learning_rate": "learning rate",
    "optim.weight_decay": "weight decay (adam / adamw: decoupled, optax.adamw; sgd: added to "
                          "the gradient; linearized runs: toward theta_0)",
    "optim.grad_clip": "global gradient-norm clip (0: off)",
    "optim.reset_per_task": "fresh optimiser state at every task (TPGM/FTP radii kept)",
    "train.epochs": "epochs per task",
    "eval.batch_size": "evaluation batch size",
    "eval.ood_severities": "corruption severities of eval.ood_corruptions",
    "eval.ood_root": "data root of eval.ood_dataset (\"\": the loader's default)",
    "distributed.num_processes": "multi-host: number of processes (0: auto-detect)",
    "distributed.process_id": "multi-host: this process's id (-1: auto-detect)",
    "scenario.type": "class_il | task_il (evaluated with the task id) | data_il (all classes "
                     "in every task, one shared test set)",
    "scenario.num_tasks": "number of tasks T (class-/task-IL: must divide the classes)",
    "scenario.shuffle_classes": "permute the class order with scenario.seed (False: natural)",
    "peft.rank": "LoRA rank r (lora; 0: no LoRA)",
    "data.test_list": "split list of the test images (see data.train_list)",
}


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def with_defaults(section_name: str, section: Any) -> ml_collections.ConfigDict:
  """``section`` (a ConfigDict / dict, possibly partial) with the keys it lacks taken from
  ``base_config()[section_name]``: library functions that take one section (e.g.
  :func:`cft_jax.steps.make_optimizer`) read it without inline defaults."""
  out = base_config()[section_name].to_dict()
  out.update(dict(section.items()) if section is not None else {})
  return ml_collections.ConfigDict(out)


def _did_you_mean(key: str, candidates, prefix: str = "") -> str:
  hint = difflib.get_close_matches(key, sorted(candidates), 1)
  return f"; did you mean '{prefix}{hint[0]}'?" if hint else ""


def _method_fields(name: str) -> Optional[Dict[str, Any]]:
  from cft_jax import methods  # pylint: disable=g-import-not-at-top
  if name not in methods.method_names():
    raise ConfigError(f"config.method.name={name!r}; choose one of {list(methods.method_names())}"
                      + _did_you_mean(str(name), methods.method_names()))
  return methods.method_config_fields(name)


def _other_methods_hint(key: str, name: str) -> str:
  """`` (a key of methods ...)`` when ``key`` (or a close spelling) belongs to other methods."""
  from cft_jax import methods  # pylint: disable=g-import-not-at-top
  owners = {}
  for other in methods.method_names():
    for field in methods.method_config_fields(other) or {}:
      owners.setdefault(field, []).append(other)
  match = key if key in owners else (difflib.get_close_matches(key, sorted(owners), 1) or [None])[0]
  if match is None:
    return ""
  return (f" ('method.{match}' is a key of {', '.join(owners[match])}, not of '{name}': set "
          f"method.name first)")


def check_method_keys(name: str, keys) -> Optional[Dict[str, Any]]:
  """Checks the keys of a ``config.method`` section against method ``name``'s declared fields
  (:func:`cft_jax.methods.method_config_fields`) and the trainer's method keys of
  :func:`base_config`.

  Returns:
    ``{key: default}`` of the method's own fields (None: a method registered without fields).

  Raises:
    ConfigError: unknown method, or an unknown key (with a "did you mean").
  """
  fields = _method_fields(name)
  if fields is None:
    return None
  trainer_keys = set(base_config().method.keys())
  allowed = trainer_keys | set(fields)
  for key in keys:
    if key == "mse_alpha":
      raise ConfigError("config.method.mse_alpha: the MSE target scale is loss.alpha (one value "
                        "for the loss and the curvature / replay terms); set loss.alpha instead")
    if key not in allowed:
      raise ConfigError(f"unknown config key 'method.{key}' for method '{name}'"
                        + (_did_you_mean(key, fields, "method.")
                           or _other_methods_hint(key, name)
                           or _did_you_mean(key, allowed, "method."))
                        + f" Keys of method '{name}': {sorted(fields)}; trainer keys: "
                        f"{sorted(trainer_keys)}")
  return fields


# Keys of the ``loss`` section the trainer reads itself (the rest go to the objective).
LOSS_TRAINER_KEYS = ("name", "schedule_scope", "scope")


def loss_hparams(loss: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The objective's hyper-parameters of a ``loss`` section (all but :data:`LOSS_TRAINER_KEYS`)."""
  return {k: v for k, v in loss.items() if k not in LOSS_TRAINER_KEYS}


def mse_alpha_default() -> float:
  """Default MSE target scale ``alpha`` (that of :func:`cft_jax.objectives.mse`, 15)."""
  from cft_jax import objectives  # pylint: disable=g-import-not-at-top
  return float(inspect.signature(objectives.mse).parameters["alpha"].default)


def mse_alpha(config: ml_collections.ConfigDict) -> float:
  """The run's MSE target scale: ``loss.alpha`` when ``loss.name='mse'``, else the default
  (the curvature and replay terms of DLCFT use the same value as the loss)."""
  if config.loss.name == "mse" and "alpha" in config.loss:
    return float(config.loss.alpha)
  return mse_alpha_default()


def _normalise(user: Dict[str, Any]) -> None:
  """In-place spelling normalisations of a user config dict (the one place for each)."""
  model = user.get("model")
  if isinstance(model, dict) and "linearize" in model:
    from cft_jax.linearize import linearize_mode  # pylint: disable=g-import-not-at-top
    try:
      model["linearize"] = linearize_mode(model["linearize"]) or "none"
    except ValueError as e:
      raise ConfigError(str(e)) from None


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks a config and returns it *resolved*: every key of :func:`base_config` present (the
  user's value or the library default), plus the chosen method's own fields
  (:func:`cft_jax.methods.method_config_fields`) at their defaults, ``model.linearize`` spelled
  ``none | full | features``, and ``loss.alpha`` (the MSE target scale) when ``loss.name='mse'``.

  The trainer reads only resolved configs, so no code needs an inline default.

  Returns:
    A new, unlocked ``ConfigDict`` (the argument is not modified).

  Raises:
    ConfigError: naming the first offending key, what is wrong and the fix (unknown keys get a
      "did you mean" suggestion).
  """
  try:
    return _validate(config)
  except (TypeError, AttributeError, KeyError) as e:  # a value of the wrong kind deep inside
    raise ConfigError(f"invalid config: {type(e).__name__}: {e}. Compare with "
                      f"configs/default.py") from e


def _check_value(full: str, v: Any, default: Any) -> None:
  """Type, choice and range checks of one value (``default``: the library default)."""
  if default is not None and v is not None and not _type_ok(v, default):
    raise ConfigError(f"config.{full}={v!r} has type {type(v).__name__}; expected "
                      f"{type(default).__name__} like the default {default!r}")
  if full in _CHOICES and v not in _CHOICES[full]:
    raise ConfigError(f"config.{full}={v!r}; choose one of {list(_CHOICES[full])}")
  if full in _POSITIVE and (v is None or not v > 0):
    raise ConfigError(f"config.{full}={v!r} must be > 0")
  if full in _NON_NEGATIVE and v is not None and not v >= 0:
    raise ConfigError(f"config.{full}={v!r} must be >= 0")
  if full in _UNIT:
    lo, hi, closed = _UNIT[full]
    if not (lo <= v <= hi if closed else lo <= v < hi):
      raise ConfigError(f"config.{full}={v!r} must be in [{lo}, {hi}{']' if closed else ')'}")


def _resolve_section(section: str, value: Dict[str, Any], default: Dict[str, Any],
                     method_fields: Optional[Dict[str, Any]]) -> Dict[str, Any]:
  """``default`` updated by the user's ``value`` (keys and values checked)."""
  from cft_jax import objectives  # pylint: disable=g-import-not-at-top
  defaults, allowed = dict(default), set(default)
  if section == "loss":
    allowed |= set(objectives.LOSS_HPARAMS)
  if section == "method":
    if method_fields is None:  # a method registered without declared fields: open section
      allowed |= set(value)
    else:
      check_method_keys(value.get("name", default["name"]), value.keys())
      defaults.update(method_fields)
      allowed |= set(method_fields)
  for key, v in value.items():
    full = f"{section}.{key}"
    if key not in allowed:
      raise ConfigError(f"unknown config key '{full}'" + _did_you_mean(key, allowed, f"{section}.")
                        + f" Valid keys of '{section}': {sorted(allowed)}")
    _check_value(full, v, defaults.get(key))
  out = dict(default)
  if section == "method" and method_fields:
    out.update(method_fields)
  out.update(value)
  return out


def _validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Resolves and checks keys, types, values and method x setting compatibility.

  Raises:
    ConfigError: naming the first offending key, what is wrong and the fix.
  """
  from cft_jax import objectives  # pylint: disable=g-import-not-at-top
  from cft_jax.models import MODEL_NAMES  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
  user = config.to_dict()
  _normalise(user)
  resolved = base_config().to_dict()
  method_name = (user.get("method") or {}).get("name", resolved["method"]["name"])
  method_fields = _method_fields(method_name) if isinstance(method_name, str) else {}
  for section, value in user.items():
    if section not in resolved:
      raise ConfigError(f"unknown config section '{section}'"
                        + _did_you_mean(section, resolved.keys())
                        + f" Valid sections: {sorted(resolved.keys())}")
    default = resolved[section]
    if not isinstance(default, dict):
      if not _type_ok(value, default):
        raise ConfigError(f"config.{section}={value!r}: expected {type(default).__name__}")
      resolved[section] = value
    elif not isinstance(value, dict):
      raise ConfigError(f"config.{section} must be a section (ConfigDict), got {value!r}")
    else:
      resolved[section] = _resolve_section(section, value, default, method_fields)
  if method_fields and "method" not in user:
    resolved["method"].update(method_fields)
  if resolved["loss"]["name"] == "mse" and "alpha" not in resolved["loss"]:
    resolved["loss"]["alpha"] = mse_alpha_default()
  c = ml_collections.ConfigDict(resolved)
  if c.model.name not in MODEL_NAMES:
    raise ConfigError(f"config.model.name={c.model.name!r}; choose one of {list(MODEL_NAMES)}")
  if c.loss.name not in objectives.OBJECTIVES:
    raise ConfigError(f"config.loss.name={c.loss.name!r}; choose one of "
                      f"{sorted(objectives.OBJECTIVES)}")
  # Method x setting compatibility.
  if c.peft.name == "prefix" and not c.model.name.startswith("vit_"):
    raise ConfigError(f"peft.name='prefix' needs a ViT (model.name=vit_*); "
                      f"{c.model.name} supports lora | linear_probe | full"
                      + (" | adapter" if c.model.name.startswith("efficientnet") else ""))
  if c.model.remat and not c.model.name.startswith("vit_"):
    raise ConfigError(f"model.remat=True is implemented for the ViT backbones (model.name="
                      f"vit_*); {c.model.name} does not rematerialise: set model.remat=False")
  if c.peft.name == "adapter" and not (c.model.name.startswith("vit_")
                                       or c.model.name.startswith("efficientnet_lite")):
    raise ConfigError(f"peft.name='adapter' needs a ViT or EfficientNet-Lite backbone, not "
                      f"{c.model.name}")
  if c.method.name == "lae" and c.peft.name not in ("lora", "adapter", "prefix"):
    raise ConfigError(f"method.name='lae' ensembles an online and an offline PEFT module: set "
                      f"peft.name to lora, adapter or prefix (got {c.peft.name!r})")
  if c.method.projection == "tpgm" and not c.data.val_fraction > 0:
    raise ConfigError("method.projection='tpgm' learns its radii on held-out training data: "
                      "set data.val_fraction > 0 (e.g. 0.1)")
  if c.scenario.first_task_classes:
    if c.scenario.type == "data_il":
      raise ConfigError("scenario.first_task_classes splits classes; scenario.type='data_il' "
                        "splits data: set scenario.first_task_classes=0")
    if c.loss.scope == "local" and c.loss.name in ("label_smoothing", "mse"):
      raise ConfigError(f"loss.name='{c.loss.name}' on the task's classes needs equal tasks "
                        f"(its target spans the whole local slice): set loss.scope='all' or "
                        f"scenario.first_task_classes=0")
  if c.peft.name == "lora" and not c.peft.rank > 0:
    raise ConfigError("peft.name='lora' needs peft.rank >= 1")
  if c.data.name == "image_folder" and not c.data.root:
    raise ConfigError("data.name='image_folder' needs --config.data.root=DIR with "
                      "DIR/{train,test}/<class>/*.jpg")
  if c.train.batch_size % max(c.train.num_devices, 1):
    raise ConfigError(f"train.batch_size={c.train.batch_size} must be divisible by "
                      f"train.num_devices={c.train.num_devices}")
  _check_builders(c)
  return c


def _check_builders(c: ml_collections.ConfigDict) -> None:
  """Builds what is cheap to build (data registry lookup, loss, method) so that their own
  value checks end as ConfigError before any data is loaded.

  Raises:
    ConfigError: an unknown dataset, or a loss / method hyper-parameter the builder rejects.
  """
  from cft_jax import methods, objectives  # pylint: disable=g-import-not-at-top
  from cft_jax.data.datasets import REGISTRY  # pylint: disable=g-import-not-at-top
  if c.data.name not in REGISTRY and not c.data.name.startswith("tfds:"):
    raise ConfigError(f"config.data.name={c.data.name!r}" + _did_you_mean(c.data.name, REGISTRY)
                      + f" Known: {sorted(REGISTRY)} or 'tfds:<name>'")
  loss_kw = loss_hparams(c.loss)
  for what, build in (("loss", lambda: objectives.make_loss_fn(c.loss.name, **loss_kw)),
                      ("method", lambda: methods.get_method(c.method, mse_alpha=mse_alpha(c)))):
    try:
      build()
    except ConfigError:
      raise
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{what} ({c[what].name}): {e}") from None


def parse_config_arg(arg, fields, example: str):
  """Splits a config file's argument (``--config FILE.py:a,b,c``) into one value per field.

  Args:
    arg: the text after the colon (``None`` / ``""``: every field's default); comma-separated,
      positional, trailing fields may be left out.
    fields: ``[(name, choices, default), ...]`` in order; ``choices`` a tuple of allowed values.
    example: a valid command-line use shown in the error, e.g. ``configs/cifar10.py:aepg,lae``.

  Returns:
    A tuple with one value per field (the given or the default one).

  Raises:
    ConfigError (a ValueError): more parts than fields, or a value outside its field's choices;
      the message lists every field's choices and ``example``.
  """
  parts = [p.strip() for p in (arg or "").split(",")] if (arg or "").strip() else []
  values = tuple(parts[i] if i < len(parts) and parts[i] else default
                 for i, (_, _, default) in enumerate(fields))
  if len(parts) > len(fields) or any(v not in choices
                                     for v, (_, choices, _) in zip(values, fields)):
    expected = ", ".join(f"{name} in {tuple(choices)}" for name, choices, _ in fields)
    raise ConfigError(f"config argument '{arg}': expected {expected}, e.g. {example}")
  return values


# ----------------------------------------------------------------------------------------------
# Same run?  Loading config files.  Describing the keys.
# ----------------------------------------------------------------------------------------------


def _plain(config: Union[ml_collections.ConfigDict, Dict[str, Any]]) -> Dict[str, Any]:
  """A JSON-comparable dict (tuples as lists) of a ConfigDict or dict."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(config))


def _lookup(d: Dict[str, Any], key: str) -> Any:
  for part in key.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return d


def same_run(saved: Union[ml_collections.ConfigDict, Dict[str, Any]],
             now: Union[ml_collections.ConfigDict, Dict[str, Any]],
             sections: Sequence[str] = RUN_SECTIONS,
             ignore: Sequence[str] = RUN_IGNORED) -> List[str]:
  """The keys (``"section.key"``) whose values differ between two configs of a run.

  The one rule deciding "is this the same run?" for resume (:func:`cft_jax.train.run`) and for
  the studies' reuse of finished workdirs: keys of ``sections`` are compared, except ``ignore``
  (logging and stopping keys that do not change what is computed) and keys present on one side
  only (a key added to the library since the run was made keeps, at its default, the behaviour
  the run had).

  Args:
    saved: the run's saved config (``workdir/config.json`` as a dict, or a ConfigDict).
    now: the config of this invocation.
    sections: top-level sections (or scalar keys such as ``seed``) to compare; the studies add
      ``eval`` when their metrics depend on it.
    ignore: ``"section.key"`` names that may differ.

  Returns:
    The differing keys, sorted; ``[]`` means the same run.
  """
  a, b = _plain(saved), _plain(now)
  diffs = []
  for section in sections:
    x, y = a.get(section), b.get(section)
    if isinstance(x, dict) and isinstance(y, dict):
      diffs += [f"{section}.{k}" for k in sorted(set(x) & set(y))
                if f"{section}.{k}" not in ignore and x[k] != y[k]]
    elif x is not None and y is not None and x != y and section not in ignore:
      diffs.append(section)
  return sorted(diffs)


def describe_diffs(saved, now, keys: Sequence[str]) -> str:
  """``"key: saved X, now Y"`` lines of :func:`same_run`'s keys."""
  a, b = _plain(saved), _plain(now)
  return "\n".join(f"{k}: saved {_lookup(a, k)!r}, now {_lookup(b, k)!r}" for k in keys)


def load_config_module(path_or_name: str, name: Optional[str] = None):
  """Imports a config file by path (``configs/dlcft_data_il.py``) or module name
  (``configs.dlcft_data_il``); the module has ``get_config(arg)``.

  Raises:
    ConfigError: no such file or module.
  """
  if path_or_name.endswith(".py") or os.path.sep in path_or_name:
    if not os.path.isfile(path_or_name):
      raise ConfigError(f"config file {path_or_name!r} not found")
    name = name or "cft_jax_config_" + os.path.splitext(os.path.basename(path_or_name))[0]
    spec = importlib.util.spec_from_file_location(name, path_or_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  try:
    return importlib.import_module(path_or_name)
  except ImportError as e:
    raise ConfigError(f"config module {path_or_name!r} cannot be imported: {e}") from None


def load_config(path_or_module: Union[str, Any], arg: Optional[str] = None
                ) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file, module name or module (the ``--config`` semantics).

  Args:
    path_or_module: a file path (``configs/default.py``, optionally ``FILE.py:arg`` as on the
      command line), a module name (``configs.dlcft_class_il``) or an imported module.
    arg: the argument of ``get_config`` (None: its default; overrides a ``:arg`` suffix).

  Returns:
    The (unresolved) config; :func:`validate_config` resolves it.

  Raises:
    ConfigError: the file or module does not exist or has no ``get_config``.
  """
  module = path_or_module
  if isinstance(path_or_module, str):
    path = path_or_module
    if ":" in path and path.rsplit(":", 1)[0].endswith(".py"):
      path, suffix = path.rsplit(":", 1)
      arg = suffix if arg is None else arg
    module = load_config_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path_or_module!r} has no get_config(arg) function")
  return module.get_config() if arg is None else module.get_config(arg)


def _source_comments() -> Dict[str, str]:
  """``{"section.key": comment}`` from the ``# ...`` comments of :func:`base_config`'s lines."""
  out = {}
  for line in inspect.getsource(base_config).splitlines():
    m = re.match(r"\s*c\.(\w+(?:\.\w+)?)\s*=\s*.*?#\s*(.+)$", line)
    if m and "ConfigDict()" not in line:
      out[m.group(1)] = m.group(2).strip()
  return out


def _allowed(key: str, default: Any) -> str:
  """Allowed values of ``key`` as text (choices, registries, ranges, type)."""
  from cft_jax import methods, objectives  # pylint: disable=g-import-not-at-top
  from cft_jax.models import MODEL_NAMES  # pylint: disable=g-import-not-at-top
  registries = {"model.name": MODEL_NAMES, "loss.name": sorted(objectives.OBJECTIVES),
                "method.name": methods.method_names()}
  if key in _CHOICES:
    return " | ".join(repr(v) for v in _CHOICES[key])
  if key in registries:
    return " | ".join(registries[key])
  kind = type(default).__name__ if default is not None else "any"
  if key in _POSITIVE:
    return f"{kind} > 0"
  if key in _UNIT:
    lo, hi, closed = _UNIT[key]
    return f"{kind} in [{lo}, {hi}{']' if closed else ')'}"
  if key in _NON_NEGATIVE:
    return f"{kind} >= 0"
  return kind


def _field_doc(cls, field: str) -> str:
  """The ``field: text`` line of the ``Attributes:`` docstrings along ``cls``'s MRO."""
  for klass in cls.__mro__:
    m = re.search(rf"^\s+{field}: (.+)$", klass.__doc__ or "", re.M)
    if m:
      return m.group(1).strip()
  return f"hyper-parameter of {cls.__name__}"


def config_schema(method: Optional[str] = None) -> List[Dict[str, Any]]:
  """Every config key with its default, allowed values and meaning: :func:`base_config` (the
  defaults validation merges), its line comments, the checks of :func:`validate_config`, and
  the fields of the method ``method`` (None: of every registered method).

  Returns:
    ``[{"key", "default", "allowed", "meaning"}]`` in section order.
  """
  from cft_jax import methods, objectives  # pylint: disable=g-import-not-at-top
  docs = {**_source_comments(), **_DOC}
  rows = []
  for section, value in base_config().to_dict().items():
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for key, default in items:
      full = section if key is None else f"{section}.{key}"
      rows.append({"key": full, "default": default, "allowed": _allowed(full, default),
                   "meaning": docs.get(full, "")})
  used_by = {}
  for obj, keys in objectives.OBJECTIVE_HPARAMS.items():
    for k in keys:
      used_by.setdefault(k, []).append(obj)
  for k in sorted(set(used_by) - set(base_config().loss)):
    rows.append({"key": f"loss.{k}", "default": None, "allowed": "see the objective",
                 "meaning": f"hyper-parameter of loss {', '.join(used_by[k])}"
                 + (" (mse: target scale alpha, also used by the curvature / replay terms)"
                    if k == "alpha" else "")})
  names = methods.method_names() if method is None else (method,)
  seen = set()
  for name in names:
    fields = methods.method_config_fields(name) or {}
    cls = type(methods.get_method(ml_collections.ConfigDict({"name": name}))) if fields else None
    for k, default in fields.items():
      if (k in seen and method is None) or k in base_config().method:
        continue
      seen.add(k)
      users = [n for n in names if k in (methods.method_config_fields(n) or {})]
      rows.append({"key": f"method.{k}", "default": default,
                   "allowed": type(default).__name__ if default is not None else "any",
                   "meaning": f"[{', '.join(users)}] {_field_doc(cls, k)}"})
  return rows


def describe(config: Union[ml_collections.ConfigDict, str, None] = None) -> str:
  """Text table of :func:`config_schema` (``python -m cft_jax.main --config ... --describe``).

  Args:
    config: a config (it is resolved: its method's keys and its values are shown), a method
      name, or None (the keys of every method, no values).

  Raises:
    ConfigError: ``config`` is invalid.
  """
  values, method = None, config if isinstance(config, str) else None
  if isinstance(config, ml_collections.ConfigDict):
    values = _plain(validate_config(config))
    method = values["method"]["name"]
  rows = config_schema(method)
  width = max(len(r["key"]) for r in rows) + 2

  def show(v):
    return "-" if v is None else repr(tuple(v) if isinstance(v, list) else v)

  head = f"{'key':<{width}}" + (f"{'value':<24}" if values else "")
  lines = [head + f"{'default':<24}meaning  [allowed values]"]
  for r in rows:
    line = f"{r['key']:<{width}}"
    if values is not None:
      line += f"{show(_lookup(values, r['key'])):<23} "
    lines.append(line + f"{show(r['default']):<23} {r['meaning'] or '-'}  [{r['allowed']}]")
  return "\n".join(lines)


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _parse_override(key: str, text: str, like: Any) -> Any:
  """The value of ``--config.key=text`` with the type of ``like`` (the current or default value)."""
  if text == "None":
    return None
  try:
    if isinstance(like, bool):
      low = text.lower()
      if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return low in ("true", "1", "yes")
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
    if isinstance(like, str):
      return text
  except ValueError:
    raise ConfigError(f"--config.{key}={text!r}: expected a {type(like).__name__} like "
                      f"{like!r}") from None
  import ast  # pylint: disable=g-import-not-at-top
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return tuple(value) if isinstance(like, tuple) and isinstance(value, list) else value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Applies command-line overrides ``KEY=VALUE`` (``--config.KEY=VALUE``) to a config.

  A key may be any key of the config, of :func:`base_config`, a loss hyper-parameter, or a field
  of the config's method (``method.name`` is applied first, so ``--config.method.name=ewc
  --config.method.strength=100`` works on any config file). The value takes the type of the
  current (or default) value; tuples and untyped keys are Python literals; ``None`` is None.

  Returns:
    An unlocked copy with the overrides applied.

  Raises:
    ConfigError: an unknown key (with a "did you mean"), or a value of the wrong type.
  """
  from cft_jax import methods, objectives  # pylint: disable=g-import-not-at-top
  out = ml_collections.ConfigDict(config.to_dict())
  pairs = []
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"--config.{key}: expected --config.{key}=VALUE")
    pairs.append((key, text))
  pairs.sort(key=lambda kv: kv[0] != "method.name")
  for key, text in pairs:
    known = {**_flat(base_config().to_dict()), **_flat(out.to_dict())}
    name = out.method.name if "method" in out and "name" in out.method else "sequential"
    if name in methods.method_names():
      fields = methods.method_config_fields(name) or {}
      known.update({f"method.{k}": v for k, v in fields.items()})
      if methods.method_config_fields(name) is None and key.startswith("method."):
        known.setdefault(key, None)  # a method registered without declared fields
    known.update({f"loss.{k}": None for k in objectives.LOSS_HPARAMS if f"loss.{k}" not in known})
    if key not in known:
      hint = _did_you_mean(key, known)
      own = sorted(methods.method_config_fields(name) or {})
      if key.startswith("method.") and not difflib.get_close_matches(key[len("method."):], own, 1):
        hint = _other_methods_hint(key[len("method."):], name) or hint
      raise ConfigError(f"unknown config key '{key}' (--config.{key})" + hint
                        + " See --describe for every key.")
    value = _parse_override(key, text, known[key])
    *path, last = key.split(".")
    node = out
    for part in path:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    if last in node and node[last] is not None and value is not None and not _type_ok(
        value, node[last]):
      raise ConfigError(f"--config.{key}={text!r}: expected {type(node[last]).__name__}")
    if last in node:
      del node[last]  # the new value may be of another type (e.g. None -> int)
    node[last] = value
  return out
