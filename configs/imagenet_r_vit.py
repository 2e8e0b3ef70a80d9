"""ImageNet-R, 10 class-incremental tasks x 20 classes, ViT-B/16 (IN-21k) + PEFT (aEPG paper).

The argument after the colon picks ``peft,loss[,method]``: peft in {lora, adapter, prefix},
loss in {ce, aepg}, method in {sequential (default), lae}.

Checkpoint (``model.checkpoint``: the ``.npz`` or its folder; default ``$CFT_JAX_VIT_DIR`` or
``~/.cache/cft_jax/vit``), either published ViT-B/16 ImageNet-21k file:

- augreg (Steiner et al. 2022; the aEPG paper's upstream), ``model.checkpoint_format=augreg``:
  ``wget https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz``
- the original i21k ViT (Dosovitskiy et al. 2021; the L2P / LAE upstream), with ``pre_logits``,
  ``model.checkpoint_format=i21k`` (``model.pre_logits=drop`` as vit_jax fine-tunes it, or
  ``keep``): ``wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz``

``auto`` (default) detects the layout from the file. Data: ``data.name=imagenet_r`` with
``data.root`` the extracted https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar
(``imagenet-r/<wnid>/*.jpg``) or a tfds data_dir with ``imagenet_r`` prepared; the 80/20
train / test split is drawn per class with ``data.split_seed`` (see ``cft_jax/data/datasets.py``;
``data.train_list`` / ``data.test_list`` replay a published file list). Images are streamed
(grain, ``data.workers`` processes): RandomResizedCrop + flip of the original image for
training, resize to 256 + centre crop 224 for testing. Commands (GPU machine)::

    python -m cft_jax.main --config configs/imagenet_r_vit.py:lora,ce --workdir runs/inr_lora_ce \\
        --config.data.root=DIR --config.seed=0
    python -m cft_jax.main --config configs/imagenet_r_vit.py:lora,aepg --workdir runs/inr_lora_aepg ...
    python -m cft_jax.main --config configs/imagenet_r_vit.py:adapter,aepg ...
    python -m cft_jax.main --config configs/imagenet_r_vit.py:prefix,aepg ...
    python -m cft_jax.main --config configs/imagenet_r_vit.py:lora,aepg,lae ...

Paper numbers (aEPG paper, ImageNet-R 10 tasks, final acc A_10 / avg incremental acc, 5 seeds):

    =================  ============  ============
    PEFT               CE            aEPG
    =================  ============  ============
    LoRA (sequential)  74.1 / 79.3   75.5 / 80.9   (EPG 75.1 / 80.0, EP 75.1 / 80.4)
    Adapter            73.7 / 79.4   75.4 / 81.3
    Prefix             73.5 / 77.8   75.2 / 79.2
    LAE                75.4 / 79.9   76.7 / 81.4
    =================  ============  ============

Setup mirrored from the paper: PEFT on blocks 0-4 (LoRA rank 4 on K and V with a learnable scale;
Adapter hidden 5 parallel to attention, up-projection zero; Prefix length 10), incremental head
N(0, 0.001), local loss on the current task's classes, Adam lr 5e-4, batch 256, no weight decay,
50 epochs per task, RandomResizedCrop(0.05, 1) + flip at 224 px, LAE EMA decay 0.999.
*(inferred)* the PEFT module LAE wraps is LoRA unless the argument says otherwise; the optimiser is
re-initialised at every task; aEPG's T counts the steps of the current task.
Not trained to convergence on this project's CPU machines (no ImageNet-R or weights offline); a
smoke test runs every combination with a tiny ViT, and ``tests/test_paper_path.py`` runs this
config with ViT-B/16 at 224 px (random weights in both published layouts) on a generated
ImageNet-R folder for 2 tasks x 2 steps.
"""


import ml_collections

from cft_jax.config import base_config, parse_config_arg



PEFTS = ("lora", "adapter", "prefix")
LOSSES = ("ce", "aepg", "epg", "entropy_penalty")
METHODS = ("sequential", "lae")


def get_config(arg: str = "lora,aepg") -> ml_collections.ConfigDict:
  """``arg = "peft,loss[,method]"``.

  Raises:
    ValueError: an unknown peft / loss / method in ``arg``.
  """
  peft, loss, method = parse_config_arg(
      arg, [("peft", PEFTS, "lora"), ("loss", LOSSES, "aepg"), ("method", METHODS, "sequential")],
      "configs/imagenet_r_vit.py:lora,aepg,lae")
  c = base_config()
  c.scenario.num_tasks = 10
  c.scenario.seed = 1993
  c.data.name = "imagenet_r"      # seeded 80/20 split per class (data.split_seed)
  c.data.root = ""
  c.data.pipeline = "grain"       # streamed: decode + RandomResizedCrop on the host
  c.data.workers = -1             # one grain worker process per CPU core
  c.data.test_crop_fraction = 0.875  # test: resize to 256, centre crop 224
  c.data.image_size = 224
  c.data.train_limit = 0
  c.data.test_limit = 0
  c.data.augment = "rrc_flip"
  c.data.rrc_scale = (0.05, 1.0)
  c.model.name = "vit_b16"
  c.model.pretrained = True
  c.model.head_init_std = 1e-3
  c.model.checkpoint_format = "auto"  # augreg B_16-i21k-300ep-...npz or i21k ViT-B_16.npz
  c.peft.name = peft
  c.peft.rank = 4
  c.peft.blocks = (0, 1, 2, 3, 4)
  c.peft.lora_targets = ("k", "v")
  c.peft.adapter_hidden = 5
  c.peft.adapter_position = "attn"
  c.peft.prefix_length = 10
  c.method.name = method
  c.method.ema_decay = 0.999
  c.loss.name = loss
  c.loss.schedule = "sigmoid"
  c.loss.tau = 6.0
  c.optim.name = "adam"
  c.optim.learning_rate = 5e-4
  c.optim.weight_decay = 0.0
  c.train.epochs = 50
  c.train.batch_size = 256
  c.train.log_every = 20
  c.eval.batch_size = 256
  return c
