# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Linearized networks (DLCFT)
#
# `cft_jax.linearize.linearize` turns a network into its first-order Taylor expansion in the
# parameters around `theta_0`, `f_lin(x; theta) = f(x; theta_0) + J f(x; theta_0) (theta - theta_0)`,
# computed with one `jax.jvp`. We check that it equals the network at `theta_0` and is linear in
# `theta`, and that with the MSE loss the old task's loss is *exactly* a quadratic in `theta`: the
# curvature penalty `1/2 (theta - theta*)^T H (theta - theta*)` at the old task's minimum `theta*`
# is the old task's loss increase, not an approximation of it.
#
# The model is a tiny LeakyReLU ResNet (DLCFT's backbone family) on random 8x8 inputs, small enough
# for the exact Hessian (`jax.hessian`; the library has no exact-Hessian helper).
#
# **Colab:** open it from the README's Colab link, set `CFT_JAX_GIT_URL` in the first code cell
# to the repository's git URL, and run all cells (the first cell installs `cft_jax`; the data are
# generated here). Opened from a clone (Jupyter), the first cell installs that clone instead.

# %%
# Setup: makes `cft_jax` importable on a fresh runtime (Colab, a new Jupyter kernel). Inside a
# clone of the repository it installs that clone; elsewhere (Colab) set CFT_JAX_GIT_URL:
CFT_JAX_GIT_URL = ""  # <- SET ME, e.g. "https://github.com/<owner>/<repo>.git"

import importlib
import os
import re
import subprocess
import sys

# tests/test_notebooks.py sets CFT_JAX_NOTEBOOK_TEST=1: TINY shrinks every run to seconds
# (a tiny CNN on 16 px images, a few dozen images per task).
TINY = os.environ.get("CFT_JAX_NOTEBOOK_TEST", "0") == "1"


class SetupError(Exception):
    """Stops the notebook with one line (IPython shows `_render_traceback_`, no traceback)."""

    def _render_traceback_(self):
        return [f"SetupError: {self}"]


def find_clone(start):
    """The nearest folder at or above `start` whose setup.cfg says `name = cft_jax`, or None."""
    folder = os.path.abspath(start)
    while True:
        setup_cfg = os.path.join(folder, "setup.cfg")
        if os.path.isfile(setup_cfg):
            with open(setup_cfg) as f:
                if re.search(r"^name\s*=\s*cft_jax\s*$", f.read(), re.MULTILINE):
                    return folder
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)


REPO = find_clone(os.getcwd())  # None when the notebook does not sit in a clone (Colab)
try:
    import cft_jax
except ImportError:
    if REPO:
        pip_args = ["-e", REPO]  # editable install of the clone
    elif CFT_JAX_GIT_URL:
        pip_args = [f"git+{CFT_JAX_GIT_URL}"]
    else:
        raise SetupError("cft_jax is not installed: set CFT_JAX_GIT_URL at the top of this cell "
                         "to the repository's git URL (or open the notebook from a clone)") from None
    print("pip install", *pip_args)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *pip_args])
    if REPO:
        sys.path.insert(0, REPO)  # a running kernel does not see a new editable install
    importlib.invalidate_caches()
    import cft_jax
print(f"cft_jax from {os.path.dirname(cft_jax.__file__)}; TINY (CI sizes): {TINY}")

# %%
# %matplotlib inline
from IPython.display import display
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.flatten_util import ravel_pytree

from cft_jax import curvature, objectives, peft
from cft_jax import linearize as lin
from cft_jax.models.resnet import ResNet

# %%
N, C, SIZE = 64, 3, 8      # "old task": 64 random 8x8 images, 3 classes
ALPHA = 15.0               # DLCFT's MSE target scale
WIDTH, STAGES = (1, (1,)) if TINY else (4, (1, 1))  # the exact Hessian is P x P
module = ResNet(num_classes=C, stem="cifar", width=WIDTH, stages=STAGES, activation="leaky_relu")
k_x, k_y, k_d, k_init = jax.random.split(jax.random.key(0, impl="rbg"), 4)
x_old = jax.random.normal(k_x, (N, SIZE, SIZE, 3))
y_old = jax.random.randint(k_y, (N,), 0, C)
variables = jax.jit(module.init)(k_init, x_old[:1])

apply_fn = lin.module_apply_fn(module, variables)  # eval mode: BatchNorm is a fixed affine map
params0 = variables["params"]
apply_lin = lin.linearize(apply_fn, params0)
flat0, unravel = ravel_pytree(params0)
print(f"{peft.count_params(params0)} parameters")

# %% [markdown]
# ## `f_lin` equals `f` at `theta_0` and is linear in `theta`

# %%
np.testing.assert_allclose(apply_lin(params0, x_old), apply_fn(params0, x_old), rtol=1e-5, atol=1e-6)
print("f_lin(theta_0) == f(theta_0)")

d = jax.random.normal(k_d, flat0.shape)
d = d / jnp.linalg.norm(d)          # a random unit direction in parameter space
scales = jnp.linspace(-3.0, 3.0, 13)

def deviation_from_line(f):
    # max |f(theta_0 + a d) - [f(theta_0) + a (f(theta_0 + d) - f(theta_0))]| for every a
    f = jax.jit(f)
    f0, f1 = f(params0, x_old), f(unravel(flat0 + d), x_old)
    return jnp.array([jnp.abs(f(unravel(flat0 + a * d), x_old) - (f0 + a * (f1 - f0))).max()
                      for a in scales])

dev_lin, dev_net = deviation_from_line(apply_lin), deviation_from_line(apply_fn)
assert float(dev_lin.max()) < 1e-4 * float(jnp.abs(apply_lin(params0, x_old)).max() + 1)
fig, ax = plt.subplots(figsize=(6, 4))
ax.semilogy(scales, dev_net + 1e-12, label="network f")
ax.semilogy(scales, dev_lin + 1e-12, label="linearized f_lin")
ax.set_xlabel("a  (theta = theta_0 + a d)"); ax.set_ylabel("max deviation from a straight line")
ax.legend(); ax.grid(alpha=0.3)
display(fig); plt.close(fig)  # shown once, whatever the backend
print(f"max deviation: linearized {float(dev_lin.max()):.2e}, network {float(dev_net.max()):.2e}")


# %% [markdown]
# ## The old task's MSE loss is exactly quadratic
#
# `L_old(theta) = mean_x objectives.mse(f_lin(x; theta), y)`. Its Hessian `H` is the same at every
# `theta`, equals the Gauss-Newton matrix `E[J^T J]` (its diagonal is the library's exact MSE Fisher,
# `curvature.diagonal_fisher(..., loss="mse", fisher_type="exact")`), and the second-order Taylor
# expansion has no remainder.

# %%
@jax.jit
def old_loss(flat):
    return jnp.mean(objectives.mse(apply_lin(unravel(flat), x_old), y_old, alpha=ALPHA))

hessian = jax.jit(jax.hessian(old_loss))
grad = jax.jit(jax.grad(old_loss))
H = hessian(flat0)
np.testing.assert_allclose(hessian(flat0 + d), H, atol=1e-5 * float(jnp.abs(H).max()))
print("H(theta_0 + d) == H(theta_0)")

fisher = curvature.diagonal_fisher(apply_lin, params0, [(x_old, y_old)], loss="mse",
                                   fisher_type="exact", mse_alpha=ALPHA)
np.testing.assert_allclose(ravel_pytree(fisher)[0], jnp.diag(H), rtol=1e-4,
                           atol=1e-6 * float(jnp.abs(H).max()))
print("diag(H) == exact MSE Fisher (Gauss-Newton) of curvature.diagonal_fisher")

g0 = grad(flat0)
taylor = jnp.array([old_loss(flat0) + a * g0 @ d + 0.5 * a**2 * d @ H @ d for a in scales])
exact = jnp.array([old_loss(flat0 + a * d) for a in scales])
np.testing.assert_allclose(taylor, exact, rtol=1e-4)
print("L_old(theta_0 + a d) == L_old(theta_0) + a g.d + a^2/2 d.H.d for every a")

# %% [markdown]
# ## At the old task's minimum the penalty is the old task's loss
#
# A linear model with MSE is linear least squares: with the Jacobian `J` of the stacked outputs
# (`jax.jacfwd` of `f_lin`), the old task's minimum is `theta* = theta_0 + lstsq(J, alpha e_y - f(theta_0))`
# (better conditioned in float32 than a Newton step with the singular `H`: LeakyReLU and BatchNorm
# leave directions the outputs do not depend on). There the gradient vanishes and
# `L_old(theta* + d) - L_old(theta*) = 1/2 d^T H d`: the curvature penalty of the exact Hessian *is*
# the old task's loss increase. The diagonal (EWC) penalty `curvature.ewc_penalty` with the exact
# diagonal Fisher only approximates it.

# %%
J = jax.jit(jax.jacfwd(lambda flat: apply_lin(unravel(flat), x_old).ravel()))(flat0)  # [N*C, P]
residual = (ALPHA * jax.nn.one_hot(y_old, C) - apply_lin(params0, x_old)).ravel()
flat_star = flat0 + jnp.linalg.lstsq(J, residual)[0]
params_star = unravel(flat_star)
print(f"|grad L_old|: {float(jnp.linalg.norm(g0)):.3g} at theta_0, "
      f"{float(jnp.linalg.norm(grad(flat_star))):.3g} at theta*;  L_old(theta*) = "
      f"{float(old_loss(flat_star)):.4f}")

increase = jnp.array([old_loss(flat_star + a * d) - old_loss(flat_star) for a in scales])
penalty = 0.5 * scales**2 * (d @ H @ d)
ewc = jnp.array([curvature.ewc_penalty(unravel(flat_star + a * d), params_star, fisher)
                 for a in scales])
far = jnp.abs(scales) >= 0.5  # (tiny a: float32 cancellation in the difference of losses)
np.testing.assert_allclose(penalty[far], increase[far], rtol=2e-3)
print(f"max relative gap, |a| >= 0.5: exact-Hessian penalty "
      f"{float(jnp.max(jnp.abs(penalty - increase)[far] / increase[far])):.1e}, "
      f"diagonal (EWC) penalty {float(jnp.max(jnp.abs(ewc - increase)[far] / increase[far])):.1e}")

fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(scales, increase, lw=3, alpha=0.4, label="L_old(theta* + a d) - L_old(theta*)")
ax.plot(scales, penalty, ls="--", label="1/2 a^2 d.H.d (exact Hessian)")
ax.plot(scales, ewc, ls=":", label="EWC: exact diagonal Fisher")
ax.set_xlabel("a  (theta = theta* + a d)"); ax.set_ylabel("old-task loss increase / penalty")
ax.legend(); ax.grid(alpha=0.3)
display(fig); plt.close(fig)  # shown once, whatever the backend

# %% [markdown]
# The same objects drive DLCFT in the trainer: `config.model.linearize = "features"` trains the linearized
# feature extractor under a linear head (eqs. 6-7, `steps.make_forward`; `"full"` linearizes the whole
# network), and `cft_jax.curvature` provides the scalable curvature estimates
# (diagonal Fisher, K-FAC / TK-FAC via `curvature.kfac_factors_linearized_features`) that replace the
# exact `H` for real networks.
