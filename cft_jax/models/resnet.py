"""ResNet-18 in Flax (He et al. 2016), the backbone of DLCFT (paper §4.1 "Models").

BasicBlock ResNet with stages ``[2, 2, 2, 2]`` and widths ``width * (1, 2, 4, 8)``:

- ``stem="imagenet"``: 7x7 conv stride 2 (pad 3) + BN + act + 3x3 max-pool stride 2 (pad 1);
  the torchvision layout (11,689,512 parameters with a 1000-way head).
- ``stem="cifar"``: 3x3 conv stride 1 + BN + act, no max-pool (the CIFAR ResNet-18 of the
  continual-learning literature; 11,173,962 parameters with a 10-way head, 11,220,132 with 100).

Parameter names mirror torchvision so a state dict maps one to one (:func:`from_torchvision`)::

  conv1, bn1                                   stem
  layer{1..4}_{0,1}/conv1, bn1, conv2, bn2      BasicBlock
  layer{2..4}_0/downsample_conv, downsample_bn  1x1 projection shortcut (stride 2)
  head/{kernel [8*width, C], bias [C]}          classifier (torchvision ``fc``)

Every BN module is named like its conv with ``bn`` in place of ``conv`` — the pairing used by
:func:`cft_jax.models.bn_fold.fold_batchnorm`. With ``batch_norm=False`` the BNs are dropped and
every conv gets a bias: the architecture that holds BN-folded weights (paper §4.1, following
Mu et al. 2020 [31]).

Activation: ``"relu"`` or ``"leaky_relu"`` (slope ``negative_slope``, 0.01 by default): DLCFT
linearizes a LeakyReLU network (paper §4.1 / App. B, following Achille et al. [1]).

BatchNorm follows PyTorch conventions (``momentum=0.9`` for the running average, i.e. torch's
0.1; ``epsilon=1e-5``): ``train=True`` normalises with batch statistics and needs
``mutable=['batch_stats']``; ``train=False`` uses the running averages (an affine map, which is
what :mod:`cft_jax.linearize` and the curvature code assume).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cft_jax.peft import HEAD

BN_MOMENTUM = 0.9
BN_EPS = 1e-5
STAGES = (2, 2, 2, 2)
STEMS = ("cifar", "imagenet")
ACTIVATIONS = ("relu", "leaky_relu")


def make_activation(name: str, negative_slope: float = 0.01) -> Callable[[jax.Array], jax.Array]:
  """``"relu"`` or ``"leaky_relu"`` (``max(x, slope * x)``) as a function.

  Raises:
    ValueError: unknown name.
  """
  if name == "relu":
    return nn.relu
  if name == "leaky_relu":
    return functools.partial(nn.leaky_relu, negative_slope=negative_slope)
  raise ValueError(f"unknown activation '{name}'; known: {list(ACTIVATIONS)}")


def _conv_bn(parent_x, *, features: int, kernel: int, strides: int, padding: int, conv_name: str,
             bn_name: str, batch_norm: bool, train: bool, dtype):
  """Applies ``Conv`` (+ ``BatchNorm``) inside the caller's compact scope."""
  x = nn.Conv(features, (kernel, kernel), strides=(strides, strides),
              padding=((padding, padding), (padding, padding)), use_bias=not batch_norm,
              kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
              dtype=dtype, name=conv_name)(parent_x)
  if batch_norm:
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                     dtype=dtype, name=bn_name)(x)
  return x


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (1x1 projection when the shape changes).

  ``[B, H, W, C_in] -> [B, H / strides, W / strides, features]``.
  """

  features: int
  strides: int = 1
  activation: str = "relu"
  negative_slope: float = 0.01
  batch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = make_activation(self.activation, self.negative_slope)
    cb = functools.partial(_conv_bn, batch_norm=self.batch_norm, train=train, dtype=self.dtype)
    y = act(cb(x, features=self.features, kernel=3, strides=self.strides, padding=1,
               conv_name="conv1", bn_name="bn1"))
    y = cb(y, features=self.features, kernel=3, strides=1, padding=1, conv_name="conv2",
           bn_name="bn2")
    if x.shape[-1] != self.features or self.strides != 1:
      x = cb(x, features=self.features, kernel=1, strides=self.strides, padding=0,
             conv_name="downsample_conv", bn_name="downsample_bn")
    return act(y + x)


class ResNet(nn.Module):
  """ResNet with BasicBlocks: ``[B, H, W, 3]`` normalised images -> logits ``[B, num_classes]``.

  Attributes:
    num_classes: output units of the top-level ``head`` (``nn.Dense``).
    stem: ``"cifar"`` (3x3/1, no max-pool) or ``"imagenet"`` (7x7/2 + 3x3/2 max-pool).
    width: channels of the first stage (64 for the standard network; small values for tests).
    stages: blocks per stage (``(2, 2, 2, 2)``: ResNet-18).
    activation: ``"relu"`` or ``"leaky_relu"``.
    negative_slope: LeakyReLU slope.
    batch_norm: False drops every BN and gives every conv a bias (BN-folded architecture).
    dtype: computation dtype.

  ``__call__(x, train=False, return_features=False)``: with ``return_features`` the pooled
  features ``[B, 8 * width]`` (input of ``head``) are returned instead of the logits.
  """

  num_classes: int = 1000
  stem: str = "imagenet"
  width: int = 64
  stages: Tuple[int, ...] = STAGES
  activation: str = "relu"
  negative_slope: float = 0.01
  batch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    if self.stem not in STEMS:
      raise ValueError(f"unknown stem '{self.stem}'; known: {list(STEMS)}")
    act = make_activation(self.activation, self.negative_slope)
    x = jnp.asarray(x, self.dtype)
    if self.stem == "imagenet":
      x = _conv_bn(x, features=self.width, kernel=7, strides=2, padding=3, conv_name="conv1",
                   bn_name="bn1", batch_norm=self.batch_norm, train=train, dtype=self.dtype)
      x = act(x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = _conv_bn(x, features=self.width, kernel=3, strides=1, padding=1, conv_name="conv1",
                   bn_name="bn1", batch_norm=self.batch_norm, train=train, dtype=self.dtype)
      x = act(x)
    for i, num_blocks in enumerate(self.stages):
      for j in range(num_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(self.width * 2 ** i, strides=strides, activation=self.activation,
                       negative_slope=self.negative_slope, batch_norm=self.batch_norm,
                       dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    if return_features:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, name=HEAD)(x)


def resnet18(num_classes: int = 1000, stem: str = "imagenet", **kwargs) -> ResNet:
  """ResNet-18 (``stages=(2, 2, 2, 2)``); ``kwargs`` go to :class:`ResNet`."""
  return ResNet(num_classes=num_classes, stem=stem, stages=STAGES, **kwargs)


def from_torchvision(state_dict: Mapping[str, np.ndarray], *, keep_fc: bool = True
                     ) -> Dict[str, Any]:
  """Converts a torchvision ResNet state dict (``{name: array}``) to Flax variables.

  Conv ``weight [O, I, kh, kw]`` -> ``kernel [kh, kw, I, O]``; BN ``weight/bias`` ->
  ``scale/bias``, ``running_mean/var`` -> ``batch_stats`` ``mean/var``; ``fc.weight [C, D]`` ->
  ``head/kernel [D, C]`` (dropped when ``keep_fc=False``, so the caller inits its own head).
  Read a ``.pth`` file with :func:`cft_jax.models.torch_pickle.load_torch_state_dict`.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for :class:`ResNet` with ``stem="imagenet"`` (or the
    CIFAR stem when ``conv1.weight`` is 3x3).

  Raises:
    KeyError: a tensor with a name this mapping does not know.
  """
  params: Dict[str, Any] = {}
  stats: Dict[str, Any] = {}

  def put(tree, path, value):
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(value)

  for name, value in state_dict.items():
    value = np.asarray(value)
    parts = name.split(".")
    if parts[-1] == "num_batches_tracked":
      continue
    if parts[0] == "fc":
      if keep_fc:
        put(params, (HEAD, "kernel" if parts[1] == "weight" else "bias"),
            value.T if parts[1] == "weight" else value)
      continue
    if parts[0].startswith("layer"):
      prefix = (f"{parts[0]}_{parts[1]}",)
      rest = parts[2:]
      if rest[0] == "downsample":
        module = "downsample_conv" if rest[1] == "0" else "downsample_bn"
        rest = rest[2:]
      else:
        module, rest = rest[0], rest[1:]
    else:
      prefix, module, rest = (), parts[0], parts[1:]
    leaf = rest[0]
    path = prefix + (module,)
    if "conv" in module:
      if leaf != "weight":
        raise KeyError(name)
      put(params, path + ("kernel",), value.transpose(2, 3, 1, 0))
    elif "bn" in module:
      mapping = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                 "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
      if leaf not in mapping:
        raise KeyError(name)
      col, key = mapping[leaf]
      put(params if col == "params" else stats, path + (key,), value)
    else:
      raise KeyError(name)
  return {"params": params, "batch_stats": stats}
