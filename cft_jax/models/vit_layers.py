"""Layers of the Vision Transformer (:mod:`cft_jax.models.vit`): memory-lean GELU / LayerNorm /
softmax, attention with the PEFT modules of a block (LoRA on ``q, k, v, o``, prefix), the MLP and
the pre-LN encoder block. Parameter names are those of the augreg checkpoints (see
:mod:`cft_jax.models.vit`).

PEFT wiring (one :class:`cft_jax.peft.spec.PeftSpec` per block, ``name='none'`` off the PEFT
blocks): LoRA ``y = x W + b + (alpha / r) s (x A) B`` on the flattened head axes (Hu et al. 2021,
eq. 3; ``s`` LAE's learnable scalar, init 1); adapters (:class:`cft_jax.peft.adapter.Adapter`)
parallel to attention or MLP; LAE's compensated prefix (:mod:`cft_jax.peft.prefix`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cft_jax.peft.adapter import Adapter
from cft_jax.peft.lora import dense_last_axis, lora_a_init
from cft_jax.peft.prefix import Prefix, prefix_attention
from cft_jax.peft.spec import NO_PEFT, PeftSpec

__all__ = ["LORA_TARGETS", "gelu_tanh", "layer_norm", "softmax", "attention", "LayerNorm",
           "LoRADenseGeneral", "Dense", "MultiHeadDotProductAttention", "MlpBlock",
           "Encoder1DBlock"]

# LoRA target letter -> attention sub-module name in the checkpoint layout.
LORA_TARGETS = {"q": "query", "k": "key", "v": "value", "o": "out"}


# --------------------------------------------------------------------------------- layers
#
# Memory-lean nonlinearities. Plain autodiff of tanh-GELU, LayerNorm and softmax keeps every
# intermediate of their derivatives for the backward pass (5 [N, M] arrays per GELU, 4 [N, D] per
# LayerNorm, 2 [H, N, N] per softmax; ``jax.ad_checkpoint.print_saved_residuals``). With a
# ``custom_jvp`` whose tangent is a product with what is saved (GELU: ``g'(x)``; LayerNorm:
# ``x_hat`` and ``1/sigma``; softmax: its output) a ViT-Ti/4 train step at 32 px, batch 64 needs
# less memory (XLA's peak: full fine-tuning 1153 -> 998 MiB, LoRA 1184 -> 943 MiB) and runs ~5-10%
# faster on the CPU (``benchmarks/step_throughput.py``). Values are those of ``nn.gelu`` /
# ``nn.LayerNorm`` / ``jax.nn.softmax``; jvp (linearized models), grad, vmap and higher orders
# work as before (the rules are differentiable; checked against plain autodiff in float64).

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """``nn.gelu(x, approximate=True)`` whose derivative saves one array (``g'(x)``)."""
  return nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  x3 = x ** 3
  th = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x3))
  cdf = 0.5 * (1.0 + th)
  y = x * cdf
  d = cdf + 0.5 * x * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
  return y, t * d.astype(t.dtype)


def _is_zero(t) -> bool:
  return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _ln_stats(x, eps):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, -1, keepdims=True)
  var = jnp.maximum(jnp.mean(xf * xf, -1, keepdims=True) - mean * mean, 0.0)  # flax's fast var
  return xf - mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis, as ``nn.LayerNorm`` (float32 statistics), whose derivative
  saves ``x_hat`` and ``1/sigma`` only."""
  xc, rstd = _ln_stats(x, eps)
  return (xc * (rstd * scale) + bias).astype(x.dtype)


def _layer_norm_jvp(eps, primals, tangents):
  x, scale, bias = primals
  tx, tscale, tbias = tangents
  xc, rstd = _ln_stats(x, eps)
  y = (xc * (rstd * scale) + bias).astype(x.dtype)
  xhat = xc * rstd
  dy = None
  if not _is_zero(tx):
    txf = tx.astype(xhat.dtype)
    txc = txf - jnp.mean(txf, -1, keepdims=True)
    dy = (rstd * (txc - xhat * jnp.mean(txf * xhat, -1, keepdims=True))) * scale
  if not _is_zero(tscale):
    dy = xhat * tscale if dy is None else dy + xhat * tscale
  if not _is_zero(tbias):
    dy = jnp.broadcast_to(tbias, y.shape) if dy is None else dy + tbias
  if dy is None:
    dy = jnp.zeros_like(y)
  return y, dy.astype(y.dtype)


layer_norm.defjvp(_layer_norm_jvp, symbolic_zeros=True)


@jax.custom_jvp
def softmax(z: jax.Array) -> jax.Array:
  """``jax.nn.softmax(z, axis=-1)`` whose derivative saves its output only."""
  e = jnp.exp(z - jax.lax.stop_gradient(jnp.max(z, -1, keepdims=True)))
  return e / jnp.sum(e, -1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
  (z,), (t,) = primals, tangents
  y = softmax(z)
  return y, y * (t - jnp.sum(y * t, -1, keepdims=True))


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Softmax attention ``q [B,Q,H,Dh], k, v [B,K,H,Dh] -> (out [B,Q,H,Dh], weights
  [B,H,Q,K])``: :func:`cft_jax.peft.prefix.dot_product_attention` (float32 logits and softmax)
  with the memory-lean :func:`softmax`."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  w = softmax(logits)
  return jnp.einsum("bhqk,bkhd->bqhd", w.astype(v.dtype), v), w


class LayerNorm(nn.Module):
  """``nn.LayerNorm`` (same ``scale``/``bias`` parameters, eps 1e-6 here) computed by
  :func:`layer_norm`."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    return layer_norm(jnp.asarray(x, self.dtype), scale, bias, self.epsilon).astype(self.dtype)



class LoRADenseGeneral(nn.Module):
  """Dense layer contracting the last ``in_axes`` axes, with optional LoRA on the flattened axes.

  ``x [..., *in_shape] -> y [..., *features]``; ``kernel [*in_shape, *features]``,
  ``bias [*features]``. With ``lora_rank = r > 0``::

      y = x W + b + (alpha / r) * lora_scale * (x lora_a) lora_b,
      lora_a [prod(in), r], lora_b [r, prod(out)]

  ``lora_a`` Kaiming-uniform (a = sqrt(5)), ``lora_b`` zero, ``lora_scale`` learnable, init 1
  (LAE's ``Scaler``); ``alpha / r`` is the fixed LoRA scale of Hu et al. 2021, eq. 3
  (``lora_alpha = None``: ``alpha = r``, scale 1).
  """

  features: Tuple[int, ...]
  in_axes: int = 1
  lora_rank: int = 0
  lora_alpha: Optional[float] = None
  kernel_init: Any = nn.initializers.xavier_uniform()
  bias_init: Any = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    in_shape = tuple(x.shape[x.ndim - self.in_axes:])
    lead = x.shape[:x.ndim - self.in_axes]
    n_in, n_out = math.prod(in_shape), math.prod(features)

    def kernel_init(key, shape, dtype=jnp.float32):  # fans of the flattened matrix (DenseGeneral)
      return self.kernel_init(key, (n_in, n_out), dtype).reshape(shape)

    kernel = self.param("kernel", kernel_init, in_shape + features, jnp.float32)
    bias = self.param("bias", self.bias_init, features, jnp.float32)
    xf = x.reshape(lead + (n_in,)).astype(self.dtype)
    y = dense_last_axis(xf, kernel.reshape(n_in, n_out).astype(self.dtype))
    if self.lora_rank > 0:
      a = self.param("lora_a", lora_a_init, (n_in, self.lora_rank), jnp.float32)
      b = self.param("lora_b", nn.initializers.zeros, (self.lora_rank, n_out), jnp.float32)
      s = self.param("lora_scale", nn.initializers.ones, (), jnp.float32)
      if self.lora_alpha:
        s = s * (float(self.lora_alpha) / self.lora_rank)
      y = y + s.astype(self.dtype) * dense_last_axis(dense_last_axis(xf, a.astype(self.dtype)),
                                                     b.astype(self.dtype))
    y = y + bias.reshape(n_out).astype(self.dtype)
    return y.reshape(lead + features)


class Dense(nn.Dense):
  """``nn.Dense`` (a subclass: same fields, parameters, init order and values; layer taps that
  look for ``nn.Dense``, e.g. K-FAC, still see it) computed by
  :func:`cft_jax.peft.lora.dense_last_axis`, whose kernel gradient ``(dy^T x)^T`` keeps XLA's
  CPU backend from transposing the (large) cotangent ``dy``. Same values and derivatives (jvp,
  vjp, vmap, any order)."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = dense_last_axis(inputs, kernel)
    return y if bias is None else y + bias


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention ``[B, N, D] -> [B, N, D]`` with optional LoRA targets and prefix.

  Sows ``intermediates/attention_weights [B, H, N, K]`` when that collection is mutable
  (``K = N``, or ``L + N`` with a prefix: prefix keys first, see
  :func:`cft_jax.peft.prefix.prefix_attention`).
  """

  num_heads: int
  peft: PeftSpec = NO_PEFT  # this block's spec (``lora`` targets / ``prefix``; others ignored)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = self.num_heads
    if d % h:
      raise ValueError(f"width {d} is not divisible by num_heads {h}")
    dh = d // h

    def proj(target: str, features: Tuple[int, ...], in_axes: int) -> LoRADenseGeneral:
      rank = self.peft.lora_rank if target in self.peft.lora_targets else 0
      return LoRADenseGeneral(features, in_axes=in_axes, lora_rank=rank,
                              lora_alpha=self.peft.lora_alpha, dtype=self.dtype,
                              name=LORA_TARGETS[target])

    q = proj("q", (h, dh), 1)(x)
    k = proj("k", (h, dh), 1)(x)
    v = proj("v", (h, dh), 1)(x)
    if self.peft.module == "prefix":
      prefix = Prefix(num_heads=h, head_dim=dh, length=self.peft.prefix_length,
                      gate_init=self.peft.prefix_gate_init,
                      compensatory=self.peft.prefix_compensatory, name="prefix")
      pk, pv, gate = prefix()
      out, w = prefix_attention(q, k, v, pk, pv, gate, compensatory=prefix.compensatory)
    else:
      out, w = attention(q, k, v)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "attention_weights", w)
    return proj("o", (d,), 2)(out)


class MlpBlock(nn.Module):
  """``Dense_0 (D -> M) -> GELU (tanh approx.) -> Dense_1 (M -> D)`` with dropout."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    dense = lambda n, name: Dense(n, dtype=self.dtype, name=name,
                                  kernel_init=nn.initializers.xavier_uniform(),
                                  bias_init=nn.initializers.normal(stddev=1e-6))
    y = gelu_tanh(dense(self.mlp_dim, "Dense_0")(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1], "Dense_1")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block with the PEFT module of ``peft`` (this block's spec, see
  :meth:`cft_jax.peft.spec.PeftSpec.on_block`; ``name='none'``: no module)."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  peft: PeftSpec = NO_PEFT
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    y = LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
    a = MultiHeadDotProductAttention(self.num_heads, peft=self.peft, dtype=self.dtype,
                                     name="MultiHeadDotProductAttention_1")(y)
    a = nn.Dropout(self.dropout_rate)(a, deterministic=deterministic)
    adapter = self.peft.module == "adapter"
    if adapter and self.peft.adapter_position == "attn":
      a = a + Adapter(self.peft.adapter_hidden, dtype=self.dtype, name="adapter")(y)
    x = x + a
    y = LayerNorm(dtype=self.dtype, name="LayerNorm_2")(x)
    m = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype, name="MlpBlock_3")(
        y, deterministic)
    if adapter and self.peft.adapter_position == "mlp":
      m = m + Adapter(self.peft.adapter_hidden, dtype=self.dtype, name="adapter")(y)
    return x + m
