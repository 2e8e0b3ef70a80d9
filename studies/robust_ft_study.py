"""Robust fine-tuning study: FT, L2-SP, WiSE-FT, TPGM and FTP under corruption shift
(docs/methods.md#robust-ft).

Runs ``configs/robust_ft.py:<method>`` (full fine-tuning of an ImageNet EfficientNet-Lite0 on
Fashion-MNIST, one task, evaluated on the clean test images and on corrupted copies at severities
1-5) for every method and seed in one Python process, then writes into ``--out``:

* ``robust_ft.md``: per method, in-distribution (clean test) accuracy, the mean accuracy over
  every corruption x severity, the accuracy per corruption (mean over severities), the ID - OOD
  drop, and the accuracy per severity (mean over corruptions), mean ± std over seeds; then the
  means set against the papers' claim (TPGM / FTP keep OOD robustness better than vanilla FT at
  similar ID accuracy; descriptive: no interval, no test; ``_common.DESCRIPTIVE``);
* ``robust_ft.json``: setup, summary and the raw per-seed numbers (every corruption x severity);
* ``robust_ft.png``: accuracy vs severity per method (0 = clean), mean over corruptions and per
  corruption, ±std over seeds.

Command (from the repository root)::

    python studies/robust_ft_study.py --seeds 0 1 2 --out docs/results \\
        --workdir-root runs/robust_ft

WiSE-FT is not trained: it is the ``ft`` run of the same seed evaluated at
``(1 - 0.5) theta_0 + 0.5 theta``. The study copies the finished ``ft`` checkpoint into the
``wise_ft`` workdir and calls ``train.run`` with ``eval.wise_ft_alpha=0.5``: the run resumes after
its only task (nothing to train; ``eval`` is not part of the resume check) and evaluates the
interpolated weights. Its ``accuracy_matrix`` is therefore the ``ft`` one; the ID accuracy of every
method here is ``metrics.json['ood']['id']``, computed with the evaluated (interpolated) weights.

A finished run (``metrics.json`` with the same settings) is read back without training; a run
with other settings is deleted and redone. ``--report-only`` only aggregates the finished runs.

Definitions: std is the sample standard deviation over seeds (ddof 1). "Paired" differences are
taken seed by seed (same seed = same training subset, order and head init), then averaged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DESCRIPTIVE, add_override_args, apply_overrides, enable_compile_cache, load_config_module,
    mean_std, same_settings)

METHODS = ("ft", "l2sp", "wise_ft", "tpgm", "ftp")
LABELS = {
    "ft": "FT (vanilla)",
    "l2sp": "L2-SP (alpha 0.01)",
    "wise_ft": "WiSE-FT (alpha 0.5)",
    "tpgm": "TPGM (L2)",
    "ftp": "FTP (MARS, k 1)",
}
NOTES = (
    "Notes. (1) The TPGM / FTP papers report, for CLIP ViT-B/16 fine-tuned on ImageNet, the "
    "average over IN / IN-V2 / IN-A / IN-R / IN-Sketch: vanilla FT 63.58 vs TPGM 69.27 (+5.7), "
    "and on DomainNet with CLIP ResNet-50 an OOD average of FT 33.17 vs TPGM 39.02 (+5.9): "
    "natural distribution shifts, a strong pretrained model, full-length training. This study is "
    "a small-CPU analogue (synthetic corruptions, an ImageNet CNN at 32 px, one epoch on 2000 "
    "images), so only the direction and rough size of the effect are comparable. (2) WiSE-FT's "
    "theta_0 has no Fashion-MNIST classifier (the head is new; it is kept from the fine-tuned "
    "model), unlike the CLIP zero-shot head of the WiSE-FT paper; its ID mean is below FT's "
    "here, which that may explain (not tested). (3) L2-SP at alpha 0.01 ends within a point of "
    "FT on both means; a possible reason, not measured: at this alpha the penalty is small "
    "against one epoch of Adam at lr 1e-4. Neither is shown equivalent to FT.")


def wall_note(wall_s: float, num_runs: int, of: str = "the study") -> str:
  """The report's sentence on the wall time (``wall_s`` in seconds, as in the JSON) ``of`` what:
  the whole study (re-rendered from its JSON) or this invocation (just trained)."""
  return (f"Wall time of {of}: {wall_s / 60:.1f} min for {num_runs} runs (one process, "
          "2 CPU cores shared with other jobs).")


def make_config(module, method: str, seed: int, args):
  c = apply_overrides(module.get_config(method), args, seed)
  if args.corruptions:
    c.eval.ood_corruptions = tuple(args.corruptions)
  if args.severities:
    c.eval.ood_severities = tuple(args.severities)
  return c


def _finished(workdir: str, config) -> Dict[str, Any] | None:
  """The metrics of a finished run of ``config`` in ``workdir``; None if there is none.

  A finished run with other settings is deleted (it is redone)."""
  metrics_path = os.path.join(workdir, "metrics.json")
  config_path = os.path.join(workdir, "config.json")
  if not (os.path.exists(metrics_path) and os.path.exists(config_path)):
    return None
  with open(config_path) as f:
    saved = json.load(f)
  if same_settings(saved, config):
    with open(metrics_path) as f:
      return json.load(f)
  print(f"  {workdir}: finished run with other settings; redoing it", flush=True)
  shutil.rmtree(workdir)
  return None


def wise_config(config, ft_workdir: str):
  """The WiSE-FT config: the ``ft`` run's saved config (so ``train.run`` accepts its checkpoint
  even if ``configs/default.py`` gained keys since) with this config's ``eval`` section."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ft_workdir, "config.json")) as f:
    saved = json.load(f)
  saved["eval"] = json.loads(config.to_json())["eval"]
  c = ml_collections.ConfigDict(saved)
  c.train.progress = c.train.plots = c.train.verbose = False
  return c


def run_one(config, workdir: str, ft_workdir: str | None = None) -> Dict[str, Any]:
  """Trains (or reads back) one run; returns its ``metrics.json`` dict.

  With ``ft_workdir`` (WiSE-FT) the finished ``ft`` checkpoint is copied in first, so
  ``train.run`` only evaluates the interpolated weights."""
  from cft_jax import train  # pylint: disable=g-import-not-at-top
  if ft_workdir is not None:
    if not os.path.exists(os.path.join(ft_workdir, "metrics.json")):
      raise RuntimeError(f"WiSE-FT needs the finished ft run in {ft_workdir}")
    config = wise_config(config, ft_workdir)
  done = _finished(workdir, config)
  if done is not None:
    return done
  if ft_workdir is not None:
    src = os.path.join(ft_workdir, "checkpoints")
    if os.path.exists(workdir):
      shutil.rmtree(workdir)
    os.makedirs(workdir)
    shutil.copytree(src, os.path.join(workdir, "checkpoints"))
    shutil.copy(os.path.join(ft_workdir, "log.jsonl"), os.path.join(workdir, "log.jsonl"))
  try:
    return train.run(config, workdir)
  except train.ConfigMismatchError as e:  # an unfinished run of older settings: start over
    if ft_workdir is not None:
      raise
    print(f"  {workdir}: unfinished run with other settings ({str(e).splitlines()[1].strip()}); "
          "restarting it", flush=True)
    shutil.rmtree(workdir)
    return train.run(config, workdir)


def collect(method: str, seed: int, workdir: str, metrics: Dict[str, Any],
            wall_s: float) -> Dict[str, Any]:
  ood = metrics["ood"]
  table = ood["corruptions"]
  sevs = sorted({int(s) for d in table.values() for s in d})
  per_corr = {n: float(np.mean([d[str(s)] for s in sevs])) for n, d in table.items()}
  per_sev = {str(s): float(np.mean([d[str(s)] for d in table.values()])) for s in sevs}
  return {
      "method": method,
      "seed": seed,
      "workdir": os.path.relpath(workdir, ROOT),
      "id": float(ood["id"]),
      "corruption_mean": float(ood["corruption_mean"]),
      "drop": float(ood["id"] - ood["corruption_mean"]),
      "per_corruption": per_corr,
      "per_severity": per_sev,
      "corruptions": table,
      "dataset": ood.get("dataset"),
      "wall_time_s": wall_s,
  }


def _ms(xs) -> List[float]:
  return list(mean_std(xs))


def summarize(runs: List[Dict[str, Any]], methods) -> Dict[str, Dict[str, Any]]:
  out = {}
  for name in methods:
    rs = sorted([r for r in runs if r["method"] == name], key=lambda r: r["seed"])
    if not rs:
      continue
    corr = list(rs[0]["per_corruption"])
    sevs = list(rs[0]["per_severity"])
    out[name] = {
        "seeds": [r["seed"] for r in rs],
        "id": _ms([r["id"] for r in rs]),
        "corruption_mean": _ms([r["corruption_mean"] for r in rs]),
        "drop": _ms([r["drop"] for r in rs]),
        "per_corruption": {c: _ms([r["per_corruption"][c] for r in rs]) for c in corr},
        "per_severity": {s: _ms([r["per_severity"][s] for r in rs]) for s in sevs},
        "per_corruption_severity": {
            c: {s: _ms([r["corruptions"][c][s] for r in rs]) for s in sevs} for c in corr},
    }
  if "ft" in out:
    ft = {r["seed"]: r for r in runs if r["method"] == "ft"}
    for name, s in out.items():
      if name == "ft":
        continue
      rs = [r for r in runs if r["method"] == name and r["seed"] in ft]
      for key in ("id", "corruption_mean", "drop"):
        d = [r[key] - ft[r["seed"]][key] for r in rs]
        s[f"delta_{key}_vs_ft"] = _ms(d)  # paired (per seed) difference, mean ± std
        s[f"pooled_std_{key}"] = float(np.sqrt((s[key][1] ** 2 + out["ft"][key][1] ** 2) / 2))
  return out


def claim_description(summary: Dict[str, Dict[str, Any]], runs: List[Dict[str, Any]],
                      num_seeds: int) -> str:
  """The means set against the papers' claim (TPGM / FTP vs FT), with every method's differences
  paired by seed (mean ± std over seeds) and the pooled seed std (a description, not a test)."""
  if "ft" not in summary:
    return "Vanilla FT was not run, so the claim cannot be checked."
  ft = {r["seed"]: r for r in runs if r["method"] == "ft"}

  def wins(name):
    rs = [r for r in runs if r["method"] == name and r["seed"] in ft]
    return sum(r["corruption_mean"] > ft[r["seed"]]["corruption_mean"] for r in rs), len(rs)

  lines = [
      "**The papers' claim** (TPGM / FTP keep the out-of-distribution robustness better than "
      "vanilla FT, at similar in-distribution accuracy), compared on corruption shift with "
      f"{num_seeds} seeds. Differences vs FT in points, paired by seed (mean ± std of the "
      "per-seed differences); \"beyond\" = the mean difference exceeds the pooled across-seed "
      "std of the two methods; \"similar ID\" = |ID difference| <= max(1, pooled ID std):",
      ""]
  checked = {}
  for name in ("tpgm", "ftp", "l2sp", "wise_ft"):
    if name not in summary:
      continue
    s = summary[name]
    dood, did, ddrop = (s["delta_corruption_mean_vs_ft"], s["delta_id_vs_ft"],
                        s["delta_drop_vs_ft"])
    p_ood, p_id = s["pooled_std_corruption_mean"], s["pooled_std_id"]
    beyond = abs(dood[0]) > p_ood
    similar_id = abs(did[0]) <= max(1.0, p_id)
    w, n = wins(name)
    lines.append(
        f"- {LABELS[name]}: OOD corruption mean {dood[0]:+.2f} ± {dood[1]:.2f} (above FT on "
        f"{w}/{n} seeds; pooled std {p_ood:.2f}: {'beyond' if beyond else 'within'} it); ID "
        f"{did[0]:+.2f} ± {did[1]:.2f} ({'similar' if similar_id else 'different'} ID, pooled "
        f"std {p_id:.2f}); ID - OOD drop {ddrop[0]:+.2f} ± {ddrop[1]:.2f}.")
    checked[name] = dict(dood=dood, did=did, ddrop=ddrop, beyond=beyond, similar=similar_id,
                         wins=w, n=n)
  proj = {n: v for n, v in checked.items() if n in ("tpgm", "ftp")}
  if proj:
    ok = [n for n, v in proj.items() if v["dood"][0] > 0 and v["beyond"] and v["similar"]]
    if len(ok) == len(proj):
      head = ("**The means are in the papers' direction beyond the pooled seed std at similar "
              "ID accuracy**")
    elif ok:
      head = ("**The means are in the papers' direction beyond the pooled seed std only for "
              + ", ".join(LABELS[n] for n in ok) + "**")
    elif any(v["dood"][0] > 0 for v in proj.values()):
      head = "**The OOD means are in the papers' direction, within the seed std**"
    else:
      head = "**The OOD means are not in the papers' direction**"
    parts = []
    for n, v in proj.items():
      parts.append(
          f"{LABELS[n]} is {v['dood'][0]:+.1f} points on the corrupted sets "
          f"({v['wins']}/{v['n']} seeds above FT) at {v['did'][0]:+.1f} points ID, an ID - OOD "
          f"drop {v['ddrop'][0]:+.1f} ± {v['ddrop'][1]:.1f} vs FT's")
    ft_corr = summary["ft"]["per_corruption"]
    swing = max(ft_corr, key=lambda c: ft_corr[c][1])
    sizes = ", ".join(f"{summary[n]['corruption_mean'][1]:.1f}" for n in ["ft", *proj])
    lines += ["", head + ": " + "; ".join(parts) + ". None of these gains exceeds the "
              f"across-seed std of the OOD mean (FT, {', '.join(LABELS[n] for n in proj)}: "
              f"{sizes}); the largest seed-to-seed swing of vanilla FT is on {swing} "
              f"({ft_corr[swing][0]:.1f} ± {ft_corr[swing][1]:.1f})." if not any(v["beyond"] for v in proj.values()) else
              head + ": " + "; ".join(parts) + "."]
  return "\n".join(lines)


def write_table(summary, runs, path: str, setup: str, num_seeds: int, extra: str = "") -> str:
  first = next(iter(summary.values()))
  corr = list(first["per_corruption"])
  sevs = list(first["per_severity"])
  pm = lambda v: f"{v[0]:.1f} ± {v[1]:.1f}"  # noqa: E731
  lines = [
      "# Robust fine-tuning: FT vs L2-SP / WiSE-FT / TPGM / FTP under corruption shift",
      "",
      setup,
      "",
      "| method | ID acc | OOD corruption mean | ID - OOD drop | "
      + " | ".join(f"{c} (mean sev 1-5)" for c in corr) + " |",
      "|---|---|---|---|" + "---|" * len(corr),
  ]
  for name, s in summary.items():
    lines.append(f"| {LABELS[name]} | {pm(s['id'])} | {pm(s['corruption_mean'])} | "
                 f"{pm(s['drop'])} | " + " | ".join(pm(s["per_corruption"][c]) for c in corr)
                 + " |")
  lines += [
      "",
      "Accuracy per severity (mean over the corruptions; severity 0 = clean):",
      "",
      "| method | 0 | " + " | ".join(sevs) + " |",
      "|---|---|" + "---|" * len(sevs),
  ]
  for name, s in summary.items():
    lines.append(f"| {LABELS[name]} | {pm(s['id'])} | "
                 + " | ".join(pm(s["per_severity"][v]) for v in sevs) + " |")
  lines += [
      "",
      f"Mean ± sample std (ddof 1) over {num_seeds} seeds, accuracies in % on the same 1 test "
      "subset per seed. OOD corruption mean = mean over every corruption x severity. Raw "
      "numbers (every corruption x severity, per seed): `robust_ft.json`; plot: `robust_ft.png`.",
      "",
      DESCRIPTIVE, "", claim_description(summary, runs, num_seeds),
      "",
  ]
  lines += [NOTES, ""]
  if extra:
    lines += [extra, ""]
  text = "\n".join(lines).replace("on the same 1 test subset", "on the same test subset")
  with open(path, "w") as f:
    f.write(text)
  return text


def write_plot(summary, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  first = next(iter(summary.values()))
  corr = list(first["per_corruption"])
  sevs = list(first["per_severity"])
  panels = ["mean over corruptions"] + corr
  ncol = 3 if len(panels) in (5, 6, 9) else min(4, len(panels))
  nrow = int(np.ceil(len(panels) / ncol))
  fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
  xs = [0] + [int(s) for s in sevs]
  for i, panel in enumerate(panels):
    ax = axes[i // ncol][i % ncol]
    for name, s in summary.items():
      if panel == "mean over corruptions":
        vals = [s["id"]] + [s["per_severity"][v] for v in sevs]
      else:
        vals = [s["id"]] + [s["per_corruption_severity"][panel][v] for v in sevs]
      m = np.array([v[0] for v in vals])
      sd = np.array([v[1] for v in vals])
      ax.plot(xs, m, marker="o", ms=3, label=LABELS[name])
      ax.fill_between(xs, m - sd, m + sd, alpha=0.15)
    ax.set_title(panel, fontsize=9)
    ax.set_xticks(xs)
    ax.set_xlabel("severity (0 = clean)", fontsize=8)
    ax.set_ylabel("accuracy (%)", fontsize=8)
    ax.grid(alpha=0.3)
  for j in range(len(panels), nrow * ncol):
    axes[j // ncol][j % ncol].axis("off")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "results"))
  p.add_argument("--workdir-root", default=os.path.join(ROOT, "runs", "robust_ft"))
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "robust_ft.py"))
  add_override_args(p, "(one task)")
  p.add_argument("--corruptions", nargs="+", default=None, help="eval.ood_corruptions")
  p.add_argument("--severities", nargs="+", type=int, default=None, help="eval.ood_severities")
  p.add_argument("--report-only", action="store_true", help="aggregate finished runs only")
  p.add_argument("--jax-cache", default=os.path.join(ROOT, "runs", "robust_ft", "jax_cache"),
                 help="persistent XLA compilation cache ('' disables): the runs of one method "
                 "differ only in their inputs, so every seed after the first skips compilation")
  args = p.parse_args(argv)
  if not args.report_only:
    enable_compile_cache(args.jax_cache, min_compile_secs=1.0)

  module = load_config_module(args.config, "robust_ft_config")
  os.makedirs(args.out, exist_ok=True)
  # WiSE-FT re-evaluates the ft run of its seed: ft first.
  methods = sorted(args.methods, key=lambda n: 0 if n == "ft" else 1)
  t0 = time.time()
  runs = []
  sample_config = None
  # Seed-major order: an interrupted study still has every method at the first seeds.
  for seed in args.seeds:
    for name in methods:
      config = make_config(module, name, seed, args)
      if sample_config is None or name == "ft":
        sample_config = config
      workdir = os.path.join(args.workdir_root, name, f"seed{seed}")
      if args.report_only:
        if not os.path.exists(os.path.join(workdir, "metrics.json")):
          print(f"  skip {name} seed {seed}: not finished", flush=True)
          continue
        with open(os.path.join(workdir, "metrics.json")) as f:
          metrics = json.load(f)
        wall = metrics.get("wall_time_s", float("nan"))
      else:
        t = time.time()
        ft_dir = (os.path.join(args.workdir_root, "ft", f"seed{seed}") if name == "wise_ft"
                  else None)
        if ft_dir is not None:
          ft_config = make_config(module, "ft", seed, args)
          if _finished(ft_dir, ft_config) is None:
            run_one(ft_config, ft_dir)
        metrics = run_one(config, workdir, ft_dir)
        wall = time.time() - t
        ood = metrics["ood"]
        print(f"[{time.time() - t0:7.1f}s] {name:<8} seed {seed}: ID {ood['id']:.2f}  OOD mean "
              f"{ood['corruption_mean']:.2f}  ({wall:.1f}s)", flush=True)
      runs.append(collect(name, seed, workdir, metrics, wall))
  if not runs:
    print("no finished runs")
    return 1
  present = [n for n in args.methods if any(r["method"] == n for r in runs)]
  summary = summarize(runs, present)
  seeds_done = sorted({r["seed"] for r in runs})
  c = sample_config
  n_train = c.data.train_limit
  setup = (
      f"Setup: `configs/robust_ft.py` — full fine-tuning (`peft.name=full`) of {c.model.name} "
      f"(ImageNet) on {c.data.name}, one task with all 10 classes, {c.data.image_size} px, "
      f"{n_train} training images ({int(round(n_train * 0.9))} for TPGM, which holds out "
      f"`data.val_fraction=0.1` for its radii), {c.data.test_limit} test images, "
      f"{c.train.epochs} epoch(s), batch {c.train.batch_size}, {c.optim.name} lr "
      f"{c.optim.learning_rate}, cross-entropy, augmentation `{c.data.augment}`; seeds "
      f"{seeds_done} (`config.seed`: head init, training subset, data order, noise of the "
      f"corruptions). OOD: the same test images under {', '.join(c.eval.ood_corruptions)} at "
      f"severities {list(c.eval.ood_severities)} (CIFAR-10-C parameter table, "
      "`cft_jax/data/corruptions.py`). No second dataset with Fashion-MNIST's classes is "
      "installed, so there is no natural-shift OOD set (`eval.ood_dataset` evaluates one if "
      "you have it). WiSE-FT = the FT model of the same seed evaluated at "
      "0.5 theta_0 + 0.5 theta (head kept).")
  total_wall = time.time() - t0
  extra = ""
  json_path = os.path.join(args.out, "robust_ft.json")
  if args.report_only and os.path.exists(json_path):
    with open(json_path) as f:
      prev = json.load(f).get("wall_time_s")
    if prev:
      total_wall = prev
      extra = wall_note(prev, len(runs))
  if not args.report_only:
    extra = wall_note(total_wall, len(runs), of="this invocation")
  with open(os.path.join(args.out, "robust_ft.json"), "w") as f:
    json.dump({"setup": setup, "config": json.loads(c.to_json()), "summary": summary,
               "runs": runs, "wall_time_s": total_wall}, f, indent=1)
  text = write_table(summary, runs, os.path.join(args.out, "robust_ft.md"), setup, len(seeds_done),
                     extra)
  write_plot(summary, os.path.join(args.out, "robust_ft.png"),
             f"Fashion-MNIST, {c.model.name} full FT, {c.data.image_size} px: accuracy vs "
             f"corruption severity (mean ± std over seeds {seeds_done})")
  print(text)
  print(f"[robust_ft_study] {len(runs)} runs, {total_wall:.0f}s; wrote "
        f"{args.out}/robust_ft.{{md,json,png}}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
