"""The paper-scale path: ViT-B/16 checkpoints in the two published layouts, and (slow, ~1-2 min
on a 2-core CPU) the CLI running ``configs/imagenet_r_vit.py`` at 224 px on a generated
ImageNet-R folder for 2 tasks x 2 steps."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cft_jax.models import vit
from cft_jax.peft.spec import PeftSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGREG_NAME = "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"


def published_b16_keys(pre_logits: bool):
  """Key -> shape of the published ViT-B/16 ImageNet-21k files, written out from the naming of
  google-research/vision_transformer ``vit_jax/models_vit.py`` (``Encoder1DBlock``:
  ``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``; the
  21,843-way ``head``; ``pre_logits`` only in the original ``ViT-B_16.npz``), independently of
  this library's module."""
  D, H, M, C = 768, 12, 3072, 21843
  keys = {"embedding/kernel": (16, 16, 3, D), "embedding/bias": (D,), "cls": (1, 1, D),
          "Transformer/posembed_input/pos_embedding": (1, 197, D),
          "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,),
          "head/kernel": (D, C), "head/bias": (C,)}
  for i in range(12):
    b = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      keys[b + ln + "/scale"] = keys[b + ln + "/bias"] = (D,)
    for proj in ("query", "key", "value"):
      keys[b + f"MultiHeadDotProductAttention_1/{proj}/kernel"] = (D, H, D // H)
      keys[b + f"MultiHeadDotProductAttention_1/{proj}/bias"] = (H, D // H)
    keys[b + "MultiHeadDotProductAttention_1/out/kernel"] = (H, D // H, D)
    keys[b + "MultiHeadDotProductAttention_1/out/bias"] = (D,)
    keys[b + "MlpBlock_3/Dense_0/kernel"] = (D, M)
    keys[b + "MlpBlock_3/Dense_0/bias"] = (M,)
    keys[b + "MlpBlock_3/Dense_1/kernel"] = (M, D)
    keys[b + "MlpBlock_3/Dense_1/bias"] = (D,)
  if pre_logits:
    keys["pre_logits/kernel"] = (D, D)
    keys["pre_logits/bias"] = (D,)
  return keys


def write_b16(path, pre_logits, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for k, shape in published_b16_keys(pre_logits).items():
    if k.endswith("scale"):
      arrays[k] = np.ones(shape, np.float32)
    else:
      arrays[k] = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
  np.savez(path, **arrays)
  return arrays


@pytest.fixture(scope="module")
def b16_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("vit")
  write_b16(str(d / AUGREG_NAME), pre_logits=False)
  ref = write_b16(str(d / "ViT-B_16.npz"), pre_logits=True, seed=1)
  return d, ref


def test_both_published_b16_layouts_load(b16_files):
  d, ref = b16_files
  assert len(published_b16_keys(False)) == 200 and len(published_b16_keys(True)) == 202
  aug, i21k = str(d / AUGREG_NAME), str(d / "ViT-B_16.npz")
  assert vit.detect_checkpoint_format(aug) == "augreg"
  assert vit.detect_checkpoint_format(i21k) == "i21k"
  # folder + format key: each format picks its own file
  assert vit.pretrained_path("b16", str(d), "augreg") == aug
  assert vit.pretrained_path("b16", str(d), "i21k") == i21k
  module, variables = vit.build("b16", 20, path=i21k, checkpoint_format="auto",
                                peft=PeftSpec("lora", rank=4))
  p = variables["params"]
  np.testing.assert_array_equal(
      np.asarray(p["Transformer"]["encoderblock_11"]["MlpBlock_3"]["Dense_1"]["kernel"]),
      ref["Transformer/encoderblock_11/MlpBlock_3/Dense_1/kernel"])
  assert "pre_logits" not in p and module.representation_size is None  # drop-head variant
  assert p["head"]["kernel"].shape == (768, 20)
  module, variables = vit.build("b16", 20, path=i21k, pre_logits="keep")
  assert module.representation_size == 768
  np.testing.assert_array_equal(np.asarray(variables["params"]["pre_logits"]["kernel"]),
                                ref["pre_logits/kernel"])
  module, variables = vit.build("b16", 20, path=str(d), checkpoint_format="augreg")
  assert "pre_logits" not in variables["params"]
  with pytest.raises(ValueError, match="checkpoint_format='augreg' but .* i21k"):
    vit.build("b16", 20, path=i21k, checkpoint_format="augreg")
  from cft_jax.data import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  with pytest.raises(DatasetNotFoundError, match="wget -P .* .*imagenet21k/ViT-B_16.npz"):
    vit.pretrained_path("b16", str(d / "empty"), "i21k")  # the CLI prints it as one line
  with pytest.raises(DatasetNotFoundError, match="does not exist"):
    vit.build("b16", 20, path=str(d / "missing.npz"))


def _imagenet_r_folder(root, n_classes=4, n_images=5):
  """The layout of the extracted ``imagenet-r.tar``: ``imagenet-r/<wnid>/*.jpg``, varied sizes,
  grey and RGB mixed."""
  rng = np.random.default_rng(0)
  for c in range(n_classes):
    d = os.path.join(root, "imagenet-r", f"n0{1440000 + 7 * c}")
    os.makedirs(d)
    for j in range(n_images):
      h, w = int(rng.integers(150, 400)), int(rng.integers(150, 400))
      img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      im = Image.fromarray(img)
      if j == 2:
        im = im.convert("L")
      im.save(os.path.join(d, f"art_{j}.jpg"), quality=85)
  return root


def test_cli_imagenet_r_vit_b16_224(b16_files, tmp_path):
  """SLOW (~1-2 min on 2 CPU cores): ViT-B/16 at 224 px, the paper config, 2 tasks x 2 steps."""
  d, _ = b16_files
  root = _imagenet_r_folder(str(tmp_path / "inr"))
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "cft_jax.main", "--config",
         os.path.join(REPO, "configs", "imagenet_r_vit.py") + ":lora,aepg", "--workdir", workdir,
         "--config.data.name=imagenet_r", f"--config.data.root={root}",
         f"--config.model.checkpoint={d / 'ViT-B_16.npz'}", "--config.model.checkpoint_format=i21k",
         "--config.scenario.num_tasks=2", "--config.train.epochs=1",
         "--config.train.batch_size=2", "--config.eval.batch_size=2",
         "--config.data.train_limit=4", "--config.data.test_limit=2", "--config.data.workers=0",
         "--config.train.progress=False", "--config.train.plots=False"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  assert len(m["accuracy_matrix"]) == 2 and m["accuracy_matrix"][1][1] is not None
  assert m["train_step_compilations"] == 1
  steps = [json.loads(l) for l in open(os.path.join(workdir, "log.jsonl"))]
  assert [(r["task"], r["step"]) for r in steps][-1] == (1, 2)
  assert m["class_names"][0].startswith("n0")
