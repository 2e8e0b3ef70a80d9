"""configs/cifar10.py: every ``:arg`` builds and validates, and a tiny run of each (tiny_cnn +
LoRA, 32 px, one task; LAE two) trains through the real trainer on a few images copied from
cifar10-mini; the natural-images study's configs build too. Studies themselves run outside CI."""

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest

from cft_jax import train
from cft_jax.config import ConfigError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


CIFAR = _load(os.path.join(REPO, "configs", "cifar10.py"), "test_cifar10_config_mod")
LOSSES = ("ce", "epg", "aepg", "confidence_penalty", "label_smoothing", "focal",
          "entropy_penalty", "reinforce")
ARGS = [f"{loss},sequential" for loss in LOSSES] + ["ce,lae", "aepg,lae", "ce,er", "ce,derpp"]


def test_default_root_is_the_shared_folder(monkeypatch):
  monkeypatch.delenv(CIFAR.ENV_ROOT, raising=False)
  assert CIFAR.default_root() == os.path.normpath(
      os.path.join(REPO, "..", "shared", "data", "cifar10-mini"))
  monkeypatch.setenv(CIFAR.ENV_ROOT, "/data/c10")
  assert CIFAR.get_config("ce").data.root == "/data/c10"


def test_shared_folder_layout():
  root = CIFAR.default_root()
  if not os.path.isdir(root):
    pytest.skip(f"cifar10-mini not at {root}")
  classes = sorted(os.listdir(os.path.join(root, "train")))
  assert len(classes) == 10 and sorted(os.listdir(os.path.join(root, "test"))) == classes
  assert len(os.listdir(os.path.join(root, "train", classes[0]))) == 1000
  assert len(os.listdir(os.path.join(root, "test", classes[0]))) == 200


@pytest.mark.parametrize("arg", ARGS + ["aepg", "", None])
def test_every_arg_builds_and_validates(arg):
  c = CIFAR.get_config(arg) if arg is not None else CIFAR.get_config()
  loss, _, method = (arg or "aepg").partition(",")
  assert (c.loss.name, c.method.name) == (loss, method or "sequential")
  assert c.data.name == "image_folder" and c.data.image_size >= 64 and c.train.epochs >= 2
  assert c.data.val_fraction > 0 and c.model.name == "efficientnet_lite0" and c.model.pretrained
  assert c.scenario.num_tasks == 5
  validate_config(c)
  if loss == "confidence_penalty":
    assert c.loss.beta == 0.1          # the objectives study's (paper's) value
  # replay (er / derpp): CE over every seen output, as mammoth; otherwise the paper's local loss
  assert c.loss.scope == ("all" if method in ("er", "derpp") else "local")
  if loss == "aepg":
    assert (c.loss.schedule, c.loss.tau, c.loss.schedule_scope) == ("sigmoid", 6.0, "task")


@pytest.mark.parametrize("arg", ["xent", "ce,ewc", "ce,lae,extra"])
def test_bad_arg_is_one_clean_error(arg):
  with pytest.raises(ConfigError, match=r"expected loss in .* e\.g\. configs/cifar10\.py:aepg,lae"):
    CIFAR.get_config(arg)


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
  """4 training and 2 test images of each class copied from cifar10-mini (same layout)."""
  src = CIFAR.default_root()
  if not os.path.isdir(src):
    pytest.skip(f"cifar10-mini not at {src}")
  dst = str(tmp_path_factory.mktemp("cifar10_tiny"))
  for split, n in (("train", 5), ("test", 2)):
    for cls in sorted(os.listdir(os.path.join(src, split))):
      os.makedirs(os.path.join(dst, split, cls))
      for fn in sorted(os.listdir(os.path.join(src, split, cls)))[:n]:
        shutil.copy(os.path.join(src, split, cls, fn), os.path.join(dst, split, cls, fn))
  return dst


def _tiny(c, root, model="tiny_cnn"):
  c.data.root = root
  c.data.image_size = 32
  c.model.name = model
  c.model.pretrained = model != "tiny_cnn"   # tiny_cnn: random, with LoRA like Lite0
  c.checkpoint.max_to_keep = 1
  c.data.val_fraction = 0.2           # 2 of the 2 x 5 training images per task
  c.train.epochs = 1
  c.train.batch_size = 4
  c.eval.batch_size = 8
  c.train.progress = c.train.verbose = c.train.plots = c.train.tensorboard = False
  return c


@pytest.mark.parametrize("arg", ARGS[1:])
def test_tiny_run_of_every_arg(arg, mini_root, tmp_path):
  c = _tiny(CIFAR.get_config(arg), mini_root)
  # LAE: also the first task switch (its offline copy); replay: task 2 draws from the buffer
  n = 2 if arg.split(",")[-1] in ("lae", "er", "derpp") else 1
  c.train.stop_after_task = n
  R = np.array(train.run(c, str(tmp_path))["accuracy_matrix"], float)
  assert np.all(np.isfinite(np.tril(R[:n, :n]))) and np.all(np.isnan(R[n:]))


def test_tiny_full_run(mini_root, tmp_path):
  c = _tiny(CIFAR.get_config(ARGS[0]), mini_root)
  m = train.run(c, str(tmp_path))
  R = np.array(m["accuracy_matrix"], float)
  assert R.shape == (5, 5) and np.all(np.isfinite(np.tril(R)))
  assert m["class_names"][:2] == ["deer", "airplane"]   # class order of scenario.seed 1993
  assert m["train_step_compilations"] == 1
  V = np.array(m["val_accuracy_matrix"], float)   # data.val_fraction > 0: validation metrics
  assert V.shape == (5, 5) and np.all(np.isfinite(np.tril(V))) and np.all(np.isnan(V[np.triu_indices(5, 1)]))
  assert m["val"]["final_accuracy"] == pytest.approx(np.mean(V[-1]))


@pytest.mark.parametrize("dataset", ["cifar10", "tiny_imagenet"])
def test_natural_images_study_configs_build(dataset):
  """Every arm of every study of both datasets builds a valid config: tuning runs evaluate only
  the validation split; each arm's own values land on its keys."""
  sys.path.insert(0, os.path.join(REPO, "studies"))
  study = _load(os.path.join(REPO, "studies", "natural_images.py"), "test_natural_images_mod")
  args = study.argparse.Namespace(val_fraction=0.1, data_root="", train_limit=None,
                                  test_limit=None, image_size=None, epochs=None, dataset=dataset,
                                  learning_rate=None, set=["train.epochs=4", "model.name=tiny_cnn"])
  for name in study.DATASETS[dataset]["studies"]:
    spec = study.STUDIES[name]
    for arm in study.study_arms(dataset, name):
      value = arm.grid[-1] if arm.grid else None
      c = study.natural_config(arm, 3, args, spec["lr_grid"][0], value, tuning=True)
      assert c.data.name == "image_folder" and c.data.val_fraction == 0.1 and c.seed == 3
      assert (c.train.epochs, c.model.name) == (4, "tiny_cnn")     # --set
      assert c.optim.learning_rate == spec["lr_grid"][0] and not c.eval.ood_corruptions
      assert c.eval.test is False                                    # tuning: validation only
      assert dataset.replace("_", "-") in c.data.root
      for key, v in zip(study._keys(arm), value if isinstance(arm.key, tuple) else (value,)):
        section, k = key.split(".")
        assert c[section][k] == v
      validate_config(c)
      assert study.natural_config(arm, 3, args).eval.test is True  # final runs: the test split


@pytest.mark.parametrize("pipeline", ["grain", "device"])
def test_validation_split_is_evaluated_like_test(pipeline, mini_root, tmp_path):
  """With a test folder holding exactly the validation images, the validation matrices equal the
  test ones (same images, same model, same evaluation); the test images never enter training."""
  from cft_jax import scenarios  # pylint: disable=g-import-not-at-top
  from cft_jax.data import load_dataset  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / "data")
  shutil.copytree(os.path.join(mini_root, "train"), os.path.join(root, "train"))
  shutil.copytree(os.path.join(mini_root, "train"), os.path.join(root, "test"))
  c = validate_config(_tiny(CIFAR.get_config("ce"), root))
  c.scenario.num_tasks = 2
  c.scenario.shuffle_classes = False
  c.data.pipeline = pipeline
  c.data.val_fraction = 0.4                  # 10 of the 25 training images of each task
  ds = load_dataset("image_folder", root=root, image_size=32)
  for seed in range(50):  # a seed whose validation split has every class (the folder needs it)
    c.seed = seed
    sc = scenarios.build_scenario(c, ds.train_labels, ds.test_labels, ds.num_classes)
    val = set(np.concatenate(sc.val_idx).tolist())
    if len(set(ds.train_labels[sorted(val)].tolist())) == 10:
      break
  assert len(val) == 20                       # 2 tasks x 5 classes x 5 images x 0.4
  for i, name in enumerate(sorted(os.listdir(os.path.join(root, "train")))):  # keep val images
    files = sorted(os.listdir(os.path.join(root, "test", name)))
    offset = sum(len(os.listdir(os.path.join(root, "train", n)))
                 for n in sorted(os.listdir(os.path.join(root, "train")))[:i])
    for j, fn in enumerate(files):
      if offset + j not in val:
        os.remove(os.path.join(root, "test", name, fn))
  m = train.run(c, str(tmp_path / "run"))
  R, V = (np.array(m[k], float) for k in ("accuracy_matrix", "val_accuracy_matrix"))
  assert V.shape == (2, 2) and np.all(np.isfinite(np.tril(V)))
  np.testing.assert_array_equal(V, R)
  np.testing.assert_array_equal(np.array(m["val_task_il_accuracy_matrix"], float),
                                np.array(m["task_il_accuracy_matrix"], float))
  assert m["val"]["final_accuracy"] == m["final_accuracy"]
  assert m["val_task_il"]["final_accuracy"] == m["task_il"]["final_accuracy"]
