"""Cross-references of the documentation: ``docs/methods.md#anchor`` links resolve.

The code cites formulas as ``docs/methods.md#name`` (or ``methods.md#name``); each must match an
``<a id="name"></a>`` anchor of ``docs/methods.md``, and nothing may cite documents that do not
ship with the project.
"""

import glob
import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
METHODS = os.path.join(ROOT, "docs", "methods.md")
SOURCES = ("cft_jax/**/*.py", "configs/*.py", "studies/*.py", "benchmarks/*.py", "tests/**/*.py",
           "notebooks/*.py", "*.md", "docs/**/*.md")
REF = re.compile(r"methods\.md#([A-Za-z0-9_-]+)")


def _anchors(text):
  return set(re.findall(r'<a id="([^"]+)"></a>', text))


def _files():
  for pattern in SOURCES:
    yield from glob.glob(os.path.join(ROOT, pattern), recursive=True)


def test_methods_anchors_unique():
  with open(METHODS) as f:
    text = f.read()
  ids = re.findall(r'<a id="([^"]+)"></a>', text)
  assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
  assert {"epg", "aepg", "metrics", "dlcft", "kfac", "tpgm", "ftp", "lae"} <= set(ids)


def test_every_methods_reference_resolves():
  with open(METHODS) as f:
    anchors = _anchors(f.read())
  refs, missing = 0, []
  for path in _files():
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        for name in REF.findall(line) if path != __file__ else ():
          refs += 1
          if name not in anchors:
            missing.append(f"{os.path.relpath(path, ROOT)}:{lineno}: #{name}")
  assert refs >= 30, refs  # the code does cite it
  assert not missing, missing


def test_no_internal_spec_citations():
  hits = []
  for path in _files():
    with open(path, encoding="utf-8") as f:
      hits += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(f, 1)
               if "SPEC §" in line and path != __file__]
  assert not hits, hits
