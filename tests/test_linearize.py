"""Tests for cft_jax.linearize, the ResNet-18 model and BatchNorm folding."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cft_jax import linearize as lin
from cft_jax.models import bn_fold
from cft_jax.models import resnet
from cft_jax.peft import count_params


class SmoothMLP(nn.Module):
  """Dense -> tanh -> Dense -> gelu -> Dense (smooth, for finite differences)."""

  @nn.compact
  def __call__(self, x, return_features=False):
    x = nn.tanh(nn.Dense(6, name="fc1")(x))
    x = nn.gelu(nn.Dense(5, name="fc2")(x))
    if return_features:
      return x
    return nn.Dense(3, name="head")(x)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _random_like(tree, seed, scale=1.0):
  """Gaussian pytree like ``tree`` (numpy RNG: no per-shape PRNG compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda l: jnp.asarray(scale * rng.standard_normal(l.shape), l.dtype), tree)


def _axpy(a, d, p):
  return jax.tree_util.tree_map(lambda di, pi: pi + a * di, d, p)


# Fast-compiling PRNG for ResNet inits (threefry init graphs take seconds to compile on CPU).
KEY = jax.random.key(0, impl="rbg")


def _tiny_resnet(stem="cifar", activation="leaky_relu", **kw):
  return resnet.ResNet(num_classes=5, stem=stem, width=4, activation=activation, **kw)


def _randomize_bn(variables, seed):
  """Non-trivial BN statistics and affine parameters (so folding is really tested)."""
  rng = np.random.default_rng(seed)

  def stat(path, x):
    if path[-1].key == "mean":
      return jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)

  def param(path, x):
    if path[-1].key == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
    if path[-1].key == "bias":
      return jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)
    return x

  return {"params": jax.tree_util.tree_map_with_path(param, variables["params"]),
          "batch_stats": jax.tree_util.tree_map_with_path(stat, variables["batch_stats"])}


# ------------------------------------------------------------------------------------------
# linearize
# ------------------------------------------------------------------------------------------


def test_linearize_resnet_eval_bn():
  # float64 so that central differences are exact to ~1e-8 (no LeakyReLU kink is crossed).
  # Two stages keep compilation short; BN (eval), LeakyReLU, projection shortcut all present.
  with jax.enable_x64(True):
    model = _tiny_resnet(stages=(1, 1), dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)))
    variables = _randomize_bn(model.init(KEY, x), 5)
    variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables)
    apply_fn = lin.module_apply_fn(model, variables)
    p0 = variables["params"]
    d = _random_like(p0, 2, scale=0.1)

    @jax.jit
    def run(p0, d, x):
      f = lambda p: apply_fn(p, x)
      lin_at = lambda a: lin.linearized_apply(apply_fn, p0, _axpy(a, d, p0), x)
      f0, jd = jax.jvp(f, (p0,), (d,))
      eps = 1e-6
      fp, fm = jax.vmap(lambda e: f(_axpy(e, d, p0)))(jnp.array([eps, -eps]))
      l0, l1, lm2 = jax.vmap(lin_at)(jnp.array([0.0, 1.0, -2.0]))
      return f0, jd, (fp - fm) / (2 * eps), l0, l1, lm2

    f0, jd, fd, l0, l1, lm2 = run(p0, d, x)
    np.testing.assert_allclose(l0, f0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(l1, f0 + jd, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lm2, f0 - 2.0 * jd, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(jd, fd, rtol=1e-6, atol=1e-8)


class LinearizeTest(chex.TestCase):
  """``linearize`` / ``linearize_features`` jitted and not (``chex.variants``)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_linearize_matches_finite_differences_and_is_linear(self):
    with jax.enable_x64(True):
      model = SmoothMLP()
      x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)))
      p0 = model.init(KEY, x)["params"]
      p0 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), p0)
      apply_fn = lambda p, xx: model.apply({"params": p}, xx)
      apply_lin = self.variant(lin.linearize(apply_fn, p0))
      d = _random_like(p0, 2)
      f0 = apply_fn(p0, x)
      chex.assert_shape(apply_lin(p0, x), (4, 3))
      chex.assert_trees_all_close(apply_lin(p0, x), f0, rtol=0, atol=1e-14)
      eps = 1e-5
      fd = (apply_fn(_axpy(eps, d, p0), x) - apply_fn(_axpy(-eps, d, p0), x)) / (2 * eps)
      jd = apply_lin(_axpy(1.0, d, p0), x) - f0
      chex.assert_trees_all_close(jd, fd, rtol=1e-7, atol=1e-9)
      _, jd_ref = jax.jvp(lambda p: apply_fn(p, x), (p0,), (d,))
      for a in (0.5, -3.0):
        chex.assert_trees_all_close(apply_lin(_axpy(a, d, p0), x), f0 + a * jd_ref, rtol=1e-12,
                                    atol=1e-12)
      # The nonlinear model is not linear: the check above is not vacuous.
      assert np.max(np.abs(apply_fn(_axpy(-3.0, d, p0), x) - (f0 - 3.0 * jd_ref))) > 1e-3

  @chex.variants(with_jit=True, without_jit=True)
  def test_linearize_features_dlcft_head(self):
    model = SmoothMLP()
    x = _normal((4, 3))
    p0 = model.init(KEY, x)["params"]
    feature_fn = lambda p, xx: model.apply({"params": p}, xx, return_features=True)
    apply = self.variant(lin.linearize_features(feature_fn, p0))
    chex.assert_trees_all_close(apply(p0, x), model.apply({"params": p0}, x), rtol=1e-5,
                                atol=1e-6)
    d = _random_like(p0, 2)
    psi0, _ = lin.split_head(p0)
    dpsi, _ = lin.split_head(d)
    _, jz = jax.jvp(lambda p: feature_fn(p, x), (psi0,), (dpsi,))
    p = _axpy(0.7, d, p0)
    z = feature_fn(psi0, x) + 0.7 * jz
    chex.assert_trees_all_close(apply(p, x), z @ p["head"]["kernel"] + p["head"]["bias"],
                                rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError):
      lin.split_head({"fc": {}})


def test_trainer_forward_features_mode_is_dlcft_eqs_6_7():
  """``steps.make_forward(apply, "features")`` with the trainer's split (a frozen layer, trainable
  backbone + head): equals the model at ``theta_0``; exactly linear in the backbone for a fixed
  head; the head is an ordinary linear layer; the backbone gets a gradient once W != 0; first
  order agrees with the network."""
  from cft_jax import peft
  from cft_jax.steps import make_forward

  model = SmoothMLP()
  x = _normal((4, 3))
  full = model.init(KEY, x)["params"]
  p0 = {"fc2": full["fc2"], "head": full["head"]}
  frozen = {"params": {"fc1": full["fc1"]}, "collections": {}, "params0": p0}
  apply_fn = lambda variables, xx, train=False, **kw: model.apply(variables, xx, **kw)
  fwd = make_forward(apply_fn, "features")
  np.testing.assert_allclose(fwd(p0, frozen, x), model.apply({"params": full}, x),
                             rtol=1e-5, atol=1e-6)
  d = _random_like(p0, 3)
  d_backbone = dict(d, head=jax.tree_util.tree_map(jnp.zeros_like, d["head"]))
  f = lambda a: fwd(_axpy(a, d_backbone, p0), frozen, x) - fwd(p0, frozen, x)
  np.testing.assert_allclose(f(2.0), 2.0 * f(1.0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(f(-0.5), -0.5 * f(1.0), rtol=1e-4, atol=1e-5)
  eps = 1e-3  # first order: the network's own change
  net = lambda a: model.apply({"params": peft.merge_params(_axpy(a, d_backbone, p0),
                                                           frozen["params"])}, x)
  np.testing.assert_allclose(f(eps), net(eps) - net(0.0), rtol=5e-2, atol=2e-6)
  head = {"kernel": 0.3 * d["head"]["kernel"], "bias": d["head"]["bias"]}
  z = model.apply({"params": full}, x, return_features=True)
  np.testing.assert_allclose(fwd(dict(p0, head=head), frozen, x),
                             z @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
  zero_head = dict(p0, head=jax.tree_util.tree_map(jnp.zeros_like, p0["head"]))
  g = jax.grad(lambda p: jnp.sum(fwd(p, frozen, x) ** 2 + fwd(p, frozen, x)))(zero_head)
  assert float(jnp.abs(g["fc2"]["kernel"]).max()) == 0.0  # W = 0: no backbone tangent
  assert float(jnp.abs(g["head"]["kernel"]).max()) > 0.0
  g = jax.grad(lambda p: jnp.sum(fwd(p, frozen, x)))(p0)
  assert float(jnp.abs(g["fc2"]["kernel"]).max()) > 0.0
  with pytest.raises(ValueError, match="model.linearize"):
    make_forward(apply_fn, "jacobian")
  assert lin.linearize_mode(True) == "full" and lin.linearize_mode("none") is None


def test_linearize_rejects_mismatched_trees():
  apply_lin = lin.linearize(lambda p, x: p["w"] * x, {"w": jnp.ones(())})
  with pytest.raises(ValueError, match="same tree structure"):
    apply_lin({"w": jnp.ones(()), "v": jnp.ones(())}, 1.0)


# ------------------------------------------------------------------------------------------
# ResNet-18 and BN folding
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem,num_classes,expected", [("imagenet", 1000, 11_689_512),
                                                       ("cifar", 10, 11_173_962),
                                                       ("cifar", 100, 11_220_132)])
def test_resnet18_param_count(stem, num_classes, expected):
  model = resnet.resnet18(num_classes, stem)
  variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)))
  assert count_params(variables["params"]) == expected  # torchvision: 11,689,512
  assert variables["params"]["head"]["kernel"].shape == (512, num_classes)
  assert len(jax.tree_util.tree_leaves(variables["batch_stats"])) == 2 * 20


def test_resnet_shapes_train_mode_and_activation():
  x = _normal((2, 16, 16, 3))
  model = _tiny_resnet(stem="imagenet", activation="relu", stages=(1, 1))
  variables = jax.jit(model.init)(KEY, x)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 5)
  assert jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables).shape == (
      2, 8)
  out, state = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables)
  assert out.shape == (2, 5)
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   variables["batch_stats"], state["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  leaky = _tiny_resnet(stem="imagenet", activation="leaky_relu", negative_slope=0.2,
                       stages=(1, 1))
  assert not np.allclose(jax.jit(leaky.apply)(variables, x), jax.jit(model.apply)(variables, x))
  with pytest.raises(ValueError, match="activation"):
    _tiny_resnet(activation="gelu").init(KEY, x)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_fold_batchnorm_equals_eval_output(stem):
  model = _tiny_resnet(stem=stem, stages=(1, 2))
  x = _normal((3, 16, 16, 3))
  variables = _randomize_bn(jax.jit(model.init)(KEY, x), 3)
  folded_model, folded = lin.fold_batchnorm_module(model, variables)
  assert "batch_stats" not in folded
  assert not any("bn" in k for k in jax.tree_util.keystr(folded).split("'"))
  ref = jax.jit(model.apply)(variables, x)
  apply_folded = jax.jit(folded_model.apply)
  np.testing.assert_allclose(apply_folded(folded, x), ref, rtol=1e-4, atol=1e-5)
  # Same parameter tree as a freshly initialised BN-free model.
  fresh = jax.eval_shape(folded_model.init, KEY, x)["params"]
  assert (jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(folded["params"]))
  # A wrong eps changes the output (the fold really uses the statistics).
  bad = bn_fold.fold_batchnorm(variables, eps=0.5)
  assert not np.allclose(apply_folded(bad, x), ref, atol=1e-3)


def test_from_torchvision_names_and_layouts():
  model = resnet.resnet18(7, "imagenet", width=4)
  variables = jax.jit(model.init)(KEY, jnp.zeros((1, 32, 32, 3)))
  sd = {}
  flat = {("params",) + k: v for k, v in _flatten(variables["params"]).items()}
  flat.update({("batch_stats",) + k: v for k, v in _flatten(variables["batch_stats"]).items()})
  for (_, *path), v in flat.items():
    v = np.asarray(v)
    mod, leaf = path[-2], path[-1]
    if mod == "head":
      sd[f"fc.{'weight' if leaf == 'kernel' else 'bias'}"] = v.T if leaf == "kernel" else v
      continue
    prefix = path[0].replace("_", ".") + "." if len(path) == 3 else ""  # layer1_0 -> layer1.0.
    tmod = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(mod, mod)
    tleaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
             "var": "running_var"}[leaf]
    sd[f"{prefix}{tmod}.{tleaf}"] = v.transpose(3, 2, 0, 1) if leaf == "kernel" else v
  sd["bn1.num_batches_tracked"] = np.array(0)
  assert "layer2.0.downsample.0.weight" in sd and "layer1.1.conv2.weight" in sd
  back = resnet.from_torchvision(sd)
  chex.assert_trees_all_equal(back["params"], variables["params"])
  chex.assert_trees_all_equal(back["batch_stats"], variables["batch_stats"])
  assert "head" not in resnet.from_torchvision(sd, keep_fc=False)["params"]


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def test_build_model_resnet18_branch():
  from cft_jax.models import build_model  # pylint: disable=g-import-not-at-top
  built = build_model("resnet18_cifar_leaky", 10, pretrained=False, image_size=8, rng=KEY)
  assert built.module.stem == "cifar" and built.module.activation == "leaky_relu"
  assert count_params(built.variables["params"]) == 11_173_962
  with pytest.raises(ValueError, match="pretrained"):
    build_model("resnet18", 10, pretrained=True, image_size=8)
