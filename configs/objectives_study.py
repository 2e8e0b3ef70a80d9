"""Objectives study: the default scenario (Split Fashion-MNIST 5 x 2, EfficientNet-Lite0 + LoRA)
with one of the aEPG paper's objectives, sized so 8 objectives x 3 seeds fit ~30 min of 2 CPU cores.

The argument after the colon is the objective (``OBJECTIVE_SETTINGS`` below). Commands::

    python studies/objectives_study.py --seeds 0 1 2 --out docs/results      # the whole study
    python -m cft_jax.main --config configs/objectives_study.py:epg --workdir runs/os_epg \\
        --config.seed=1                                                      # one run

Every objective trains on the same class-incremental scenario (``scenario.seed`` 1993 fixes the
class order); ``seed`` changes the initialisation of the LoRA/head weights, the training subset and
the data order. Hyper-parameters are the paper's (SPEC §1 table): aEPG sigmoid tau 6 (T counts the
steps of the current task), confidence penalty beta 0.1, label smoothing gamma 0.1, focal gamma 1,
entropy penalty beta 1; ``reinforce`` is the sampled (one action per image, no baseline)
estimator of the EPG gradient.

RESULTS
"""

import importlib.util
import os

import ml_collections

# objective -> its loss hyper-parameters (besides ``name``).
OBJECTIVE_SETTINGS = {
    "ce": {},
    "epg": {},
    "aepg": {"schedule": "sigmoid", "tau": 6.0, "schedule_scope": "task"},
    "confidence_penalty": {"beta": 0.1},
    "label_smoothing": {"gamma": 0.1},
    "focal": {"gamma": 1.0},
    "entropy_penalty": {"beta": 1.0},
    "reinforce": {"num_samples": 1},
}


def _load_default():
  """Imports ``configs/default.py`` by path (config files are loaded by path, not as a package)."""
  spec = importlib.util.spec_from_file_location(
      "cft_jax_default_config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "ce") -> ml_collections.ConfigDict:
  """The default config with ``loss`` set to objective ``arg`` and a 2-core-CPU budget.

  Raises:
    ValueError: ``arg`` is not one of ``OBJECTIVE_SETTINGS``.
  """
  name = (arg or "ce").strip()
  if name not in OBJECTIVE_SETTINGS:
    raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVE_SETTINGS)}")
  c = _load_default().get_config()
  c.loss = ml_collections.ConfigDict({"name": name, **OBJECTIVE_SETTINGS[name]})
  # Size: 24 runs in ~30 min of 2 shared CPU cores.
  c.data.image_size = 32
  c.data.train_limit = 600
  c.data.test_limit = 500
  c.train.epochs = 1
  c.train.log_every = 1          # every step: entropy curves and end-of-task entropy
  c.train.progress = False
  c.train.plots = False
  c.train.verbose = False
  return c
