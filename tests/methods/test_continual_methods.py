"""DLCFT's comparison methods: reservoir buffer, EWC, DLCFT, LwF, DER, Joint, k-NN probe, runs."""

import json
import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from cft_jax import knn, methods, train
from cft_jax.methods import lwf as lwf_lib
from cft_jax.methods import regularizers, replay

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
import default as default_config  # pylint: disable=g-import-not-at-top

HAS_FMNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------
# Reservoir buffer.
# ------------------------------------------------------------------------------------------


def test_reservoir_sampling_is_uniform():
  """Stream 96 ids (+4 padded) through the jitted after_step into 10 slots, 4000 times."""
  n_valid, n_stream, size, b, reps = 96, 100, 10, 10, 4000
  er = replay.ER(buffer_size=size)
  ctx = methods.TaskContext(image_shape=(1, 1, 1), num_classes=2)
  state0 = er.init_state({}, ctx)
  ids = np.arange(n_stream, dtype=np.int32)
  mask = ids < n_valid

  @jax.jit
  @jax.vmap
  def run(key):
    def body(st, i):
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * b, b)
      batch = {"images": jnp.zeros((b, 1, 1, 1), jnp.uint8), "labels": sl(jnp.asarray(ids)),
               "logits": jnp.zeros((b, 2)), "mask": sl(jnp.asarray(mask))}
      return er.after_step({}, st, batch, jax.random.fold_in(key, i)), None
    st, _ = jax.lax.scan(body, state0, jnp.arange(n_stream // b))
    return st["buffer"]["labels"], st["buffer"]["seen"]

  labels, seen = run(jax.random.split(jax.random.PRNGKey(0), reps))
  assert np.all(np.asarray(seen) == n_valid)
  labels = np.asarray(labels)
  # a buffer never holds an id twice, never a padded one
  assert all(len(set(row)) == size for row in labels[:50])
  counts = np.bincount(labels.ravel(), minlength=n_stream)
  assert counts[n_valid:].sum() == 0
  expected = reps * size / n_valid
  chi2 = np.sum((counts[:n_valid] - expected) ** 2 / expected)
  # per-id inclusion is Binomial(reps, p): chi2 ~ (1-p) chi2(n_valid) for a uniform sampler
  assert chi2 < stats.chi2.ppf(0.9999, n_valid), chi2
  assert np.abs(counts[:n_valid] - expected).max() < 6 * np.sqrt(expected)
  # early and late examples equally likely (what a FIFO or "first M" buffer gets wrong)
  assert abs(counts[:size].mean() - counts[n_valid - size:n_valid].mean()) < 3 * np.sqrt(expected)


def test_buffer_fills_in_order_then_der_term_is_mse_to_stored_logits():
  der = replay.DER(buffer_size=4, replay_batch_size=6, alpha=0.3)
  ctx = methods.TaskContext(image_shape=(2, 2, 1), num_classes=3)
  st = der.init_state({}, ctx)
  imgs = np.arange(16, dtype=np.uint8).reshape(4, 2, 2, 1)
  f = lambda p, x, r: x.reshape(x.shape[0], -1)[:, :3].astype(jnp.float32) * p["s"]
  params = {"s": jnp.float32(1.0)}
  # empty buffer: no replay term
  assert float(der.extra_loss(params, st, {}, None, f, jax.random.PRNGKey(0))) == 0.0
  stored = f(params, imgs, None) + 0.5  # every stored logit is off by 0.5
  st = der.after_step(params, st, {"images": imgs, "labels": jnp.arange(4),
                                   "logits": stored, "mask": jnp.ones(4, bool)},
                      jax.random.PRNGKey(1))
  np.testing.assert_array_equal(st["buffer"]["images"], imgs)  # n < M: slot n
  np.testing.assert_array_equal(st["buffer"]["labels"], [0, 1, 2, 3])
  val = der.extra_loss(params, st, {}, None, f, jax.random.PRNGKey(2))
  np.testing.assert_allclose(float(val), 0.3 * 0.25, rtol=1e-6)
  # ER: CE of the replayed examples over the 2 seen classes (class 2 masked out), by hand
  er = replay.ER(buffer_size=4, replay_batch_size=5)
  buf = {**st["buffer"], "labels": jnp.array([0, 1, 1, 0])}
  key = jax.random.PRNGKey(3)
  x, y, _, _ = replay.buffer_sample(buf, key, 5)
  z = np.asarray(f(params, x, None))[:, :2]
  ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(5), np.asarray(y)])
  got = er.extra_loss(params, {"buffer": buf, "num_seen": jnp.int32(2)}, {}, None, f, key)
  np.testing.assert_allclose(float(got), ce, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# EWC / DLCFT penalties.
# ------------------------------------------------------------------------------------------


class _Head(nn.Module):
  """A linear model whose only layer is the K-FAC-visible ``head`` (``shift``: features
  ``x + s`` with a trainable, zero-initialised ``s``, a "backbone" without a K-FAC layer)."""
  num_classes: int = 2
  shift: bool = False

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    del train
    if self.shift:
      x = x + self.param("enc_shift", nn.initializers.zeros, (x.shape[-1],))
    if return_features:
      return x
    return nn.Dense(self.num_classes, name="head")(x)


def _ctx(module, params0, x, y, task_range, num_classes, loss="mse", scope="all"):
  apply = lambda p, xx, **kw: module.apply({"params": p}, xx, **kw)
  ctx = methods.TaskContext(
      task_id=0, task_range=task_range, num_classes=num_classes, classes_per_task=2,
      image_shape=x.shape[1:], forward=apply, preprocess=lambda im, rng=None, train=False: im,
      batches=lambda: iter([(x, y, np.ones(len(y), bool))]), loss_name=loss)
  ctx.apply, ctx.params0, ctx.linearize, ctx.loss_scope = apply, params0, "full", scope
  return ctx


def test_ewc_penalty_and_weighting_by_hand():
  ewc = regularizers.EWC(strength=2.0)
  params = {"a": jnp.array([1.0, 2.0]), "head": {"kernel": jnp.array([[3.0]])}}
  st = ewc.init_state(params)
  st = {**st, "t": jnp.float32(3.0),
        "importance": {"a": jnp.array([0.5, 4.0]), "head": {"kernel": jnp.array([[1.0]])}}}
  new = {"a": jnp.array([2.0, 1.0]), "head": {"kernel": jnp.array([[1.0]])}}
  quad = 0.5 * (0.5 * 1 + 4.0 * 1 + 1.0 * 4)
  np.testing.assert_allclose(float(ewc.penalty(new, st)), 2.0 * (2 / 3) * quad, rtol=1e-6)
  np.testing.assert_allclose(float(ewc.data_weight(st)), 1 / 3)
  plain = regularizers.EWC(strength=2.0, weighting="plain")
  np.testing.assert_allclose(float(plain.penalty(new, st)), 2.0 * quad, rtol=1e-6)
  assert plain.data_weight(st) == 1.0
  task_il = regularizers.EWC(exclude_head=True)
  st2 = task_il.init_state(params)
  assert "head" not in st2["importance"]


def test_ewc_exact_fisher_of_a_linear_model_accumulates_as_a_mean():
  module = _Head(2)
  x1 = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
  x2 = np.array([[0.0, 1.0], [2.0, 2.0]], np.float32)
  params = module.init(jax.random.PRNGKey(0), x1)["params"]
  ewc = regularizers.EWC(fisher_type="exact")
  st = ewc.init_state(params)
  for t, x in enumerate([x1, x2]):
    st = ewc.begin_task(t, params, st)
    st = ewc.end_task(t, params, st, _ctx(module, params, x, np.zeros(2, np.int32), (0, 2), 2))
  # MSE Gauss-Newton diagonal of W[i, j] is E[x_i^2] (every output j); of b_j it is 1
  want = 0.5 * (np.mean(x1 ** 2, 0) + np.mean(x2 ** 2, 0))
  np.testing.assert_allclose(st["importance"]["head"]["kernel"], np.stack([want, want], 1),
                             rtol=1e-5)
  np.testing.assert_allclose(st["importance"]["head"]["bias"], [1.0, 1.0], rtol=1e-5)


def _flat(p):
  return jnp.concatenate([p["head"]["kernel"].ravel(), p["head"]["bias"]])


def _unflat(v, d, c):
  return {"head": {"kernel": v[:d * c].reshape(d, c), "bias": v[d * c:]}}


@pytest.mark.parametrize("curv", ["kfac", "tkfac"])
def test_dlcft_penalty_is_the_old_loss_and_its_minimiser_the_joint_solution(curv):
  """Linear model + MSE: L_reg = L_old(theta) - L_old(theta*), eq. 11's optimum = joint LSQ."""
  d, c, n, alpha = 3, 2, 12, 15.0
  rng = np.random.default_rng(0)
  x1, x2 = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  y1, y2 = rng.integers(0, c, n).astype(np.int32), rng.integers(0, c, n).astype(np.int32)
  module = _Head(c)
  params0 = module.init(jax.random.PRNGKey(0), x1)["params"]

  def lsq(x, y):
    a = np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)
    w = np.linalg.lstsq(a, alpha * np.eye(c)[y], rcond=None)[0]
    return {"head": {"kernel": jnp.asarray(w[:d], jnp.float32),
                     "bias": jnp.asarray(w[d], jnp.float32)}}

  def loss(p, x, y):
    z = module.apply({"params": p}, x)
    return jnp.mean(0.5 * jnp.sum((alpha * jax.nn.one_hot(y, c) - z) ** 2, -1))

  dl = regularizers.DLCFT(curvature=curv, fisher_type="exact")
  ctx1 = _ctx(module, params0, x1, y1, (0, c), c)
  st = dl.init_state(params0, ctx1)
  st = dl.begin_task(0, params0, st, ctx1)
  theta1 = lsq(x1, y1)
  st = dl.end_task(0, theta1, st, ctx1)
  st = dl.begin_task(1, theta1, st, ctx1)
  theta = _unflat(jnp.asarray(rng.normal(size=d * c + c), jnp.float32), d, c)
  np.testing.assert_allclose(float(dl.penalty(theta, st)),
                             0.5 * float(loss(theta, x1, y1) - loss(theta1, x1, y1)), rtol=1e-4)
  np.testing.assert_allclose(float(dl.data_weight(st)), 0.5)

  def objective(v):
    p = _unflat(v, d, c)
    return dl.data_weight(st) * loss(p, x2, y2) + dl.penalty(p, st)

  v0 = jnp.zeros(d * c + c)
  v = v0 - jnp.linalg.solve(jax.hessian(objective)(v0), jax.grad(objective)(v0))  # quadratic
  joint = lsq(np.concatenate([x1, x2]), np.concatenate([y1, y2]))
  np.testing.assert_allclose(np.asarray(v), np.asarray(_flat(joint)), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mode", ["full", "features"])
def test_dlcft_class_il_head_extension_is_exact(mode):
  """Task 1 sees classes {0, 1} of 3: the unseen unit gets A (x) I and anchor 0 (eq. 13).

  Both linearization modes (whole network / eqs. 6-7 features + head) coincide for a linear model.
  """
  d, c, n, alpha = 3, 3, 10, 15.0
  rng = np.random.default_rng(1)
  x1 = rng.normal(size=(n, d)).astype(np.float32)
  y1 = rng.integers(0, 2, n).astype(np.int32)
  module = _Head(c, shift=True)  # the shift is never moved: its diagonal term stays 0
  params0 = module.init(jax.random.PRNGKey(0), x1)["params"]
  a = np.concatenate([x1, np.ones((n, 1))], 1).astype(np.float64)
  w = np.linalg.lstsq(a, alpha * np.eye(c)[y1][:, :2], rcond=None)[0]
  w = np.concatenate([w, rng.normal(size=(d + 1, 1))], 1)  # unit 2 is NOT at zero: anchor fixes it
  theta1 = {"head": {"kernel": jnp.asarray(w[:d], jnp.float32),
                     "bias": jnp.asarray(w[d], jnp.float32)}, "enc_shift": jnp.zeros(d)}
  dl = regularizers.DLCFT(curvature="kfac", fisher_type="exact")
  ctx = _ctx(module, params0, x1, y1, (0, 2), c)
  ctx.linearize = mode
  st = dl.init_state(params0, ctx)
  st = dl.end_task(0, theta1, dl.begin_task(0, params0, st, ctx), ctx)
  st = dl.begin_task(1, theta1, st, ctx)
  np.testing.assert_array_equal(st["anchor"]["head"]["kernel"][:, 2], 0.0)
  assert set(st["diag"]) == {"enc_shift"}  # the non-K-FAC leaf gets the diagonal Fisher
  theta = {**_unflat(jnp.asarray(rng.normal(size=d * c + c), jnp.float32), d, c),
           "enc_shift": jnp.zeros(d)}
  opt = {"head": {"kernel": theta1["head"]["kernel"].at[:, 2].set(0.0),
                  "bias": theta1["head"]["bias"].at[2].set(0.0)}, "enc_shift": jnp.zeros(d)}

  def loss(p):  # old task's MSE over all 3 outputs (target 0 for the unseen class)
    z = module.apply({"params": p}, x1)
    return jnp.mean(0.5 * jnp.sum((alpha * jax.nn.one_hot(y1, c) - z) ** 2, -1))

  np.testing.assert_allclose(float(dl.penalty(theta, st)), 0.5 * float(loss(theta) - loss(opt)),
                             rtol=1e-4)


def test_dlcft_refuses_a_nonlinear_ce_run():
  module = _Head(2)
  x = np.ones((2, 3), np.float32)
  params0 = module.init(jax.random.PRNGKey(0), x)["params"]
  ctx = _ctx(module, params0, x, np.zeros(2, np.int32), (0, 2), 2, loss="ce", scope="local")
  ctx.linearize = None
  with pytest.raises(ValueError, match="linearize.*mse.*scope"):
    regularizers.DLCFT().init_state(params0, ctx)
  with pytest.raises(ValueError, match="weighting"):
    regularizers.EWC(weighting="bad")


# ------------------------------------------------------------------------------------------
# LwF, Joint.
# ------------------------------------------------------------------------------------------


def test_lwf_distillation_zero_at_the_old_params_and_kl_by_hand():
  lwf = lwf_lib.LwF()
  params = {"w": jnp.array([[1.0, -1.0, 0.5], [0.2, 0.3, -2.0]])}
  f = lambda p, x, r: x @ p["w"]
  ctx = methods.TaskContext(task_range=(2, 3), num_classes=3)
  st = lwf.begin_task(1, params, lwf.init_state(params), ctx)
  assert int(st["num_old"]) == 2
  batch = {"images": jnp.array([[1.0, 2.0], [0.0, -1.0]]), "mask": jnp.array([True, True])}
  rng = jax.random.PRNGKey(0)
  assert float(lwf.extra_loss(params, st, batch, None, f, rng)) == 0.0
  moved = {"w": params["w"] + 0.3 * jnp.arange(6.0).reshape(2, 3)}
  got = float(lwf.extra_loss(moved, st, batch, None, f, rng))
  z, zo = np.asarray(f(moved, batch["images"], 0))[:, :2] / 2, np.asarray(
      f(params, batch["images"], 0))[:, :2] / 2
  p = np.exp(zo) / np.exp(zo).sum(1, keepdims=True)
  q = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  kl = np.mean(np.sum(p * np.log(p / q), 1))
  np.testing.assert_allclose(got, 0.5 * kl, rtol=1e-5)  # t = 2: weight (t-1)/t
  # first task: nothing to distil; data-IL later tasks distil all classes
  assert int(lwf.begin_task(0, params, st, methods.TaskContext(task_range=(0, 3),
                                                               num_classes=3))["num_old"]) == 0
  assert int(lwf.begin_task(2, params, st, methods.TaskContext(task_range=(0, 3),
                                                               num_classes=3))["num_old"]) == 3


def test_registry_builds_every_method_with_config_hparams():
  cfg = ml_collections.ConfigDict({"name": "dlcft", "curvature": "kfac", "buffer_size": 500,
                                   "replay_lambda": 0.5, "weighting": "plain"})
  m = methods.get_method(cfg)
  assert (m.curvature, m.buffer_size, m.weighting) == ("kfac", 500, "plain")
  assert methods.get_method(ml_collections.ConfigDict({"name": "joint"})).cumulative_data
  assert not methods.get_method(ml_collections.ConfigDict({"name": "ewc"})).cumulative_data
  assert methods.get_method(ml_collections.ConfigDict({"name": "derpp", "alpha": 0.2})).alpha == 0.2
  for name in ("ewc", "mas", "osla", "dlcft", "lwf", "er", "der", "derpp", "joint"):
    assert name in methods.method_names()


# ------------------------------------------------------------------------------------------
# k-NN probe.
# ------------------------------------------------------------------------------------------


def test_knn_accuracy_on_hand_made_clusters():
  rng = np.random.default_rng(0)
  centres = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
  tr = np.concatenate([c * rng.uniform(0.5, 5, (20, 1)) + 0.05 * rng.normal(size=(20, 2))
                       for c in centres])
  ytr = np.repeat(np.arange(3), 20)
  te = centres * np.array([[2.0], [0.1], [7.0]])  # scale is irrelevant to cosine similarity
  assert knn.knn_accuracy(tr, ytr, te, np.arange(3), k=5) == 100.0
  assert knn.knn_accuracy(tr, ytr, te, np.array([1, 1, 2]), k=5) == pytest.approx(200 / 3)
  # majority beats the single nearest neighbour; a 1-1 tie goes to the more similar voter
  mem = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, 0.61]])
  assert knn.knn_accuracy(mem, np.array([0, 1, 1]), [[1.0, 0.1]], [1], k=3) == 100.0
  assert knn.knn_accuracy(mem[:2], np.array([0, 1]), [[1.0, 0.1]], [0], k=2) == 100.0
  with pytest.raises(ValueError):
    knn.knn_accuracy(np.zeros((0, 2)), np.zeros(0), te, np.arange(3))


# ------------------------------------------------------------------------------------------
# End-to-end runs (tiny CNN, 2 tasks).
# ------------------------------------------------------------------------------------------


def _tiny(method, **overrides):
  c = default_config.get_config()
  c.model.name, c.model.pretrained = "tiny_cnn", False
  c.data.image_size, c.data.train_limit, c.data.test_limit, c.data.augment = 8, 16, 10, "none"
  c.scenario.num_tasks = 2
  c.peft.name = "full"
  c.loss.name = "ce"
  c.train.batch_size, c.train.epochs = 8, 1
  c.train.progress = c.train.verbose = c.train.plots = False
  c.eval.batch_size = 40
  name = overrides.get("method.name", method)
  small = {"buffer_size": 12, "replay_batch_size": 4, "curvature_batches": 1}
  fields = methods.method_config_fields(name) or {}
  c.method = ml_collections.ConfigDict(
      {"name": name, **{k: v for k, v in small.items() if k in fields}})
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


RUNS = {
    "ewc": {}, "mas": {"scenario.type": "task_il", "method.exclude_head": True}, "lwf": {},
    "osla": {}, "er": {}, "der": {}, "derpp": {}, "joint": {"scenario.type": "data_il"},
    # the linearized linear probe (whole network linearized: only the head trains)
    "dlcft": {"peft.name": "linear_probe", "model.linearize": "full", "loss.name": "mse",
              "loss.scope": "all", "eval.knn_k": 3},
    # DLCFT eqs. 6-7: the whole tiny CNN trains, its feature extractor linearized (K-FAC on the
    # convs, the rank-0 LoRADense layers and the head)
    "dlcft_features": {"method.name": "dlcft", "peft.name": "full",
                       "model.linearize": "features", "loss.name": "mse", "loss.scope": "all",
                       "eval.knn_k": 3},
}


@pytest.mark.skipif(not HAS_FMNIST, reason="needs /usr/share/datasets/fashion-mnist")
@pytest.mark.parametrize("method", sorted(RUNS))
def test_every_method_runs_end_to_end(method, tmp_path):
  cfg = _tiny(method, **RUNS[method])
  res = train.run(cfg, str(tmp_path))
  assert np.isfinite(res["final_accuracy"]) and np.isfinite(res["forgetting"])
  with open(tmp_path / "log.jsonl") as f:
    log = [json.loads(l) for l in f]
  steps = [max(r["step"] for r in log if r["task"] == t) for t in range(2)]
  assert steps == ([2, 4] if method == "joint" else [2, 2]), steps  # joint: cumulative data
  if method.startswith("dlcft"):
    assert len(res["knn_accuracy"]) == 2 and all(0 <= a <= 100 for a in res["knn_accuracy"])
  if method in ("ewc", "osla", "lwf", "dlcft", "dlcft_features"):  # loss = 1/2 L_data + active regulariser
    last = [r for r in log if r["task"] == 1][-1]
    assert last["loss"] != 0.5 * last["data_loss"], last


def test_mc_fisher_labels_follow_the_run_seed():
  """Issue 26 item 7: the Monte-Carlo Fisher drew its labels from ``method.seed`` only, so every
  run seed shared them; they now come from the run's key (``TaskContext.rng``)."""
  module = _Head(3)
  x = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
  params = module.init(jax.random.PRNGKey(0), x)["params"]
  ewc = regularizers.EWC(fisher_type="mc")

  def importance(rng):
    ctx = _ctx(module, params, x, np.zeros(16, np.int32), (0, 3), 3, loss="ce", scope="local")
    ctx.linearize, ctx.rng = None, rng
    st = ewc.begin_task(0, params, ewc.init_state(params))
    return np.asarray(ewc.end_task(0, params, st, ctx)["importance"]["head"]["kernel"])

  a, b = importance(jax.random.PRNGKey(1)), importance(jax.random.PRNGKey(2))
  assert not np.allclose(a, b)  # other run seed, other labels
  np.testing.assert_array_equal(a, importance(jax.random.PRNGKey(1)))  # reproducible
  contexts = []
  for seed in (0, 1):
    config = default_config.get_config()
    config.model.name, config.model.pretrained, config.data.image_size = "tiny_cnn", False, 16
    config.data.train_limit, config.data.test_limit, config.seed = 8, 8, seed
    config.train.verbose = False
    contexts.append(train.build_experiment(train.validate_config(config)).task_context(1))
  assert not np.array_equal(jax.random.key_data(contexts[0].rng),
                            jax.random.key_data(contexts[1].rng))
