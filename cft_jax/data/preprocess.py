"""Host-side per-example preprocessing as the field does it (NumPy + PIL, one image at a time).

These functions run inside the input pipeline's worker threads / processes
(:mod:`cft_jax.data.loader`), on the *decoded original* image, before any resizing:

- **train**: ``RandomResizedCrop`` (Szegedy et al. 2015, "Going deeper with convolutions", Sec. 6;
  the torchvision algorithm: area fraction ~ U(``scale``), log aspect ratio ~
  U(log 3/4, log 4/3), 10 tries, then a centre crop of the clamped ratio) resized to
  ``size x size`` with bilinear interpolation, then a horizontal flip with probability 1/2;
- **test**: the ImageNet / ViT evaluation convention (Dosovitskiy et al. 2021; timm's
  ``crop_pct = 0.875``): resize the shorter side to ``round(size / crop_fraction)`` and take
  the centre ``size x size`` crop; images no larger than ``size`` on both sides (CIFAR at
  224 px, MNIST) are instead resized to ``size x size`` directly (upsampling has no border to
  crop). ``crop_fraction=1`` gives resize-shorter-side + centre crop with no margin.

Every image is converted to 3-channel RGB first: grey (``[H, W]`` or ``[H, W, 1]``), 16-bit grey
(PIL ``I;16``, scaled to 8 bits), palette, CMYK and RGBA (alpha dropped) all work, and images of
any size mix in one dataset.
Randomness is an explicit ``numpy.random.Generator`` (the loader seeds one per example from
``(seed, task, step, slot)``), so outputs are reproducible and independent of worker count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple, Union

import numpy as np
from PIL import Image

ImageLike = Union[np.ndarray, "Image.Image"]
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _to_8bit(im: "Image.Image") -> "Image.Image":
  """A 16-bit grey image (PIL ``I;16*``, or ``I`` holding values above 255: 16-bit PNGs) as
  8-bit ``L``, ``v -> round(v / 257)`` (65535 -> 255); PIL's own ``convert`` clips at 255 and
  turns such an image almost all white."""
  a = np.asarray(im)
  if im.mode.startswith("I;16") or a.max(initial=0) > 255:
    a = np.round(a.astype(np.float64) / 257.0)
  return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")


def to_rgb_image(img: ImageLike) -> "Image.Image":
  """Any decoded image (PIL, or uint8 ``[H, W]`` / ``[H, W, 1|3|4]``) as an RGB PIL image.

  16-bit grey images (``I;16``) are scaled to 8 bits first (:func:`_to_8bit`).

  Raises:
    ValueError: an array that is not 2-D or 3-D with 1, 3 or 4 channels.
  """
  if isinstance(img, Image.Image):
    if img.mode.startswith("I;16") or img.mode == "I":
      img = _to_8bit(img)
    return img if img.mode == "RGB" else img.convert("RGB")
  a = np.asarray(img)
  if a.dtype != np.uint8:
    a = np.clip(a, 0, 255).astype(np.uint8)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    return Image.fromarray(a, "L").convert("RGB")
  if a.ndim == 3 and a.shape[-1] == 3:
    return Image.fromarray(a, "RGB")
  if a.ndim == 3 and a.shape[-1] == 4:
    return Image.fromarray(a, "RGBA").convert("RGB")
  raise ValueError(f"expected an image [H, W] or [H, W, 1|3|4], got shape {a.shape}")


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = (0.08, 1.0),
                            ratio: Tuple[float, float] = RATIO) -> Tuple[int, int, int, int]:
  """The crop box of torchvision's ``RandomResizedCrop.get_params`` (same algorithm).

  Args:
    height, width: image size in pixels.
    rng: the example's generator.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop's width / height (sampled log-uniformly).

  Returns:
    ``(top, left, crop_height, crop_width)`` in pixels, inside the image.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height  # fallback: centre crop with the ratio clamped to the range
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(img: ImageLike, size: int, rng: np.random.Generator,
                             scale: Tuple[float, float] = (0.08, 1.0),
                             ratio: Tuple[float, float] = RATIO, flip: bool = True,
                             resample: str = "bilinear") -> np.ndarray:
  """Training transform: RandomResizedCrop of the original image + horizontal flip.

  Returns:
    uint8 ``[size, size, 3]``.
  """
  im = to_rgb_image(img)
  top, left, h, w = random_resized_crop_box(im.height, im.width, rng, scale, ratio)
  out = im.resize((size, size), _RESAMPLE[resample], box=(left, top, left + w, top + h))
  a = np.asarray(out, dtype=np.uint8)
  if flip and rng.uniform() < 0.5:
    a = a[:, ::-1]
  return np.ascontiguousarray(a)


def resize_center_crop(img: ImageLike, size: int, crop_fraction: float = 0.875,
                       resample: str = "bilinear") -> np.ndarray:
  """Evaluation transform: shorter side to ``round(size / crop_fraction)``, centre crop.

  Images with both sides ``<= size`` are resized to ``size x size`` instead (no crop).

  Returns:
    uint8 ``[size, size, 3]``.

  Raises:
    ValueError: ``crop_fraction`` outside ``(0, 1]``.
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"data.test_crop_fraction must be in (0, 1], got {crop_fraction}")
  im = to_rgb_image(img)
  W, H = im.width, im.height
  if W <= size and H <= size:
    if (W, H) != (size, size):
      im = im.resize((size, size), _RESAMPLE[resample])
    return np.asarray(im, dtype=np.uint8)
  short = int(round(size / crop_fraction))
  if W <= H:
    nw, nh = short, max(short, int(round(H * short / W)))
  else:
    nh, nw = short, max(short, int(round(W * short / H)))
  top, left = (nh - size) // 2, (nw - size) // 2
  # Resize only the region that survives the crop (same pixels as resize-then-crop).
  sx, sy = W / nw, H / nh
  box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
  out = im.resize((size, size), _RESAMPLE[resample], box=box)
  return np.asarray(out, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class HostTransform:
  """The per-example transform of one split (picklable, for grain worker processes).

  Attributes:
    image_size: output side ``S`` in pixels.
    train: RandomResizedCrop + flip (True) or resize + centre crop (False).
    augment: ``"rrc_flip"`` (train transform above), ``"crop_flip"`` (resize the original to
      ``S`` then random translation by up to ``crop_padding`` px, zero padded, + flip: the
      CIFAR-style augmentation) or ``"none"`` (the test transform also for training).
    rrc_scale, rrc_ratio: RandomResizedCrop ranges (``data.rrc_scale``, ``data.rrc_ratio``).
    crop_fraction: ``data.test_crop_fraction`` (0.875: ImageNet/ViT; 1: no margin).
    crop_padding: ``crop_flip`` translation in pixels.
    resample: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"``.
  """

  image_size: int
  train: bool = False
  augment: str = "rrc_flip"
  rrc_scale: Tuple[float, float] = (0.08, 1.0)
  rrc_ratio: Tuple[float, float] = RATIO
  crop_fraction: float = 0.875
  crop_padding: int = 4
  resample: str = "bilinear"

  def __post_init__(self):
    if self.augment not in ("none", "crop_flip", "rrc_flip"):
      raise ValueError(f"data.augment must be none | crop_flip | rrc_flip, got '{self.augment}'")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"data.resample must be one of {sorted(_RESAMPLE)}, got "
                       f"'{self.resample}'")

  def __call__(self, img: ImageLike, rng: np.random.Generator) -> np.ndarray:
    """``img`` (decoded original, any size / mode) -> uint8 ``[S, S, 3]``."""
    S = self.image_size
    if not self.train or self.augment == "none":
      return resize_center_crop(img, S, self.crop_fraction, self.resample)
    if self.augment == "rrc_flip":
      return random_resized_crop_flip(img, S, rng, self.rrc_scale, self.rrc_ratio,
                                      resample=self.resample)
    a = resize_center_crop(img, S, self.crop_fraction, self.resample)  # crop_flip
    p = self.crop_padding
    padded = np.pad(a, ((p, p), (p, p), (0, 0)))
    dy, dx = rng.integers(0, 2 * p + 1, size=2)
    a = padded[dy:dy + S, dx:dx + S]
    if rng.uniform() < 0.5:
      a = a[:, ::-1]
    return np.ascontiguousarray(a)
