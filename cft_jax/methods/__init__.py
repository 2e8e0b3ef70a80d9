"""Continual-learning methods behind one protocol (see :mod:`cft_jax.methods.base`).

Built-in names: ``sequential`` (plain sequential fine-tuning / sequential PEFT, DLCFT's "None"),
``lae``, the DLCFT comparison (paper §4): ``ewc``, ``mas``, ``osla``, ``dlcft``
(:mod:`~cft_jax.methods.regularizers`), ``lwf``, ``er``, ``der``, ``derpp``
(:mod:`~cft_jax.methods.replay`) and ``joint``.
New learners are added with :func:`register`; ``config.method.name`` then selects them. A
registered :class:`Method` dataclass is built from the ``config.method`` keys that are its fields,
and those fields are the method's config keys (:func:`method_config_fields`): resolved to their
defaults, type-checked, listed by ``--describe``, and any other key is an error with a "did you
mean" suggestion (:func:`check_method_keys`, called by :func:`get_method` and
:func:`cft_jax.config.validate_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Dict, Optional, Tuple

import ml_collections

from cft_jax import robust as robust_lib
from cft_jax.errors import ConfigError
from cft_jax.methods.base import Method, TaskContext
from cft_jax.methods.joint import Joint
from cft_jax.methods.lae import LAE
from cft_jax.methods.lwf import LwF
from cft_jax.methods.regularizers import DLCFT, EWC, MAS, KroneckerRegularizer
from cft_jax.methods.replay import DER, DERPP, ER
from cft_jax.schema import Key, ReadBy, did_you_mean, not_read


# The ``method`` section's keys every method accepts (:mod:`cft_jax.schema`), besides its own
# fields (:func:`method_config_fields`): the name, LAE's two trainer-level keys, and the robust
# fine-tuning components' keys (:data:`cft_jax.robust.METHOD_KEYS`, any method combines with them).
CONFIG_KEYS = (
    Key("name", "sequential", "continual-learning method (see cft_jax.methods)"),
    Key("ema_decay", 0.999, "lae: offline EMA decay", unit=(0.0, 1.0, False)),
    Key("freeze_epochs", 0, "lae: PEFT frozen for the first k epochs of tasks t >= 1",
        non_negative=True),
)
SECTION_KEYS = CONFIG_KEYS + robust_lib.METHOD_KEYS

# Dataclass fields of a method that are not config keys: the protocol's own fields, and the MSE
# target scale, which is ``loss.alpha`` (one value for the loss, the curvature and the replay terms).
_NOT_CONFIG = ("name", "cumulative_data", "mse_alpha")


def _dataclass_fields(cls) -> Dict[str, Any]:
  """``{field: default}`` of a Method dataclass's hyper-parameters (its config keys)."""
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in _NOT_CONFIG or not f.init:
      continue
    out[f.name] = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
  return out


def _from_fields(cls):
  """Factory building ``cls`` from the ``config.method`` keys that are its fields."""

  def factory(cfg, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: cfg[k] for k in _dataclass_fields(cls) if k in cfg}
    kw.update({k: v for k, v in extra.items() if k in names})
    return cls(**kw)

  return factory


# name -> (factory(config.method, **derived) -> Method, {config key: default} or None = open).
_FACTORIES: Dict[str, Tuple[Callable[..., Method], Optional[Dict[str, Any]]]] = {
    name: (_from_fields(cls), _dataclass_fields(cls)) for name, cls in (
        ("sequential", Method), ("lae", LAE), ("ewc", EWC), ("mas", MAS),
        ("osla", KroneckerRegularizer), ("dlcft", DLCFT), ("lwf", LwF), ("er", ER), ("der", DER),
        ("derpp", DERPP), ("joint", Joint))
}


def register(name: str, factory: Callable[[ml_collections.ConfigDict], Method],
             overwrite: bool = False, fields: Optional[Dict[str, Any]] = None) -> None:
  """Registers a method under ``name`` (selected by ``config.method.name``).

  Args:
    name: the method's name.
    factory: a :class:`Method` dataclass (built from the ``config.method`` keys that are its
      fields; those fields are then the method's config keys, checked by
      :func:`cft_jax.config.validate_config`), or any callable ``factory(config.method) ->
      Method``.
    overwrite: allow replacing an existing name.
    fields: ``{config key: default}`` a callable factory reads (None: its keys are not checked).

  Raises:
    ValueError: ``name`` exists and ``overwrite`` is False.
  """
  if name in _FACTORIES and not overwrite:
    raise ValueError(f"method '{name}' is already registered (pass overwrite=True to replace)")
  if isinstance(factory, type) and dataclasses.is_dataclass(factory):
    _FACTORIES[name] = (_from_fields(factory), _dataclass_fields(factory))
  else:
    _FACTORIES[name] = (lambda cfg, **_: factory(cfg), None if fields is None else dict(fields))


def method_names():
  """Names accepted by ``config.method.name``."""
  return tuple(sorted(_FACTORIES))


def method_config_fields(name: str) -> Optional[Dict[str, Any]]:
  """``{config key: default}`` of method ``name``'s own hyper-parameters (the dataclass fields of
  its class, e.g. ``strength`` for ``ewc``); None when it was registered with a plain factory and
  no ``fields`` (its keys are then not checked).

  Raises:
    ValueError: unknown method name.
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown method.name '{name}'; known: {list(method_names())}")
  fields = _FACTORIES[name][1]
  return None if fields is None else dict(fields)


def get_method(cfg: ml_collections.ConfigDict, mse_alpha: Optional[float] = None) -> Method:
  """Builds the method named ``config.method.name`` with its hyper-parameters.

  Args:
    cfg: the ``config.method`` section (``name`` plus the method's own keys, see
      :func:`method_config_fields`, and the trainer's keys of :func:`cft_jax.config.base_config`).
    mse_alpha: MSE target scale ``alpha`` (``loss.alpha``) for methods with MSE curvature or
      replay terms (None: the class default, 15).

  Raises:
    ConfigError: unknown method name, or a key that is neither the method's nor the trainer's
      (with a "did you mean").
  """
  name = cfg.get("name", CONFIG_KEYS[0].default)  # the declared default of method.name
  if name not in _FACTORIES:
    raise ConfigError(f"unknown method.name '{name}'; known: {list(method_names())}")
  check_method_keys(name, cfg)
  extra = {} if mse_alpha is None else {"mse_alpha": float(mse_alpha)}
  return _FACTORIES[name][0](cfg, **extra)


def method_reads() -> ReadBy:
  """Who reads which ``method`` key (:class:`cft_jax.schema.ReadBy`): each registered method its
  dataclass fields (:func:`method_config_fields`; LAE's ``ema_decay`` and ``freeze_epochs``, a
  replay method's ``buffer_size``, ...). Methods registered without fields are left out (their
  keys are not checked)."""
  return ReadBy("method.name", {name: tuple(fields) for name, (_, fields) in _FACTORIES.items()
                                if fields is not None})


def checked_method_fields(name: str) -> Optional[Dict[str, Any]]:
  """:func:`method_config_fields` of ``name``, with a ConfigError for an unknown name.

  Raises:
    ConfigError: unknown method (the known ones and a "did you mean").
  """
  if name not in method_names():
    raise ConfigError(f"config.method.name={name!r}; choose one of {list(method_names())}"
                      + did_you_mean(str(name), method_names()))
  return method_config_fields(name)


def other_methods_hint(key: str, name: str) -> str:
  """`` ('method.KEY' is a key of METHODS ...)`` when ``key`` (or a close spelling) is a field of
  methods other than ``name`` ("" otherwise): the hint of an unknown ``method.*`` key."""
  owners = {}
  for other in method_names():
    for field in method_config_fields(other) or {}:
      owners.setdefault(field, []).append(other)
  match = key if key in owners else (difflib.get_close_matches(key, sorted(owners), 1) or [None])[0]
  if match is None:
    return ""
  return (f" ('method.{match}' is a key of {', '.join(owners[match])}, not of '{name}': set "
          f"method.name first)")


def check_method_keys(name: str, keys) -> Optional[Dict[str, Any]]:
  """Checks the keys of a ``config.method`` section against method ``name``'s declared fields
  (:func:`method_config_fields`) and the keys every method accepts (:data:`SECTION_KEYS`).

  Args:
    name: the method's name.
    keys: the keys of the ``config.method`` section, or the section itself (a dict /
      ConfigDict: the messages show the values).

  Returns:
    ``{key: default}`` of the method's own fields (None: a method registered without fields).

  Raises:
    ConfigError: unknown method; a field of other methods (``method.buffer_size=500 is not read
      by method.name='sequential' (read by: der, derpp, dlcft, er); ...``); an unknown key (with
      a "did you mean").
  """
  fields = checked_method_fields(name)
  if fields is None:
    return None
  trainer_keys = {k.name for k in SECTION_KEYS}
  allowed = trainer_keys | set(fields)
  reads = method_reads()
  for key in keys:
    if key == "mse_alpha":
      raise ConfigError("config.method.mse_alpha: the MSE target scale is loss.alpha (one value "
                        "for the loss and the curvature / replay terms); set loss.alpha instead")
    if key not in allowed and reads.readers(key):  # another method's field
      raise not_read(f"method.{key}", reads, name,
                     *((keys[key],) if hasattr(keys, "items") else ()))
    if key not in allowed:
      raise ConfigError(f"unknown config key 'method.{key}' for method '{name}'"
                        + (did_you_mean(key, fields, "method.")
                           or other_methods_hint(key, name)
                           or did_you_mean(key, allowed, "method."))
                        + f" Keys of method '{name}': {sorted(fields)}; trainer keys: "
                        f"{sorted(trainer_keys)}")
  return fields
