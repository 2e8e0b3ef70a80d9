"""LAE: the offline expert is a copy of the online one made when task 1 begins, the EMA runs from
then on, task 0 uses the online module alone; frozen PEFT leaves keep their Adam moments
(issue 13, bug 2)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cft_jax import methods, objectives, peft, train
from cft_jax.data import Preprocess
from cft_jax.methods import LAE
from cft_jax.models import build_model
from cft_jax.steps import make_optimizer


def _params(v):
  return {"lora": {"a": jnp.full((2, 3), v)}, "head": {"kernel": jnp.full((3, 4), 10 * v)}}


def test_offline_copy_made_when_task_1_begins():
  lae = LAE(ema_decay=0.9)
  d = 0.9
  state = lae.init_state(_params(0.0))
  state = lae.begin_task(0, _params(0.0), state)
  assert float(state["active"]) == 0.0
  p = _params(1.0)  # online weights during task 0
  state = lae.after_step(p, state)  # no EMA in task 0
  np.testing.assert_array_equal(state["offline"]["lora"]["a"], 0.0)
  online, offline = lae.eval_params(p, state)  # task 0: the online module alone
  jax.tree_util.tree_map(np.testing.assert_array_equal, offline, online)
  # task 1 begins with the online weights trained on task 0: the offline copy is made now
  p = _params(2.0)
  state = lae.begin_task(1, p, state)
  assert float(state["active"]) == 1.0
  np.testing.assert_array_equal(state["offline"]["lora"]["a"], 2.0)
  state = lae.after_step(_params(3.0), state)  # EMA from here on
  np.testing.assert_allclose(state["offline"]["lora"]["a"], d * 2.0 + (1 - d) * 3.0, rtol=1e-6)
  online, offline = lae.eval_params(_params(3.0), state)
  np.testing.assert_allclose(offline["lora"]["a"], d * 2.0 + (1 - d) * 3.0, rtol=1e-6)
  np.testing.assert_array_equal(offline["head"]["kernel"], 30.0)  # the shared online head
  # later tasks do not copy again
  state2 = lae.begin_task(2, _params(5.0), state)
  np.testing.assert_allclose(state2["offline"]["lora"]["a"], d * 2.0 + (1 - d) * 3.0, rtol=1e-6)


def _lae_tiny_lora():
  """A tiny CNN with LoRA rank 2 (B moved off zero so every leaf has a gradient), LAE with one
  frozen epoch, and a batch of 8 images of classes 2 and 3 (task 1 of 2-class tasks)."""
  built = build_model("tiny_cnn", 4, peft=peft.PeftSpec.lora(2), image_size=16,
                      rng=jax.random.PRNGKey(1))
  variables = dict(built.variables)
  trainable, frozen_params = peft.split_params(variables.pop("params"), "lora")
  trainable = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "lora_b" in str(p) else x, trainable)
  frozen = {"params": frozen_params, "collections": variables}
  method = methods.get_method(ml_collections.ConfigDict(dict(name="lae", freeze_epochs=1)))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
  labels = np.array([2, 3] * 4, np.int32)
  return built, trainable, frozen, method, images, labels


def test_frozen_peft_step_leaves_adam_moments_untouched():
  built, trainable, frozen, method, images, labels = _lae_tiny_lora()
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-2,
                                                     grad_clip=1.0)))
  step = train.make_train_step(built.module.apply, Preprocess(16), objectives.make_loss_fn("ce"),
                               tx, 2, method)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=tx.init(trainable),
                           method_state=method.init_state(trainable))
  # one unfrozen step so that the moments are non-zero
  state, _ = step(state, frozen, images, labels, np.ones(8, bool), 2, 0, 10,
                  jax.random.PRNGKey(0), False)
  before = jax.tree_util.tree_map(np.array, state)
  state, _ = step(state, frozen, images, labels, np.ones(8, bool), 2, 1, 10,
                  jax.random.PRNGKey(1), True)
  adam = state.opt_state[1][0]  # chain(clip, adam=chain(scale_by_adam, scale)) -> ScaleByAdamState
  adam_before = before.opt_state[1][0]
  assert isinstance(adam, optax.ScaleByAdamState)
  for name in ("mu", "nu"):
    new, old = getattr(adam, name), getattr(adam_before, name)
    for k in new:
      same = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
          lambda a, b: bool(np.array_equal(np.asarray(a), b)), new[k], old[k]))
      assert all(same) if k != "head" else not any(same), (name, k)
  assert int(adam.count) == int(adam_before.count) + 1  # the count is shared (optax.masked)
  for k in state.params:
    same = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), b)), state.params[k], before.params[k]))
    assert all(same) if k != "head" else not all(same), k


def test_split_head_optimizer_restarts_backbone_adam_after_frozen_epochs():
  """With ``split_head`` (LAE with frozen epochs) the backbone's Adam count is held too: the
  first unfrozen PEFT step is a bias-corrected first Adam step, ``|delta| = lr`` per entry (a
  shared count would give ~3.2 lr: ``(1 - b1) / sqrt(1 - b2)``)."""
  lr = 1e-2
  built, trainable, frozen, method, images, labels = _lae_tiny_lora()
  assert method.freezes_peft and not methods.Method().freezes_peft
  tx = make_optimizer(ml_collections.ConfigDict(dict(name="adam", learning_rate=lr)),
                      split_head=method.freezes_peft)
  step = train.make_train_step(built.module.apply, Preprocess(16), objectives.make_loss_fn("ce"),
                               tx, 2, method)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=tx.init(trainable),
                           method_state=method.init_state(trainable))
  count = lambda s, lab: int(s.opt_state.inner_states[lab].inner_state[0].count)
  for i in range(2):  # two frozen steps: only the head's Adam advances
    state, _ = step(state, frozen, images, labels, np.ones(8, bool), 2, i, 10,
                    jax.random.PRNGKey(i), True)
  assert count(state, "head") == 2 and count(state, "backbone") == 0
  before = jax.tree_util.tree_map(np.array, state.params)
  state, _ = step(state, frozen, images, labels, np.ones(8, bool), 2, 2, 10,
                  jax.random.PRNGKey(2), False)
  assert count(state, "head") == 3 and count(state, "backbone") == 1
  for k in state.params:
    if k == "head":
      continue
    for new, old in zip(jax.tree_util.tree_leaves(state.params[k]),
                        jax.tree_util.tree_leaves(before[k])):
      d = np.abs(np.asarray(new, np.float64) - old)
      moved = d > 1e-9
      assert moved.any()
      # |g| / (|g| + eps) <= 1: at most lr, about lr for all but tiny gradients
      assert d.max() <= lr * 1.001
      np.testing.assert_allclose(np.median(d[moved]), lr, rtol=1e-2)
