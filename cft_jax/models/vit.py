"""Vision Transformer (Dosovitskiy et al. 2021) in flax.linen, with LoRA / Adapter / Prefix tuning.

The parameter tree is the one of the public augreg ``.npz`` checkpoints (Steiner et al. 2021,
"How to train your ViT?"; google-research/vision_transformer ``vit_jax/models_vit.py``), so they
load key by key::

    embedding/{kernel [p,p,3,D], bias [D]}        cls [1,1,D]
    Transformer/posembed_input/pos_embedding [1, N+1, D]          (N = (S/p)^2 patches)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias} [D]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/
        kernel [D,H,Dh]  bias [H,Dh]
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/{kernel [H,Dh,D], bias [D]}
    Transformer/encoderblock_{i}/LayerNorm_2/{scale,bias}
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/{kernel [D,M], bias}  .../Dense_1 [M,D]
    Transformer/encoder_norm/{scale,bias}
    pre_logits/{kernel,bias}   (only with ``representation_size``)
    head/{kernel [D,C], bias [C]}   (top-level; the incremental classifier, N(0, head_init_std))

Block: ``x = x + attn(LN_0(x)); x = x + mlp(LN_2(x))`` (pre-LN), LayerNorm eps 1e-6, MLP with
flax's (tanh-approximate) GELU as in the code that trained the checkpoints, classifier on the
``cls`` token after ``encoder_norm``. Inputs: RGB ``[B, S, S, 3]`` normalised as
``(x - MEAN) / STD`` (augreg: pixels to ``[-1, 1]``).

PEFT (the aEPG paper's setup; one :class:`cft_jax.peft.spec.PeftSpec` field ``peft``, applied
to the blocks in ``peft.blocks`` only, default 0-4; indices
``>= depth`` are ignored so the paper default also works on the 2-layer ``tiny`` variant):

- ``lora``: on any of ``q, k, v, o`` (default ``k, v``), per projection
  ``y = x W + b + s (x A) B`` on the flattened head axes: ``lora_a [D_in, r]`` Kaiming-uniform
  (:data:`cft_jax.peft.lora.lora_a_init`), ``lora_b [r, D_out]`` zero, learnable ``lora_scale``
  (init 1; LAE's ``Scaler(None)``) times the fixed ``peft.alpha / r`` (Hu et al. 2021, eq. 3; unset
  alpha: 1): ``r (D_in + D_out) + 1`` trainable scalars per target, with
  ``D_in = D_out = D`` for all four targets.
- ``adapter``: :class:`cft_jax.peft.adapter.Adapter` (hidden 5) parallel to attention
  (``x + attn(LN(x)) + adapter(LN(x))``) or to the MLP, zero up-projection.
- ``prefix``: :class:`cft_jax.peft.prefix.Prefix` (length 10) on the attention's keys and values,
  LAE's compensated form with a zero-init gate (exactly the frozen model at init; see that module).

At zero PEFT init every variant computes exactly the frozen model (tested). Trainable leaves are
selected by path (``lora`` / ``adapter`` / ``prefix`` + ``head``, :mod:`cft_jax.peft`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cft_jax.peft import HEAD, is_head
from cft_jax.peft.adapter import ADAPTER_POSITIONS, Adapter, adapter_param_count
from cft_jax.peft.lora import dense_last_axis, lora_a_init
from cft_jax.peft.prefix import Prefix, prefix_attention, prefix_param_count
from cft_jax.peft.spec import NO_PEFT, PeftSpec

__all__ = [
    "MEAN", "STD", "VARIANTS", "ViTSpec", "PEFT_NAMES", "PAPER_PEFT_BLOCKS", "AUGREG_FILES",
    "VisionTransformer", "Dense", "LoRADenseGeneral", "MultiHeadDotProductAttention",
    "Encoder1DBlock", "peft_param_count", "resample_posemb", "init_leaves", "load_pretrained",
    "load_npz", "save_npz", "pretrained_path", "build", "detect_checkpoint_format",
    "I21K_FILES",
]

# Input normalisation of the augreg checkpoints: x = (rgb_0_255 - MEAN) / STD, in [-1, 1].
MEAN = 127.5
STD = 127.5

PEFT_NAMES = ("none", "lora", "adapter", "prefix")
PAPER_PEFT_BLOCKS = (0, 1, 2, 3, 4)
# LoRA target letter -> attention sub-module name in the checkpoint layout.
LORA_TARGETS = {"q": "query", "k": "key", "v": "value", "o": "out"}
PEFT_KEYWORDS = ("lora", "adapter", "prefix")


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Architecture of a variant: width ``D``, ``depth`` blocks, ``heads`` H, MLP width, patch."""

  hidden: int
  depth: int
  heads: int
  mlp: int
  patch: int


VARIANTS: Dict[str, ViTSpec] = {
    "ti16": ViTSpec(192, 12, 3, 768, 16),
    "s16": ViTSpec(384, 12, 6, 1536, 16),
    "b16": ViTSpec(768, 12, 12, 3072, 16),
    # Patch-4 variants for 32 px inputs (64 patches), randomly initialised.
    "ti4": ViTSpec(192, 12, 3, 768, 4),
    "s4": ViTSpec(384, 12, 6, 1536, 4),
    "tiny": ViTSpec(32, 2, 2, 128, 4),  # tests and smoke runs
}

# Public augreg ImageNet-21k checkpoints (upstream models of the paper setup; no pre_logits).
AUGREG_URL = "https://storage.googleapis.com/vit_models/augreg/"
AUGREG_FILES: Dict[str, str] = {
    "ti16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "s16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "b16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
}
# The original ImageNet-21k checkpoints (Dosovitskiy et al. 2021; the upstream of L2P / LAE),
# with a ``pre_logits`` Dense(768) + tanh between ``encoder_norm`` and the 21,843-way head.
I21K_URL = "https://storage.googleapis.com/vit_models/imagenet21k/"
I21K_FILES: Dict[str, str] = {"b16": "ViT-B_16.npz"}
CHECKPOINT_FORMATS = ("auto", "augreg", "i21k")


def _is_peft_key(key: str) -> bool:
  return any(w in key for w in PEFT_KEYWORDS)


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


class AddPositionEmbs(nn.Module):
  """Adds the learned ``pos_embedding [1, N+1, D]`` (shape fixed at init by the input)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                    (1, x.shape[1], x.shape[2]), jnp.float32)
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """``Transformer``: position embeddings, ``encoderblock_{i}``, ``encoder_norm``.

  Fields mirror :class:`VisionTransformer` (which see).
  """

  variant: str
  peft: PeftSpec = NO_PEFT
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    spec = VARIANTS[self.variant]
    x = AddPositionEmbs(dtype=self.dtype, name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    # remat: only each block's input is kept for the backward pass; the block is recomputed.
    block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
    for i in range(spec.depth):
      x = block_cls(
          num_heads=spec.heads, mlp_dim=spec.mlp, dropout_rate=self.dropout_rate,
          peft=self.peft.on_block(i), dtype=self.dtype, name=f"encoderblock_{i}")(x, deterministic)
    return LayerNorm(dtype=self.dtype, name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """ViT classifier ``x [B, S, S, 3] -> logits [B, num_classes]`` (float32).

  Attributes:
    variant: one of :data:`VARIANTS` (``ti16, s16, b16, ti4, s4, tiny``).
    num_classes: width ``C`` of the ``head``.
    peft: a :class:`cft_jax.peft.spec.PeftSpec` (``name``: ``none | lora | adapter | prefix``;
      ``linear_probe``/``full`` carry no module): blocks (paper: 0-4), LoRA rank ``r``
      (paper: 4), ``alpha`` (LoRA update scaled by ``alpha / r`` times a learnable scalar,
      init 1), targets among ``q, k, v, o`` (paper: ``k, v``), adapter bottleneck (paper: 5)
      and position (``attn``, paper, or ``mlp``), prefix length (paper: 10), gate and form.
    head_init_std: head kernel ``N(0, head_init_std)``, bias 0 (aEPG paper: 0.001).
    representation_size: optional ``pre_logits`` Dense + tanh before the head (old i21k ckpts).
    dropout_rate: dropout in the encoder (vit_jax placement); 0 for fine-tuning.
    head_dropout_rate: dropout on the features before the head (training only).
    remat: rematerialise every block in the backward pass (``nn.remat``: only the block inputs
      are saved, each block's forward runs again during backpropagation). Trades ~1/3 more
      compute for far less activation memory: what PEFT needs to fit large batches, since its
      gradient still flows down to block 0 (``benchmarks/step_throughput.py``). Same values and
      gradients; parameter names unchanged.
    dtype: computation dtype; parameters are float32, logits are returned in float32.
  """

  variant: str = "b16"
  num_classes: int = 1000
  peft: PeftSpec = NO_PEFT
  head_init_std: float = 1e-3
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  head_dropout_rate: float = 0.0
  remat: bool = False
  dtype: Any = jnp.float32

  @property
  def spec(self) -> ViTSpec:
    return VARIANTS[self.variant]

  def validate(self) -> None:
    """Raises ValueError for an unknown variant / peft / target / position or a bad size."""
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown ViT variant {self.variant!r}; one of {sorted(VARIANTS)}")
    p = self.peft
    if not isinstance(p, PeftSpec):
      raise ValueError(f"ViT peft must be a cft_jax.peft.PeftSpec, got {p!r}")
    if p.module not in PEFT_NAMES or p.name not in PEFT_NAMES + ("linear_probe", "full"):
      raise ValueError(f"unknown ViT peft {p.name!r}; one of {list(PEFT_NAMES)}")
    bad = [t for t in p.lora_targets if t not in LORA_TARGETS]
    if bad:
      raise ValueError(f"unknown lora_targets {bad}; a subset of {list(LORA_TARGETS)}")
    if p.adapter_position not in ADAPTER_POSITIONS:
      raise ValueError(f"adapter_position {p.adapter_position!r} not in {ADAPTER_POSITIONS}")
    if any(b < 0 for b in p.blocks):
      raise ValueError(f"peft blocks must be >= 0, got {p.blocks}")
    sizes = {"lora": ("rank", p.rank), "adapter": ("adapter_hidden", p.adapter_hidden),
             "prefix": ("prefix_length", p.prefix_length)}
    if p.module in sizes and sizes[p.module][1] <= 0:
      raise ValueError(f"peft={p.name!r} needs {sizes[p.module][0]} > 0")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False
               ) -> jax.Array:
    """Logits ``[B, num_classes]``, or the ``cls`` features ``[B, D]`` (after ``encoder_norm``
    and ``pre_logits`` if any) with ``return_features``.

    Args:
      x: normalised images ``[B, H, W, 3]``; ``H, W`` multiples of the patch size and the same
        as at init (the position embeddings fix the grid; see :func:`load_npz` to resize).
      train: enables dropout (needs a ``dropout`` rng when a rate is > 0).

    Raises:
      ValueError: bad configuration or image size not divisible by the patch size.
    """
    self.validate()
    spec = self.spec
    b, hh, ww, _ = x.shape
    p = spec.patch
    if hh % p or ww % p:
      raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(spec.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding")(x)
    x = x.reshape(b, -1, spec.hidden)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, spec.hidden), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, spec.hidden)), x], axis=1)
    x = Encoder(self.variant, peft=self.peft, dropout_rate=self.dropout_rate, remat=self.remat,
                dtype=self.dtype, name="Transformer")(x, deterministic=not train)
    x = x[:, 0]
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x))
    if return_features:
      return x
    deterministic = not (train and self.head_dropout_rate > 0 and self.has_rng("dropout"))
    x = nn.Dropout(self.head_dropout_rate)(x, deterministic=deterministic)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD,
                      kernel_init=nn.initializers.normal(stddev=self.head_init_std),
                      bias_init=nn.initializers.zeros)(x)
    return logits.astype(jnp.float32)


def peft_param_count(module: VisionTransformer) -> int:
  """Closed-form number of PEFT scalars (head excluded) of ``module``.

  Per configured block: LoRA ``len(targets) * (r (D + H Dh) + 1)``; adapter
  ``D h + h + h D + D + 1`` (biases and the learnable scale included); prefix
  ``2 L D + 2 + 1`` (key/value scales and the gate; ``+ 2`` without gate).
  """
  module.validate()
  s = module.spec
  p = module.peft
  blocks = len({b for b in p.blocks if b < s.depth})
  dh = s.hidden // s.heads
  if p.module == "lora":
    per = len(set(p.lora_targets)) * (p.rank * (s.hidden + s.heads * dh) + 1)
  elif p.module == "adapter":
    per = adapter_param_count(s.hidden, p.adapter_hidden)
  elif p.module == "prefix":
    per = prefix_param_count(p.prefix_length, s.heads, dh, gate=p.prefix_gate_init is not None)
  else:
    per = 0
  return blocks * per


# -------------------------------------------------------------------------------- weights


def resample_posemb(posemb: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """Position embeddings for another patch grid ("high-res fine-tuning", big_vision /
  vit_jax ``resample_posemb``): the ``cls`` token's embedding is kept, the ``g x g`` grid of
  patch embeddings is resized bilinearly to ``grid`` (``jax.image.resize``, half-pixel centres,
  antialiased when shrinking; the reference uses ``scipy.ndimage.zoom(order=1)``, which differs
  only in the placement of sample points).

  Args:
    posemb: ``[1, 1 + g*g, D]``.
    grid: new ``(gh, gw)``.

  Returns:
    ``[1, 1 + gh*gw, D]`` float32.

  Raises:
    ValueError: the old number of patch tokens is not a square.
  """
  posemb = np.asarray(posemb, np.float32)
  tok, old = posemb[:, :1], posemb[0, 1:]
  g = int(round(math.sqrt(old.shape[0])))
  if g * g != old.shape[0]:
    raise ValueError(f"pos_embedding has {old.shape[0]} patch tokens, not a square grid")
  gh, gw = grid
  if (g, g) == (gh, gw):
    return posemb
  new = jax.image.resize(jnp.asarray(old.reshape(g, g, -1)), (gh, gw, old.shape[-1]),
                         method="bilinear")
  return np.concatenate([tok, np.asarray(new, np.float32).reshape(1, gh * gw, -1)], axis=1)


_BV_RENAMES = (("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"),
               ("LayerNorm_1", "LayerNorm_2"), ("MlpBlock_0", "MlpBlock_3"))


def _normalise_checkpoint(ckpt: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Strips ``opt/target/`` or ``params/`` prefixes; maps big_vision names (``pos_embedding``,
  ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``, scanned
  ``encoderblock/`` stacks) to the vit_jax names used here."""
  for pre in ("opt/target/", "params/"):
    if ckpt and all(k.startswith(pre) for k in ckpt):
      ckpt = {k[len(pre):]: v for k, v in ckpt.items()}
  if any("MlpBlock_0" in k for k in ckpt):  # big_vision naming
    out = {}
    for k, v in ckpt.items():
      if k == "pos_embedding":
        k = "Transformer/posembed_input/pos_embedding"
      for old, new in _BV_RENAMES:
        k = k.replace(f"/{old}/", f"/{new}/")
      out[k] = v
    ckpt = out
  scanned = [k for k in ckpt if k.startswith("Transformer/encoderblock/")]
  if scanned:  # big_vision scan_layers: leading axis = block
    out = {k: v for k, v in ckpt.items() if k not in scanned}
    for k in scanned:
      rest = k[len("Transformer/encoderblock/"):]
      for i, v in enumerate(ckpt[k]):
        out[f"Transformer/encoderblock_{i}/{rest}"] = v
    ckpt = out
  return ckpt


def _as_size(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  h, w = image_size
  return int(h), int(w)


def init_leaves(module: nn.Module, rng: jax.Array, image_size: Union[int, Sequence[int]],
                keep: Callable[[str], bool]) -> Dict[str, jax.Array]:
  """The initial values of the ``params`` leaves whose ``/``-joined path satisfies ``keep``.

  Runs ``module.init`` under ``jit`` returning only those leaves, so XLA drops the rest of the
  initialisation (no 86M random numbers to fill a head and a few PEFT leaves of ViT-B/16).
  """
  h, w = _as_size(image_size)

  def f(rng):
    flat = traverse_util.flatten_dict(module.init(rng, jnp.zeros((1, h, w, 3)))["params"],
                                      sep="/")
    return {k: v for k, v in flat.items() if keep(k)}
  return jax.jit(f)(rng)


def load_pretrained(module: VisionTransformer, path: Union[str, os.PathLike],
                    image_size: Union[int, Sequence[int]] = 224, rng: Optional[jax.Array] = None,
                    *, keep_head: bool = False, ignore_keys: Sequence[str] = ()
                    ) -> Dict[str, Any]:
  """Variables ``{'params': ...}`` of ``module`` from a ViT ``.npz`` checkpoint.

  Every checkpoint array goes to the leaf of the same ``/``-joined path (after
  :func:`_normalise_checkpoint`); ``pos_embedding`` is resampled to the grid of ``image_size``
  (:func:`resample_posemb`); the ``head`` is dropped and replaced by a fresh one
  (``N(0, head_init_std)``, zero bias) unless ``keep_head``; PEFT leaves (paths containing
  ``lora``/``adapter``/``prefix``) come from ``module.init(rng)`` unless the file has them
  (files written by :func:`save_npz`). Arrays are cast to float32.

  Args:
    module: the target :class:`VisionTransformer` (its fields decide the tree).
    path: ``.npz`` with ``/``-separated keys (vit_jax / big_vision layout).
    image_size: input side (int or ``(h, w)``) the variables are made for.
    rng: PRNG key for the head and the PEFT leaves (default ``PRNGKey(0)``).
    keep_head: keep the checkpoint's ``head`` (shapes must match).
    ignore_keys: checkpoint key prefixes to drop silently (e.g. ``("pre_logits",)``).

  Returns:
    ``{'params': nested dict of jax arrays}``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming every missing key (model leaf not in the file), unexpected key (file
      array the model has no leaf for) and shape mismatch.
  """
  module.validate()
  rng = jax.random.PRNGKey(0) if rng is None else rng
  h, w = _as_size(image_size)
  p = module.spec.patch
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
  with np.load(path, allow_pickle=False) as f:
    ckpt = {k: np.asarray(f[k]) for k in f.files}
  ckpt = _normalise_checkpoint(ckpt)
  shapes = traverse_util.flatten_dict(
      jax.eval_shape(module.init, rng, jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))["params"],
      sep="/")
  fresh = lambda k: ((is_head(k) and not keep_head)
                     or (_is_peft_key(k) and k not in ckpt))
  leaves = dict(shapes)
  leaves.update(init_leaves(module, rng, (h, w), fresh))

  out, missing, mismatched, used = {}, [], [], set()
  for key, ref in leaves.items():
    if is_head(key) and not keep_head:
      out[key] = ref
      continue
    if key not in ckpt:
      if _is_peft_key(key):
        out[key] = ref
      else:
        missing.append(key)
      continue
    arr = ckpt[key]
    used.add(key)
    if key.endswith("posembed_input/pos_embedding") and arr.shape != ref.shape:
      arr = resample_posemb(arr, (h // p, w // p))
    if arr.shape != ref.shape:
      mismatched.append(f"{key}: file {tuple(arr.shape)} vs model {tuple(ref.shape)}")
      continue
    out[key] = jnp.asarray(arr, jnp.float32)
  dropped = lambda k: ((is_head(k) and not keep_head)
                       or any(k.startswith(pre) for pre in ignore_keys))
  unexpected = sorted(k for k in ckpt if k not in used and not dropped(k))
  if missing or unexpected or mismatched:
    lines = [f"{path}: checkpoint does not match ViT-{module.variant} (peft={module.peft.name!r}):"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                     + (" ..." if len(items) > 20 else ""))
    if any(k.startswith("pre_logits/") for k in unexpected):
      lines.append("  the file has pre_logits: pass representation_size=<its width> to keep it, "
                   "or ignore_keys=('pre_logits',) to drop it")
    raise ValueError("\n".join(lines))
  return {"params": traverse_util.unflatten_dict(out, sep="/")}


def load_npz(path: Union[str, os.PathLike], variant: str, num_classes: int,
             image_size: Union[int, Sequence[int]] = 224, *, rng: Optional[jax.Array] = None,
             keep_head: bool = False, ignore_keys: Sequence[str] = (), **module_kwargs
             ) -> Dict[str, Any]:
  """:func:`load_pretrained` for ``VisionTransformer(variant, num_classes, **module_kwargs)``
  (``module_kwargs``: ``peft`` (a :class:`cft_jax.peft.spec.PeftSpec`), ``remat``, ...). Same
  errors."""
  module = VisionTransformer(variant=variant, num_classes=num_classes, **module_kwargs)
  return load_pretrained(module, path, image_size, rng, keep_head=keep_head,
                         ignore_keys=ignore_keys)


def save_npz(variables: Dict[str, Any], path: Union[str, os.PathLike]) -> None:
  """Writes ``variables['params']`` (or a bare params dict) as an ``.npz`` with ``/``-joined
  keys (the checkpoint layout; PEFT leaves included), readable by :func:`load_pretrained`."""
  params = variables.get("params", variables)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def _not_found(message: str) -> Exception:
  """A missing checkpoint: ``cft_jax.data.DatasetNotFoundError`` (a FileNotFoundError), which
  the CLI prints as one line."""
  from cft_jax.data.sources import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  return DatasetNotFoundError(message)


def detect_checkpoint_format(path: Union[str, os.PathLike]) -> str:
  """``"i21k"`` for a file with ``pre_logits`` (the original ``ViT-B_16.npz``), else
  ``"augreg"`` (reads the key names only).

  Raises:
    FileNotFoundError: no such file (``DatasetNotFoundError``).
  """
  if not os.path.isfile(path):
    raise _not_found(f"model.checkpoint: {path} does not exist (a ViT .npz file or the folder "
                     f"holding it)")
  with np.load(path, allow_pickle=False) as f:
    return "i21k" if any("pre_logits/" in k for k in f.files) else "augreg"


def _candidates(variant: str, fmt: str) -> Dict[str, str]:
  files = {}
  if fmt in ("auto", "augreg") and variant in AUGREG_FILES:
    files[AUGREG_FILES[variant]] = AUGREG_URL + AUGREG_FILES[variant]
  if fmt in ("auto", "i21k") and variant in I21K_FILES:
    files[I21K_FILES[variant]] = I21K_URL + I21K_FILES[variant]
  return files


def pretrained_path(variant: str, directory: Optional[str] = None,
                    checkpoint_format: str = "auto") -> str:
  """Local path of the ImageNet-21k ``.npz`` of ``variant``.

  ``checkpoint_format`` (``model.checkpoint_format``): ``augreg`` (Steiner et al. 2022,
  ``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz`` from
  ``gs://vit_models/augreg/``), ``i21k`` (Dosovitskiy et al. 2021, ``ViT-B_16.npz`` with
  ``pre_logits`` from ``gs://vit_models/imagenet21k/``) or ``auto`` (the first of those present).
  Looked up in ``directory``, else ``$CFT_JAX_VIT_DIR``, else ``~/.cache/cft_jax/vit``.

  Raises:
    ValueError: no public checkpoint for ``variant`` (patch-4 and ``tiny`` variants) or an
      unknown format.
    FileNotFoundError: the file is absent; the message gives the download command.
  """
  if checkpoint_format not in CHECKPOINT_FORMATS:
    raise ValueError(f"model.checkpoint_format must be one of {CHECKPOINT_FORMATS}, got "
                     f"{checkpoint_format!r}")
  files = _candidates(variant, checkpoint_format)
  if not files:
    kind = "i21k" if checkpoint_format == "i21k" else "augreg"
    raise ValueError(f"no public {kind} checkpoint for ViT variant {variant!r} "
                     f"(augreg: {sorted(AUGREG_FILES)}, i21k: {sorted(I21K_FILES)}); use "
                     f"pretrained=False")
  directory = (directory or os.environ.get("CFT_JAX_VIT_DIR")
               or os.path.join(os.path.expanduser("~"), ".cache", "cft_jax", "vit"))
  for name in files:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  cmds = "\n".join(f"  mkdir -p {directory} && wget -P {directory} {url}"
                   for url in files.values())
  raise _not_found(
      f"none of {list(files)} in {directory}. Download one with\n{cmds}\n(or set "
      f"CFT_JAX_VIT_DIR / model.checkpoint to the file or the folder holding it)")


def build(variant: str, num_classes: int, *, pretrained: bool = True,
          image_size: Union[int, Sequence[int]] = 224, rng: Optional[jax.Array] = None,
          path: Optional[str] = None, checkpoint_format: str = "auto", pre_logits: str = "drop",
          **module_kwargs) -> Tuple[VisionTransformer, Dict[str, Any]]:
  """``(module, variables)``: ImageNet-21k weights when ``pretrained``, else a random init.

  Args:
    path: ``model.checkpoint``: the ``.npz`` file, or a folder searched by
      :func:`pretrained_path` (None: ``$CFT_JAX_VIT_DIR`` / ``~/.cache/cft_jax/vit``).
    checkpoint_format: ``auto`` (detected from the keys: ``pre_logits`` -> ``i21k``),
      ``augreg`` or ``i21k``; a file of the other layout is an error.
    pre_logits: for ``i21k`` files, ``drop`` (vit_jax's fine-tuning "drop-head variant": the
      features are the ``encoder_norm`` cls token) or ``keep`` (``representation_size`` = the
      file's width: Dense + tanh before the new head, as ``timm``'s ``*_in21k`` models).

  Raises:
    ValueError / FileNotFoundError: see :func:`pretrained_path` and :func:`load_pretrained`;
      a format mismatch; ``pre_logits`` not in ``drop | keep``.
  """
  if pre_logits not in ("drop", "keep"):
    raise ValueError(f"model.pre_logits must be 'drop' or 'keep', got {pre_logits!r}")
  ignore: Tuple[str, ...] = ()
  if pretrained:
    if not path or os.path.isdir(path):
      path = pretrained_path(variant, path or None, checkpoint_format)
    fmt = detect_checkpoint_format(path)
    if checkpoint_format not in ("auto", fmt):
      from cft_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError(f"model.checkpoint_format={checkpoint_format!r} but {path} is a {fmt} "
                       f"checkpoint ({'has' if fmt == 'i21k' else 'no'} pre_logits); set "
                       f"model.checkpoint_format='{fmt}' or 'auto'")
    if fmt == "i21k":
      if pre_logits == "keep":
        with np.load(path, allow_pickle=False) as f:
          width = [f[k].shape[-1] for k in f.files if k.endswith("pre_logits/bias")][0]
        module_kwargs["representation_size"] = int(width)
      else:
        ignore = ("pre_logits",)
  module = VisionTransformer(variant=variant, num_classes=num_classes, **module_kwargs)
  module.validate()
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if pretrained:
    variables = load_pretrained(module, path, image_size, rng, ignore_keys=ignore)
  else:
    h, w = _as_size(image_size)
    variables = jax.jit(module.init)(rng, jnp.zeros((1, h, w, 3), jnp.float32))
  return module, dict(variables)
