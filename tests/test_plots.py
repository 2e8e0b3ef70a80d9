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
