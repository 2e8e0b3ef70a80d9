import numpy as np
from PIL import Image

from cft_jax import plots


def test_plots_write_pngs(tmp_path):
  R = [[90.0, None], [70.0, 80.0]]
  p = str(tmp_path / "h.png")
  plots.accuracy_heatmap(np.array(R, float), p)
  im = Image.open(p)
  assert im.size[0] > 50 and im.size[1] > 50
  p2 = str(tmp_path / "a.png")
  plots.accuracy_vs_task({"ce": [90, 75], "aepg": [91, 78]}, p2, stds={"ce": [1, 2]})
  assert Image.open(p2).size[0] > 100
  recs = [{"global_step": i, "entropy": 1.0 / (i + 1), "alpha": 1 - i / 10, "task": i // 5}
          for i in range(10)]
  p3 = str(tmp_path / "e.png")
  plots.entropy_alpha_vs_step(recs, p3)
  assert Image.open(p3).size[0] > 100
  np.testing.assert_allclose(plots.seen_task_means(np.array(R, float)), [90.0, 75.0])


def test_task_boundaries_ticks_and_task_ids_are_0_based(tmp_path):
  """Issue 26 item 6: boundaries at the steps where tasks start (32, 64 for 32 steps a task,
  logged every 5 steps: not 37, 69), integer ticks 0..T-1 on accuracy_vs_task."""
  recs = [{"task": t, "step": s, "global_step": 32 * t + s, "entropy": 1.0, "alpha": 0.5}
          for t in range(3) for s in list(range(5, 32, 5)) + [32]]
  fig = plots.entropy_alpha_vs_step(recs)
  for ax in fig.axes:
    xs = sorted({float(line.get_xdata()[0]) for line in ax.lines if line.get_linestyle() == "--"})
    assert xs == [32.0, 64.0]
  fig = plots.accuracy_vs_task({"class_il": [90, 70, 60]})
  np.testing.assert_array_equal(fig.axes[0].get_xticks(), [0, 1, 2])
  assert fig.axes[0].get_xlabel() == "after training task t"
  assert [float(x) for x in fig.axes[0].lines[0].get_xdata()] == [0.0, 1.0, 2.0]


def test_heatmap_rows_name_each_tasks_classes():
  """Issue 27 item 1: the accuracy matrices name each task's classes (class order), e.g. Split
  Tiny-ImageNet's readable WordNet names; without names (or unequal tasks) the rows are ids."""
  names = ["goldfish", "bullfrog", "trilobite", "scorpion", "tarantula", "goose"]
  assert plots.task_labels(names, 3) == ["0: goldfish, bullfrog", "1: trilobite, scorpion",
                                         "2: tarantula, goose"]
  assert plots.task_labels(names, 2) == ["0: goldfish, bullfrog +1", "1: scorpion, tarantula +1"]
  assert plots.task_labels(names[:5], 2) == ["0", "1"]          # 5 classes do not split in 2
  R = np.array([[90.0, np.nan], [70.0, 80.0]])
  fig = plots.accuracy_heatmap(R, class_names=names[:4])
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
      "0: goldfish, bullfrog", "1: trilobite, scorpion"]
  fig = plots.accuracy_heatmap(R)
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1"]
