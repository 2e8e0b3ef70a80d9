"""Every script under ``benchmarks/`` runs once at its smallest size (``--smoke``).

Nothing else runs the benchmarks, so a change of the library's API could break the scripts the
performance figures come from unseen (issue 26, item 8: ``step_throughput.py`` stopped on
``build_model``'s ``PeftSpec``). This is a smoke run: it fails on an exception, never on a
timing. The PyTorch side of ``step_throughput.py`` runs when torch is installed (the
``torch-compare`` extra) and is skipped otherwise.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPTS = ("step_throughput.py", "effnet_throughput.py", "feature_cache.py", "host_sync.py",
           "input_pipeline.py", "multihost_localhost.py", "peft_memory.py")
HELPERS = ("torch_reference.py",)  # imported by step_throughput.py, not a script
PRINTS_JSON = ("step_throughput.py", "feature_cache.py", "host_sync.py", "input_pipeline.py",
               "multihost_localhost.py")


def test_every_benchmark_script_is_smoke_tested():
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
  assert found == sorted(SCRIPTS + HELPERS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_run(script, tmp_path):
  env = dict(os.environ, TMPDIR=str(tmp_path))  # scripts write their temporary files there
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--smoke"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  if script in PRINTS_JSON:
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary, out[-2000:]
  if script == "step_throughput.py":
    assert set(summary["img_per_s"]) >= {"jax_effnet_lora", "jax_vit_full", "jax_vit_lora",
                                         "jax_vit_full_linearized", "jax_vit_lora_remat"}
    assert "lowered (smoke)" in proc.stdout  # the Lite0 full fine-tuning cases
  if script == "peft_memory.py":
    assert all(f"\n{m} " in proc.stdout for m in ("full", "lora", "adapter", "prefix"))
