"""The papers' claims on natural images (cifar10-mini) under the fair tuning protocol of
``docs/results/protocol.md``: tune on a validation split, record the selected values, run the final
seeds, report paired 95% intervals and one verdict per claim.

Studies (``--study``):

* ``objectives`` (aEPG paper): ``configs/cifar10.py:<loss>,<method>`` — CE, EPG, aEPG (tau 6 and
  tuned tau), entropy penalty, confidence penalty, label smoothing, focal, with seq-LoRA and LAE;
* ``dlcft_data_il`` / ``dlcft_class_il`` (DLCFT paper): ``configs/dlcft_*.py`` with the data
  switched to cifar10-mini (``--config.data.*`` as below);
* ``robust_ft`` (TPGM / FTP papers): ``configs/robust_ft.py`` on cifar10-mini, OOD = the
  corruption suite at 5 severities of the cifar10-mini test images (CIFAR-10-C recipe);
* ``class_il_recipes``: which configuration to use for class-IL on natural images — seq-LoRA CE /
  aEPG, LAE aEPG, and replay (``configs/cifar10.py:ce,er`` / ``ce,derpp``, buffer 500) at the
  ``configs/cifar10.py`` budget; its CE / aEPG arms are the objectives study's runs (shared).

Phases (``--phase``, default ``all``):

1. ``tune``: every arm x the learning-rate grid x its own hyper-parameter grid x ``--tune-seeds``,
   scored by the VALIDATION class-IL final accuracy (``metrics.json['val']``; the split is
   ``data.val_fraction`` of each task's training images, never test). The best mean over the
   tuning seeds is selected (:func:`_common.select_best`) and written to
   ``<out>/cifar10_<study>_selected.json`` with every setting's scores.
2. ``final``: every arm at its selected values x ``--seeds`` (test images). Where a claim's paired
   std exceeds its gap and fewer than 5 seeds ran, ``--extra-seeds`` are added for both arms.
3. ``report``: ``<out>/cifar10_<study>.md`` (table: mean ± std; claims: paired difference, 95% t
   and bootstrap intervals, verdict by :func:`_common.claim_verdict`) and ``.json``, over every arm
   of the study whatever ``--arms`` names (``--arms`` only limits what trains).

Runs are reused when finished with the same settings and resumed when unfinished, so the study
can be stopped and restarted; ``--phase report`` only aggregates. Final runs recorded in the
committed ``<out>/cifar10_<study>.json`` at the same selected values stand in for run folders that
are gone (a study spans sessions; ``--fresh`` retrains them). Commands::

    python studies/natural_images.py --study objectives                  # everything
    python studies/natural_images.py --study objectives --phase tune --arms ce aepg
    python studies/natural_images.py --study robust_ft --phase report

Smoke check of the whole pipeline (minutes; tiny random CNN, numbers meaningless)::

    python studies/natural_images.py --study robust_ft --arms ft tpgm --tune-seeds 100 \
        --seeds 0 1 --extra-seeds --set model.name=tiny_cnn --set model.pretrained=False \
        --image-size 16 --train-limit 20 --test-limit 10 --epochs 1 --out /tmp/ni --workdir-root /tmp/ni

CPU cost: see ``docs/results/cifar10_pilot.md`` (per-run wall time on the 2-core machine) and
``--dry-run``, which prints the number of runs of each phase without training.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    add_override_args, apply_overrides, claim_verdict, enable_compile_cache, load_config_module,
    mean_std, paired_bootstrap_interval, paired_t_interval, same_settings, select_best)

LR_GRID = (3e-4, 1e-3, 3e-3)       # the same for every arm of a study (protocol.md)
ROBUST_LR_GRID = (3e-5, 1e-4, 3e-4)  # full fine-tuning (robust_ft): 10x lower, the same for all


class Arm(NamedTuple):
  """One method of a study: ``config`` file name + ``arg``, label, and its own hyper-parameter
  (``key`` a dotted config path, ``grid`` its candidate values; ``None``: only the lr is tuned)."""
  name: str
  config: str
  arg: str
  label: str
  key: Optional[str] = None
  grid: Tuple[Any, ...] = ()


class Claim(NamedTuple):
  """"``better`` beats ``worse``" on score ``score`` (a metrics.json path), per the paper."""
  text: str
  better: str
  worse: str
  score: Tuple[str, ...] = ("final_accuracy",)


def _objective_arms(method: str) -> List[Arm]:
  m = "lae" if method == "lae" else "seq"
  a = lambda name, loss, label, key=None, grid=(): Arm(  # noqa: E731
      f"{name}_{m}", "cifar10", f"{loss},{method}", f"{label} ({'LAE' if m == 'lae' else 'seq-LoRA'})",
      key, grid)
  return [a("ce", "ce", "CE"), a("epg", "epg", "EPG"),
          a("aepg_tau6", "aepg", "aEPG sigmoid tau 6"),
          a("aepg", "aepg", "aEPG tuned tau", "loss.tau", (2.0, 6.0, 12.0)),
          a("entropy_penalty", "entropy_penalty", "entropy penalty", "loss.beta", (0.3, 1.0, 3.0)),
          a("confidence_penalty", "confidence_penalty", "confidence penalty", "loss.beta",
            (0.03, 0.1, 0.3)),
          a("label_smoothing", "label_smoothing", "label smoothing", "loss.gamma",
            (0.05, 0.1, 0.2)),
          a("focal", "focal", "focal", "loss.gamma", (0.5, 1.0, 2.0))]


def _objective_claims(m: str) -> List[Claim]:
  s = "LAE" if m == "lae" else "seq-LoRA"
  return [Claim(f"aEPG (tuned tau) beats CE, {s}", f"aepg_{m}", f"ce_{m}"),
          Claim(f"aEPG (tau 6) beats CE, {s}", f"aepg_tau6_{m}", f"ce_{m}"),
          Claim(f"EPG beats CE, {s}", f"epg_{m}", f"ce_{m}"),
          Claim(f"entropy penalty beats CE, {s}", f"entropy_penalty_{m}", f"ce_{m}"),
          Claim(f"CE beats label smoothing, {s}", f"ce_{m}", f"label_smoothing_{m}"),
          Claim(f"CE beats confidence penalty, {s}", f"ce_{m}", f"confidence_penalty_{m}"),
          Claim(f"CE beats focal, {s}", f"ce_{m}", f"focal_{m}"),
          Claim(f"aEPG (tuned tau) beats EPG, {s}", f"aepg_{m}", f"epg_{m}")]


LAMBDA = (0.3, 1.0, 3.0)  # regularisation strength of EWC / OSLA / DLCFT (method.strength)
STUDIES: Dict[str, Dict[str, Any]] = {
    "objectives": {
        "paper": "aEPG (arXiv 2602.14078)",
        "lr_grid": LR_GRID,
        "arms": _objective_arms("sequential") + _objective_arms("lae"),
        "claims": _objective_claims("seq") + _objective_claims("lae"),
    },
    "dlcft_data_il": {
        "paper": "DLCFT (Shon et al., ECCV 2022), Table 1",
        "lr_grid": LR_GRID,
        "arms": [Arm("none", "dlcft_data_il", "none", "None (fine-tuning)"),
                 Arm("ewc", "dlcft_data_il", "ewc", "EWC", "method.strength", LAMBDA),
                 Arm("osla", "dlcft_data_il", "osla", "OSLA", "method.strength", LAMBDA),
                 Arm("dlcft_kfac", "dlcft_data_il", "dlcft_kfac", "DLCFT K-FAC",
                     "method.strength", LAMBDA),
                 Arm("dlcft_tkfac", "dlcft_data_il", "dlcft_tkfac", "DLCFT TK-FAC",
                     "method.strength", LAMBDA),
                 Arm("joint", "dlcft_data_il", "joint", "Joint (upper bound)")],
        "claims": [Claim("DLCFT TK-FAC beats None", "dlcft_tkfac", "none"),
                   Claim("DLCFT TK-FAC beats EWC", "dlcft_tkfac", "ewc"),
                   Claim("DLCFT TK-FAC beats OSLA", "dlcft_tkfac", "osla"),
                   Claim("DLCFT K-FAC beats OSLA", "dlcft_kfac", "osla"),
                   Claim("TK-FAC beats K-FAC (DLCFT)", "dlcft_tkfac", "dlcft_kfac")],
    },
    "dlcft_class_il": {
        "paper": "DLCFT (Shon et al., ECCV 2022), Table 2",
        "lr_grid": LR_GRID,
        "arms": [Arm("er", "dlcft_class_il", "er", "ER"),
                 Arm("der", "dlcft_class_il", "der", "DER", "method.alpha", (0.1, 0.3, 1.0)),
                 Arm("derpp", "dlcft_class_il", "derpp", "DER++", "method.alpha",
                     (0.1, 0.3, 1.0)),
                 Arm("dlcft", "dlcft_class_il", "dlcft", "DLCFT", "method.replay_lambda",
                     (0.25, 0.5, 0.75))],
        "claims": [Claim("DLCFT beats ER", "dlcft", "er"), Claim("DLCFT beats DER", "dlcft", "der"),
                   Claim("DLCFT beats DER++", "dlcft", "derpp"), Claim("DER beats ER", "der", "er")],
    },
    "robust_ft": {
        "paper": "TPGM (Tian et al., CVPR 2023) / FTP (NeurIPS 2023)",
        "single_task": True,   # one task: the report shows ID / OOD accuracy, not class-IL columns
        "lr_grid": ROBUST_LR_GRID,
        "arms": [Arm("ft", "robust_ft", "ft", "FT"),
                 Arm("l2sp", "robust_ft", "l2sp", "L2-SP", "method.l2sp_alpha",
                     (0.001, 0.01, 0.1)),
                 Arm("wise_ft", "robust_ft", "wise_ft", "WiSE-FT", "eval.wise_ft_alpha",
                     (0.3, 0.5, 0.7)),
                 Arm("tpgm", "robust_ft", "tpgm", "TPGM", "method.radius_lr", (3e-3, 1e-2, 3e-2)),
                 Arm("ftp", "robust_ft", "ftp", "FTP", "method.radius_lr", (3e-3, 1e-2, 3e-2))],
        "claims": [Claim("TPGM beats FT out of distribution", "tpgm", "ft",
                         ("ood", "corruption_mean")),
                   Claim("FTP beats FT out of distribution", "ftp", "ft", ("ood", "corruption_mean")),
                   Claim("WiSE-FT beats FT out of distribution", "wise_ft", "ft",
                         ("ood", "corruption_mean")),
                   Claim("TPGM keeps FT's in-distribution accuracy (difference shown: "
                         "TPGM - FT + 1)", "tpgm", "ft",
                         ("ood", "id"))],
    },
}
# The recommended class-IL configuration: seq-LoRA's variants at the same budget. Its arms share
# the objectives study's names and runs (``runs_under``), so CE / aEPG are never trained twice.
_seq = {a.name: a for a in _objective_arms("sequential") + _objective_arms("lae")}
STUDIES["class_il_recipes"] = {
    "paper": "class-IL recommendation (seq-LoRA, LAE, replay)",
    "runs_under": "objectives",
    "lr_grid": LR_GRID,
    "arms": [_seq["ce_seq"], _seq["aepg_tau6_seq"], _seq["aepg_tau6_lae"],
             Arm("er_seq", "cifar10", "ce,er", "ER, buffer 500 (seq-LoRA, CE over all outputs)"),
             Arm("derpp_seq", "cifar10", "ce,derpp",
                 "DER++, buffer 500 (seq-LoRA, CE over all outputs)")],
    "claims": [Claim("ER beats seq-LoRA CE", "er_seq", "ce_seq"),
               Claim("ER beats seq-LoRA aEPG", "er_seq", "aepg_tau6_seq"),
               Claim("DER++ beats ER", "derpp_seq", "er_seq"),
               Claim("LAE aEPG beats seq-LoRA aEPG", "aepg_tau6_lae", "aepg_tau6_seq")],
}
MIN_SEEDS_IF_NOISY = 5


def natural_config(arm: Arm, seed: int, args, lr: Optional[float] = None, value: Any = None,
                   tuning: bool = False):
  """The config of ``arm`` for ``seed`` on cifar10-mini with the validation split, at learning
  rate ``lr`` and own hyper-parameter ``value`` (None: the config's)."""
  cifar = load_config_module(os.path.join(ROOT, "configs", "cifar10.py"), "natural_cifar10")
  module = cifar if arm.config == "cifar10" else load_config_module(
      os.path.join(ROOT, "configs", f"{arm.config}.py"), f"natural_{arm.config}")
  c = module.get_config(arm.arg)
  if arm.config != "cifar10":  # the study's own config, its data switched to cifar10-mini
    c.data.name = "image_folder"
    c.data.root = cifar.default_root()
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
    section, key = arm.key.split(".")
    c[section][key] = value
  if tuning:  # OOD sets are never looked at while tuning
    c.eval.ood_corruptions = ()
    c.eval.ood_dataset = ""
  c.checkpoint.max_to_keep = 1
  return c


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
  return f"lr{lr:g}" + (f"_{arm.key.split('.')[-1]}{value:g}" if arm.key is not None else "")


def same_run_as(study: str, arm: Arm, value: Any, args) -> Optional[Arm]:
  """The arm of ``study`` whose runs ARE ``arm``'s runs at own value ``value``, or None.

  An arm with a tuned hyper-parameter (e.g. aEPG tuned tau, ``loss.tau``) contains, at the value
  its fixed twin uses (aEPG tau 6, same config and arg, no own grid), that twin's configuration
  exactly; those settings are not trained twice (the twin's tuning and final runs are used)."""
  if arm.key is None or value is None:
    return None
  section, key = arm.key.split(".")
  for other in STUDIES[study]["arms"]:
    if (other.name != arm.name and other.key is None and (other.config, other.arg) ==
        (arm.config, arm.arg) and natural_config(other, 0, args)[section][key] == value):
      return other
  return None


def tune(study: str, arms: List[Arm], args, log) -> Dict[str, Any]:
  """Phase 1: the grid on the validation split; returns and writes the selected values."""
  spec = STUDIES[study]
  path = os.path.join(args.out, f"cifar10_{study}_selected.json")
  selected = json.load(open(path)) if os.path.exists(path) else {}
  for arm in arms:
    grid = list(itertools.product(spec["lr_grid"], args.grid.get(arm.name, arm.grid) or (None,)))
    scores: Dict[Tuple[float, Any], List[float]] = {}
    for (lr, value), seed in itertools.product(grid, args.tune_seeds):
      twin = same_run_as(study, arm, value, args)
      wd = os.path.join(args.workdir_root, spec.get("runs_under", study), "tune",
                        *((twin.name, _setting_name(twin, lr, None)) if twin else
                          (arm.name, _setting_name(arm, lr, value))), f"seed{seed}")
      t = time.time()
      score = tune_score(natural_config(arm, seed, args, lr, value, tuning=True), wd)
      scores.setdefault((lr, value), []).append(score)
      log(f"tune {arm.name} {_setting_name(arm, lr, value)} seed {seed}: val class-IL final "
          f"{'diverged (scored 0)' if np.isnan(score) else f'{score:.2f}'} "
          f"({time.time() - t:.0f}s)")
    lr, value = select_best(scores)
    # Re-read before writing: several processes may tune disjoint --arms of one study at once.
    selected = json.load(open(path)) if os.path.exists(path) else {}
    selected[arm.name] = {
        "learning_rate": lr, **({arm.key: value} if arm.key else {}),
        "tune_seeds": list(args.tune_seeds), "val_fraction": args.val_fraction,
        **({"own_grid_reduced_to": list(args.grid[arm.name])} if arm.name in args.grid else {}),
        "val_class_il_final": {_setting_name(arm, l, v): s for (l, v), s in scores.items()}}
    with open(path, "w") as f:
      json.dump(selected, f, indent=1)
  return selected


def recorded_runs(path: str, keys: Dict[str, Optional[str]],
                  selected: Dict[str, Any]) -> Dict[Tuple[str, int], Dict[str, Any]]:
  """The final runs recorded in a study's results JSON (``path``, written by :func:`report`)
  whose arm was run at the values selected now: ``{(arm, seed): record}``.

  A study spans sessions on a small machine and run folders are not kept, so the committed
  records stand in for runs whose folder is gone; a run recorded under another selection
  (learning rate or the arm's own value, ``keys[arm]``) is not reused. No file: ``{}``.
  """
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    data = json.load(f)
  old_sel = data.get("selected", {})
  out = {}
  for r in data.get("runs", ()):
    arm, now, then = r["arm"], selected.get(r["arm"]), old_sel.get(r["arm"])
    if arm in keys and now and then and all(
        now.get(k) == then.get(k) for k in ("learning_rate", keys[arm]) if k):
      out[(arm, r["seed"])] = r
  return out


def final(study: str, arms: List[Arm], selected: Dict[str, Any], args, log) -> List[Dict]:
  """Phase 2: ``arms`` at their selected values on the test images, ``--seeds`` (+ extra seeds
  for noisy claims). The result holds every arm of the study, not only ``arms``: the other arms'
  finished runs (same settings) and the runs recorded in ``<out>/cifar10_<study>.json`` at the
  same selected values stay in it without training, whichever ``--arms`` and ``--seeds`` this
  call names, so the report it feeds never drops runs an earlier call committed. Returns one
  record per finished run."""
  runs: List[Dict[str, Any]] = []
  names = {a.name for a in arms}
  prior = {} if args.fresh else recorded_runs(
      os.path.join(args.out, f"cifar10_{study}.json"),
      {a.name: a.key for a in STUDIES[study]["arms"]}, selected)  # every arm: twins' runs too

  def do(arm: Arm, seed: int, train: bool = True) -> None:
    train = train and args.phase != "report"
    if any(r["arm"] == arm.name and r["seed"] == seed for r in runs):
      return
    sel = selected.get(arm.name)
    if sel is None and not train:  # not tuned yet: nothing to aggregate
      return
    if sel is None:
      raise KeyError(f"no selected values for arm {arm.name!r}: run --phase tune first")
    twin = same_run_as(study, arm, sel.get(arm.key), args)
    if twin is not None and selected.get(twin.name, {}).get("learning_rate") != sel["learning_rate"]:
      twin = None  # the twin was selected at another lr: its final runs are other settings
    src = twin.name if twin else arm.name
    wd = os.path.join(args.workdir_root, STUDIES[study].get("runs_under", study), "final", src,
                      f"seed{seed}")
    cfg = natural_config(arm, seed, args, sel["learning_rate"], sel.get(arm.key))
    finished = os.path.exists(os.path.join(wd, "metrics.json")) and _saved_as(wd, cfg)
    if not finished and (src, seed) in prior:
      runs.append({**prior[(src, seed)], "arm": arm.name})  # committed earlier, same settings
      return
    if not train:
      if not finished:
        return
      with open(os.path.join(wd, "metrics.json")) as f:
        m = json.load(f)
    else:
      t = time.time()
      m = run_one(cfg, wd)
      log(f"final {arm.name} seed {seed}: class-IL final {m['final_accuracy']:.2f}, task-IL "
          f"{m['task_il']['final_accuracy']:.2f} ({time.time() - t:.0f}s)")
    runs.append({"arm": arm.name, "seed": seed, "workdir": os.path.relpath(wd, ROOT),
                 "metrics": {k: m.get(k) for k in ("final_accuracy", "avg_incremental_accuracy",
                                                   "forgetting", "task_il", "val", "ood",
                                                   "wall_time_s")}})

  for seed in args.seeds:  # seed-major: an interrupted phase has every arm at the first seeds
    for arm in arms:
      do(arm, seed)
  for claim in STUDIES[study]["claims"]:
    if not {claim.better, claim.worse} <= names:
      continue
    r = compare(runs, claim)
    if r and r["n"] < MIN_SEEDS_IF_NOISY and r["std"] > abs(r["mean"]):
      for seed in args.extra_seeds:
        for arm in arms:
          if arm.name in (claim.better, claim.worse):
            do(arm, seed)
  for seed in sorted({*args.seeds, *args.extra_seeds, *(s for _, s in prior)}):
    for arm in STUDIES[study]["arms"]:  # finished or recorded earlier: kept, never retrained
      do(arm, seed, train=False)
  return runs


def compare(runs: List[Dict[str, Any]], claim: Claim) -> Optional[Dict[str, Any]]:
  """Paired difference ``better - worse`` over the seeds both arms finished (None if < 2)."""
  a = {r["seed"]: _get(r["metrics"], claim.score) for r in runs if r["arm"] == claim.better}
  b = {r["seed"]: _get(r["metrics"], claim.score) for r in runs if r["arm"] == claim.worse}
  seeds = sorted(s for s in set(a) & set(b) if a[s] is not None and b[s] is not None)
  if len(seeds) < 2:
    return None
  xa, xb = [a[s] for s in seeds], [b[s] for s in seeds]
  if claim.score == ("ood", "id"):  # "keeps ID accuracy": a loss of < 1 point counts as kept
    xa = [x + 1.0 for x in xa]
  out = paired_t_interval(xa, xb)
  out["bootstrap"] = paired_bootstrap_interval(xa, xb)
  out["seeds"] = seeds
  out["verdict"] = claim_verdict(out["lo"], out["hi"])
  return out


def _tune_seeds(arms: List[Arm], selected: Dict[str, Any]) -> List[int]:
  return sorted({s for a in arms for s in selected.get(a.name, {}).get("tune_seeds", ())})


def _seed_args(arms: List[Arm], selected: Dict[str, Any]) -> str:
  """`` --tune-seeds ...`` when the study was tuned with other than the default seeds."""
  seeds = _tune_seeds(arms, selected)
  return f" --tune-seeds {' '.join(map(str, seeds))}" if seeds and seeds != [100, 101] else ""


def _setup_line(arms: List[Arm], selected: Dict[str, Any], args) -> str:
  """One line: the runs' budget (from the first arm's config) and the tuning seeds used."""
  c = natural_config(arms[0], 0, args)
  seeds = _tune_seeds(arms, selected)
  limit = (f"{c.data.train_limit} training images per task" if c.data.train_limit
           else "every training image")
  reduced = "; ".join(f"{a.name}'s own grid reduced to {selected[a.name]['own_grid_reduced_to']}"
                      for a in arms if "own_grid_reduced_to" in selected.get(a.name, {}))
  return (f"Setup: {c.model.name} (PEFT: {c.peft.name}), "
          f"{c.data.image_size} px, {limit} ({c.data.val_fraction:.0%} held out for validation), "
          f"{c.train.epochs} epoch(s) per task, batch {c.train.batch_size}; tuning seeds "
          f"{seeds} (the protocol's default: [100, 101]){'; ' + reduced if reduced else ''}; final "
          "seeds as listed per claim.")


def report(study: str, arms: List[Arm], selected: Dict[str, Any], runs: List[Dict], args,
           wall_s: float) -> str:
  """Phase 3: writes ``cifar10_<study>.md`` and ``.json``; returns the markdown."""
  spec = STUDIES[study]
  fmt = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}" if np.isfinite(ms[0]) else "—"  # noqa: E731
  single = spec.get("single_task", False)
  run_s = sum(r["metrics"].get("wall_time_s") or 0.0 for r in runs)
  head = ("| arm | selected (lr, own) | seeds | ID accuracy (test) | val ID accuracy | OOD corruption "
          "mean | ID - OOD drop |" if single else
          "| arm | selected (lr, own) | seeds | class-IL final | avg incremental | task-IL final "
          "| val class-IL final | forgetting |")
  lines = [f"# {study} on cifar10-mini: the {spec['paper']} claims under the fair protocol", "",
           "Protocol: `docs/results/protocol.md`. Command: `python studies/natural_images.py "
           f"--study {study}{_seed_args(arms, selected)}`. Selected values: "
           f"`cifar10_{study}_selected.json`. Scores in %; mean ± sample std over the final seeds "
           "(test images).", "", _setup_line(arms, selected, args), "",
           head, "|---" * head.count(" | ") + "|---|"]
  for arm in arms:
    rs = [r["metrics"] for r in runs if r["arm"] == arm.name]
    if not rs:
      continue
    sel = selected.get(arm.name, {})
    own = f", {arm.key.split('.')[-1]} {sel.get(arm.key):g}" if arm.key else ""
    if single:
      cols = [m["final_accuracy"] for m in rs], [_get(m, ("val", "final_accuracy")) for m in rs], \
          [_get(m, ("ood", "corruption_mean")) for m in rs], \
          [_get(m, ("ood", "id")) - _get(m, ("ood", "corruption_mean")) for m in rs
           if _get(m, ("ood", "corruption_mean")) is not None]
    else:
      cols = [m["final_accuracy"] for m in rs], [m["avg_incremental_accuracy"] for m in rs], \
          [_get(m, ("task_il", "final_accuracy")) for m in rs], \
          [_get(m, ("val", "final_accuracy")) for m in rs], [m.get("forgetting") for m in rs]
    lines.append(f"| {arm.label} | {sel.get('learning_rate', float('nan')):g}{own} | {len(rs)} | "
                 + " | ".join(fmt(mean_std(c)) for c in cols) + " |")
  lines += ["", "| claim | score | seeds | paired difference (mean ± std) | 95% t interval "
            "| 95% bootstrap | verdict |", "|---|---|---|---|---|---|---|"]
  verdicts = []
  for claim in spec["claims"]:
    r = compare(runs, claim)
    if r is None:
      continue
    verdicts.append({"claim": claim.text, **{k: r[k] for k in ("mean", "std", "n", "lo", "hi",
                                                               "verdict", "seeds")},
                     "bootstrap": list(r["bootstrap"]), "score": ".".join(claim.score)})
    lines.append(f"| {claim.text} | {'.'.join(claim.score)} | {r['n']} | {r['mean']:+.2f} ± "
                 f"{r['std']:.2f} | [{r['lo']:+.2f}, {r['hi']:+.2f}] | [{r['bootstrap'][0]:+.2f}, "
                 f"{r['bootstrap'][1]:+.2f}] | **{r['verdict']}** |")
  lines += ["", "Verdict rule (`studies/_common.claim_verdict`, 95% t interval of the paired "
            "difference): reproduced if it lies above 0; not reproduced if it excludes every "
            "gain of 1 point or more; inconclusive otherwise. "
            f"Final runs: {len(runs)}, {run_s / 60:.0f} min of training wall time in all "
            "(2-core CPU, other runs sharing it)"
            + (f"; this invocation: {wall_s / 60:.1f} min." if args.phase != "report" else "."), ""]
  text = "\n".join(lines)
  with open(os.path.join(args.out, f"cifar10_{study}.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.out, f"cifar10_{study}.json"), "w") as f:
    json.dump({"selected": selected, "claims": verdicts, "runs": runs}, f, indent=1)
  return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--study", choices=sorted(STUDIES), default="objectives")
  p.add_argument("--phase", choices=("all", "tune", "final", "report"), default="all")
  p.add_argument("--arms", nargs="+", default=None,
                 help="subset of the study's arms to tune and train (the report still covers "
                 "every arm with finished or recorded runs)")
  p.add_argument("--tune-seeds", nargs="+", type=int, default=[100, 101])
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--extra-seeds", nargs="*", type=int, default=[3, 4],
                 help="added for both arms of a claim whose paired std exceeds its gap")
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--data-root", default="", help="cifar10-mini elsewhere (default: the config's)")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
  p.add_argument("--workdir-root", default=os.path.join(ROOT, "runs", "natural_images"))
  p.add_argument("--jax-cache", default=os.path.join(ROOT, "runs", "natural_images", "jax_cache"))
  p.add_argument("--dry-run", action="store_true", help="print the run counts and exit")
  p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                 help="any other config value for every run (repeatable; e.g. a smoke test with "
                 "--set model.name=tiny_cnn --set model.pretrained=False)")
  p.add_argument("--fresh", action="store_true",
                 help="do not reuse the final runs recorded in <out>/cifar10_<study>.json (by "
                 "default a run whose folder is gone but which is recorded there at the same "
                 "selected values is taken from the record)")
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
  spec = STUDIES[args.study]
  arms = [a for a in spec["arms"] if args.arms is None or a.name in args.arms]
  if not arms:
    p.error(f"no arm of {args.study} among {args.arms}; choose from "
            f"{[a.name for a in spec['arms']]}")
  n_tune = sum(len(spec["lr_grid"]) * sum(same_run_as(args.study, a, v, args) is None
                                           for v in args.grid.get(a.name, a.grid) or (None,))
               for a in arms) * len(args.tune_seeds)  # a twin's settings are its twin's runs
  n_final = len(arms) * len(args.seeds)
  print(f"[natural_images] {args.study}: {len(arms)} arms; tune {n_tune} runs, final {n_final} "
        f"runs (+ up to {2 * len(args.extra_seeds)} per noisy claim)", flush=True)
  if args.dry_run:
    return 0
  os.makedirs(args.out, exist_ok=True)
  if args.phase != "report":
    enable_compile_cache(args.jax_cache, min_compile_secs=1.0)
  t0 = time.time()
  log = lambda s: print(f"[{time.time() - t0:7.0f}s] {s}", flush=True)  # noqa: E731
  sel_path = os.path.join(args.out, f"cifar10_{args.study}_selected.json")
  if args.phase in ("all", "tune"):
    selected = tune(args.study, arms, args, log)
  elif os.path.exists(sel_path):
    selected = json.load(open(sel_path))
  else:
    p.error(f"{sel_path} does not exist: run --phase tune first")
  if args.phase == "tune":
    return 0
  runs = final(args.study, arms, selected, args, log)  # every arm's runs, trained or kept
  print(report(args.study, spec["arms"], selected, runs, args, time.time() - t0))
  return 0


if __name__ == "__main__":
  sys.exit(main())
