"""DLCFT comparison, class-incremental with a 500-sample buffer (DLCFT paper §4.2, Table 2).

Split Fashion-MNIST, 5 tasks x 2 classes. The argument picks the method: ``er``, ``der``,
``derpp``, ``dlcft`` (default; TK-FAC, replay ``lambda = 1/2``, eq. 14, head extension eq. 13),
``dlcft_kfac``, ``none`` or ``joint``. Command::

    python -m cft_jax.main --config configs/dlcft_class_il.py:dlcft \\
        --workdir runs/dlcft_class_il/dlcft --config.seed=0

The whole comparison (3 seeds): ``python studies/dlcft_study.py``.

Paper (Seq-CIFAR-100, 10 class-IL tasks, ResNet-18, buffer 500, class-IL accuracy): ER 43.52,
DER 58.07, DER++ 53.29, DLCFT 59.98 (task-IL: ER 79.14, DER 91.47, DER++ 91.56).

Setup here: 400 training and 1000 test images per task; pretrained EfficientNet-Lite0 at 32 px,
fully fine-tuned as in ``configs/dlcft_data_il.py`` but with the backbone at 0.1x the head's
learning rate (``optim.backbone_lr_scale``; Adam lr 1e-3 for the head), batch 32, 2 epochs per
task; reservoir buffer of 500 (images, labels, logits), 32 replayed examples per step. ER / DER
(alpha 0.3) / DER++ (alpha 0.1, beta 0.5) use CE over all outputs (as mammoth); DLCFT the
linearized feature extractor (eqs. 6-7), MSE over all outputs, ``(1/t) L_data + ((t-1)/t) L_reg``
with ``L_reg = 1/2 q(theta) + 1/2 E_M[MSE]`` (eq. 14) and the head extension (eq. 13).

Measured: ``docs/results/dlcft_class_il.md`` (``studies/dlcft_study.py``, 3 seeds).
"""

import os

import ml_collections

from cft_jax.config import load_config_module

METHODS = ("er", "der", "derpp", "dlcft", "dlcft_kfac", "none", "joint")


def _load(name):
  return load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))


def get_config(arg: str = "dlcft") -> ml_collections.ConfigDict:
  """``arg``: one of :data:`METHODS`.

  Raises:
    ValueError: unknown method.
  """
  method = arg or "dlcft"
  if method not in METHODS:
    raise ValueError(f"unknown method '{method}'; choose one of {METHODS}")
  c = _load("dlcft_data_il").get_config("none")
  c.scenario.type = "class_il"
  c.scenario.num_tasks = 5
  c.data.train_limit = 400
  c.data.test_limit = 1000
  # Class-IL changes the output layer's targets every task: at the head's rate (1e-3) the
  # fully fine-tuned backbone collapses within two tasks (ER: chance accuracy from task 3 on),
  # so the backbone learns 10x slower than the head.
  c.optim.backbone_lr_scale = 0.1
  _load("dlcft_data_il").apply_method(c, "dlcft_tkfac" if method == "dlcft" else method)
  if method in ("er", "der", "derpp", "none", "joint"):
    c.loss.scope = "all"  # mammoth: CE over every output
  if method in ("er", "der", "derpp", "dlcft", "dlcft_kfac"):
    c.method.buffer_size = 500
    c.method.replay_batch_size = 32
  if method in ("dlcft", "dlcft_kfac"):
    c.method.replay_lambda = 0.5
  if method == "der":
    c.method.alpha = 0.3
  if method == "derpp":
    c.method.alpha, c.method.beta = 0.1, 0.5
  return c
