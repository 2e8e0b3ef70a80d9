"""Tests for cft_jax.data.corruptions (ImageNet-C / CIFAR-10-C style OOD sets)."""

import numpy as np
import pytest

from cft_jax.data import corruptions as C

MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
            "defocus_blur", "contrast", "pixelate", "brightness")


def _images(c=3, n=2, size=16, seed=0):
  """Noise plus a horizontal ramp: texture for the blurs, mid-range values for the noises."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 255, size)[None, None, :, None]
  x = 0.5 * rng.integers(0, 256, (n, size, size, c)) + 0.5 * ramp
  return x.astype(np.uint8)


def _mad(a, b):
  return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("name", sorted(C.CORRUPTIONS))
def test_shape_dtype_and_determinism(name, c):
  x = _images(c)
  a = C.corrupt(x, name, 3, seed=7)
  assert a.shape == x.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, C.corrupt(x, name, 3, seed=7))


@pytest.mark.parametrize("name", MONOTONE)
def test_severity_monotone(name):
  x = _images(3, size=32)
  d = [_mad(C.corrupt(x, name, s, seed=0), x) for s in C.SEVERITIES]
  assert d[0] > 0 and all(d1 < d2 for d1, d2 in zip(d, d[1:])), d


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "contrast"])
def test_severity_monotone_imagenet_table(name):
  x = _images(3, size=32)
  d = [_mad(C.corrupt(x, name, s, seed=0, table="imagenet"), x) for s in C.SEVERITIES]
  assert all(d1 < d2 for d1, d2 in zip(d, d[1:])), d


def test_seed_changes_noise_only():
  x = _images()
  assert not np.array_equal(C.corrupt(x, "gaussian_noise", 2, seed=0),
                            C.corrupt(x, "gaussian_noise", 2, seed=1))
  np.testing.assert_array_equal(C.corrupt(x, "contrast", 2, seed=0),
                                C.corrupt(x, "contrast", 2, seed=1))


def test_errors_list_valid_choices():
  x = _images()
  with pytest.raises(ValueError, match="gaussian_noise"):
    C.corrupt(x, "fog", 1)
  with pytest.raises(ValueError, match=r"\[1, 2, 3, 4, 5\]"):
    C.corrupt(x, "contrast", 6)
  with pytest.raises(ValueError, match="uint8"):
    C.corrupt(x.astype(np.float32), "contrast", 1)
  with pytest.raises(ValueError, match="cifar"):
    C.corrupt(x, "contrast", 1, table="mnist")
  with pytest.raises(ValueError, match="known"):
    C.make_ood_sets(x, np.zeros(2), names=["contrast", "nope"])


def test_make_ood_sets():
  x, y = _images(n=3), np.arange(3)
  sets = C.make_ood_sets(x, y, names=["contrast", "gaussian_noise"], severities=(1, 5), seed=3)
  assert sorted(sets) == [("contrast", 1), ("contrast", 5), ("gaussian_noise", 1),
                          ("gaussian_noise", 5)]
  imgs, labels = sets[("gaussian_noise", 5)]
  np.testing.assert_array_equal(labels, y)
  np.testing.assert_array_equal(imgs, C.corrupt(x, "gaussian_noise", 5, seed=3))
  assert len(C.make_ood_sets(x, y)) == 5 * len(C.CORRUPTIONS)
  with pytest.raises(ValueError, match="labels"):
    C.make_ood_sets(x, y[:2])
