"""Split Fashion-MNIST, 5 tasks x 2 classes, EfficientNet-Lite0 (ImageNet) + LoRA, aEPG.

Command (the README's main job):

    python -m cft_jax.main --config configs/default.py --workdir runs/default

Variants: ``--config.loss.name=ce`` (cross-entropy baseline), ``--config.data.name=image_folder
--config.data.root=DIR`` (any folder of JPGs), ``--config.train.epochs=3`` etc.

Measured on a 2-core CPU (see the README's results table for the numbers of this config).
"""

from cft_jax.config import base_config


def get_config(arg=None):
  """Returns the default experiment config (``arg`` unused): the library defaults."""
  del arg
  return base_config()
