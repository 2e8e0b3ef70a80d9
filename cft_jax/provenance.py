"""Where a run's numbers come from: the code's commit, the processor and the package versions.

Every ``metrics.json`` records :func:`provenance` so that a study pairs only runs of the same code
and the same CPU model (XLA's CPU kernels differ by processor: the same seed can end a point
apart on two machines). A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Any, Dict, Optional

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "grain",
            "tensorflow-datasets", "ml-collections", "pillow")


def _git(*args: str) -> Optional[str]:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=20,
                         check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def cpu_model() -> str:
  """The processor's model name (``/proc/cpuinfo`` "model name", else :func:`platform.processor`
  or the machine type), e.g. ``"AMD EPYC"``."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def provenance() -> Dict[str, Any]:
  """The run's provenance, as written to ``metrics.json['provenance']``.

  Returns:
    ``{"commit": str | None, "code_commit": str | None, "dirty": bool | None, "cpu_model": str,
    "python": str, "packages": {name: version | None}}``: ``commit`` is ``git rev-parse HEAD``
    of the checkout this package is imported from (None when it is not a git checkout, e.g. a
    wheel install), ``code_commit`` the last commit that changed ``cft_jax/``, ``configs/`` or
    ``setup.cfg`` (what a study pairs on), and ``dirty`` whether tracked files of that checkout differ from the commit (uncommitted changes:
    the commit alone does not name the code that ran). Computed once per process.
  """
  commit = _git("rev-parse", "HEAD")
  # The last commit that changed the code computing the numbers (the package, the configs, the
  # dependencies): runs of two commits that differ only in docs or studies pair.
  code_commit = _git("log", "-1", "--format=%H", "--", ".", "../configs", "../setup.cfg")
  dirty = None
  if commit:
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status)
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"commit": commit or None, "code_commit": code_commit or None, "dirty": dirty, "cpu_model": cpu_model(),
          "python": platform.python_version(), "packages": versions}
