"""The test session itself: an exception raised in a finaliser while tfds lazily imports its
modules is reported as a warning, not as a failure of whichever test happens to run (see
tests/conftest.py)."""

import pytest


class _RaisesOnDelete:

  def __del__(self):
    raise ValueError("raised by a finaliser")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_finaliser_error_inside_lazy_imports_is_a_warning_not_a_failure():
  epy = pytest.importorskip("etils.epy")
  with epy.lazy_imports():  # what tensorflow_datasets does while it imports its modules
    obj = _RaisesOnDelete()
    del obj  # the unraisable hook runs here, under the patched __import__
