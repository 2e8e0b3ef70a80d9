"""Test-session settings: a persistent XLA compilation cache shared by the test process and the
subprocesses it starts (CLI runs, SIGKILL trials, notebooks), so identical programs compile once."""

import os
import tempfile

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "cft_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# pytest's unraisable-exception hook imports `tracemalloc` on first use. If a garbage-collected
# object's `__del__` raises while tensorflow_datasets is inside etils' `epy.lazy_imports()` (which
# patches `builtins.__import__` to hand back lazy stubs), that import runs under the patch, fails
# ("'LazyModule' object is not callable"), and pytest fails whichever test is running with
# "Failed to process unraisable exception" (seen in CI on the tfds mock-data test). Imported here,
# tracemalloc resolves from `sys.modules` and the exception is reported as the warning it is.
import tracemalloc  # noqa: F401,E402  pylint: disable=unused-import,wrong-import-position
