"""Library defaults for every config key, and validation of user configs.

:func:`base_config` is the single list of keys the trainer understands (experiment files in
``configs/`` start from it and override values); :func:`validate_config` checks a config against
it before anything runs, with messages that name the key and the fix.
"""

from __future__ import annotations

import difflib
from typing import Any

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

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.root = ""                # "" -> the loader's default location
  c.data.image_size = 64          # pixels; Lite0's native 224 is too slow for a 2-core CPU
  c.data.train_limit = 1000       # max training images per task (0 / None: all)
  c.data.test_limit = 500         # max test images per task (0 / None: all)
  c.data.augment = "crop_flip"    # none | crop_flip | rrc_flip
  c.data.rrc_scale = (0.05, 1.0)  # rrc_flip: area-fraction range of RandomResizedCrop
  c.data.val_fraction = 0.0       # held-out share of each task's training data (TPGM radii)

  c.model = ml_collections.ConfigDict()
  c.model.name = "efficientnet_lite0"
  c.model.pretrained = True
  c.model.dropout_rate = 0.0
  c.model.checkpoint = ""         # ViT: path of an augreg .npz ("" -> $CFT_JAX_VIT_DIR lookup)
  c.model.head_init_std = 1e-3    # ViT: incremental head N(0, 0.001)

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
  c.train.num_devices = 1         # local devices to pmap over (0: all)
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
    "peft.name": ("lora", "adapter", "prefix", "linear_probe", "full"),
    "loss.schedule": ("sigmoid", "linear", "cosine", "constant"),
    "loss.schedule_scope": ("task", "global"),
    "loss.scope": ("local", "all"),
    "optim.name": ("adam", "adamw", "sgd"),
    "method.projection": ("", "none", "tpgm", "ftp", "l2sp"),
    "method.projection_norm": ("", "l2", "mars"),
    "peft.adapter_position": ("attn", "mlp"),
    "model.linearize": ("none", "full", "features"),
}
_POSITIVE = ("scenario.num_tasks", "data.image_size", "train.epochs", "train.batch_size",
             "eval.batch_size", "optim.learning_rate", "train.log_every")
_NON_NEGATIVE = ("distributed.num_processes", "data.train_limit", "data.test_limit", "peft.rank", "train.num_devices",
                 "checkpoint.every_steps", "checkpoint.max_to_keep", "train.stop_after_task",
                 "eval.knn_k", "method.freeze_epochs", "optim.weight_decay", "optim.grad_clip", "optim.backbone_lr_scale",
                 "model.dropout_rate")
_UNIT = {"data.val_fraction": (0.0, 1.0, False), "eval.wise_ft_alpha": (0.0, 1.0, True),
         "method.ema_decay": (0.0, 1.0, False), "model.dropout_rate": (0.0, 1.0, False)}
# Sections whose extra keys are method / objective hyper-parameters checked by their owners.
_OPEN_SECTIONS = ("method",)


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


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks keys, types, values and method x setting compatibility (see :func:`_validate`).

  Raises:
    ConfigError: naming the first offending key, what is wrong and the fix.
  """
  try:
    return _validate(config)
  except (TypeError, AttributeError, KeyError) as e:  # a value of the wrong kind deep inside
    raise ConfigError(f"invalid config: {type(e).__name__}: {e}. Compare with "
                      f"configs/default.py") from e


def _validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks keys, types, values and method x setting compatibility.

  Returns:
    ``config`` unchanged (for chaining).

  Raises:
    ConfigError: naming the first offending key, what is wrong and the fix.
  """
  from cft_jax import methods, objectives  # pylint: disable=g-import-not-at-top
  from cft_jax.models import MODEL_NAMES  # pylint: disable=g-import-not-at-top
  ref = base_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
  for section in config.keys():
    if section not in ref:
      hint = difflib.get_close_matches(section, list(ref.keys()), 1)
      raise ConfigError(f"unknown config section '{section}'"
                        + (f"; did you mean '{hint[0]}'?" if hint else "")
                        + f" Valid sections: {sorted(ref.keys())}")
    value, default = config[section], ref[section]
    if not isinstance(default, ml_collections.ConfigDict):
      if not _type_ok(value, default):
        raise ConfigError(f"config.{section}={value!r}: expected {type(default).__name__}")
      continue
    if not isinstance(value, ml_collections.ConfigDict):
      raise ConfigError(f"config.{section} must be a section (ConfigDict), got {value!r}")
    allowed = set(default.keys())
    if section == "loss":
      allowed |= set(objectives.LOSS_HPARAMS)
    for key in value.keys():
      full = f"{section}.{key}"
      if key not in allowed:
        if section in _OPEN_SECTIONS:
          continue
        hint = difflib.get_close_matches(key, sorted(allowed), 1)
        raise ConfigError(f"unknown config key '{full}'"
                          + (f"; did you mean '{section}.{hint[0]}'?" if hint else "")
                          + f" Valid keys of '{section}': {sorted(allowed)}")
      v = value[key]
      if key in default and default[key] is not None and v is not None and not _type_ok(
          v, default[key]):
        raise ConfigError(f"config.{full}={v!r} has type {type(v).__name__}; expected "
                          f"{type(default[key]).__name__} like the default {default[key]!r}")
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
  c = config
  if c.model.name not in MODEL_NAMES:
    raise ConfigError(f"config.model.name={c.model.name!r}; choose one of {list(MODEL_NAMES)}")
  if c.loss.name not in objectives.OBJECTIVES:
    raise ConfigError(f"config.loss.name={c.loss.name!r}; choose one of "
                      f"{sorted(objectives.OBJECTIVES)}")
  if c.method.name not in methods.method_names():
    raise ConfigError(f"config.method.name={c.method.name!r}; choose one of "
                      f"{list(methods.method_names())}")
  # Method x setting compatibility.
  if c.peft.name == "prefix" and not c.model.name.startswith("vit_"):
    raise ConfigError(f"peft.name='prefix' needs a ViT (model.name=vit_*); "
                      f"{c.model.name} supports lora | linear_probe | full"
                      + (" | adapter" if c.model.name.startswith("efficientnet") else ""))
  if c.model.get("remat", False) and not c.model.name.startswith("vit_"):
    raise ConfigError(f"model.remat=True is implemented for the ViT backbones (model.name="
                      f"vit_*); {c.model.name} does not rematerialise: set model.remat=False")
  if c.peft.name == "adapter" and not (c.model.name.startswith("vit_")
                                       or c.model.name.startswith("efficientnet_lite")):
    raise ConfigError(f"peft.name='adapter' needs a ViT or EfficientNet-Lite backbone, not "
                      f"{c.model.name}")
  if c.method.name == "lae" and c.peft.name not in ("lora", "adapter", "prefix"):
    raise ConfigError(f"method.name='lae' ensembles an online and an offline PEFT module: set "
                      f"peft.name to lora, adapter or prefix (got {c.peft.name!r})")
  if c.method.get("projection") == "tpgm" and not c.data.get("val_fraction", 0.0) > 0:
    raise ConfigError("method.projection='tpgm' learns its radii on held-out training data: "
                      "set data.val_fraction > 0 (e.g. 0.1)")
  if c.peft.name == "lora" and not c.peft.rank > 0:
    raise ConfigError("peft.name='lora' needs peft.rank >= 1")
  if c.data.name == "image_folder" and not c.data.get("root"):
    raise ConfigError("data.name='image_folder' needs --config.data.root=DIR with "
                      "DIR/{train,test}/<class>/*.jpg")
  if c.train.batch_size % max(c.train.get("num_devices", 1) or 1, 1):
    raise ConfigError(f"train.batch_size={c.train.batch_size} must be divisible by "
                      f"train.num_devices={c.train.num_devices}")
  return config
