"""Metric definitions pinned on hand-written accuracy matrices (docs/methods.md#metrics)."""

import numpy as np
import pytest

from cft_jax import metrics

NAN = np.nan
R = np.array([[90.0, NAN, NAN],
              [80.0, 70.0, NAN],
              [60.0, 65.0, 50.0]])


def test_final_accuracy():
  assert metrics.final_accuracy(R) == pytest.approx((60 + 65 + 50) / 3)


def test_avg_incremental_accuracy():
  expected = (90 + (80 + 70) / 2 + (60 + 65 + 50) / 3) / 3
  assert metrics.avg_incremental_accuracy(R) == pytest.approx(expected)


def test_forgetting_uses_max_over_earlier_rows():
  # task 0: max(90, 80) - 60 = 30 ; task 1: max(70) - 65 = 5
  assert metrics.forgetting(R) == pytest.approx((30 + 5) / 2)


def test_bwt():
  # (60 - 90 + 65 - 70) / 2
  assert metrics.bwt(R) == pytest.approx(-17.5)


def test_partial_matrix_and_single_task():
  assert metrics.final_accuracy(R, num_trained=2) == pytest.approx(75.0)
  assert metrics.forgetting(R, num_trained=1) == 0.0
  assert metrics.bwt(R, num_trained=1) == 0.0
  with pytest.raises(ValueError):
    metrics.final_accuracy(np.zeros((2, 3)))


def test_format_matrix_lower_triangle():
  text = metrics.format_matrix(R)
  assert "after task 2" in text and "50.00" in text and "nan" not in text


def test_summarize_leaves_out_tasks_without_data():
  """Issue 26 item 7: a task with no validation images has a NaN column in the validation
  matrix, which made every ``metrics.json['val']`` entry NaN."""
  nan = np.nan
  V = np.array([[80.0, nan, nan], [60.0, nan, nan], [50.0, nan, 90.0]])  # task 1: no images
  out = metrics.summarize(V, test_sizes=[10, 0, 30], tasks=[True, False, True])
  assert out["final_accuracy"] == pytest.approx(70.0)                 # mean(50, 90)
  assert out["avg_incremental_accuracy"] == pytest.approx((80 + 60 + 70) / 3)
  assert out["forgetting"] == pytest.approx(30.0)                     # task 0: 80 -> 50
  assert out["bwt"] == pytest.approx(-30.0)
  assert out["final_accuracy_sample_weighted"] == pytest.approx((10 * 50 + 30 * 90) / 40)
  assert out["avg_incremental_accuracy_sample_weighted"] == pytest.approx((80 + 60 + 80) / 3)
  full = np.array([[80.0, nan, nan], [60.0, 70.0, nan], [50.0, 40.0, 90.0]])
  assert metrics.summarize(full, test_sizes=[1, 2, 3], tasks=[True] * 3) == pytest.approx(
      metrics.summarize(full, test_sizes=[1, 2, 3]))
