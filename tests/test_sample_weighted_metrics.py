"""Sample-weighted accuracy (accuracy over the union of seen test samples) next to the per-task
mean (issue 13)."""

import numpy as np
import pytest

from cft_jax import metrics

R = np.array([[90.0, np.nan, np.nan],
              [60.0, 80.0, np.nan],
              [50.0, 70.0, 100.0]])
SIZES = [100, 300, 100]


def test_sample_weighted_by_hand():
  # after task 0: 90; task 1: (100*60 + 300*80) / 400 = 75; task 2: (5000 + 21000 + 10000) / 500
  np.testing.assert_allclose(metrics.sample_weighted_accuracies(R, SIZES), [90.0, 75.0, 72.0])
  assert metrics.final_accuracy_sample_weighted(R, SIZES) == pytest.approx(72.0)
  assert metrics.avg_incremental_accuracy_sample_weighted(R, SIZES) == pytest.approx(79.0)
  assert metrics.final_accuracy_sample_weighted(R, SIZES, num_trained=2) == pytest.approx(75.0)
  s = metrics.summarize(R, test_sizes=SIZES)
  assert s["final_accuracy"] == pytest.approx(220.0 / 3)  # the per-task mean is unchanged
  assert s["avg_incremental_accuracy"] == pytest.approx((90.0 + 70.0 + 220.0 / 3) / 3)
  assert s["final_accuracy_sample_weighted"] == pytest.approx(72.0)
  assert s["avg_incremental_accuracy_sample_weighted"] == pytest.approx(79.0)
  assert set(metrics.summarize(R)) == {"final_accuracy", "avg_incremental_accuracy",
                                       "forgetting", "bwt"}


def test_equal_sizes_equal_the_per_task_mean_and_bad_sizes_raise():
  s = metrics.summarize(R, test_sizes=[7, 7, 7])
  assert s["final_accuracy_sample_weighted"] == pytest.approx(s["final_accuracy"])
  assert s["avg_incremental_accuracy_sample_weighted"] == pytest.approx(
      s["avg_incremental_accuracy"])
  with pytest.raises(ValueError, match="test_sizes"):
    metrics.summarize(R, test_sizes=[1, 2])
  with pytest.raises(ValueError, match="test_sizes"):
    metrics.sample_weighted_accuracies(R, [1, -1, 2])
