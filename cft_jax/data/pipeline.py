"""Input pipeline: seeded batching on the host, preprocessing on the device.

Host side (NumPy): per-task index selection, per-epoch shuffles drawn from
``np.random.default_rng((seed, task_id, epoch))`` so a resumed run sees the same batches, and
fixed-shape batches padded with a validity mask (no example is dropped, nothing recompiles).

Device side (pure JAX, runs inside the jitted step): ``uint8 [B, h, w, c]`` -> grey-to-RGB ->
bilinear resize to ``image_size`` -> optional random translation + horizontal flip ->
``(x - mean) / std``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Static preprocessing description (hashable, closed over by jitted steps).

  Attributes:
    image_size: output side ``S`` in pixels.
    mean: value subtracted from RGB pixels in ``[0, 255]`` (backbone normalisation).
    std: divisor applied after the subtraction.
    augment: ``"none"``, ``"crop_flip"`` (random translation by up to ``crop_padding`` pixels
      of the resized image, zero padded, and horizontal flip with probability 1/2) or
      ``"rrc_flip"`` (torchvision-style RandomResizedCrop with area fraction in
      ``rrc_scale`` and aspect ratio in [3/4, 4/3], then flip; the aEPG/LAE paper setup uses
      ``rrc_scale=(0.05, 1.0)``).
    crop_padding: maximal translation in output pixels.
    rrc_scale: area-fraction range of ``rrc_flip``.
  """

  image_size: int
  mean: float = 127.0
  std: float = 128.0
  augment: str = "none"
  crop_padding: int = 4
  rrc_scale: Tuple[float, float] = (0.05, 1.0)

  def __post_init__(self):
    if self.augment not in ("none", "crop_flip", "rrc_flip"):
      raise ValueError("data.augment must be 'none', 'crop_flip' or 'rrc_flip', got "
                       f"'{self.augment}'")

  def __call__(self, images: jax.Array, rng: Optional[jax.Array] = None,
               train: bool = False, rows: Optional[Tuple[Any, int]] = None) -> jax.Array:
    """Maps ``uint8 [B, h, w, 1|3]`` to normalised ``float32 [B, S, S, 3]``.

    Augmentation runs only when ``train`` is True and needs ``rng``. ``rows = (offset, total)``
    says that ``images`` are rows ``[offset, offset + B)`` of a global batch of ``total``
    examples (one device's shard under ``pmap``; ``offset`` may be traced): the random crop /
    flip parameters are then drawn for the whole global batch and sliced, so every example is
    augmented exactly as in a one-device run, whatever the device count.
    """
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    B, h, w, _ = x.shape
    S = self.image_size
    if train and self.augment != "none" and rng is None:
      raise ValueError("augmentation needs an rng")
    if train and self.augment == "rrc_flip":
      x = _random_resized_crop_flip(x, rng, S, self.rrc_scale, rows)
      return (x - self.mean) / self.std
    if (h, w) != (S, S):
      x = jax.image.resize(x, (B, S, S, 3), method="bilinear", antialias=(h > S or w > S))
    if train and self.augment == "crop_flip":
      x = _crop_flip(x, rng, self.crop_padding, rows)
    return (x - self.mean) / self.std


def _rows(draw, B: int, rows: Optional[Tuple[Any, int]]) -> jax.Array:
  """``draw(n)`` (leading axis ``n``) for this batch: ``n = B``, or rows ``[offset, offset + B)``
  of the draw for the global batch when ``rows = (offset, total)``."""
  if rows is None:
    return draw(B)
  offset, total = rows
  return jax.lax.dynamic_slice_in_dim(draw(total), offset, B, axis=0)


def _crop_flip(x: jax.Array, rng: jax.Array, pad: int,
               rows: Optional[Tuple[Any, int]] = None) -> jax.Array:
  """Random translation (zero padding, up to ``pad`` px) and horizontal flip, per example."""
  B, S, _, C = x.shape
  k_shift, k_flip = jax.random.split(rng)
  shifts = _rows(lambda n: jax.random.randint(k_shift, (n, 2), 0, 2 * pad + 1), B, rows)
  flips = _rows(lambda n: jax.random.bernoulli(k_flip, 0.5, (n,)), B, rows)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(img, shift, flip):
    out = jax.lax.dynamic_slice(img, (shift[0], shift[1], 0), (S, S, C))
    return jnp.where(flip, out[:, ::-1], out)

  return jax.vmap(one)(xp, shifts, flips)


def _random_resized_crop_flip(x: jax.Array, rng: jax.Array, size: int,
                              scale: Tuple[float, float],
                              rows: Optional[Tuple[Any, int]] = None) -> jax.Array:
  """RandomResizedCrop (area fraction ~ U(scale), log-ratio ~ U(log 3/4, log 4/3)) + flip.

  ``x [B, h, w, 3]`` float -> ``[B, size, size, 3]``; crops are clipped to the image (the
  torchvision fallback of 10 retries is replaced by clipping, which keeps the step static).
  """
  B, h, w, _ = x.shape
  k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(rng, 5)
  area = _rows(lambda n: jax.random.uniform(k_area, (n,), minval=scale[0], maxval=scale[1]),
               B, rows) * h * w
  log_r = _rows(lambda n: jax.random.uniform(k_ratio, (n,), minval=np.log(3 / 4),
                                             maxval=np.log(4 / 3)), B, rows)
  ratio = jnp.exp(log_r)
  cw = jnp.clip(jnp.sqrt(area * ratio), 1.0, w)
  ch = jnp.clip(jnp.sqrt(area / ratio), 1.0, h)
  y0 = _rows(lambda n: jax.random.uniform(k_y, (n,)), B, rows) * (h - ch)
  x0 = _rows(lambda n: jax.random.uniform(k_x, (n,)), B, rows) * (w - cw)
  flips = _rows(lambda n: jax.random.bernoulli(k_flip, 0.5, (n,)), B, rows)

  def one(img, y0, x0, ch, cw, flip):
    sy, sx = size / ch, size / cw
    out = jax.image.scale_and_translate(img, (size, size, 3), (0, 1), jnp.stack([sy, sx]),
                                        jnp.stack([-y0 * sy, -x0 * sx]), method="linear",
                                        antialias=True)
    return jnp.where(flip, out[:, ::-1], out)

  return jax.vmap(one)(x, y0, x0, ch, cw, flips)


def subsample(indices: np.ndarray, limit: Optional[int], seed: int) -> np.ndarray:
  """Keeps at most ``limit`` of ``indices`` (a seeded random subset, original order kept)."""
  if limit is None or limit <= 0 or limit >= len(indices):
    return indices
  keep = np.random.default_rng(seed).choice(len(indices), size=limit, replace=False)
  return indices[np.sort(keep)]


def num_batches(n: int, batch_size: int) -> int:
  """Batches per epoch for ``n`` examples (the last one padded)."""
  return -(-n // batch_size)


def batches(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch_size: int,
            shuffle_seed: Optional[Tuple[int, ...]] = None
            ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields fixed-shape batches ``(images [B,h,w,c] uint8, labels [B] int32, mask [B] bool)``.

  The last batch is padded by repeating index 0 with ``mask=False``, so every batch has
  shape ``B`` and no example is dropped.

  Args:
    images: ``[N, h, w, c]`` uint8 array.
    labels: ``[N]`` int32.
    indices: the examples to iterate over.
    batch_size: ``B``.
    shuffle_seed: seed tuple of the permutation (None: keep order).
  """
  idx = np.asarray(indices)
  if shuffle_seed is not None:
    idx = idx[np.random.default_rng(shuffle_seed).permutation(len(idx))]
  for start in range(0, len(idx), batch_size):
    chunk = idx[start:start + batch_size]
    mask = np.zeros(batch_size, bool)
    mask[:len(chunk)] = True
    if len(chunk) < batch_size:
      chunk = np.concatenate([chunk, np.full(batch_size - len(chunk), idx[0])])
    yield images[chunk], labels[chunk], mask
