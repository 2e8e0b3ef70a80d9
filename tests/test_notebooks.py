"""The notebooks in ``notebooks/``: jupytext pairs in sync, the setup cell, execution.

Each notebook is a jupytext pair: ``NAME.py`` (percent format, the source that is edited and
reviewed) and ``NAME.ipynb`` (what Colab / Jupyter open), kept equal by
``jupytext --sync notebooks/*.py``. Execution: each notebook runs with CI sizes
(``CFT_JAX_NOTEBOOK_TEST=1``) in a fresh ``python3`` kernel with ``notebooks/`` as its working
directory; any cell error fails the test (nbclient raises ``CellExecutionError`` with the cell and
traceback).
"""

import glob
import os
import subprocess
import sys

import pytest

try:
  import ipykernel  # noqa: F401  pylint: disable=unused-import
  import jupytext
  import nbformat
  from nbclient import NotebookClient
except ImportError as e:  # pragma: no cover
  pytest.skip(f"notebook tests need jupytext, nbformat, nbclient and ipykernel "
              f"(pip install -e '.[test]'): {e}", allow_module_level=True)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NB_DIR, "*.ipynb")))
# Notebooks that train on Split Fashion-MNIST (the Debian package `dataset-fashion-mnist`).
NEEDS_FASHION_MNIST = {"01_quickstart.ipynb", "02_objectives.ipynb", "04_add_a_method.ipynb"}
HAS_FASHION_MNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")
CELL_TIMEOUT_S = 300


PAIRS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NB_DIR, "[0-9]*.py")))


def test_notebooks_found():
  assert len(NOTEBOOKS) >= 4, NOTEBOOKS
  # every notebook has its jupytext .py and every .py its notebook
  assert [n[:-len(".ipynb")] for n in NOTEBOOKS] == [p[:-len(".py")] for p in PAIRS], (
      NOTEBOOKS, PAIRS)


def _cells(nb):
  return [(c.cell_type, c.source) for c in nb.cells]


@pytest.mark.parametrize("name", PAIRS)
def test_jupytext_pair_in_sync(name):
  """``NAME.ipynb`` has exactly the cells of ``NAME.py`` (run ``jupytext --sync notebooks/*.py``
  after editing a ``.py``)."""
  py = jupytext.read(os.path.join(NB_DIR, name))
  ipynb = nbformat.read(os.path.join(NB_DIR, name[:-len(".py")] + ".ipynb"), as_version=4)
  assert py.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  assert _cells(ipynb) == _cells(py), (
      f"notebooks/{name} and its .ipynb differ: run `jupytext --sync notebooks/{name}`")


def _setup_cell(name):
  code = [c.source for c in jupytext.read(os.path.join(NB_DIR, name)).cells
          if c.cell_type == "code"]
  return code[0]


def test_setup_cell_is_shared():
  """Every notebook opens with the same setup cell (one place to fix it)."""
  cells = {name: _setup_cell(name) for name in PAIRS}
  assert len(set(cells.values())) == 1, sorted(cells)
  assert cells[PAIRS[0]].count('\nCFT_JAX_GIT_URL = ""') == 1


# Runs the setup cell in a plain Python process. ``cft_jax`` starts "not installed"
# (``sys.modules`` entry None); the fake pip records its arguments and "installs" it (removes the
# entry, so the checkout's package imports). A SetupError prints what IPython would display.
_RUNNER = """
import subprocess, sys
if sys.argv[2] == "missing":
  sys.modules["cft_jax"] = None
def fake_pip(cmd):
  print("PIP", " ".join(cmd[cmd.index("-q") + 1:]))
  sys.modules.pop("cft_jax", None)
subprocess.check_call = fake_pip
try:
  exec(compile(open(sys.argv[1]).read(), "setup_cell", "exec"), {"__name__": "__main__"})
except Exception as e:
  shown = e._render_traceback_()
  print("RENDERED", len(shown), "line:", shown[0])
  sys.exit(3)
"""


@pytest.mark.parametrize("where,url,installed,expected", [
    ("clone", "", True, None),                                   # importable: nothing to do
    ("clone", "", False, "PIP -e {root}"),                       # inside a clone: install it
    ("elsewhere", "https://example.org/cft_jax.git", False,
     "PIP git+https://example.org/cft_jax.git"),                 # Colab: from the git URL
    ("elsewhere", "", False, "RENDERED 1 line: SetupError: cft_jax is not installed: set "
                             "CFT_JAX_GIT_URL at the top of this cell to the repository's git "
                             "URL (or open the notebook from a clone)"),
])
def test_setup_cell(where, url, installed, expected, tmp_path):
  source = _setup_cell(PAIRS[0]).replace('CFT_JAX_GIT_URL = ""', f'CFT_JAX_GIT_URL = "{url}"', 1)
  cell = tmp_path / "setup_cell.py"
  cell.write_text(source)
  env = dict(os.environ, PYTHONPATH=ROOT, CFT_JAX_NOTEBOOK_TEST="1")
  cwd = NB_DIR if where == "clone" else str(tmp_path)  # tmp_path: no setup.cfg above it
  out = subprocess.run([sys.executable, "-c", _RUNNER, str(cell),
                        "installed" if installed else "missing"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
  lines = out.stdout.splitlines()
  if expected is None:
    assert out.returncode == 0, out.stderr
    assert not [l for l in lines if l.startswith(("PIP", "RENDERED"))], lines
  elif expected.startswith("RENDERED"):
    assert out.returncode == 3, out.stderr
    assert lines[-1] == expected, lines  # one line: the message, no traceback
  else:
    assert out.returncode == 0, out.stderr
    assert expected.format(root=ROOT) in lines, lines
  if out.returncode == 0:
    assert lines[-1].startswith("cft_jax from " + os.path.join(ROOT, "cft_jax")), lines


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A JAX compilation cache shared by the notebooks' kernels (they compile the same steps)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch, tmp_path, compilation_cache):
  if name in NEEDS_FASHION_MNIST and not HAS_FASHION_MNIST:
    pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
  monkeypatch.setenv("CFT_JAX_NOTEBOOK_TEST", "1")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' workdirs (tempfile.mkdtemp)
  # Same programs, faster to compile on CPU: threefry init graphs of the models take seconds.
  monkeypatch.setenv("JAX_DEFAULT_PRNG_IMPL", "rbg")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", compilation_cache)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  # The kernel imports cft_jax from this checkout even when it is not pip-installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p))
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": NB_DIR}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
