"""Robust fine-tuning study: FT vs L2-SP vs WiSE-FT vs TPGM vs FTP, single task.

Full fine-tuning (``peft.name=full``, the setting of TPGM / FTP) of an ImageNet EfficientNet-Lite0
on Fashion-MNIST (one task, all 10 classes, cross-entropy, Adam). Out-of-distribution data: the
Fashion-MNIST test images under corruptions (``eval.ood_corruptions``, severities 1-5, the
CIFAR-10-C parameter table of :mod:`cft_jax.data.corruptions`). No second dataset with
Fashion-MNIST's classes is installed here, so there is no natural-shift OOD set;
``--config.eval.ood_dataset=NAME`` evaluates one for users who have it (it must share the classes).

The argument after the colon is the method:

* ``ft``: vanilla full fine-tuning;
* ``l2sp``: FT + ``alpha/2 ||theta - theta_0||^2`` toward the pretrained weights (head excluded),
  ``method.l2sp_alpha`` 0.01;
* ``wise_ft``: the ``ft`` model evaluated at ``(1 - a) theta_0 + a theta`` with a = 0.5
  (``eval.wise_ft_alpha``, head kept). Trained exactly as ``ft`` (same seed, same steps), so the
  study reuses the ``ft`` checkpoint and only re-evaluates (``studies/robust_ft_study.py``);
  run on its own it re-trains the same model;
* ``tpgm``: TPGM (L2 norm, radii learnt every step, one Adam step of lr 1e-2 on a held-out
  validation batch; ``data.val_fraction`` 0.1 of the training images are held out);
* ``ftp``: FTP (MARS norm, k = 1, radius lr 1e-2).

Commands::

    python studies/robust_ft_study.py --seeds 0 1 2 --out docs/results      # the whole study
    python -m cft_jax.main --config configs/robust_ft.py:tpgm --workdir runs/rft_tpgm   # one run

Sizing: 32 px, 2000 training images (1800 for TPGM after the validation hold-out), 1000 test
images, OOD = 5 corruptions x severities 1-5 of those images, 1 epoch, batch 32, Adam lr 1e-4.
Hardware / wall time: the whole study (5 methods x seeds 0 1 2, one process) took 20.4 min on a
2-core CPU shared with two other jobs (load average 7-10); most of it is XLA compilation of the
first seed (``--jax-cache`` then makes seeds 1, 2 ~25-65 s per run).

Measured (``docs/results/robust_ft.md``; mean ± std over seeds 0 1 2, %):

    method          ID acc       OOD corruption mean   ID - OOD drop
    FT              73.1 ± 4.7   64.3 ± 4.6            8.7 ± 3.1
    L2-SP           72.6 ± 5.7   64.3 ± 5.3            8.3 ± 2.5
    WiSE-FT (0.5)   66.5 ± 4.9   62.5 ± 3.8            4.0 ± 1.1
    TPGM            72.9 ± 3.8   67.0 ± 2.7            5.8 ± 1.1
    FTP             74.7 ± 4.1   66.1 ± 4.0            8.7 ± 2.0

Paired by seed vs FT: TPGM OOD +2.7 ± 7.2 (2/3 seeds above) at ID -0.2, drop -2.9 ± 2.6
(mostly gaussian noise: 56.9 ± 1.9 vs FT 46.8 ± 15.0); FTP OOD +1.7 ± 0.7 (3/3 seeds) but ID
+1.7 ± 0.8, so its drop is unchanged. The papers' direction reproduces, not beyond the seed std.

The TPGM / FTP papers report, with CLIP ViT-B/16 on ImageNet, the average over
IN / IN-V2 / IN-A / IN-R / IN-Sketch of vanilla FT 63.58 vs TPGM 69.27, and on DomainNet with
CLIP ResNet-50 an OOD average of FT 33.17 vs TPGM 39.02: TPGM keeps more of the pretrained
model's robustness at similar in-distribution accuracy.
"""


import ml_collections

from cft_jax.config import base_config

METHODS = ("ft", "l2sp", "wise_ft", "tpgm", "ftp")
OOD_CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "pixelate", "jpeg_compression")



def get_config(arg: str = "ft") -> ml_collections.ConfigDict:
  """The robust fine-tuning config of method ``arg`` (one of ``METHODS``).

  Raises:
    ValueError: ``arg`` is not one of ``METHODS``.
  """
  name = (arg or "ft").strip()
  if name not in METHODS:
    raise ValueError(f"unknown robust fine-tuning method {name!r}; expected one of {METHODS}")
  c = base_config()
  # One task with every class: plain (non-continual) fine-tuning.
  c.scenario.num_tasks = 1
  c.data.image_size = 32
  c.data.train_limit = 2000
  c.data.test_limit = 1000
  c.data.val_fraction = 0.1 if name == "tpgm" else 0.0
  c.peft.name = "full"
  c.method.name = "sequential"
  c.method.projection = {"ft": "", "wise_ft": "", "l2sp": "l2sp", "tpgm": "tpgm",
                         "ftp": "ftp"}[name]
  c.method.projection_norm = ""   # tpgm: l2, ftp: mars (the papers' defaults)
  c.method.l2sp_alpha = 0.01
  c.method.proj_freq = 1
  c.method.max_iters = 1
  c.method.radius_lr = 1e-2
  c.method.ftp_k = 1.0
  c.loss = ml_collections.ConfigDict({"name": "ce"})
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-4
  c.train.epochs = 1
  c.train.batch_size = 32
  c.train.log_every = 5
  c.eval.wise_ft_alpha = 0.5 if name == "wise_ft" else 1.0
  c.eval.ood_corruptions = OOD_CORRUPTIONS
  c.eval.ood_severities = (1, 2, 3, 4, 5)
  c.eval.ood_dataset = ""
  return c
