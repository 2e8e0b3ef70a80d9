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


def _scenario_config(kind, val_fraction=0.0):
  from cft_jax.config import base_config  # pylint: disable=g-import-not-at-top
  c = base_config()
  c.scenario.type, c.scenario.num_tasks, c.scenario.shuffle_classes = kind, 5, False
  c.data.train_limit, c.data.test_limit, c.data.val_fraction = 0, 0, val_fraction
  return c


def test_scenario_object_class_il_splits_and_num_seen():
  train_labels, test_labels = np.repeat(np.arange(10), 20), np.repeat(np.arange(10), 5)
  sc = scenarios.build_scenario(_scenario_config("class_il", 0.25), train_labels, test_labels, 10)
  assert not sc.shares_test_set
  assert [sc.num_seen(t) for t in range(5)] == [2, 4, 6, 8, 10]
  for t in range(5):  # 40 images per task: 10 held out, 30 trained on, all of the task's classes
    assert (len(sc.train_idx[t]), len(sc.val_idx[t]), len(sc.test_idx[t])) == (30, 10, 10)
    assert set(sc.train_labels[sc.train_idx[t]]) == {2 * t, 2 * t + 1}
    assert not set(sc.train_idx[t]) & set(sc.val_idx[t])
    np.testing.assert_array_equal(sc.test_idx[t], np.arange(10 * t, 10 * t + 10))
  np.testing.assert_array_equal(sc.all_test(), np.arange(50))
  np.testing.assert_array_equal(sc.knn_memory(1), np.sort(np.concatenate(sc.train_idx[:2])))


def test_scenario_object_data_il_shares_one_test_set_and_cumulative_data():
  train_labels, test_labels = np.repeat(np.arange(10), 20), np.repeat(np.arange(10), 5)
  sc = scenarios.build_scenario(_scenario_config("data_il"), train_labels, test_labels, 10,
                                cumulative_data=True)
  assert sc.shares_test_set and [sc.num_seen(t) for t in range(5)] == [10] * 5
  parts = scenarios.DataIncremental(10, 5, 1993).split(200)
  for t in range(5):  # joint: task t trains on the parts 0..t
    np.testing.assert_array_equal(sc.train_idx[t], np.concatenate(parts[:t + 1]))
    np.testing.assert_array_equal(sc.test_idx[t], np.arange(50))
  np.testing.assert_array_equal(sc.all_test(), np.arange(50))
  np.testing.assert_array_equal(sc.knn_memory(0), np.arange(200))


def test_scenario_errors_are_config_errors():
  from cft_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  c = _scenario_config("class_il")
  c.scenario.num_tasks = 3
  with pytest.raises(ConfigError, match="choose one of \\[1, 2, 5, 10\\]"):
    scenarios.build_scenario(c, np.arange(10), np.arange(10), 10)


def test_radius_split_is_disjoint_from_validation_and_training():
  """``data.radius_fraction`` holds TPGM's radius data out of what validation leaves: the three
  parts partition each task's images; without it TPGM's split is the validation split, and the
  validation and training parts are exactly those of a run without a radius split."""
  train_labels, test_labels = np.repeat(np.arange(10), 20), np.repeat(np.arange(10), 5)
  c = _scenario_config("class_il", 0.25)
  plain = scenarios.build_scenario(c, train_labels, test_labels, 10)
  assert plain.radius_idx is None
  np.testing.assert_array_equal(plain.radius_split(2), plain.val_idx[2])
  c.data.radius_fraction = 0.2
  sc = scenarios.build_scenario(c, train_labels, test_labels, 10)
  for t in range(5):  # 40 images: 10 validation, 8 radius, 22 training
    tr, val, rad = sc.train_idx[t], sc.val_idx[t], sc.radius_split(t)
    assert (len(tr), len(val), len(rad)) == (22, 10, 8)
    assert not (set(tr) & set(val) or set(tr) & set(rad) or set(val) & set(rad))
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, val, rad])),
                                  np.sort(np.concatenate([plain.train_idx[t], plain.val_idx[t]])))
    np.testing.assert_array_equal(val, plain.val_idx[t])  # the validation split is unchanged
