"""configs/tiny_imagenet.py: Split Tiny-ImageNet, 10 tasks x 20 classes (issue 27). CI checks that
every preset builds and validates, and that one tiny run reads the shared folder (readable class
names from classes.tsv into metrics.json); the real budget runs in studies/natural_images.py."""

import os

import numpy as np
import pytest

from cft_jax import train
from cft_jax.config import load_config_module, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIN = load_config_module(os.path.join(REPO, "configs", "tiny_imagenet.py"), "test_tin_config")


@pytest.mark.parametrize("arg", [None, "ce", "aepg", "epg", "focal,lae", "ce,er", "ce,derpp", "ce,dlcft",
                                 "label_smoothing,sequential", "confidence_penalty,lae"])
def test_every_preset_builds_the_papers_task_shape(arg):
  c = validate_config(TIN.get_config(arg))
  assert (c.scenario.num_tasks, c.scenario.seed, c.data.image_size) == (10, 1993, 64)
  assert c.data.name == "image_folder" and c.data.root.endswith("tiny-imagenet-mini")
  assert c.data.val_fraction == 0.1 and c.data.train_limit == 0 and c.data.test_limit == 0
  assert c.model.name == "efficientnet_lite0" and c.peft.name == "lora"
  if arg and arg.endswith(("er", "derpp")):
    assert c.loss.scope == "all"          # replay: CE over every seen class
  if arg == "ce,dlcft":                   # DLCFT's own recipe: linearized, MSE, buffer 500
    assert (c.model.linearize, c.loss.name, c.method.buffer_size) == ("features", "mse", 500)


def test_a_bad_preset_names_the_allowed_values():
  with pytest.raises(ValueError, match="configs/tiny_imagenet.py:aepg,lae"):
    TIN.get_config("ce,xyz")


def test_one_tiny_run_on_the_shared_folder(tmp_path):
  root = TIN.default_root()
  if not os.path.isdir(os.path.join(root, "train")):
    pytest.skip(f"tiny-imagenet-mini not at {root}")
  c = TIN.get_config("ce")
  c.model.name, c.model.pretrained, c.data.image_size = "tiny_cnn", False, 16
  c.data.train_limit, c.data.test_limit = 40, 20
  c.train.progress = c.train.plots = c.train.verbose = c.train.tensorboard = False
  m = train.run(c, str(tmp_path / "run"))
  R = np.array(m["accuracy_matrix"], float)
  assert R.shape == (10, 10) and np.all(np.isfinite(np.tril(R)))
  assert len(m["class_names"]) == 200 and "goldfish" in m["class_names"]   # classes.tsv
  assert not any(n.startswith("n0") for n in m["class_names"])            # no bare WordNet ids
  assert m["val"]["final_accuracy"] >= 0 and m["provenance"]["cpu_model"]
