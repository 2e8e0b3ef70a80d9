"""Two processes on one machine as a multi-host run, against the same run in one process.

Starts the CLI twice as a two-process JAX job on localhost (``jax.distributed`` with the gloo CPU
collectives; process ``i`` gets ``--config.distributed.process_id=i``, both the same
``--config.distributed.coordinator_address=127.0.0.1:PORT`` and ``num_processes=2``), each
process feeding its half of every global batch, and the same config as a single process. Prints
both runs' accuracy matrices, final metrics and per-step training losses side by side with the
largest differences and wall times, then one JSON line.

    python benchmarks/multihost_localhost.py [--workdir DIR] [--tasks 5] [--epochs 2]
        [extra --config.* overrides ...]
    python benchmarks/multihost_localhost.py --smoke   # 1 task, 1 epoch, 32 / 20 images (CI)

The default job is small (tiny_cnn at 16 px, Fashion-MNIST subsets, crop+flip augmentation) so
it runs in a few minutes on a laptop CPU; pass overrides for another model. On real clusters run
one such command per host (see the README's "Running on accelerators").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _results(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  with open(os.path.join(workdir, "log.jsonl")) as f:
    log = [json.loads(l) for l in f if l.strip()]
  return m, log


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="")
  ap.add_argument("--tasks", type=int, default=5)
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--smoke", action="store_true",
                  help="smallest run (1 task, 1 epoch, 32 train / 20 test images): CI")
  args, extra = ap.parse_known_args()
  if args.smoke:
    args.tasks, args.epochs = 1, 1
    extra = ["--config.data.train_limit=32", "--config.data.test_limit=20", *extra]
  root = args.workdir or tempfile.mkdtemp(prefix="cft_multihost_")
  base = [sys.executable, "-m", "cft_jax.main", "--config", "configs/default.py",
          "--config.model.name=tiny_cnn", "--config.model.pretrained=False",
          "--config.data.image_size=16", "--config.data.train_limit=128",
          "--config.data.test_limit=100", "--config.data.augment=crop_flip",
          f"--config.scenario.num_tasks={args.tasks}", "--config.loss.name=ce",
          "--config.optim.learning_rate=0.01", "--config.train.batch_size=16",
          f"--config.train.epochs={args.epochs}", "--config.train.log_every=1",
          "--config.train.progress=False", "--config.train.plots=False",
          "--config.train.verbose=False", "--config.eval.batch_size=20", "--overwrite", *extra]
  t0 = time.time()
  one = os.path.join(root, "one_process")
  subprocess.run(base + ["--workdir", one], cwd=ROOT, check=True, env=_env())
  t_one = time.time() - t0
  two = os.path.join(root, "two_processes")
  port = _free_port()
  t0 = time.time()
  procs = [subprocess.Popen(base + ["--workdir", two,
                                    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                    "--config.distributed.num_processes=2",
                                    f"--config.distributed.process_id={i}"], cwd=ROOT,
                            env=_env()) for i in range(2)]
  codes = [p.wait() for p in procs]
  t_two = time.time() - t0
  if any(codes):
    raise SystemExit(f"two-process run failed: exit codes {codes}")
  (m1, log1), (m2, log2) = _results(one), _results(two)
  R1, R2 = np.array(m1["accuracy_matrix"], float), np.array(m2["accuracy_matrix"], float)
  loss1 = np.array([r["loss"] for r in log1])
  loss2 = np.array([r["loss"] for r in log2])
  print(f"\n{'':<28}{'1 process':>14}{'2 processes':>14}")
  print(f"{'devices (processes)':<28}{m1['num_devices']:>10} ({m1.get('num_processes', 1)})"
        f"{m2['num_devices']:>10} ({m2.get('num_processes', 1)})")
  for key in ("final_accuracy", "avg_incremental_accuracy", "forgetting"):
    print(f"{'class-IL ' + key:<28}{m1[key]:14.4f}{m2[key]:14.4f}")
  print(f"{'task-IL final_accuracy':<28}{m1['task_il']['final_accuracy']:14.4f}"
        f"{m2['task_il']['final_accuracy']:14.4f}")
  print(f"{'log records':<28}{len(log1):14d}{len(log2):14d}")
  print(f"{'wall time (s)':<28}{t_one:14.1f}{t_two:14.1f}")
  out = {"max_abs_diff_accuracy_matrix": float(np.nanmax(np.abs(R1 - R2))),
         "max_abs_diff_step_loss": float(np.max(np.abs(loss1 - loss2)))
         if len(loss1) == len(loss2) else None,
         "max_abs_diff_entropy_end": float(np.max(np.abs(
             np.subtract(m1["entropy_end_of_task"], m2["entropy_end_of_task"])))),
         "one_process_s": round(t_one, 1), "two_processes_s": round(t_two, 1),
         "workdir": root}
  print(f"max |diff|: accuracy matrix {out['max_abs_diff_accuracy_matrix']:.2e}, per-step loss "
        f"{out['max_abs_diff_step_loss']:.2e}, end-of-task entropy "
        f"{out['max_abs_diff_entropy_end']:.2e}")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
