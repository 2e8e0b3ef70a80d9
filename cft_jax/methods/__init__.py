"""Continual-learning methods behind one protocol (see :mod:`cft_jax.methods.base`)."""

from __future__ import annotations

import ml_collections

from cft_jax.methods.base import Method
from cft_jax.methods.lae import LAE

METHOD_NAMES = ("sequential", "lae")


def get_method(cfg: ml_collections.ConfigDict) -> Method:
  """Builds the method named ``config.method.name`` with its hyper-parameters.

  Raises:
    ValueError: unknown method name (lists the known ones).
  """
  name = cfg.get("name", "sequential")
  if name == "sequential":
    return Method()
  if name == "lae":
    return LAE(ema_decay=cfg.get("ema_decay", 0.999), freeze_epochs=cfg.get("freeze_epochs", 0))
  raise ValueError(f"unknown method.name '{name}'; known: {list(METHOD_NAMES)}")
