"""The statistics of the study protocol (``docs/results/protocol.md``), as pure functions.

A claim compares two arms (or two groups of arms) run with the same seeds: the per-seed paired
differences ``d_s = score_A(s) - score_B(s)`` (points of accuracy) are tested with one-sided
one-sample t tests at level ``ALPHA = 0.025`` (the two sides of a 95% interval), against 0 and
against the claim's margin ``delta`` (the paper's effect size). Within a family of claims (one
per paper and dataset) the tests are corrected with Holm's step-down method; equivalence
("level") statements use TOST. Every function here is checked with exact numbers in
``tests/test_studies_stats.py``.

Claim kinds and their outcomes (``d`` the true mean difference, ``delta > 0`` the margin):

=================  ========================================  ==========================================
kind               supported ("reproduced") when it rejects   refuted when it rejects
=================  ========================================  ==========================================
``superiority``    ``H0: d <= 0`` (a gain)                    ``H0: d >= delta`` -> "no gain >= margin";
                                                              also ``H0: d >= 0`` -> "worse than the
                                                              baseline"
``non_inferiority`` ``H0: d <= -delta`` (loses < delta)       ``H0: d >= -delta`` -> "worse than the
                                                              baseline by >= margin"
``equivalence``    TOST: ``H0: |d| >= delta`` -> "level"      ``H0: d <= delta`` or ``H0: d >= -delta``
                                                              -> "differs by >= margin"
=================  ========================================  ==========================================

At most one of a claim's hypotheses "supported" / "refuted" is true, so Holm's procedure runs on
one p-value per claim, ``min(p_support, p_refute)``; a claim whose p-value passes its Holm step
is "reproduced" when its support test passes at that step too (a gain, perhaps below the margin),
else refuted (Holm 1979; the step-down proof only needs each claim's error event to lie in
``{p_true_null <= threshold}``). A "worse than the baseline" outcome additionally needs the
nested test ``H0: d >= 0`` to pass at the same step.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats import multitest, weightstats

ALPHA = 0.025  # one-sided level of every test: the two sides of a 95% interval
KINDS = ("superiority", "non_inferiority", "equivalence")
SUPPORTED = {"superiority": "reproduced", "non_inferiority": "reproduced",
             "equivalence": "reproduced (level)"}
REFUTED = {"superiority": "no gain >= margin",
           "non_inferiority": "worse than the baseline by >= margin",
           "equivalence": "differs by >= margin"}
WORSE = "worse than the baseline"
INCONCLUSIVE = "inconclusive"
OUTCOMES = ("reproduced", WORSE, "no gain >= margin", INCONCLUSIVE)


def paired_differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
  """``a - b`` for two equally long 1-D score sequences paired by position (seed).

  Raises:
    ValueError: shapes differ / not 1-D, fewer than 2 pairs, or a non-finite score.
  """
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired scores need two 1-D sequences of equal length, got shapes "
                     f"{a.shape} and {b.shape}")
  if len(a) < 2:
    raise ValueError(f"a paired interval needs >= 2 seeds, got {len(a)}")
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError("paired scores must be finite (a run failed or is missing)")
  return a - b


def paired_t_interval(a: Sequence[float], b: Sequence[float],
                      confidence: float = 0.95) -> Dict[str, float]:
  """Paired difference ``a - b`` over seeds with a Student-t confidence interval.

  ``a[i]`` and ``b[i]`` are two methods' scores (e.g. class-IL final accuracy, %) of the same
  seed ``i``, so ``d_i = a_i - b_i`` cancels the seed-to-seed variation the runs share.
  Interval: ``mean(d) ± t_{(1+confidence)/2, n-1} * std(d, ddof=1) / sqrt(n)`` (Student 1908).

  Args:
    a, b: scores of equal length ``n >= 2`` (paired by position).
    confidence: the interval's coverage, in (0, 1).

  Returns:
    ``{"mean", "std", "n", "lo", "hi"}`` (same unit as the scores).

  Raises:
    ValueError: as :func:`paired_differences`, or ``confidence`` outside (0, 1).
  """
  d = paired_differences(a, b)
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  n = len(d)
  mean, std = float(d.mean()), float(d.std(ddof=1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / math.sqrt(n)
  return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half}


def paired_bootstrap_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                              num_resamples: int = 10000, seed: int = 0) -> Tuple[float, float]:
  """Percentile bootstrap interval of ``mean(a - b)`` (Efron & Tibshirani 1993, ch. 13): seeds
  resampled with replacement ``num_resamples`` times (numpy ``default_rng(seed)``). With few
  seeds it is narrower than the t interval; reported as a check, never decides.

  Raises:
    ValueError: as :func:`paired_t_interval`, or ``num_resamples < 1``.
  """
  d = paired_differences(a, b)
  if not 0.0 < confidence < 1.0 or num_resamples < 1:
    raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence}, "
                     f"{num_resamples}")
  idx = np.random.default_rng(seed).integers(0, len(d), size=(num_resamples, len(d)))
  means = d[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
  return float(lo), float(hi)


def t_test_p(d: Sequence[float], null: float, alternative: str) -> float:
  """One-sided one-sample t test on the mean of the paired differences ``d`` (``n >= 2``;
  :func:`scipy.stats.ttest_1samp`).

  Args:
    d: differences (points).
    null: the boundary value ``mu_0`` of the null hypothesis.
    alternative: ``"greater"`` tests ``H0: mu <= mu_0`` (``p = P(T_{n-1} >= t)``), ``"less"``
      tests ``H0: mu >= mu_0`` (``p = P(T_{n-1} <= t)``), with
      ``t = (mean(d) - mu_0) / (std(d, ddof=1) / sqrt(n))``.

  Returns:
    The p-value in [0, 1]. Zero spread: 0 if the mean lies strictly on the alternative's side,
    else 1.

  Raises:
    ValueError: fewer than 2 differences or an unknown ``alternative``.
  """
  d = np.asarray(d, float)
  if len(d) < 2 or alternative not in ("greater", "less"):
    raise ValueError(f"need >= 2 differences and alternative 'greater'/'less', got {len(d)}, "
                     f"{alternative!r}")
  if float(d.std(ddof=1)) == 0.0:
    diff = float(d.mean()) - null
    return 0.0 if (diff > 0 if alternative == "greater" else diff < 0) else 1.0
  return float(scipy_stats.ttest_1samp(d, null, alternative=alternative).pvalue)


def claim_tests(d: Sequence[float], kind: str, margin: float) -> Dict[str, float]:
  """The one-sided p-values of a claim (see the module docstring).

  Args:
    d: paired differences ``A - B`` (points), ``n >= 2``.
    kind: one of :data:`KINDS`.
    margin: ``delta > 0`` (points).

  Returns:
    ``{"p_support", "p_refute", "p_worse"}``; ``p_worse`` (``H0: d >= 0``) only matters for
    ``superiority`` (NaN otherwise).

  Raises:
    ValueError: an unknown ``kind``, ``margin <= 0`` or fewer than 2 differences.
  """
  if kind not in KINDS or not margin > 0:
    raise ValueError(f"kind must be one of {KINDS} and margin > 0, got {kind!r}, {margin}")
  if kind == "superiority":
    return {"p_support": t_test_p(d, 0.0, "greater"), "p_refute": t_test_p(d, margin, "less"),
            "p_worse": t_test_p(d, 0.0, "less")}
  if kind == "non_inferiority":
    return {"p_support": t_test_p(d, -margin, "greater"),
            "p_refute": t_test_p(d, -margin, "less"), "p_worse": float("nan")}
  return {"p_support": tost(d, margin)["p"],
          "p_refute": min(t_test_p(d, margin, "greater"), t_test_p(d, -margin, "less")),
          "p_worse": float("nan")}


def tost(d: Sequence[float], margin: float) -> Dict[str, float]:
  """Two one-sided tests (Schuirmann 1987) of equivalence within ``±margin``
  (:func:`statsmodels.stats.weightstats.ttost_paired` on ``d`` against zeros).

  ``H0: mu <= -margin`` and ``H0: mu >= margin`` are each tested at level ``ALPHA``; equivalence
  is shown when both are rejected, i.e. ``p = max(p_lower, p_upper) <= ALPHA`` — the same as the
  ``1 - 2 ALPHA`` (95%) t interval lying inside ``(-margin, margin)``.

  Returns:
    ``{"p_lower", "p_upper", "p"}``.

  Raises:
    ValueError: ``margin <= 0`` or fewer than 2 differences.
  """
  d = np.asarray(d, float)
  if not margin > 0 or len(d) < 2:
    raise ValueError(f"TOST needs margin > 0 and >= 2 differences, got {margin}, {len(d)}")
  if float(d.std(ddof=1)) == 0.0:  # statsmodels divides by the spread
    lower, upper = t_test_p(d, -margin, "greater"), t_test_p(d, margin, "less")
    return {"p_lower": lower, "p_upper": upper, "p": max(lower, upper)}
  p, (_, lower, _), (_, upper, _) = weightstats.ttost_paired(d, np.zeros_like(d), -margin, margin)
  return {"p_lower": float(lower), "p_upper": float(upper), "p": float(p)}


def holm(pvalues: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
  """Holm's (1979) step-down adjustment of one family's p-values
  (:func:`statsmodels.stats.multitest.multipletests`, ``method="holm"``).

  With the p-values sorted ascending ``p_(1) <= ... <= p_(m)``, the ``k``-th gets the multiplier
  ``m - k + 1`` and the adjusted value ``max_{j <= k} min(1, (m - j + 1) p_(j))``; hypothesis
  ``H_(k)`` is rejected at family-wise error rate ``alpha`` iff its adjusted value is
  ``<= alpha``. A NaN (a registered claim without runs yet) counts as ``p = 1``: the family size
  ``m`` is fixed at registration, not by what has run.

  Args:
    pvalues: ``[m]`` p-values in the family's order.

  Returns:
    ``(adjusted [m], multipliers [m])`` in the input order.
  """
  p = np.nan_to_num(np.asarray(pvalues, float), nan=1.0)
  if not len(p):
    return np.zeros(0), np.zeros(0)
  adjusted = multitest.multipletests(p, method="holm")[1]
  multipliers = np.empty(len(p))
  multipliers[np.argsort(p, kind="stable")] = len(p) - np.arange(len(p))
  return np.asarray(adjusted, float), multipliers


def decide(tests: Dict[str, float], kind: str, adjusted: Optional[float] = None,
           multiplier: float = 1.0, alpha: float = ALPHA) -> str:
  """A claim's outcome from its p-values (:func:`claim_tests`).

  Args:
    tests: ``{"p_support", "p_refute", "p_worse"}``.
    kind: the claim's kind.
    adjusted: the claim's Holm-adjusted p-value (None: the raw ``min(p_support, p_refute)``).
    multiplier: its Holm multiplier (1 for the raw verdict); the nested "worse than the
      baseline" test uses ``max(adjusted, multiplier * p_worse)``.
    alpha: the one-sided level.

  Returns:
    One of ``SUPPORTED[kind]``, ``REFUTED[kind]``, :data:`WORSE` (superiority only) or
    :data:`INCONCLUSIVE`.
  """
  p_min = min(tests["p_support"], tests["p_refute"])
  adj = p_min if adjusted is None else adjusted
  if adj > alpha:
    return INCONCLUSIVE
  passes = lambda p: max(adj, min(1.0, multiplier * p)) <= alpha  # noqa: E731
  if passes(tests["p_support"]):  # the claim's direction is shown (perhaps below the margin)
    return SUPPORTED[kind]
  if kind == "superiority" and passes(tests["p_worse"]):
    return WORSE
  return REFUTED[kind]


def seeds_needed(std: float, margin: float, alpha: float = ALPHA, family_size: int = 1,
                 max_seeds: int = 1000) -> Optional[int]:
  """Seeds (pairs) needed so that a claim gets a verdict whatever its mean: the smallest ``n``
  with ``2 t_{1 - alpha/m, n-1} std / sqrt(n) < margin`` — then the interval cannot hold both 0
  and the margin (at ``m = family_size``, Bonferroni's level, Holm's worst step).

  Args:
    std: the paired differences' standard deviation (points; e.g. a pilot's).
    margin: the claim's margin ``delta > 0``.
    alpha: one-sided level.
    family_size: ``m``, the claims in the family (1: uncorrected).
    max_seeds: search limit.

  Returns:
    ``n >= 2``, or None when even ``max_seeds`` does not suffice (or ``std`` is not finite).
  """
  if not (np.isfinite(std) and margin > 0):
    return None
  level = alpha / max(1, int(family_size))
  for n in range(2, max_seeds + 1):
    if 2.0 * scipy_stats.t.ppf(1.0 - level, n - 1) * std / math.sqrt(n) < margin:
      return n
  return None


def family_verdicts(claims: List[Dict[str, object]], alpha: float = ALPHA) -> List[Dict[str, object]]:
  """Raw and Holm-adjusted verdicts of one family.

  Args:
    claims: one dict per registered claim of the family, in registry order, each with ``kind``,
      ``margin`` and ``d`` (the paired differences, or None when the claim has not run / is
      incomplete). Claims with the same ``same_as`` key (e.g. "aEPG tuned tau" that selected the
      fixed tau's runs) are the same test: counted once in the family.
    alpha: one-sided level.

  Returns:
    Per claim (same order) ``{"raw": outcome, "holm": outcome, "p": min p, "p_holm":
    adjusted, "tests": {...}}``; ``None`` values for a claim without differences.
  """
  tests, keys, firsts = [], [], {}
  for c in claims:
    t = None if c.get("d") is None else claim_tests(c["d"], c["kind"], c["margin"])
    tests.append(t)
    key = c.get("same_as") or id(c)
    keys.append(key)
    firsts.setdefault(key, len(tests) - 1)
  uniq = sorted(set(firsts.values()))
  pmins = [np.nan if tests[i] is None else min(tests[i]["p_support"], tests[i]["p_refute"])
           for i in uniq]
  adj, mult = holm(pmins)
  by_first = {i: (a, m) for i, a, m in zip(uniq, adj, mult)}
  out = []
  for c, t, key in zip(claims, tests, keys):
    if t is None:
      out.append({"raw": None, "holm": None, "p": None, "p_holm": None, "tests": None})
      continue
    a, m = by_first[firsts[key]]
    out.append({"raw": decide(t, c["kind"], alpha=alpha),
                "holm": decide(t, c["kind"], float(a), float(m), alpha=alpha),
                "p": min(t["p_support"], t["p_refute"]), "p_holm": float(a), "tests": t})
  return out
