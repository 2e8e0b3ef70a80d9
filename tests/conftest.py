"""Test-session settings: a persistent XLA compilation cache shared by the test process and the
subprocesses it starts (CLI runs, SIGKILL trials, notebooks), so identical programs compile once."""

import os
import tempfile

_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "cft_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
