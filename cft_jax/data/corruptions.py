"""Synthetic distribution shift: ImageNet-C / CIFAR-10-C style corruptions of uint8 images.

Pure NumPy (plus Pillow for JPEG and pixelation), seeded, batched. Follows the corruption
functions and five severity levels of Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019 (ImageNet-C, CIFAR-10-C): the
parameter tables below are those of the CIFAR-10-C code (``table="cifar"``, meant for small
images, 32-64 px) and of the ImageNet-C code (``table="imagenet"``, 224 px). Only the
corruptions that need no external assets or heavy dependencies are implemented (no fog, frost,
snow, motion/zoom/glass blur, elastic). ``defocus_blur`` is the disk ("defocus") kernel
followed by a small Gaussian anti-aliasing blur, ``gaussian_blur`` a separable Gaussian
(``truncate=4 sigma``), both with reflect padding.

Images are ``uint8 [N, H, W, C]`` with ``C`` 1 or 3; every function maps them to floats in
``[0, 1]``, corrupts, clips and rounds back to ``uint8`` of the same shape. Colour-space
corruptions (``brightness``, ``saturate``) work in HSV for RGB; for grey images ``brightness``
shifts the intensity and ``saturate`` is the identity.

Entry points: :data:`CORRUPTIONS` (name -> function), :func:`corrupt` and
:func:`make_ood_sets` (every ``(name, severity)`` pair of a clean test set).
"""

from __future__ import annotations

import io
import zlib
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)
TABLES = ("cifar", "imagenet")

# Severity parameters, index severity - 1 (Hendrycks & Dietterich 2019 reference code).
PARAMS: Dict[str, Dict[str, tuple]] = {
    "cifar": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of N(0, s^2) on [0, 1] pixels
        "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate per unit intensity
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt & pepper fraction
        "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),  # std of the multiplicative noise
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),  # (r, aa)
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the per-image channel mean
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to V (HSV)
        "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),  # S*a + b
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # box-downscale factor, nearest upscale
        "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    },
    "imagenet": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "saturate": ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2)),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
        "jpeg_compression": (25, 18, 15, 10, 7),
    },
}

# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _to_float(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _pad_reflect(x: np.ndarray, r: int) -> np.ndarray:
  """Reflect-pads ``[N, H, W, C]`` by ``r`` on H and W (symmetric if the image is too small)."""
  mode = "reflect" if r < min(x.shape[1], x.shape[2]) else "symmetric"
  return np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode=mode)


def _conv1d(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
  """Correlates ``[N, H, W, C]`` with a centred odd 1-D kernel along ``axis`` (1 or 2)."""
  r = len(kernel) // 2
  pad = [(0, 0)] * 4
  pad[axis] = (r, r)
  mode = "reflect" if r < x.shape[axis] else "symmetric"
  xp = np.pad(x, pad, mode=mode)
  out = np.zeros_like(x)
  size = x.shape[axis]
  for i, w in enumerate(kernel):
    out += w * np.take(xp, np.arange(i, i + size), axis=axis)
  return out


def _conv2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Correlates ``[N, H, W, C]`` with a centred odd 2-D kernel (reflect padding)."""
  r = kernel.shape[0] // 2
  xp = _pad_reflect(x, r)
  h, w = x.shape[1], x.shape[2]
  out = np.zeros_like(x)
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      if kernel[i, j] != 0:
        out += kernel[i, j] * xp[:, i:i + h, j:j + w]
  return out


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
  r = max(1, int(truncate * sigma + 0.5))
  t = np.arange(-r, r + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def _gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
  k = _gaussian_kernel1d(sigma)
  return _conv1d(_conv1d(x, k, 1), k, 2)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """Normalised disk of ``radius`` px, anti-aliased by a 3x3 Gaussian of std ``alias_blur``."""
  r = int(np.ceil(radius)) + 1  # room for the 3x3 smoothing
  t = np.arange(-r, r + 1, dtype=np.float64)
  xx, yy = np.meshgrid(t, t)
  disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  g = np.exp(-0.5 * (np.arange(-1, 2) / alias_blur) ** 2)
  g /= g.sum()
  disk = np.apply_along_axis(lambda v: np.convolve(v, g, mode="same"), 0, disk)
  disk = np.apply_along_axis(lambda v: np.convolve(v, g, mode="same"), 1, disk)
  return (disk / disk.sum()).astype(np.float32)


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
  """``[..., 3]`` RGB in ``[0, 1]`` to HSV in ``[0, 1]`` (as ``skimage.color.rgb2hsv``)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(-1)
  delta = v - x.min(-1)
  s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0.0)
  safe = np.where(delta > 0, delta, 1)
  h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  return np.stack([h, s, v], -1).astype(np.float32)


def _hsv_to_rgb(x: np.ndarray) -> np.ndarray:
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  i = np.floor(h * 6.0).astype(np.int64) % 6
  f = h * 6.0 - np.floor(h * 6.0)
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  r = np.choose(i, [v, q, p, p, t, v])
  g = np.choose(i, [t, v, v, q, p, p])
  b = np.choose(i, [p, p, t, v, v, q])
  return np.stack([r, g, b], -1).astype(np.float32)


def _per_image_pil(images: np.ndarray, fn: Callable) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.empty_like(images)
  for i, img in enumerate(images):
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    res = np.asarray(fn(pil), dtype=np.uint8)
    out[i] = res.reshape(img.shape)
  return out


# --------------------------------------------------------------------------------------------
# Corruptions: f(images uint8 [N,H,W,C], param, rng) -> uint8 [N,H,W,C].
# --------------------------------------------------------------------------------------------


def gaussian_noise(images, sigma, rng):
  """``x + N(0, sigma^2)`` on ``[0, 1]`` pixels."""
  x = _to_float(images)
  return _to_uint8(x + rng.normal(size=x.shape, scale=sigma).astype(np.float32))


def shot_noise(images, lam, rng):
  """Poisson (photon) noise ``Poisson(x * lam) / lam``; smaller ``lam`` = noisier."""
  x = _to_float(images)
  return _to_uint8(rng.poisson(x * lam).astype(np.float32) / lam)


def impulse_noise(images, amount, rng):
  """Salt & pepper: a fraction ``amount`` of the values set to 0 or 1 (half each)."""
  x = _to_float(images)
  u = rng.random(size=x.shape)
  x = np.where(u < amount / 2, 0.0, np.where(u < amount, 1.0, x))
  return _to_uint8(x)


def speckle_noise(images, sigma, rng):
  """Multiplicative noise ``x + x * N(0, sigma^2)``."""
  x = _to_float(images)
  return _to_uint8(x + x * rng.normal(size=x.shape, scale=sigma).astype(np.float32))


def gaussian_blur(images, sigma, rng):
  """Separable Gaussian blur of std ``sigma`` px."""
  del rng
  return _to_uint8(_gaussian_filter(_to_float(images), sigma))


def defocus_blur(images, param, rng):
  """Disk (defocus) blur of radius ``param[0]`` px, anti-aliased with std ``param[1]``."""
  del rng
  radius, alias = param
  return _to_uint8(_conv2d(_to_float(images), _disk_kernel(radius, alias)))


def contrast(images, c, rng):
  """``(x - m) * c + m`` with ``m`` the per-image, per-channel mean: lower ``c``, less contrast."""
  del rng
  x = _to_float(images)
  m = x.mean(axis=(1, 2), keepdims=True)
  return _to_uint8((x - m) * c + m)


def brightness(images, c, rng):
  """Adds ``c`` to the HSV value channel (the intensity for grey images)."""
  del rng
  x = _to_float(images)
  if x.shape[-1] == 1:
    return _to_uint8(x + c)
  hsv = _rgb_to_hsv(x)
  hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
  return _to_uint8(_hsv_to_rgb(hsv))


def saturate(images, param, rng):
  """``S <- S * a + b`` in HSV (identity for grey images)."""
  del rng
  if images.shape[-1] == 1:
    return images.copy()
  a, b = param
  hsv = _rgb_to_hsv(_to_float(images))
  hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
  return _to_uint8(_hsv_to_rgb(hsv))


def pixelate(images, factor, rng):
  """Box-downscales to ``factor`` of the size, then nearest-upscales back (Pillow)."""
  del rng
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = images.shape[1:3]
  small = (max(1, int(w * factor)), max(1, int(h * factor)))
  return _per_image_pil(images, lambda im: im.resize(small, Image.BOX).resize((w, h),
                                                                               Image.NEAREST))


def jpeg_compression(images, quality, rng):
  """JPEG round trip at ``quality`` (Pillow)."""
  del rng
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def jpeg(im):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return Image.open(buf).convert(im.mode)
  return _per_image_pil(images, jpeg)


CORRUPTIONS: Dict[str, Callable] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "contrast": contrast,
    "brightness": brightness,
    "saturate": saturate,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}

# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError("images must be uint8 [N, H, W, C] with C in (1, 3); got "
                     f"{images.dtype} {images.shape}")
  return images


def _check_name_severity(name: str, severity: int, table: str) -> None:
  if name not in CORRUPTIONS:
    raise ValueError(f"unknown corruption '{name}'; known: {sorted(CORRUPTIONS)}")
  if severity not in SEVERITIES:
    raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity}")
  if table not in TABLES:
    raise ValueError(f"unknown severity table '{table}'; known: {list(TABLES)}")


def _seed(seed: int, name: str, severity: int) -> np.random.SeedSequence:
  # Stable across processes (no hash()): independent streams per (seed, name, severity).
  return np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(severity)])


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0,
            table: str = "cifar") -> np.ndarray:
  """Applies one corruption at one severity.

  Args:
    images: uint8 ``[N, H, W, C]``, ``C`` in (1, 3).
    name: a key of :data:`CORRUPTIONS`.
    severity: 1 (mild) to 5 (strong).
    seed: seed of the random corruptions (noise); the result is a deterministic function of
      ``(images, name, severity, seed, table)``.
    table: ``"cifar"`` (CIFAR-10-C parameters, small images) or ``"imagenet"`` (ImageNet-C).

  Returns:
    uint8 array of the shape of ``images``.

  Raises:
    ValueError: bad images, or an unknown name / severity / table (the message lists valid ones).
  """
  images = _check_images(images)
  _check_name_severity(name, severity, table)
  rng = np.random.default_rng(_seed(seed, name, severity))
  param = PARAMS[table][name][severity - 1]
  out = CORRUPTIONS[name](images, param, rng)
  assert out.shape == images.shape and out.dtype == np.uint8
  return out


def make_ood_sets(images: np.ndarray, labels: np.ndarray, names: Optional[Iterable[str]] = None,
                  severities: Sequence[int] = SEVERITIES, seed: int = 0, table: str = "cifar"
                  ) -> Dict[Tuple[str, int], Tuple[np.ndarray, np.ndarray]]:
  """Corrupted copies of a clean test set, one per ``(name, severity)``.

  Args:
    images: uint8 ``[N, H, W, C]`` clean images.
    labels: ``[N]`` labels (shared, not copied, by every set).
    names: corruption names (default: all of :data:`CORRUPTIONS`, in registry order).
    severities: subset of 1..5.
    seed: base seed; each pair draws an independent, reproducible stream.
    table: ``"cifar"`` or ``"imagenet"`` severity parameters.

  Returns:
    ``{(name, severity): (corrupted_images uint8 [N, H, W, C], labels)}``.

  Raises:
    ValueError: on bad images, a label count that differs from ``N``, or unknown names /
      severities (checked before any work).
  """
  images = _check_images(images)
  labels = np.asarray(labels)
  if labels.shape[:1] != images.shape[:1]:
    raise ValueError(f"labels {labels.shape} do not match images {images.shape}")
  names = list(CORRUPTIONS) if names is None else list(names)
  severities = list(severities)
  for n in names:
    for s in severities:
      _check_name_severity(n, s, table)
  return {(n, s): (corrupt(images, n, s, seed, table), labels) for n in names for s in severities}
