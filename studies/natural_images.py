"""The papers' claims on natural images under the registered protocol of
``docs/results/protocol.md``: tune on a validation split (two tuning seeds, a pick at a grid's
edge extends the grid), run the registered seeds, report paired intervals with raw and
Holm-adjusted verdicts for the claims registered in ``studies/claims.py``.

Datasets (``--dataset``):

* ``tiny_imagenet``: Split Tiny-ImageNet, 10 tasks x 20 classes (``configs/tiny_imagenet.py``,
  ``../shared/data/tiny-imagenet-mini``) — the papers' task shape;
* ``cifar10``: Split CIFAR-10, 5 tasks x 2 classes (``configs/cifar10.py``,
  ``../shared/data/cifar10-mini``).

Studies (``--study``):

* ``objectives`` (aEPG paper): ``configs/<dataset>.py:<loss>,<method>`` — CE, EPG, aEPG (tau 6
  and tuned tau), entropy penalty, confidence penalty, label smoothing, focal, with seq-LoRA and
  LAE;
* ``class_il_recipes``: which configuration to use for class-IL — seq-LoRA and LAE with CE /
  aEPG (the objectives study's runs, shared), replay (ER, DER++; buffer 500) on seq-LoRA at the
  dataset config's budget;
* cifar10 only: ``dlcft_data_il`` / ``dlcft_class_il`` (DLCFT paper; ``configs/dlcft_*.py`` with
  the data switched to cifar10-mini) and ``robust_ft`` (TPGM / FTP papers; ``configs/
  robust_ft.py``, OOD = the corruption suite of the cifar10-mini test images).

Phases (``--phase``, default ``all`` = tune, final, report):

1. ``tune``: every arm x the learning-rate grid x its own hyper-parameter grid x ``--tune-seeds``
   (100, 101), scored by the VALIDATION class-IL final accuracy (``metrics.json['val']``; the
   runs set ``eval.test=False`` and never read the test images). The best mean over the tuning
   seeds is selected (:func:`_common.select_best`); a pick at an edge of a grid extends that
   axis one step past the edge (at the other axis' pick) and re-selects — recorded in
   ``<out>/<dataset>_<study>_selected.json`` with every setting's per-seed scores.
2. ``pilot``: the arms at their selected values with the pilot seeds (900, 901): the paired std
   of each claim and the seeds its margin needs (``<out>/<dataset>_<study>_pilot.json``), to be
   read before the seed set is registered.
3. ``final``: every arm at its selected values x the study's registered seeds
   (``claims.SEEDS``; ``--seeds`` only for smoke runs elsewhere).
4. ``report``: ``<out>/<dataset>_<study>.md`` / ``.json``: per arm mean ± std and cost; per
   registered claim the paired difference, 95% t and bootstrap intervals, raw and Holm-adjusted
   verdicts (family-wide, :func:`claims.verdicts`) and the power line. A claim not in the
   registry is never reported; a claim whose arms lack a registered seed is "incomplete"; it pairs
   seed by seed, and a seed whose runs come from different code commits or machines leaves it
   "unpaired" (re-run that seed's runs together; different seeds may come from different machines).
5. ``verify`` (on demand): re-runs recorded final runs of ``--arms`` at this checkout and checks
   every recorded number for exact equality (:func:`verify`,
   ``<out>/<dataset>_reproduction.json``): the evidence that a newer code commit computes the
   same numbers (:data:`EQUIVALENT_CODE`), or that another machine reproduces them.

Runs are reused when finished with the same settings and resumed when unfinished; final runs
recorded in the committed ``<out>/<dataset>_<study>.json`` at the same selected values stand in
for run folders that are gone (a study spans sessions; ``--fresh`` retrains), and so do tuning
scores recorded in the selected JSON. Commands::

    python studies/natural_images.py --dataset tiny_imagenet --study objectives --dry-run
    python studies/natural_images.py --dataset tiny_imagenet --study objectives --phase tune \
        --arms ce_seq aepg_tau6_seq
    python studies/natural_images.py --dataset tiny_imagenet --study objectives --phase pilot \
        --arms ce_seq aepg_tau6_seq
    python studies/natural_images.py --dataset cifar10 --study robust_ft --phase report

Smoke check of the whole pipeline (minutes; tiny random CNN, numbers meaningless)::

    python studies/natural_images.py --dataset cifar10 --study robust_ft --arms ft tpgm \
        --seeds 0 1 --set model.name=tiny_cnn --set model.pretrained=False --image-size 16 \
        --train-limit 20 --test-limit 10 --epochs 1 --out /tmp/ni --workdir-root /tmp/ni
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    add_override_args, apply_overrides, enable_compile_cache, load_config_module, mean_std,
    same_settings, select_best)
import claims as claims_lib  # noqa: E402
import stats  # noqa: E402
from cft_jax import provenance as provenance_lib  # noqa: E402  (no jax: light to import)

LR_GRID = (3e-4, 1e-3, 3e-3)       # the same for every arm of a study (protocol.md)
ROBUST_LR_GRID = (3e-5, 1e-4, 3e-4)  # full fine-tuning (robust_ft): 10x lower, the same for all
NATURAL = "natural"                # Arm.config: the dataset's own config (configs/<dataset>.py)

DATASETS: Dict[str, Dict[str, Any]] = {
    "tiny_imagenet": {"config": "tiny_imagenet",
                      "label": "tiny-imagenet-mini (Split Tiny-ImageNet, 10 tasks x 20 classes)",
                      "studies": ("objectives", "class_il_recipes")},
    "cifar10": {"config": "cifar10", "label": "cifar10-mini (Split CIFAR-10, 5 tasks x 2 classes)",
                "studies": ("objectives", "class_il_recipes", "dlcft_data_il", "dlcft_class_il",
                            "robust_ft")},
}


class Arm(NamedTuple):
  """One method of a study: ``config`` file name (:data:`NATURAL`: the dataset's) + ``arg``,
  label, and its own hyper-parameter(s): ``key`` a dotted config path (or a tuple of paths, then
  ``grid`` holds tuples), ``grid`` its candidate values (``None``: only the lr is tuned),
  ``extend`` the values one step below / above the grid (None: geometric, see :func:`extend`)."""
  name: str
  config: str
  arg: str
  label: str
  key: Any = None
  grid: Tuple[Any, ...] = ()
  extend: Optional[Tuple[float, float]] = None


def _objective_arms(method: str) -> List[Arm]:
  m = "lae" if method == "lae" else "seq"
  a = lambda name, loss, label, key=None, grid=(): Arm(  # noqa: E731
      f"{name}_{m}", NATURAL, f"{loss},{method}",
      f"{label} ({'LAE' if m == 'lae' else 'seq-LoRA'})", key, grid)
  return [a("ce", "ce", "CE"), a("epg", "epg", "EPG"),
          a("aepg_tau6", "aepg", "aEPG sigmoid tau 6"),
          a("aepg", "aepg", "aEPG tuned tau", "loss.tau", (2.0, 6.0, 12.0)),
          a("entropy_penalty", "entropy_penalty", "entropy penalty", "loss.beta", (0.3, 1.0, 3.0)),
          a("confidence_penalty", "confidence_penalty", "confidence penalty", "loss.beta",
            (0.03, 0.1, 0.3)),
          a("label_smoothing", "label_smoothing", "label smoothing", "loss.gamma",
            (0.05, 0.1, 0.2)),
          a("focal", "focal", "focal", "loss.gamma", (0.5, 1.0, 2.0))]


LAMBDA = (0.3, 1.0, 3.0)  # regularisation strength of EWC / OSLA / DLCFT (method.strength)
_OBJ = {a.name: a for a in _objective_arms("sequential") + _objective_arms("lae")}
_REPLAY = [Arm("er_seq", NATURAL, "ce,er", "ER, buffer 500 (seq-LoRA, CE over all outputs)"),
           Arm("derpp_seq", NATURAL, "ce,derpp",
               "DER++, buffer 500 (seq-LoRA, CE over all outputs)")]
STUDIES: Dict[str, Dict[str, Any]] = {
    "objectives": {
        "paper": "aEPG (arXiv 2602.14078)",
        "lr_grid": LR_GRID,
        "arms": list(_OBJ.values()),
    },
    "dlcft_data_il": {
        "paper": "DLCFT (Shon et al., ECCV 2022), Table 1",
        "data_il": True,  # every task holds every class: task-IL = class-IL, one column
        "lr_grid": LR_GRID,
        "arms": [Arm("none", "dlcft_data_il", "none", "None (fine-tuning)"),
                 Arm("ewc", "dlcft_data_il", "ewc", "EWC", "method.strength", LAMBDA),
                 Arm("osla", "dlcft_data_il", "osla", "OSLA", "method.strength", LAMBDA),
                 Arm("dlcft_kfac", "dlcft_data_il", "dlcft_kfac", "DLCFT K-FAC",
                     "method.strength", LAMBDA),
                 Arm("dlcft_tkfac", "dlcft_data_il", "dlcft_tkfac", "DLCFT TK-FAC",
                     "method.strength", LAMBDA),
                 Arm("joint", "dlcft_data_il", "joint", "Joint (upper bound)")],
    },
    "dlcft_class_il": {
        "paper": "DLCFT (Shon et al., ECCV 2022), Table 2",
        "lr_grid": LR_GRID,
        "arms": [Arm("er", "dlcft_class_il", "er", "ER"),
                 Arm("der", "dlcft_class_il", "der", "DER", "method.alpha", (0.1, 0.3, 1.0)),
                 Arm("derpp", "dlcft_class_il", "derpp", "DER++", "method.alpha",
                     (0.1, 0.3, 1.0)),
                 Arm("dlcft", "dlcft_class_il", "dlcft", "DLCFT", "method.replay_lambda",
                     (0.25, 0.5, 0.75), extend=(0.1, 0.9))],
    },
    "robust_ft": {
        "paper": "TPGM (Tian et al., CVPR 2023) / FTP (NeurIPS 2023)",
        "single_task": True,   # one task: the report shows ID / OOD accuracy, not class-IL columns
        "lr_grid": ROBUST_LR_GRID,
        "arms": [Arm("ft", "robust_ft", "ft", "FT"),
                 Arm("l2sp", "robust_ft", "l2sp", "L2-SP", "method.l2sp_alpha",
                     (0.001, 0.01, 0.1)),
                 Arm("wise_ft", "robust_ft", "wise_ft", "WiSE-FT", "eval.wise_ft_alpha",
                     (0.3, 0.5, 0.7), extend=(0.1, 0.9)),
                 Arm("tpgm", "robust_ft", "tpgm", "TPGM", "method.radius_lr", (3e-3, 1e-2, 3e-2)),
                 Arm("ftp", "robust_ft", "ftp", "FTP", "method.radius_lr", (3e-3, 1e-2, 3e-2))],
    },
    # Which configuration for class-IL: seq-LoRA's variants at the same budget. Its CE / aEPG
    # arms share the objectives study's names and runs (``runs_under``): never trained twice.
    "class_il_recipes": {
        "paper": "class-IL recommendation (seq-LoRA, LAE, replay)",
        "runs_under": "objectives",
        "lr_grid": LR_GRID,
        "arms": [_OBJ["ce_seq"], _OBJ["aepg_tau6_seq"], _OBJ["aepg_tau6_lae"]] + _REPLAY,
        "arms_tiny_imagenet": [_OBJ["ce_seq"], _OBJ["aepg_tau6_seq"], _OBJ["ce_lae"],
                               _OBJ["aepg_tau6_lae"], _REPLAY[0],
                               _REPLAY[1]._replace(key=("method.alpha", "method.beta"),
                                                   grid=((0.1, 0.5), (0.3, 0.5), (0.1, 1.0),
                                                         (0.3, 1.0))),
                               Arm("dlcft_seq", NATURAL, "ce,dlcft",
                                   "DLCFT (TK-FAC), buffer 500 (LoRA linearized, MSE)",
                                   "method.replay_lambda", (0.25, 0.5, 0.75), extend=(0.1, 0.9))],
    },
}


def study_arms(dataset: str, study: str) -> List[Arm]:
  """The arms of ``study`` on ``dataset`` (a study may list other arms for one dataset)."""
  spec = STUDIES[study]
  return list(spec.get(f"arms_{dataset}", spec["arms"]))


def _out(args, study: str, suffix: str = ".json") -> str:
  return os.path.join(args.out, f"{args.dataset}_{study}{suffix}")


def natural_config(arm: Arm, seed: int, args, lr: Optional[float] = None, value: Any = None,
                   tuning: bool = False):
  """The config of ``arm`` for ``seed`` on ``args.dataset`` with the validation split, at learning
  rate ``lr`` and own hyper-parameter ``value`` (None: the config's). Tuning runs evaluate only
  the validation split (``eval.test=False``) and no OOD set."""
  dataset = getattr(args, "dataset", "cifar10")
  data_cfg = load_config_module(os.path.join(ROOT, "configs", f"{DATASETS[dataset]['config']}.py"),
                                f"natural_{dataset}")
  module = data_cfg if arm.config == NATURAL else load_config_module(
      os.path.join(ROOT, "configs", f"{arm.config}.py"), f"natural_{arm.config}")
  c = module.get_config(arm.arg)
  if arm.config != NATURAL:  # the study's own config, its data switched to the dataset
    c.data.name = "image_folder"
    c.data.root = data_cfg.default_root()
    c.data.test_limit = 0       # all test images; the training budget stays the config's
  c.data.val_fraction = args.val_fraction
  c = apply_overrides(c, args, seed)
  if args.data_root:
    c.data.root = args.data_root
  for item in args.set or ():  # --set section.key=value (e.g. model.name=tiny_cnn for a smoke run)
    path, _, text = item.partition("=")
    section, key = path.split(".")
    try:
      c[section][key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      c[section][key] = text
  if lr is not None:
    c.optim.learning_rate = float(lr)
  if arm.key is not None and value is not None:
    for k, v in zip(_keys(arm), value if isinstance(arm.key, tuple) else (value,)):
      section, key = k.split(".")
      c[section][key] = v
  if tuning:  # the test images and the OOD sets are never looked at while tuning
    c.eval.ood_corruptions = ()
    c.eval.ood_dataset = ""
    c.eval.test = False
  c.checkpoint.max_to_keep = 1
  return c


def _keys(arm: Arm) -> Tuple[str, ...]:
  return () if arm.key is None else arm.key if isinstance(arm.key, tuple) else (arm.key,)


def _get(d: Dict[str, Any], path: Sequence[str]) -> Any:
  for k in path:
    d = d.get(k) if isinstance(d, dict) else None
  return d


def val_score(metrics: Dict[str, Any]) -> float:
  """Validation class-IL final accuracy (%) of a run (``metrics.json['val']``).

  Raises:
    KeyError: the run has no validation metrics (``data.val_fraction`` was 0).
  """
  if "val" not in metrics:
    raise KeyError("metrics.json has no 'val' section: the run held out no validation split "
                   "(set data.val_fraction > 0, e.g. --val-fraction 0.1)")
  return float(metrics["val"]["final_accuracy"])


def _saved_as(workdir: str, config) -> bool:
  """Whether ``<workdir>/config.json`` exists and holds the same settings as ``config``."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    return False
  with open(cfg_path) as f:
    return same_settings(json.load(f), config)


def run_one(config, workdir: str) -> Dict[str, Any]:
  """Trains, resumes, or reads back (finished with the same settings) one run."""
  from cft_jax import train  # pylint: disable=g-import-not-at-top
  metrics_path = os.path.join(workdir, "metrics.json")
  if os.path.exists(metrics_path):
    if _saved_as(workdir, config):
      with open(metrics_path) as g:
        return json.load(g)
    return train.run(config, workdir, overwrite=True)
  try:
    return train.run(config, workdir)  # resumes an unfinished run of the same settings
  except train.ConfigMismatchError:    # an unfinished run of other settings: start over
    return train.run(config, workdir, overwrite=True)


DIVERGED = "diverged.txt"  # in a tuning run's folder: the run stopped on a non-finite loss


def tune_score(config, workdir: str) -> float:
  """The validation score of one tuning run (:func:`run_one`, :func:`val_score`); NaN for a run
  that diverged (``FloatingPointError``, a non-finite loss), which :func:`_common.select_best`
  counts as 0 — divergence at a learning rate is a result of the grid, not a reason to stop it.
  The divergence is remembered in ``<workdir>/diverged.txt`` (with the error) and read back while
  ``config.json`` there holds the same settings, so a rerun does not retrain it."""
  marker = os.path.join(workdir, DIVERGED)
  if os.path.exists(marker) and _saved_as(workdir, config):
    return float("nan")
  try:
    return val_score(run_one(config, workdir))
  except FloatingPointError as e:
    with open(marker, "w") as f:
      f.write(f"{e}\n")
    return float("nan")


def _setting_name(arm: Arm, lr: float, value: Any) -> str:
  vals = () if arm.key is None else value if isinstance(arm.key, tuple) else (value,)
  return f"lr{lr:g}" + "".join(f"_{k.split('.')[-1]}{v:g}" for k, v in zip(_keys(arm), vals))


def same_run_as(study: str, arm: Arm, value: Any, args) -> Optional[Arm]:
  """The arm of ``study`` whose runs ARE ``arm``'s runs at own value ``value``, or None.

  An arm with a tuned hyper-parameter (e.g. aEPG tuned tau, ``loss.tau``) contains, at the value
  its fixed twin uses (aEPG tau 6, same config and arg, no own grid), that twin's configuration
  exactly; those settings are not trained twice (the twin's tuning and final runs are used)."""
  if arm.key is None or value is None or isinstance(arm.key, tuple):
    return None
  section, key = arm.key.split(".")
  for other in study_arms(getattr(args, "dataset", "cifar10"), study):
    if (other.name != arm.name and other.key is None and (other.config, other.arg) ==
        (arm.config, arm.arg) and natural_config(other, 0, args)[section][key] == value):
      return other
  return None


_NICE = (1.0, 2.0, 3.0, 5.0)


def extend(grid: Sequence[float], side: str) -> float:
  """The value one step past the ``low`` / ``high`` end of a sorted numeric grid: the geometric
  step of the two values at that end (``g0^2 / g1``, ``g[-1]^2 / g[-2]``), snapped to the nearest
  ``{1, 2, 3, 5} x 10^k`` in log scale (3e-4, 1e-3 -> 1e-4; 1e-3, 3e-3 -> 1e-2; tau 6, 12 -> 20).

  Raises:
    ValueError: fewer than 2 values, a non-positive value, or ``side`` not low / high.
  """
  g = sorted(float(v) for v in grid)
  if len(g) < 2 or g[0] <= 0 or side not in ("low", "high"):
    raise ValueError(f"extend needs >= 2 positive values and side low/high, got {grid}, {side}")
  raw = g[0] * g[0] / g[1] if side == "low" else g[-1] * g[-1] / g[-2]
  e = math.floor(math.log10(raw))
  cands = [n * 10.0 ** k for k in (e - 1, e, e + 1) for n in _NICE]
  best = min(cands, key=lambda v: abs(math.log(v) - math.log(raw)))
  return float(f"{best:.6g}")


def _extension(arm: Arm, values: Sequence[Any], pick: Any, is_lr: bool) -> Optional[Tuple[str, Any]]:
  """``(side, new value)`` when ``pick`` sits at an edge of ``values`` (>= 2 numeric values);
  the arm's explicit ``extend`` values replace the geometric step for its own (scalar) grid."""
  nums = [v for v in values if isinstance(v, (int, float))]
  if len(nums) < 2 or len(nums) != len(values) or pick not in (min(nums), max(nums)):
    return None
  side = "low" if pick == min(nums) else "high"
  if not is_lr and arm.extend is not None and not isinstance(arm.key, tuple):
    new = arm.extend[0 if side == "low" else 1]
    return (side, new) if new not in nums else None
  return side, extend(nums, side)


class _Axis(NamedTuple):
  """One axis of a tuning grid over settings ``(lr, value)``: its ``name`` in the selected JSON
  (``extended`` / ``still_at_edge``), the value of a setting on it (``get``) and the setting with
  it replaced (``put``)."""
  name: str
  get: Callable[[Tuple[float, Any]], Any]
  put: Callable[[Tuple[float, Any], Any], Tuple[float, Any]]


def _axes(arm: Arm) -> List[_Axis]:
  """The axes a pick can sit at an edge of (protocol.md §2): the learning rate, then the arm's
  own hyper-parameter ("own"), or each component of a tuple of them (named by its config key,
  e.g. DER++'s ``method.alpha`` and ``method.beta``): each is extended on its own."""
  axes = [_Axis("learning_rate", lambda s: s[0], lambda s, v: (v, s[1]))]
  if isinstance(arm.key, tuple):
    for i, key in enumerate(arm.key):
      axes.append(_Axis(key, lambda s, i=i: s[1][i],
                        lambda s, v, i=i: (s[0], s[1][:i] + (v,) + s[1][i + 1:])))
  elif arm.key is not None:
    axes.append(_Axis("own", lambda s: s[1], lambda s, v: (s[0], v)))
  return axes


def _axis_values(scores: Dict[Tuple[float, Any], Any], axis: _Axis) -> List[Any]:
  """Every value run on ``axis`` (its grid with any extension), at whichever other settings: a
  pick on a learning rate added by an extension, where one own value ran, is still at the edge
  of its own grid."""
  return sorted({axis.get(k) for k in scores}, key=str)


def tune(study: str, arms: List[Arm], args, log) -> Dict[str, Any]:
  """Phase 1: the grid on the validation split with edge extension; writes the selected JSON."""
  spec = STUDIES[study]
  path = _out(args, study, "_selected.json")
  selected = _read_json(path)
  shared = _read_json(_out(args, spec["runs_under"], "_selected.json")) if "runs_under" in spec \
      else {}
  for arm in arms:  # recorded scores: the arm's own, else those of the study it shares runs with
    prior = {} if args.fresh else selected.get(arm.name) or shared.get(arm.name, {})
    scores: Dict[Tuple[float, Any], List[float]] = {}

    def run(lr, value):
      if (lr, value) in scores:
        return
      for seed in args.tune_seeds:
        scores.setdefault((lr, value), []).append(
            _tune_one(study, arm, lr, value, seed, prior, args, log))

    lrs = list(spec["lr_grid"])
    owns = list(args.grid.get(arm.name, arm.grid) or (None,))
    for lr, value in itertools.product(lrs, owns):
      run(lr, value)
    best = select_best(scores)
    extended = []
    for axis in _axes(arm):
      ext = _extension(arm, _axis_values(scores, axis), axis.get(best),
                       axis.name == "learning_rate")
      if ext is None:
        continue
      run(*axis.put(best, ext[1]))
      extended.append({"axis": axis.name if axis.name != "own" else ",".join(_keys(arm)),
                       "side": ext[0], "value": ext[1]})
      best = select_best(scores)
    lr, value = best
    at_edge = [axis.name for axis in _axes(arm)
               if _extension(arm, _axis_values(scores, axis), axis.get(best),
                             axis.name == "learning_rate")]
    selected = _read_json(path)  # re-read: other processes may tune disjoint --arms at once
    selected[arm.name] = {
        "learning_rate": lr, **({",".join(_keys(arm)): value} if arm.key else {}),
        "tune_seeds": list(args.tune_seeds), "val_fraction": args.val_fraction,
        **({"own_grid_reduced_to": list(args.grid[arm.name])} if arm.name in args.grid else {}),
        "extended": extended, "still_at_edge": at_edge,
        "val_class_il_final": {_setting_name(arm, l, v): s for (l, v), s in scores.items()},
        "tune_scores": {_setting_name(arm, l, v): {str(seed): x for seed, x in
                                                    zip(args.tune_seeds, s)}
                        for (l, v), s in scores.items()},
        # where each score of this session or a later one ran (absent: before 2026-12-07)
        **({"tune_cpu_ids": selected[arm.name]["tune_cpu_ids"]}
           if "tune_cpu_ids" in selected.get(arm.name, {}) else {})}
    _write_json(path, selected)
  return selected


def _recorded_tune_score(prior: Dict[str, Any], name: str, seed: int) -> Optional[float]:
  """The tuning score of setting ``name`` at ``seed`` recorded in an arm's entry of the
  selected JSON (``prior``), or None."""
  done = prior.get("tune_scores", {}).get(name, {})
  if str(seed) in done:
    return float(done[str(seed)])
  rec = prior.get("val_class_il_final", {}).get(name)  # selected JSONs of before tune_scores
  seeds = prior.get("tune_seeds", [])
  if rec is not None and seed in seeds and seeds.index(seed) < len(rec):
    return float(rec[seeds.index(seed)])
  return None


def _tune_one(study, arm, lr, value, seed, prior, args, log) -> float:
  """One tuning run's validation score: a recorded score (the selected JSON of an earlier call,
  same setting and seed; for a setting that IS a fixed twin's (:func:`same_run_as`), the twin's
  recorded score, whichever machine gave it) or the run (trained, resumed or read back)."""
  name = _setting_name(arm, lr, value)
  twin = same_run_as(study, arm, value, args)
  recorded = None
  if twin is not None and not args.fresh:  # the twin's score first: one setting, one score
    recorded = _recorded_tune_score(
        _read_json(_out(args, study, "_selected.json")).get(twin.name, {}),
        _setting_name(twin, lr, None), seed)
  if recorded is None:
    recorded = _recorded_tune_score(prior, name, seed)
  if recorded is not None:
    return recorded
  wd = os.path.join(args.workdir_root, args.dataset, STUDIES[study].get("runs_under", study),
                    "tune", *((twin.name, _setting_name(twin, lr, None)) if twin else
                              (arm.name, name)), f"seed{seed}")
  t = time.time()
  score = tune_score(natural_config(arm, seed, args, lr, value, tuning=True), wd)
  log(f"tune {arm.name} {name} seed {seed}: val class-IL final "
      f"{'diverged (scored 0)' if np.isnan(score) else f'{score:.2f}'} ({time.time() - t:.0f}s)")
  path = _out(args, study, "_selected.json")  # recorded at once: a study resumes across sessions
  selected = _read_json(path)
  selected.setdefault(arm.name, {}).setdefault("tune_scores", {}).setdefault(name, {})[
      str(seed)] = score
  # the machine the score came from (protocol section 4, machine changes): the run's own record,
  # else (a diverged run writes no metrics) this process's
  cpu = (_read_json(os.path.join(wd, "metrics.json")).get("provenance") or {}).get("cpu_id")
  selected[arm.name].setdefault("tune_cpu_ids", {}).setdefault(name, {})[str(seed)] = (
      cpu or provenance_lib.cpu_id())
  _write_json(path, selected)
  return score


def _write_json(path: str, data: Dict[str, Any]) -> None:
  """Writes ``data`` to ``path`` through a temporary file (an interrupted write leaves the old
  file, never half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def _read_json(path: str) -> Dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _own_value(arm: Arm, sel: Dict[str, Any]) -> Any:
  if arm.key is None:
    return None
  v = sel.get(",".join(_keys(arm)))
  return tuple(v) if isinstance(arm.key, tuple) and v is not None else v


def recorded_runs(path: str, keys: Dict[str, Any],
                  selected: Dict[str, Any]) -> Dict[Tuple[str, int], List[Dict[str, Any]]]:
  """The final runs recorded in a study's results JSON (``path``, written by :func:`report`)
  whose arm was run at the values selected now: ``{(arm, seed): [record, ...]}``, one record per
  block (:func:`block`: a seed's run re-run on another machine is kept beside the first, protocol
  section 4), in the file's order.

  A study spans sessions on a small machine and run folders are not kept, so the committed
  records stand in for runs whose folder is gone; a run recorded under another selection
  (learning rate or the arm's own value, ``keys[arm]``) is not reused. No file: ``{}``.
  """
  data = _read_json(path)
  old_sel = data.get("selected", {})
  out: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
  for r in data.get("runs", ()):  # a record's own settings, else the file's selection (older files)
    arm, now, then = r["arm"], selected.get(r["arm"]), r.get("settings") or old_sel.get(r["arm"])
    if arm in keys and now and then and all(
        now.get(k) == then.get(k) for k in ("learning_rate", keys[arm]) if k):
      _add_run(out.setdefault((arm, r["seed"]), []), r)
  return out


def block(prov: Optional[Dict[str, Any]]) -> Tuple[str, str, Optional[str]]:
  """The block a run belongs to: ``(code version, CPU model, cpu_id)`` (:func:`code_version`,
  :func:`machine`); a claim pairs the runs of one seed within one block (protocol section 4)."""
  return (*code_version(prov), machine(prov))


def _add_run(records: List[Dict[str, Any]], rec: Dict[str, Any]) -> None:
  """Appends ``rec`` to the records of one (arm, seed) unless one of its block is there (the same
  run read again, e.g. a shared arm's record copied into the sharing study's file)."""
  if all(block(r.get("provenance")) != block(rec.get("provenance")) for r in records):
    records.append(rec)


PROVENANCE_KEYS = ("code_commit", "commit", "cpu_model", "cpu_id", "dirty")
# Runs of these code commits compute the same numbers as the 2026-12-05 cifar10-mini runs, which
# predate provenance records (no record = this version): 0492029 is the last change of cft_jax/,
# configs/ and setup.cfg before them (the padding fix; every focal run came after it, and it left
# the other losses bitwise unchanged); LEGACY_CPU is the machine of those sessions.
LEGACY_CODE = "049202955c612a49a1e8e61bd6060eeeeef0ee10"
LEGACY_CPU = "AMD EPYC"
# Code commits that compute the numbers of an earlier one, each backed by exact re-runs
# (``--phase verify``, docs/results/<dataset>_reproduction.json; a test holds every entry to one):
EQUIVALENT_CODE: Dict[str, str] = {
    # configs/_natural.py refactor (resolved configs identical), the ':ce,dlcft' preset, the
    # resumed-run wall time, provenance's "dirty": Split Tiny-ImageNet ce_seq and ce_lae seed 0
    # re-ran every recorded number equal (2026-12-06, AMD EPYC).
    "094c1843f11a755b4ce1af32c720dca4858f7f54": "d4e2e4f9ed9f0bce90e8ffbb3db3adc60d84e8c7",
    # provenance records cpu_id: ce_seq seed 0 re-ran every recorded number equal on the machine
    # of the record (2026-12-07, AMD family 26 model 2).
    "a8961ee247149fe9948bf7c7774f402a79dc3f4a": "d4e2e4f9ed9f0bce90e8ffbb3db3adc60d84e8c7",
    # checkpoints keep the accuracy matrices unrounded (a resume's summaries): class_il_recipes
    # er_seq seed 6, an uninterrupted a8961ee run, re-ran every number equal on the machine of
    # the record (2026-12-07, AMD family 25 model 17).
    "dcb256e15547388923fee09f8b2f11bb5214976a": "a8961ee247149fe9948bf7c7774f402a79dc3f4a",
}
# Checkout commits whose runs recorded ``dirty: True`` before provenance's "dirty" looked at the
# code paths alone (cft_jax/provenance.py, 2026-12-06): the worktree they ran from, fixed at that
# commit, differed from it only in docs/results/tiny_imagenet_objectives_selected.json, the
# study's own selections written into the tracked tree (its `git status` listed that file alone;
# the code was the commit's). Their runs count as clean.
RESULTS_ONLY_DIRTY = frozenset({"bf59e93ea3852372a861223670390d24046f8f61"})


# Checkouts whose runs were recorded before provenance had ``cpu_id`` (2026-12-06) and whose
# machine is known: the processor generation on which the continuation checks of later sessions
# re-ran them with every number equal (docs/results/tiny_imagenet_reproduction.json, sessions of
# 2026-12-06 and 2026-12-07). The generation alone: the flag list was not recorded then.
LEGACY_CPU_IDS: Dict[str, str] = {
    "bf59e93ea3852372a861223670390d24046f8f61": "AuthenticAMD family 26 model 2 stepping 1",
}


def machine(prov: Optional[Dict[str, Any]]) -> Optional[str]:
  """The ``cpu_id`` a run pairs on (protocol section 4): its record, else the machine of its
  checkout in :data:`LEGACY_CPU_IDS`, else None (unknown: it pairs on the model name alone)."""
  prov = prov or {}
  return prov.get("cpu_id") or LEGACY_CPU_IDS.get(prov.get("commit") or "")


def same_machine(a: Optional[str], b: Optional[str]) -> bool:
  """Whether two :func:`machine` values may be the same processor: equal, or one unknown (None),
  or the same ``"<vendor> family <f> model <m> stepping <s>"`` where one lacks the flag list."""
  if a is None or b is None or a == b:
    return True
  (ga, _, fa), (gb, _, fb) = a.partition(";"), b.partition(";")
  return ga.strip() == gb.strip() and not (fa.strip() and fb.strip())


def code_version(prov: Optional[Dict[str, Any]], equivalent: bool = True) -> Tuple[str, str]:
  """``(code commit, CPU model)`` a run pairs on: its provenance record (a dirty checkout counts
  as its own version, but see :data:`RESULTS_ONLY_DIRTY`), or the legacy version for a run that
  has none (:data:`LEGACY_CODE`); with ``equivalent`` a commit listed in :data:`EQUIVALENT_CODE`
  counts as the commit it computes the same numbers as, followed along the chain (each entry is
  backed by a re-run against the commit it names, which may itself be listed)."""
  if not prov:
    return LEGACY_CODE, LEGACY_CPU
  code = prov.get("code_commit") or "unknown"
  dirty = prov.get("dirty") and prov.get("commit") not in RESULTS_ONLY_DIRTY
  seen = {code}
  while equivalent and EQUIVALENT_CODE.get(code, code) not in seen:
    code = EQUIVALENT_CODE[code]
    seen.add(code)
  code += "+dirty" if dirty else ""
  return code, prov.get("cpu_model") or "unknown"


def images_per_step(cfg) -> int:
  """Images a training step processes: the batch plus the replayed buffer examples (ER, DER,
  DLCFT: one replay batch; DER++: two)."""
  from cft_jax.config import validate_config  # pylint: disable=g-import-not-at-top
  cfg = validate_config(cfg)  # the method's own defaults (e.g. replay_batch_size) filled in
  images = int(cfg.train.batch_size)
  if cfg.method.name in ("er", "der", "derpp") or (cfg.method.name == "dlcft"
                                                   and cfg.method.buffer_size > 0):
    images += int(cfg.method.replay_batch_size) * (2 if cfg.method.name == "derpp" else 1)
  return images


def _settings(arm: Arm, sel: Dict[str, Any]) -> Dict[str, Any]:
  """The selected values a final run of ``arm`` ran at: ``{"learning_rate", <own key>}``."""
  own = ",".join(_keys(arm))
  return {"learning_rate": sel.get("learning_rate"), **({own: sel.get(own)} if own else {})}


def _record(arm: Arm, seed: int, wd: str, m: Dict[str, Any], sel: Dict[str, Any]
            ) -> Dict[str, Any]:
  prov = m.get("provenance") or {}
  return {"arm": arm.name, "seed": seed, "workdir": os.path.relpath(wd, ROOT),
          "settings": _settings(arm, sel),
          "provenance": {k: prov.get(k) for k in PROVENANCE_KEYS} if prov else None,
          "metrics": {k: m.get(k) for k in ("final_accuracy", "avg_incremental_accuracy",
                                            "forgetting", "task_il", "val", "ood",
                                            "wall_time_s")}}


def _recorded(study: str, selected: Dict[str, Any], args) -> Dict[Tuple[str, int], List[Dict]]:
  """The final runs recorded for ``study`` at the ``selected`` values (:func:`recorded_runs`):
  those of the study whose runs it shares first, then its own (a run of a block already there is
  the same run)."""
  keys = {a.name: ",".join(_keys(a)) or None for a in study_arms(args.dataset, study)}
  out = recorded_runs(_out(args, STUDIES[study].get("runs_under", study)), keys, selected)
  if STUDIES[study].get("runs_under", study) != study:
    for key, recs in recorded_runs(_out(args, study), keys, selected).items():
      for r in recs:
        _add_run(out.setdefault(key, []), r)
  return out


def run_seeds(study: str, arms: List[Arm], selected: Dict[str, Any], seeds: Sequence[int], args,
              log, train: bool = True) -> List[Dict]:
  """Every arm of the study at its selected values for ``seeds``: ``arms`` are trained where
  needed; the other arms' finished runs (same settings) and the runs recorded in the committed
  ``<out>/<dataset>_<study>.json`` at the same selected values are kept without training, so a
  report never drops runs an earlier call committed. One record per finished run (an (arm, seed)
  may have several, one per block: with ``args.pair_here`` the ``arms`` whose run of a seed was
  recorded on another machine or code train it again here where a claim needs it to pair,
  :func:`pair_here_needed`; protocol section 4)."""
  runs: List[Dict[str, Any]] = []
  names = {a.name for a in arms}
  every = study_arms(args.dataset, study)
  prior = {} if args.fresh else _recorded(study, selected, args)
  for seed in seeds:  # seed-major: an interrupted phase has every arm at the first seeds
    for arm in every:
      runs += _final_one(study, arm, seed, selected, prior, args, log,
                         train and arm.name in names and args.phase != "report", names)
  return runs


def _source(study: str, arm: Arm, selected: Dict[str, Any], args) -> str:
  """The arm whose final runs are ``arm``'s at its selected values: its twin
  (:func:`same_run_as`) where the twin was selected at the same learning rate, else itself."""
  sel = selected.get(arm.name) or {}
  twin = same_run_as(study, arm, _own_value(arm, sel), args) if "learning_rate" in sel else None
  if twin is not None and selected.get(twin.name, {}).get("learning_rate") != sel["learning_rate"]:
    twin = None  # the twin was selected at another lr: its final runs are other settings
  return twin.name if twin else arm.name


def _recorded_here(records: Sequence[Dict[str, Any]]) -> bool:
  """Whether one of ``records`` ran on this machine and code (:func:`_same_block`)."""
  here = {"provenance": provenance_lib.provenance()}
  return any(_same_block(r, here) for r in records)


def pair_here_needed(study: str, arm: Arm, seed: int, selected: Dict[str, Any],
                     prior: Dict[Tuple[str, int], List[Dict]], names: Sequence[str], args) -> bool:
  """``--pair-here`` (protocol section 4): whether ``arm``'s run of ``seed``, recorded only on
  another machine or code, trains again here. It does when a registered claim over ``arm`` does
  not pair at ``seed`` in the recorded runs (``prior``, :func:`_pick_seed`) while each of the
  claim's other arms trains in this call (``names``) or has its run of ``seed`` recorded on this
  machine and code, so that training it here completes the claim's pair. A seed already paired
  (e.g. every arm of its claims on the records' machine) is not trained twice, and a claim
  whose partner has no run here and none coming does not make ``arm`` train.

  Args:
    prior: ``{(arm, seed): [record, ...]}`` (:func:`_recorded`); names: the arms trained now.
  """
  by_name = {a.name: a for a in study_arms(args.dataset, study)}

  def recs(name: str) -> List[Dict[str, Any]]:
    a = by_name.get(name)
    return [] if a is None else [{**r, "arm": name} for r in
                                 prior.get((_source(study, a, selected, args), seed), ())]

  for c in claims_lib.for_study(args.dataset, study):
    arms = tuple(c.better) + tuple(c.worse)
    if arm.name not in arms or not all(
        a == arm.name or a in names or _recorded_here(recs(a)) for a in arms):
      continue
    if _pick_seed([r for a in arms for r in recs(a)], arms) is None:
      return True
  return False


def _final_one(study, arm, seed, selected, prior, args, log, train,
               names: Sequence[str] = ()) -> List[Dict[str, Any]]:
  sel = selected.get(arm.name)
  if sel is None or "learning_rate" not in sel:  # not tuned, or its tuning runs not all done
    if train:
      raise KeyError(f"no selected values for arm {arm.name!r}: run --phase tune first")
    return []
  value = _own_value(arm, sel)
  src = _source(study, arm, selected, args)
  wd = os.path.join(args.workdir_root, args.dataset, STUDIES[study].get("runs_under", study),
                    "final", src, f"seed{seed}")
  cfg = natural_config(arm, seed, args, sel["learning_rate"], value)
  finished = os.path.exists(os.path.join(wd, "metrics.json")) and _saved_as(wd, cfg)
  earlier = [{**r, "arm": arm.name} for r in prior.get((src, seed), ())]  # same settings
  if earlier and not finished and not (
      train and getattr(args, "pair_here", False)
      and not _recorded_here(earlier)
      and pair_here_needed(study, arm, seed, selected, prior, names or (arm.name,), args)):
    return earlier
  if not train and not finished:
    return earlier
  t = time.time()
  m = run_one(cfg, wd) if train else _read_json(os.path.join(wd, "metrics.json"))
  rec = _record(arm, seed, wd, m, sel)
  if train:
    log(f"final {arm.name} seed {seed}: class-IL final {m['final_accuracy']:.2f}, task-IL "
        f"{m['task_il']['final_accuracy']:.2f} ({time.time() - t:.0f}s)")
    if args.phase in ("final", "all"):  # pilot runs go to the pilot's own file, not the study's
      _persist(study, rec, args)
  out = list(earlier)
  _add_run(out, rec)
  return out


def _persist(study: str, rec: Dict[str, Any], args) -> None:
  """Adds one finished final run to ``<out>/<dataset>_<study>.json`` at once (replacing an
  earlier record of the same arm, seed and block, :func:`block`), so a study stopped mid-phase
  keeps every finished run in the committed file; the report rewrites the file whole."""
  path = _out(args, study)
  data = _read_json(path)
  key = (rec["arm"], rec["seed"], block(rec.get("provenance")))
  data["runs"] = [r for r in data.get("runs", ())
                  if (r["arm"], r["seed"], block(r.get("provenance"))) != key] + [rec]
  _write_json(path, data)


def _leaves(d: Any, path: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
  if not isinstance(d, dict):
    return {path: d}
  return {k: v for key, sub in d.items() for k, v in _leaves(sub, path + (key,)).items()}


def verify(study: str, arms: List[Arm], selected: Dict[str, Any], seeds: Sequence[int], args,
           log) -> List[Dict[str, Any]]:
  """Re-runs recorded final runs at this checkout and checks that they reproduce exactly.

  Each ``(arm, seed)`` is trained again from scratch at its selected values (in
  ``<workdir_root>/<dataset>/<study>/verify/``, an earlier verify run there is deleted, never
  read back) and every number of the recorded run's metrics
  (class-IL final, average incremental, forgetting, task-IL and validation accuracies; not the
  wall time) is compared for exact equality. The checks are appended to
  ``<out>/<dataset>_reproduction.json`` with both runs' ``(code commit, CPU model)``: an equal
  re-run at another code commit is the evidence that lets :data:`EQUIVALENT_CODE` pair the two
  commits' runs (a test holds every entry to such a record).

  Returns:
    One check per run: ``{"study", "arm", "seed", "recorded": [code, cpu], "rerun": [code, cpu],
    "equal": bool, "differences": {"a.b": [recorded, rerun]}, "cpu_ids": [recorded, rerun]}``
    (:func:`machine`).

  Raises:
    KeyError: an arm has no selected values or no recorded final run at a seed.
  """
  prior = _recorded(study, selected, args)
  checks = []
  for seed in seeds:
    for arm in arms:
      sel = selected.get(arm.name)
      if sel is None or "learning_rate" not in sel or (arm.name, seed) not in prior:
        raise KeyError(f"{arm.name} has no recorded final run at seed {seed} to verify "
                       f"(recorded: {sorted(s for a, s in prior if a == arm.name)})")
      rec = prior[(arm.name, seed)][0]  # the first recorded (a later one: another block)
      wd = os.path.join(args.workdir_root, args.dataset, study, "verify", arm.name, f"seed{seed}")
      if os.path.exists(wd):  # verify's own scratch run: never read back, this machine trains it
        shutil.rmtree(wd)
      cfg = natural_config(arm, seed, args, sel["learning_rate"], _own_value(arm, sel))
      new = _record(arm, seed, wd, run_one(cfg, wd), sel)
      got = _leaves(new["metrics"])
      diff = {".".join(k): [v, got.get(k)] for k, v in _leaves(rec["metrics"]).items()
              if k != ("wall_time_s",) and v is not None and got.get(k) != v}
      check = {"study": study, "arm": arm.name, "seed": seed,
               "recorded": list(code_version(rec.get("provenance"), equivalent=False)),
               "rerun": list(code_version(new["provenance"], equivalent=False)), "equal": not diff,
               # the machines: an equal re-run on the same one backs a code equivalence; a
               # difference on another one says nothing about the code
               "cpu_ids": [machine(rec.get("provenance")), machine(new["provenance"])],
               "differences": diff}
      log(f"verify {arm.name} seed {seed}: {'equal' if not diff else f'DIFFERS {diff}'} "
          f"(recorded at {check['recorded']}, re-run at {check['rerun']})")
      path = _out(args, "reproduction")
      data = _read_json(path)
      data["checks"] = data.get("checks", []) + [check]
      _write_json(path, data)
      checks.append(check)
  return checks


def claim_scores(runs: List[Dict[str, Any]], claim: claims_lib.Claim) -> Dict[str, Dict[int, float]]:
  """``{arm: {seed: score}}`` of the claim's arms (its metric, finished runs only)."""
  out: Dict[str, Dict[int, float]] = {}
  for r in runs:
    if r["arm"] in claim.better + claim.worse:
      v = _get(r["metrics"], claim.metric)
      if v is not None and np.isfinite(v):
        out.setdefault(r["arm"], {})[r["seed"]] = float(v)
  return out


def compare(runs: List[Dict[str, Any]], claim: claims_lib.Claim,
            seed_set: Sequence[int]) -> Dict[str, Any]:
  """One registered claim on the registered seeds: the paired differences ``better - worse``
  (a group side: its arms' per-seed mean), 95% t and bootstrap intervals and the power line;
  ``status`` ``"complete"``, ``"incomplete"`` (an arm lacks a registered seed) or ``"unpaired"``
  (a seed's runs come from different code commits or machines, :func:`machine`: re-run that
  seed's runs together; ``unpaired_seeds`` lists them). ``blocks`` lists the (code, CPU model,
  cpu_id) of each group of seeds: the seeds of one claim may come from different machines, each
  seed's difference from one (protocol section 4, machine changes).

  Raises:
    UnregisteredClaimError: ``claim`` is not the registered one, or an arm ran unregistered seeds.
  """
  claims_lib.check_registered(claim)
  arms = claim.better + claim.worse
  mine = [r for r in runs if r["arm"] in arms and r["seed"] in seed_set]
  pair = claims_lib.paired_scores(claim, claim_scores(mine, claim), seed_set)
  out: Dict[str, Any] = {"id": claim.id, "seeds": list(seed_set), "status": "complete",
                         # the same test: same metric, kind and margin on the same runs
                         "same_as": f"{'.'.join(claim.metric)} {claim.kind} {claim.margin:g}: "
                         + "|".join(sorted({r["workdir"].rsplit("/", 1)[0]
                                                     for r in mine if r["arm"] in claim.better}))
                         + " vs " + "|".join(sorted({r["workdir"].rsplit("/", 1)[0]
                                                     for r in mine if r["arm"] in claim.worse}))}
  if pair is None:
    have = {a: sorted({r["seed"] for r in mine if r["arm"] == a}) for a in arms}
    out.update(status="incomplete", missing={a: sorted(set(seed_set) - set(s))
                                             for a, s in have.items() if set(s) != set(seed_set)})
    return out
  prov = sorted({code_version(r.get("provenance")) for r in mine}, key=str)
  out["provenance"] = [list(p) for p in prov]
  # the processor's generation and instruction set where recorded (runs before 2026-12-06 have
  # the model name alone, which a virtual machine may give as just "AMD EPYC")
  cpu_ids = sorted({machine(r.get("provenance")) for r in mine} - {None})
  if cpu_ids:
    out["cpu_ids"] = cpu_ids
  # pairing is seed by seed (protocol section 4, machine changes): a seed's runs form one block
  # (code version, cpu_id); different seeds may come from different blocks
  blocks: Dict[Tuple[str, str, Optional[str]], List[int]] = {}
  split, picked = [], []
  for seed in seed_set:
    got = _pick_seed([r for r in mine if r["seed"] == seed], arms)
    if got is None:
      split.append(seed)
      continue
    picked += got
    cpu = max((machine(r.get("provenance")) for r in got), key=lambda c: len(c or ""))
    blocks.setdefault((*code_version(got[0].get("provenance")), cpu), []).append(seed)
  out["blocks"] = [{"code": k[0], "cpu_model": k[1], "cpu_id": k[2], "seeds": v}
                   for k, v in blocks.items()]
  if split:
    out.update(status="unpaired", unpaired_seeds=split)
    return out
  pair = claims_lib.paired_scores(claim, claim_scores(picked, claim), seed_set)
  a, b = pair
  d = stats.paired_differences(a, b)
  out.update(stats.paired_t_interval(a, b))
  out["bootstrap"] = list(stats.paired_bootstrap_interval(a, b))
  out["d"] = [float(x) for x in d]
  return out


def _same_block(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
  """Whether two run records may pair: the same code version and :func:`same_machine`."""
  pa, pb = a.get("provenance"), b.get("provenance")
  return code_version(pa) == code_version(pb) and same_machine(machine(pa), machine(pb))


def _pick_seed(rs: List[Dict[str, Any]], arms: Sequence[str]) -> Optional[List[Dict[str, Any]]]:
  """The runs of one seed that a claim over ``arms`` pairs: one per arm, all of one block. With
  runs of several blocks (a seed re-run on another machine, ``--pair-here``) the first run in
  record order that completes a block anchors it (the earlier record wins: a fixed rule, not a
  choice after seeing the numbers). None: no block holds every arm (the seed is unpaired)."""
  for anchor in rs:
    got: List[Dict[str, Any]] = []
    for a in arms:
      r = next((r for r in rs if r["arm"] == a and _same_block(r, anchor)
                and all(_same_block(r, g) for g in got)), None)
      if r is None:
        break
      got.append(r)
    else:
      return got
  return None


def first_runs(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One record per (arm, seed), the first (the per-arm summaries: a run re-run on another
  machine for pairing is not a second sample)."""
  seen, out = set(), []
  for r in runs:
    if (r["arm"], r["seed"]) not in seen:
      seen.add((r["arm"], r["seed"]))
      out.append(r)
  return out


def report(study: str, selected: Dict[str, Any], runs: List[Dict], args, wall_s: float) -> str:
  """Phase 4: writes ``<dataset>_<study>.md`` and ``.json``; returns the markdown."""
  arms = study_arms(args.dataset, study)
  seed_set = list(args.seeds or claims_lib.seeds(args.dataset, study))
  results = [compare(runs, c, seed_set) for c in claims_lib.for_study(args.dataset, study)]
  verdicts = claims_lib.verdicts(args.dataset, args.out, override={r["id"]: r for r in results})
  for r in results:
    r.update(verdicts.get(r["id"], {}))
  lines = _report_head(study, arms, selected, runs, seed_set, args)
  lines += _claims_table(results)
  lines += _blocks_lines(results)
  run_s = sum(r["metrics"].get("wall_time_s") or 0.0 for r in runs)
  lines += ["", stats_rule_text(), "", f"Final runs: {len(runs)}, {run_s / 60:.0f} min of "
            "training wall time in all (2-core CPU; other jobs may have shared it)"
            + (f"; this invocation: {wall_s / 60:.1f} min." if args.phase != "report" else "."),
            ""]
  text = "\n".join(lines)
  with open(_out(args, study, ".md"), "w") as f:
    f.write(text)
  _write_json(_out(args, study), {"dataset": args.dataset, "study": study, "seeds": seed_set,
                                   "selected": selected, "claims": results, "runs": runs})
  return text


def stats_rule_text() -> str:
  """The verdict rule, in one paragraph (the same words in every report)."""
  return ("Verdicts (`studies/stats.py`, protocol §5): one-sided t tests at 2.5% on the paired "
          "differences, against 0 and against the claim's margin (the paper's effect): "
          "**reproduced** (a gain), **no gain >= margin** (a gain as large as the paper's is "
          "excluded), **worse than the baseline** (a significant loss), **inconclusive**; "
          "non-inferiority claims: reproduced / worse by >= margin. *Raw*: each claim alone "
          "(its 95% interval); *Holm*: Holm's step-down correction within the claim's family "
          "(every registered claim of the family counts, run or not). Seeds needed: pairs at "
          "the observed std for a verdict whatever the mean (raw / at the family's Bonferroni "
          "level, Holm's worst step).")


def _report_head(study, arms, selected, runs, seed_set, args) -> List[str]:
  spec = STUDIES[study]
  fmt = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}" if np.isfinite(ms[0]) else "—"  # noqa: E731
  single, data_il = spec.get("single_task", False), spec.get("data_il", False)
  head = ("| arm | selected (lr, own) | seeds | ID accuracy (test) | val ID accuracy | OOD "
          "corruption mean | ID - OOD drop | wall / run (min, median) | images / step |" if single else
          "| arm | selected (lr, own) | seeds | final accuracy (all classes) | avg incremental | "
          "val final accuracy | forgetting | wall / run (min, median) | images / step |" if data_il else
          "| arm | selected (lr, own) | seeds | class-IL final | avg incremental | task-IL final "
          "| val class-IL final | forgetting | wall / run (min, median) | images / step |")
  lines = [f"# {study} on {DATASETS[args.dataset]['label']}: the {spec['paper']} claims under "
           "the registered protocol", "",
           "Protocol: `docs/results/protocol.md`; claims, margins and seeds: "
           "`docs/results/claims.md`. Command: `python studies/natural_images.py --dataset "
           f"{args.dataset} --study {study}`. Selected values: `{args.dataset}_{study}_selected"
           ".json`. Scores in %; mean ± sample std over the registered final seeds "
           f"{seed_set} (test images).", "", setup_line(arms, selected, args), "",
           head, "|---" * head.count(" | ") + "|---|"]
  for arm in arms:
    rs = [r for r in first_runs(runs) if r["arm"] == arm.name and r["seed"] in seed_set]
    if not rs:
      continue
    ms = [r["metrics"] for r in rs]
    sel = selected.get(arm.name, {})
    own = "".join(f", {k.split('.')[-1]} {v:g}" for k, v in
                  zip(_keys(arm), (_own_value(arm, sel),) if not isinstance(arm.key, tuple)
                      else (_own_value(arm, sel) or ())) if v is not None)
    if single:
      cols = [m["final_accuracy"] for m in ms], [_get(m, ("val", "final_accuracy")) for m in ms], \
          [_get(m, ("ood", "corruption_mean")) for m in ms], \
          [_get(m, ("ood", "id")) - _get(m, ("ood", "corruption_mean")) for m in ms
           if _get(m, ("ood", "corruption_mean")) is not None]
    else:
      cols = [m["final_accuracy"] for m in ms], [m["avg_incremental_accuracy"] for m in ms], \
          *([] if data_il else [[_get(m, ("task_il", "final_accuracy")) for m in ms]]), \
          [_get(m, ("val", "final_accuracy")) for m in ms], [m.get("forgetting") for m in ms]
    # the median: one run slowed by a job sharing the CPU (or, before train.py summed a resumed
    # run's invocations, one resumed from a checkpoint) does not move it
    walls = [m["wall_time_s"] / 60 for m in ms if m.get("wall_time_s")]
    wall = float(np.median(walls)) if walls else float("nan")
    images = images_per_step(natural_config(arm, 0, args, sel.get("learning_rate"),
                                            _own_value(arm, sel)))
    lines.append(f"| {arm.label} | {sel.get('learning_rate', float('nan')):g}{own} | {len(rs)} | "
                 + " | ".join(fmt(mean_std(c)) for c in cols)
                 + f" | {wall:.1f} | {images} |")
  return lines


def _claims_table(results: List[Dict[str, Any]]) -> List[str]:
  reg = claims_lib.by_id()
  first = {}
  for r in results:
    if r["status"] == "complete":
      first.setdefault(r["same_as"], reg[r["id"]].text)
  lines = ["", "| claim | family | margin | seeds | paired difference (mean ± std) | 95% t interval "
           "| 95% bootstrap | raw verdict | Holm-adjusted verdict (p) | seeds needed (raw / Holm) |",
           "|---" * 10 + "|"]
  for r in results:
    c = reg[r["id"]]
    if r["status"] != "complete":
      why = (f"incomplete: missing seeds {r['missing']}" if r["status"] == "incomplete" else
             f"unpaired: seeds {r.get('unpaired_seeds')} ran the two sides on different "
             f"commits / CPUs {r.get('provenance')}"
             f"{' ' + str(r['cpu_ids']) if len(r.get('cpu_ids', ())) > 1 else ''}; re-run each "
             "such seed's runs together")
      lines.append(f"| {c.text} | {c.family} | {c.margin:g} | — | {why} | | | | | |")
      continue
    need = r.get("seeds_needed") or {}
    same = first[r["same_as"]]
    lines.append(
        f"| {c.text}{f' (the same runs as: {same}; one test)' if same != c.text else ''} | {c.family} | {c.margin:g} | {r['n']} | {r['mean']:+.2f} ± {r['std']:.2f} | "
        f"[{r['lo']:+.2f}, {r['hi']:+.2f}] | [{r['bootstrap'][0]:+.2f}, {r['bootstrap'][1]:+.2f}]"
        f" | {r.get('raw')} | **{r.get('holm')}** ({r.get('p_holm', float('nan')):.3g}) | "
        f"{need.get('raw') or '>1000'} / {need.get('holm') or '>1000'} |")
  return lines


def _blocks_lines(results: List[Dict[str, Any]]) -> List[str]:
  """Where a claim's seeds ran on more than one machine or code version (protocol section 4,
  machine changes): one line per such claim, its blocks with their seeds."""
  reg = claims_lib.by_id()
  lines = [f"* {reg[r['id']].text}: " + "; ".join(
      f"seeds {b['seeds']} on {b['cpu_id'] or b['cpu_model']} (code {b['code'][:7]})"
      for b in r["blocks"]) for r in results if len(r.get("blocks", ())) > 1]
  return ["", "Claims whose seeds ran on several machines (each seed's pair on one):"] + lines \
      if lines else []


def setup_line(arms: List[Arm], selected: Dict[str, Any], args) -> str:
  """One line: the runs' budget (from the first arm's config), tuning seeds and edge status."""
  c = natural_config(arms[0], 0, args)
  seeds = sorted({s for a in arms for s in selected.get(a.name, {}).get("tune_seeds", ())})
  limit = (f"{c.data.train_limit} training images per task" if c.data.train_limit
           else "every training image")
  reduced = "; ".join(f"{a.name}'s own grid reduced to {selected[a.name]['own_grid_reduced_to']}"
                      for a in arms if "own_grid_reduced_to" in selected.get(a.name, {}))
  edges = ", ".join(f"{a.name} ({'/'.join(selected[a.name]['still_at_edge'])})" for a in arms
                    if selected.get(a.name, {}).get("still_at_edge"))
  # tuning that went on on another machine (protocol section 4): how many scores name theirs
  moved = ", ".join(
      f"{a.name} {sum(len(v) for v in ids.values())} of "
      f"{sum(len(v) for v in selected[a.name].get('tune_scores', {}).values())} scores on "
      f"{len({c for v in ids.values() for c in v.values()})} recorded machine(s)"
      for a in arms for ids in [selected.get(a.name, {}).get("tune_cpu_ids")] if ids)
  moved = ("; tuning by machine (tune_cpu_ids; the other scores: the machine of the records, "
           "before 2026-12-07): " + moved) if moved else ""
  caveat = (" Tiny-ImageNet's images come from ImageNet's training set, on which the Lite0 "
            "weights were pretrained: the frozen features already separate these classes."
            if args.dataset == "tiny_imagenet" else "")
  return (f"Setup (the budget every verdict is worded at): {c.model.name} (PEFT: {c.peft.name}), "
          f"{c.data.image_size} px, {c.scenario.num_tasks} tasks, {limit} "
          f"({c.data.val_fraction:.0%} held out for validation), {c.train.epochs} epoch(s) per "
          f"task, batch {c.train.batch_size}; tuning seeds {seeds}"
          f"{' (the protocol: [100, 101])' if seeds != [100, 101] else ''}"
          f"{'; ' + reduced if reduced else ''}"
          f"{'; picks still at a grid edge after one extension: ' + edges if edges else ''}"
          f"{moved}." + caveat)


def pilot(study: str, arms: List[Arm], selected: Dict[str, Any], args, log) -> str:
  """Phase 2: ``arms`` with the pilot seeds; per registered claim whose arms all ran, the paired
  std and the seeds its margin needs (raw and at its family's size). Writes
  ``<dataset>_<study>_pilot.{json,md}``."""
  seeds = list(claims_lib.PILOT_SEEDS)
  runs = [r for r in run_seeds(study, arms, selected, seeds, args, log)
          if r["arm"] in {a.name for a in arms}]
  out, lines = [], [f"# Pilot of {study} on {DATASETS[args.dataset]['label']}", "",
                    f"Seeds {seeds} (not final seeds), arms at their selected values. Paired std "
                    "of each registered claim whose arms ran, and the seeds its margin needs "
                    "(`stats.seeds_needed`: a verdict whatever the mean).", "",
                    "| claim | margin | paired differences | std | seeds needed raw | "
                    "seeds needed (Holm, family size) |", "|---|---|---|---|---|---|"]
  for c in claims_lib.for_study(args.dataset, study):
    sc = claim_scores(runs, c)
    if not all(set(sc.get(a, {})) >= set(seeds) for a in c.better + c.worse):
      continue
    side = lambda g: [float(np.mean([sc[a][s] for a in g])) for s in seeds]  # noqa: E731
    d = stats.paired_differences(side(c.better), side(c.worse))
    std, m = float(d.std(ddof=1)), len(claims_lib.family(args.dataset, c.family))
    need = (stats.seeds_needed(std, c.margin), stats.seeds_needed(std, c.margin, family_size=m))
    out.append({"id": c.id, "d": d.tolist(), "std": std, "seeds_needed_raw": need[0],
                "seeds_needed_holm": need[1], "family_size": m})
    lines.append(f"| {c.text} | {c.margin:g} | {', '.join(f'{x:+.2f}' for x in d)} | {std:.2f} | "
                 f"{need[0] or '>1000'} | {need[1] or '>1000'} ({m}) |")
  with open(_out(args, study, "_pilot.json"), "w") as f:
    json.dump({"seeds": seeds, "claims": out, "runs": runs}, f, indent=1)
  text = "\n".join(lines + [""])
  with open(_out(args, study, "_pilot.md"), "w") as f:
    f.write(text)
  return text


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", choices=sorted(DATASETS), default="tiny_imagenet")
  p.add_argument("--study", choices=sorted(STUDIES), default="objectives")
  p.add_argument("--phase", choices=("all", "tune", "pilot", "final", "report", "verify"),
                 default="all", help="verify: re-run recorded final runs of --arms (--seeds, "
                 "default the first registered seed) and check they reproduce exactly")
  p.add_argument("--arms", nargs="+", default=None,
                 help="subset of the study's arms to tune and train (the report still covers "
                 "every arm with finished or recorded runs)")
  p.add_argument("--tune-seeds", nargs="+", type=int, default=list(claims_lib.TUNE_SEEDS))
  p.add_argument("--seeds", nargs="+", type=int, default=None,
                 help="final seeds (default: the study's registered set, studies/claims.py; "
                 "another set only for smoke runs with their own --out)")
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--data-root", default="", help="the dataset elsewhere (default: the config's)")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
  p.add_argument("--workdir-root", default=os.path.join(ROOT, "runs", "natural_images"))
  p.add_argument("--jax-cache", default=os.path.join(ROOT, "runs", "natural_images", "jax_cache"))
  p.add_argument("--dry-run", action="store_true",
                 help="print the run counts, what is recorded and what is left, and exit")
  p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                 help="any other config value for every run (repeatable; e.g. a smoke test with "
                 "--set model.name=tiny_cnn --set model.pretrained=False)")
  p.add_argument("--pair-here", action="store_true",
                 help="phase final: train the --arms' runs of the seeds again on this machine "
                 "and code where their recorded run came from another and a claim needs it to "
                 "pair that seed with the --arms trained here (a claim pairs each seed within "
                 "one machine, protocol section 4; a seed already paired is not re-run); the "
                 "earlier record stays")
  p.add_argument("--fresh", action="store_true",
                 help="do not reuse runs recorded in <out>/<dataset>_<study>.json or tuning "
                 "scores recorded in the selected JSON")
  p.add_argument("--grid", action="append", default=[], metavar="ARM=V1,V2",
                 help="a smaller own-hyper-parameter grid for ARM (repeatable; a deviation from "
                 "the protocol's budget, recorded in the selected JSON)")
  add_override_args(p, "per task")
  args = p.parse_args(argv)
  try:
    args.grid = {k: tuple(ast.literal_eval(v) for v in vals.split(","))
                 for k, _, vals in (g.partition("=") for g in args.grid)}
  except (ValueError, SyntaxError):
    p.error(f"--grid takes ARM=V1,V2 (numbers), got {args.grid}")
  if args.study not in DATASETS[args.dataset]["studies"]:
    p.error(f"study {args.study} is not run on {args.dataset}; its studies: "
            f"{DATASETS[args.dataset]['studies']}")
  return p, args


def plan(study: str, arms: List[Arm], args) -> str:
  """What is left of ``study`` for ``arms`` (``--dry-run``): per arm the tuning runs and the
  registered final runs already recorded in the committed JSONs, out of those the protocol
  needs (edge extensions not counted: they depend on the picks), and the CPU time left at the
  median wall time of the study's recorded final runs.

  Returns:
    Lines of text, one per arm and a total.
  """
  spec = STUDIES[study]
  selected = _read_json(_out(args, study, "_selected.json"))
  shared = _read_json(_out(args, spec["runs_under"], "_selected.json")) if "runs_under" in spec \
      else {}
  selected = {**shared, **selected}  # as tune() reads them: the arm's own, else the shared study's
  recorded = _recorded(study, selected, args)
  seeds = list(args.seeds or claims_lib.SEEDS.get((args.dataset, study), ()))
  lines, left = [], 0
  for arm in arms:
    settings = [(lr, v) for lr in spec["lr_grid"]
                for v in args.grid.get(arm.name, arm.grid) or (None,)
                if same_run_as(study, arm, v, args) is None]  # a twin's settings: its twin's
    prior = selected.get(arm.name, {})
    tune_done = sum(_recorded_tune_score(prior, _setting_name(arm, lr, v), seed) is not None
                    for lr, v in settings for seed in args.tune_seeds)
    n_tune = len(settings) * len(args.tune_seeds)
    final_done = sum((arm.name, seed) in recorded for seed in seeds)
    left += n_tune - tune_done + len(seeds) - final_done
    lines.append(f"  {arm.name}: tune {tune_done}/{n_tune}, final {final_done}/{len(seeds)}"
                 + ("" if "learning_rate" in prior else " (not selected yet)"))
  walls = [r["metrics"]["wall_time_s"] for recs in recorded.values() for r in recs
           if r["metrics"].get("wall_time_s")]
  cost = (f"~{left * float(np.median(walls)) / 3600:.1f} CPU-hours at the recorded median "
          f"{float(np.median(walls)) / 60:.1f} min per run" if walls else
          "no recorded run to time them by")
  return "\n".join(lines + [f"  left: {left} runs (+ 2 per edge extension), {cost}"])


def main(argv=None) -> int:
  p, args = _parse(argv)
  every = study_arms(args.dataset, args.study)
  arms = [a for a in every if args.arms is None or a.name in args.arms]
  if not arms:
    p.error(f"no arm of {args.study} among {args.arms}; choose from {[a.name for a in every]}")
  seeds = args.seeds or claims_lib.SEEDS.get((args.dataset, args.study), ())
  n_tune = sum(len(STUDIES[args.study]["lr_grid"]) * sum(
      same_run_as(args.study, a, v, args) is None for v in args.grid.get(a.name, a.grid) or (None,))
      for a in arms) * len(args.tune_seeds)  # a twin's settings are its twin's runs
  print(f"[natural_images] {args.dataset} {args.study}: {len(arms)} arms; tune {n_tune} runs "
        f"(+ 2 per edge extension), pilot {len(arms) * len(claims_lib.PILOT_SEEDS)}, final "
        f"{len(arms) * len(seeds)} runs (seeds {list(seeds) or 'not registered yet'})", flush=True)
  if args.dry_run:
    print(plan(args.study, arms, args))
    return 0
  os.makedirs(args.out, exist_ok=True)
  if args.phase != "report":
    enable_compile_cache(args.jax_cache, min_compile_secs=1.0)
  t0 = time.time()
  log = lambda s: print(f"[{time.time() - t0:7.0f}s] {s}", flush=True)  # noqa: E731
  sel_path = _out(args, args.study, "_selected.json")
  if args.phase in ("all", "tune"):
    selected = tune(args.study, arms, args, log)
  elif os.path.exists(sel_path):
    selected = _read_json(sel_path)
  else:
    p.error(f"{sel_path} does not exist: run --phase tune first")
  if args.phase == "tune":
    return 0
  if args.phase == "pilot":
    print(pilot(args.study, arms, selected, args, log))
    return 0
  final_seeds = list(args.seeds or claims_lib.seeds(args.dataset, args.study))
  if args.phase == "verify":
    checks = verify(args.study, arms, selected, args.seeds or final_seeds[:1], args, log)
    return 0 if all(c["equal"] for c in checks) else 1
  runs = run_seeds(args.study, arms, selected, final_seeds, args, log)
  print(report(args.study, selected, runs, args, time.time() - t0))
  return 0


if __name__ == "__main__":
  sys.exit(main())
