"""Executes every notebook in ``notebooks/`` with CI sizes (``CFT_JAX_NOTEBOOK_TEST=1``).

Each notebook runs in a fresh ``python3`` kernel with ``notebooks/`` as its working directory; any
cell error fails the test (nbclient raises ``CellExecutionError`` with the cell and traceback).
"""

import glob
import os

import pytest

try:
  import ipykernel  # noqa: F401  pylint: disable=unused-import
  import nbformat
  from nbclient import NotebookClient
except ImportError as e:  # pragma: no cover
  pytest.skip(f"notebook tests need nbformat, nbclient and ipykernel (pip install -e '.[test]'): "
              f"{e}", allow_module_level=True)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NB_DIR, "*.ipynb")))
# Notebooks that train on Split Fashion-MNIST (the Debian package `dataset-fashion-mnist`).
NEEDS_FASHION_MNIST = {"01_quickstart.ipynb", "02_objectives.ipynb", "04_add_a_method.ipynb"}
HAS_FASHION_MNIST = os.path.isdir("/usr/share/datasets/fashion-mnist")
CELL_TIMEOUT_S = 300


def test_notebooks_found():
  assert len(NOTEBOOKS) >= 4, NOTEBOOKS


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
