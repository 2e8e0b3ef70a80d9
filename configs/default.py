"""Split Fashion-MNIST, 5 tasks x 2 classes, EfficientNet-Lite0 (ImageNet) + LoRA, aEPG.

Command (the README's main job):

    python -m cft_jax.main --config configs/default.py --workdir runs/default

Variants: ``--config.loss.name=ce`` (cross-entropy baseline), ``--config.data.name=image_folder
--config.data.root=DIR`` (any folder of JPGs), ``--config.train.epochs=3`` etc.

Measured on a 2-core CPU (see the README's results table for the numbers of this config).
"""

import ml_collections


def get_config(arg=None):
  """Returns the default experiment config (``arg`` unused)."""
  del arg
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
  c.train.plots = True           # write PNG plots into the workdir at the end
  c.train.verbose = True         # print the accuracy matrix after every task

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
  return c
