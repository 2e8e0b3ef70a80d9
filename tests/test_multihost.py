"""Issue 16: the CLI on 2 forced CPU devices and as TWO PROCESSES on localhost (jax.distributed,
gloo collectives) equals the one-device, one-process run; kill -9 of both processes mid-task, then
a restart of both, resumes to the same metrics."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_train import HAS_FMNIST, ROOT

needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")

ARGS = ["--config", "configs/default.py", "--config.model.name=tiny_cnn",
        "--config.model.pretrained=False", "--config.data.image_size=16",
        "--config.data.train_limit=64", "--config.data.test_limit=40",
        "--config.data.augment=crop_flip", "--config.scenario.num_tasks=2",
        "--config.loss.name=ce", "--config.optim.learning_rate=0.01",
        "--config.train.batch_size=16", "--config.train.epochs=2", "--config.train.log_every=1",
        "--config.train.progress=False", "--config.train.plots=False",
        "--config.train.verbose=False", "--config.checkpoint.every_steps=2",
        "--config.eval.batch_size=20"]


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, num_processes: int = 2, *extra, port=None):
  """Starts the CLI as ``num_processes`` processes of one run (coordinator on localhost)."""
  port = port or free_port()
  return [subprocess.Popen(
      [sys.executable, "-m", "cft_jax.main", "--workdir", str(workdir), *ARGS, *extra,
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       f"--config.distributed.num_processes={num_processes}",
       f"--config.distributed.process_id={i}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
          for i in range(num_processes)]


def wait_all(procs, timeout=600):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def results(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  with open(os.path.join(workdir, "log.jsonl")) as f:
    log = [json.loads(l) for l in f if l.strip()]
  return m, log


def assert_same_run(a, b, atol=1e-3):
  (ma, la), (mb, lb) = a, b
  for key in ("accuracy_matrix", "task_il_accuracy_matrix"):
    np.testing.assert_allclose(np.array(ma[key], float), np.array(mb[key], float), atol=atol)
  np.testing.assert_allclose(ma["entropy_end_of_task"], mb["entropy_end_of_task"], atol=atol)
  assert [(r["task"], r["step"]) for r in la] == [(r["task"], r["step"]) for r in lb]
  for key in ("loss", "accuracy", "entropy"):  # every step's training metrics
    np.testing.assert_allclose([r[key] for r in la], [r[key] for r in lb], atol=atol)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_process")
  out = subprocess.run([sys.executable, "-m", "cft_jax.main", "--workdir", str(workdir), *ARGS],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  m, log = results(workdir)
  assert m["num_devices"] == 1 and m["parallelism"] == "single"
  return m, log


@needs_fmnist
def test_two_devices_sharded_equals_one_device(reference, tmp_path):
  out = subprocess.run([sys.executable, "-m", "cft_jax.main", "--workdir", str(tmp_path), *ARGS,
                        "--config.train.num_devices=2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert out.returncode == 0, out.stderr[-3000:]
  run = results(tmp_path)
  assert run[0]["num_devices"] == 2 and run[0]["parallelism"] == "sharding"
  assert_same_run(run, reference, atol=1e-4)


@needs_fmnist
def test_two_processes_on_localhost_equal_one_process(reference, tmp_path):
  wait_all(launch(tmp_path))
  run = results(tmp_path)
  assert run[0]["num_devices"] == 2 and run[0]["num_processes"] == 2
  assert run[0]["parallelism"] == "sharding"
  assert_same_run(run, reference)  # also: one log record per step (process 1 wrote none)
  assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".json")) == ["config.json",
                                                                             "metrics.json"]


@needs_fmnist
def test_two_processes_sigkill_both_then_restart_resumes(reference, tmp_path):
  procs = launch(tmp_path)
  ckdir = tmp_path / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:  # until the 2nd mid-task checkpoint (global step 4) is committed
    if ckdir.is_dir() and any(d.isdigit() and int(d) >= 8 for d in os.listdir(ckdir)):
      break
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate()
  assert all(p.returncode == -signal.SIGKILL for p in procs), "finished before the kill"
  assert not (tmp_path / "metrics.json").exists()
  outs = wait_all(launch(tmp_path, 2, "--config.train.verbose=True"))
  assert "resuming from" in outs[0], outs[0][-2000:]  # from the mid-task checkpoint
  assert "resuming from" not in outs[1] and "class-IL" not in outs[1]  # process 1 runs quietly
  assert_same_run(results(tmp_path), reference)
