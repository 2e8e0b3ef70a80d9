"""A tiny randomly initialised CNN for fast tests and smoke runs (no pretrained weights).

Two 3x3 convolutions with max-pooling, global average pooling, one :class:`LoRADense` hidden
layer and a ``head``. Not a backbone for real experiments.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cft_jax.peft import HEAD
from cft_jax.peft.lora import LoRADense
from cft_jax.peft.spec import NO_PEFT, PeftSpec


class TinyCNN(nn.Module):
  """``[B, H, W, 3]`` normalised images -> logits ``[B, num_classes]``.

  Attributes:
    num_classes: output units of ``head``.
    width: channels of the first conv (the second has ``2 * width``).
    peft: a :class:`cft_jax.peft.spec.PeftSpec`; ``lora`` puts LoRA (rank ``r``, scale
      ``alpha / r``) on the hidden dense layer and the second conv's 1x1 projection.
    dtype: computation dtype (parameters stay float32; logits are returned in ``dtype``).
  """

  num_classes: int = 10
  width: int = 8
  peft: PeftSpec = NO_PEFT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    del train
    x = jnp.asarray(x, self.dtype)
    x = nn.relu(nn.Conv(self.width, (3, 3), dtype=self.dtype, name="conv1")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3), dtype=self.dtype, name="conv2")(x))
    rank, alpha = self.peft.lora_rank, self.peft.lora_alpha
    x = LoRADense(2 * self.width, rank=rank, alpha=alpha, dtype=self.dtype, name="pointwise")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(LoRADense(4 * self.width, rank=rank, alpha=alpha, dtype=self.dtype, name="fc")(x))
    if return_features:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD)(x)
