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


def _git(*args: str, cwd: Optional[str] = None) -> Optional[str]:
  here = cwd or os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=20,
                         check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


# The code that computes a run's numbers, relative to the package folder: the package, the
# configs, the dependencies. Docs, studies and results written into the checkout are not in it.
CODE_PATHS = (".", "../configs", "../setup.cfg")


def checkout_state(package_dir: Optional[str] = None) -> Dict[str, Any]:
  """The git state of the checkout holding ``package_dir`` (default: this package's folder).

  Returns:
    ``{"commit": str | None, "code_commit": str | None, "dirty": bool | None}``: ``commit`` is
    ``git rev-parse HEAD`` (None outside a git checkout, e.g. a wheel install), ``code_commit``
    the last commit that changed :data:`CODE_PATHS`, ``dirty`` whether tracked files under
    :data:`CODE_PATHS` differ from ``HEAD`` (None when git cannot tell). A study's own results
    written into the checkout (``docs/results/*.json``) leave it clean: they do not change the
    code that computes a run.
  """
  commit = _git("rev-parse", "HEAD", cwd=package_dir)
  code_commit = _git("log", "-1", "--format=%H", "--", *CODE_PATHS, cwd=package_dir)
  dirty = None
  if commit:
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS,
                  cwd=package_dir)
    dirty = None if status is None else bool(status)
  return {"commit": commit or None, "code_commit": code_commit or None, "dirty": dirty}


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
    ``setup.cfg`` (what a study pairs on), and ``dirty`` whether tracked files of that code
    differ from the commit (uncommitted changes: the commit alone does not name the code that
    ran); see :func:`checkout_state`. Computed once per process.
  """
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {**checkout_state(), "cpu_model": cpu_model(), "python": platform.python_version(),
          "packages": versions}
