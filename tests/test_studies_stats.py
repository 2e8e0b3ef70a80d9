"""The study protocol's statistics (studies/stats.py), its claims registry (studies/claims.py) and
the study runner's tuning / pairing rules (studies/natural_images.py), with exact numbers."""

import argparse
import json
import math
import os
import sys

import numpy as np
import pytest

STUDIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies")
sys.path.insert(0, STUDIES)
import _common  # noqa: E402  pylint: disable=wrong-import-position
import claims  # noqa: E402  pylint: disable=wrong-import-position
import natural_images  # noqa: E402  pylint: disable=wrong-import-position
import stats  # noqa: E402  pylint: disable=wrong-import-position


def _t2_sf(t):
  """P(T_2 >= t) for Student's t with 2 degrees of freedom, in closed form:
  0.5 (1 - t / sqrt(t^2 + 2))."""
  return 0.5 * (1.0 - t / math.sqrt(t * t + 2.0))


# --- intervals ------------------------------------------------------------------------------


def test_paired_t_interval_exact():
  # d = a - b = [1, 2, 3]: mean 2, std 1, t_{0.975, 2} = 4.302652729749462.
  r = stats.paired_t_interval([11.0, 12.5, 10.0], [10.0, 10.5, 7.0])
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
  r = stats.paired_t_interval(a, b)
  half = 3.1824463052837078 * math.sqrt(1.75) / 2.0
  assert r["mean"] == pytest.approx(0.75, abs=1e-12)
  assert (r["lo"], r["hi"]) == (pytest.approx(0.75 - half, abs=1e-9),
                                pytest.approx(0.75 + half, abs=1e-9))  # [-1.355, 2.855]
  r90 = stats.paired_t_interval(a, b, confidence=0.90)
  assert r["lo"] < r90["lo"] < r90["hi"] < r["hi"]


def test_paired_bootstrap_interval_exact():
  # Two seeds with d = {0, 2}: resampled means are 0, 1, 2 with probabilities 1/4, 1/2, 1/4, so
  # the 2.5% / 97.5% quantiles are exactly 0 and 2.
  assert stats.paired_bootstrap_interval([5.0, 9.0], [5.0, 7.0]) == (0.0, 2.0)
  assert stats.paired_bootstrap_interval([3.0, 4.0, 5.0], [1.5, 2.5, 3.5]) == (1.5, 1.5)
  a, b = [1.0, 4.0, 2.0, 7.0], [0.0, 1.0, 3.0, 2.0]
  assert (stats.paired_bootstrap_interval(a, b, seed=3)
          == stats.paired_bootstrap_interval(a, b, seed=3))


@pytest.mark.parametrize("a,b", [([1.0], [0.0]), ([1.0, 2.0], [0.0]),
                                 ([1.0, float("nan")], [0.0, 0.0])])
def test_paired_intervals_reject_bad_input(a, b):
  with pytest.raises(ValueError):
    stats.paired_t_interval(a, b)
  with pytest.raises(ValueError):
    stats.paired_bootstrap_interval(a, b)


# --- tests, Holm, TOST, power -----------------------------------------------------------------


def test_one_sided_t_test_closed_form():
  # d = [1, 2, 3]: t = 2 / (1 / sqrt 3) = 2 sqrt 3 against 0; df = 2 has a closed-form CDF.
  t = 2.0 * math.sqrt(3.0)
  assert stats.t_test_p([1.0, 2.0, 3.0], 0.0, "greater") == pytest.approx(_t2_sf(t), abs=1e-12)
  assert stats.t_test_p([1.0, 2.0, 3.0], 0.0, "less") == pytest.approx(1 - _t2_sf(t), abs=1e-12)
  # against mu_0 = 4: t = -2 sqrt 3
  assert stats.t_test_p([1.0, 2.0, 3.0], 4.0, "less") == pytest.approx(_t2_sf(t), abs=1e-12)
  assert stats.t_test_p([2.0, 2.0], 1.0, "greater") == 0.0   # no spread: decided by the mean
  assert stats.t_test_p([2.0, 2.0], 1.0, "less") == 1.0
  with pytest.raises(ValueError):
    stats.t_test_p([1.0], 0.0, "greater")


def test_holm_hand_worked_example():
  # Sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running
  # max 0.06). At alpha 0.05 Holm rejects the first two only (Bonferroni: only 0.005).
  adj, mult = stats.holm([0.01, 0.04, 0.03, 0.005])
  np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02], atol=1e-12)
  np.testing.assert_array_equal(mult, [3, 1, 2, 4])
  # A registered claim that has not run counts as p = 1 (m fixed at registration).
  np.testing.assert_allclose(stats.holm([0.01, float("nan")])[0], [0.02, 1.0], atol=1e-12)


def test_tost_hand_worked_example():
  # d = [0, 1, 2]: mean 1, sd 1, n 3, se 1/sqrt 3, df 2.
  se = 1.0 / math.sqrt(3.0)
  r = stats.tost([0.0, 1.0, 2.0], 3.0)
  assert r["p_lower"] == pytest.approx(_t2_sf((1 + 3) / se), abs=1e-12)   # 0.010102
  assert r["p_upper"] == pytest.approx(_t2_sf((3 - 1) / se), abs=1e-12)   # 0.037090
  assert r["p"] == pytest.approx(0.0370900, abs=1e-6) and r["p"] > stats.ALPHA  # not shown
  # margin 4: p = P(T_2 >= 3 sqrt 3) = 0.017543 < 0.025: equivalent within +-4 ...
  r4 = stats.tost([0.0, 1.0, 2.0], 4.0)
  assert r4["p"] == pytest.approx(_t2_sf(3.0 / se), abs=1e-12) and r4["p"] < stats.ALPHA
  # ... exactly when the 95% interval, 1 +- 4.3027 / sqrt 3 = [-1.484, 3.484], lies inside
  # (-margin, margin): inside (-4, 4), not inside (-3, 3).
  ci = stats.paired_t_interval([0.0, 1.0, 2.0], [0.0, 0.0, 0.0])
  assert -4 < ci["lo"] and ci["hi"] < 4 and not (-3 < ci["lo"] and ci["hi"] < 3)


def test_decide_four_outcomes():
  sup = lambda d, m=1.0: stats.decide(stats.claim_tests(d, "superiority", m), "superiority")  # noqa: E731,E501
  assert sup([3.0, 4.0, 5.0]) == "reproduced"
  assert sup([-5.0, -4.0, -3.0]) == "worse than the baseline"
  assert sup([0.1, -0.1, 0.0, 0.05, -0.05]) == "no gain >= margin"  # below 1, not below 0
  assert sup([-3.0, 1.0, 5.0]) == "inconclusive"
  ni = stats.claim_tests([-0.2, 0.1, 0.0, 0.2], "non_inferiority", 1.0)
  assert stats.decide(ni, "non_inferiority") == "reproduced"
  ni = stats.claim_tests([-3.0, -2.5, -2.8], "non_inferiority", 1.0)
  assert stats.decide(ni, "non_inferiority") == "worse than the baseline by >= margin"
  eq = stats.claim_tests([0.0, 1.0, 2.0], "equivalence", 4.0)
  assert stats.decide(eq, "equivalence") == "reproduced (level)"
  # A gain shown but below the margin is "reproduced" (the direction holds).
  assert sup([1.0, 2.0, 3.0, 2.5, 0.5], 5.0) == "reproduced"
  # Holm: reproduced alone (p = 0.0089) but not at multiplier 3 (0.027 > 0.025), and no gain
  # >= 2.5 is not shown either (p = 0.10): inconclusive.
  t = stats.claim_tests([1.0, 2.0, 3.0, 2.5, 0.5], "superiority", 2.5)
  assert t["p_support"] < 0.01 and t["p_refute"] > 0.1 and 3 * t["p_support"] > stats.ALPHA
  assert stats.decide(t, "superiority") == "reproduced"
  assert stats.decide(t, "superiority", adjusted=3 * t["p_support"], multiplier=3) == \
      "inconclusive"


def test_family_verdicts_count_the_same_runs_once():
  d_strong, d_weak = [3.0, 4.0, 5.0, 4.5], [1.0, 2.0, 3.0, 2.5, 0.5]
  base = {"kind": "superiority", "margin": 0.5}
  fam = [{**base, "d": d_weak, "same_as": "A vs B"}, {**base, "d": d_weak, "same_as": "A vs B"},
         {**base, "d": d_strong, "same_as": "C vs B"}]
  v = stats.family_verdicts(fam)
  p_weak = stats.claim_tests(d_weak, "superiority", 0.5)["p_support"]
  p_strong = stats.claim_tests(d_strong, "superiority", 0.5)["p_support"]
  assert v[0]["p"] == p_weak and p_strong < p_weak  # the support side is each claim's min
  # Two distinct tests: the weak one is Holm's second (multiplier 1 after the strong one's 2).
  assert v[0]["p_holm"] == v[1]["p_holm"] == pytest.approx(max(2 * p_strong, p_weak))
  assert v[2]["p_holm"] == pytest.approx(2 * p_strong)
  fam.append({**base, "d": None})  # registered, not run: counts as p = 1 (m = 3 now)
  assert stats.family_verdicts(fam)[2]["p_holm"] == pytest.approx(3 * p_strong)
  assert stats.family_verdicts(fam)[3]["holm"] is None


def test_seeds_needed_by_hand():
  # std 1, margin 2: n = 6 gives 2 t_{.975,5} / sqrt 6 = 2.099 >= 2, n = 7 gives 1.850 < 2.
  assert stats.seeds_needed(1.0, 2.0) == 7
  assert stats.seeds_needed(1.0, 2.0, family_size=10) > 7
  assert stats.seeds_needed(float("nan"), 1.0) is None
  assert stats.seeds_needed(100.0, 0.01, max_seeds=50) is None


# --- registry ---------------------------------------------------------------------------------


def _claim(**kw):
  base = dict(id="t.a_vs_b", dataset="cifar10", study="class_il_recipes", family="test",
              text="a beats b", better=("ce_seq",), worse=("er_seq",), margin=1.0,
              margin_source="test", paper="test")
  return claims.Claim(**{**base, **kw})


@pytest.fixture
def registered(monkeypatch):
  """A registry holding one test claim on seeds 0-2 (class_il_recipes, cifar10)."""
  c = _claim()
  monkeypatch.setattr(claims, "REGISTRY", (c,))
  monkeypatch.setattr(claims, "SEEDS", {("cifar10", "class_il_recipes"): (0, 1, 2)})
  return c


def _runs(values, prov=None):
  return [{"arm": arm, "seed": s, "workdir": f"runs/x/{arm}/seed{s}", "provenance": prov,
           "metrics": {"final_accuracy": v}} for arm, vs in values.items()
          for s, v in enumerate(vs)]


def test_compare_pairs_by_seed_on_the_registered_seeds(registered):
  r = natural_images.compare(_runs({"ce_seq": [11.0, 12.5, 10.0], "er_seq": [10.0, 10.5, 7.0]}),
                             registered, (0, 1, 2))
  assert r["status"] == "complete" and r["d"] == [1.0, 2.0, 3.0]
  assert r["lo"] == pytest.approx(2.0 - 4.302652729749462 / math.sqrt(3.0))
  missing = natural_images.compare(_runs({"ce_seq": [1.0, 2.0, 3.0], "er_seq": [1.0, 2.0]}),
                                   registered, (0, 1, 2))
  assert missing["status"] == "incomplete" and missing["missing"] == {"er_seq": [2]}


def test_an_unregistered_claim_is_refused(registered):
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0], "er_seq": [0.0, 1.0, 1.0]})
  with pytest.raises(claims.UnregisteredClaimError, match="not registered"):
    natural_images.compare(runs, _claim(id="t.other"), (0, 1, 2))
  with pytest.raises(claims.UnregisteredClaimError, match="margin"):  # changed after the fact
    natural_images.compare(runs, _claim(margin=0.5), (0, 1, 2))
  with pytest.raises(claims.UnregisteredClaimError, match="no seed set"):
    claims.seeds("tiny_imagenet", "robust_ft")


def test_a_seed_set_that_differs_between_arms_is_refused(registered):
  # er_seq ran an extra seed 3 (say, added because its first seeds looked noisy): refused.
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0], "er_seq": [0.0, 1.0, 1.0, 5.0]})
  with pytest.raises(claims.UnregisteredClaimError, match="unregistered seeds"):
    claims.paired_scores(registered, natural_images.claim_scores(runs, registered), (0, 1, 2))


def test_group_claim_averages_its_arms_per_seed(monkeypatch):
  c = _claim(better=("ce_seq", "aepg_tau6_seq"))
  monkeypatch.setattr(claims, "REGISTRY", (c,))
  runs = _runs({"ce_seq": [10.0, 20.0], "aepg_tau6_seq": [14.0, 22.0], "er_seq": [11.0, 20.0]})
  assert claims.paired_scores(c, natural_images.claim_scores(runs, c), (0, 1)) == \
      ([12.0, 21.0], [11.0, 20.0])


def test_runs_of_different_code_do_not_pair(registered):
  new = {"code_commit": "abc", "cpu_model": "AMD EPYC", "commit": "abc", "dirty": False}
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, new) + _runs({"er_seq": [0.0, 1.0, 1.0]})
  assert natural_images.compare(runs, registered, (0, 1, 2))["status"] == "unpaired"
  legacy = {**new, "code_commit": natural_images.LEGACY_CODE}  # = runs without a record
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, legacy) + _runs({"er_seq": [0.0, 1.0, 1.0]})
  assert natural_images.compare(runs, registered, (0, 1, 2))["status"] == "complete"
  dirty = {**legacy, "dirty": True}
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, dirty) + _runs({"er_seq": [0.0, 1.0, 1.0]}, legacy)
  assert natural_images.compare(runs, registered, (0, 1, 2))["status"] == "unpaired"
  # a checkout dirty only in the study's own results (recorded before "dirty" meant the code)
  results_only = {**dirty, "commit": next(iter(natural_images.RESULTS_ONLY_DIRTY))}
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, results_only) + _runs({"er_seq": [0.0, 1.0, 1.0]},
                                                                  legacy)
  assert natural_images.compare(runs, registered, (0, 1, 2))["status"] == "complete"


def test_a_claim_pairs_seed_by_seed_each_seed_on_one_machine(registered):
  """Protocol section 4 (machine changes): seeds 0-1 ran both arms on one machine, seed 2 on
  another: complete, with two blocks, and the differences are those of each seed's own pair."""
  base = {"code_commit": "abc", "cpu_model": "AMD EPYC", "commit": "abc", "dirty": False}
  zen5 = {**base, "cpu_id": "AuthenticAMD family 26 model 2 stepping 1; avx2 avx512f"}
  zen4 = {**base, "cpu_id": "AuthenticAMD family 25 model 17 stepping 1; avx2 avx512f"}
  runs = [r for r in _runs({"ce_seq": [11.0, 12.5, 10.0], "er_seq": [10.0, 10.5, 7.0]}, zen5)
          if r["seed"] < 2] + [r for r in _runs({"ce_seq": [0, 0, 10.0], "er_seq": [0, 0, 7.0]},
                                                zen4) if r["seed"] == 2]
  r = natural_images.compare(runs, registered, (0, 1, 2))
  assert r["status"] == "complete" and r["d"] == [1.0, 2.0, 3.0]
  assert r["blocks"] == [{"code": "abc", "cpu_model": "AMD EPYC", "cpu_id": zen5["cpu_id"],
                          "seeds": [0, 1]},
                         {"code": "abc", "cpu_model": "AMD EPYC", "cpu_id": zen4["cpu_id"],
                          "seeds": [2]}]
  assert natural_images._blocks_lines([r]) == [
      "", "Claims whose seeds ran on several machines (each seed's pair on one):",
      f"* {registered.text}: seeds [0, 1] on {zen5['cpu_id']} (code abc); "
      f"seeds [2] on {zen4['cpu_id']} (code abc)"]
  # seed 2's er_seq run moves to the first machine: that seed's pair is split, the claim unpaired
  runs[-1] = {**runs[-1], "provenance": zen5}
  r = natural_images.compare(runs, registered, (0, 1, 2))
  assert r["status"] == "unpaired" and r["unpaired_seeds"] == [2] and "d" not in r
  # a run of a checkout recorded before cpu_id existed counts as the machine its continuation
  # checks reproduced it on (the generation alone): it pairs with a run recorded there, not
  # with one of another generation
  bf = {"code_commit": "abc", "cpu_model": "AMD EPYC", "dirty": False,
        "commit": next(iter(natural_images.LEGACY_CPU_IDS))}
  assert natural_images.machine(bf) == "AuthenticAMD family 26 model 2 stepping 1"
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, bf) + _runs({"er_seq": [0.0, 1.0, 1.0]}, zen5)
  r = natural_images.compare(runs, registered, (0, 1, 2))
  assert r["status"] == "complete" and r["blocks"][0]["cpu_id"] == zen5["cpu_id"]
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, bf) + _runs({"er_seq": [0.0, 1.0, 1.0]}, zen4)
  r = natural_images.compare(runs, registered, (0, 1, 2))
  assert r["status"] == "unpaired" and r["unpaired_seeds"] == [0, 1, 2]
  assert not natural_images.same_machine(zen5["cpu_id"], zen5["cpu_id"] + " avx512_bf16")


def test_pair_here_reruns_a_seeds_partner_on_this_machine_and_keeps_the_first_record(
    tmp_path, monkeypatch, registered):
  """Protocol section 4 (machine changes): ce_seq's seeds were recorded on machine A (er_seq's
  seed 0 too); this machine B trains er_seq's seeds 1-2. Without --pair-here seeds 1-2 are
  unpaired; with it the runs recorded on A that a claim needs to pair train again here (ce_seq
  1-2; seed 0 already pairs on A and is not re-run), both records are kept, and each seed pairs
  within the first block that holds both arms (seed 0: A; seeds 1-2: B)."""
  code = {"code_commit": "abc", "commit": "abc", "cpu_model": "AMD EPYC", "dirty": False}
  a = {**code, "cpu_id": "AuthenticAMD family 26 model 2 stepping 1; avx2 avx512f"}
  b = {**code, "cpu_id": "AuthenticAMD family 25 model 17 stepping 1; avx2 avx512f"}
  sel = {"ce_seq": {"learning_rate": 1e-3}, "er_seq": {"learning_rate": 3e-3}}
  rec = lambda arm, seed, acc, prov: {  # noqa: E731
      "arm": arm, "seed": seed, "workdir": f"runs/{arm}/seed{seed}", "provenance": prov,
      "settings": sel[arm], "metrics": _metrics(acc)}
  (tmp_path / "cifar10_class_il_recipes.json").write_text(json.dumps({"selected": sel, "runs": [
      rec("ce_seq", s, 40.0 + s, a) for s in range(3)] + [rec("er_seq", 0, 38.0, a)]}))
  monkeypatch.setattr(natural_images.provenance_lib, "provenance", lambda: b)
  trained = []

  def run_here(cfg, wd):
    trained.append((cfg.method.name, cfg.seed))
    return {**_metrics(30.0 + cfg.seed + (cfg.method.name != "er")), "provenance": b}

  monkeypatch.setattr(natural_images, "run_one", run_here)
  arms = [x for x in natural_images.study_arms("cifar10", "class_il_recipes")
          if x.name in ("ce_seq", "er_seq")]
  er = [x for x in arms if x.name == "er_seq"]
  runs = natural_images.run_seeds("class_il_recipes", er, sel, [0, 1, 2],
                                  _args(tmp_path, phase="final"), lambda m: None)
  assert trained == [("er", 1), ("er", 2)]  # er_seq's missing seeds only
  r = natural_images.compare(runs, registered, (0, 1, 2))
  assert r["status"] == "unpaired" and r["unpaired_seeds"] == [1, 2]
  trained.clear()
  runs = natural_images.run_seeds("class_il_recipes", arms, sel, [0, 1, 2],
                                  _args(tmp_path, phase="final", pair_here=True), lambda m: None)
  # the runs recorded on A that seeds 1-2 need here train: ce_seq 1-2 (seed 0 pairs on A)
  assert sorted(trained) == [("sequential", 1), ("sequential", 2)]
  saved = json.loads((tmp_path / "cifar10_class_il_recipes.json").read_text())["runs"]
  assert sorted((x["arm"], x["seed"], x["provenance"] == a) for x in saved) == [
      ("ce_seq", 0, True), ("ce_seq", 1, False), ("ce_seq", 1, True),
      ("ce_seq", 2, False), ("ce_seq", 2, True), ("er_seq", 0, True),
      ("er_seq", 1, False), ("er_seq", 2, False)]
  r = natural_images.compare(runs, registered, (0, 1, 2))
  assert r["status"] == "complete"
  # seed 0: A's pair (40 - 38, the first block holding both); seeds 1-2: B's (31 + s - (30 + s))
  assert r["d"] == [2.0, 1.0, 1.0]
  assert [(x["cpu_id"], x["seeds"]) for x in r["blocks"]] == [(a["cpu_id"], [0]),
                                                               (b["cpu_id"], [1, 2])]
  # the per-arm summaries count each seed once: the first record
  assert [x["metrics"]["final_accuracy"] for x in natural_images.first_runs(runs)
          if x["arm"] == "ce_seq"] == [40.0, 41.0, 42.0]
  # a later call trains nothing: every seed pairs
  trained.clear()
  natural_images.run_seeds("class_il_recipes", arms, sel, [0, 1, 2],
                           _args(tmp_path, phase="final", pair_here=True), lambda m: None)
  assert trained == []
  # on machine A, whose runs of before cpu_id name its generation alone, nothing trains either
  gen_a = a["cpu_id"].split(";")[0]
  for x in saved:
    if x["provenance"] == a:
      x["provenance"] = {**a, "cpu_id": gen_a}
  (tmp_path / "cifar10_class_il_recipes.json").write_text(json.dumps({"selected": sel,
                                                                       "runs": saved}))
  monkeypatch.setattr(natural_images.provenance_lib, "provenance", lambda: a)
  natural_images.run_seeds("class_il_recipes", arms, sel, [0], _args(tmp_path, phase="final",
                                                                    pair_here=True), lambda m: None)
  assert trained == []
  # a third machine C with --pair-here for ce_seq alone: er_seq has no run on C and none is
  # coming in this call, so nothing trains (re-running ce_seq there would pair nothing) ...
  c = {**code, "cpu_id": "GenuineIntel family 6 model 143 stepping 8; avx2 avx512f"}
  monkeypatch.setattr(natural_images.provenance_lib, "provenance", lambda: c)
  ce = [x for x in arms if x.name == "ce_seq"]
  natural_images.run_seeds("class_il_recipes", ce, sel, [0, 1, 2],
                           _args(tmp_path, phase="final", pair_here=True), lambda m: None)
  assert trained == []
  # ... while a new seed 3 of er_seq trained on C makes its recorded ce_seq partner train there
  (tmp_path / "cifar10_class_il_recipes.json").write_text(json.dumps({"selected": sel, "runs": (
      saved + [rec("ce_seq", 3, 43.0, a)])}))
  natural_images.run_seeds("class_il_recipes", arms, sel, [0, 1, 2, 3],
                           _args(tmp_path, phase="final", pair_here=True), lambda m: None)
  assert trained == [("sequential", 3), ("er", 3)]


def test_registry_is_consistent_with_the_studies():
  ids = claims.by_id()
  assert len(ids) == len(claims.REGISTRY)
  for c in claims.REGISTRY:
    arms = {a.name for a in natural_images.study_arms(c.dataset, c.study)}
    assert set(c.better + c.worse) <= arms, c.id
    assert c.study in natural_images.DATASETS[c.dataset]["studies"], c.id
    assert c.margin > 0 and c.margin_source and c.paper, c.id
  for (dataset, study), seeds in claims.SEEDS.items():
    assert len(seeds) >= 5 and len(set(seeds)) == len(seeds), (dataset, study)
    assert not set(seeds) & set(claims.TUNE_SEEDS + claims.PILOT_SEEDS)


def test_rendered_claims_and_readme_tables_are_up_to_date():
  assert claims.main(["--check"]) == 0, "run `python studies/claims.py`"


# --- tuning -----------------------------------------------------------------------------------


def test_select_best_mean_over_seeds_first_on_ties():
  scores = {(1e-4, 6.0): [50.0, 52.0], (1e-3, 6.0): [55.0, 49.0], (1e-3, 3.0): [51.0, 53.0]}
  assert _common.select_best(scores) == (1e-3, 6.0)          # means 51, 52, 52: first of the tie
  scores[(1e-4, 6.0)] = [53.0, 53.0]
  assert _common.select_best(scores) == (1e-4, 6.0)          # 53 beats 52 and 52
  assert _common.select_best({"a": [float("nan"), 80.0], "b": [45.0, 45.0]}) == "b"  # NaN -> 0
  with pytest.raises(ValueError):
    _common.select_best({})


def test_extend_one_step_past_the_edge():
  assert natural_images.extend((3e-4, 1e-3, 3e-3), "low") == 1e-4
  assert natural_images.extend((3e-4, 1e-3, 3e-3), "high") == 1e-2
  assert natural_images.extend((3e-5, 1e-4, 3e-4), "high") == 1e-3
  assert natural_images.extend((2.0, 6.0, 12.0), "high") == 20.0
  assert natural_images.extend((0.1, 0.3, 1.0), "low") == 0.03
  with pytest.raises(ValueError):
    natural_images.extend((1.0,), "low")


def _args(tmp_path, **kw):
  base = dict(val_fraction=0.1, data_root="", set=[], dataset="cifar10", fresh=False,
              out=str(tmp_path), workdir_root=str(tmp_path / "runs"), tune_seeds=[100, 101],
              grid={}, phase="tune", seeds=None)
  return argparse.Namespace(**{**base, **kw})


def test_tuning_extends_an_edge_pick_and_reselects(tmp_path, monkeypatch):
  """ER's best lr is the grid's top (3e-3): the grid gains 1e-2 (both tuning seeds), which wins
  and is recorded with its extension; tuning runs never read the test images."""
  curve = {3e-4: 40.0, 1e-3: 45.0, 3e-3: 50.0, 1e-2: 52.0}
  seen = []

  def fake_score(cfg, workdir):
    assert cfg.eval.test is False and not cfg.eval.ood_corruptions
    seen.append((cfg.optim.learning_rate, cfg.seed))
    return curve[cfg.optim.learning_rate] + (cfg.seed - 100)

  monkeypatch.setattr(natural_images, "tune_score", fake_score)
  args = _args(tmp_path)
  arm = {a.name: a for a in natural_images.study_arms("cifar10", "class_il_recipes")}["er_seq"]
  sel = natural_images.tune("class_il_recipes", [arm], args, log=lambda s: None)["er_seq"]
  assert sel["learning_rate"] == 1e-2 and sel["val_class_il_final"]["lr0.01"] == [52.0, 53.0]
  assert sel["extended"] == [{"axis": "learning_rate", "side": "high", "value": 1e-2}]
  assert sel["still_at_edge"] == ["learning_rate"] and len(seen) == 8
  # A second call reuses the recorded scores: nothing trains again.
  seen.clear()
  again = natural_images.tune("class_il_recipes", [arm], args, log=lambda s: None)["er_seq"]
  assert not seen and again["learning_rate"] == 1e-2


def _tune_tiny_derpp(tmp_path, monkeypatch, score):
  """Tunes Split Tiny-ImageNet DER++ with ``score(lr, alpha, beta)`` in place of training: its
  selected record and the settings run, ``(lr, alpha, beta, seed)`` each."""
  seen = []

  def fake_score(cfg, workdir):
    seen.append((cfg.optim.learning_rate, cfg.method.alpha, cfg.method.beta, cfg.seed))
    return score(cfg.optim.learning_rate, cfg.method.alpha, cfg.method.beta)

  monkeypatch.setattr(natural_images, "tune_score", fake_score)
  args = _args(tmp_path, dataset="tiny_imagenet")
  arm = {a.name: a for a in natural_images.study_arms("tiny_imagenet",
                                                      "class_il_recipes")}["derpp_seq"]
  sel = natural_images.tune("class_il_recipes", [arm], args, log=lambda s: None)["derpp_seq"]
  return sel, seen


def test_tuning_extends_each_component_of_a_tuple_grid(tmp_path, monkeypatch):
  """Split Tiny-ImageNet DER++ tunes (alpha, beta) on {0.1, 0.3} x {0.5, 1}: a pick at the grid's
  top corner extends alpha (0.3 -> 1) and beta (1 -> 2) one at a time, each at the other's pick
  and the picked lr, with both tuning seeds; the selection is made again after each."""
  def score(lr, alpha, beta):  # best lr 1e-3 (interior); higher alpha and beta help, alpha to 1
    return {3e-4: 40.0, 1e-3: 50.0, 3e-3: 45.0}[lr] + 5 * min(alpha, 1.0) + 2 * beta

  sel, seen = _tune_tiny_derpp(tmp_path, monkeypatch, score)
  assert sel["extended"] == [{"axis": "method.alpha", "side": "high", "value": 1.0},
                             {"axis": "method.beta", "side": "high", "value": 2.0}]
  assert sel["learning_rate"] == 1e-3 and tuple(sel["method.alpha,method.beta"]) == (1.0, 2.0)
  assert sel["tune_scores"]["lr0.001_alpha1_beta1"] == {"100": 57.0, "101": 57.0}
  assert sel["tune_scores"]["lr0.001_alpha1_beta2"] == {"100": 59.0, "101": 59.0}
  assert len(seen) == 2 * (12 + 2) and "lr0.001_alpha0.3_beta2" not in sel["tune_scores"]
  assert sel["still_at_edge"] == ["method.alpha", "method.beta"]


def test_tuning_checks_the_own_grid_at_a_learning_rate_added_by_an_extension(tmp_path,
                                                                            monkeypatch):
  """The recorded Split Tiny-ImageNet DER++ case: the best of the grid is its corner (lr 3e-4,
  the low edge; alpha 0.3 and beta 1, the high edges). The lr extension 1e-4 wins, where only that
  (alpha, beta) ran: alpha and beta are still at the edge of their grid, so each is extended there
  (alpha 1 loses, beta 2 wins) and selected again."""
  def score(lr, alpha, beta):
    return ({1e-4: 55.0, 3e-4: 50.0, 1e-3: 45.0, 3e-3: 40.0}[lr]
            + (10 * alpha if alpha <= 0.3 else 0.0) + 2 * beta)

  sel, seen = _tune_tiny_derpp(tmp_path, monkeypatch, score)
  assert sel["extended"] == [{"axis": "learning_rate", "side": "low", "value": 1e-4},
                             {"axis": "method.alpha", "side": "high", "value": 1.0},
                             {"axis": "method.beta", "side": "high", "value": 2.0}]
  assert sel["learning_rate"] == 1e-4 and tuple(sel["method.alpha,method.beta"]) == (0.3, 2.0)
  assert sel["tune_scores"]["lr0.0001_alpha1_beta1"] == {"100": 57.0, "101": 57.0}
  assert sel["tune_scores"]["lr0.0001_alpha0.3_beta2"] == {"100": 62.0, "101": 62.0}
  assert len(seen) == 2 * (12 + 3)
  assert sel["still_at_edge"] == ["learning_rate", "method.beta"]


def test_tuning_an_interior_pick_adds_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(natural_images, "tune_score",
                      lambda cfg, wd: {3e-4: 40.0, 1e-3: 55.0, 3e-3: 50.0}[cfg.optim.learning_rate])
  arm = {a.name: a for a in natural_images.study_arms("cifar10", "class_il_recipes")}["er_seq"]
  sel = natural_images.tune("class_il_recipes", [arm], _args(tmp_path), lambda s: None)["er_seq"]
  assert sel["learning_rate"] == 1e-3 and sel["extended"] == [] and sel["still_at_edge"] == []


def test_diverged_tuning_run_scores_nan_and_is_not_retrained(tmp_path, monkeypatch):
  """A tuning run that stops on a non-finite loss scores NaN (``select_best`` counts it as 0), its
  folder remembers the divergence for the same settings, and other settings train again."""
  from cft_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  args = _args(tmp_path)
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


def test_tuned_arm_reuses_its_fixed_twin_runs():
  """aEPG tuned tau at tau 6 IS the aEPG tau 6 arm (same config, same arg): ``same_run_as`` names
  that twin (of the same PEFT method), and nothing for another tau or an arm without a twin."""
  args = argparse.Namespace(val_fraction=0.1, data_root=None, set=[], dataset="tiny_imagenet")
  arms = {a.name: a for a in natural_images.STUDIES["objectives"]["arms"]}
  twin = natural_images.same_run_as("objectives", arms["aepg_seq"], 6.0, args)
  assert twin is not None and twin.name == "aepg_tau6_seq"
  assert natural_images.same_run_as("objectives", arms["aepg_lae"], 6.0, args).name == \
      "aepg_tau6_lae"
  assert natural_images.same_run_as("objectives", arms["aepg_seq"], 2.0, args) is None
  assert natural_images.same_run_as("objectives", arms["label_smoothing_seq"], 0.1, args) is None
  assert natural_images.same_run_as("objectives", arms["ce_seq"], None, args) is None


def test_tuned_arm_takes_its_twins_recorded_tuning_scores(tmp_path, monkeypatch):
  """With the run folders gone (a new machine), aEPG tuned tau's tau-6 settings take aEPG tau 6's
  recorded scores (one setting, one score; even over a score the arm recorded for itself) and
  train only tau 2 and 12: 3 lrs x 2 taus x 2 seeds = 12 runs, none at tau 6."""
  lrs = natural_images.LR_GRID
  twin = {f"lr{lr:g}": {"100": v, "101": v + 1.0} for lr, v in zip(lrs, (30.0, 34.0, 31.0))}
  own_stale = {"lr0.0003_tau6": {"100": 99.0}}
  (tmp_path / "tiny_imagenet_objectives_selected.json").write_text(json.dumps({
      "aepg_tau6_seq": {"learning_rate": 1e-3, "tune_scores": twin},
      "aepg_seq": {"tune_scores": own_stale}}))
  trained = []

  def fake_score(cfg, wd):
    trained.append((cfg.optim.learning_rate, cfg.loss.tau, cfg.seed))
    return 10.0
  monkeypatch.setattr(natural_images, "tune_score", fake_score)
  args = _args(tmp_path, dataset="tiny_imagenet")
  arm = {a.name: a for a in natural_images.study_arms("tiny_imagenet", "objectives")}["aepg_seq"]
  sel = natural_images.tune("objectives", [arm], args, lambda s: None)["aepg_seq"]
  assert len(trained) == 12 and all(tau != 6.0 for _, tau, _ in trained)
  assert sel["tune_scores"]["lr0.0003_tau6"] == {"100": 30.0, "101": 31.0}
  assert sel["learning_rate"] == 1e-3 and sel["loss.tau"] == 6.0  # the twin's best: 34 / 35


# --- final runs and reports -------------------------------------------------------------------


def _metrics(acc):
  return {"final_accuracy": acc, "avg_incremental_accuracy": acc, "forgetting": 1.0,
          "task_il": {"final_accuracy": 90.0}}


def test_recorded_runs_reused_only_at_the_same_selection(tmp_path):
  sel = {"ce": {"learning_rate": 1e-3}, "der": {"learning_rate": 3e-4, "method.alpha": 0.3}}
  runs = [{"arm": "ce", "seed": 0, "metrics": {"final_accuracy": 40.0}},
          {"arm": "der", "seed": 0, "metrics": {"final_accuracy": 30.0}},
          {"arm": "gone", "seed": 0, "metrics": {"final_accuracy": 1.0}}]
  path = tmp_path / "cifar10_x.json"
  path.write_text(json.dumps({"selected": sel, "runs": runs}))
  keys = {"ce": None, "der": "method.alpha"}
  got = natural_images.recorded_runs(str(path), keys, sel)
  assert sorted(got) == [("ce", 0), ("der", 0)]
  assert got[("ce", 0)][0]["metrics"]["final_accuracy"] == 40
  changed = {"ce": {"learning_rate": 3e-3}, "der": {"learning_rate": 3e-4, "method.alpha": 1.0}}
  assert natural_images.recorded_runs(str(path), keys, changed) == {}
  assert natural_images.recorded_runs(str(tmp_path / "none.json"), keys, sel) == {}


@pytest.mark.parametrize("phase", ["report", "final"])
def test_recorded_runs_stay_and_are_never_retrained(tmp_path, monkeypatch, phase):
  """Seeds committed in the study's JSON (run folders gone) stay in the result and are never
  retrained; the registered seeds not recorded train in phase final."""
  sel = {"ce_seq": {"learning_rate": 1e-3}, "er_seq": {"learning_rate": 3e-3}}
  runs = ([{"arm": "ce_seq", "seed": s, "workdir": "w", "metrics": _metrics(40.0 + s)}
           for s in range(3)]
          + [{"arm": "er_seq", "seed": s, "workdir": "w", "metrics": _metrics(50.0 + s)}
             for s in range(2)])
  (tmp_path / "cifar10_class_il_recipes.json").write_text(
      json.dumps({"selected": sel, "runs": runs}))
  trained = []

  def fake_run(cfg, workdir):
    trained.append(cfg.seed)
    return _metrics(60.0)

  monkeypatch.setattr(natural_images, "run_one", fake_run)
  args = _args(tmp_path, phase=phase)
  arms = [a for a in natural_images.study_arms("cifar10", "class_il_recipes")
          if a.name in ("ce_seq", "er_seq")]
  got = natural_images.run_seeds("class_il_recipes", arms, sel, [0, 1, 2], args, lambda s: None)
  by_arm = {a: sorted((r["seed"], r["metrics"]["final_accuracy"]) for r in got if r["arm"] == a)
            for a in ("ce_seq", "er_seq")}
  assert by_arm["ce_seq"] == [(s, 40.0 + s) for s in range(3)]
  if phase == "report":  # nothing trains: er_seq has its two recorded seeds
    assert by_arm["er_seq"] == [(0, 50.0), (1, 51.0)] and not trained
  else:  # er_seq seed 2 was never run: it trains, once
    assert by_arm["er_seq"] == [(0, 50.0), (1, 51.0), (2, 60.0)] and trained == [2]


def test_a_call_naming_some_arms_reports_every_arm_and_only_registered_claims(
    tmp_path, monkeypatch, registered):
  """``--phase final --arms er_seq`` trains er_seq only; the report still holds ce_seq (recorded
  in the study's JSON) and aepg_tau6_seq (a finished run folder at the selected settings; a
  finished folder of OTHER settings is not read), and the registered claim's raw and Holm
  verdicts."""
  from cft_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  sel = {"ce_seq": {"learning_rate": 1e-3}, "aepg_tau6_seq": {"learning_rate": 1e-3},
         "er_seq": {"learning_rate": 3e-3}}
  out, root = tmp_path / "out", tmp_path / "runs"
  out.mkdir()
  (out / "cifar10_class_il_recipes_selected.json").write_text(json.dumps(sel))
  recorded = [{"arm": "ce_seq", "seed": s, "workdir": f"w/ce_seq/seed{s}",
               "metrics": _metrics(40.0 + s)} for s in range(3)]
  (out / "cifar10_class_il_recipes.json").write_text(
      json.dumps({"selected": sel, "runs": recorded}))
  args = _args(tmp_path)
  arms = {a.name: a for a in natural_images.study_arms("cifar10", "class_il_recipes")}

  def finished(arm, seed, lr, acc):  # a run folder as train.run leaves it
    wd = root / "cifar10" / "objectives" / "final" / arm / f"seed{seed}"
    wd.mkdir(parents=True)
    cfg = natural_images.natural_config(arms[arm], seed, args, lr)
    (wd / "config.json").write_text(config_lib.validate_config(cfg).to_json())
    (wd / "metrics.json").write_text(json.dumps(_metrics(acc)))

  for s in range(3):
    finished("aepg_tau6_seq", s, 1e-3, 30.0 + s)
  finished("ce_seq", 0, 3e-2, 99.0)  # other settings: the recorded seed 0 (40.0) stands
  trained = []

  def fake_run(cfg, workdir):
    trained.append(os.path.relpath(workdir, root))
    return _metrics(59.0 + cfg.seed * 0.5)

  monkeypatch.setattr(natural_images, "run_one", fake_run)
  monkeypatch.setattr(natural_images, "enable_compile_cache", lambda *a, **k: None)
  assert natural_images.main(["--dataset", "cifar10", "--study", "class_il_recipes", "--phase",
                              "final", "--arms", "er_seq", "--out", str(out), "--workdir-root",
                              str(root)]) == 0
  assert sorted(trained) == [f"cifar10/objectives/final/er_seq/seed{s}" for s in range(3)]
  data = json.loads((out / "cifar10_class_il_recipes.json").read_text())
  by_arm = {}
  for r in data["runs"]:
    by_arm.setdefault(r["arm"], []).append((r["seed"], r["metrics"]["final_accuracy"]))
  assert sorted(by_arm["ce_seq"]) == [(0, 40.0), (1, 41.0), (2, 42.0)]
  assert sorted(by_arm["aepg_tau6_seq"]) == [(0, 30.0), (1, 31.0), (2, 32.0)]
  assert [c["id"] for c in data["claims"]] == ["t.a_vs_b"]  # only the registered claim
  c = data["claims"][0]
  # ce - er = [40 - 59, 41 - 59.5, 42 - 60] = [-19, -18.5, -18]: a significant loss.
  assert c["d"] == [-19.0, -18.5, -18.0] and c["raw"] == c["holm"] == "worse than the baseline"
  md = (out / "cifar10_class_il_recipes.md").read_text()
  assert "| a beats b | test | 1 | 3 | -18.50 ± 0.50 |" in md


def test_a_study_stopped_mid_phase_keeps_every_finished_run(tmp_path, monkeypatch, registered):
  """Each finished tuning score and final run is written to the study's JSON files at once: a
  session that ends mid-phase (here: the third run raises) loses nothing that finished, and the
  next call trains only what is missing."""
  sel = {"ce_seq": {"learning_rate": 1e-3}, "er_seq": {"learning_rate": 3e-3}}
  (tmp_path / "cifar10_class_il_recipes_selected.json").write_text(json.dumps(sel))
  calls = []

  def flaky_run(cfg, workdir):
    calls.append((cfg.method.name, cfg.seed))
    if len(calls) == 3:
      raise KeyboardInterrupt("session over")
    return _metrics(50.0 + cfg.seed)

  monkeypatch.setattr(natural_images, "run_one", flaky_run)
  args = _args(tmp_path, phase="final")
  arms = [a for a in natural_images.study_arms("cifar10", "class_il_recipes")
          if a.name in ("ce_seq", "er_seq")]
  with pytest.raises(KeyboardInterrupt):
    natural_images.run_seeds("class_il_recipes", arms, sel, [0, 1, 2], args, lambda s: None)
  saved = json.loads((tmp_path / "cifar10_class_il_recipes.json").read_text())["runs"]
  assert sorted((r["arm"], r["seed"]) for r in saved) == [("ce_seq", 0), ("er_seq", 0)]
  assert saved[0]["settings"] == {"learning_rate": sel[saved[0]["arm"]]["learning_rate"]}
  calls.clear()
  monkeypatch.setattr(natural_images, "run_one", lambda cfg, wd: calls.append(cfg.seed) or
                      _metrics(50.0 + cfg.seed))
  got = natural_images.run_seeds("class_il_recipes", arms, sel, [0, 1, 2], args, lambda s: None)
  assert sorted(calls) == [1, 1, 2, 2] and len(got) == 6   # seeds 0 came from the file
  # A record made at another learning rate is not reused after the selection changes.
  moved = {**sel, "er_seq": {"learning_rate": 1e-2}}
  path = str(tmp_path / "cifar10_class_il_recipes.json")
  keys = {"ce_seq": None, "er_seq": None}
  assert {a for a, _ in natural_images.recorded_runs(path, keys, moved)} == {"ce_seq"}


def test_tuning_scores_are_recorded_as_they_finish(tmp_path, monkeypatch):
  arm = {a.name: a for a in natural_images.study_arms("cifar10", "class_il_recipes")}["er_seq"]
  seen = []

  def flaky_score(cfg, workdir):
    seen.append((cfg.optim.learning_rate, cfg.seed))
    if len(seen) == 4:
      raise KeyboardInterrupt("session over")
    return 40.0 + len(seen)

  monkeypatch.setattr(natural_images, "tune_score", flaky_score)
  args = _args(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    natural_images.tune("class_il_recipes", [arm], args, lambda s: None)
  rec = json.loads((tmp_path / "cifar10_class_il_recipes_selected.json").read_text())
  assert rec["er_seq"]["tune_scores"] == {"lr0.0003": {"100": 41.0, "101": 42.0},
                                          "lr0.001": {"100": 43.0}}
  # and the machine of each score (no metrics.json from the fake run: this process's cpu_id)
  me = natural_images.provenance_lib.cpu_id()
  assert rec["er_seq"]["tune_cpu_ids"] == {"lr0.0003": {"100": me, "101": me},
                                           "lr0.001": {"100": me}}
  # a report meanwhile: the half-tuned arm has no selection yet, so it has no final runs
  assert natural_images.run_seeds("class_il_recipes", [arm], rec, [0, 1],
                                  _args(tmp_path, phase="report"), lambda s: None) == []
  seen.clear()

  def elsewhere(cfg, wd):  # the session goes on on another machine: its runs record their cpu_id
    seen.append((cfg.optim.learning_rate, cfg.seed))
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "metrics.json"), "w") as f:
      json.dump({"provenance": {"cpu_id": "AuthenticAMD family 25 model 17 stepping 1"}}, f)
    return 30.0

  monkeypatch.setattr(natural_images, "tune_score", elsewhere)
  natural_images.tune("class_il_recipes", [arm], args, lambda s: None)
  # Only what was missing, then the low edge's extension (3e-4 leads with 41.5).
  assert seen == [(1e-3, 101), (3e-3, 100), (3e-3, 101), (1e-4, 100), (1e-4, 101)]
  rec = json.loads((tmp_path / "cifar10_class_il_recipes_selected.json").read_text())
  other = "AuthenticAMD family 25 model 17 stepping 1"
  assert rec["er_seq"]["tune_cpu_ids"] == {
      "lr0.0003": {"100": me, "101": me}, "lr0.001": {"100": me, "101": other},
      "lr0.003": {"100": other, "101": other}, "lr0.0001": {"100": other, "101": other}}
  assert "tuning by machine" in natural_images.setup_line([arm], rec, args) and \
      "er_seq 8 of 8 scores on 2 recorded machine(s)" in natural_images.setup_line([arm], rec, args)


def test_claims_on_the_same_runs_but_another_metric_are_separate_tests(monkeypatch):
  ood = _claim(id="t.ood", metric=("ood", "corruption_mean"))
  idc = _claim(id="t.id", metric=("ood", "id"), kind="non_inferiority")
  monkeypatch.setattr(claims, "REGISTRY", (ood, idc))
  runs = [{"arm": a, "seed": s, "workdir": f"w/{a}/seed{s}", "provenance": None,
           "metrics": {"ood": {"corruption_mean": 40.0 + s * (a == "ce_seq"), "id": 45.0 + s}}}
          for a in ("ce_seq", "er_seq") for s in range(3)]
  a, b = (natural_images.compare(runs, c, (0, 1, 2)) for c in (ood, idc))
  assert a["same_as"] != b["same_as"]


def test_a_study_sharing_runs_reads_the_other_studys_records(tmp_path, monkeypatch):
  """class_il_recipes shares its CE / aEPG runs with objectives (``runs_under``): with the run
  folders gone, the objectives study's recorded tuning scores and final runs stand in for them,
  so the recipes study trains only its own arms."""
  sel = {"ce_seq": {"learning_rate": 1e-3, "tune_seeds": [100, 101],
                    "tune_scores": {f"lr{lr:g}": {"100": v, "101": v + 1.0} for lr, v in
                                    zip(natural_images.LR_GRID, (40.0, 45.0, 30.0))}}}
  (tmp_path / "cifar10_objectives_selected.json").write_text(json.dumps(sel))
  (tmp_path / "cifar10_objectives.json").write_text(json.dumps({"runs": [
      {"arm": "ce_seq", "seed": s, "workdir": "w", "settings": {"learning_rate": 1e-3},
       "metrics": _metrics(40.0 + s)} for s in range(3)]}))
  trained = []
  monkeypatch.setattr(natural_images, "tune_score", lambda cfg, wd: trained.append(wd) or 0.0)
  monkeypatch.setattr(natural_images, "run_one", lambda cfg, wd: trained.append(wd) or _metrics(1.0))
  args = _args(tmp_path)
  arm = {a.name: a for a in natural_images.study_arms("cifar10", "class_il_recipes")}["ce_seq"]
  got = natural_images.tune("class_il_recipes", [arm], args, lambda s: None)
  assert not trained and got["ce_seq"]["learning_rate"] == 1e-3
  runs = natural_images.run_seeds("class_il_recipes", [arm], {"ce_seq": {"learning_rate": 1e-3}},
                                  [0, 1, 2], _args(tmp_path, phase="final"), lambda s: None)
  assert not trained and sorted(r["seed"] for r in runs) == [0, 1, 2]


def test_dry_run_plan_counts_what_is_recorded_and_what_is_left(tmp_path):
  """--dry-run: ER has 3 of its 6 tuning scores and 3 of the 5 registered final runs (one at
  another learning rate does not count); CE's tuning comes from the objectives study whose runs
  class_il_recipes shares. Left: 3 + 2 (ER) + 5 (CE finals) = 10 runs at the median 120 s."""
  def dump(name, data):
    with open(tmp_path / name, "w") as f:
      json.dump(data, f)
  dump("cifar10_class_il_recipes_selected.json", {"er_seq": {
      "learning_rate": 1e-3, "tune_scores": {"lr0.0003": {"100": 1.0, "101": 2.0},
                                             "lr0.001": {"100": 3.0}}}})
  dump("cifar10_objectives_selected.json", {"ce_seq": {
      "learning_rate": 1e-3, "tune_scores": {f"lr{lr:g}": {"100": 1.0, "101": 1.0}
                                             for lr in (3e-4, 1e-3, 3e-3)}}})
  run = lambda seed, wall, lr=1e-3: {"arm": "er_seq", "seed": seed,  # noqa: E731
                                     "settings": {"learning_rate": lr},
                                     "metrics": {"wall_time_s": wall}}
  dump("cifar10_class_il_recipes.json",
       {"runs": [run(0, 60.0), run(1, 120.0), run(2, 180.0), run(3, 999.0, lr=3e-3)]})
  arms = {a.name: a for a in natural_images.study_arms("cifar10", "class_il_recipes")}
  text = natural_images.plan("class_il_recipes", [arms["er_seq"], arms["ce_seq"]],
                             _args(tmp_path))
  assert text.splitlines() == [
      "  er_seq: tune 3/6, final 3/5", "  ce_seq: tune 6/6, final 0/5",
      "  left: 10 runs (+ 2 per edge extension), ~0.3 CPU-hours at the recorded median 2.0 min "
      "per run"]


def test_verify_reruns_a_recorded_run_and_names_every_difference(tmp_path, monkeypatch):
  """--phase verify trains the recorded (arm, seed) again and compares every recorded number
  exactly (not the wall time); each check lands in <dataset>_reproduction.json."""
  sel = {"ce_seq": {"learning_rate": 1e-3}}
  old = {"code_commit": "aaa", "commit": "aaa", "cpu_model": "AMD EPYC", "dirty": False}
  rec = {"arm": "ce_seq", "seed": 0, "workdir": "w", "provenance": old,
         "metrics": {**_metrics(40.0), "wall_time_s": 300.0}}
  (tmp_path / "cifar10_class_il_recipes.json").write_text(json.dumps({"selected": sel,
                                                                       "runs": [rec]}))
  new = {**old, "code_commit": "bbb", "commit": "bbb"}
  outcome = {"m": {**_metrics(40.0), "wall_time_s": 280.0, "provenance": new}}
  def fake_run(cfg, wd):
    assert not os.path.exists(wd)  # an earlier verify run is deleted, never read back
    os.makedirs(wd)
    return outcome["m"]

  monkeypatch.setattr(natural_images, "run_one", fake_run)
  arm = [a for a in natural_images.study_arms("cifar10", "class_il_recipes") if a.name == "ce_seq"]
  args = _args(tmp_path, phase="verify")
  (check,) = natural_images.verify("class_il_recipes", arm, sel, [0], args, lambda s: None)
  assert check["equal"] and check["differences"] == {}
  assert check["recorded"] == ["aaa", "AMD EPYC"] and check["rerun"] == ["bbb", "AMD EPYC"]
  assert check["cpu_ids"] == [None, None]  # neither record names its generation
  outcome["m"] = {**_metrics(40.0), "task_il": {"final_accuracy": 90.5}, "provenance": new}
  (check,) = natural_images.verify("class_il_recipes", arm, sel, [0], args, lambda s: None)
  assert not check["equal"] and check["differences"] == {"task_il.final_accuracy": [90.0, 90.5]}
  saved = json.loads((tmp_path / "cifar10_reproduction.json").read_text())["checks"]
  assert [c["equal"] for c in saved] == [True, False]
  with pytest.raises(KeyError, match="no recorded final run at seed 1"):
    natural_images.verify("class_il_recipes", arm, sel, [1], args, lambda s: None)


def test_every_code_equivalence_is_backed_by_an_exact_rerun():
  """EQUIVALENT_CODE pairs two code commits' runs only where a committed reproduction check
  re-ran a recorded run at the newer commit and got every number equal (and none differed)."""
  checks = []
  for name in os.listdir(os.path.join(os.path.dirname(STUDIES), "docs", "results")):
    if name.endswith("_reproduction.json"):
      with open(os.path.join(os.path.dirname(STUDIES), "docs", "results", name)) as f:
        checks += json.load(f)["checks"]
  for new, old in natural_images.EQUIVALENT_CODE.items():
    # a check on another machine than the record's says nothing about the code (protocol 4)
    mine = [c for c in checks if c["rerun"][0] == new and c["recorded"][0] == old
            and natural_images.same_machine(*c.get("cpu_ids", (None, None)))]
    assert mine and all(c["equal"] for c in mine), (new, old)


def test_code_equivalence_follows_its_chain(monkeypatch):
  """c -> b (re-run equal against b's record) and b -> a: c's runs pair with a's and b's."""
  monkeypatch.setattr(natural_images, "EQUIVALENT_CODE", {"c": "b", "b": "a"})
  prov = lambda code: {"code_commit": code, "cpu_model": "AMD EPYC", "commit": code, "dirty": False}
  assert [natural_images.code_version(prov(x))[0] for x in "abcd"] == ["a", "a", "a", "d"]
  assert natural_images.code_version(prov("c"), equivalent=False)[0] == "c"
  monkeypatch.setattr(natural_images, "EQUIVALENT_CODE", {"x": "y", "y": "x"})  # no endless loop
  assert natural_images.code_version(prov("x"))[0] == "y"  # stops before revisiting x


def test_runs_of_two_processor_generations_do_not_pair(registered):
  """The same code and model name ("AMD EPYC") but another recorded generation / instruction set
  is another machine; a run without the record (before 2026-12-06) pairs on the name alone."""
  base = {"code_commit": "abc", "cpu_model": "AMD EPYC", "commit": "abc", "dirty": False}
  zen5 = {**base, "cpu_id": "AuthenticAMD family 26 model 2 stepping 1; avx2 avx512f"}
  zen3 = {**base, "cpu_id": "AuthenticAMD family 25 model 1 stepping 1; avx2"}
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, zen5) + _runs({"er_seq": [0.0, 1.0, 1.0]}, zen3)
  r = natural_images.compare(runs, registered, (0, 1, 2))
  assert r["status"] == "unpaired" and r["cpu_ids"] == sorted([zen3["cpu_id"], zen5["cpu_id"]])
  runs = _runs({"ce_seq": [1.0, 2.0, 3.0]}, zen5) + _runs({"er_seq": [0.0, 1.0, 1.0]}, base)
  assert natural_images.compare(runs, registered, (0, 1, 2))["status"] == "complete"
