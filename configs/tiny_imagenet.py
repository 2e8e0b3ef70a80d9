"""Split Tiny-ImageNet (tiny-imagenet-mini), 10 class-incremental tasks x 20 classes,
EfficientNet-Lite0 (ImageNet weights) + LoRA at 64 px: the task shape of Split ImageNet-R in the
LAE / aEPG papers (200 classes in 10 tasks of 20).

The argument after the colon is ``loss[,method]``, as in ``configs/cifar10.py``: loss one of the
objectives (``ce``, ``epg``, ``aepg``, ``entropy_penalty``, ``confidence_penalty``,
``label_smoothing``, ``focal``, ``reinforce``; hyper-parameters the aEPG paper's, see
``configs/objectives_study.py``), method ``sequential`` (default, seq-LoRA), ``lae``, or a
replay method on top of seq-LoRA: ``er`` / ``derpp`` (reservoir buffer of 500 images = 2.5 per
class, 32 replayed per step and term, CE over every seen class; DER++ alpha 0.1, beta 0.5), or
``dlcft`` (DLCFT's class-IL recipe on the LoRA parameters: linearized features, MSE, TK-FAC,
buffer 500, replay lambda 1/2; the loss of the argument is replaced by DLCFT's MSE). Commands::

    python -m cft_jax.main --config configs/tiny_imagenet.py:ce --workdir runs/tin_ce
    python -m cft_jax.main --config configs/tiny_imagenet.py:aepg,lae --workdir runs/tin_aepg_lae
    python studies/natural_images.py --dataset tiny_imagenet --study objectives --dry-run

Data: ``../shared/data/tiny-imagenet-mini`` beside the checkout (Tiny-ImageNet-200, Le & Yang
2015: 64x64 JPEG, ``train/<wnid>/`` 300 and ``test/<wnid>/`` 50 per class — the official
validation images; ``classes.tsv`` gives the WordNet names, which reach ``metrics.json`` and the
plots); ``$CFT_JAX_TINY_IMAGENET_MINI`` or ``--config.data.root=DIR`` points elsewhere. Class
order: ``scenario.seed`` 1993. Caveat to state with every result: Tiny-ImageNet's images come from
ImageNet's *training* set, on which the Lite0 weights were pretrained, so the frozen features
already separate these classes (ImageNet-R was built to avoid exactly that).

Budget (one run within ~5 min on the 2-core CPU, so a study of 10 seeds x 16 arms fits in a
few days of sessions): 64 px (the native size), all 6,000 training images per task of which
``data.val_fraction`` 0.1 (600, drawn with ``seed``) is the validation split used for tuning,
every test image (1,000 per task), 1 epoch per task (169 steps), batch 32, crop + flip, Adam lr
1e-3 reset per task, LoRA rank 4 on every 1x1 convolution, the local loss (the current task's
20 classes).

Measured on this project's 2-core AMD EPYC CPU (2026-12-06, other jobs sharing the cores, so
the wall times are upper bounds; a calibration run of the same 169 steps per task, alone on
the machine: 4 min 09 s), the study's pilot
runs of this file (``python studies/natural_images.py --dataset tiny_imagenet --study objectives
--phase pilot``, seeds 900 / 901; ``docs/results/tiny_imagenet_objectives_pilot.md``)::

    python -m cft_jax.main --config configs/tiny_imagenet.py:ce --workdir runs/tin_ce
      class-IL final 39.98 / 39.35, task-IL final 74.97 / 75.52 (chance: 0.5% / 5%);
      4 min 06 s - 5 min 19 s wall, peak RSS 1.36 GB
    python -m cft_jax.main --config configs/tiny_imagenet.py:aepg --workdir runs/tin_aepg
      class-IL final 38.47 / 36.89, task-IL final 75.21 / 75.08; 4 min 02 s - 5 min 00 s wall

(at the selected learning rate 1e-3; ``docs/results/tiny_imagenet_objectives_selected.json``).
Every task is learned: task-IL accuracy ~75% over 20 classes after the last task.
"""

import os

import ml_collections

from cft_jax.config import load_config_module

_NATURAL = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "_natural.py"), "cft_jax_config__natural")
METHODS = _NATURAL.METHODS
ENV_ROOT = "CFT_JAX_TINY_IMAGENET_MINI"


def default_root() -> str:
  """``$CFT_JAX_TINY_IMAGENET_MINI`` if set, else ``<checkout>/../shared/data/tiny-imagenet-mini``."""
  return _NATURAL.shared_root("tiny-imagenet-mini", ENV_ROOT)


def get_config(arg: str = "aepg") -> ml_collections.ConfigDict:
  """``arg = "loss[,method]"`` (defaults ``aepg``, ``sequential``); the shared settings of
  ``configs/_natural.py`` with 10 tasks of 20 classes and 1 epoch per task.

  Raises:
    ConfigError (a ValueError): an unknown loss or method in ``arg``.
  """
  c = _NATURAL.natural_config(arg, "configs/tiny_imagenet.py:aepg,lae", default_root(),
                              num_tasks=10)
  c.train.epochs = 1
  return c
