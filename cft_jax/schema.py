"""Generic config-schema tools: how a family declares its keys, and how a value is checked.

Second from the bottom of the import graph: it imports only :mod:`cft_jax.errors`. Each component
family declares its own config keys next to its code as a tuple of :class:`Key` (default, one-line
meaning, allowed values), e.g. ``cft_jax.data.CONFIG_KEYS`` or ``cft_jax.objectives.CONFIG_KEYS``;
:mod:`cft_jax.registry`, which stands above every family, assembles them into
:func:`cft_jax.config.base_config` and validates configs against them. A family that reads one
section fills the keys a partial section lacks with :func:`fill_defaults` of its own
declaration, so a key's default is written once, where the key is declared.

Also here: the tools that know no family (loading config files, ``--config FILE.py:args``,
command-line override values, JSON views of configs).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import ml_collections

from cft_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key of a section, declared by the family that reads it.

  Attributes:
    name: the key inside its section (``image_size`` of ``data``).
    default: the library default; its type is the key's type (``None``: any type).
    doc: one-line meaning (``--describe``).
    choices: the allowed values (None: any value of the type).
    positive: the value must be ``> 0``.
    non_negative: the value must be ``>= 0``.
    unit: ``(lo, hi, closed)``: the value lies in ``[lo, hi]`` (``closed``) or ``[lo, hi)``.
  """

  name: str
  default: Any
  doc: str = ""
  choices: Optional[Tuple[Any, ...]] = None
  positive: bool = False
  non_negative: bool = False
  unit: Optional[Tuple[float, float, bool]] = None


@dataclasses.dataclass(frozen=True)
class ReadBy:
  """Who reads which keys of a section: the value of one selector key (``loss.name``) chooses
  the component, and each component reads only its own keys of the selector's section.

  Declared by the family that owns the components (e.g. :data:`cft_jax.objectives.LOSS_READS`);
  :func:`cft_jax.registry.validate_config` refuses a key that is set but not read by the chosen
  component (:func:`not_read`).

  Attributes:
    selector: the full name of the selector key (``"loss.name"``); the keys it gates belong to
      its section.
    reads: ``{selector value: keys of the section it reads}`` (short names, e.g. ``"beta"``).
      The gated keys are every key listed under some value; a key listed nowhere is not gated.
      A selector value missing from ``reads`` (e.g. a component registered without declared
      keys) gates nothing.
    when: ``(full key, value)``: the table applies only while that key has that value (e.g. the
      aEPG schedules' keys matter only under ``loss.name='aepg'``); None: always.
  """

  selector: str
  reads: Mapping[Any, Tuple[str, ...]]
  when: Optional[Tuple[str, Any]] = None

  @property
  def section(self) -> str:
    """The section of the selector and of the keys it gates (``"loss"``)."""
    return self.selector.split(".")[0]

  @property
  def gated(self) -> Tuple[str, ...]:
    """The keys (short names) some value of the selector reads, sorted."""
    return tuple(sorted({k for keys in self.reads.values() for k in keys}))

  def readers(self, key: str) -> Tuple[Any, ...]:
    """The selector values that read ``key`` (short name), sorted."""
    return tuple(sorted((value for value, keys in self.reads.items() if key in keys), key=str))


_NO_VALUE = object()


def not_read(full: str, by: ReadBy, selected: Any, value: Any = _NO_VALUE) -> ConfigError:
  """The error of a key that is set but not read by the chosen component.

  Args:
    full: the key's full name (``"loss.beta"``).
    by: the declaration gating the key.
    selected: the selector's value (``"aepg"``).
    value: the key's value (left out: the message names the key only).

  Returns:
    ``ConfigError("loss.beta=0.1 is not read by loss.name='aepg' (read by: confidence_penalty,
    entropy_penalty); remove it or choose one of those")``, to raise.
  """
  readers = ", ".join(str(r) for r in by.readers(full.split(".", 1)[1]))
  shown = full if value is _NO_VALUE else f"{full}={value!r}"
  return ConfigError(f"{shown} is not read by {by.selector}={selected!r} (read by: {readers}); "
                     f"remove it or choose one of those")


def defaults(keys: Sequence[Key]) -> ml_collections.ConfigDict:
  """A section ``{key: default}`` of ``keys``, in declaration order."""
  section = ml_collections.ConfigDict()
  for key in keys:
    section[key.name] = key.default
  return section


def fill_defaults(keys: Sequence[Key], section: Any) -> ml_collections.ConfigDict:
  """``section`` (a ConfigDict / dict, possibly partial; None: empty) with the keys it lacks
  taken from the declared defaults of ``keys``: library functions that take one section read it
  without inline defaults."""
  out = defaults(keys).to_dict()
  out.update(dict(section.items()) if section is not None else {})
  return ml_collections.ConfigDict(out)


def type_ok(value: Any, default: Any) -> bool:
  """Whether ``value`` has the type of ``default`` (ints are floats; tuples and lists agree)."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def did_you_mean(key: str, candidates, prefix: str = "") -> str:
  """``"; did you mean 'PREFIXkey'?"`` for the closest of ``candidates`` ("" when none is close)."""
  hint = difflib.get_close_matches(key, sorted(candidates), 1)
  return f"; did you mean '{prefix}{hint[0]}'?" if hint else ""


def check_value(full: str, v: Any, key: Optional[Key]) -> None:
  """Type, choice and range checks of one value of ``full`` (``"section.key"``).

  Args:
    full: the key's full name, for the message.
    v: the value.
    key: the key's declaration (None: a key without declaration, e.g. a method's own field;
      nothing is checked).

  Raises:
    ConfigError: naming the key, the value and what is allowed.
  """
  if key is None:
    return
  default = key.default
  if default is not None and v is not None and not type_ok(v, default):
    raise ConfigError(f"config.{full}={v!r} has type {type(v).__name__}; expected "
                      f"{type(default).__name__} like the default {default!r}")
  if key.choices is not None and v not in key.choices:
    raise ConfigError(f"config.{full}={v!r}; choose one of {list(key.choices)}")
  if key.positive and (v is None or not v > 0):
    raise ConfigError(f"config.{full}={v!r} must be > 0")
  if key.non_negative and v is not None and not v >= 0:
    raise ConfigError(f"config.{full}={v!r} must be >= 0")
  if key.unit is not None:
    lo, hi, closed = key.unit
    if not (lo <= v <= hi if closed else lo <= v < hi):
      raise ConfigError(f"config.{full}={v!r} must be in [{lo}, {hi}{']' if closed else ')'}")


def allowed_text(key: Key, names: Optional[Sequence[str]] = None) -> str:
  """The allowed values of ``key`` as text (``--describe``): its choices, else ``names`` (a
  registry's names, e.g. the models), else its range and type."""
  if key.choices is not None:
    return " | ".join(repr(v) for v in key.choices)
  if names is not None:
    return " | ".join(names)
  kind = type(key.default).__name__ if key.default is not None else "any"
  if key.positive:
    return f"{kind} > 0"
  if key.unit is not None:
    lo, hi, closed = key.unit
    return f"{kind} in [{lo}, {hi}{']' if closed else ')'}"
  if key.non_negative:
    return f"{kind} >= 0"
  return kind


# ----------------------------------------------------------------------------------------------
# Config files and their arguments.
# ----------------------------------------------------------------------------------------------


def parse_config_arg(arg, fields, example: str):
  """Splits a config file's argument (``--config FILE.py:a,b,c``) into one value per field.

  Args:
    arg: the text after the colon (``None`` / ``""``: every field's default); comma-separated,
      positional, trailing fields may be left out.
    fields: ``[(name, choices, default), ...]`` in order; ``choices`` a tuple of allowed values.
    example: a valid command-line use shown in the error, e.g. ``configs/cifar10.py:aepg,lae``.

  Returns:
    A tuple with one value per field (the given or the default one).

  Raises:
    ConfigError (a ValueError): more parts than fields, or a value outside its field's choices;
      the message lists every field's choices and ``example``.
  """
  parts = [p.strip() for p in (arg or "").split(",")] if (arg or "").strip() else []
  values = tuple(parts[i] if i < len(parts) and parts[i] else default
                 for i, (_, _, default) in enumerate(fields))
  if len(parts) > len(fields) or any(v not in choices
                                     for v, (_, choices, _) in zip(values, fields)):
    expected = ", ".join(f"{name} in {tuple(choices)}" for name, choices, _ in fields)
    raise ConfigError(f"config argument '{arg}': expected {expected}, e.g. {example}")
  return values


def _config_files_hint(path: str) -> str:
  """``" (configs/ holds: a.py, b.py)"`` for a missing config file whose folder exists, else
  where the path was looked up."""
  folder = os.path.dirname(path) or "."
  if os.path.isdir(folder):
    names = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
    if names:
      return f" ({os.path.join(os.path.dirname(path), '') or './'} holds: {', '.join(names)})"
  return f" (looked up from {os.getcwd()}: run from the checkout's root or give the full path)"


def load_config_module(path_or_name: str, name: Optional[str] = None):
  """Imports a config file by path (``configs/dlcft_data_il.py``) or module name
  (``configs.dlcft_data_il``); the module has ``get_config(arg)``.

  Raises:
    ConfigError: no such file or module.
  """
  if path_or_name.endswith(".py") or os.path.sep in path_or_name:
    if not os.path.isfile(path_or_name):
      raise ConfigError(f"config file {path_or_name!r} not found"
                        + _config_files_hint(path_or_name))
    name = name or "cft_jax_config_" + os.path.splitext(os.path.basename(path_or_name))[0]
    spec = importlib.util.spec_from_file_location(name, path_or_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  try:
    return importlib.import_module(path_or_name)
  except ImportError as e:
    raise ConfigError(f"config module {path_or_name!r} cannot be imported: {e}") from None


def load_config(path_or_module: Union[str, Any], arg: Optional[str] = None
                ) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file, module name or module (the ``--config`` semantics).

  Args:
    path_or_module: a file path (``configs/default.py``, optionally ``FILE.py:arg`` as on the
      command line), a module name (``configs.dlcft_class_il``) or an imported module.
    arg: the argument of ``get_config`` (None: its default; overrides a ``:arg`` suffix).

  Returns:
    The (unresolved) config; :func:`cft_jax.config.validate_config` resolves it.

  Raises:
    ConfigError: the file or module does not exist or has no ``get_config``; ``get_config``
      refused ``arg`` (its ValueError or ConfigError, the message prefixed with ``FILE:ARG``).
  """
  module = path = path_or_module
  if isinstance(path_or_module, str):
    if ":" in path and path.rsplit(":", 1)[0].endswith(".py"):
      path, suffix = path.rsplit(":", 1)
      arg = suffix if arg is None else arg
    module = load_config_module(path)
  else:
    path = getattr(module, "__name__", "config")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path_or_module!r} has no get_config(arg) function")
  try:
    return module.get_config() if arg is None else module.get_config(arg)
  except ValueError as e:  # a config file's own check of its argument (ConfigError included)
    raise ConfigError(f"{path}{'' if arg is None else ':' + str(arg)}: {e}") from e


# ----------------------------------------------------------------------------------------------
# JSON views of configs, differences, command-line values.
# ----------------------------------------------------------------------------------------------


def plain(config: Union[ml_collections.ConfigDict, Dict[str, Any]]) -> Dict[str, Any]:
  """A JSON-comparable dict (tuples as lists) of a ConfigDict or dict."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json())
  return json.loads(json.dumps(config))


def lookup(d: Dict[str, Any], key: str) -> Any:
  """``d["a"]["b"]`` for ``key="a.b"`` (None when a part is missing)."""
  for part in key.split("."):
    d = d.get(part) if isinstance(d, dict) else None
  return d


def flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  """``{"section.key": value}`` of a nested dict."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def describe_diffs(saved, now, keys: Sequence[str]) -> str:
  """``"key: saved X, now Y"`` lines of the differing ``keys`` of two configs."""
  a, b = plain(saved), plain(now)
  return "\n".join(f"{k}: saved {lookup(a, k)!r}, now {lookup(b, k)!r}" for k in keys)


def parse_override(key: str, text: str, like: Any) -> Any:
  """The value of ``--config.key=text`` with the type of ``like`` (the current or default value).

  Raises:
    ConfigError: ``text`` is not a value of ``like``'s type.
  """
  if text == "None":
    return None
  try:
    if isinstance(like, bool):
      low = text.lower()
      if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return low in ("true", "1", "yes")
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
    if isinstance(like, str):
      return text
  except ValueError:
    raise ConfigError(f"--config.{key}={text!r}: expected a {type(like).__name__} like "
                      f"{like!r}") from None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return tuple(value) if isinstance(like, tuple) and isinstance(value, list) else value
