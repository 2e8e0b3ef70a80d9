"""Every shipped config loads, and the paper configs run end to end with a tiny ViT."""

import os

import numpy as np
import pytest

from cft_jax import config as config_lib
from cft_jax import train

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(name, arg=None):
  return config_lib.load_config(os.path.join(CONFIG_DIR, name + ".py"), arg)


COMBOS = [("lora", "ce", "sequential"), ("lora", "aepg", "sequential"),
          ("adapter", "ce", "sequential"), ("adapter", "aepg", "sequential"),
          ("prefix", "ce", "sequential"), ("prefix", "aepg", "sequential"),
          ("lora", "ce", "lae"), ("lora", "aepg", "lae")]


def test_imagenet_r_config_values():
  c = load_config("imagenet_r_vit", "adapter,aepg,lae")
  assert (c.model.name, c.peft.name, c.loss.name, c.method.name) == ("vit_b16", "adapter", "aepg",
                                                                      "lae")
  assert c.scenario.num_tasks == 10 and c.optim.learning_rate == 5e-4 and c.train.epochs == 50
  assert c.train.batch_size == 256 and tuple(c.peft.blocks) == (0, 1, 2, 3, 4)
  with pytest.raises(ValueError, match="expected peft"):
    load_config("imagenet_r_vit", "lora,xent")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  from tests.data.test_data import make_image_folder  # pylint: disable=g-import-not-at-top
  return make_image_folder(str(tmp_path_factory.mktemp("imgs")),
                           classes=("a", "b", "c", "d"), n_train=4, n_test=2, size=12)


@pytest.mark.parametrize("peft,loss,method", COMBOS)
def test_paper_config_smoke(peft, loss, method, image_root, tmp_path):
  c = load_config("imagenet_r_vit", f"{peft},{loss},{method}")
  c.model.name = "vit_tiny"
  c.model.pretrained = False
  c.data.root = image_root
  c.data.image_size = 16
  c.data.workers = 0  # grain read threads; worker processes (the config's) start slowly in tests
  c.scenario.num_tasks = 2
  c.train.epochs = 2
  c.train.batch_size = 8
  c.eval.batch_size = 8
  c.method.freeze_epochs = 1 if method == "lae" else 0
  c.train.progress = c.train.verbose = c.train.plots = False
  m = train.run(c, str(tmp_path))
  R = np.array(m["accuracy_matrix"], float)
  assert R.shape == (2, 2) and np.all(np.isfinite(np.tril(R)))
  assert m["trainable_params"] < m["total_params"] / 2


@pytest.mark.parametrize("name,arg", [("default", None), ("imagenet_r_vit", "lora,aepg"),
                                      ("imagenet_r_vit", "prefix,ce,lae"),
                                      ("objectives_study", "aepg"), ("robust_ft", "tpgm"),
                                      ("robust_ft", "wise_ft"), ("dlcft_data_il", None),
                                      ("dlcft_class_il", None)])
def test_every_shipped_config_validates(name, arg):
  from cft_jax.config import validate_config  # pylint: disable=g-import-not-at-top
  c = load_config(name, arg)
  if c.data.name == "image_folder":
    c.data.root = "/some/folder"
  validate_config(c)
