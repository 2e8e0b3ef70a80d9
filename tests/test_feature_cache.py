"""Cached frozen-backbone features: same head as training through the backbone; NCM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cft_jax import feature_cache as fc
from cft_jax import objectives, peft
from cft_jax.data import Preprocess, batches
from cft_jax.models import build_model
from cft_jax.steps import TrainState, make_train_step


def _data(n=70, size=12, num_classes=6, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return images, labels


@pytest.mark.parametrize("loss_name", ["ce", "aepg"])
def test_cached_linear_probe_equals_uncached(loss_name):
  num_classes, k, task_lo, bs, epochs, seed = 6, 3, 3, 16, 2, (5, 1)
  images, labels = _data(num_classes=num_classes)
  labels = task_lo + labels % k  # the task's classes
  built = build_model("tiny_cnn", num_classes, image_size=12, rng=jax.random.PRNGKey(3))
  variables = dict(built.variables)
  params0, frozen_params = peft.split_params(variables.pop("params"), "linear_probe")
  assert set(params0) == {"head"}
  frozen = {"params": frozen_params, "collections": variables}
  pre = Preprocess(image_size=12, mean=built.mean, std=built.std, augment="none")
  loss_fn = objectives.make_loss_fn(loss_name)
  tx = optax.adam(5e-2)
  idx = np.arange(len(labels))
  nb = -(-len(idx) // bs)
  total = epochs * nb
  rng = jax.random.PRNGKey(11)

  # Uncached: the library's train step through the whole model, train.run's batches and rngs.
  step = make_train_step(built.module.apply, pre, loss_fn, tx, k)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree_util.tree_map(jnp.array,
                                                                                   params0),
                     opt_state=tx.init(params0))
  s = 0
  for epoch in range(epochs):
    for xb, yb, mb in batches(images, labels, idx, bs, shuffle_seed=(*seed, epoch)):
      state, _ = step(state, frozen, xb, yb, mb, task_lo, s, total, jax.random.fold_in(rng, s))
      s += 1

  # Cached: features once, then the head alone.
  feats = fc.extract_features(built.module.apply, built.variables, images, pre, batch_size=32)
  assert feats.shape == (len(images), 32)
  direct = built.module.apply(built.variables, pre(jnp.asarray(images)), return_features=True)
  np.testing.assert_allclose(feats, np.asarray(direct), rtol=1e-5, atol=1e-5)
  head, _, metrics = fc.train_linear_probe_on_features(
      feats, labels, params0, tx, classes_per_task=k, task_lo=task_lo, batch_size=bs,
      epochs=epochs, seed=seed, loss_fn=loss_fn, rng=rng)
  assert np.isfinite(metrics["loss"])
  moved = np.abs(np.asarray(head["head"]["kernel"]) - np.asarray(params0["head"]["kernel"]))
  assert moved.max() > 1e-3  # the head trained
  for a, b in zip(jax.tree_util.tree_leaves(head), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_extract_features_subset_and_padding():
  images, _ = _data(n=37)
  built = build_model("tiny_cnn", 4, image_size=12, rng=jax.random.PRNGKey(0))
  pre = Preprocess(image_size=12, mean=built.mean, std=built.std)
  fn = fc.make_feature_fn(built.module.apply, pre)
  all_f = fc.extract_features(built.module.apply, built.variables, images, pre, batch_size=8,
                              feature_fn=fn)
  sub = np.array([30, 2, 7])
  part = fc.extract_features(built.module.apply, built.variables, images, pre, indices=sub,
                             batch_size=8, feature_fn=fn)
  np.testing.assert_allclose(part, all_f[sub], rtol=1e-6, atol=1e-6)


def test_ncm_on_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(5, 16)) * 5
  labels = np.repeat(np.arange(5), 20)
  feats = centres[labels] + rng.normal(size=(100, 16)) * 0.1
  means, counts = fc.class_means(feats, labels, 7)
  assert counts.tolist() == [20] * 5 + [0, 0]
  pred = fc.ncm_predict(feats, means, counts)
  assert (pred == labels).all()
  # restricting the candidate classes (e.g. those seen so far)
  pred = fc.ncm_predict(feats, means, counts, classes=np.arange(3))
  assert set(pred.tolist()) <= {0, 1, 2}
  assert (pred[labels < 3] == labels[labels < 3]).all()
  with pytest.raises(ValueError):
    fc.ncm_predict(feats, means, np.zeros(7, int))
