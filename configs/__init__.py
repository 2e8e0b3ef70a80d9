"""Experiment configs: each module has ``get_config(arg=None) -> ConfigDict``.

Load one with :func:`cft_jax.config.load_config` (``load_config("configs/default.py")`` or
``load_config("configs.dlcft_class_il", "er")``), or on the command line with
``--config configs/NAME.py[:arg]``.
"""
