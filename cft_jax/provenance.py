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


# Instruction-set extensions XLA's CPU code generator chooses kernels by: two machines with the
# same "model name" (a virtual machine may say only "AMD EPYC") but different ones can end the
# same seed at different numbers.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_id(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
  """The processor's generation and instruction set, finer than :func:`cpu_model`.

  Args:
    cpuinfo: the file to read (``/proc/cpuinfo`` format; Linux only).

  Returns:
    ``"<vendor> family <f> model <m> stepping <s>; <flags>"`` from the first processor's entry,
    the flags being those of :data:`ISA_FLAGS` it has, e.g. ``"AuthenticAMD family 26 model 2
    stepping 1; sse4_2 avx avx2 fma f16c avx512f ..."``; None where the file cannot be read.
  """
  fields: Dict[str, str] = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        if not line.strip():
          break  # the first processor's entry only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
  except OSError:
    return None
  flags = set((fields.get("flags") or fields.get("features") or "").split())
  ident = " ".join([fields.get("vendor_id", "")] + [
      f"{name} {fields[k]}" for k, name in (("cpu family", "family"), ("model", "model"),
                                            ("stepping", "stepping")) if k in fields]).strip()
  return f"{ident}; {' '.join(x for x in ISA_FLAGS if x in flags)}"


@functools.lru_cache(maxsize=1)
def provenance() -> Dict[str, Any]:
  """The run's provenance, as written to ``metrics.json['provenance']``.

  Returns:
    ``{"commit": str | None, "code_commit": str | None, "dirty": bool | None, "cpu_model": str,
    "cpu_id": str | None, "python": str, "packages": {name: version | None}}``: ``commit`` is ``git rev-parse HEAD``
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
  return {**checkout_state(), "cpu_model": cpu_model(), "cpu_id": cpu_id(),
          "python": platform.python_version(), "packages": versions}
