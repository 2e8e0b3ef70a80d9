"""Weight decay of a linearized model shrinks the offset psi - psi_0 (issue 13, bug 5)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cft_jax import objectives, peft, projection, train
from cft_jax.data import Preprocess
from cft_jax.models import build_model
from cft_jax.steps import make_optimizer

LR, WD = 1e-2, 0.5


def test_decay_toward_anchor_exact():
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="adamw", learning_rate=LR,
                                                     weight_decay=WD)), linearized="full")
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  anchor = {"w": jnp.array([0.5, 0.5, 0.5])}
  zero = {"w": jnp.zeros(3)}
  upd, _ = tx.update(zero, tx.init(params), params, decay_anchor=anchor)  # Adam part is 0
  np.testing.assert_allclose(upd["w"], -LR * WD * (params["w"] - anchor["w"]), rtol=1e-6)
  with pytest.raises(ValueError, match="decay_anchor"):
    tx.update(zero, tx.init(params), params)
  # not linearized: the usual decay toward 0
  tx0 = make_optimizer(ml_collections.ConfigDict(dict(name="adamw", learning_rate=LR,
                                                      weight_decay=WD)))
  upd, _ = tx0.update(zero, tx0.init(params), params)
  np.testing.assert_allclose(upd["w"], -LR * WD * params["w"], rtol=1e-6)
  # sgd: decay added to the gradient, toward the anchor
  txs = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", learning_rate=LR,
                                                      weight_decay=WD, momentum=0.0)),
                       linearized="features")
  upd, _ = txs.update(zero, txs.init(params), params, decay_anchor=anchor)
  np.testing.assert_allclose(upd["w"], -LR * WD * (params["w"] - anchor["w"]), rtol=1e-6)


@pytest.mark.parametrize("mode", ["full", "features"])
def test_linearized_train_step_decays_toward_params0(mode):
  built = build_model("tiny_cnn", 4, image_size=16, rng=jax.random.PRNGKey(1))
  variables = dict(built.variables)
  params0, frozen_params = peft.split_params(variables.pop("params"), "full")
  frozen = {"params": frozen_params, "collections": variables, "params0": params0}
  # current params: away from params0 (the offset that decay must shrink)
  params = jax.tree_util.tree_map(lambda x: x + 0.3, params0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
  labels = np.array([0, 1] * 4, np.int32)
  new = {}
  for wd in (0.0, WD):
    tx = make_optimizer(ml_collections.ConfigDict(dict(name="adam", learning_rate=LR,
                                                       weight_decay=wd)), linearized=mode)
    p = jax.tree_util.tree_map(jnp.array, params)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
    step = train.make_train_step(built.module.apply, Preprocess(16),
                                 objectives.make_loss_fn("ce"), tx, classes_per_task=2,
                                 linearized=mode)
    new[wd], _ = step(state, frozen, images, labels, np.ones(8, bool), 0, 0, 10,
                      jax.random.PRNGKey(0))
  diff = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), new[WD].params,
                                new[0.0].params)
  offset = jax.tree_util.tree_map(lambda p, p0: np.asarray(p) - np.asarray(p0), params, params0)
  if mode == "features":  # an ordinary linear head: decayed toward 0
    offset["head"] = jax.tree_util.tree_map(np.asarray, params["head"])
  for d, o in zip(jax.tree_util.tree_leaves(diff), jax.tree_util.tree_leaves(offset)):
    np.testing.assert_allclose(d, -LR * WD * o, rtol=1e-4, atol=1e-7)


def test_adam_weight_decay_is_decoupled_as_documented():
  """Issue 26 item 7: the config documentation said Adam's weight decay is added to the gradient;
  ``optim.name=adam`` with a weight decay is ``optax.adamw`` (decoupled)."""
  from cft_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  optim = ml_collections.ConfigDict({"name": "adam", "learning_rate": 0.1, "weight_decay": 0.5})
  tx = make_optimizer(optim)
  p = {"w": jnp.array([2.0])}
  g = {"w": jnp.array([1e-3])}
  updates, _ = tx.update(g, tx.init(p), p)
  # decoupled: Adam's first step is -lr * sign(g) = -0.1, plus -lr * wd * w = -0.1; coupled
  # (gradient g + wd * w = 1.001) would give -0.1 alone
  np.testing.assert_allclose(updates["w"], [-0.2], rtol=1e-4)
  doc = config_lib.KEYS["optim.weight_decay"].doc  # the declared meaning (--describe)
  assert "adam / adamw: decoupled" in doc and "adam / sgd: added" not in doc
