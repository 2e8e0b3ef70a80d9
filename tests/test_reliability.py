"""Issue 7: data parallelism, fault-tolerant resume, determinism and hardened inputs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cft_jax import train
from cft_jax.config import ConfigError, validate_config
from tests.test_train import HAS_FMNIST, ROOT, tiny_config

needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


@needs_fmnist
def test_pmap_matches_single_device_and_compiles_once(tmp_path):
  # dp_check.py forces 4 CPU devices itself (chex.set_n_cpu_devices)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "dp_check.py"), str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.split("RESULT ")[-1])
  assert res["devices"] == 4
  for n in (2, 4):  # parameters after 4 Adam steps (one batch padded) equal the 1-device run
    assert res[f"max_abs_diff_{n}"] < 1e-5, res
    assert res[f"loss_diff_{n}"] < 1e-5, res
    assert res[f"traces_{n}"] == 1, res
  # through train.run: 3 tasks, the step is compiled once, and 1 vs 2 devices agree
  assert res["run_1"]["compiles"] == 1 and res["run_2"]["compiles"] == 1
  assert res["run_2"]["devices"] == 2
  R1 = np.array(res["run_1"]["R"], float)
  R2 = np.array(res["run_2"]["R"], float)
  np.testing.assert_allclose(R1, R2, atol=2.5)  # at most one test image of 40 flips


CLI_ARGS = ["--config.model.name=tiny_cnn", "--config.model.pretrained=False",
            "--config.data.image_size=16", "--config.data.train_limit=64",
            "--config.data.test_limit=40", "--config.data.augment=crop_flip",
            "--config.scenario.num_tasks=5", "--config.train.batch_size=16",
            "--config.train.epochs=2", "--config.train.progress=False",
            "--config.train.plots=False", "--config.checkpoint.every_steps=2",
            "--config.eval.batch_size=20"]


def _cli(workdir, *extra):
  return [sys.executable, "-m", "cft_jax.main", "--config", "configs/default.py",
          "--workdir", str(workdir), *CLI_ARGS, *extra]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    m = json.load(f)
  return {k: m[k] for k in ("accuracy_matrix", "task_il_accuracy_matrix", "final_accuracy",
                            "forgetting", "bwt", "entropy_end_of_task")}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref")
  out = subprocess.run(_cli(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, _metrics(workdir)


@needs_fmnist
def test_same_seed_same_metrics(reference_run, tmp_path):
  out = subprocess.run(_cli(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  assert _metrics(tmp_path) == reference_run[1]


@needs_fmnist
def test_sigkill_at_random_points_then_resume(reference_run, tmp_path):
  """Kill -9 at random moments (several trials), restart with the same command, same metrics."""
  rng = random.Random(0)
  for trial in range(3):
    workdir = tmp_path / f"trial{trial}"
    kills = 0
    for _ in range(2):  # up to two kills per trial
      proc = subprocess.Popen(_cli(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=_env())
      time.sleep(rng.uniform(6.0, 14.0))
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
      else:
        break
    final = subprocess.run(_cli(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=_env())
    assert final.returncode == 0, final.stderr[-3000:]
    assert _metrics(workdir) == reference_run[1], f"trial {trial} after {kills} kills"


@needs_fmnist
def test_sigterm_saves_then_resumes(reference_run, tmp_path):
  proc = subprocess.Popen(_cli(tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=_env())
  # wait until training has started (the first log record), then ask it to stop
  log = tmp_path / "log.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (log.exists() and log.stat().st_size > 0):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "saved" in out, out[-2000:]
  assert any(d.isdigit() for d in os.listdir(tmp_path / "checkpoints"))
  final = subprocess.run(_cli(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=_env())
  assert final.returncode == 0, final.stderr[-3000:]
  assert "resuming" in final.stdout
  assert _metrics(tmp_path) == reference_run[1]


@needs_fmnist
def test_corrupt_checkpoint_falls_back_and_finished_runs_are_kept(reference_run, tmp_path):
  c = tiny_config(**{"scenario.num_tasks": 2})
  first = train.run(c, str(tmp_path))
  ckdir = tmp_path / "checkpoints"
  steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
  # a finished run is re-reported, not retrained or overwritten
  mtime = os.path.getmtime(tmp_path / "metrics.json")
  again = train.run(c, str(tmp_path))
  assert again["final_accuracy"] == first["final_accuracy"]
  assert os.path.getmtime(tmp_path / "metrics.json") == mtime
  # corrupt every file of the newest checkpoint and drop the results: falls back with a warning
  for root, _, files in os.walk(ckdir / str(steps[-1])):
    for fn in files:
      with open(os.path.join(root, fn), "wb") as f:
        f.write(b"\x00garbage")
  os.remove(tmp_path / "metrics.json")
  with pytest.warns(RuntimeWarning, match="unreadable"):
    resumed = train.run(c, str(tmp_path))
  assert os.path.isdir(ckdir / f"{steps[-1]}.corrupt")
  assert resumed["accuracy_matrix"] == first["accuracy_matrix"]
  # --overwrite trains from scratch
  fresh = train.run(c, str(tmp_path), overwrite=True)
  assert fresh["accuracy_matrix"] == first["accuracy_matrix"]


@needs_fmnist
def test_nan_loss_stops_with_task_and_step(tmp_path):
  c = tiny_config(**{"scenario.num_tasks": 2, "optim.learning_rate": 1e30,
                     "peft.name": "full", "loss.name": "ce"})
  with pytest.raises(FloatingPointError, match=r"task \d+ .*step \d+"):
    train.run(c, str(tmp_path))


BAD_CONFIGS = [
    ({"optim.learnin_rate": 0.1}, "optim.learnin_rate"),
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.batch_size": 2.5}, "train.batch_size"),
    ({"loss.name": "xent"}, "loss.name"),
    ({"peft.name": "prefix"}, "needs a ViT"),
    ({"peft.name": "adapter"}, "needs a ViT or EfficientNet"),
    ({"method.name": "lae", "peft.name": "full"}, "lae"),
    ({"method.projection": "tpgm"}, "val_fraction"),
    ({"data.val_fraction": 1.5}, "data.val_fraction"),
    ({"scenario.type": "domain_il"}, "scenario.type"),
]


def _config_with(overrides):
  d = tiny_config().to_dict()
  for k, v in overrides:
    section, key = k.split(".", 1)
    if isinstance(d.get(section), dict):
      d[section][key] = v
    else:
      d[section] = v
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_config_validation_names_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    validate_config(_config_with(overrides.items()))
  validate_config(tiny_config())  # the unmodified config is valid


KNOWN_KEYS = [f"{s}.{k}" for s, sec in tiny_config().items() if hasattr(sec, "keys")
              for k in sec.keys()]
VALUES = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=6), st.booleans(), st.none(),
                   st.lists(st.integers(-2, 5), max_size=3),
                   st.sampled_from(["lora", "lae", "tpgm", "vit_tiny", "data_il", "mse", "full"]))
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(["seed", "junk.key", "optim.lr"]),
                 st.text(alphabet="abcdefgh_", min_size=1, max_size=8).map(lambda t: f"train.{t}"))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(KEYS, VALUES), max_size=4))
def test_fuzz_config_only_config_errors(overrides):
  try:
    cfg = _config_with(overrides)
  except (TypeError, ValueError):
    return  # ml_collections itself refused the value
  try:
    validate_config(cfg)
  except ConfigError:
    pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_fuzz_idx_reader(payload, gz):
  import gzip  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from cft_jax.data import read_idx  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "x-idx3-ubyte" + (".gz" if gz else ""))
    with (gzip.open if gz else open)(path, "wb") as f:
      f.write(payload)
    try:
      out = read_idx(path)
      assert out.dtype == np.uint8
    except ValueError:
      pass


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["png", "jpg", "bmp"]))
def test_fuzz_image_folder(payload, ext):
  import tempfile  # pylint: disable=g-import-not-at-top
  from cft_jax.data import DatasetNotFoundError, load_dataset  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    for split in ("train", "test"):
      os.makedirs(os.path.join(d, split, "cls"))
      with open(os.path.join(d, split, "cls", f"a.{ext}"), "wb") as f:
        f.write(payload)
    try:
      load_dataset("image_folder", root=d, image_size=8)
    except (ValueError, DatasetNotFoundError):
      pass


@needs_fmnist
def test_scenario_classes_not_divisible(tmp_path):
  with pytest.raises(ValueError, match="does not divide"):
    train.run(tiny_config(**{"scenario.num_tasks": 3}), str(tmp_path))
