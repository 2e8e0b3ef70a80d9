"""The paired-comparison statistics of the study protocol (studies/_common.py)."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "studies"))
import _common  # noqa: E402  pylint: disable=wrong-import-position


def test_paired_t_interval_exact():
  # d = a - b = [1, 2, 3]: mean 2, std 1, t_{0.975, 2} = 4.302652729749462.
  r = _common.paired_t_interval([11.0, 12.5, 10.0], [10.0, 10.5, 7.0])
  half = 4.302652729749462 / math.sqrt(3.0)
  assert r["n"] == 3
  assert r["mean"] == pytest.approx(2.0, abs=1e-12)
  assert r["std"] == pytest.approx(1.0, abs=1e-12)
  assert r["lo"] == pytest.approx(2.0 - half, abs=1e-9)   # -0.48413771175
  assert r["hi"] == pytest.approx(2.0 + half, abs=1e-9)   # 4.48413771175


def test_paired_t_interval_four_seeds_and_pairing():
  # d = [0.5, -1, 2, 1.5]: mean 0.75, std sqrt(1.75) = 1.3228756555, t_{0.975, 3} = 3.18244630528.
  b = [40.0, 20.0, 35.0, 50.0]  # large seed-to-seed spread the pairing removes
  a = [x + d for x, d in zip(b, [0.5, -1.0, 2.0, 1.5])]
  r = _common.paired_t_interval(a, b)
  half = 3.1824463052837078 * math.sqrt(1.75) / 2.0
  assert r["mean"] == pytest.approx(0.75, abs=1e-12)
  assert (r["lo"], r["hi"]) == (pytest.approx(0.75 - half, abs=1e-9),
                                pytest.approx(0.75 + half, abs=1e-9))  # [-1.355, 2.855]
  r90 = _common.paired_t_interval(a, b, confidence=0.90)
  assert r["lo"] < r90["lo"] < r90["hi"] < r["hi"]


def test_paired_bootstrap_interval_exact():
  # Two seeds with d = {0, 2}: resampled means are 0, 1, 2 with probabilities 1/4, 1/2, 1/4, so
  # the 2.5% / 97.5% quantiles are exactly 0 and 2.
  assert _common.paired_bootstrap_interval([5.0, 9.0], [5.0, 7.0]) == (0.0, 2.0)
  # Equal differences: a zero-width interval at that difference.
  assert _common.paired_bootstrap_interval([3.0, 4.0, 5.0], [1.5, 2.5, 3.5]) == (1.5, 1.5)
  # Reproducible for a fixed seed.
  a, b = [1.0, 4.0, 2.0, 7.0], [0.0, 1.0, 3.0, 2.0]
  assert (_common.paired_bootstrap_interval(a, b, seed=3)
          == _common.paired_bootstrap_interval(a, b, seed=3))


@pytest.mark.parametrize("a,b", [([1.0], [0.0]), ([1.0, 2.0], [0.0]),
                                 ([1.0, float("nan")], [0.0, 0.0])])
def test_paired_intervals_reject_bad_input(a, b):
  with pytest.raises(ValueError):
    _common.paired_t_interval(a, b)
  with pytest.raises(ValueError):
    _common.paired_bootstrap_interval(a, b)


def test_claim_verdict_rule():
  assert _common.claim_verdict(0.1, 3.0) == "reproduced"
  assert _common.claim_verdict(-2.0, 0.9) == "not reproduced"      # excludes a 1-point gain
  assert _common.claim_verdict(-5.0, -0.5) == "not reproduced"     # a significant loss
  assert _common.claim_verdict(-0.5, 4.5) == "inconclusive"
  assert _common.claim_verdict(-0.5, 0.9, margin=0.5) == "inconclusive"
  # The t interval of test_paired_t_interval_exact decides "inconclusive".
  r = _common.paired_t_interval([11.0, 12.5, 10.0], [10.0, 10.5, 7.0])
  assert _common.claim_verdict(r["lo"], r["hi"]) == "inconclusive"
  with pytest.raises(ValueError):
    _common.claim_verdict(1.0, 0.0)


def test_select_best_mean_over_seeds_first_on_ties():
  scores = {(1e-4, 6.0): [50.0, 52.0], (1e-3, 6.0): [55.0, 49.0], (1e-3, 3.0): [51.0, 53.0]}
  assert _common.select_best(scores) == (1e-3, 6.0)          # means 51, 52, 52: first of the tie
  scores[(1e-4, 6.0)] = [53.0, 53.0]
  assert _common.select_best(scores) == (1e-4, 6.0)          # 53 beats 52 and 52
  assert _common.select_best({"a": [float("nan"), 80.0], "b": [45.0, 45.0]}) == "b"  # NaN -> 0
  with pytest.raises(ValueError):
    _common.select_best({})


def test_natural_images_compare_pairs_by_seed():
  import natural_images  # pylint: disable=g-import-not-at-top
  runs = [{"arm": arm, "seed": s, "metrics": {"final_accuracy": v, "ood": {"id": v}}}
          for arm, vals in (("a", [11.0, 12.5, 10.0, 99.0]), ("b", [10.0, 10.5, 7.0]))
          for s, v in enumerate(vals)]                   # seed 3 of "a" has no pair: ignored
  r = natural_images.compare(runs, natural_images.Claim("a beats b", "a", "b"))
  assert r["seeds"] == [0, 1, 2] and r["mean"] == pytest.approx(2.0)
  assert r["lo"] == pytest.approx(2.0 - 4.302652729749462 / math.sqrt(3.0))
  assert r["verdict"] == "inconclusive"
  # "keeps in-distribution accuracy": A - B + 1 point.
  r = natural_images.compare(runs, natural_images.Claim("b keeps a", "b", "a", ("ood", "id")))
  assert r["mean"] == pytest.approx(-1.0)                # d + 1 = [0, -1, -2]
  assert r["hi"] == pytest.approx(-1.0 + 4.302652729749462 / math.sqrt(3.0))
  assert r["verdict"] == "inconclusive"
  assert natural_images.compare(runs[:1] + runs[4:5], natural_images.Claim("x", "a", "b")) is None


def test_recorded_runs_reused_only_at_the_same_selection(tmp_path):
  """A study's committed results JSON stands in for run folders that are gone, but only for arms
  whose selected learning rate and own value are unchanged."""
  import json
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "studies"))
  import natural_images  # pylint: disable=g-import-not-at-top
  sel = {"ce": {"learning_rate": 1e-3}, "der": {"learning_rate": 3e-4, "method.alpha": 0.3}}
  runs = [{"arm": "ce", "seed": 0, "metrics": {"final_accuracy": 40.0}},
          {"arm": "der", "seed": 0, "metrics": {"final_accuracy": 30.0}},
          {"arm": "gone", "seed": 0, "metrics": {"final_accuracy": 1.0}}]
  path = tmp_path / "cifar10_x.json"
  path.write_text(json.dumps({"selected": sel, "runs": runs}))
  keys = {"ce": None, "der": "method.alpha"}
  got = natural_images.recorded_runs(str(path), keys, sel)
  assert sorted(got) == [("ce", 0), ("der", 0)] and got[("ce", 0)]["metrics"]["final_accuracy"] == 40
  changed = {"ce": {"learning_rate": 3e-3}, "der": {"learning_rate": 3e-4, "method.alpha": 1.0}}
  assert natural_images.recorded_runs(str(path), keys, changed) == {}
  assert natural_images.recorded_runs(str(tmp_path / "none.json"), keys, sel) == {}


def test_tuned_arm_reuses_its_fixed_twin_runs():
  """aEPG tuned tau at tau 6 IS the aEPG tau 6 arm (same config, same arg): ``same_run_as`` names
  that twin (of the same PEFT method), and nothing for another tau or an arm without a twin."""
  import argparse
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "studies"))
  import natural_images  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(val_fraction=0.1, data_root=None, set=[])
  arms = {a.name: a for a in natural_images.STUDIES["objectives"]["arms"]}
  twin = natural_images.same_run_as("objectives", arms["aepg_seq"], 6.0, args)
  assert twin is not None and twin.name == "aepg_tau6_seq"
  assert natural_images.same_run_as("objectives", arms["aepg_lae"], 6.0, args).name == \
      "aepg_tau6_lae"
  assert natural_images.same_run_as("objectives", arms["aepg_seq"], 2.0, args) is None
  assert natural_images.same_run_as("objectives", arms["label_smoothing_seq"], 0.1, args) is None
  assert natural_images.same_run_as("objectives", arms["ce_seq"], None, args) is None


def test_diverged_tuning_run_scores_nan_and_is_not_retrained(tmp_path, monkeypatch):
  """A tuning run that stops on a non-finite loss scores NaN (``select_best`` counts it as 0), its
  folder remembers the divergence for the same settings, and other settings train again."""
  import argparse
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "studies"))
  import natural_images  # pylint: disable=g-import-not-at-top
  from cft_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(val_fraction=0.1, data_root=None, set=[])
  arm = {a.name: a for a in natural_images.STUDIES["objectives"]["arms"]}["focal_seq"]
  config = natural_images.natural_config(arm, 100, args, 3e-4, 1.0, tuning=True)
  calls = []

  def diverging_run(cfg, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_lib.validate_config(cfg).to_dict(), f)
    raise FloatingPointError("non-finite loss nan at task 2 (0-based), step 60; stopped.")

  monkeypatch.setattr(natural_images, "run_one", diverging_run)
  wd = str(tmp_path / "focal")
  assert np.isnan(natural_images.tune_score(config, wd))
  assert "non-finite loss" in open(os.path.join(wd, natural_images.DIVERGED)).read()
  assert np.isnan(natural_images.tune_score(config, wd)) and len(calls) == 1  # remembered
  other = natural_images.natural_config(arm, 100, args, 1e-3, 1.0, tuning=True)
  monkeypatch.setattr(natural_images, "run_one", lambda cfg, w: {"val": {"final_accuracy": 41.5}})
  assert natural_images.tune_score(other, wd) == 41.5  # other settings: trained (not the marker)
  assert _common.select_best({"lr3e-4": [float("nan")], "lr1e-3": [41.5]}) == "lr1e-3"


@pytest.mark.parametrize("phase", ["report", "final"])
def test_recorded_seeds_stay_whatever_seeds_a_later_call_names(tmp_path, monkeypatch, phase):
  """Seeds 3-4 committed in the study's JSON (run folders gone) stay in the result when a later
  call names only seeds 0-2, and are never retrained; seeds not recorded train in phase final."""
  import argparse
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "studies"))
  import natural_images  # pylint: disable=g-import-not-at-top
  sel = {"ce_seq": {"learning_rate": 1e-3}, "er_seq": {"learning_rate": 3e-3}}
  runs = ([{"arm": "ce_seq", "seed": s, "metrics": {"final_accuracy": 40.0 + s}} for s in range(5)]
          + [{"arm": "er_seq", "seed": s, "metrics": {"final_accuracy": 50.0 + s}}
             for s in range(2)])
  (tmp_path / "cifar10_class_il_recipes.json").write_text(
      json.dumps({"selected": sel, "runs": runs}))
  trained = []

  def fake_run(cfg, workdir):
    trained.append((cfg.seed, workdir))
    return {"final_accuracy": 60.0, "task_il": {"final_accuracy": 90.0}}

  monkeypatch.setattr(natural_images, "run_one", fake_run)
  args = argparse.Namespace(val_fraction=0.1, data_root=None, set=[], fresh=False,
                            out=str(tmp_path), phase=phase, seeds=[0, 1, 2], extra_seeds=[3, 4],
                            workdir_root=str(tmp_path / "runs"))
  arms = [a for a in natural_images.STUDIES["class_il_recipes"]["arms"]
          if a.name in ("ce_seq", "er_seq")]
  got = natural_images.final("class_il_recipes", arms, sel, args, log=lambda s: None)
  by_arm = {a: sorted((r["seed"], r["metrics"]["final_accuracy"]) for r in got if r["arm"] == a)
            for a in ("ce_seq", "er_seq")}
  assert by_arm["ce_seq"] == [(s, 40.0 + s) for s in range(5)]
  if phase == "report":  # nothing trains: er_seq has its two recorded seeds
    assert by_arm["er_seq"] == [(0, 50.0), (1, 51.0)] and not trained
  else:  # er_seq seed 2 was never run: it trains, once
    assert by_arm["er_seq"] == [(0, 50.0), (1, 51.0), (2, 60.0)]
    assert [s for s, _ in trained] == [2]


def test_a_call_naming_some_arms_reports_every_arm(tmp_path, monkeypatch):
  """``--phase final --arms er_seq`` trains er_seq only, and the report it writes still holds
  ce_seq (recorded in the study's JSON, run folders gone) and aepg_tau6_seq (a finished run
  folder at the selected settings); a finished folder of OTHER settings is not read as a result."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "studies"))
  import natural_images  # pylint: disable=g-import-not-at-top
  from cft_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  sel = {"ce_seq": {"learning_rate": 1e-3}, "aepg_tau6_seq": {"learning_rate": 1e-3},
         "er_seq": {"learning_rate": 3e-3}}
  out, root = tmp_path / "out", tmp_path / "runs"
  out.mkdir()
  (out / "cifar10_class_il_recipes_selected.json").write_text(json.dumps(sel))
  metrics = lambda acc: {"final_accuracy": acc, "avg_incremental_accuracy": acc,  # noqa: E731
                         "forgetting": 1.0, "task_il": {"final_accuracy": 90.0}}
  recorded = [{"arm": "ce_seq", "seed": s, "metrics": metrics(40.0 + s)} for s in range(3)]
  (out / "cifar10_class_il_recipes.json").write_text(
      json.dumps({"selected": sel, "runs": recorded}))
  args = natural_images.argparse.Namespace(val_fraction=0.1, data_root="", set=[])
  arms = {a.name: a for a in natural_images.STUDIES["class_il_recipes"]["arms"]}

  def finished(arm, seed, lr, acc):  # a run folder as train.run leaves it
    wd = root / "objectives" / "final" / arm / f"seed{seed}"
    wd.mkdir(parents=True)
    cfg = natural_images.natural_config(arms[arm], seed, args, lr)
    (wd / "config.json").write_text(config_lib.validate_config(cfg).to_json())
    (wd / "metrics.json").write_text(json.dumps(metrics(acc)))

  for s in range(3):
    finished("aepg_tau6_seq", s, 1e-3, 30.0 + s)
  finished("ce_seq", 0, 3e-2, 99.0)  # other settings: the recorded seed 0 (40.0) stands
  trained = []

  def fake_run(cfg, workdir):
    trained.append(os.path.relpath(workdir, root))
    return metrics(60.0)

  monkeypatch.setattr(natural_images, "run_one", fake_run)
  monkeypatch.setattr(natural_images, "enable_compile_cache", lambda *a, **k: None)
  assert natural_images.main(["--study", "class_il_recipes", "--phase", "final", "--arms",
                              "er_seq", "--extra-seeds", "--out", str(out), "--workdir-root",
                              str(root)]) == 0
  assert sorted(trained) == [f"objectives/final/er_seq/seed{s}" for s in range(3)]  # runs_under
  got = json.loads((out / "cifar10_class_il_recipes.json").read_text())["runs"]
  by_arm = {}
  for r in got:
    by_arm.setdefault(r["arm"], []).append((r["seed"], r["metrics"]["final_accuracy"]))
  assert sorted(by_arm["ce_seq"]) == [(0, 40.0), (1, 41.0), (2, 42.0)]
  assert sorted(by_arm["aepg_tau6_seq"]) == [(0, 30.0), (1, 31.0), (2, 32.0)]
  assert sorted(by_arm["er_seq"]) == [(s, 60.0) for s in range(3)]
  md = (out / "cifar10_class_il_recipes.md").read_text()
  assert "| ER beats seq-LoRA CE | final_accuracy | 3 | +19.00 ± 1.00 |" in md
