"""The Fashion-MNIST study reports (issues 3, 5, 6) predate the registered protocol: they are
rendered from their committed JSON, say that they describe means, and carry no verdict words."""

import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
sys.path.insert(0, os.path.join(ROOT, "studies"))

import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import dlcft_study  # noqa: E402  pylint: disable=g-import-not-at-top
import objectives_study  # noqa: E402  pylint: disable=g-import-not-at-top
import robust_ft_study  # noqa: E402  pylint: disable=g-import-not-at-top

# A verdict is the registered protocol's word (claims.md); these reports may only describe.
VERDICT = re.compile(r"reproduces|does not (fully )?reproduce|verdict|\bclear\b|\blevel with\b",
                     re.IGNORECASE)


def _load(name):
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def _render(tmp_path):
  """{report name: text} re-rendered from the committed JSON (no training)."""
  out = {}
  j = _load("objectives_results.json")
  out["objectives_table.md"] = objectives_study.write_table(
      j["summary"], j["runs"], str(tmp_path / "o.md"), j["setup"],
      len({r["seed"] for r in j["runs"]}))
  j = _load("robust_ft.json")
  out["robust_ft.md"] = robust_ft_study.write_table(
      j["summary"], j["runs"], str(tmp_path / "r.md"), j["setup"],
      len({r["seed"] for r in j["runs"]}), robust_ft_study.wall_note(j["wall_time_s"],
                                                                     len(j["runs"])))
  j = _load("dlcft_results.json")
  for s in ("data_il", "class_il"):
    seeds = sorted({r["seed"] for r in j["runs"] if r["setting"] == s})
    out[f"dlcft_{s}.md"] = dlcft_study.write_md(
        dlcft_study.summarize(j["runs"], s), s, str(tmp_path / f"{s}.md"), dlcft_study.SETUP[s],
        seeds, j["wall_time_min"])
  return out


def test_reports_are_the_rendering_of_their_json_and_only_describe(tmp_path):
  for name, text in _render(tmp_path).items():
    with open(os.path.join(RESULTS, name)) as f:
      committed = f.read()
    # the committed report is this rendering (robust_ft.md adds a dated paragraph after it)
    assert committed.startswith(text.rstrip("\n")), name
    assert _common.DESCRIPTIVE in text, name
    assert not VERDICT.search(text), (name, VERDICT.search(text).group(0))


def test_dlcft_ordering_description_gives_each_gap_with_its_standard_error():
  """Two methods, 2 seeds: gap +2.0 vs 2 x SE = 2 sqrt((1 + 1) / 2) = 2 -> '<='."""
  summary = {"er": {"final": (50.0, 1.0), "n": 2}, "der": {"final": (52.0, 1.0), "n": 2}}
  text = dlcft_study.ordering_description(summary, "class_il")
  assert "ER < DER: +2.00 points on the mean (the paper's direction; |gap| <= 2 x std err of " \
         "the difference 2.00)" in text
  assert text.startswith("The mean final accuracies follow the paper's ordering ER < DER.")
  summary["der"]["final"] = (47.0, 1.0)
  text = dlcft_study.ordering_description(summary, "class_il")
  assert "against the paper's direction; |gap| > 2 x std err" in text
  assert text.startswith("The mean final accuracies do not follow")


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
