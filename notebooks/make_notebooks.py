"""Writes the Colab notebooks of this folder (outputs cleared): ``python notebooks/make_notebooks.py``.

The notebooks only call the library (glue and plots). Each starts with the same setup cell:
installs ``cft_jax`` from the clone it is opened in (or says how to install it), hints at the
Fashion-MNIST Debian package, and reads ``CFT_JAX_NOTEBOOK_TEST``: ``1`` (CI,
``tests/test_notebooks.py``) skips the install and shrinks every run to seconds (``TINY``).
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = r'''# Setup. On Colab / a fresh kernel: installs cft_jax from the clone this notebook sits in.
# CI sets CFT_JAX_NOTEBOOK_TEST=1: the package is already installed, and TINY shrinks every run
# to seconds (tiny CNN, 16 px images, a few dozen images per task).
import os
import sys

TINY = os.environ.get("CFT_JAX_NOTEBOOK_TEST", "0") == "1"
REPO = os.path.abspath("..")  # notebooks/ is one level below the repository root

if not TINY:
    if os.path.exists(os.path.join(REPO, "setup.cfg")):  # opened from a clone
        %pip install -q -e "{REPO}"
        sys.path.insert(0, REPO)  # an editable install is otherwise only seen by new kernels
    else:
        try:
            import cft_jax  # noqa: F401
        except ImportError:
            print("cft_jax is not installed. Clone the repository and run `pip install -e .` in it "
                  "(or `pip install cft_jax-*.whl` from a built wheel), then open this notebook "
                  "from the clone's notebooks/ folder (on Colab: `%cd <clone>/notebooks`).")
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        if "google.colab" in sys.modules:  # Colab runs Ubuntu, which packages Fashion-MNIST
            !apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
        else:
            print("Fashion-MNIST: `sudo apt-get update && sudo apt-get install -y "
                  "dataset-fashion-mnist` (Debian/Ubuntu); otherwise the loader falls back to "
                  "tensorflow-datasets (needs internet).")
print("TINY (CI sizes):", TINY)'''

LOAD_CONFIG = r'''# The default experiment config (configs/default.py), loaded by path.
import importlib.util

spec = importlib.util.spec_from_file_location(
    "default_config", os.path.join(REPO, "configs", "default.py"))
default_config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(default_config)

config = default_config.get_config()
config.scenario.num_tasks = 2  # 2 tasks x 5 Fashion-MNIST classes
config.train.log_every = 1     # a log.jsonl record every step (for the curves below)
config.train.plots = False     # the notebook draws its own figures
config.train.verbose = not TINY
if TINY:  # CI: a randomly initialised tiny CNN on 16 px images
    config.model.name = "tiny_cnn"
    config.model.pretrained = False
    config.data.image_size = 16
    config.data.train_limit = TRAIN_LIMIT_TINY
    config.data.test_limit = 40
    config.data.augment = "none"
    config.train.batch_size = 16
    config.eval.batch_size = 50
print(f"{config.model.name} + {config.peft.name} at {config.data.image_size} px, "
      f"{config.scenario.num_tasks} tasks, {config.data.train_limit} training images per task, "
      f"loss {config.loss.name}")'''


def load_config(train_limit_tiny: int) -> str:
  return LOAD_CONFIG.replace("TRAIN_LIMIT_TINY", str(train_limit_tiny))


def md(text: str):
  return new_markdown_cell(text.strip("\n"))


def code(text: str):
  return new_code_cell(text.strip("\n"))


def notebook(cells):
  for i, cell in enumerate(cells):
    cell["id"] = f"cell-{i:02d}"  # stable ids: regenerating gives no diff
  nb = new_notebook(cells=cells)
  nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                               "name": "python3"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["colab"] = {"provenance": []}
  return nb


INSTALL_NOTE = """
**Colab:** clone the repository (`!git clone <repo url> && %cd <clone>/notebooks`) and run the
setup cell; it installs `cft_jax` (editable) and Fashion-MNIST (`apt-get install -y
dataset-fashion-mnist`). A GPU runtime makes the EfficientNet-Lite0 runs take seconds.
"""

# ---------------------------------------------------------------------------------------------

QUICKSTART = notebook([
    md("""
# cft_jax quickstart: class-incremental fine-tuning with aEPG

Split Fashion-MNIST into 2 tasks of 5 classes, fine-tune a pretrained EfficientNet-Lite0 with LoRA
on one task after the other with the aEPG objective (cross-entropy annealed into Expected Policy
Gradient), and look at the accuracy matrix and the prediction entropy during training.
""" + INSTALL_NOTE),
    code(SETUP),
    code("""
%matplotlib inline
from cft_jax import plots, train
"""),
    md("The config is `configs/default.py` (5 tasks, 64 px, 1000 images per task) cut to 2 tasks."),
    code(load_config(64)),
    md("""
`train.run` trains the tasks in order, evaluates every seen task after each one and writes
`metrics.json`, `log.jsonl` and checkpoints into the workdir (re-running on the same workdir
resumes).
"""),
    code("""
import tempfile

WORKDIR = tempfile.mkdtemp(prefix="cft_jax_quickstart_")
metrics = train.run(config, WORKDIR)
print("workdir:", WORKDIR)
"""),
    md("""
`R[t, i]` = accuracy (%) on task `i` after training task `t`. *Class-IL* predicts among all classes
seen so far, *task-IL* among the task's own classes.
"""),
    code("""
print(train.report(metrics))
"""),
    code("""
plots.accuracy_heatmap(metrics["accuracy_matrix"], title="class-IL accuracy (%)")
"""),
    code("""
plots.accuracy_heatmap(metrics["task_il_accuracy_matrix"], title="task-IL accuracy (%)")
"""),
    md("""
aEPG weights cross-entropy by `alpha_t` (sigmoid schedule from ~1 to ~0 within every task) and EPG
by `1 - alpha_t`; the mean prediction entropy drops as the objective turns into EPG.
"""),
    code("""
records = plots.read_log(os.path.join(WORKDIR, "log.jsonl"))
plots.entropy_alpha_vs_step(records)
"""),
])

# ---------------------------------------------------------------------------------------------

OBJECTIVES = notebook([
    md("""
# Objectives: cross-entropy vs Expected Policy Gradient (EPG) vs aEPG

Per example, `L_CE = -log p_y` and `L_EPG = -p_y`, so `grad L_EPG = p_y grad L_CE`: EPG scales each
sample's gradient by its confidence `p_y` (exploitation), CE up-weights the hard ones
(exploration). aEPG mixes them, `alpha_t L_CE + (1 - alpha_t) L_EPG`, with `alpha_t` annealed
from 1 to 0 during each task.
""" + INSTALL_NOTE),
    code(SETUP),
    code("""
%matplotlib inline
import copy
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from cft_jax import objectives, plots, train
"""),
    md("""
## Per-sample gradient weight vs `p_y`

A sweep of 10-class logits `[s, 0, ..., 0]` with label 0; `jax.grad` of the library's per-example
losses gives the logit gradients (one row per example).
"""),
    code("""
s = jnp.linspace(-8.0, 8.0, 201)
logits = jnp.zeros((s.size, 10)).at[:, 0].set(s)
labels = jnp.zeros(s.size, jnp.int32)
p_y = jnp.exp(-objectives.ce(logits, labels))

grad_ce = jax.grad(lambda z: objectives.ce(z, labels).sum())(logits)
grad_epg = jax.grad(lambda z: objectives.epg(z, labels).sum())(logits)
np.testing.assert_allclose(grad_epg, p_y[:, None] * grad_ce, rtol=1e-5, atol=1e-7)
print("grad EPG == p_y * grad CE for every sample")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot(p_y, jnp.linalg.norm(grad_ce, axis=-1), label="CE")
ax1.plot(p_y, jnp.linalg.norm(grad_epg, axis=-1), label="EPG")
for a in (0.75, 0.5, 0.25):
    g = jax.grad(lambda z: objectives.aepg(z, labels, a).sum())(logits)
    ax1.plot(p_y, jnp.linalg.norm(g, axis=-1), ls="--", lw=1, label=f"aEPG, alpha={a}")
ax1.set_xlabel("p_y"); ax1.set_ylabel("||dL/dz||"); ax1.legend(); ax1.grid(alpha=0.3)
ratio = jnp.linalg.norm(grad_epg, axis=-1) / jnp.linalg.norm(grad_ce, axis=-1)
ax2.plot(p_y, ratio, label="||grad EPG|| / ||grad CE||")
ax2.plot(p_y, p_y, ls=":", color="k", label="p_y")
ax2.set_xlabel("p_y"); ax2.set_ylabel("per-sample weight of EPG relative to CE")
ax2.legend(); ax2.grid(alpha=0.3)
fig.tight_layout()
display(fig); plt.close(fig)  # shown once, whatever the backend
"""),
    md("## The aEPG schedules `alpha_t` (`objectives.SCHEDULES`)"),
    code("""
T = 100
t = jnp.arange(T + 1)
fig, ax = plt.subplots(figsize=(6, 4))
for name, schedule in objectives.SCHEDULES.items():
    ax.plot(t, np.broadcast_to(schedule(t, T), t.shape), label=name)
ax.set_xlabel("step t within the task (T = 100)"); ax.set_ylabel("alpha_t (weight of CE)")
ax.legend(); ax.grid(alpha=0.3)
display(fig); plt.close(fig)  # shown once, whatever the backend
"""),
    md("""
## Prediction entropy during training

Three short runs of the same 2-task scenario that differ only in `config.loss.name`; the curves are
the mean prediction entropy (over the task's classes) recorded in each run's `log.jsonl`.
"""),
    code(load_config(128)),
    code("""
curves, results = {}, {}
for loss in ("ce", "epg", "aepg"):
    cfg = copy.deepcopy(config)
    cfg.loss.name = loss
    workdir = tempfile.mkdtemp(prefix=f"cft_jax_{loss}_")
    results[loss] = train.run(cfg, workdir)
    log = plots.read_log(os.path.join(workdir, "log.jsonl"))
    curves[loss] = ([r["global_step"] for r in log], [r["entropy"] for r in log])
plots.entropy_curves(curves)
"""),
    code("""
print(f"{'loss':<6}{'class-IL final':>16}{'task-IL final':>15}{'entropy at task ends':>24}")
for loss, m in results.items():
    ends = ", ".join(f"{h:.3f}" for h in m["entropy_end_of_task"])
    print(f"{loss:<6}{m['final_accuracy']:16.2f}{m['task_il']['final_accuracy']:15.2f}{ends:>24}")
plots.accuracy_vs_task({loss: plots.seen_task_means(m["accuracy_matrix"])
                        for loss, m in results.items()},
                       ylabel="class-IL accuracy on seen tasks (%)")
"""),
])

# ---------------------------------------------------------------------------------------------

LINEARIZED = notebook([
    md("""
# Linearized networks (DLCFT)

`cft_jax.linearize.linearize` turns a network into its first-order Taylor expansion in the
parameters around `theta_0`, `f_lin(x; theta) = f(x; theta_0) + J f(x; theta_0) (theta - theta_0)`,
computed with one `jax.jvp`. We check that it equals the network at `theta_0` and is linear in
`theta`, and that with the MSE loss the old task's loss is *exactly* a quadratic in `theta`: the
curvature penalty `1/2 (theta - theta*)^T H (theta - theta*)` at the old task's minimum `theta*`
is the old task's loss increase, not an approximation of it.

The model is a tiny LeakyReLU ResNet (DLCFT's backbone family) on random 8x8 inputs, small enough
for the exact Hessian (`jax.hessian`; the library has no exact-Hessian helper).
""" + INSTALL_NOTE),
    code(SETUP),
    code("""
%matplotlib inline
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.flatten_util import ravel_pytree

from cft_jax import curvature, objectives, peft
from cft_jax import linearize as lin
from cft_jax.models.resnet import ResNet
"""),
    code("""
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
"""),
    md("## `f_lin` equals `f` at `theta_0` and is linear in `theta`"),
    code("""
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
"""),
    md("""
## The old task's MSE loss is exactly quadratic

`L_old(theta) = mean_x objectives.mse(f_lin(x; theta), y)`. Its Hessian `H` is the same at every
`theta`, equals the Gauss-Newton matrix `E[J^T J]` (its diagonal is the library's exact MSE Fisher,
`curvature.diagonal_fisher(..., loss="mse", fisher_type="exact")`), and the second-order Taylor
expansion has no remainder.
"""),
    code("""
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
"""),
    md("""
## At the old task's minimum the penalty is the old task's loss

A linear model with MSE is linear least squares: with the Jacobian `J` of the stacked outputs
(`jax.jacfwd` of `f_lin`), the old task's minimum is `theta* = theta_0 + lstsq(J, alpha e_y - f(theta_0))`
(better conditioned in float32 than a Newton step with the singular `H`: LeakyReLU and BatchNorm
leave directions the outputs do not depend on). There the gradient vanishes and
`L_old(theta* + d) - L_old(theta*) = 1/2 d^T H d`: the curvature penalty of the exact Hessian *is*
the old task's loss increase. The diagonal (EWC) penalty `curvature.ewc_penalty` with the exact
diagonal Fisher only approximates it.
"""),
    code("""
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
"""),
    md("""
The same objects drive DLCFT in the trainer: `config.model.linearize = "features"` trains the linearized
feature extractor under a linear head (eqs. 6-7, `steps.make_forward`; `"full"` linearizes the whole
network), and `cft_jax.curvature` provides the scalable curvature estimates
(diagonal Fisher, K-FAC / TK-FAC via `curvature.kfac_factors_linearized_features`) that replace the
exact `H` for real networks.
"""),
])

# ---------------------------------------------------------------------------------------------

ADD_METHOD = notebook([
    md("""
# Adding a continual-learning method

A method implements the protocol of `cft_jax.methods.Method` (hyper-parameters are static fields;
everything that changes lives in the `method_state` pytree that the trainer carries and
checkpoints):

| hook | where | |
|---|---|---|
| `init_state(params, ctx)` | host, once | initial `method_state` (fixed pytree structure) |
| `begin_task(t, params, state, ctx)` | host, before task `t` | |
| `penalty(params, state)` | inside the jitted step | added to the loss |
| `extra_loss(...)`, `data_weight(state)` | inside the jitted step | distillation / replay / loss weights |
| `after_step(params, state, batch, rng)` | inside the jitted step | e.g. EMA, replay buffers |
| `end_task(t, params, state, ctx)` | host, after task `t` | e.g. curvature estimates |
| `eval_params(params, state)` | inside the jitted eval step | parameter sets to ensemble |

Here: **L2 anchoring**, `lam/2 ||theta - theta_prev||^2` toward the parameters at the start of the
current task (at task 0 the pretrained ones: L2-SP), registered with `methods.register` and
selected by `config.method.name`.
""" + INSTALL_NOTE),
    code(SETUP),
    code("""
%matplotlib inline
import copy
import dataclasses
import tempfile

import jax
import jax.numpy as jnp

from cft_jax import methods, plots, train
"""),
    code("""
@dataclasses.dataclass(frozen=True)
class L2Anchor(methods.Method):
    \"\"\"Quadratic pull of the shared (non-head) trainable leaves toward the previous task's.\"\"\"

    name: str = "l2_anchor"
    lam: float = 1.0

    def init_state(self, params, ctx=None):
        anchor = {k: v for k, v in params.items() if k != "head"}
        return {"anchor": jax.tree_util.tree_map(jnp.copy, anchor)}  # copies: params are donated

    def begin_task(self, task_id, params, method_state, ctx=None):
        return self.init_state(params)

    def penalty(self, params, method_state):
        sq = jax.tree_util.tree_map(lambda p, a: jnp.sum(jnp.square(p - a)),
                                    {k: params[k] for k in method_state["anchor"]},
                                    method_state["anchor"])
        return 0.5 * self.lam * sum(jax.tree_util.tree_leaves(sq))


methods.register("l2_anchor", lambda cfg: L2Anchor(lam=cfg.get("lam", 1.0)), overwrite=True)
print("known methods:", methods.method_names())
"""),
    code(load_config(64)),
    md("Sequential fine-tuning (no regulariser) and L2 anchoring on the same scenario:"),
    code("""
results, logs = {}, {}
for name in ("sequential", "l2_anchor"):
    cfg = copy.deepcopy(config)
    cfg.method.name = name
    cfg.method.lam = 10.0  # read by the l2_anchor factory; sequential ignores it
    workdir = tempfile.mkdtemp(prefix=f"cft_jax_{name}_")
    results[name] = train.run(cfg, workdir)
    logs[name] = plots.read_log(os.path.join(workdir, "log.jsonl"))
    print(f"--- {name}\\n" + train.report(results[name]))
"""),
    md("""
`log.jsonl` records the total `loss` and the `data_loss`; their difference is the method's
penalty (zero at the start of each task, growing as the parameters move away from the anchor).
"""),
    code("""
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, log in logs.items():
    ax.plot([r["global_step"] for r in log], [r["loss"] - r["data_loss"] for r in log], label=name)
ax.set_xlabel("training step"); ax.set_ylabel("penalty = loss - data_loss")
ax.legend(); ax.grid(alpha=0.3)
display(fig); plt.close(fig)  # shown once, whatever the backend
"""),
    code("""
plots.accuracy_vs_task({name: plots.seen_task_means(m["accuracy_matrix"])
                        for name, m in results.items()},
                       ylabel="class-IL accuracy on seen tasks (%)")
"""),
])

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_objectives.ipynb": OBJECTIVES,
    "03_linearized_networks.ipynb": LINEARIZED,
    "04_add_a_method.ipynb": ADD_METHOD,
}


def main():
  for name, nb in NOTEBOOKS.items():
    nbformat.validate(nb)
    path = os.path.join(HERE, name)
    nbformat.write(nb, path)
    print("wrote", path)


if __name__ == "__main__":
  main()
