"""Continual-learning methods behind one protocol (see :mod:`cft_jax.methods.base`).

Built-in names: ``sequential`` (plain sequential fine-tuning / sequential PEFT, DLCFT's "None"),
``lae``, the DLCFT comparison (SPEC §3): ``ewc``, ``mas``, ``osla``, ``dlcft``
(:mod:`~cft_jax.methods.regularizers`), ``lwf``, ``er``, ``der``, ``derpp``
(:mod:`~cft_jax.methods.replay`) and ``joint``.
New learners are added with :func:`register` (a factory from the ``config.method`` section to a
:class:`Method`); ``config.method.name`` then selects them.
"""

from __future__ import annotations

from typing import Callable, Dict

import ml_collections

from cft_jax.methods.base import Method, TaskContext
from cft_jax.methods.joint import Joint
from cft_jax.methods.lae import LAE
from cft_jax.methods.lwf import LwF
from cft_jax.methods.regularizers import DLCFT, EWC, MAS, KroneckerRegularizer
from cft_jax.methods.replay import DER, DERPP, ER


def _quadratic_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """Shared hyper-parameters of the quadratic regularisers (see ``regularizers``)."""
  keys = ("strength", "weighting", "accumulate", "exclude_head", "fisher_type", "num_samples",
          "curvature_batches", "mse_alpha", "microbatch", "seed")
  return {k: cfg[k] for k in keys if k in cfg}


def _kronecker_kwargs(cfg: ml_collections.ConfigDict, extra=()) -> dict:
  keys = ("curvature", "diag_fallback", "extend_head") + tuple(extra)
  return {**_quadratic_kwargs(cfg), **{k: cfg[k] for k in keys if k in cfg}}


def _replay_kwargs(cfg: ml_collections.ConfigDict, extra=()) -> dict:
  keys = ("buffer_size", "replay_batch_size") + tuple(extra)
  return {k: cfg[k] for k in keys if k in cfg}


_FACTORIES: Dict[str, Callable[[ml_collections.ConfigDict], Method]] = {
    "sequential": lambda cfg: Method(),
    "lae": lambda cfg: LAE(ema_decay=cfg.get("ema_decay", 0.999),
                           freeze_epochs=cfg.get("freeze_epochs", 0)),
    "ewc": lambda cfg: EWC(**_quadratic_kwargs(cfg)),
    "mas": lambda cfg: MAS(**_quadratic_kwargs(cfg)),
    "osla": lambda cfg: KroneckerRegularizer(**_kronecker_kwargs(cfg)),
    "dlcft": lambda cfg: DLCFT(**_kronecker_kwargs(
        cfg, ("buffer_size", "replay_lambda", "replay_batch_size", "require_linear"))),
    "lwf": lambda cfg: LwF(**{k: cfg[k] for k in ("temperature", "strength", "weighting")
                              if k in cfg}),
    "er": lambda cfg: ER(**_replay_kwargs(cfg, ("weight",))),
    "der": lambda cfg: DER(**_replay_kwargs(cfg, ("alpha",))),
    "derpp": lambda cfg: DERPP(**_replay_kwargs(cfg, ("alpha", "beta"))),
    "joint": lambda cfg: Joint(),
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
