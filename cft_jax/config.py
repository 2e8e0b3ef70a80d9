"""The public config API: library defaults for every key, and validation of user configs.

:func:`base_config` is the single list of keys the trainer understands (experiment files in
``configs/`` start from it and override values); :func:`validate_config` checks a config against
it before anything runs, with messages that name the key and the fix.

A facade: the names live where their knowledge lives, and this module re-exports them so that
configs, studies, notebooks and tests have one import path (``from cft_jax.config import ...``).

- :mod:`cft_jax.errors` (the leaf): :class:`ConfigError`;
- :mod:`cft_jax.schema`: the generic tools (:class:`Key`, config files, ``--config FILE.py:args``);
- each family's own keys next to its code (``CONFIG_KEYS`` of :mod:`cft_jax.data`,
  :mod:`cft_jax.models`, :mod:`cft_jax.peft`, :mod:`cft_jax.methods`, :mod:`cft_jax.objectives`,
  ...), and the loss / method section helpers (:func:`loss_hparams`, :func:`mse_alpha`,
  :func:`check_method_keys`);
- :mod:`cft_jax.registry`: everything that needs every family (:func:`base_config`,
  :func:`validate_config`, :func:`describe`, :func:`apply_overrides`, :func:`same_run`).

It stands above the registry and below the trainer; no family imports it.
"""

from __future__ import annotations

from cft_jax.errors import ConfigError
from cft_jax.methods import check_method_keys
from cft_jax.objectives import LOSS_TRAINER_KEYS, loss_hparams, mse_alpha, mse_alpha_default
from cft_jax.registry import (KEYS, RESULT_SECTIONS, RUN_IGNORED, RUN_SECTIONS, SECTIONS,
                              apply_overrides, base_config, config_schema, describe, same_run,
                              validate_config, with_defaults)
from cft_jax.schema import (Key, describe_diffs, load_config, load_config_module,
                            parse_config_arg)

__all__ = [
    "ConfigError",
    "KEYS",
    "Key",
    "LOSS_TRAINER_KEYS",
    "RESULT_SECTIONS",
    "RUN_IGNORED",
    "RUN_SECTIONS",
    "SECTIONS",
    "apply_overrides",
    "base_config",
    "check_method_keys",
    "config_schema",
    "describe",
    "describe_diffs",
    "load_config",
    "load_config_module",
    "loss_hparams",
    "mse_alpha",
    "mse_alpha_default",
    "parse_config_arg",
    "same_run",
    "validate_config",
    "with_defaults",
]
