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
