"""Continual-learning methods behind one protocol (see :mod:`cft_jax.methods.base`).

Built-in names: ``sequential`` (plain sequential fine-tuning / sequential PEFT) and ``lae``.
New learners are added with :func:`register` (a factory from the ``config.method`` section to a
:class:`Method`); ``config.method.name`` then selects them.
"""

from __future__ import annotations

from typing import Callable, Dict

import ml_collections

from cft_jax.methods.base import Method, TaskContext
from cft_jax.methods.lae import LAE

_FACTORIES: Dict[str, Callable[[ml_collections.ConfigDict], Method]] = {
    "sequential": lambda cfg: Method(),
    "lae": lambda cfg: LAE(ema_decay=cfg.get("ema_decay", 0.999),
                           freeze_epochs=cfg.get("freeze_epochs", 0)),
}


def register(name: str, factory: Callable[[ml_collections.ConfigDict], Method],
             overwrite: bool = False) -> None:
  """Registers a method factory under ``name`` (selected by ``config.method.name``).

  Args:
    name: the method's name.
    factory: ``factory(config.method) -> Method``.
    overwrite: allow replacing an existing name.

  Raises:
    ValueError: ``name`` exists and ``overwrite`` is False.
  """
  if name in _FACTORIES and not overwrite:
    raise ValueError(f"method '{name}' is already registered (pass overwrite=True to replace)")
  _FACTORIES[name] = factory


def method_names():
  """Names accepted by ``config.method.name``."""
  return tuple(sorted(_FACTORIES))


def get_method(cfg: ml_collections.ConfigDict) -> Method:
  """Builds the method named ``config.method.name`` with its hyper-parameters.

  Raises:
    ValueError: unknown method name (lists the known ones).
  """
  name = cfg.get("name", "sequential")
  if name not in _FACTORIES:
    raise ValueError(f"unknown method.name '{name}'; known: {list(method_names())}")
  return _FACTORIES[name](cfg)
