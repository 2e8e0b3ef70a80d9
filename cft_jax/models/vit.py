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

Modules: the layers (attention, MLP, block, PEFT wiring) are in :mod:`cft_jax.models.vit_layers`,
the ``.npz`` loading / lookup in :mod:`cft_jax.models.vit_checkpoint`; this module holds the model,
its variants and :func:`build`, and re-exports the names of both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cft_jax.errors import ConfigError
from cft_jax.models.vit_checkpoint import (  # noqa: F401  (re-exported)
    AUGREG_FILES, AUGREG_URL, CHECKPOINT_FORMATS, I21K_FILES, I21K_URL, _as_size,
    _normalise_checkpoint, detect_checkpoint_format, init_leaves, load_pretrained,
    pretrained_path, read_npz, resample_posemb, save_npz)
from cft_jax.models.vit_layers import (  # noqa: F401  (re-exported)
    LORA_TARGETS, Dense, Encoder1DBlock, LayerNorm, LoRADenseGeneral, MlpBlock,
    MultiHeadDotProductAttention, attention, gelu_tanh, layer_norm, softmax)
from cft_jax.peft import HEAD
from cft_jax.peft.adapter import ADAPTER_POSITIONS, adapter_param_count
from cft_jax.peft.prefix import prefix_param_count
from cft_jax.peft.spec import NO_PEFT, PeftSpec

__all__ = [
    "MEAN", "STD", "VARIANTS", "ViTSpec", "PEFT_NAMES", "PAPER_PEFT_BLOCKS", "AUGREG_FILES",
    "VisionTransformer", "Dense", "LoRADenseGeneral", "MultiHeadDotProductAttention",
    "Encoder1DBlock", "peft_param_count", "resample_posemb", "init_leaves", "load_pretrained",
    "load_npz", "read_npz", "save_npz", "pretrained_path", "build", "detect_checkpoint_format",
    "I21K_FILES",
]

# Input normalisation of the augreg checkpoints: x = (rgb_0_255 - MEAN) / STD, in [-1, 1].
MEAN = 127.5
STD = 127.5

PEFT_NAMES = ("none", "lora", "adapter", "prefix")
PAPER_PEFT_BLOCKS = (0, 1, 2, 3, 4)


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
      raise ConfigError(f"model.checkpoint_format={checkpoint_format!r} but {path} is a {fmt} "
                       f"checkpoint ({'has' if fmt == 'i21k' else 'no'} pre_logits); set "
                       f"model.checkpoint_format='{fmt}' or 'auto'")
    if fmt == "i21k":
      if pre_logits == "keep":
        bias = read_npz(path, lambda k: k.endswith("pre_logits/bias"))
        module_kwargs["representation_size"] = int(next(iter(bias.values())).shape[-1])
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
