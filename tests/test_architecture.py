"""The architecture: no import cycle in ``cft_jax`` (function-level imports counted) and the
layer contracts of ``.importlinter`` kept (``lint-imports``).

The cycle check parses every module with :mod:`ast` — imports inside functions and under
``if TYPE_CHECKING:`` included — builds the module import graph and looks for strongly connected
components of more than one module. It does not depend on import-linter, so it also holds where
the ``lint-imports`` binary is missing.
"""

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Set

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = "cft_jax"
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _modules(root: str, package: str = PACKAGE) -> Dict[str, str]:
  """``{dotted module name: file path}`` of every ``.py`` file of ``package`` under ``root``."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(root, package)):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _imported(node: ast.AST, module: str, is_package: bool, known) -> List[str]:
  """The package modules an ``import`` / ``from ... import`` statement imports."""
  def resolve(name):  # the longest known module prefix of ``name``
    while name and name not in known:
      name = name.rpartition(".")[0]
    return name or None

  if isinstance(node, ast.Import):
    return [resolve(a.name) for a in node.names]
  base = node.module or ""
  if node.level:  # relative import
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[:len(anchor) - (node.level - 1)]
    base = ".".join(anchor + ([node.module] if node.module else []))
  return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else resolve(base)
          for a in node.names]


def import_graph(root: str, package: str = PACKAGE) -> Dict[str, Set[str]]:
  """``{module: modules of the package it imports}``, every import statement of the module
  counted (module level, inside functions and classes, under ``if TYPE_CHECKING:``)."""
  known = _modules(root, package)
  graph = {}
  for module, path in known.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges.update(_imported(node, module, path.endswith("__init__.py"), known))
    graph[module] = {m for m in edges if m and m != module}
  return graph


def function_level_imports(root: str, package: str = PACKAGE) -> List[str]:
  """``"module:line -> imported"`` of every import of a package module inside a function."""
  known = _modules(root, package)
  hits = []
  for module, path in sorted(known.items()):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          for m in _imported(node, module, path.endswith("__init__.py"), known):
            if m:
              hits.append(f"{module}:{node.lineno} -> {m}")
  return hits


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
  _write(tmp_path / "pkg" / "__init__.py", "")
  _write(tmp_path / "pkg" / "a.py", "from pkg import b\n")
  _write(tmp_path / "pkg" / "sub" / "__init__.py", "")
  _write(tmp_path / "pkg" / "b.py", "def f():\n  from .sub import c\n")
  _write(tmp_path / "pkg" / "sub" / "c.py", "import typing\nif typing.TYPE_CHECKING:\n"
         "  from .. import a\n")
  graph = import_graph(str(tmp_path), "pkg")
  assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"}
  assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
  assert function_level_imports(str(tmp_path), "pkg") == ["pkg.b:2 -> pkg.sub.c"]


def test_no_module_of_the_package_is_in_an_import_cycle():
  graph = import_graph(ROOT)
  assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the parse found the package
  assert graph["cft_jax.steps"] >= {"cft_jax.methods", "cft_jax.robust", "cft_jax.objectives"}
  assert cycles(graph) == []


def test_no_function_level_import_of_a_package_module():
  # The graph is acyclic, so a module imports what it needs at the top; function-level imports
  # are for heavy optional third-party dependencies only (tensorflow_datasets, matplotlib, ...).
  # The package root (outside the layers) re-exports the top layer's load_run lazily (PEP 562).
  assert function_level_imports(ROOT) == ["cft_jax:20 -> cft_jax.predict"]


def test_the_families_do_not_import_the_config_facade_or_the_registry():
  graph = import_graph(ROOT)
  low = [m for m in graph if (m + ".").split(".")[1] not in ("main", "predict", "train", "config")]
  assert [m for m in low if graph[m] & {"cft_jax.config", "cft_jax.train"}] == []
  assert [m for m in low if "cft_jax.registry" in graph[m]] == []
  assert graph["cft_jax.errors"] == set() and graph["cft_jax.schema"] == {"cft_jax.errors"}


def _contract_layers():
  """The layers of ``.importlinter``'s layers contract, top first, each a set of module names."""
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, ".importlinter"))
  lines = parser["importlinter:contract:layers"]["layers"].strip().splitlines()
  return [{m.strip() for m in line.split("|")} for line in lines if line.strip()]


def _readme_layers():
  """The layers of README.md's layout block (``  name | name/   meaning`` lines under cft_jax/)."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  block = text[text.index("## Layout"):].split("```")[1]
  layers = []
  for line in block.split("cft_jax/\n", 1)[1].splitlines():
    if not line.startswith("  "):
      break
    names = re.split(r"\s{2,}", line.strip())[0]
    layers.append({m.strip().rstrip("/") for m in names.split("|")})
  return layers


def test_readme_contracts_and_package_show_one_picture():
  layers = _contract_layers()
  assert layers == _readme_layers()
  top_level = {m.split(".")[1] for m in _modules(ROOT) if "." in m}
  assert set().union(*layers) == top_level  # every top-level module is in exactly one layer
  assert sum(map(len, layers)) == len(top_level)


def test_every_import_points_down_the_declared_layers():
  # The layers contract checked without import-linter, on the ast graph (function-level imports
  # and TYPE_CHECKING imports included): an import between top-level modules goes to a lower
  # layer; modules of one layer do not import each other.
  level = {m: i for i, layer in enumerate(_contract_layers()) for m in layer}
  graph = import_graph(ROOT)
  top = lambda m: (m + ".").split(".")[1]
  upward = [f"{a} -> {b}" for a, targets in sorted(graph.items()) for b in sorted(targets)
            if top(a) and top(b) and top(a) != top(b) and level[top(a)] >= level[top(b)]]
  assert upward == []


def _lint_imports(cwd, pythonpath=None):
  env = dict(os.environ)
  if pythonpath:
    env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


@pytest.mark.skipif(not os.path.exists(LINT_IMPORTS), reason="lint-imports not installed")
def test_lint_imports_keeps_every_contract():
  result = _lint_imports(ROOT, pythonpath=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "0 broken" in result.stdout


@pytest.mark.skipif(not os.path.exists(LINT_IMPORTS), reason="lint-imports not installed")
def test_lint_imports_fails_on_an_upward_function_level_import(tmp_path):
  shutil.copytree(os.path.join(ROOT, PACKAGE), tmp_path / PACKAGE,
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(ROOT, ".importlinter"), tmp_path / ".importlinter")
  with open(tmp_path / PACKAGE / "objectives.py", "a", encoding="utf-8") as f:
    f.write("\n\ndef _upward():\n  import cft_jax.train  # a pure-numerics module reaching up\n"
            "  return cft_jax.train\n")
  result = _lint_imports(str(tmp_path), pythonpath=str(tmp_path))
  assert result.returncode != 0
  assert "cft_jax.objectives is not allowed to import cft_jax.train" in result.stdout
