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
# # Objectives: cross-entropy vs Expected Policy Gradient (EPG) vs aEPG
#
# Per example, `L_CE = -log p_y` and `L_EPG = -p_y`, so `grad L_EPG = p_y grad L_CE`: EPG scales each
# sample's gradient by its confidence `p_y` (exploitation), CE up-weights the hard ones
# (exploration). aEPG mixes them, `alpha_t L_CE + (1 - alpha_t) L_EPG`, with `alpha_t` annealed
# from 1 to 0 during each task.
#
# **Colab:** open it from the README's Colab link, set `CFT_JAX_GIT_URL` in the first code cell
# to the repository's git URL, and run all cells: the first cell installs `cft_jax`, the data cell
# installs Fashion-MNIST (`apt-get install dataset-fashion-mnist`). Opened from a clone (Jupyter),
# the first cell installs that clone instead. A GPU runtime makes the EfficientNet-Lite0 runs take
# seconds.

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
# Data: Split Fashion-MNIST. The loader reads the IDX files of the Debian/Ubuntu package
# `dataset-fashion-mnist`; as root (Colab) this cell installs it, elsewhere the loader falls back
# to tensorflow-datasets (one download, needs internet).
import shutil

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
if not os.path.isdir(FASHION_MNIST) and not TINY:
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist",
                       shell=True, check=False)
    if not os.path.isdir(FASHION_MNIST):
        print("Fashion-MNIST package missing (sudo apt-get install -y dataset-fashion-mnist): "
              "the loader will download it with tensorflow-datasets")
print("Fashion-MNIST:", FASHION_MNIST if os.path.isdir(FASHION_MNIST) else "tensorflow-datasets")

# %%
# %matplotlib inline
import copy
import tempfile

from IPython.display import display
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from cft_jax import objectives, plots, train

# %% [markdown]
# ## Per-sample gradient weight vs `p_y`
#
# A sweep of 10-class logits `[s, 0, ..., 0]` with label 0; `jax.grad` of the library's per-example
# losses gives the logit gradients (one row per example).

# %%
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

# %% [markdown]
# ## The aEPG schedules `alpha_t` (`objectives.SCHEDULES`)

# %%
T = 100
t = jnp.arange(T + 1)
fig, ax = plt.subplots(figsize=(6, 4))
for name, schedule in objectives.SCHEDULES.items():
    ax.plot(t, np.broadcast_to(schedule(t, T), t.shape), label=name)
ax.set_xlabel("step t within the task (T = 100)"); ax.set_ylabel("alpha_t (weight of CE)")
ax.legend(); ax.grid(alpha=0.3)
display(fig); plt.close(fig)  # shown once, whatever the backend

# %% [markdown]
# ## Prediction entropy during training
#
# Three short runs of the same 2-task scenario that differ only in `config.loss.name`; the curves are
# the mean prediction entropy (over the task's classes) recorded in each run's `log.jsonl`.

# %%
# The README's main job (configs/default.py: the library defaults, `base_config()`), cut to 2 tasks.
from cft_jax.config import base_config

config = base_config()
config.scenario.num_tasks = 2  # 2 tasks x 5 Fashion-MNIST classes
config.train.log_every = 1     # a log.jsonl record every step (for the curves below)
config.train.plots = False     # the notebook draws its own figures
config.train.verbose = not TINY
if TINY:  # CI: a randomly initialised tiny CNN on 16 px images
    config.model.name = "tiny_cnn"
    config.model.pretrained = False
    config.data.image_size = 16
    config.data.train_limit = 128
    config.data.test_limit = 40
    config.data.augment = "none"
    config.train.batch_size = 16
    config.eval.batch_size = 50
print(f"{config.model.name} + {config.peft.name} at {config.data.image_size} px, "
      f"{config.scenario.num_tasks} tasks, {config.data.train_limit} training images per task, "
      f"loss {config.loss.name}")

# %%
curves, results = {}, {}
for loss in ("ce", "epg", "aepg"):
    cfg = copy.deepcopy(config)
    cfg.loss.name = loss
    workdir = tempfile.mkdtemp(prefix=f"cft_jax_{loss}_")
    results[loss] = train.run(cfg, workdir)
    log = plots.read_log(os.path.join(workdir, "log.jsonl"))
    curves[loss] = ([r["global_step"] for r in log], [r["entropy"] for r in log])
plots.entropy_curves(curves)

# %%
print(f"{'loss':<6}{'class-IL final':>16}{'task-IL final':>15}{'entropy at task ends':>24}")
for loss, m in results.items():
    ends = ", ".join(f"{h:.3f}" for h in m["entropy_end_of_task"])
    print(f"{loss:<6}{m['final_accuracy']:16.2f}{m['task_il']['final_accuracy']:15.2f}{ends:>24}")
plots.accuracy_vs_task({loss: plots.seen_task_means(m["accuracy_matrix"])
                        for loss, m in results.items()},
                       ylabel="class-IL accuracy on seen tasks (%)")
