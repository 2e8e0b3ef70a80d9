"""Bottleneck adapters (Houlsby et al. 2019; parallel form: He et al. 2022, LAE / Gao et al. 2023).

The adapter is a small bottleneck on the last axis of its input::

    adapter(x) = s * up(act(down(x)))        x [..., D] -> [..., D_out]

with ``down: D -> h`` (Kaiming-uniform, a = sqrt(5), as ``nn.Linear``'s default and the LAE code;
bias 0), ``act`` the exact GELU, ``up: h -> D_out`` with kernel AND bias zero, and a learnable
scalar ``s`` (init 1.0; LAE's ``Scaler(None)``). Because ``up`` starts at zero the adapter output
is exactly zero at initialisation, so the adapted network equals the pretrained one.

How it is wired is the caller's choice; the module returns the branch only (``residual=False``):

- parallel to attention (the aEPG paper's setup): ``x + attn(LN(x)) + adapter(LN(x))``;
- parallel to the MLP: ``x + mlp(LN(x)) + adapter(LN(x))``;
- sequential (``residual=True``): ``x + adapter(x)``.

It works on the last axis of any rank (``[B, D]`` tokens, ``[B, N, D]`` sequences, ``[B, H, W, C]``
feature maps — there it is a pair of 1x1 convolutions).

Trainable parameters (every leaf path contains ``adapter``, see :func:`cft_jax.peft.is_trainable`)::

    adapter_down/kernel [D, h]   adapter_down/bias [h]
    adapter_up/kernel   [h, D]   adapter_up/bias   [D]     (D_out = D)
    adapter_scale       []       (only if ``learnable_scale``)

so ``D*h + h + h*D + D (+ 1)`` per adapter (:func:`adapter_param_count`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cft_jax.peft.lora import lora_a_init

__all__ = ["Adapter", "adapter_param_count", "ADAPTER_POSITIONS"]

ADAPTER_POSITIONS = ("attn", "mlp")

# Exact (erf) GELU, as torch.nn.GELU() in the LAE reference code.
exact_gelu: Callable[[jax.Array], jax.Array] = functools.partial(nn.gelu, approximate=False)


def adapter_param_count(features: int, hidden: int, *, out_features: Optional[int] = None,
                        learnable_scale: bool = True) -> int:
  """Closed-form number of trainable scalars of one :class:`Adapter` (biases included)."""
  out = features if out_features is None else out_features
  return features * hidden + hidden + hidden * out + out + (1 if learnable_scale else 0)


class Adapter(nn.Module):
  """Bottleneck adapter ``s * up(act(down(x)))`` on the last axis (zero output at init).

  Attributes:
    hidden: bottleneck width ``h`` (paper: 5).
    out_features: output width; ``None``: same as the input's last axis.
    activation: nonlinearity between the projections (exact GELU).
    learnable_scale: learn the scalar ``s`` (init ``scale_init``); else ``s = scale_init`` fixed.
    scale_init: initial / fixed value of ``s``.
    residual: return ``x + adapter(x)`` (sequential adapter) instead of the branch alone.
    dtype: computation dtype (parameters stay float32).
  """

  hidden: int = 5
  out_features: Optional[int] = None
  activation: Callable[[jax.Array], jax.Array] = exact_gelu
  learnable_scale: bool = True
  scale_init: float = 1.0
  residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [..., D] -> [..., D_out]``.

    Raises:
      ValueError: ``residual=True`` with ``out_features`` different from ``D``.
    """
    features = x.shape[-1]
    out = features if self.out_features is None else self.out_features
    if self.residual and out != features:
      raise ValueError(f"residual adapter needs out_features == input width {features}, got {out}")
    h = nn.Dense(self.hidden, kernel_init=lora_a_init, bias_init=nn.initializers.zeros,
                 dtype=self.dtype, param_dtype=jnp.float32, name="adapter_down")(x)
    h = self.activation(h)
    y = nn.Dense(out, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                 dtype=self.dtype, param_dtype=jnp.float32, name="adapter_up")(h)
    if self.learnable_scale:
      s = self.param("adapter_scale", nn.initializers.constant(self.scale_init), (), jnp.float32)
    else:
      s = self.scale_init
    y = y * jnp.asarray(s, y.dtype)
    return x + y if self.residual else y
