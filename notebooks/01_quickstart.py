# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # cft_jax quickstart: class-incremental fine-tuning with aEPG
#
# Split Fashion-MNIST into 2 tasks of 5 classes, fine-tune a pretrained EfficientNet-Lite0 with LoRA
# on one task after the other with the aEPG objective (cross-entropy annealed into Expected Policy
# Gradient), and look at the accuracy matrix and the prediction entropy during training.
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
from cft_jax import plots, train

# %% [markdown]
# The config is `configs/default.py` (5 tasks, 64 px, 1000 images per task) cut to 2 tasks.

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
# `train.run` trains the tasks in order, evaluates every seen task after each one and writes
# `metrics.json`, `log.jsonl` and checkpoints into the workdir (re-running on the same workdir
# resumes).

# %%
import tempfile

WORKDIR = tempfile.mkdtemp(prefix="cft_jax_quickstart_")
metrics = train.run(config, WORKDIR)
print("workdir:", WORKDIR)

# %% [markdown]
# `R[t, i]` = accuracy (%) on task `i` after training task `t`. *Class-IL* predicts among all classes
# seen so far, *task-IL* among the task's own classes.

# %%
print(train.report(metrics))

# %%
plots.accuracy_heatmap(metrics["accuracy_matrix"], title="class-IL accuracy (%)")

# %%
plots.accuracy_heatmap(metrics["task_il_accuracy_matrix"], title="task-IL accuracy (%)")

# %% [markdown]
# aEPG weights cross-entropy by `alpha_t` (sigmoid schedule from ~1 to ~0 within every task) and EPG
# by `1 - alpha_t`; the mean prediction entropy drops as the objective turns into EPG.

# %%
records = plots.read_log(os.path.join(WORKDIR, "log.jsonl"))
plots.entropy_alpha_vs_step(records)

# %% [markdown]
# ## Predict with the finished run
#
# `cft_jax.load_run(workdir)` loads the model of the run's last finished task with the
# parameters its evaluation used (LAE's ensemble, WiSE-FT's interpolation) and the test
# preprocessing; `predict` returns class ids among every class seen so far and their
# probabilities. On the run's test images it reproduces `metrics.json`'s accuracy exactly.
# From a shell: `python -m cft_jax.predict --workdir WORKDIR --top_k 3 IMAGE...`.

# %%
import numpy as np
from cft_jax.data import load_dataset

predictor = cft_jax.load_run(WORKDIR)
test = load_dataset("fashion_mnist")
images = test.test_images[:8]  # uint8 [N, 28, 28, 1]
ids, probs = predictor.predict(images)
for i, p, true in zip(ids, probs, test.test_labels[:8]):
    print(f"{predictor.class_names[i]:>12} ({p[i]:.2f})   true: {test.class_names[true]}")
