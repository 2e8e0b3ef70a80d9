"""TPGM / FTP across task boundaries: the projection state survives ``optim.reset_per_task``,
and projection runs log ``dist_to_init`` (issue 13, bug 1)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cft_jax import objectives, peft, projection, train
from cft_jax.config import base_config
from cft_jax.data import Preprocess
from cft_jax.models import build_model


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  from tests.data.test_data import make_image_folder  # pylint: disable=g-import-not-at-top
  return make_image_folder(str(tmp_path_factory.mktemp("imgs")), classes=("a", "b", "c", "d"),
                           n_train=20, n_test=2, size=12)


def _config(root, projection_name):
  c = base_config()
  c.data.name, c.data.root, c.data.image_size = "image_folder", root, 16
  c.data.val_fraction = 0.2 if projection_name == "tpgm" else 0.0
  c.model.name, c.model.pretrained, c.peft.name = "tiny_cnn", False, "full"
  c.scenario.num_tasks = 2
  c.loss.name = "ce"
  c.method.projection = projection_name
  c.train.epochs, c.train.batch_size, c.train.log_every = 3, 8, 1
  c.eval.batch_size = 8
  c.train.progress = c.train.verbose = c.train.plots = c.train.tensorboard = False
  return c


@pytest.mark.parametrize("name", ["tpgm", "ftp"])
def test_projection_state_survives_task_boundary(name, image_root, tmp_path):
  m = train.run(_config(image_root, name), str(tmp_path))
  # metrics.json: per-task and sample-weighted accuracies (equal test sets here: equal values)
  R = np.array(m["accuracy_matrix"], float)
  assert m["final_accuracy"] == pytest.approx(np.mean(R[1]))
  assert m["final_accuracy_sample_weighted"] == pytest.approx(np.mean(R[1]))
  assert m["task_il"]["avg_incremental_accuracy_sample_weighted"] == pytest.approx(
      m["task_il"]["avg_incremental_accuracy"])
  with open(tmp_path / "log.jsonl") as f:
    recs = [json.loads(l) for l in f if l.strip()]
  assert all("dist_to_init" in r for r in recs)  # every record of a projection run
  d1 = [r["dist_to_init"] for r in recs if r["task"] == 0]
  d2 = [r["dist_to_init"] for r in recs if r["task"] == 1]
  assert len(d1) == len(d2) >= 12  # log_every=1: one record per step
  one_step = max(abs(b - a) for a, b in zip(d1[1:], d1[:-1]))
  assert d1[-1] > 4 * one_step > 0  # task 0 moved away from theta_0 by several steps' worth
  # Before the fix: FTP restarted at radius 1e-8 (d2[0] ~ 0), TPGM at min(n)/2 (d2[0] ~ d/2).
  assert d2[0] >= d1[-1] - one_step, (d1, d2)


def test_reset_base_state_keeps_projection_and_resets_base():
  params = {"backbone": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.zeros((2, 2))}}
  anchor = jax.tree_util.tree_map(jnp.zeros_like, params)
  tx = projection.ftp(anchor, base=optax.adam(1e-1), exclude=projection.is_head)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  for _ in range(3):
    upd, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, upd)
  new = projection.reset_base_state(tx, state, params)
  assert int(new.count) == 3
  chex_equal = lambda a, b: jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  chex_equal(new.radii, state.radii)
  chex_equal(new.prev_c, state.prev_c)
  chex_equal(new.radius_opt_state, state.radius_opt_state)
  chex_equal(new.base_state, tx.init(params).base_state)  # Adam moments and count restart
  assert int(new.base_state[0].count) == 0
  # TPGM chained after the base optimiser: the chain's base part restarts, TPGM's is kept.
  tx2 = optax.chain(optax.adam(1e-1), projection.tpgm(anchor, lambda p, b: 0.0,
                                                      exclude=projection.is_head))
  s2 = tx2.init(params)
  s2 = (s2[0], s2[1]._replace(count=jnp.asarray(7, jnp.int32)))
  n2 = projection.reset_base_state(tx2, s2, params)
  assert int(n2[1].count) == 7 and int(n2[0][0].count) == 0
  # no projection: the plain fresh state
  tx3 = optax.adam(1e-1)
  chex_equal(projection.reset_base_state(tx3, tx3.init(params), params), tx3.init(params))


def test_dist_to_init_metric_of_the_train_step():
  built = build_model("tiny_cnn", 4, image_size=16, rng=jax.random.PRNGKey(1))
  variables = dict(built.variables)
  trainable, frozen_params = peft.split_params(variables.pop("params"), "full")
  anchor = jax.tree_util.tree_map(lambda x: x - 0.01, trainable)  # a non-trivial theta_0
  frozen = {"params": frozen_params, "collections": variables, "anchor": anchor}
  tx = optax.adam(1e-2)
  copy = lambda t: jax.tree_util.tree_map(jnp.array, t)  # the step donates its state
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=copy(trainable),
                           opt_state=tx.init(trainable))
  step = train.make_train_step(built.module.apply, Preprocess(16), objectives.make_loss_fn("ce"),
                               tx, classes_per_task=2)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
  labels = np.array([0, 1] * 4, np.int32)
  new_state, m = step(state, frozen, images, labels, np.ones(8, bool), 0, 0, 10,
                      jax.random.PRNGKey(0))
  sq = [np.sum((np.asarray(p, np.float64) - np.asarray(a, np.float64)) ** 2)
        for k in new_state.params if k != "head"
        for p, a in zip(jax.tree_util.tree_leaves(new_state.params[k]),
                        jax.tree_util.tree_leaves(anchor[k]))]
  np.testing.assert_allclose(float(m["dist_to_init"]), np.sqrt(np.sum(sq)), rtol=1e-5)
  # no anchor (no projection): no such metric
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=copy(trainable),
                           opt_state=tx.init(trainable))
  frozen.pop("anchor")
  _, m = step(state, frozen, images, labels, np.ones(8, bool), 0, 0, 10, jax.random.PRNGKey(0))
  assert "dist_to_init" not in m
