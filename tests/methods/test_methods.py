"""The method protocol: LAE's EMA accumulation, max-softmax ensemble and frozen first epochs."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cft_jax import methods, objectives, train
from cft_jax.data import Preprocess


def test_lae_ema_update_by_hand():
  lae = methods.LAE(ema_decay=0.9)
  params = {"enc": {"lora_a": jnp.array([1.0, 2.0])}, "head": {"kernel": jnp.ones(2)}}
  st = lae.init_state(params)
  assert set(st["offline"]) == {"enc"}  # the head is shared, not copied
  st = lae.begin_task(1, params, st)  # the offline copy is made when task 1 begins
  new = {"enc": {"lora_a": jnp.array([3.0, -2.0])}, "head": {"kernel": jnp.zeros(2)}}
  st = lae.after_step(new, st)
  np.testing.assert_allclose(st["offline"]["enc"]["lora_a"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2])
  online, offline = lae.eval_params(new, st)
  assert online is new
  np.testing.assert_array_equal(offline["head"]["kernel"], new["head"]["kernel"])


class _Linear:
  """apply_fn of a fixed linear 'model': logits = x_flat @ W."""

  @staticmethod
  def apply(variables, x, train=False, rngs=None):
    del train, rngs
    return x.reshape(x.shape[0], -1)[:, :3] @ variables["params"]["enc"]["w"]


def test_max_softmax_ensemble_by_hand():
  # two parameter sets give logits z_on = [2, 0, 0] and z_off = [0, 0, 3] for one example
  online = {"enc": {"w": jnp.diag(jnp.array([2.0, 0.0, 0.0]))}, "head": {}}
  offline = {"enc": {"w": jnp.diag(jnp.array([0.0, 0.0, 3.0]))}}
  lae = methods.LAE()
  state = train.TrainState(step=jnp.int32(0), params=online, opt_state=(),
                           method_state={"offline": offline, "active": jnp.ones(())})
  # identity preprocessing: image value 1 on every pixel (after (x - 0) / 1)
  prep = Preprocess(image_size=2, mean=0.0, std=1.0)
  ev = train.make_eval_step(_Linear.apply, prep, classes_per_task=3, num_classes=3, method=lae)
  images = np.ones((1, 2, 2, 1), np.uint8)
  frozen = {"params": {}, "collections": {}}
  # softmax([2,0,0]) max = 0.787 (class 0); softmax([0,0,3]) max = 0.909 (class 2) -> class 2
  out = ev(state, frozen, images, np.array([2], np.int32), np.array([True]), 3, 0)
  assert out.tolist() == [1, 1]
  out0 = ev(state, frozen, images, np.array([0], np.int32), np.array([True]), 3, 0)
  assert out0.tolist() == [0, 0]
  # class-IL restricted to the first 2 classes: softmax([0,0]) vs softmax([2,0]) -> class 0
  out_cil = ev(state, frozen, images, np.array([0], np.int32), np.array([True]), 2, 0)
  assert int(out_cil[0]) == 1
  # sequential (single set) uses only the online logits -> class 0
  ev_seq = train.make_eval_step(_Linear.apply, prep, 3, 3)
  assert ev_seq(state, frozen, images, np.array([0], np.int32), np.array([True]), 3, 0).tolist() == [1, 1]


def test_frozen_peft_moves_only_the_head():
  lae = methods.LAE(freeze_epochs=1)
  assert lae.frozen_peft(1, 0) and not lae.frozen_peft(0, 0) and not lae.frozen_peft(1, 1)

  def apply(variables, x, train=False, rngs=None):
    p = variables["params"]
    h = x.reshape(x.shape[0], -1)[:, :3] @ p["enc"]["w"]
    return h @ p["head"]["kernel"]

  params = {"enc": {"w": jnp.eye(3)}, "head": {"kernel": 0.1 * jnp.ones((3, 4))}}
  tx = optax.sgd(0.1)
  state = train.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                           method_state=lae.begin_task(1, params, lae.init_state(params)))
  step = train.make_train_step(apply, Preprocess(2, 0.0, 255.0), objectives.make_loss_fn("ce"),
                               tx, classes_per_task=2, method=lae)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (4, 2, 2, 3), dtype=np.uint8)
  labels = np.array([2, 3, 2, 3], np.int32)
  frozen = {"params": {}, "collections": {}}
  s1, _ = step(state, frozen, images, labels, np.ones(4, bool), 2, 0, 5, jax.random.PRNGKey(0),
               True)
  np.testing.assert_array_equal(s1.params["enc"]["w"], np.eye(3))
  assert not np.allclose(s1.params["head"]["kernel"], 0.1)
  s2, _ = step(s1, frozen, images, labels, np.ones(4, bool), 2, 1, 5, jax.random.PRNGKey(1),
               False)
  assert not np.allclose(s2.params["enc"]["w"], np.eye(3))
  # the offline copy followed the online module by EMA
  expected = 0.999 * np.eye(3) + 0.001 * np.asarray(s2.params["enc"]["w"])
  np.testing.assert_allclose(s2.method_state["offline"]["enc"]["w"], expected, rtol=1e-6)


def test_get_method_errors():
  with pytest.raises(ValueError, match="known"):
    methods.get_method(ml_collections.ConfigDict({"name": "icarl"}))
  with pytest.raises(ValueError, match="ema_decay"):
    methods.LAE(ema_decay=1.0)
