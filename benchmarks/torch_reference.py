"""PyTorch functional twins of the Flax models, for side-by-side speed checks (not a dependency).

Only ``benchmarks/step_throughput.py`` imports this module; it needs ``torch`` (the
``torch-compare`` extra: ``pip install torch``). The models are plain functions of a flat
``{name: tensor}`` parameter dict whose names are the ``/``-joined Flax paths, converted from the
Flax variables by :func:`effnet_params_from_flax` / :func:`vit_params_from_flax` into PyTorch's
layouts (OIHW convs, ``[out, in]`` linear weights). Same weights, same shapes, same FLOPs as the
Flax models, so the forward outputs agree to float32 rounding (checked by the benchmark):

- EfficientNet-Lite (:mod:`cft_jax.models.efficientnet_lite`): TF-SAME padding (``F.pad`` then
  an unpadded conv), BatchNorm in inference mode, ReLU6, depthwise convs as ``groups=C`` convs,
  1x1 convs as 1x1 ``conv2d`` with LoRA merged into the weight (``W + s B A``, as the Flax
  ``LoRADense(merged=True)``), global average pool, linear head.
- ViT (:mod:`cft_jax.models.vit`): patch embedding conv, ``cls`` token, position embeddings,
  pre-LN blocks (LayerNorm eps 1e-6), q/k/v/out projections with the Flax model's two-path LoRA
  (``x W + b + s (x A) B``, learnable ``s``) on the targets of the PEFT blocks, attention by
  ``F.scaled_dot_product_attention`` (``attention="sdpa"``, PyTorch's fused CPU kernel) or by
  explicit matmuls and softmax (``attention="math"``; forward-mode AD needs it: the fused kernel
  has no jvp rule), tanh-GELU MLP, classifier on the ``cls`` token.

Inputs are NCHW float tensors normalised like the Flax models' (the benchmark converts the same
uint8 batches).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from flax import traverse_util

Params = Dict[str, torch.Tensor]


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def _flat(tree) -> Dict[str, np.ndarray]:
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


# ---------------------------------------------------------------------------- EfficientNet-Lite


def _same_pads(size: int, k: int, s: int) -> Tuple[int, int]:
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def effnet_params_from_flax(variables: Dict[str, Any]) -> Params:
  """Flat torch dict of an :class:`EfficientNetLite`'s ``params`` and ``batch_stats``.

  Layouts: ``stem_conv/kernel`` OIHW; ``*/depthwise_conv/kernel`` ``[C, 1, k, k]``; 1x1 convs
  ``*/kernel`` ``[out, in]``, ``lora_a`` -> ``[r, in]`` (A), ``lora_b`` -> ``[out, r]`` (B);
  BN ``scale/bias`` and ``batch_stats`` ``mean/var`` as ``[C]``; ``head/kernel`` ``[C, D]``.
  """
  out: Params = {}
  for name, a in _flat(variables["params"]).items():
    if name == "stem_conv/kernel":
      a = a.transpose(3, 2, 0, 1)
    elif name.endswith("depthwise_conv/kernel"):
      a = a.transpose(2, 0, 1)[:, None]
    elif name.endswith(("/kernel", "/lora_a", "/lora_b")):
      a = a.T
    out[name] = _t(a)
  for name, a in _flat(variables["batch_stats"]).items():
    out[name] = _t(a)
  return out


def effnet_forward(p: Params, x: torch.Tensor, blocks: Sequence[Dict[str, int]], *,
                   lora_scale: float = 1.0, return_features: bool = False) -> torch.Tensor:
  """Logits ``[B, C]`` of EfficientNet-Lite from NCHW ``x`` (``blocks``:
  :func:`cft_jax.models.efficientnet_lite.block_config`)."""

  def bn(y, name):
    return F.batch_norm(y, p[f"{name}/mean"], p[f"{name}/var"], p[f"{name}/scale"],
                        p[f"{name}/bias"], training=False, eps=1e-3)

  def conv_same(y, w, stride, groups=1):
    k = w.shape[-1]
    pt, pb = _same_pads(y.shape[2], k, stride)
    pl, pr = _same_pads(y.shape[3], k, stride)
    if pt or pb or pl or pr:
      y = F.pad(y, (pl, pr, pt, pb))
    return F.conv2d(y, w, stride=stride, groups=groups)

  def pointwise(y, name):
    w = p[f"{name}/kernel"]
    if f"{name}/lora_a" in p:  # merged LoRA, as LoRADense(merged=True)
      w = w + lora_scale * (p[f"{name}/lora_b"] @ p[f"{name}/lora_a"])
    return F.conv2d(y, w[:, :, None, None])

  x = F.relu6(bn(conv_same(x, p["stem_conv/kernel"], 2), "stem_bn"))
  for i, cfg in enumerate(blocks):
    b = f"block_{i}"
    inp = x
    if cfg["expand"] != 1:
      x = F.relu6(bn(pointwise(x, f"{b}/expand_conv"), f"{b}/bn0"))
    x = conv_same(x, p[f"{b}/depthwise_conv/kernel"], cfg["stride"], groups=x.shape[1])
    x = F.relu6(bn(x, f"{b}/bn1"))
    x = bn(pointwise(x, f"{b}/project_conv"), f"{b}/bn2")
    if cfg["stride"] == 1 and cfg["cin"] == cfg["cout"]:
      x = x + inp
  x = F.relu6(bn(pointwise(x, "conv_top"), "bn_top"))
  feats = x.mean(dim=(2, 3))
  if return_features:
    return feats
  return F.linear(feats, p["head/kernel"], p["head/bias"])


# --------------------------------------------------------------------------------------- ViT


def vit_params_from_flax(variables: Dict[str, Any]) -> Params:
  """Flat torch dict of a :class:`VisionTransformer`'s ``params``.

  Layouts: ``embedding/kernel`` OIHW; attention ``query/key/value/kernel [D,H,Dh]`` ->
  ``[H*Dh, D]``, their biases ``[H*Dh]``; ``out/kernel [H,Dh,D]`` -> ``[D, H*Dh]``; LoRA
  ``lora_a [D_in, r]`` -> ``[r, D_in]``, ``lora_b [r, D_out]`` -> ``[D_out, r]``; Dense kernels
  ``[in, out]`` -> ``[out, in]``; prefix leaves unchanged.
  """
  out: Params = {}
  for name, a in _flat(variables["params"]).items():
    if name == "embedding/kernel":
      a = a.transpose(3, 2, 0, 1)
    elif "MultiHeadDotProductAttention" in name and name.endswith("/kernel"):
      if "/out/" in name:
        a = a.reshape(-1, a.shape[-1]).T
      else:
        a = a.reshape(a.shape[0], -1).T
    elif "MultiHeadDotProductAttention" in name and name.endswith("/bias") and a.ndim == 2:
      a = a.reshape(-1)
    elif name.endswith(("/lora_a", "/lora_b")) or (name.endswith("/kernel") and a.ndim == 2):
      a = a.T
    out[name] = _t(a)
  return out


def vit_forward(p: Params, x: torch.Tensor, *, depth: int, heads: int, patch: int,
                attention: str = "sdpa", return_features: bool = False) -> torch.Tensor:
  """Logits ``[B, C]`` of the ViT from NCHW ``x``; LoRA wherever ``p`` has ``lora_a`` leaves."""
  x = F.conv2d(x, p["embedding/kernel"], p["embedding/bias"], stride=patch)
  b, d = x.shape[:2]
  x = x.flatten(2).transpose(1, 2)
  x = torch.cat([p["cls"].expand(b, 1, d), x], dim=1)
  x = x + p["Transformer/posembed_input/pos_embedding"]
  n = x.shape[1]
  dh = d // heads

  def ln(y, name):
    return F.layer_norm(y, (d,), p[f"{name}/scale"], p[f"{name}/bias"], eps=1e-6)

  def proj(y, name):
    out = F.linear(y, p[f"{name}/kernel"], p[f"{name}/bias"])
    if f"{name}/lora_a" in p:
      out = out + p[f"{name}/lora_scale"] * F.linear(F.linear(y, p[f"{name}/lora_a"]),
                                                     p[f"{name}/lora_b"])
    return out

  for i in range(depth):
    blk = f"Transformer/encoderblock_{i}"
    att = f"{blk}/MultiHeadDotProductAttention_1"
    y = ln(x, f"{blk}/LayerNorm_0")
    q, k, v = (proj(y, f"{att}/{t}").view(b, n, heads, dh).transpose(1, 2)
               for t in ("query", "key", "value"))
    if attention == "sdpa":
      o = F.scaled_dot_product_attention(q, k, v)
    elif attention == "math":
      w = torch.softmax((q @ k.transpose(-2, -1)) * dh ** -0.5, dim=-1)
      o = w @ v
    else:
      raise ValueError(f"attention must be 'sdpa' or 'math', got {attention!r}")
    x = x + proj(o.transpose(1, 2).reshape(b, n, d), f"{att}/out")
    y = ln(x, f"{blk}/LayerNorm_2")
    mlp = f"{blk}/MlpBlock_3"
    y = F.gelu(F.linear(y, p[f"{mlp}/Dense_0/kernel"], p[f"{mlp}/Dense_0/bias"]),
               approximate="tanh")
    x = x + F.linear(y, p[f"{mlp}/Dense_1/kernel"], p[f"{mlp}/Dense_1/bias"])
  x = ln(x, "Transformer/encoder_norm")[:, 0]
  if return_features:
    return x
  return F.linear(x, p["head/kernel"], p["head/bias"])


# ------------------------------------------------------------------------------ train steps


def trainable_names(p: Params, peft: str) -> list:
  """Names that train: ``full`` everything, ``lora`` the LoRA leaves + head, ``linear_probe``
  the head (as :func:`cft_jax.peft.is_trainable`). BatchNorm running statistics never train."""
  if peft == "full":
    return sorted(k for k in p if not k.endswith(("/mean", "/var")))
  if peft == "lora":
    return sorted(k for k in p if k.startswith("head/") or "lora" in k)
  if peft == "linear_probe":
    return sorted(k for k in p if k.startswith("head/"))
  raise ValueError(f"unknown peft {peft!r}")


class TorchStep:
  """One Adam training step of ``forward(params, x) -> logits`` with cross-entropy on the
  task's classes ``logits[:, lo:lo + k]``.

  ``linearized=True`` trains the first-order Taylor expansion at the initial parameters
  ``f(theta_0) + J f(theta_0) (theta - theta_0)`` with one ``torch.func.jvp`` (forward-mode AD,
  primal and tangent together, then reverse mode through it), the twin of
  :func:`cft_jax.linearize.linearized_apply`.
  """

  def __init__(self, forward: Callable[[Params, torch.Tensor], torch.Tensor], params: Params,
               names: Iterable[str], *, lr: float = 1e-3, lo: int = 0, k: int = 10,
               linearized: bool = False, mean: float = 127.5, std: float = 127.5):
    self.forward = forward
    names = list(names)
    self.frozen = {n: v for n, v in params.items() if n not in names}
    self.train = {n: params[n].clone().requires_grad_(True) for n in names}
    self.params0 = {n: params[n].clone() for n in names} if linearized else None
    self.opt = torch.optim.Adam(list(self.train.values()), lr=lr)
    self.lo, self.k, self.linearized = lo, k, linearized
    self.mean, self.std = mean, std

  def logits(self, x: torch.Tensor) -> torch.Tensor:
    if not self.linearized:
      return self.forward({**self.frozen, **self.train}, x)
    delta = {n: self.train[n] - self.params0[n] for n in self.train}
    y0, dy = torch.func.jvp(lambda tr: self.forward({**self.frozen, **tr}, x), (self.params0,),
                            (delta,))
    return y0 + dy

  def __call__(self, images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    x = (images_u8.float() - self.mean) / self.std
    logits = self.logits(x)[:, self.lo:self.lo + self.k]
    loss = F.cross_entropy(logits, labels - self.lo)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss.detach()


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
  return int(sum(t.numel() * t.element_size() for t in tensors))


def saved_activation_bytes(step: TorchStep, images_u8: torch.Tensor, labels: torch.Tensor
                           ) -> int:
  """Bytes of the distinct storages autograd saves for the backward pass of one step (the
  activations; parameters that are saved are excluded)."""
  seen, total = set(), [0]
  param_ptrs = {t.untyped_storage().data_ptr() for t in list(step.frozen.values())
                + list(step.train.values())}

  def pack(t):
    try:
      ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
      return t
    if ptr not in seen and ptr not in param_ptrs:
      seen.add(ptr)
      total[0] += t.untyped_storage().nbytes()
    return t

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    step(images_u8, labels)
  return total[0]


__all__ = ["effnet_params_from_flax", "effnet_forward", "vit_params_from_flax", "vit_forward",
           "trainable_names", "TorchStep", "saved_activation_bytes", "nbytes"]

