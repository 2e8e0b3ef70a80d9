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
# # Adding a continual-learning method
#
# A method implements the protocol of `cft_jax.methods.Method` (hyper-parameters are static fields;
# everything that changes lives in the `method_state` pytree that the trainer carries and
# checkpoints):
#
# | hook | where | |
# |---|---|---|
# | `init_state(params, ctx)` | host, once | initial `method_state` (fixed pytree structure) |
# | `begin_task(t, params, state, ctx)` | host, before task `t` | |
# | `penalty(params, state)` | inside the jitted step | added to the loss |
# | `extra_loss(...)`, `data_weight(state)` | inside the jitted step | distillation / replay / loss weights |
# | `after_step(params, state, batch, rng)` | inside the jitted step | e.g. EMA, replay buffers |
# | `end_task(t, params, state, ctx)` | host, after task `t` | e.g. curvature estimates |
# | `eval_params(params, state)` | inside the jitted eval step | parameter sets to ensemble |
#
# Here: **L2 anchoring**, `lam/2 ||theta - theta_prev||^2` toward the parameters at the start of the
# current task (at task 0 the pretrained ones: L2-SP), registered with `methods.register` and
# selected by `config.method.name`.
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
import dataclasses
import tempfile

from IPython.display import display
import jax
import jax.numpy as jnp

from cft_jax import methods, plots, train


# %%
@dataclasses.dataclass(frozen=True)
class L2Anchor(methods.Method):
    """Quadratic pull of the shared (non-head) trainable leaves toward the previous task's."""

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
    config.data.train_limit = 64
    config.data.test_limit = 40
    config.data.augment = "none"
    config.train.batch_size = 16
    config.eval.batch_size = 50
print(f"{config.model.name} + {config.peft.name} at {config.data.image_size} px, "
      f"{config.scenario.num_tasks} tasks, {config.data.train_limit} training images per task, "
      f"loss {config.loss.name}")

# %% [markdown]
# Sequential fine-tuning (no regulariser) and L2 anchoring on the same scenario:

# %%
results, logs = {}, {}
for name in ("sequential", "l2_anchor"):
    cfg = copy.deepcopy(config)
    cfg.method.name = name
    if name == "l2_anchor":
        cfg.method.lam = 10.0  # read by the l2_anchor factory
    workdir = tempfile.mkdtemp(prefix=f"cft_jax_{name}_")
    results[name] = train.run(cfg, workdir)
    logs[name] = plots.read_log(os.path.join(workdir, "log.jsonl"))
    print(f"--- {name}\n" + train.report(results[name]))

# %% [markdown]
# `log.jsonl` records the total `loss` and the `data_loss`; their difference is the method's
# penalty (zero at the start of each task, growing as the parameters move away from the anchor).

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, log in logs.items():
    ax.plot([r["global_step"] for r in log], [r["loss"] - r["data_loss"] for r in log], label=name)
ax.set_xlabel("training step"); ax.set_ylabel("penalty = loss - data_loss")
ax.legend(); ax.grid(alpha=0.3)
display(fig); plt.close(fig)  # shown once, whatever the backend

# %%
plots.accuracy_vs_task({name: plots.seen_task_means(m["accuracy_matrix"])
                        for name, m in results.items()},
                       ylabel="class-IL accuracy on seen tasks (%)")
