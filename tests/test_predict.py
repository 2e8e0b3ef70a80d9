"""``cft_jax.load_run`` / ``python -m cft_jax.predict`` (issue 26, item 4): predictions of a
finished run reproduce its ``metrics.json`` accuracies exactly — sequential, LAE (max-softmax
ensemble of two parameter sets) and WiSE-FT (evaluated at ``(1 - a) theta_0 + a theta``), on the
in-memory path and on a streamed image folder (host test transform)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import cft_jax
from cft_jax import predict, train
from tests.test_train import HAS_FMNIST, tiny_config

needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")


def _accuracies(predictor, exp, images_of):
  """Per-task class-IL test accuracy (%) of the predictor's ids, as the evaluation counts it."""
  sc = exp.scenario
  accs = []
  for i in range(sc.num_tasks):
    idx = sc.test_idx[i]
    ids, probs = predictor.predict(images_of(idx))
    assert probs.shape == (len(idx), predictor.num_seen)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.argmax(probs, 1), ids)
    accs.append(100.0 * np.mean(ids == sc.test_labels[idx]))
  return accs


def _check_reproduces(workdir, images_of=None):
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  predictor = cft_jax.load_run(workdir)
  assert predictor.class_names == tuple(metrics["class_names"])
  exp = train.build_experiment(predictor.config)
  accs = _accuracies(predictor, exp, images_of or (lambda idx: exp.ds.test_images[idx]))
  np.testing.assert_allclose(accs, metrics["accuracy_matrix"][-1], atol=1e-4)  # 4-digit JSON
  assert round(float(np.mean(accs)), 4) == round(metrics["final_accuracy"], 4)
  assert 0 < metrics["final_accuracy"] < 100  # a result the predictor could get wrong
  return predictor, metrics


@needs_fmnist
@pytest.mark.parametrize("overrides", [
    {}, {"method.name": "lae", "method.freeze_epochs": 1},
    {"eval.wise_ft_alpha": 0.5}], ids=["sequential", "lae", "wise_ft"])
def test_predictions_reproduce_final_accuracy(tmp_path, overrides):
  config = tiny_config(**{"scenario.num_tasks": 2, "train.epochs": 2, "loss.name": "ce",
                          "optim.learning_rate": 0.01, "train.batch_size": 16, **overrides})
  train.run(config, str(tmp_path / "run"))
  predictor, _ = _check_reproduces(str(tmp_path / "run"))
  if overrides.get("method.name") == "lae":  # two parameter sets: online and offline (EMA)
    assert predictor.config.method.name == "lae"
    assert predictor._method_state["active"] > 0  # pylint: disable=protected-access


def test_streamed_run_and_cli(tmp_path, capsys):
  from tests.data.test_input_pipeline import _folder, _stream_config  # pylint: disable=g-import-not-at-top
  root = _folder(str(tmp_path / "f"), classes=("a", "b", "c", "d"), n=(6, 3), size=(20, 28))
  workdir = str(tmp_path / "run")
  train.run(_stream_config(root, **{"loss.name": "ce", "optim.learning_rate": 0.02}), workdir)
  holder = {}

  def originals(idx):  # the decoded files: the predictor applies the test transform itself
    return [holder["exp"].ds.test[int(i)] for i in idx]

  orig_build = train.build_experiment

  def build(config):
    holder["exp"] = orig_build(config)
    return holder["exp"]

  train.build_experiment = build
  try:
    predictor, metrics = _check_reproduces(workdir, originals)
  finally:
    train.build_experiment = orig_build
  assert predictor.host_transform is not None
  paths = holder["exp"].ds.test.paths[:2]
  assert predict.main(["--workdir", workdir, "--top_k", "2", *paths]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  expected = predictor.top_k([Image.open(p) for p in paths], 2)
  assert lines == [f"{p}: " + ", ".join(f"{n} {s:.3f}" for n, s in row)
                   for p, row in zip(paths, expected)]
  assert all(n in metrics["class_names"] for row in expected for n, _ in row)
  assert predict.main(["--workdir", str(tmp_path / "nothing"), paths[0]]) == 1
  assert "is not a cft_jax run folder" in capsys.readouterr().err
