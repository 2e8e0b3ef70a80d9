"""Tests for cft_jax.objectives (docs/methods.md#objectives)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cft_jax import objectives as obj

B, C = 6, 5


def _inputs(seed=0, scale=2.0, batch=B, classes=C):
  rng = np.random.default_rng(seed)
  z = (scale * rng.standard_normal((batch, classes))).astype(np.float32)
  y = rng.integers(0, classes, size=batch).astype(np.int32)
  return z, y


# ------------------------------- NumPy references (float64) -------------------------------


def np_logp(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_py(z, y):
  return np.exp(np_logp(z)[np.arange(len(y)), y])


def np_ce(z, y):
  return -np_logp(z)[np.arange(len(y)), y]


def np_entropy(z):
  lp = np_logp(z)
  return -(np.exp(lp) * lp).sum(-1)


NP_REF = {
    "ce": (obj.ce, {}, lambda z, y: np_ce(z, y)),
    "epg": (obj.epg, {}, lambda z, y: -np_py(z, y)),
    "aepg": (obj.aepg, {"alpha": 0.3},
             lambda z, y: 0.3 * np_ce(z, y) - 0.7 * np_py(z, y)),
    "confidence_penalty": (obj.confidence_penalty, {"beta": 0.2},
                           lambda z, y: np_ce(z, y) - 0.2 * np_entropy(z)),
    "label_smoothing": (obj.label_smoothing, {"gamma": 0.05},
                        lambda z, y: 0.95 * np_ce(z, y) + 0.05 * (
                            (1 / C) * (np.log(1 / C) - np_logp(z))).sum(-1)),
    "focal_g2": (obj.focal, {"gamma": 2.0},
                 lambda z, y: (1 - np_py(z, y)) ** 2 * np_ce(z, y)),
    "focal_g05": (obj.focal, {"gamma": 0.5},
                  lambda z, y: (1 - np_py(z, y)) ** 0.5 * np_ce(z, y)),
    "entropy_penalty": (obj.entropy_penalty, {"beta": 1.0},
                        lambda z, y: np_ce(z, y) + np_entropy(z)),
    "mse": (obj.mse, {"alpha": 15.0},
            lambda z, y: 0.5 * ((15.0 * np.eye(C)[y] - z) ** 2).sum(-1)),
    "mse_a3": (obj.mse, {"alpha": 3.0},
               lambda z, y: 0.5 * ((3.0 * np.eye(C)[y] - z) ** 2).sum(-1)),
}


class ObjectiveValuesTest(chex.TestCase):
  """Values against the float64 NumPy references, jitted and not (``chex.variants``)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    z, y = _inputs(seed=1)
    all_objectives = self.variant(
        lambda zz, yy: {k: fn(zz, yy, **kw) for k, (fn, kw, _) in NP_REF.items()})
    outs = all_objectives(z, y)
    for key, (_, _, ref) in NP_REF.items():
      out = outs[key]
      chex.assert_shape(out, (B,))
      assert out.dtype == jnp.float32, key
      np.testing.assert_allclose(np.asarray(out), ref(z, y), rtol=2e-5, atol=2e-6, err_msg=key)

  @chex.variants(with_jit=True, without_jit=True)
  def test_entropy_matches_numpy_and_bounds(self):
    z, _ = _inputs(seed=2)
    entropy = self.variant(obj.entropy)
    h = entropy(z)
    chex.assert_shape(h, (B,))
    chex.assert_trees_all_close(h, np_entropy(z).astype(np.float32), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(entropy(jnp.zeros((2, C))), jnp.full((2,), math.log(C)),
                                rtol=1e-6)
    chex.assert_trees_all_close(entropy(jnp.array([[1e4, 0., 0.]])), jnp.zeros((1,)), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_label_smoothing_is_smoothed_target_ce_minus_constant(self):
    z, y = _inputs(seed=3)
    g = 0.1
    q = (1 - g) * np.eye(C)[y] + g / C
    ref = -(q * np_logp(z)).sum(-1) - g * math.log(C)
    out = self.variant(obj.label_smoothing)(z, y, g)
    chex.assert_trees_all_close(out, ref.astype(np.float32), rtol=1e-5)


def test_bf16_input_gives_float32():
  z, y = _inputs(seed=4)

  def all_objectives(zz):
    out = {}
    for name, fn in obj.OBJECTIVES.items():
      if name == "reinforce":
        out[name] = fn(zz, y, jax.random.PRNGKey(0))
      elif name == "aepg":
        out[name] = fn(zz, y, 0.5)
      else:
        out[name] = fn(zz, y)
    return out

  for name, out in jax.jit(all_objectives)(jnp.asarray(z, jnp.bfloat16)).items():
    assert out.dtype == jnp.float32, name


# ------------------------------------ gradient identities ----------------------------------


def _logit_grad(fn, z, y, **kw):
  return np.asarray(jax.grad(lambda zz: jnp.sum(fn(zz, y, **kw)))(jnp.asarray(z)), np.float64)


def test_epg_param_grad_is_py_times_ce_param_grad():
  """Per sample, grad_theta L_EPG = p_y grad_theta L_CE for any parameterisation (aEPG paper)."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, C)), jnp.float32)
  y = jnp.array([2])
  model = lambda w_: jnp.tanh(x @ w_) * 3.0

  @jax.jit
  def grads(w):
    g_ce = jax.grad(lambda w_: obj.ce(model(w_), y)[0])(w)
    g_epg = jax.grad(lambda w_: obj.epg(model(w_), y)[0])(w)
    return g_ce, g_epg, jnp.exp(-obj.ce(model(w), y)[0])

  g_ce, g_epg, py = grads(w)
  assert 0.05 < py < 0.95
  np.testing.assert_allclose(np.asarray(g_epg), py * np.asarray(g_ce), rtol=1e-5, atol=1e-7)
  assert np.abs(np.asarray(g_epg - g_ce)).max() > 0.05


class LogitGradientTest(chex.TestCase):
  """Closed-form logit gradients (aEPG paper), jitted and not (``chex.variants``)."""

  def _grad(self, fn, z, y, **kw):
    g = self.variant(jax.grad(lambda zz: jnp.sum(fn(zz, y, **kw))))(jnp.asarray(z))
    chex.assert_shape(g, (B, C))
    return np.asarray(g, np.float64)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ce_grad_is_p_minus_onehot(self):
    z, y = _inputs(seed=5)
    p = np.exp(np_logp(z))
    chex.assert_trees_all_close(self._grad(obj.ce, z, y), p - np.eye(C)[y], atol=2e-6, rtol=0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_epg_grad_is_py_times_ce_grad(self):
    z, y = _inputs(seed=6)
    p = np.exp(np_logp(z))
    py = np_py(z, y)[:, None]
    g_epg, g_ce = self._grad(obj.epg, z, y), self._grad(obj.ce, z, y)
    chex.assert_trees_all_close(g_epg, py * (p - np.eye(C)[y]), atol=2e-6, rtol=0)
    chex.assert_trees_all_close(g_epg, py * g_ce, atol=2e-6, rtol=0)
    # Not trivially equal to CE's gradient.
    assert np.abs(g_epg - g_ce).max() > 0.1

  @chex.variants(with_jit=True, without_jit=True)
  def test_aepg_endpoints_and_grad(self):
    z, y = _inputs(seed=8)
    aepg = self.variant(obj.aepg)
    chex.assert_trees_all_close(aepg(z, y, 1.0), obj.ce(z, y), rtol=1e-6)
    chex.assert_trees_all_close(aepg(z, y, 0.0), obj.epg(z, y), rtol=1e-6)
    a = 0.25
    p = np.exp(np_logp(z))
    py = np_py(z, y)[:, None]
    chex.assert_trees_all_close(self._grad(obj.aepg, z, y, alpha=a),
                                (a + (1 - a) * py) * (p - np.eye(C)[y]), atol=2e-6, rtol=0)
    # alpha may be traced (a jnp scalar under the jit variant).
    out = aepg(z, y, jnp.float32(a))
    chex.assert_trees_all_close(out, (a * np_ce(z, y) - (1 - a) * np_py(z, y)).astype(np.float32),
                                rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_focal_gamma0_is_ce(self):
    z, y = _inputs(seed=9)
    chex.assert_trees_all_close(self.variant(obj.focal)(z, y, 0.0), obj.ce(z, y), rtol=1e-6)


# ------------------------------------------ stability --------------------------------------


def _huge_inputs():
  z, _ = _inputs(seed=10, scale=1e4)
  y = np.argmax(z, -1).astype(np.int32)  # p_y == 1 in float32 for these rows
  y[::2] = np.argmin(z[::2], -1)  # p_y == 0 in float32 for these rows
  return jnp.asarray(z), jnp.asarray(y)


STABILITY_CASES = {
    "ce": lambda z, y: obj.ce(z, y),
    "epg": lambda z, y: obj.epg(z, y),
    "aepg": lambda z, y: obj.aepg(z, y, 0.5),
    "confidence_penalty": lambda z, y: obj.confidence_penalty(z, y, 0.1),
    "label_smoothing": lambda z, y: obj.label_smoothing(z, y, 0.1),
    "focal_g05": lambda z, y: obj.focal(z, y, 0.5),
    "focal_g2": lambda z, y: obj.focal(z, y, 2.0),
    "entropy_penalty": lambda z, y: obj.entropy_penalty(z, y, 1.0),
    "mse": lambda z, y: obj.mse(z, y),
    "reinforce": lambda z, y: obj.reinforce(z, y, jax.random.PRNGKey(0), num_samples=4),
    "reinforce_loo": lambda z, y: obj.reinforce(z, y, jax.random.PRNGKey(0), 4, "loo"),
    "reinforce_expected": lambda z, y: obj.reinforce(z, y, jax.random.PRNGKey(0), 4, "expected"),
    "entropy": lambda z, y: obj.entropy(z),
}


def test_finite_values_and_grads_at_1e4():
  z, y = _huge_inputs()

  @jax.jit
  def all_cases(zz):
    res = {}
    for key, fn in STABILITY_CASES.items():
      out = fn(zz, y)
      res[key] = (out, jax.grad(lambda z_: jnp.sum(fn(z_, y)))(zz))
    return res

  for key, (out, grad) in all_cases(z).items():
    chex.assert_shape(out, (B,))
    assert np.all(np.isfinite(np.asarray(out))), (key, out)
    assert np.all(np.isfinite(np.asarray(grad))), (key, grad)


def test_values_correct_at_1e4():
  z, y = _huge_inputs()
  zn = np.asarray(z)
  np.testing.assert_allclose(obj.ce(z, y), np_ce(zn, np.asarray(y)), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(obj.epg(z, y), -np_py(zn, np.asarray(y)), atol=1e-6)
  # p_y = 1 rows: focal is exactly 0 with a zero gradient; p_y = 0 rows: focal = CE.
  f = np.asarray(obj.focal(z, y, 0.5))
  np.testing.assert_allclose(f[1::2], 0.0, atol=1e-6)
  np.testing.assert_allclose(f[::2], np_ce(zn, np.asarray(y))[::2], rtol=1e-5)


# -------------------------------------------- schedules -------------------------------------


def test_sigmoid_schedule_values():
  T = 1000
  np.testing.assert_allclose(obj.sigmoid_schedule(0, T), 1 / (1 + math.exp(-6)), rtol=1e-6)
  np.testing.assert_allclose(obj.sigmoid_schedule(0, T), 0.9975, atol=1e-4)
  np.testing.assert_allclose(obj.sigmoid_schedule(T // 2, T), 0.5, atol=1e-7)
  np.testing.assert_allclose(obj.sigmoid_schedule(T, T), 0.0025, atol=1e-4)
  np.testing.assert_allclose(obj.sigmoid_schedule(T // 4, T, tau=2.0),
                             1 / (1 + math.exp(-1.0)), rtol=1e-6)
  vals = np.asarray([obj.sigmoid_schedule(t, T) for t in range(0, T + 1, 50)])
  assert np.all(np.diff(vals) < 0)


def test_linear_cosine_constant_schedules():
  T = 200
  for fn in (obj.linear_schedule, obj.cosine_schedule):
    np.testing.assert_allclose(fn(0, T), 1.0, atol=1e-7)
    np.testing.assert_allclose(fn(T // 2, T), 0.5, atol=1e-7)
    np.testing.assert_allclose(fn(T, T), 0.0, atol=1e-7)
  np.testing.assert_allclose(obj.linear_schedule(50, T), 0.75, atol=1e-7)
  np.testing.assert_allclose(obj.cosine_schedule(50, T), 0.5 + 0.5 * math.cos(math.pi / 4),
                             atol=1e-6)
  np.testing.assert_allclose(obj.constant_schedule(17, T, alpha=0.7), 0.7, rtol=1e-7)


def test_schedules_traced_guarded_and_clipped():
  for name, fn in obj.SCHEDULES.items():
    jitted = jax.jit(fn)
    a = jitted(jnp.int32(30), jnp.int32(100))
    np.testing.assert_allclose(a, fn(30, 100), rtol=1e-6, err_msg=name)
    for t, n in ((0, 0), (5, 0), (150, 100), (-3, 100)):
      v = float(fn(t, n))
      assert math.isfinite(v) and 0.0 <= v <= 1.0, (name, t, n, v)
  np.testing.assert_allclose(obj.linear_schedule(150, 100), 0.0)
  np.testing.assert_allclose(obj.sigmoid_schedule(0, 0), obj.sigmoid_schedule(0, 10))


# --------------------------------------- REINFORCE vs EPG -----------------------------------


def test_reinforce_value_formula():
  z, y = _inputs(seed=11)
  key = jax.random.PRNGKey(3)
  S = 3
  actions = np.asarray(jax.random.categorical(key, jax.nn.log_softmax(jnp.asarray(z)), axis=-1,
                                              shape=(S, B)))
  lp = np_logp(z)
  r = (actions == y[None]).astype(np.float64)
  lpa = lp[np.arange(B)[None], actions]
  out = jax.jit(lambda zz: [obj.reinforce(zz, y, key, S, b) for b in obj.REINFORCE_BASELINES])(z)
  np.testing.assert_allclose(out[0], -(r * lpa).mean(0), rtol=1e-5, atol=1e-6)
  loo = r - (r.sum(0, keepdims=True) - r) / (S - 1)
  np.testing.assert_allclose(out[1], -(loo * lpa).mean(0), rtol=1e-5, atol=1e-6)
  ex = r - np.exp(lp[np.arange(B), y])[None]
  np.testing.assert_allclose(out[2], -(ex * lpa).mean(0), rtol=1e-5, atol=1e-6)


MC_KEYS = 20000
MC_VARIANTS = (dict(), dict(num_samples=4, baseline="loo"),
               dict(num_samples=4, baseline="expected"), dict(num_samples=4))


@functools.lru_cache(maxsize=None)
def _mc_setup():
  """Fixed small batch and per-key REINFORCE logit gradients ``[K, B, C]`` per variant.

  One jit for all variants (compile time dominates on CPU); shared by the tests below.
  """
  z, y = _inputs(seed=12, scale=1.0)
  z, y = jnp.asarray(z), jnp.asarray(y)
  keys = jax.random.split(jax.random.PRNGKey(42), MC_KEYS)

  def per_key(zz, k):
    return [jax.grad(lambda z_: jnp.sum(obj.reinforce(z_, y, k, **kw)))(zz) for kw in MC_VARIANTS]

  out = jax.jit(jax.vmap(per_key, in_axes=(None, 0)))(z, keys)
  return z, y, [np.asarray(g, np.float64) for g in out]


def test_reinforce_is_unbiased_for_epg_and_noisier():
  z, y, (g, *_) = _mc_setup()  # g: [K, B, C], one sample per example and key
  K = MC_KEYS
  mean, var = g.mean(0), g.var(0, ddof=1)
  se = np.sqrt(var / K)
  tol = 4 * se + 1e-7
  g_epg = _logit_grad(obj.epg, z, y)
  g_ce = _logit_grad(obj.ce, z, y)
  assert np.all(np.abs(mean - g_epg) <= tol), np.abs(mean - g_epg) / se
  # The tolerance is tight: the CE gradient, or an EPG gradient off by 10%, fails it.
  assert np.any(np.abs(mean - g_ce) > tol)
  assert np.any(np.abs(mean - 1.1 * g_epg) > tol)
  # Variance: one sample gives R (p - e_y), R ~ Bernoulli(p_y) => Var = p_y (1 - p_y)(p - e_y)^2.
  yn = np.asarray(y)
  p = np.exp(np_logp(np.asarray(z)))
  pq = p[np.arange(B), yn][:, None] * (1 - p[np.arange(B), yn][:, None])
  var_ref = pq * (p - np.eye(C)[yn]) ** 2
  # Relative SE of a sample variance is sqrt((kurtosis - 1) / K); Bernoulli kurtosis (1-3pq)/pq.
  rel_se = np.sqrt(((1 - 3 * pq) / pq - 1) / K)
  assert np.all(np.abs(var - var_ref) <= 5 * rel_se * var_ref + 1e-12), (var / var_ref - 1) / rel_se
  assert np.any(np.abs(var - 2 * var_ref) > 5 * rel_se * var_ref)
  assert var.sum() > 0.05
  # EPG is deterministic (variance 0): identical gradient whatever rng the trainer passes.
  loss_fn = obj.make_loss_fn("epg")
  ge = [np.asarray(jax.grad(lambda zz: jnp.sum(loss_fn(zz, y, rng=jax.random.PRNGKey(i))[0]))(z))
        for i in range(3)]
  np.testing.assert_array_equal(ge[0], ge[1])
  np.testing.assert_array_equal(ge[0], ge[2])


def test_reinforce_baselines_and_num_samples_unbiased():
  z, y, (g1, *gs) = _mc_setup()
  g_epg = _logit_grad(obj.epg, z, y)
  g_ce = _logit_grad(obj.ce, z, y)
  for kw, g in zip(MC_VARIANTS[1:], gs):
    mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(MC_KEYS)
    assert np.all(np.abs(mean - g_epg) <= 4 * se + 1e-7), (kw, np.abs(mean - g_epg) / se)
    assert np.any(np.abs(mean - g_ce) > 4 * se + 1e-7), kw
  # 4 samples per example: total variance about 4x lower than with 1 sample.
  ratio = g1.var(0).sum() / gs[2].var(0).sum()
  assert 3.5 < ratio < 4.5, ratio


def test_reinforce_bad_args():
  z, y = _inputs()
  k = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="baseline"):
    obj.reinforce(z, y, k, 2, "bogus")
  with pytest.raises(ValueError, match="num_samples"):
    obj.reinforce(z, y, k, 0)
  with pytest.raises(ValueError, match="loo"):
    obj.reinforce(z, y, k, 1, "loo")


# ------------------------------------- entropy direction -----------------------------------


def _entropy_after_step(fn, z, y, lr=0.1, **kw):
  g = jax.grad(lambda zz: jnp.sum(fn(zz, y, **kw)))(z)
  return np.asarray(obj.entropy(z - lr * g))


@pytest.mark.parametrize("labels_at_argmax", [True, False])
def test_entropy_lowering_vs_raising(labels_at_argmax):
  z, y = _inputs(seed=14)
  if labels_at_argmax:
    y = np.argmax(z, -1).astype(np.int32)
  z, y = jnp.asarray(z), jnp.asarray(y)
  h_ce = _entropy_after_step(obj.ce, z, y)
  h_ep = _entropy_after_step(obj.entropy_penalty, z, y, beta=1.0)
  h_cp = _entropy_after_step(obj.confidence_penalty, z, y, beta=0.2)
  assert np.all(h_ep < h_ce - 1e-4), h_ce - h_ep
  assert np.all(h_cp > h_ce + 1e-5), h_cp - h_ce
  if labels_at_argmax:  # LS pushes the (correct) top logit down -> higher entropy than CE.
    h_ls = _entropy_after_step(obj.label_smoothing, z, y, gamma=0.1)
    assert np.all(h_ls > h_ce + 1e-5), h_ls - h_ce


# ------------------------------------------ registry ---------------------------------------


def test_registry_contents():
  assert set(obj.OBJECTIVES) == {"ce", "epg", "aepg", "confidence_penalty", "label_smoothing",
                                 "focal", "entropy_penalty", "mse", "reinforce"}
  assert set(obj.SCHEDULES) == {"sigmoid", "linear", "cosine", "constant"}
  assert set(obj.OBJECTIVE_HPARAMS) == set(obj.OBJECTIVES)


def test_make_loss_fn_errors():
  with pytest.raises(ValueError, match=r"'nope'.*valid.*aepg"):
    obj.make_loss_fn("nope")
  with pytest.raises(ValueError, match=r"betta.*valid keys.*beta"):
    obj.make_loss_fn("confidence_penalty", betta=0.1)
  with pytest.raises(ValueError, match=r"schedule.*'exp'"):
    obj.make_loss_fn("aepg", schedule="exp")
  with pytest.raises(ValueError, match="alpha"):
    obj.make_loss_fn("aepg", schedule="constant", alpha=1.5)
  obj.make_loss_fn("aepg", schedule="sigmoid", alpha=15.0)  # alpha only read by 'constant'
  with pytest.raises(ValueError, match="gamma"):
    obj.make_loss_fn("label_smoothing", gamma=2.0)
  with pytest.raises(ValueError, match="baseline"):
    obj.make_loss_fn("reinforce", baseline="x")
  with pytest.raises(ValueError, match="rng"):
    obj.make_loss_fn("reinforce")(*_inputs())


FULL_SECTION = dict(schedule="sigmoid", tau=6.0, alpha=None, beta=None, gamma=None,
                    num_samples=None, baseline=None, schedule_scope="task")


@pytest.mark.parametrize("name", sorted(obj.OBJECTIVES))
def test_make_loss_fn_aux_and_full_section(name):
  z, y = _inputs(seed=15)
  loss_fn = obj.make_loss_fn(**dict(FULL_SECTION, name=name))
  loss, aux = loss_fn(z, y, step=0, total_steps=100, rng=jax.random.PRNGKey(0))
  chex.assert_shape(loss, (B,))
  assert set(aux) == {"alpha", "entropy"}
  chex.assert_shape((aux["alpha"], aux["entropy"]), ((), ()))
  np.testing.assert_allclose(aux["entropy"], np_entropy(z).mean(), rtol=1e-5)
  want_alpha = {"aepg": 1 / (1 + math.exp(-6)), "epg": 0.0, "reinforce": 0.0}.get(name, 1.0)
  np.testing.assert_allclose(aux["alpha"], want_alpha, rtol=1e-6)


def test_make_loss_fn_uses_its_hparams_and_ignores_others():
  z, y = _inputs(seed=16)
  lf = obj.make_loss_fn("focal", gamma=2.0, beta=5.0, schedule="linear", tau=1.0)
  np.testing.assert_allclose(lf(z, y)[0], obj.focal(z, y, 2.0), rtol=1e-6)
  lf = obj.make_loss_fn("focal")
  np.testing.assert_allclose(lf(z, y)[0], obj.focal(z, y, 1.0), rtol=1e-6)
  lf = obj.make_loss_fn("label_smoothing", gamma=None)
  np.testing.assert_allclose(lf(z, y)[0], obj.label_smoothing(z, y, 0.1), rtol=1e-6)
  lf = obj.make_loss_fn("mse", alpha=3.0)
  np.testing.assert_allclose(lf(z, y)[0], obj.mse(z, y, 3.0), rtol=1e-6)
  lf = obj.make_loss_fn("aepg", schedule="constant", alpha=0.2)
  loss, aux = lf(z, y, step=7, total_steps=10)
  np.testing.assert_allclose(loss, obj.aepg(z, y, 0.2), rtol=1e-6)
  np.testing.assert_allclose(aux["alpha"], 0.2, rtol=1e-6)


@pytest.mark.parametrize("schedule,want", [("sigmoid", 0.5), ("linear", 0.5), ("cosine", 0.5),
                                            ("sigmoid@25", 1 / (1 + math.exp(-3)))])
def test_make_loss_fn_aepg_jit_traced_step(schedule, want):
  z, y = _inputs(seed=17)
  sched, step = (schedule.split("@")[0], int(schedule.split("@")[1])) if "@" in schedule else (
      schedule, 50)
  lf = obj.make_loss_fn("aepg", schedule=sched, tau=6.0)
  f = jax.jit(functools.partial(lf, rng=None))
  loss, aux = f(z, y, step=jnp.int32(step), total_steps=jnp.int32(100))
  np.testing.assert_allclose(aux["alpha"], want, rtol=1e-5)
  np.testing.assert_allclose(loss, obj.aepg(z, y, want), rtol=1e-5)


def test_aux_entropy_is_stop_gradient():
  z, y = _inputs(seed=18)
  lf = obj.make_loss_fn("ce")
  g = jax.grad(lambda zz: lf(zz, y)[1]["entropy"])(jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(g), 0.0)
