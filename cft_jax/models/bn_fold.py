"""Folding eval-mode BatchNorm into the preceding convolution (DLCFT paper §4.1, after [31]).

In eval mode BN is the per-channel affine map ``y = gamma * (s - mu) / sqrt(var + eps) + beta``
of the conv output ``s = conv(x; K) (+ c)``. With ``k = gamma / sqrt(var + eps)`` (``[O]``) the
pair equals one biased conv::

  K' = K * k          (scaled along the output-channel axis, the last axis of a Flax kernel
                       [kh, kw, I, O]; also right for depthwise kernels [kh, kw, 1, O])
  c' = (c - mu) * k + beta      (c = 0 for a conv without bias)

so a linearized network has no BN at all and its parameters are just conv kernels and biases.

Pairing: by default every BN module at path ``(..., name)`` is folded into the conv at
``(..., name.replace("bn", "conv"))`` — the naming of :class:`cft_jax.models.resnet.ResNet`
(``bn1 -> conv1``, ``downsample_bn -> downsample_conv``). Other models pass ``pairs``
explicitly. EfficientNet-Lite (``efficientnet_lite.py``, another owner) would need: explicit
``pairs`` for its ``_bn(name)`` modules (stem, expand, depthwise, project, head convs), a
``batch_norm=False`` switch that drops the BNs and gives those convs a bias, and a
``activation`` field (ReLU6 -> LeakyReLU, or a "leaky ReLU6") for the DLCFT variant; the folding
arithmetic below already covers its depthwise kernels ``[kh, kw, 1, C]``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import jax.numpy as jnp
from flax import traverse_util

Path = Tuple[str, ...]


def fold_conv_bn(kernel, bias, scale, beta, mean, var, eps: float = 1e-5):
  """Folds one eval-mode BN into its conv.

  Args:
    kernel: conv kernel ``[..., O]`` (output channels last, Flax layout).
    bias: conv bias ``[O]`` or None.
    scale: BN ``gamma [O]`` (None: 1).
    beta: BN ``beta [O]`` (None: 0).
    mean: running mean ``[O]``.
    var: running variance ``[O]``.
    eps: BN epsilon (the module's, 1e-5 for :class:`ResNet`).

  Returns:
    ``(kernel', bias')`` with ``conv(x; kernel') + bias' == BN(conv(x; kernel) + bias)``.
  """
  k = jnp.ones_like(mean) if scale is None else scale
  k = k / jnp.sqrt(var + eps)
  c = jnp.zeros_like(mean) if bias is None else bias
  b = jnp.zeros_like(mean) if beta is None else beta
  return kernel * k, (c - mean) * k + b


def default_pairs(batch_stats: Dict[str, Any]) -> Dict[Path, Path]:
  """``{bn_path: conv_path}`` for every BN in ``batch_stats`` by the ``bn -> conv`` naming rule."""
  flat = traverse_util.flatten_dict(batch_stats)
  bn_paths = sorted({k[:-1] for k in flat})
  return {p: p[:-1] + (p[-1].replace("bn", "conv"),) for p in bn_paths}


def fold_batchnorm(variables: Dict[str, Any], pairs: Optional[Dict[Path, Path]] = None,
                   eps: float = 1e-5) -> Dict[str, Any]:
  """Folds every eval-mode BN of ``variables`` into its conv.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a model with BN.
    pairs: ``{bn_path: conv_path}`` (paths without the leaf name); None: :func:`default_pairs`.
    eps: BN epsilon.

  Returns:
    ``{'params': ...}`` for the same architecture without BN and with biased convs (for
    :class:`~cft_jax.models.resnet.ResNet`: ``batch_norm=False``); its output equals the BN
    model's eval-mode output (up to float rounding).

  Raises:
    KeyError: a pair whose conv kernel or BN statistics are missing.
  """
  stats = variables.get("batch_stats", {})
  pairs = default_pairs(stats) if pairs is None else pairs
  flat = dict(traverse_util.flatten_dict(variables["params"]))
  flat_stats = traverse_util.flatten_dict(stats)
  for bn, conv in pairs.items():
    if conv + ("kernel",) not in flat:
      raise KeyError(f"no conv kernel at {conv} for BN {bn}")
    kernel, bias = fold_conv_bn(
        flat[conv + ("kernel",)], flat.get(conv + ("bias",)), flat.pop(bn + ("scale",), None),
        flat.pop(bn + ("bias",), None), flat_stats[bn + ("mean",)], flat_stats[bn + ("var",)],
        eps)
    flat[conv + ("kernel",)] = kernel
    flat[conv + ("bias",)] = bias
  return {"params": traverse_util.unflatten_dict(flat)}


def bn_paths(variables: Dict[str, Any]) -> Iterable[Path]:
  """Module paths holding BN statistics (for checks)."""
  return sorted({k[:-1] for k in traverse_util.flatten_dict(variables.get("batch_stats", {}))})


def fold_batchnorm_module(module, variables: Dict[str, Any],
                          pairs: Optional[Dict[Path, Path]] = None, eps: float = 1e-5):
  """``(module', variables')``: the BN-free twin of a module with a ``batch_norm`` field.

  For :class:`~cft_jax.models.resnet.ResNet`: ``module.clone(batch_norm=False)`` and
  :func:`fold_batchnorm` of its variables; ``module'.apply(variables', x)`` equals
  ``module.apply(variables, x, train=False)``.

  Raises:
    TypeError: the module has no ``batch_norm`` field.
  """
  if not hasattr(module, "batch_norm"):
    raise TypeError(f"{type(module).__name__} has no 'batch_norm' field to switch off")
  return module.clone(batch_norm=False), fold_batchnorm(variables, pairs, eps)
