"""The shared part of the natural-image configs (``configs/cifar10.py``,
``configs/tiny_imagenet.py``): Split <dataset> read as an image folder from ``../shared/data``,
EfficientNet-Lite0 (ImageNet) + LoRA at 64 px, every training image with a 10% validation split,
every test image, crop + flip, batch 32, Adam 1e-3, the local loss; the argument
``loss[,method]``. Not a config itself (the leading underscore keeps it out of the CLI's list).
"""

import os

import ml_collections

from cft_jax.config import base_config, load_config_module, parse_config_arg

METHODS = ("sequential", "lae", "er", "derpp", "dlcft")
HERE = os.path.dirname(os.path.abspath(__file__))


def objective_settings():
  """``OBJECTIVE_SETTINGS`` of ``configs/objectives_study.py`` (objective -> loss keys)."""
  return load_config_module(os.path.join(HERE, "objectives_study.py")).OBJECTIVE_SETTINGS


def shared_root(folder: str, env: str) -> str:
  """``$env`` if set, else ``<checkout>/../shared/data/<folder>``."""
  return os.environ.get(env) or os.path.normpath(
      os.path.join(HERE, "..", "..", "shared", "data", folder))


def natural_config(arg: str, example: str, root: str,
                   num_tasks: int) -> ml_collections.ConfigDict:
  """The shared settings for ``arg = "loss[,method]"`` (defaults ``aepg``, ``sequential``).

  Args:
    arg: the config argument.
    example: a valid use shown in the error (``configs/cifar10.py:aepg,lae``).
    root: the dataset folder (``root/{train,test}/<class>/``).
    num_tasks: class-incremental tasks.

  Raises:
    ConfigError (a ValueError): an unknown loss or method in ``arg``.
  """
  settings = objective_settings()
  loss, method = parse_config_arg(
      arg, [("loss", tuple(settings), "aepg"), ("method", METHODS, "sequential")], example)
  c = base_config()
  c.scenario.num_tasks = num_tasks
  c.scenario.seed = 1993
  c.data.name = "image_folder"
  c.data.root = root
  c.data.image_size = 64
  c.data.train_limit = 0          # every training image of a task ...
  c.data.val_fraction = 0.1       # ... of which 10% are the validation split (tuning)
  c.data.test_limit = 0           # every test image
  c.data.augment = "crop_flip"
  c.data.test_crop_fraction = 1.0  # the whole image, no ImageNet centre crop
  c.loss.name = loss
  c.loss.update(settings[loss])
  c.method.name = method
  c.optim.learning_rate = 1e-3
  if method in ("er", "derpp"):   # replay on top of seq-LoRA (buffer 500, 32 replayed per step
    c.loss.scope = "all"          # and term; DER++ alpha 0.1, beta 0.5), CE over every seen class
  if method == "dlcft":           # DLCFT's class-IL recipe (DLCFT paper §3-4, Table 2) on the LoRA
    _dlcft(c)                     # parameters: its own MSE loss replaces the argument's
  c.train.batch_size = 32
  c.train.log_every = 10
  return c


def _dlcft(c: ml_collections.ConfigDict) -> None:
  """DLCFT in class-IL with a 500-image buffer, in place: the feature extractor linearized in its
  trainable (LoRA) parameters (eqs. 6-7), MSE to a 15-scaled one-hot over every seen class, TK-FAC
  curvature (Monte-Carlo Fisher, 4 batches), ``(1/t) L_data + ((t-1)/t) L_reg`` with
  ``L_reg = 1/2 q(theta) + 1/2 E_M[MSE]`` (eq. 14, ``replay_lambda`` 1/2) and the head extension
  (eq. 13) — the settings of ``configs/dlcft_data_il.py`` / ``dlcft_class_il.py``."""
  c.model.linearize = "features"
  c.loss = ml_collections.ConfigDict({"name": "mse", "alpha": 15.0, "scope": "all"})
  c.method.weighting = "dlcft"
  c.method.strength = 1.0
  c.method.curvature = "tkfac"
  c.method.fisher_type = "mc"
  c.method.num_samples = 1
  c.method.curvature_batches = 4
  c.method.buffer_size = 500
  c.method.replay_batch_size = 32
  c.method.replay_lambda = 0.5
