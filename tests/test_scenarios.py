import numpy as np
import pytest

from cft_jax import scenarios


def test_class_incremental_relabels_contiguously():
  sc = scenarios.class_incremental(10, 5, seed=3)
  assert sorted(sc.class_order) == list(range(10))
  assert sc.classes_per_task == 2 and sc.task_range(3) == (6, 8)
  orig = np.array(sc.class_order)
  np.testing.assert_array_equal(sc.relabel(orig), np.arange(10))
  # same seed -> same order; another seed -> another order
  assert scenarios.class_incremental(10, 5, seed=3).class_order == sc.class_order
  assert scenarios.class_incremental(10, 5, seed=4).class_order != sc.class_order
  assert scenarios.class_incremental(10, 5, shuffle_classes=False).class_order == tuple(range(10))


def test_errors():
  with pytest.raises(ValueError, match="does not divide"):
    scenarios.class_incremental(10, 3)
  with pytest.raises(ValueError, match="labels must be in"):
    scenarios.class_incremental(10, 5).relabel(np.array([10]))
