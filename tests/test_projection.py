"""Tests for cft_jax.projection (TPGM, FTP, L2-SP, WiSE-FT: docs/methods.md#robust-ft)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cft_jax import projection as P

# A [in=3, out=2] kernel: |column| sums (MARS rows) 4 and 7, Frobenius norm sqrt(31).
D_KERNEL = np.array([[1.0, -2.0], [3.0, 4.0], [0.0, 1.0]], np.float32)


def _tree(seed=0, din=3, dout=2, classes=4):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"body": {"kernel": f(din, dout), "bias": f(dout)}, "head": {"kernel": f(dout, classes)}}


def _loss(params, batch):
  """Tiny 2-layer linear classifier, mean CE; ``batch = (x [B, din], y [B])``."""
  x, y = batch
  h = x @ params["body"]["kernel"] + params["body"]["bias"]
  logits = h @ params["head"]["kernel"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def _batch(seed=1, n=8, din=3, classes=4):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((n, din)), jnp.float32),
          jnp.asarray(rng.integers(0, classes, n), jnp.int32))


# ----------------------------------------- norms / project ---------------------------------


def test_norms_l2_and_mars():
  tree = {"k": D_KERNEL, "b": np.array([1.0, -2.0], np.float32)}
  l2 = P.norms(tree, "l2")
  np.testing.assert_allclose(l2["k"], np.sqrt(31.0), rtol=1e-6)
  np.testing.assert_allclose(l2["b"], np.sqrt(5.0), rtol=1e-6)
  mars = P.norms(tree, "mars")
  np.testing.assert_allclose(mars["k"], [4.0, 7.0])  # one L1 norm per output (last-axis) row
  assert mars["b"].shape == () and float(mars["b"]) == 3.0  # 1-D leaf: one row
  conv = np.ones((2, 2, 3, 5), np.float32)  # [kh, kw, in, out]
  np.testing.assert_allclose(P.norms(conv, "mars"), np.full(5, 12.0))
  with pytest.raises(ValueError, match="known"):
    P.norms(tree, "linf")


class ProjectTest(chex.TestCase):
  """Projection onto the per-tensor / per-row balls, jitted and not (``chex.variants``)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_project_l2_scales_each_tensor(self):
    anchor = {"a": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    params = {"a": anchor["a"] + D_KERNEL, "b": jnp.array([0.3, 0.4])}  # norms sqrt(31), 0.5
    project = self.variant(lambda p, a, r: P.project(p, a, r, "l2"))
    out = project(params, anchor, {"a": jnp.float32(2.0), "b": jnp.float32(1.0)})
    chex.assert_trees_all_close(out["a"], anchor["a"] + 2.0 / np.sqrt(31.0) * D_KERNEL,
                                rtol=1e-5)
    chex.assert_trees_all_close(out["b"], params["b"], rtol=1e-6)  # inside its ball: unchanged
    both = project(params, anchor, jnp.float32(0.25))  # one scalar for every leaf
    chex.assert_trees_all_close(both["b"], 0.5 * params["b"], rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_project_mars_scales_each_row(self):
    anchor = jnp.zeros((3, 2))
    project = self.variant(lambda p, a, r: P.project(p, a, r, "mars"))
    out = project(jnp.asarray(D_KERNEL), anchor, jnp.float32(5.0))  # rows 4, 7
    chex.assert_shape(out, (3, 2))
    chex.assert_trees_all_close(out, D_KERNEL * np.array([1.0, 5.0 / 7.0], np.float32),
                                rtol=1e-6)
    per_row = project(jnp.asarray(D_KERNEL), anchor, jnp.array([2.0, 10.0]))
    chex.assert_trees_all_close(per_row, D_KERNEL * np.array([0.5, 1.0], np.float32), rtol=1e-6)


def test_project_zero_displacement_and_none_radius():
  p = {"w": jnp.ones((2, 2)), "h": jnp.full((2,), 3.0)}
  a = {"w": jnp.ones((2, 2)), "h": jnp.zeros(2)}
  out = P.project(p, a, {"w": jnp.float32(1e-8), "h": None}, "mars")
  assert np.all(np.isfinite(out["w"])) and np.array_equal(out["w"], p["w"])
  np.testing.assert_array_equal(out["h"], p["h"])  # no radius: untouched


# ----------------------------------------------- radii ------------------------------------


def test_init_and_clamp_radii():
  a = _tree(0)
  p = jax.tree.map(lambda x, d: x + d, a, _tree(1))
  r = P.init_radii(p, a, "mars", exclude=P.is_head)
  n = P.norms(jax.tree.map(lambda x, y: x - y, p, a), "mars")
  np.testing.assert_allclose(r["body"]["kernel"], np.min(n["body"]["kernel"]) / 2, rtol=1e-6)
  assert r["head"]["kernel"] is None
  # params == anchor: n = 0 -> radius clamped up to 1e-8.
  r0 = P.init_radii(a, a, "l2")
  assert all(float(x) == pytest.approx(1e-8) for x in jax.tree.leaves(r0))
  clamped = P.clamp_radii({"x": jnp.array([-1.0, 0.5, 100.0]), "y": None},
                          {"x": jnp.array([1.0, 3.0]), "y": None})
  np.testing.assert_allclose(clamped["x"], [1e-8, 0.5, 3.0], rtol=1e-6)
  assert clamped["y"] is None


def test_tpgm_radii_clamped_after_large_step():
  a = _tree(0)
  p = jax.tree.map(lambda x, d: x + 0.1 * d, a, _tree(1))
  st = P.tpgm_init_radii_state(p, norm="l2", exclude=P.is_head)
  st = st._replace(initialized=jnp.ones((), bool), radii=jax.tree.map(lambda r: r + 0.05, st.radii))
  n = P.norms(jax.tree.map(lambda x, y: x - y, p, a), "l2")
  step = jax.jit(lambda lr: P.tpgm_project_step(p, a, st, _loss, _batch(), norm="l2", max_iters=2,
                                                radius_lr=lr)[1])
  for lr in (1e3, -1e3):  # Adam steps of size |lr| push the radii out of range both ways
    out = step(jnp.float32(lr))
    for key in ("kernel", "bias"):
      r = float(out.radii["body"][key])
      assert 1e-8 * (1 - 1e-6) <= r <= float(n["body"][key]) * (1 + 1e-6)


# ------------------------------------------------ TPGM ------------------------------------


@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_tpgm_radius_grad_matches_finite_differences(norm):
  a = _tree(0)
  p = jax.tree.map(lambda x, d: x + 0.5 * d, a, _tree(1))
  n = P.norms(jax.tree.map(lambda x, y: x - y, p, a), norm)
  # Radii strictly inside (min n, max n) and away from the clip kinks.
  radii = {"body": {k: 0.6 * jnp.min(v) + 0.1 * jnp.max(v) for k, v in n["body"].items()},
           "head": {"kernel": None}}
  batch = _batch()
  g = P.tpgm_radius_grad(radii, p, a, _loss, batch, norm)
  assert g["head"]["kernel"] is None
  h = 1e-3

  @jax.jit
  def f(delta_kernel, delta_bias):
    r = {"body": {"kernel": radii["body"]["kernel"] + delta_kernel,
                  "bias": radii["body"]["bias"] + delta_bias}, "head": {"kernel": None}}
    return P.tpgm_val_loss(r, p, a, _loss, batch, norm)

  for key, e in (("kernel", (1.0, 0.0)), ("bias", (0.0, 1.0))):
    fd = (f(h * e[0], h * e[1]) - f(-h * e[0], -h * e[1])) / (2 * h)
    np.testing.assert_allclose(float(g["body"][key]), float(fd), rtol=2e-2, atol=2e-4)
    assert abs(float(fd)) > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("norm,proj_freq", [("l2", 1), ("mars", 2)])
def test_tpgm_chained_after_adam_jitted(norm, proj_freq):
  anchor = _tree(0)
  tx = optax.chain(optax.adam(0.05),
                   P.tpgm(anchor, _loss, norm=norm, proj_freq=proj_freq, exclude=P.is_head))
  params = anchor
  state = tx.init(params)
  assert state[1].radii_state.radii["head"]["kernel"] is None
  batch, val = _batch(1), _batch(2)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params, batch)
    updates, state = tx.update(grads, state, params, val_batch=val)
    return optax.apply_updates(params, updates), state

  head0 = params["head"]["kernel"]
  for t in range(6):
    params, state = step(params, state)
    rs = state[1].radii_state
    assert bool(rs.initialized) == (t + 1 >= proj_freq)
    if (t + 1) % proj_freq:
      continue
    n = P.norms(jax.tree.map(lambda x, y: x - y, params, anchor), norm)
    for key in ("kernel", "bias"):
      r = float(rs.radii["body"][key])
      assert 1e-8 * (1 - 1e-6) <= r <= float(jnp.max(n["body"][key])) * (1 + 1e-5) + 1e-7
      assert np.all(np.asarray(n["body"][key]) <= r * (1 + 1e-4) + 1e-6)
  assert not np.allclose(params["head"]["kernel"], head0)  # excluded head trains freely
  assert np.all(np.isfinite(jax.tree.leaves(params)[0]))


def test_tpgm_excluded_leaf_gets_plain_update_and_needs_val_batch():
  anchor = _tree(0)
  p = jax.tree.map(lambda x, d: x + d, anchor, _tree(1))
  tx = P.tpgm(anchor, _loss, exclude={"head": True, "body": False})
  st = tx.init(p)
  assert st.radii_state.radii["head"]["kernel"] is None
  u = jax.tree.map(jnp.ones_like, p)
  out, st = tx.update(u, st, p, val_batch=_batch())
  np.testing.assert_array_equal(out["head"]["kernel"], u["head"]["kernel"])
  assert not np.allclose(out["body"]["kernel"], u["body"]["kernel"])  # projected
  with pytest.raises(ValueError, match="val_batch"):
    tx.update(u, st, p)


# ------------------------------------------------- FTP ------------------------------------


@pytest.mark.parametrize("norm", ["mars", "l2"])
def test_ftp_first_step_leaves_weights_at_anchor(norm):
  anchor = _tree(0)
  tx = P.ftp(anchor, base=optax.adam(0.1), norm=norm, exclude=P.is_head)
  st = tx.init(anchor)
  params = anchor
  step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, _batch()), s, p))
  u, st = step(params, st)
  params = optax.apply_updates(params, u)
  for key in ("kernel", "bias"):
    np.testing.assert_allclose(params["body"][key], anchor["body"][key], atol=1e-6)
  assert not np.allclose(params["head"]["kernel"], anchor["head"]["kernel"])  # excluded
  assert st.radii["head"]["kernel"] is None
  # Second step: the loss decreases along c_1 (<g, c_1> < 0), so Adam grows the radius by lr.
  u, st = step(params, st)
  params = optax.apply_updates(params, u)
  for key in ("kernel", "bias"):
    assert float(st.radii["body"][key]) == pytest.approx(1e-2, rel=1e-3)
    n = P.norms(params["body"][key] - anchor["body"][key], norm)
    assert np.all(np.asarray(n) <= 1e-2 * (1 + 1e-4))


def test_ftp_chained_with_grads_equals_wrapper():
  anchor = _tree(0)
  wrapped = P.ftp(anchor, base=optax.adam(0.05), k=0.5)
  chained = optax.chain(optax.adam(0.05), P.ftp(anchor, k=0.5))
  pw = pc = anchor
  sw, sc = wrapped.init(pw), chained.init(pc)
  for _ in range(4):
    gw, gc = jax.grad(_loss)(pw, _batch()), jax.grad(_loss)(pc, _batch())
    uw, sw = wrapped.update(gw, sw, pw)
    uc, sc = chained.update(gc, sc, pc, grads=gc)
    pw, pc = optax.apply_updates(pw, uw), optax.apply_updates(pc, uc)
  chex.assert_trees_all_close(pw, pc, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="grads"):
    chained.update(gc, sc, pc)


# --------------------------------------------- baselines ----------------------------------


class L2spTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_l2sp_penalty_closed_form(self):
    a = {"body": jnp.array([1.0, 2.0]), "head": jnp.array([5.0])}
    p = {"body": jnp.array([2.0, 0.0]), "head": jnp.array([3.0])}
    penalty = self.variant(lambda p_, a_, beta: P.l2sp_penalty(p_, a_, alpha=0.1,
                                                               exclude=P.is_head, beta=beta))
    # alpha/2 * (1 + 4) over the backbone, beta/2 * 9 on the excluded head.
    chex.assert_shape(penalty(p, a, 0.0), ())
    assert float(penalty(p, a, 0.0)) == pytest.approx(0.25)
    assert float(penalty(p, a, 0.2)) == pytest.approx(0.25 + 0.9)
    assert float(self.variant(P.l2sp_penalty)(p, a, 0.1)) == pytest.approx(0.05 * (5 + 4))


class WiseFtTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_wise_ft_closed_form(self):
    ft = {"w": jnp.array([4.0, 8.0])}
    zs = {"w": jnp.array([0.0, 4.0])}
    wise_ft = self.variant(P.wise_ft)
    chex.assert_trees_all_close(wise_ft(ft, zs, 0.25), {"w": jnp.array([1.0, 5.0])})
    chex.assert_trees_all_close(wise_ft(ft, zs, 0.0), zs)
    chex.assert_trees_all_close(wise_ft(ft, zs, 1.0), ft)
