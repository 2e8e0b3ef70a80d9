"""Tests for cft_jax.curvature: diagonal Fisher, MAS, K-FAC / TK-FAC, penalties, class-IL head."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from cft_jax import curvature as cv
from cft_jax import linearize as lin
from cft_jax.models import resnet

KEY = jax.random.key(0, impl="rbg")  # fast-compiling PRNG for inits


class MLP(nn.Module):
  hidden: int = 5
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, return_features=False):
    x = nn.tanh(nn.Dense(self.hidden, name="fc1")(x))
    if return_features:
      return x
    return nn.Dense(self.num_classes, name="head")(x)


class ConvNet(nn.Module):
  """A strided SAME conv, a VALID conv without bias, a head: exercises the patch conventions."""

  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME", name="conv_a")(x))
    x = nn.Conv(4, (2, 2), padding="VALID", use_bias=False, name="conv_b")(x)
    x = jnp.mean(nn.leaky_relu(x), axis=(1, 2))
    return nn.Dense(3, name="head")(x)


def _normal(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _data(n=6, d=4, c=3, seed=0):
  x = _normal((n, d), seed)
  y = jnp.asarray(np.random.default_rng(seed + 1).integers(0, c, n))
  return x, y


def _random_like(tree, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda l: jnp.asarray(scale * rng.standard_normal(l.shape), l.dtype), tree)


def _ce(z, y):
  return -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1)[:, 0]


def _mse(z, y, alpha=15.0):
  return 0.5 * jnp.sum((alpha * jax.nn.one_hot(y, z.shape[-1]) - z) ** 2, axis=-1)


def _per_example_grads(loss_fn, apply_fn, params, x, y):
  """Flattened per-example gradients ``[N, P]`` of ``loss_fn(apply_fn(p, x_i), y_i)``."""
  flat, unravel = ravel_pytree(params)

  def one(xi, yi):
    return jax.grad(lambda v: loss_fn(apply_fn(unravel(v), xi[None]), yi[None])[0])(flat)

  return jax.jit(jax.vmap(one))(x, y), unravel


# ------------------------------------------------------------------------------------------
# Diagonal Fisher, MAS, EWC penalty
# ------------------------------------------------------------------------------------------


def test_diagonal_fisher_empirical_equals_explicit_diagonal():
  model = MLP()
  x, y = _data()
  params = model.init(KEY, x)["params"]
  apply_fn = lambda p, xx: model.apply({"params": p}, xx)
  grads, unravel = _per_example_grads(_ce, apply_fn, params, x[:5], y[:5])
  fisher = grads.T @ grads / 5  # explicit empirical Fisher [P, P] of the first 5 examples
  # Two batches of 3, the second padded with a masked (ignored) example.
  batches = [(x[:3], y[:3]), (x[3:], y[3:], jnp.array([1.0, 1.0, 0.0]))]
  diag = cv.diagonal_fisher(apply_fn, params, batches, loss="ce", fisher_type="empirical")
  np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(fisher), rtol=1e-5, atol=1e-7)
  # microbatch (lax.map) gives the same numbers.
  diag2 = cv.diagonal_fisher(apply_fn, params, batches, loss="ce", fisher_type="empirical",
                             microbatch=2)
  np.testing.assert_allclose(ravel_pytree(diag2)[0], jnp.diag(fisher), rtol=1e-5, atol=1e-7)


def test_exact_and_mc_fisher_match_explicit_true_fisher():
  model = MLP()
  x, y = _data()
  params = model.init(KEY, x)["params"]
  apply_fn = lambda p, xx: model.apply({"params": p}, xx)
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def explicit():
    jac = jax.vmap(lambda xi: jax.jacrev(lambda v: apply_fn(unravel(v), xi[None])[0])(flat))(x)
    p = jax.nn.softmax(apply_fn(params, x))
    hz = jax.vmap(lambda pi: jnp.diag(pi) - jnp.outer(pi, pi))(p)  # CE output Hessian
    f_ce = jnp.einsum("ncp,ncd,ndq->pq", jac, hz, jac) / x.shape[0]
    f_mse = jnp.einsum("ncp,ncq->pq", jac, jac) / x.shape[0]  # Gauss-Newton, H_z = I
    return f_ce, f_mse

  f_ce, f_mse = explicit()
  for loss, ref in (("ce", f_ce), ("mse", f_mse)):
    exact = cv.diagonal_fisher(apply_fn, params, [(x, y)], loss=loss, fisher_type="exact")
    np.testing.assert_allclose(ravel_pytree(exact)[0], jnp.diag(ref), rtol=1e-4, atol=1e-7)
    mc = cv.diagonal_fisher(apply_fn, params, [(x, y)], loss=loss, fisher_type="mc",
                            rng=jax.random.PRNGKey(0), num_samples=4000)
    np.testing.assert_allclose(ravel_pytree(mc)[0], jnp.diag(ref), rtol=0.1,
                               atol=0.02 * float(jnp.max(jnp.diag(ref))))
  with pytest.raises(ValueError, match="rng"):
    cv.diagonal_fisher(apply_fn, params, [(x, y)], loss="ce", fisher_type="mc")
  with pytest.raises(ValueError, match="loss"):
    cv.diagonal_fisher(apply_fn, params, [(x, y)], loss="hinge")


def test_mas_importance_and_ewc_penalty():
  model = MLP()
  x, y = _data()
  params = model.init(KEY, x)["params"]
  apply_fn = lambda p, xx: model.apply({"params": p}, xx)
  flat, unravel = ravel_pytree(params)
  g = jax.vmap(lambda xi: jax.grad(lambda v: jnp.sum(apply_fn(unravel(v), xi[None]) ** 2))(flat))(x)
  omega = cv.mas_importance(apply_fn, params, [(x, y)])
  np.testing.assert_allclose(ravel_pytree(omega)[0], jnp.mean(jnp.abs(g), 0), rtol=1e-5,
                             atol=1e-7)
  theta = _random_like(params, 3)
  v = ravel_pytree(theta)[0] - flat
  f = ravel_pytree(omega)[0]
  np.testing.assert_allclose(cv.ewc_penalty(theta, params, omega), 0.5 * jnp.sum(f * v * v),
                             rtol=1e-5)
  assert float(cv.ewc_penalty(params, params, omega)) == 0.0


# ------------------------------------------------------------------------------------------
# Linear model + MSE: the quadratic penalty IS the old loss (DLCFT eq. 8)
# ------------------------------------------------------------------------------------------


def test_hessian_penalty_equals_old_loss_for_linearized_mse_model():
  with jax.enable_x64(True):
    model = MLP()
    x = _normal((8, 4), 0, jnp.float64)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 3, 8))
    p0 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64),
                                model.init(KEY, x)["params"])
    apply_lin = lin.linearize(lambda p, xx: model.apply({"params": p}, xx), p0)
    flat0, unravel = ravel_pytree(p0)
    old_loss = jax.jit(lambda v: jnp.mean(_mse(apply_lin(unravel(v), x), y)))

    @jax.jit
    def solve():  # exact minimiser of the (quadratic) old loss: least squares on the Jacobian
      jac = jax.jacrev(lambda v: apply_lin(unravel(v), x).reshape(-1))(flat0)  # [N C, P]
      resid = (15.0 * jax.nn.one_hot(y, 3) - apply_lin(p0, x)).reshape(-1)
      theta_star = flat0 + jnp.linalg.lstsq(jac, resid)[0]
      hess = jax.hessian(old_loss)
      return (theta_star, jax.grad(old_loss)(theta_star), hess(theta_star), hess(flat0))

    theta_star, grad_star, hess, hess0 = solve()
    assert float(jnp.max(jnp.abs(grad_star))) < 1e-9
    np.testing.assert_allclose(hess, hess0, atol=1e-10)  # the Hessian is constant
    for seed in (3, 4):
      v = ravel_pytree(_random_like(p0, seed))[0]
      penalty = 0.5 * (v - theta_star) @ hess @ (v - theta_star)
      np.testing.assert_allclose(penalty, old_loss(v) - old_loss(theta_star), rtol=1e-9)
    # H is the exact-type MSE Fisher (Gauss-Newton) of the NONLINEAR net at p0 (eq. 8).
    diag = cv.diagonal_fisher(lambda p, xx: model.apply({"params": p}, xx), p0, [(x, y)],
                              loss="mse", fisher_type="exact")
    np.testing.assert_allclose(ravel_pytree(diag)[0], jnp.diag(hess), rtol=1e-9)


def test_kfac_is_exact_for_a_linear_layer_with_mse_and_extends_to_new_classes():
  """Single dense layer + MSE: A (x) I is the exact Hessian; eq. 13 gives new units' block."""
  with jax.enable_x64(True):
    num_old, num_total = 3, 5
    x = _normal((10, 4), 0, jnp.float64)
    y = jnp.asarray(np.random.default_rng(1).integers(0, num_old, 10))

    class Head(nn.Module):
      c: int

      @nn.compact
      def __call__(self, xx):
        return nn.Dense(self.c, name="head")(xx)

    def loss(params, c):
      z = Head(c).apply({"params": params}, x)
      return jnp.mean(_mse(z, y))

    xb = jnp.concatenate([x, jnp.ones((10, 1))], 1)
    sol = jnp.linalg.lstsq(xb, 15.0 * jax.nn.one_hot(y, num_old))[0]  # [5, C]
    p_star = {"head": {"kernel": sol[:-1], "bias": sol[-1]}}
    factors = cv.kfac_factors(lambda pp, xx: Head(num_old).apply({"params": pp}, xx), p_star,
                              [(x, y)], loss="mse", fisher_type="exact")
    f = factors[("head",)]
    np.testing.assert_allclose(f.G, jnp.eye(num_old), atol=1e-12)
    np.testing.assert_allclose(f.A, xb.T @ xb / 10, rtol=1e-10)
    np.testing.assert_allclose(cv.tkfac_scale(f), 1.0, rtol=1e-10)
    theta = _random_like(p_star, 5)
    for tc in (False, True):
      np.testing.assert_allclose(cv.kfac_penalty(theta, p_star, factors, trace_correction=tc),
                                 loss(theta, num_old) - loss(p_star, num_old), rtol=1e-9)
    # Class-IL: two new output units, zero-initialised; their old-task targets are 0.
    ext = {("head",): cv.extend_head_factors(f, num_old, num_total)}
    anchor = {"head": cv.extend_head_anchor(p_star["head"], num_old, num_total)}
    assert anchor["head"]["kernel"].shape == (4, num_total)
    np.testing.assert_allclose(jax.grad(loss)(anchor, num_total)["head"]["kernel"], 0,
                               atol=1e-9)  # the zero-extended anchor is still optimal
    theta = _random_like(anchor, 6)
    for tc in (False, True):
      np.testing.assert_allclose(cv.kfac_penalty(theta, anchor, ext, trace_correction=tc),
                                 loss(theta, num_total) - loss(anchor, num_total), rtol=1e-9)
    # A fixed-width head (G with zero rows for unseen units) extends the same way.
    g_fixed = jnp.zeros((num_total, num_total)).at[:num_old, :num_old].set(f.G)
    ext2 = cv.extend_head_factors(f._replace(G=g_fixed), num_old, num_total)
    np.testing.assert_allclose(ext2.G, ext[("head",)].G)


# ------------------------------------------------------------------------------------------
# K-FAC / TK-FAC
# ------------------------------------------------------------------------------------------


class KfacPenaltyTest(chex.TestCase):
  """K-FAC / TK-FAC / EWC penalties against explicit forms, jitted and not (``chex.variants``)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_kfac_penalty_equals_explicit_kronecker_form(self):
    rng = np.random.default_rng(0)

    def spd(n):
      m = rng.standard_normal((n, n))
      return jnp.asarray(m @ m.T / n + np.eye(n) * 0.1, jnp.float32)

    layers = {
        ("dense",): ({"kernel": (4, 3), "bias": (3,)}, 5),
        ("conv",): ({"kernel": (2, 3, 2, 4), "bias": (4,)}, 2 * 2 * 3 + 1),
        ("conv_nobias",): ({"kernel": (3, 3, 2, 4)}, 2 * 3 * 3),
    }
    for path, (shapes, din) in layers.items():
      params = {path[0]: {k: _normal(s, 1) for k, s in shapes.items()}}
      anchor = {path[0]: {k: _normal(s, 2) for k, s in shapes.items()}}
      dout = shapes["kernel"][-1]
      f = cv.LayerFactors(spd(din), spd(dout), jnp.asarray(7.0))
      # V = [W | b] - anchor in the math layout [out, in'], conv inputs ordered (c_in, kh, kw).
      def math_v(layer):
        k = layer["kernel"]
        w = k.T if k.ndim == 2 else jnp.transpose(k, (3, 2, 0, 1)).reshape(k.shape[-1], -1)
        return jnp.concatenate([w, layer["bias"][:, None]], 1) if "bias" in layer else w
      v = math_v(params[path[0]]) - math_v(anchor[path[0]])
      vec = v.T.reshape(-1)  # column-major vec
      explicit = 0.5 * vec @ jnp.kron(f.A, f.G) @ vec
      kfac_penalty = self.variant(cv.kfac_penalty)
      chex.assert_shape(kfac_penalty(params, anchor, {path: f}), ())
      chex.assert_trees_all_close(kfac_penalty(params, anchor, {path: f}), explicit, rtol=1e-4)
      np.testing.assert_allclose(cv.kronecker_matrix(f), jnp.kron(f.A, f.G))
      s = cv.tkfac_scale(f)
      np.testing.assert_allclose(s, 7.0 / (jnp.trace(f.A) * jnp.trace(f.G)), rtol=1e-6)
      chex.assert_trees_all_close(self.variant(cv.tkfac_penalty)(params, anchor, {path: f}),
                                  s * explicit, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ewc_penalty_is_half_weighted_square(self):
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    anchor = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([[2.5]])}
    omega = {"a": jnp.array([2.0, 0.5]), "b": jnp.array([[3.0]])}
    ewc = self.variant(cv.ewc_penalty)
    chex.assert_shape(ewc(params, anchor, omega), ())
    # 1/2 (2 * 1 + 0.5 * 9 + 3 * 4) = 9.25
    chex.assert_trees_all_close(ewc(params, anchor, omega), jnp.float32(9.25), rtol=1e-6)
    chex.assert_trees_all_close(ewc(anchor, anchor, omega), jnp.float32(0.0), atol=0)


def test_kfac_single_example_matches_gradient_outer_product():
  """B = 1, one cotangent, T = 1 (a conv whose output is 1x1): A (x) G = vec(dW) vec(dW)^T, so
  the penalty is 1/2 <grad, V>^2 in the Flax layout — pins the patch order and the vec."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)  # 3x3 input -> 1x1 output
      return nn.Dense(3, name="head")(nn.tanh(x.reshape(x.shape[0], -1)))

  model = Net()
  x = _normal((1, 3, 3, 2))
  y = jnp.array([1])
  params = model.init(KEY, x)["params"]
  apply_fn = lambda p, xx: model.apply({"params": p}, xx)
  factors = cv.kfac_factors(apply_fn, params, [(x, y)], loss="ce", fisher_type="empirical")
  grad = jax.grad(lambda p: _ce(apply_fn(p, x), y)[0])(params)
  v = _random_like(params, 3)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  for path in (("conv",), ("head",)):
    inner = sum(jnp.sum(a * b) for a, b in zip(jax.tree_util.tree_leaves(grad[path[0]]),
                                                jax.tree_util.tree_leaves(v[path[0]])))
    np.testing.assert_allclose(cv.kfac_penalty(v, zero, {path: factors[path]}),
                               0.5 * inner ** 2, rtol=1e-4)


def _exact_layer_traces(loss_fn, apply_fn, params, x, y):
  grads, unravel = _per_example_grads(loss_fn, apply_fn, params, x, y)
  per = jax.vmap(unravel)(grads)
  return {k: float(sum(jnp.sum(l ** 2) for l in jax.tree_util.tree_leaves(v)) / x.shape[0])
          for k, v in per.items()}


@pytest.mark.parametrize("model_name", ["mlp", "convnet"])
def test_tkfac_trace_equals_exact_fisher_trace(model_name):
  if model_name == "mlp":
    model, x = MLP(), _normal((6, 4))
  else:
    model, x = ConvNet(), _normal((6, 5, 5, 2))
  y = jnp.asarray(np.random.default_rng(1).integers(0, 3, x.shape[0]))
  params = model.init(KEY, x)["params"]
  apply_fn = lambda p, xx: model.apply({"params": p}, xx)
  factors = cv.kfac_factors(apply_fn, params, [(x[:3], y[:3]), (x[3:], y[3:])], loss="ce",
                            fisher_type="empirical")
  assert set(factors) == set((k,) for k in params)
  exact = _exact_layer_traces(_ce, apply_fn, params, x, y)
  for path, f in factors.items():
    np.testing.assert_allclose(f.fisher_trace, exact[path[0]], rtol=1e-4)
    s = cv.tkfac_scale(f)
    np.testing.assert_allclose(jnp.trace(cv.kronecker_matrix(f, trace_correction=True)),
                               exact[path[0]], rtol=1e-4)
    np.testing.assert_allclose(s * jnp.trace(f.A) * jnp.trace(f.G), exact[path[0]], rtol=1e-4)
  if model_name == "mlp":  # dense factors against their definitions
    h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    a = jnp.concatenate([h, jnp.ones((6, 1))], 1)
    np.testing.assert_allclose(factors[("head",)].A, a.T @ a / 6, rtol=1e-5)
    g = jax.nn.softmax(apply_fn(params, x)) - jax.nn.one_hot(y, 3)  # dl/ds of the head
    np.testing.assert_allclose(factors[("head",)].G, g.T @ g / 6, rtol=1e-5, atol=1e-7)
  else:
    assert factors[("conv_b",)].A.shape == (2 * 2 * 3, 2 * 2 * 3)  # no bias column
    assert factors[("conv_a",)].A.shape == (3 * 3 * 2 + 1,) * 2


def test_kfac_linearized_features_traces_match_per_example_grads():
  with jax.enable_x64(True):
    model = MLP(hidden=4)
    x = _normal((6, 3), 0, jnp.float64)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 3, 6))
    p0 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), model.init(KEY, x)["params"])
    feature_fn = lambda p, xx: model.apply({"params": p}, xx, return_features=True)
    apply = lin.linearize_features(feature_fn, p0)
    params = jax.tree_util.tree_map(lambda a, b: a + 0.3 * b, p0, _random_like(p0, 2))
    mse = lambda z, yy: _mse(z, yy)
    factors = cv.kfac_factors_linearized_features(feature_fn, p0, params, [(x, y)], loss="mse",
                                                  fisher_type="empirical")
    exact = _exact_layer_traces(mse, apply, params, x, y)
    for path, f in factors.items():
      np.testing.assert_allclose(f.fisher_trace, exact[path[0]], rtol=1e-9)
    z = lin.linearized_apply(feature_fn, lin.split_head(p0)[0], lin.split_head(params)[0], x)
    a = jnp.concatenate([z, jnp.ones((6, 1))], 1)
    np.testing.assert_allclose(factors[("head",)].A, a.T @ a / 6, rtol=1e-9)
    # Fully linearized model: K-FAC of the nonlinear net at p0 is the same at any params.
    full = lin.linearize(lambda p, xx: model.apply({"params": p}, xx), p0)
    exact_full = _exact_layer_traces(lambda zz, yy: jnp.sum(zz * jnp.array([1.0, -2.0, 0.5]),
                                                            -1), full, params, x, y)
    exact_nl = _exact_layer_traces(lambda zz, yy: jnp.sum(zz * jnp.array([1.0, -2.0, 0.5]),
                                                          -1),
                                   lambda p, xx: model.apply({"params": p}, xx), p0, x, y)
    for k in exact_full:
      np.testing.assert_allclose(exact_full[k], exact_nl[k], rtol=1e-9)


def test_kfac_factors_resnet_smoke():
  # Two stages (stem, identity block, projection block, head) keep compilation short; every
  # layer type of ResNet-18 is present.
  model = resnet.ResNet(4, stem="cifar", width=2, stages=(1, 1), activation="leaky_relu")
  x = _normal((2, 8, 8, 3))
  y = jnp.array([0, 3])
  variables = jax.jit(model.init)(KEY, x)
  apply_fn = lin.module_apply_fn(model, variables)
  params = variables["params"]
  factors = cv.kfac_factors(apply_fn, params, [(x, y)], loss="mse", fisher_type="mc",
                            rng=jax.random.PRNGKey(0))
  assert sorted(factors) == sorted([("conv1",), ("layer1_0", "conv1"), ("layer1_0", "conv2"),
                                    ("layer2_0", "conv1"), ("layer2_0", "conv2"),
                                    ("layer2_0", "downsample_conv"), ("head",)])
  f = factors[("layer2_0", "conv1")]
  assert f.A.shape == (2 * 9, 2 * 9) and f.G.shape == (4, 4)  # conv without bias (BN follows)
  assert factors[("layer2_0", "downsample_conv")].A.shape == (2, 2)
  assert factors[("head",)].A.shape == (5, 5)
  for f in factors.values():
    assert bool(jnp.all(jnp.isfinite(f.A))) and bool(jnp.all(jnp.isfinite(f.G)))
    assert float(f.fisher_trace) > 0
  penalty = jax.jit(cv.tkfac_penalty)
  assert float(penalty(params, params, factors)) == 0.0
  moved = jax.tree_util.tree_map(lambda a, b: a + 0.1 * b, params, _random_like(params, 1))
  assert float(penalty(moved, params, factors)) > 0.0


def test_average_factors():
  old = {("a",): cv.LayerFactors(jnp.ones((2, 2)), 2 * jnp.ones((1, 1)), jnp.asarray(3.0))}
  new = {("a",): cv.LayerFactors(4 * jnp.ones((2, 2)), 5 * jnp.ones((1, 1)), jnp.asarray(6.0))}
  assert cv.average_factors(None, new, 1) is new
  assert cv.average_factors(old, new, 1) is new
  avg = cv.average_factors(old, new, 3)[("a",)]
  np.testing.assert_allclose(avg.A, 2.0)  # (2 * 1 + 4) / 3
  np.testing.assert_allclose(avg.G, 3.0)
  np.testing.assert_allclose(avg.fisher_trace, 4.0)
  with pytest.raises(ValueError):
    cv.average_factors(old, new, 0)


def test_kfac_treats_rank0_lora_dense_as_a_1x1_conv():
  """EfficientNet-Lite's 1x1 convs are rank-0 ``LoRADense`` layers: their K-FAC factors (and
  TK-FAC trace) equal those of the same ``nn.Conv`` 1x1 layer; with LoRA on (rank > 0) the layer
  is left to the diagonal fallback."""
  from cft_jax.peft.lora import LoRADense

  def net(layer):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.tanh(layer(name="pw")(x))
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))
    return Net()

  x = _normal((4, 3, 3, 5))
  y = jnp.array([0, 2, 1, 1])
  lora_net = net(lambda name: LoRADense(6, rank=0, name=name))
  conv_net = net(lambda name: nn.Conv(6, (1, 1), name=name))
  params = lora_net.init(KEY, x)["params"]
  conv_params = {"pw": {"kernel": params["pw"]["kernel"][None, None], "bias": params["pw"]["bias"]},
                 "head": params["head"]}
  np.testing.assert_allclose(conv_net.apply({"params": conv_params}, x),
                             lora_net.apply({"params": params}, x), rtol=1e-5, atol=1e-6)
  f_lora = cv.kfac_factors(lambda p, xx: lora_net.apply({"params": p}, xx), params, [(x, y)],
                           loss="ce", fisher_type="empirical")
  f_conv = cv.kfac_factors(lambda p, xx: conv_net.apply({"params": p}, xx), conv_params,
                           [(x, y)], loss="ce", fisher_type="empirical")
  assert set(f_lora) == {("pw",), ("head",)}
  chex.assert_trees_all_close(f_lora[("pw",)], f_conv[("pw",)], rtol=1e-5, atol=1e-7)
  exact = _exact_layer_traces(_ce, lambda p, xx: lora_net.apply({"params": p}, xx), params, x, y)
  np.testing.assert_allclose(f_lora[("pw",)].fisher_trace, exact["pw"], rtol=1e-4)
  with_lora = net(lambda name: LoRADense(6, rank=2, name=name))
  p2 = with_lora.init(KEY, x)["params"]
  f2 = cv.kfac_factors(lambda p, xx: with_lora.apply({"params": p}, xx), p2, [(x, y)],
                       loss="ce", fisher_type="empirical")
  assert set(f2) == {("head",)}


def test_jit_cache_reuses_one_compilation_with_new_values():
  """``jit_cache``: the second call with other parameter values (and, for the diagonal Fisher,
  other ``const`` values) reuses the first call's compiled function and returns exactly what an
  uncached call returns."""
  model = MLP()
  x = _normal((6, 4))
  y = jnp.asarray([0, 1, 2, 0, 1, 2])
  p1 = model.init(KEY, x)["params"]
  p2 = jax.tree_util.tree_map(lambda a: 1.3 * a + 0.05, p1)
  apply_fn = lambda p, xx: model.apply({"params": p}, xx)
  cache = {}
  for p in (p1, p2):
    got = cv.kfac_factors(apply_fn, p, [(x, y)], loss="ce", fisher_type="empirical",
                          jit_cache=cache)
    want = cv.kfac_factors(apply_fn, p, [(x, y)], loss="ce", fisher_type="empirical")
    chex.assert_trees_all_close(got, want, rtol=1e-6)
  (fn,) = cache.values()
  assert fn._cache_size() == 1  # pylint: disable=protected-access

  # diagonal Fisher of fc1 only, the head passed as `const` (changes between calls)
  def merged(s, xx, rest):
    return apply_fn({"fc1": s, "head": rest}, xx)

  cache = {}
  for p in (p1, p2):
    got = cv.diagonal_fisher(merged, p["fc1"], [(x, y)], loss="ce", fisher_type="empirical",
                             const=p["head"], jit_cache=cache)
    want = cv.diagonal_fisher(lambda s, xx, h=p["head"]: apply_fn({"fc1": s, "head": h}, xx),
                              p["fc1"], [(x, y)], loss="ce", fisher_type="empirical")
    chex.assert_trees_all_close(got, want, rtol=1e-6)
  (fn,) = cache.values()
  assert fn._cache_size() == 1  # pylint: disable=protected-access
