"""End-to-end training: real data, trainable/frozen split, resume == uninterrupted, CLI."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cft_jax import checkpoint, objectives, peft, train
from cft_jax.data import Preprocess
from cft_jax.models import build_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import default as default_config  # pylint: disable=g-import-not-at-top

HAS_FMNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")
ROOT = os.path.join(os.path.dirname(__file__), "..")


def tiny_config(**overrides):
  c = default_config.get_config()
  c.model.name = "tiny_cnn"
  c.model.pretrained = False
  c.data.image_size = 16
  c.data.train_limit = 64
  c.data.test_limit = 40
  c.data.augment = "none"
  c.scenario.num_tasks = 5
  c.train.batch_size = 32
  c.train.epochs = 1
  c.train.progress = False
  c.train.verbose = False
  c.eval.batch_size = 50
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def test_train_step_updates_only_trainable_leaves():
  built = build_model("tiny_cnn", 4, peft=peft.PeftSpec.lora(2), image_size=16,
                      rng=jax.random.PRNGKey(1))
  variables = dict(built.variables)
  trainable, frozen_params = peft.split_params(variables.pop("params"), "lora")
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
  names = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat}
  assert names and all(("lora" in n) or n.startswith("head") for n in names), names
  frozen = {"params": frozen_params, "collections": variables}
  # make lora_b non-zero so lora_a also gets a gradient
  trainable = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "lora_b" in str(p) else x, trainable)
  tx = optax.adam(1e-2)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=tx.init(trainable))
  step = train.make_train_step(built.module.apply, Preprocess(16), objectives.make_loss_fn("ce"),
                               tx, classes_per_task=2)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
  labels = np.array([2, 3] * 4, np.int32)
  before = jax.tree_util.tree_map(np.asarray, trainable)
  new_state, m = step(state, frozen, images, labels, np.ones(8, bool), 2, 0, 10,
                      jax.random.PRNGKey(0))
  assert int(new_state.step) == 1 and np.isfinite(float(m["loss"]))
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                   new_state.params, before)
  assert all(jax.tree_util.tree_leaves(changed)), changed
  # local loss over classes [2, 4): head columns of classes 0, 1 get no gradient
  np.testing.assert_array_equal(np.asarray(new_state.params["head"]["kernel"])[:, :2],
                                before["head"]["kernel"][:, :2])
  # the frozen tree is not part of the state: the optimiser never touches it
  assert peft.count_params(new_state.params) < peft.count_params(frozen_params)


def test_lora_init_equals_base_model():
  rng = jax.random.PRNGKey(3)
  base = build_model("tiny_cnn", 4, peft=peft.PeftSpec.lora(0), image_size=16, rng=rng)
  lora = build_model("tiny_cnn", 4, peft=peft.PeftSpec.lora(4), image_size=16, rng=rng)
  params = dict(lora.variables["params"])
  # copy the base weights into the LoRA model; the LoRA leaves stay at their init (B = 0)
  merged = peft.merge_params(
      peft.split_params(params, "lora")[0], base.variables["params"])
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3))
  np.testing.assert_allclose(lora.module.apply({"params": merged}, x),
                             base.module.apply(base.variables, x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_resume_equals_uninterrupted(tmp_path):
  # 30 test images per task: accuracies in steps of 3.33 points (not exact at the 4 decimals of
  # the displayed matrices), so a resume that restored rounded matrices would change the summaries
  full = train.run(tiny_config(**{"data.test_limit": 30}), str(tmp_path / "a"))
  # interrupted after 2 tasks, then the same command resumes
  part = train.run(tiny_config(**{"data.test_limit": 30, "train.stop_after_task": 2}),
                   str(tmp_path / "b"))
  assert part["num_finished_tasks"] == 2
  t0 = time.time()
  resumed = train.run(tiny_config(**{"data.test_limit": 30}), str(tmp_path / "b"))
  second_s = time.time() - t0
  np.testing.assert_array_equal(np.array(resumed["accuracy_matrix"], float),
                                np.array(full["accuracy_matrix"], float))
  for key in ("final_accuracy", "avg_incremental_accuracy", "forgetting", "bwt"):
    assert resumed[key] == full[key]
  # the wall time sums both invocations: the first one's (saved with its last checkpoint, after
  # task 2) plus the whole second one's
  assert resumed["resumed"] is True and full["resumed"] is False
  ckpts = checkpoint.TaskCheckpointer(str(tmp_path / "b" / "checkpoints"))
  first = [ckpts.restore_untyped(n)[1] for n in ckpts.all_steps()]
  ckpts.close()
  before = [m["wall_time_s"] for m in first if m["num_finished_tasks"] == 2]
  assert len(before) == 1 and before[0] > 0
  assert before[0] < resumed["wall_time_s"] < before[0] + second_s
  # the matrix is lower-triangular and filled
  R = np.array(full["accuracy_matrix"], float)
  assert np.all(np.isfinite(np.tril(R))) and np.all(np.isnan(R[np.triu_indices(5, 1)]))
  # a changed config on the same workdir is refused with the key named
  with pytest.raises(train.ConfigMismatchError, match="optim.learning_rate"):
    train.run(tiny_config(**{"data.test_limit": 30, "optim.learning_rate": 0.5}),
              str(tmp_path / "b"))


def test_cli_on_image_folder(tmp_path):
  from tests.data.test_data import make_image_folder  # pylint: disable=g-import-not-at-top
  root = make_image_folder(str(tmp_path / "imgs"), classes=("ant", "bee", "cat", "dog"),
                           n_train=6, n_test=3)
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "cft_jax.main", "--config", "configs/default.py",
         "--workdir", workdir, "--config.data.name=image_folder", f"--config.data.root={root}",
         "--config.data.image_size=16", "--config.model.name=tiny_cnn",
         "--config.model.pretrained=False", "--config.scenario.num_tasks=2",
         "--config.train.batch_size=8", "--config.train.progress=False"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final_accuracy" in out.stdout and "task-IL acc" in out.stdout
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  for key in ("accuracy_matrix", "task_il_accuracy_matrix", "final_accuracy",
              "avg_incremental_accuracy", "forgetting", "bwt"):
    assert key in m
  assert np.array(m["accuracy_matrix"], float).shape == (2, 2)
  assert 0.0 <= m["final_accuracy"] <= 100.0
  # the resolved config, the step log and the plots are saved; a bad override key fails
  for fn in ("config.json", "log.jsonl", "accuracy_matrix.png", "task_il_accuracy_matrix.png",
             "accuracy_vs_task.png", "entropy_alpha.png"):
    assert os.path.getsize(os.path.join(workdir, fn)) > 0, fn
  with open(os.path.join(workdir, "log.jsonl")) as f:
    rec = json.loads(f.readline())
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  assert {"task", "step", "global_step", "loss", "entropy", "alpha"} <= set(rec)
  bad = subprocess.run(cmd + ["--config.optim.learnin_rate=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "learnin_rate" in bad.stderr


@pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("projection", ["tpgm", "ftp", "l2sp"])
def test_projection_in_continual_run(projection, tmp_path):
  c = tiny_config(**{"scenario.num_tasks": 2, "peft.name": "full", "data.val_fraction": 0.2,
                     "method.projection": projection, "train.epochs": 2})
  c.eval.ood_corruptions = ("gaussian_noise",)
  c.eval.ood_severities = (1, 5)
  m = train.run(c, str(tmp_path))
  assert set(m["ood"]["corruptions"]["gaussian_noise"]) == {"1", "5"}
  assert 0.0 <= m["ood"]["id"] <= 100.0
  if projection == "tpgm":
    c.data.val_fraction = 0.0
    with pytest.raises(ValueError, match="val_fraction"):
      train.run(c, str(tmp_path / "novalid"))


def test_wise_ft_params_keeps_the_head():
  params = {"enc": {"w": jnp.array([2.0, 4.0])}, "head": {"kernel": jnp.array([1.0])}}
  anchor = {"enc": {"w": jnp.array([0.0, 0.0])}, "head": {"kernel": jnp.array([9.0])}}
  mixed = train.wise_ft_params(params, anchor, 0.25)
  np.testing.assert_allclose(mixed["enc"]["w"], [0.5, 1.0])
  np.testing.assert_allclose(mixed["head"]["kernel"], [1.0])
  same = train.wise_ft_params(params, anchor, 1.0)
  np.testing.assert_allclose(same["enc"]["w"], params["enc"]["w"])


@pytest.mark.skipif(not HAS_FMNIST, reason="needs /usr/share/datasets/fashion-mnist")
def test_cache_features_run_equals_uncached_run(tmp_path):
  """``train.cache_features``: a linear-probe run on cached backbone features gives the same head
  trajectory (log), accuracy matrices and metrics as the run that pushes every batch through the
  backbone; settings where the cache is not exact are refused with the reason."""
  kw = {"peft.name": "linear_probe", "scenario.num_tasks": 5, "train.epochs": 2,
        "optim.learning_rate": 0.05}
  plain = train.run(tiny_config(**kw), str(tmp_path / "plain"))
  cached = train.run(tiny_config(**kw, **{"train.cache_features": True}), str(tmp_path / "c"))
  np.testing.assert_allclose(np.array(cached["accuracy_matrix"], float),
                             np.array(plain["accuracy_matrix"], float), atol=1e-6)
  np.testing.assert_allclose(np.array(cached["task_il_accuracy_matrix"], float),
                             np.array(plain["task_il_accuracy_matrix"], float), atol=1e-6)
  logs = []
  for d in ("plain", "c"):
    with open(tmp_path / d / "log.jsonl") as f:
      logs.append([json.loads(l) for l in f])
  assert len(logs[0]) == len(logs[1]) > 3
  for a, b in zip(*logs):
    assert (a["task"], a["step"]) == (b["task"], b["step"])
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4, atol=1e-6)
  for bad, match in (({"peft.name": "lora"}, "linear_probe"),
                     ({"data.augment": "crop_flip"}, "augment"),
                     ({"method.name": "ewc"}, "method.name")):
    cfg = tiny_config(**{**kw, **bad, "train.cache_features": True})
    with pytest.raises(train.ConfigError, match=match):
      train.run(cfg, str(tmp_path / "bad"))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_backbone_lr_scale_scales_only_non_head_updates(name):
  """``optim.backbone_lr_scale = s``: every non-head update is ``s`` times the unscaled one; the
  head's is unchanged."""
  import ml_collections
  from cft_jax.steps import make_optimizer
  base = dict(name=name, learning_rate=0.1, weight_decay=0.0, grad_clip=0.0, momentum=0.9)
  params = {"head": {"kernel": jnp.ones((3, 2))},
            "block_0": {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.ones(2)}}}
  grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.random.default_rng(p.size).standard_normal(p.shape), p.dtype),
      params)
  ups = []
  for scale in (1.0, 0.25):
    tx = make_optimizer(ml_collections.ConfigDict(dict(base, backbone_lr_scale=scale)))
    u, _ = tx.update(grads, tx.init(params), params)
    ups.append(u)
  np.testing.assert_allclose(ups[1]["head"]["kernel"], ups[0]["head"]["kernel"], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(ups[0]["block_0"]),
                  jax.tree_util.tree_leaves(ups[1]["block_0"])):
    np.testing.assert_allclose(b, 0.25 * a, rtol=1e-6)
    assert float(jnp.abs(a).max()) > 0


def test_checkpoint_meta_is_a_snapshot_of_the_progress():
  """The checkpoint save is asynchronous: the meta it writes must not follow later changes of
  the live progress lists (a mid-task checkpoint once recorded the next entropy entry)."""
  import types  # pylint: disable=g-import-not-at-top
  saved = []
  ckpt = types.SimpleNamespace(save=lambda step, state, meta: saved.append((step, meta)))
  exp = types.SimpleNamespace(
      scenario=types.SimpleNamespace(class_order=(1, 0)), config_json={"seed": 0}, stream=None,
      ds=types.SimpleNamespace(class_names=("a", "b")),
      config=types.SimpleNamespace(eval=types.SimpleNamespace(knn_k=1)),
      dev=types.SimpleNamespace(unreplicate=lambda s: s))
  prog = train.Progress(state=types.SimpleNamespace(step=np.int32(7)),
                        R=np.full((2, 2), np.nan), R_task=np.full((2, 2), np.nan),
                        entropy_end=[], knn_acc=[])
  train._save(exp, prog, ckpt, 0, 3, finished=False)  # pylint: disable=protected-access
  prog.entropy_end.append(0.5)
  prog.knn_acc.append(90.0)
  step, meta = saved[0]
  assert step == train.checkpoint_id(7, False) == 14
  assert meta["entropy_end_of_task"] == [] and meta["knn_accuracy"] == []
  assert (meta["num_finished_tasks"], meta["step_in_task"], meta["task_finished"]) == (0, 3, False)
  assert meta["class_names"] == ["b", "a"]  # in class order: what cft_jax.load_run names


@pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("overrides", [{"eval.wise_ft_alpha": 0.5}, {"method.name": "lae"}],
                         ids=["wise_ft", "lae"])
def test_knn_probe_sees_the_evaluation_parameters(tmp_path, monkeypatch, overrides):
  """Issue 26 item 7: the k-NN probe used the raw ``state.params``; it now gets the evaluated
  parameter sets (WiSE-FT's interpolation; LAE's online and offline modules)."""
  import cft_jax  # pylint: disable=g-import-not-at-top
  seen = []
  probe = train.knn_lib.knn_probe

  def spy(feature_fn, params, *args, **kwargs):
    seen.append(jax.device_get(params))
    return probe(feature_fn, params, *args, **kwargs)

  monkeypatch.setattr(train.knn_lib, "knn_probe", spy)
  m = train.run(tiny_config(**{"scenario.num_tasks": 2, "eval.knn_k": 3, **overrides}),
                str(tmp_path / "run"))
  assert len(m["knn_accuracy"]) == 2 and len(seen) == 2
  predictor = cft_jax.load_run(str(tmp_path / "run"))  # the evaluated params of the last task
  params, state = predictor._params, predictor._method_state  # pylint: disable=protected-access
  from cft_jax import methods  # pylint: disable=g-import-not-at-top
  sets = methods.get_method(predictor.config.method).eval_params(params, state)
  assert len(seen[-1]) == len(sets) == (2 if "method.name" in overrides else 1)
  for got, expected in zip(seen[-1], sets):
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, jax.device_get(expected))


@pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_printed_task_ids_are_0_based(tmp_path, capsys):
  """Issue 26 item 6: the matrix rows said "after task 0" and the next line "after task 1"."""
  train.run(tiny_config(**{"scenario.num_tasks": 2, "train.verbose": True}), str(tmp_path / "r"))
  out = capsys.readouterr().out
  assert "after task 0: class-IL avg" in out and "after task 1: class-IL avg" in out
  assert "after task 2" not in out
