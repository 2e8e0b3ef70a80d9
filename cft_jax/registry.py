"""Every family's config keys assembled, and validation that needs all of them.

The component families declare their own keys next to their code (:class:`cft_jax.schema.Key`
tuples: :data:`cft_jax.scenarios.CONFIG_KEYS`, :data:`cft_jax.data.CONFIG_KEYS`,
:data:`cft_jax.models.CONFIG_KEYS` + :data:`cft_jax.linearize.CONFIG_KEYS`,
:data:`cft_jax.peft.CONFIG_KEYS`, :data:`cft_jax.methods.SECTION_KEYS` (the methods' and the robust
components' keys), :data:`cft_jax.objectives.CONFIG_KEYS`, :data:`cft_jax.steps.OPTIM_KEYS`,
:data:`cft_jax.parallel.DISTRIBUTED_KEYS`) and
their registries (datasets, models, objectives, methods). This module stands above all of them
and below the trainer: it assembles :func:`base_config` (the single list of keys the trainer
understands), declares the trainer's own sections (``seed``, ``train``, ``eval``, ``checkpoint``:
the trainer stands above this module, so its keys are declared here), and
implements :func:`validate_config`, :func:`describe` and :func:`apply_overrides`. No family
imports it; the public names are re-exported by :mod:`cft_jax.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import ml_collections

from cft_jax import data
from cft_jax import linearize
from cft_jax import methods
from cft_jax import models
from cft_jax import objectives
from cft_jax import parallel
from cft_jax import peft
from cft_jax import robust
from cft_jax import scenarios
from cft_jax import steps
from cft_jax.errors import ConfigError
from cft_jax.schema import (Key, ReadBy, allowed_text, check_value, did_you_mean, fill_defaults,
                            flat, lookup, not_read, parse_override, plain, type_ok)

# ----------------------------------------------------------------------------------------------
# The trainer's own keys (cft_jax.train reads them; it stands above this module).
# ----------------------------------------------------------------------------------------------

SEED = Key("seed", 0, "seed of the model init, data subsets, batch order and augmentation")
TRAIN_KEYS = (
    Key("epochs", 1, "epochs per task", positive=True),
    Key("batch_size", 32, "global batch, split over train.num_devices", positive=True),
    Key("num_devices", 1, "local devices per process the batch is split over (0: all)",
        non_negative=True),
    Key("parallelism", "auto", "auto (sharding if > 1 device) | sharding (jit + Mesh) | pmap",
        choices=("auto", "sharding", "pmap")),
    Key("compute_dtype", "float32", "float32 | bfloat16 activations (params, losses: float32)",
        choices=("float32", "bfloat16")),
    Key("log_every", 5, "steps between log.jsonl records", positive=True),
    Key("stop_after_task", 0, ">0: stop after this many tasks (resume later); 0: run all",
        non_negative=True),
    Key("progress", True, "a progress bar per task"),
    Key("tensorboard", True, "TensorBoard event files in workdir/tensorboard"),
    Key("plots", True, "write PNG plots into the workdir at the end"),
    Key("verbose", True, "print the accuracy matrix after every task"),
    Key("cache_features", False,
        "linear probe: backbone features computed once, head trains on them"),
)
EVAL_KEYS = (
    (Key("batch_size", 250, "evaluation batch size", positive=True),
     Key("test", True, "False: evaluate only the validation split (tuning runs never read the "
         "test images)"))
    + robust.EVAL_KEYS
    + (Key("ood_corruptions", (),
           'e.g. ("gaussian_noise", "contrast"): OOD test sets at the end'),
       Key("ood_severities", (1, 2, 3, 4, 5), "corruption severities of eval.ood_corruptions"),
       Key("ood_dataset", "", "a second dataset with the same classes (data registry name)"),
       Key("ood_root", "", 'data root of eval.ood_dataset ("": the loader\'s default)'),
       Key("knn_k", 0, ">0: k-NN probe of the features after each task", non_negative=True)))
CHECKPOINT_KEYS = (
    Key("max_to_keep", 0, "0 -> keep every checkpoint", non_negative=True),
    Key("every_steps", 0, ">0: also checkpoint every n steps inside a task", non_negative=True),
)

# Every section, in the order of the written config.json, with its owner's keys.
SECTIONS: Tuple[Tuple[str, Tuple[Key, ...]], ...] = (
    ("scenario", scenarios.CONFIG_KEYS),
    ("data", data.CONFIG_KEYS),
    ("model", models.CONFIG_KEYS + linearize.CONFIG_KEYS),
    ("peft", peft.CONFIG_KEYS),
    ("method", methods.SECTION_KEYS),
    ("loss", objectives.CONFIG_KEYS),
    ("optim", steps.OPTIM_KEYS),
    ("train", TRAIN_KEYS),
    ("eval", EVAL_KEYS),
    ("checkpoint", CHECKPOINT_KEYS),
    ("distributed", parallel.DISTRIBUTED_KEYS),
)
# "section.key" -> its declaration ("seed" for the top-level scalar).
KEYS: Dict[str, Key] = {"seed": SEED, **{f"{section}.{k.name}": k
                                         for section, keys in SECTIONS for k in keys}}


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with its default (Split Fashion-MNIST, Lite0 + LoRA, aEPG).

  Assembled from the families' declarations (:data:`SECTIONS`); experiment files in
  ``configs/`` start from it and override values.
  """
  c = ml_collections.ConfigDict()
  c.seed = SEED.default
  for section, keys in SECTIONS:
    c[section] = ml_collections.ConfigDict()
    for key in keys:
      c[section][key.name] = key.default
  return c


def with_defaults(section_name: str, section: Any) -> ml_collections.ConfigDict:
  """``section`` (a ConfigDict / dict, possibly partial) with the keys it lacks taken from
  ``base_config()[section_name]`` (:func:`cft_jax.schema.fill_defaults` of the section's keys).

  Raises:
    KeyError: unknown section.
  """
  return fill_defaults(dict(SECTIONS)[section_name], section)


# ----------------------------------------------------------------------------------------------
# Same run?
# ----------------------------------------------------------------------------------------------

# Keys that may differ between a run and its resumption / reuse: they do not change what is
# computed (see :func:`same_run`).
RUN_SECTIONS = ("seed", "scenario", "data", "model", "peft", "method", "loss", "optim", "train")
# Sections that decide a finished run's metrics (a study reuses a finished workdir when equal).
RESULT_SECTIONS = RUN_SECTIONS + ("eval",)
RUN_IGNORED = ("train.progress", "train.verbose", "train.log_every", "train.stop_after_task",
               "train.plots", "train.tensorboard",
               # the device layout: results are device-count invariant (cft_jax.parallel)
               "train.num_devices", "train.parallelism")


def same_run(saved: Union[ml_collections.ConfigDict, Dict[str, Any]],
             now: Union[ml_collections.ConfigDict, Dict[str, Any]],
             sections: Sequence[str] = RUN_SECTIONS,
             ignore: Sequence[str] = RUN_IGNORED) -> List[str]:
  """The keys (``"section.key"``) whose values differ between two configs of a run.

  The one rule deciding "is this the same run?" for resume (:func:`cft_jax.train.run`) and for
  the studies' reuse of finished workdirs: keys of ``sections`` are compared, except ``ignore``
  (logging and stopping keys that do not change what is computed) and keys present on one side
  only (a key added to the library since the run was made keeps, at its default, the behaviour
  the run had).

  Args:
    saved: the run's saved config (``workdir/config.json`` as a dict, or a ConfigDict).
    now: the config of this invocation.
    sections: top-level sections (or scalar keys such as ``seed``) to compare; the studies add
      ``eval`` when their metrics depend on it.
    ignore: ``"section.key"`` names that may differ.

  Returns:
    The differing keys, sorted; ``[]`` means the same run.
  """
  a, b = plain(saved), plain(now)
  diffs = []
  for section in sections:
    x, y = a.get(section), b.get(section)
    if isinstance(x, dict) and isinstance(y, dict):
      diffs += [f"{section}.{k}" for k in sorted(set(x) & set(y))
                if f"{section}.{k}" not in ignore and x[k] != y[k]]
    elif x is not None and y is not None and x != y and section not in ignore:
      diffs.append(section)
  return sorted(diffs)


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


def _normalise(user: Dict[str, Any]) -> None:
  """In-place spelling normalisations of a user config dict (the one place for each)."""
  model = user.get("model")
  if isinstance(model, dict) and "linearize" in model:
    try:
      model["linearize"] = linearize.linearize_mode(model["linearize"]) or "none"
    except ValueError as e:
      raise ConfigError(str(e)) from None


def validate_config(config: ml_collections.ConfigDict,
                    explicit: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Checks a config and returns it *resolved*: every key of :func:`base_config` present (the
  user's value or the library default), plus the chosen method's own fields
  (:func:`cft_jax.methods.method_config_fields`) at their defaults, ``model.linearize`` spelled
  ``none | full | features``, and ``loss.alpha`` (the MSE target scale) when ``loss.name='mse'``.

  The trainer reads only resolved configs, so no code needs an inline default.

  A key that the chosen loss / schedule / method / robust component / PEFT module does not read
  (:func:`key_readers`) is an error when it is *set*: given with a value other than its
  :func:`base_config` default, given at all when :func:`base_config` lacks it (``loss.beta``, a
  method's field), or named in ``explicit``.

  Args:
    config: the user's config (a partial one is completed with the defaults).
    explicit: full key names the user set explicitly (the command line's
      ``--config.KEY=VALUE``): set even at their default value.

  Returns:
    A new, unlocked ``ConfigDict`` (the argument is not modified).

  Raises:
    ConfigError: naming the first offending key, what is wrong and the fix (unknown keys get a
      "did you mean" suggestion; a key not read by the chosen component names its readers).
  """
  try:
    return _validate(config, explicit)
  except (TypeError, AttributeError, KeyError) as e:  # a value of the wrong kind deep inside
    raise ConfigError(f"invalid config: {type(e).__name__}: {e}. Compare with "
                      f"configs/default.py") from e


def _declared(section: str, key: str, default: Any) -> Key:
  """The declaration checking ``section.key``: its :class:`Key` with ``default`` (a method's
  field may override a trainer key's default), or an unchecked one for undeclared keys (a
  method's own field, a loss hyper-parameter)."""
  decl = KEYS.get(f"{section}.{key}")
  return Key(key, default) if decl is None else dataclasses.replace(decl, default=default)


def _resolve_section(section: str, value: Dict[str, Any], default: Dict[str, Any],
                     method_fields: Optional[Dict[str, Any]]) -> Dict[str, Any]:
  """``default`` updated by the user's ``value`` (keys and values checked)."""
  defaults, allowed = dict(default), set(default)
  if section == "loss":
    allowed |= set(objectives.LOSS_HPARAMS)
  if section == "method":
    if method_fields is None:  # a method registered without declared fields: open section
      allowed |= set(value)
    else:
      methods.check_method_keys(value.get("name", default["name"]), value)
      defaults.update(method_fields)
      allowed |= set(method_fields)
  for key, v in value.items():
    full = f"{section}.{key}"
    if key not in allowed:
      raise ConfigError(f"unknown config key '{full}'" + did_you_mean(key, allowed, f"{section}.")
                        + f" Valid keys of '{section}': {sorted(allowed)}")
    check_value(full, v, _declared(section, key, defaults.get(key)))
  out = dict(default)
  if section == "method" and method_fields:
    out.update(method_fields)
  out.update(value)
  return out


def _resolve(user: Dict[str, Any]) -> ml_collections.ConfigDict:
  """The user's sections merged into :func:`base_config` (keys, types and values checked)."""
  resolved = base_config().to_dict()
  method_name = (user.get("method") or {}).get("name", resolved["method"]["name"])
  method_fields = methods.checked_method_fields(method_name) if isinstance(method_name, str) else {}
  for section, value in user.items():
    if section not in resolved:
      raise ConfigError(f"unknown config section '{section}'"
                        + did_you_mean(section, resolved.keys())
                        + f" Valid sections: {sorted(resolved.keys())}")
    default = resolved[section]
    if not isinstance(default, dict):
      if not type_ok(value, default):
        raise ConfigError(f"config.{section}={value!r}: expected {type(default).__name__}")
      resolved[section] = value
    elif not isinstance(value, dict):
      raise ConfigError(f"config.{section} must be a section (ConfigDict), got {value!r}")
    else:
      resolved[section] = _resolve_section(section, value, default, method_fields)
  if method_fields and "method" not in user:
    resolved["method"].update(method_fields)
  if resolved["loss"]["name"] == "mse" and "alpha" not in resolved["loss"]:
    resolved["loss"]["alpha"] = objectives.mse_alpha_default()
  return ml_collections.ConfigDict(resolved)


def _validate(config: ml_collections.ConfigDict,
              explicit: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Resolves and checks keys, types, values, who reads them and method x setting
  compatibility.

  Raises:
    ConfigError: naming the first offending key, what is wrong and the fix.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config must be an ml_collections.ConfigDict, got {type(config).__name__}")
  user = config.to_dict()
  _normalise(user)
  c = _resolve(user)
  if c.model.name not in models.MODEL_NAMES:
    raise ConfigError(f"config.model.name={c.model.name!r}; choose one of "
                      f"{list(models.MODEL_NAMES)}")
  if c.loss.name not in objectives.OBJECTIVES:
    raise ConfigError(f"config.loss.name={c.loss.name!r}; choose one of "
                      f"{sorted(objectives.OBJECTIVES)}")
  _check_read(c, user, explicit)
  _check_compatibility(c)
  _check_builders(c)
  return c


def key_readers() -> Tuple[ReadBy, ...]:
  """Who reads which key: every family's :class:`cft_jax.schema.ReadBy` declarations (the
  objectives and aEPG's schedules :data:`cft_jax.objectives.LOSS_READS`, the methods' fields
  :func:`cft_jax.methods.method_reads`, the robust components
  :data:`cft_jax.robust.PROJECTION_READS`, the PEFT modules :data:`cft_jax.peft.PEFT_READS`).
  Keys no declaration gates (data, trainer, ``loss.scope``, ``eval.wise_ft_alpha``, ...) are
  read under every choice."""
  return objectives.LOSS_READS + (methods.method_reads(), robust.PROJECTION_READS,
                                  peft.PEFT_READS)


def _is_set(full: str, section: Dict[str, Any], explicit: Sequence[str]) -> bool:
  """Whether the user set ``full`` (present in their ``section`` with a value other than the
  :func:`base_config` default, present at all when the base config lacks it, or explicit)."""
  key = full.split(".", 1)[1]
  if key not in section:
    return False
  if full in explicit or full not in KEYS:
    return True
  value, default = section[key], KEYS[full].default
  if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
    return list(value) != list(default)
  return value != default


def _check_read(c: ml_collections.ConfigDict, user: Dict[str, Any],
                explicit: Sequence[str]) -> None:
  """Refuses a key the user set (:func:`_is_set`) that the chosen component does not read.

  Args:
    c: the resolved config (the selectors' values).
    user: the user's config as a dict (what was set).
    explicit: full key names set explicitly (the command line).

  Raises:
    ConfigError: ``loss.beta=0.1 is not read by loss.name='aepg' (read by: ...); remove it or
      choose one of those``.
  """
  values = plain(c)
  for by in key_readers():
    if by.when is not None and lookup(values, by.when[0]) != by.when[1]:
      continue
    selected = lookup(values, by.selector)
    if not isinstance(selected, str) or selected not in by.reads:
      continue  # a component that declares no keys: not checked
    section = user.get(by.section) or {}
    for key in by.gated:
      full = f"{by.section}.{key}"
      if key not in by.reads[selected] and _is_set(full, section, explicit):
        raise not_read(full, by, selected, section[key])


def _check_compatibility(c: ml_collections.ConfigDict) -> None:
  """Method x setting compatibility of a resolved config.

  Raises:
    ConfigError: a combination the library does not implement, naming the fix.
  """
  if c.peft.name == "prefix" and not c.model.name.startswith("vit_"):
    raise ConfigError(f"peft.name='prefix' needs a ViT (model.name=vit_*); "
                      f"{c.model.name} supports lora | linear_probe | full"
                      + (" | adapter" if c.model.name.startswith("efficientnet") else ""))
  if c.model.remat and not c.model.name.startswith("vit_"):
    raise ConfigError(f"model.remat=True is implemented for the ViT backbones (model.name="
                      f"vit_*); {c.model.name} does not rematerialise: set model.remat=False")
  if c.peft.name == "adapter" and not (c.model.name.startswith("vit_")
                                       or c.model.name.startswith("efficientnet_lite")):
    raise ConfigError(f"peft.name='adapter' needs a ViT or EfficientNet-Lite backbone, not "
                      f"{c.model.name}")
  if c.method.name == "lae" and c.peft.name not in ("lora", "adapter", "prefix"):
    raise ConfigError(f"method.name='lae' ensembles an online and an offline PEFT module: set "
                      f"peft.name to lora, adapter or prefix (got {c.peft.name!r})")
  if c.method.projection == "tpgm" and not (c.data.val_fraction > 0 or c.data.radius_fraction > 0):
    raise ConfigError("method.projection='tpgm' learns its radii on held-out training data: "
                      "set data.radius_fraction > 0 (e.g. 0.1; or data.val_fraction > 0 to use "
                      "the validation split)")
  if c.data.val_fraction + c.data.radius_fraction >= 1.0:
    raise ConfigError(f"data.val_fraction + data.radius_fraction must stay below 1 (got "
                      f"{c.data.val_fraction} + {c.data.radius_fraction}): nothing left to train")
  if c.scenario.first_task_classes:
    if c.scenario.type == "data_il":
      raise ConfigError("scenario.first_task_classes splits classes; scenario.type='data_il' "
                        "splits data: set scenario.first_task_classes=0")
    if c.loss.scope == "local" and c.loss.name in ("label_smoothing", "mse"):
      raise ConfigError(f"loss.name='{c.loss.name}' on the task's classes needs equal tasks "
                        f"(its target spans the whole local slice): set loss.scope='all' or "
                        f"scenario.first_task_classes=0")
  if c.peft.name == "lora" and not c.peft.rank > 0:
    raise ConfigError("peft.name='lora' needs peft.rank >= 1")
  if c.data.name == "image_folder" and not c.data.root:
    raise ConfigError("data.name='image_folder' needs --config.data.root=DIR with "
                      "DIR/{train,test}/<class>/*.jpg")
  if c.train.batch_size % max(c.train.num_devices, 1):
    raise ConfigError(f"train.batch_size={c.train.batch_size} must be divisible by "
                      f"train.num_devices={c.train.num_devices}")


def _check_builders(c: ml_collections.ConfigDict) -> None:
  """Builds what is cheap to build (data registry lookup, loss, method) so that their own
  value checks end as ConfigError before any data is loaded.

  Raises:
    ConfigError: an unknown dataset, or a loss / method hyper-parameter the builder rejects.
  """
  if c.data.name not in data.REGISTRY and not c.data.name.startswith("tfds:"):
    raise ConfigError(f"config.data.name={c.data.name!r}"
                      + did_you_mean(c.data.name, data.REGISTRY)
                      + f" Known: {sorted(data.REGISTRY)} or 'tfds:<name>'")
  loss_kw = objectives.loss_hparams(c.loss)
  mse_alpha = objectives.mse_alpha(c)
  for what, build in (("loss", lambda: objectives.make_loss_fn(c.loss.name, **loss_kw)),
                      ("method", lambda: methods.get_method(c.method, mse_alpha=mse_alpha))):
    try:
      build()
    except ConfigError:
      raise
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{what} ({c[what].name}): {e}") from None


# ----------------------------------------------------------------------------------------------
# Describing the keys (--describe).
# ----------------------------------------------------------------------------------------------


def _allowed(full: str) -> str:
  """Allowed values of ``full`` as text (choices, registries, ranges, type)."""
  registries = {"model.name": models.MODEL_NAMES, "loss.name": sorted(objectives.OBJECTIVES),
                "method.name": methods.method_names()}
  return allowed_text(KEYS[full], registries.get(full))


def _field_doc(cls, field: str) -> str:
  """The ``field: text`` line of the ``Attributes:`` docstrings along ``cls``'s MRO."""
  for klass in cls.__mro__:
    m = re.search(rf"^\s+{field}: (.+)$", klass.__doc__ or "", re.M)
    if m:
      return m.group(1).strip()
  return f"hyper-parameter of {cls.__name__}"


def _loss_rows() -> List[Dict[str, Any]]:
  """``--describe`` rows of the objectives' hyper-parameters outside :func:`base_config`."""
  used_by = {}
  for obj, keys in objectives.OBJECTIVE_HPARAMS.items():
    for k in keys:
      used_by.setdefault(k, []).append(obj)
  return [{"key": f"loss.{k}", "default": None, "allowed": "see the objective",
           "meaning": f"hyper-parameter of loss {', '.join(used_by[k])}"
           + (" (mse: target scale alpha, also used by the curvature / replay terms)"
              if k == "alpha" else "")}
          for k in sorted(set(used_by) - set(base_config().loss))]


def _method_rows(method: Optional[str]) -> List[Dict[str, Any]]:
  """``--describe`` rows of the methods' own fields (``method``'s, or every method's)."""
  names = methods.method_names() if method is None else (method,)
  seen, rows = set(), []
  for name in names:
    fields = methods.method_config_fields(name) or {}
    cls = type(methods.get_method(ml_collections.ConfigDict({"name": name}))) if fields else None
    for k, default in fields.items():
      if (k in seen and method is None) or k in base_config().method:
        continue
      seen.add(k)
      users = [n for n in names if k in (methods.method_config_fields(n) or {})]
      rows.append({"key": f"method.{k}", "default": default,
                   "allowed": type(default).__name__ if default is not None else "any",
                   "meaning": f"[{', '.join(users)}] {_field_doc(cls, k)}"})
  return rows


def config_schema(method: Optional[str] = None) -> List[Dict[str, Any]]:
  """Every config key with its default, allowed values and meaning: the families' declarations
  (:data:`KEYS`, the keys of :func:`base_config`), the objectives' hyper-parameters, and the
  fields of the method ``method`` (None: of every registered method).

  Args:
    method: a method name (None: every registered method).

  Returns:
    ``[{"key", "default", "allowed", "meaning"}]`` in section order.
  """
  rows = []
  for section, value in base_config().to_dict().items():
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for key, default in items:
      full = section if key is None else f"{section}.{key}"
      rows.append({"key": full, "default": default, "allowed": _allowed(full),
                   "meaning": KEYS[full].doc})
  return rows + _loss_rows() + _method_rows(method)


def describe(config: Union[ml_collections.ConfigDict, str, None] = None) -> str:
  """Text table of :func:`config_schema` (``python -m cft_jax.main --config ... --describe``).

  Args:
    config: a config (it is resolved: its method's keys and its values are shown), a method
      name, or None (the keys of every method, no values).

  Returns:
    The table, one key per line.

  Raises:
    ConfigError: ``config`` is invalid.
  """
  values, method = None, config if isinstance(config, str) else None
  if isinstance(config, ml_collections.ConfigDict):
    values = plain(validate_config(config))
    method = values["method"]["name"]
  rows = config_schema(method)
  width = max(len(r["key"]) for r in rows) + 2

  def show(v):
    return "-" if v is None else repr(tuple(v) if isinstance(v, list) else v)

  head = f"{'key':<{width}}" + (f"{'value':<24}" if values else "")
  lines = [head + f"{'default':<24}meaning  [allowed values]"]
  for r in rows:
    line = f"{r['key']:<{width}}"
    if values is not None:
      line += f"{show(lookup(values, r['key'])):<23} "
    lines.append(line + f"{show(r['default']):<23} {r['meaning'] or '-'}  [{r['allowed']}]")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command-line overrides.
# ----------------------------------------------------------------------------------------------


def _known_keys(out: ml_collections.ConfigDict, key: str) -> Tuple[Dict[str, Any], str]:
  """``({"section.key": current or default value}, method name)`` an override may set."""
  known = {**flat(base_config().to_dict()), **flat(out.to_dict())}
  name = out.method.name if "method" in out and "name" in out.method else "sequential"
  if name in methods.method_names():
    fields = methods.method_config_fields(name) or {}
    known.update({f"method.{k}": v for k, v in fields.items()})
    if methods.method_config_fields(name) is None and key.startswith("method."):
      known.setdefault(key, None)  # a method registered without declared fields
  for other in methods.method_names():  # another method's field: validate_config names readers
    for k, v in (methods.method_config_fields(other) or {}).items():
      known.setdefault(f"method.{k}", v)
  known.update({f"loss.{k}": None for k in objectives.LOSS_HPARAMS if f"loss.{k}" not in known})
  return known, name


def _set_override(out: ml_collections.ConfigDict, key: str, text: str, value: Any) -> None:
  """Sets ``out[key] = value`` (sections created as needed; the type checked against the
  current value)."""
  *path, last = key.split(".")
  node = out
  for part in path:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  if last in node and node[last] is not None and value is not None and not type_ok(
      value, node[last]):
    raise ConfigError(f"--config.{key}={text!r}: expected {type(node[last]).__name__}")
  if last in node:
    del node[last]  # the new value may be of another type (e.g. None -> int)
  node[last] = value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
  """Applies command-line overrides ``KEY=VALUE`` (``--config.KEY=VALUE``) to a config.

  A key may be any key of the config, of :func:`base_config`, a loss hyper-parameter, or a field
  of the config's method (``method.name`` is applied first, so ``--config.method.name=ewc
  --config.method.strength=100`` works on any config file). The value takes the type of the
  current (or default) value; tuples and untyped keys are Python literals; ``None`` is None.

  Args:
    config: the config of the ``--config`` file.
    overrides: ``["KEY=VALUE", ...]``.

  Returns:
    An unlocked copy with the overrides applied.

  Raises:
    ConfigError: an unknown key (with a "did you mean"), or a value of the wrong type.
  """
  out = ml_collections.ConfigDict(config.to_dict())
  pairs = []
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"--config.{key}: expected --config.{key}=VALUE")
    pairs.append((key, text))
  pairs.sort(key=lambda kv: kv[0] != "method.name")
  for key, text in pairs:
    known, name = _known_keys(out, key)
    if key not in known:
      hint = did_you_mean(key, known)
      own = sorted(methods.method_config_fields(name) or {})
      if key.startswith("method.") and not difflib.get_close_matches(key[len("method."):], own, 1):
        hint = methods.other_methods_hint(key[len("method."):], name) or hint
      raise ConfigError(f"unknown config key '{key}' (--config.{key})" + hint
                        + " See --describe for every key.")
    _set_override(out, key, text, parse_override(key, text, known[key]))
  return out
