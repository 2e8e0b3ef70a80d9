"""Tests for cft_jax.steps: one compiled train step serves every task (``chex.assert_max_traces``)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cft_jax import objectives, steps
from cft_jax.data import Preprocess


class PooledNet(nn.Module):
  """Pooled pixels -> dense -> a 6-class head (3 tasks of 2 classes)."""

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    x = nn.relu(nn.Dense(8, name="fc")(jnp.mean(x, axis=(1, 2))))
    return nn.Dense(6, name="head")(x)


def _max_traces_step(monkeypatch, n=1):
  """``make_train_step`` with the traced step function wrapped in ``chex.assert_max_traces(n)``
  (inside the jit, so a retrace raises ``AssertionError``)."""
  counter = steps._TraceCounter  # pylint: disable=protected-access
  monkeypatch.setattr(steps, "_TraceCounter", lambda fn: counter(chex.assert_max_traces(fn, n=n)))
  chex.clear_trace_counter()
  net = PooledNet()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  tx = optax.adam(1e-2)
  step = steps.make_train_step(net.apply, Preprocess(image_size=8, augment="crop_flip"),
                               objectives.make_loss_fn("aepg"), tx, 2)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  return step, state, {"params": {}, "collections": {}}


def _batch(rng, task_lo, n=8, size=8):
  images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(task_lo, task_lo + 2, (n,)).astype(np.int32)
  return images, labels, np.arange(n) < n - 1


def test_train_step_traced_once_across_tasks(monkeypatch):
  """Three tasks (offsets 0, 2, 4), each with its own step count, schedule length and rng: the
  jitted step is traced exactly once (task offset and schedule are traced arguments)."""
  step, state, frozen = _max_traces_step(monkeypatch)
  rng = np.random.default_rng(0)
  losses = []
  for task, task_lo in enumerate((0, 2, 4)):
    total = 3 + task
    for i in range(total):
      state, m = step(state, frozen, *_batch(rng, task_lo), task_lo, i, total,
                      jax.random.PRNGKey(10 * task + i))
      losses.append(float(m["loss"]))
  assert step.num_traces() == 1
  assert int(state.step) == 3 + 4 + 5
  assert np.all(np.isfinite(losses)) and len(set(losses)) == len(losses)  # the steps ran
  # The wrapper can fail: a new batch shape forces a second trace, which chex rejects.
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(state, frozen, *_batch(rng, 0, n=4), 0, 0, 3, jax.random.PRNGKey(0))


@pytest.mark.parametrize("loss", ["focal", "ce", "aepg"])
def test_padding_rows_of_a_later_task_leave_the_step_finite(loss):
  """A padded batch (mask False rows carry label 0, outside the third task's local classes [0, 2)
  after the offset 4): the step's parameters stay finite and equal those of the same step on the
  valid rows alone (the padding's weight is 0). Before the fix focal's gradient was NaN here."""
  net = PooledNet()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  tx = optax.sgd(0.1)
  step = steps.make_train_step(net.apply, Preprocess(image_size=8, augment="none"),
                               objectives.make_loss_fn(loss), tx, 2)
  rng = np.random.default_rng(0)
  images, labels, _ = _batch(rng, 4, n=8)
  mask = np.arange(8) < 3
  labels = np.where(mask, labels, 0).astype(np.int32)  # the loader pads labels with 0
  frozen = {"params": {}, "collections": {}}

  def run(imgs, lbls, msk):
    p = jax.tree_util.tree_map(jnp.array, params)  # a copy: the step donates its state
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))
    state, m = step(state, frozen, imgs, lbls, msk, 4, 1, 10, jax.random.PRNGKey(1))
    return jax.device_get(state.params), float(m["loss"])

  padded, loss_padded = run(images, labels, mask)
  assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(padded))
  alone, loss_alone = run(images[:3], labels[:3], mask[:3])
  np.testing.assert_allclose(loss_padded, loss_alone, rtol=1e-5)
  chex.assert_trees_all_close(padded, alone, rtol=1e-4, atol=1e-6)


def test_extra_loss_logits_fn_draws_augmentation_and_dropout_from_different_keys():
  """Issue 26 item 7: the replay ``logits_fn`` used one key for both (the main objective splits
  its key into augmentation and dropout keys)."""
  from cft_jax import methods  # pylint: disable=g-import-not-at-top
  seen = {"aug": [], "drop": []}

  def preprocess(images, rng=None, train=False, **_):
    seen["aug"].append(np.asarray(jax.random.key_data(rng)) if rng is not None else None)
    return images.astype(jnp.float32)

  def apply_fn(variables, x, train=False, rngs=None, **_):
    del variables, train
    seen["drop"].append(np.asarray(jax.random.key_data(rngs["dropout"])))
    return jnp.zeros((x.shape[0], 4))

  class Replay(methods.Method):
    def extra_loss(self, params, method_state, batch, logits, logits_fn, rng):
      return jnp.sum(logits_fn(params, batch["images"] + 0, rng))  # a replicated (other) batch

  objective = steps._make_objective(  # pylint: disable=protected-access
      steps.make_forward(apply_fn), preprocess, objectives.make_loss_fn("ce"), Replay(), 2,
      None, "local", (), None)
  frozen = {"params": {}, "collections": {}}
  objective({}, {}, frozen, jnp.zeros((2, 4, 4, 3), jnp.uint8), jnp.array([0, 1]),
            jnp.ones(2, bool), 0, 0, 10, jax.random.PRNGKey(0))
  assert len(seen["aug"]) == len(seen["drop"]) == 2  # the main forward, then the replay one
  assert not np.array_equal(seen["aug"][0], seen["drop"][0])
  assert not np.array_equal(seen["aug"][1], seen["drop"][1])  # was the same key
