"""Robust fine-tuning as protocol components (cft_jax.robust): any continual method combines with
TPGM / FTP (optimiser), L2-SP (penalty) and WiSE-FT (evaluation params), from the CLI too."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cft_jax import projection, robust, train
from cft_jax.config import base_config, validate_config

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  from tests.data.test_data import make_image_folder  # pylint: disable=g-import-not-at-top
  return make_image_folder(str(tmp_path_factory.mktemp("imgs")), classes=("a", "b", "c", "d"),
                           n_train=8, n_test=2, size=12)


def _config(root, method="sequential", projection_name="", wise=1.0):
  c = base_config()
  c.data.name, c.data.root, c.data.image_size = "image_folder", root, 16
  c.model.name, c.model.pretrained = "tiny_cnn", False
  if method == "lae":
    c.peft.name, c.peft.rank = "lora", 2
  else:
    c.peft.name = "full"  # (peft.rank is LoRA's: not set under full)
  c.scenario.num_tasks = 2
  c.loss.name = "ce"
  c.method.name, c.method.projection = method, projection_name
  c.eval.wise_ft_alpha = wise
  c.train.epochs, c.train.batch_size, c.eval.batch_size = 1, 8, 8
  c.train.progress = c.train.verbose = c.train.plots = c.train.tensorboard = False
  return validate_config(c)


def test_from_config_maps_the_user_keys(image_root):
  c = _config(image_root, "lae", "ftp", wise=0.5)
  assert robust.from_config(c) == (robust.FTP(norm="mars", k=1.0, radius_lr=1e-2),
                                   robust.WiSEFT(alpha=0.5))
  c = _config(image_root, "ewc", "l2sp")
  assert robust.from_config(c) == (robust.L2SP(alpha=c.method.l2sp_alpha),)
  assert robust.from_config(_config(image_root, "sequential", "none")) == ()
  assert robust.TPGM().needs_val_batch and not robust.FTP().needs_val_batch


def test_l2sp_penalty_adds_to_the_method_loss(image_root):
  """sequential + l2sp: the step's loss is the plain step's loss + alpha/2 ||theta -
  theta_0||^2 (head excluded), with theta != theta_0 and the same batch and key."""
  c = _config(image_root, "sequential", "l2sp")
  c.method.l2sp_alpha = 0.7
  exp = train.build_experiment(c)
  assert exp.robust == (robust.L2SP(alpha=0.7),)
  from cft_jax.steps import make_train_step  # pylint: disable=g-import-not-at-top
  from cft_jax import objectives  # pylint: disable=g-import-not-at-top
  plain = make_train_step(exp.module.apply, exp.preprocess, objectives.make_loss_fn("ce"),
                          exp.tx, exp.scenario.task_sizes, exp.method)
  theta = jax.tree_util.tree_map(lambda x: x + 0.05, exp.params0)
  x = exp.ds.train_images[:8]
  y = jnp.asarray(exp.scenario.train_labels[:8] % 2)
  mask = jnp.ones(8, bool)

  def loss(step):
    p = jax.tree_util.tree_map(jnp.array, theta)  # a copy: the step donates its state
    st = train.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=exp.tx.init(p))
    return float(step(st, exp.frozen, x, y, mask, 0, 0, 1, jax.random.PRNGKey(0))[1]["loss"])

  pen = 0.5 * 0.7 * sum(float(jnp.sum(jnp.square(a - b))) for k in theta if k != "head"
                        for a, b in zip(jax.tree_util.tree_leaves(theta[k]),
                                        jax.tree_util.tree_leaves(exp.params0[k])))
  assert pen > 0
  np.testing.assert_allclose(loss(exp.train_step), loss(plain) + pen, rtol=1e-5)


def test_lae_with_wise_ft_evaluates_the_interpolation(image_root):
  """lae + WiSE-FT: the evaluated params are exactly ``(1 - a) theta_0 + a theta`` (head kept,
  LAE's offline copy untouched), and the eval step ensembles those online params with LAE's
  offline set."""
  a = 0.25
  exp = train.build_experiment(_config(image_root, "lae", wise=a))
  assert exp.robust == (robust.WiSEFT(alpha=a),)
  theta = jax.tree_util.tree_map(lambda x: x + 1.0, exp.params0)
  ms = exp.method.init_state(exp.params0, exp.task_context(None))
  ms = dict(ms, active=jnp.ones_like(ms["active"]),  # an offline set unlike the online one
            offline=jax.tree_util.tree_map(lambda v: v - 0.5, ms["offline"]))
  st = train.TrainState(step=jnp.zeros((), jnp.int32), params=theta, opt_state=(),
                        method_state=ms)
  ev = exp.eval_state(st)
  want = {k: (theta[k] if k == "head" else jax.tree_util.tree_map(
      lambda t, z: (1 - a) * z + a * t, theta[k], exp.params0[k])) for k in theta}
  chex.assert_trees_all_close(ev.params, want, rtol=1e-6)
  chex.assert_trees_all_equal(ev.method_state, ms)
  # the eval step (LAE's max-softmax ensemble) on those params
  yl = exp.scenario.test_labels
  x = np.asarray(exp.ds.test_images[:len(yl)])
  got = np.asarray(exp.eval_step(ev, exp.frozen, x, yl, np.ones(len(yl), bool), 4, 0))
  sets = exp.method.eval_params(ev.params, ev.method_state)
  probs = np.max([jax.nn.softmax(exp.forward(p, exp.frozen, exp.preprocess(x, train=False)))
                  for p in sets], 0)
  assert len(sets) == 2
  assert got[0] == int(np.sum(np.argmax(probs, -1) == yl))
  # without WiSE-FT the state is evaluated as it is
  plain = train.build_experiment(_config(image_root, "lae"))
  assert plain.robust == () and plain.eval_state(st) is st


def test_lae_with_ftp_stays_inside_the_radii(image_root):
  """lae + ftp: after every step each constrained LoRA leaf is within its FTP radius of theta_0
  (per-row MARS norms), and the logged ``dist_to_init`` is ||theta - theta_0||_2."""
  exp = train.build_experiment(_config(image_root, "lae", "ftp"))
  assert exp.robust == (robust.FTP(),) and isinstance(exp.tx.init(exp.params0),
                                                      projection.FTPState)
  p0 = jax.tree_util.tree_map(jnp.array, exp.params0)  # a copy: the step donates its state
  st = train.TrainState(step=jnp.zeros((), jnp.int32), params=p0, opt_state=exp.tx.init(p0),
                        method_state=exp.method.init_state(exp.params0, exp.task_context(None)))
  x, y = exp.ds.train_images[:8], jnp.asarray(exp.scenario.train_labels[:8] % 2)
  moved = 0.0
  for i in range(4):
    st, m = exp.train_step(st, exp.frozen, x, y, jnp.ones(8, bool), 0, i, 4,
                           jax.random.PRNGKey(i))
    d = jax.tree_util.tree_map(lambda p, z: p - z, st.params, exp.params0)
    n = projection.norms(d, "mars")
    for k in st.params:
      if k == "head":
        continue
      for nl, r in zip(jax.tree_util.tree_leaves(n[k]),
                       jax.tree_util.tree_leaves(st.opt_state.radii[k])):
        assert float(jnp.max(nl)) <= float(r) * (1 + 1e-5) + 1e-7
    np.testing.assert_allclose(float(m["dist_to_init"]),
                               float(projection.dist_to_init(st.params, exp.params0)), rtol=1e-5)
    moved = float(m["dist_to_init"])
  assert moved > 0


@pytest.mark.parametrize("method,extra", [
    ("sequential", ["--config.method.projection=ftp"]),
    ("lae", ["--config.eval.wise_ft_alpha=0.5", "--config.peft.name=lora",
             "--config.peft.rank=2"])])
def test_cli_combines_method_and_robust_ft(method, extra, image_root, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "cft_jax.main", "--config", "configs/default.py",
         "--workdir", workdir, "--config.data.name=image_folder",
         f"--config.data.root={image_root}", "--config.data.image_size=16",
         "--config.data.augment=none", "--config.model.name=tiny_cnn",
         "--config.model.pretrained=False", "--config.scenario.num_tasks=2",
         "--config.train.batch_size=8", "--config.train.epochs=1",
         "--config.train.progress=False", "--config.train.plots=False",
         "--config.train.tensorboard=False", f"--config.method.name={method}", *extra]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  assert np.array(m["accuracy_matrix"], float).shape == (2, 2)
  with open(os.path.join(workdir, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["method"]["name"] == method
  with open(os.path.join(workdir, "log.jsonl")) as f:
    recs = [json.loads(l) for l in f if l.strip()]
  # the anchor theta_0 is kept by both runs: every record logs the distance to it
  assert recs and all(r["dist_to_init"] >= 0.0 for r in recs)
  assert recs[-1]["dist_to_init"] > 0.0
