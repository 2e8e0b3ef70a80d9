"""K-FAC regulariser: ``accumulate="sum"`` is n (mean A) (x) (mean G), and with
``model.linearize=full`` the output cotangents are taken at the linearized logits
(issue 13, bugs 3 and 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cft_jax import curvature
from cft_jax.methods import regularizers
from tests.methods.test_continual_methods import _ctx, _Head


def _aug(x):
  return np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)


def _m(p):
  return np.concatenate([np.asarray(p["head"]["kernel"], np.float64),
                         np.asarray(p["head"]["bias"], np.float64)[None]], 0)


def test_kfac_sum_is_task_count_times_mean_factors():
  d, c, n = 3, 2, 6
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(n, d)).astype(np.float32) for _ in range(2)]
  module = _Head(c)
  params0 = module.init(jax.random.PRNGKey(0), xs[0])["params"]
  thetas = [jax.tree_util.tree_map(lambda v, s=s: v + s, params0) for s in (0.5, -0.25)]
  ce = lambda p, x: jax.nn.softmax(module.apply({"params": p}, x))
  for accumulate in ("sum", "mean"):
    osla = regularizers.KroneckerRegularizer(curvature="kfac", fisher_type="exact",
                                             weighting="plain", accumulate=accumulate)
    ctx = _ctx(module, params0, xs[0], np.zeros(n, np.int32), (0, c), c, loss="ce")
    ctx.linearize = None
    st = osla.init_state(params0, ctx)
    for t, (x, theta) in enumerate(zip(xs, thetas)):
      ctx = _ctx(module, params0, x, np.zeros(n, np.int32), (0, c), c, loss="ce")
      ctx.linearize = None
      st = osla.end_task(t, theta, osla.begin_task(t, params0, st, ctx), ctx)
    st = osla.begin_task(2, thetas[1], st, ctx)
    theta = jax.tree_util.tree_map(
        lambda v: v + jnp.asarray(np.random.default_rng(3).normal(size=v.shape), v.dtype), params0)
    # by hand: A_i = E[[x,1][x,1]^T], G_i = E[diag(p) - p p^T] at theta_i (exact CE Fisher)
    A = [_aug(x).T @ _aug(x) / n for x in xs]
    G = []
    for x, th in zip(xs, thetas):
      p = np.asarray(ce(th, x), np.float64)
      G.append(np.mean([np.diag(q) - np.outer(q, q) for q in p], 0))
    V = _m(theta) - _m(thetas[1])  # [in', out] anchored at theta_{t-1}
    A_mean, G_mean = (A[0] + A[1]) / 2, (G[0] + G[1]) / 2
    single = 0.5 * np.trace(V.T @ A_mean @ V @ G_mean)  # 1/2 vec(V)^T (A (x) G) vec(V)
    want = 2 * single if accumulate == "sum" else single  # sum: n = 2 tasks
    np.testing.assert_allclose(float(osla.penalty(theta, st)), want, rtol=1e-4)
    f = st["kfac"]["head"]
    np.testing.assert_allclose(f["kfac_A"], A_mean, rtol=1e-5)  # mean factors in both modes
    np.testing.assert_allclose(f["kfac_G"], G_mean, rtol=1e-4, atol=1e-7)


def test_kfac_linearize_full_takes_cotangents_at_linearized_logits():
  d, c, n = 3, 3, 5
  rng = np.random.default_rng(1)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n).astype(np.int32)
  module = _Head(c)
  params0 = module.init(jax.random.PRNGKey(0), x)["params"]
  theta = jax.tree_util.tree_map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype),
                                 params0)
  for fisher_type in ("exact", "empirical"):
    osla = regularizers.KroneckerRegularizer(curvature="kfac", fisher_type=fisher_type)
    ctx = _ctx(module, params0, x, y, (0, c), c, loss="ce", scope="all")  # linearize="full"
    st = osla.init_state(params0, ctx)
    st = osla.end_task(0, theta, osla.begin_task(0, params0, st, ctx), ctx)
    # a linear model is its own linearization: the logits at theta, softmax p
    p = np.asarray(jax.nn.softmax(module.apply({"params": theta}, x)), np.float64)
    if fisher_type == "exact":
      want_g = np.mean([np.diag(q) - np.outer(q, q) for q in p], 0)
    else:  # empirical: q = p - e_y
      r = p - np.eye(c)[y]
      want_g = r.T @ r / n
    np.testing.assert_allclose(st["kfac"]["head"]["kfac_G"], want_g, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(st["kfac"]["head"]["kfac_A"], _aug(x).T @ _aug(x) / n, rtol=1e-5)


def test_kfac_factors_linearized_uses_theta0_jacobian():
  """Two-layer nonlinear net: A of the hidden layer at theta_0; G of the output layer from the
  cotangents at f_lin(theta)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(4, name="l1")(x))
      return nn.Dense(3, name="l2")(h)

  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 2)).astype(np.float32)
  y = rng.integers(0, 3, 6).astype(np.int32)
  net = Net()
  p0 = net.init(jax.random.PRNGKey(0), x)["params"]
  p = jax.tree_util.tree_map(lambda v: v + 0.5, p0)
  apply = lambda q, xx: net.apply({"params": q}, xx)
  f = curvature.kfac_factors_linearized(apply, p0, p, [(x, y)], loss="ce", fisher_type="exact")
  from cft_jax.linearize import linearized_apply  # pylint: disable=g-import-not-at-top
  z = linearized_apply(apply, p0, p, x)
  probs = np.asarray(jax.nn.softmax(z), np.float64)
  want_g = np.mean([np.diag(q) - np.outer(q, q) for q in probs], 0)
  np.testing.assert_allclose(f[("l2",)].G, want_g, rtol=1e-4, atol=1e-7)
  h0 = np.tanh(_aug(x) @ _m({"head": p0["l1"]}))  # hidden activations at theta_0
  np.testing.assert_allclose(f[("l2",)].A, _aug(h0).T @ _aug(h0) / 6, rtol=1e-4)
  f0 = curvature.kfac_factors(apply, p0, [(x, y)], loss="ce", fisher_type="exact")
  assert not np.allclose(f0[("l2",)].G, want_g, rtol=1e-3)  # f(theta_0) cotangents differ


def test_dlcft_error_names_valid_linearize_values():
  module = _Head(2)
  x = np.ones((2, 3), np.float32)
  params0 = module.init(jax.random.PRNGKey(0), x)["params"]
  ctx = _ctx(module, params0, x, np.zeros(2, np.int32), (0, 2), 2)
  ctx.linearize = None
  with pytest.raises(ValueError, match=r"none \| full \| features") as e:
    regularizers.DLCFT().init_state(params0, ctx)
  assert "linearize=True" not in str(e.value)
