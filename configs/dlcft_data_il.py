"""DLCFT comparison, data-incremental: Split Fashion-MNIST in 10 tasks (DLCFT paper §4.2, Table 1).

The argument after the colon picks the method: ``none`` (sequential fine-tuning), ``lwf``, ``ewc``,
``mas``, ``osla``, ``dlcft_kfac``, ``dlcft_tkfac`` (default) or ``joint``. Command::

    python -m cft_jax.main --config configs/dlcft_data_il.py:dlcft_tkfac \\
        --workdir runs/dlcft_data_il/dlcft_tkfac --config.seed=0

The whole comparison (3 seeds, one process): ``python studies/dlcft_study.py``.

Paper (Seq-CIFAR-100, 10 data-IL tasks, ResNet-18 pre-trained on ImageNet32, final accuracy, 3
runs): None 78.74, LwF 80.25, EWC 78.88, MAS 75.24, OSLA 79.23, DLCFT K-FAC 81.95,
DLCFT TK-FAC 82.70, Joint 83.57.

Setup here (what a 2-core CPU runs in minutes): the training set of Fashion-MNIST split uniformly
at random into 10 tasks of 300 images (all 10 classes in every task), one shared test set of 2000
images; pretrained EfficientNet-Lite0 at 32 px, the WHOLE network fine-tuned
(``peft.name=full``, 3.4M parameters, BatchNorm statistics frozen); Adam lr 1e-3, batch 32,
2 epochs per task, no augmentation. Baselines train the network itself with CE; EWC (MC diagonal
Fisher), OSLA (K-FAC of the CE loss on the non-linear network) and DLCFT use eq. 11's weighting
``(1/t) L_data + ((t-1)/t) L_reg`` with ``strength = 1`` and the curvature of 128 images of the
task. DLCFT trains eqs. 6-7 (``model.linearize=features``): the jvp-linearized feature extractor
``g(x; psi_0) + J g(x; psi_0)(psi - psi_0)`` under an ordinary linear head, with the MSE loss
(``alpha = 15``) over all outputs and a K-FAC / TK-FAC penalty (MC Fisher, factors averaged
``(t-1):1``) on every 1x1 conv and the head (the stem, depthwise convs and BN affine parameters
take the diagonal-Fisher fallback).

Measured: ``docs/results/dlcft_data_il.md`` (``studies/dlcft_study.py``, 3 seeds).
"""


import ml_collections

from cft_jax.config import base_config

METHODS = ("none", "lwf", "ewc", "mas", "osla", "dlcft_kfac", "dlcft_tkfac", "joint")



def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Sets ``method``, ``loss`` and ``model.linearize`` for one of :data:`METHODS` (in place).

  Raises:
    ValueError: unknown method.
  """
  if method not in METHODS + ("er", "der", "derpp", "dlcft"):
    raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
  name = {"none": "sequential", "dlcft_kfac": "dlcft", "dlcft_tkfac": "dlcft"}.get(method, method)
  c.method = ml_collections.ConfigDict({"name": name})
  c.model.linearize = "none"
  c.loss.name = "ce"
  c.loss.scope = "local"
  if name in ("ewc", "mas", "osla", "dlcft"):
    c.method.weighting = "dlcft"      # (1/t) L_data + ((t-1)/t) L_reg (eq. 11)
    c.method.strength = 1.0
    c.method.fisher_type = "mc"
    c.method.num_samples = 1
    c.method.curvature_batches = 4  # the curvature from 128 of the task's images
  if name == "lwf":
    c.method.temperature = 2.0
    c.method.weighting = "dlcft"
  if name == "osla":
    c.method.curvature = "kfac"
  if name == "dlcft":
    c.method.curvature = "kfac" if method == "dlcft_kfac" else "tkfac"
    c.model.linearize = "features"  # eqs. 6-7: g_lin(x; psi) W + b
    c.loss.name = "mse"
    c.loss.alpha = 15.0
    c.loss.scope = "all"
  return c


def get_config(arg: str = "dlcft_tkfac") -> ml_collections.ConfigDict:
  """``arg``: one of :data:`METHODS`."""
  c = base_config()
  c.scenario.type = "data_il"
  c.scenario.num_tasks = 10
  c.scenario.seed = 1993
  c.data.name = "fashion_mnist"
  c.data.image_size = 32
  c.data.train_limit = 300
  c.data.test_limit = 2000
  c.data.augment = "none"
  c.model.name = "efficientnet_lite0"
  c.model.pretrained = True
  c.peft.name = "full"            # the whole backbone fine-tunes (BatchNorm statistics frozen)
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 0.0
  c.train.epochs = 2
  c.train.batch_size = 32
  c.train.log_every = 5
  c.eval.batch_size = 250
  c.checkpoint.max_to_keep = 2  # a full Lite0 + K-FAC factors is ~80 MB per checkpoint
  return apply_method(c, arg or "dlcft_tkfac")
