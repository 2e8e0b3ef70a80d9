"""The command line (``python -m cft_jax.main``): the common mistakes stop with one
``cft_jax: error:`` line naming the file or the allowed values (issue 26, item 5); ``--help``
exits 0."""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "cft_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(out, status):
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert out.returncode == status and len(lines) == 1, (out.returncode, out.stderr[-2000:])
  return lines[0]


def test_no_config_is_one_usage_line():
  assert _one_error_line(_cli(), 2) == (
      "cft_jax: error: --config FILE.py is required, e.g. --config configs/default.py (--help "
      "lists the flags)")


def test_missing_config_file_names_it_and_the_shipped_ones():
  line = _one_error_line(_cli("--config", "configs/nope.py"), 2)
  shipped = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                   if f.endswith(".py") and not f.startswith("_"))
  assert line == (f"cft_jax: error: config file 'configs/nope.py' not found (configs/ holds: "
                  f"{', '.join(shipped)})")
  assert "cifar10.py" in shipped and "default.py" in shipped


def test_unknown_config_argument_lists_the_allowed_values():
  line = _one_error_line(_cli("--config", "configs/cifar10.py:xyz"), 2)
  assert line == (
      "cft_jax: error: configs/cifar10.py:xyz: config argument 'xyz': expected loss in ('ce', "
      "'epg', 'aepg', 'confidence_penalty', 'label_smoothing', 'focal', 'entropy_penalty', "
      "'reinforce'), method in ('sequential', 'lae', 'er', 'derpp', 'dlcft'), e.g. "
      "configs/cifar10.py:aepg,lae")
  # a config file whose get_config raises a plain ValueError: named the same way
  line = _one_error_line(_cli("--config", "configs/robust_ft.py:xyz"), 2)
  assert line == ("cft_jax: error: configs/robust_ft.py:xyz: unknown robust fine-tuning method "
                  "'xyz'; expected one of ('ft', 'l2sp', 'wise_ft', 'tpgm', 'ftp')")


def test_unknown_flag_and_stray_argument_are_one_line():
  assert _one_error_line(_cli("--config", "configs/default.py", "--bogus"), 2) == (
      "cft_jax: error: Unknown command line flag 'bogus' (--help lists the flags)")
  assert _one_error_line(_cli("--config", "configs/default.py", "stray"), 2) == (
      "cft_jax: error: unexpected arguments: ['stray'] (options are --name=value; --help lists "
      "them)")


def test_help_exits_0_and_lists_the_flags():
  out = _cli("--help")
  assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
  assert "--config" in out.stdout and "--workdir" in out.stdout and "--describe" in out.stdout
  assert "configs/cifar10.py:aepg,lae" in out.stdout


def test_truncated_vit_checkpoint_names_the_file(tmp_path):
  from tests.data.test_data import make_image_folder  # pylint: disable=g-import-not-at-top
  root = make_image_folder(str(tmp_path / "imgs"), classes=("a", "b", "c", "d"), size=12)
  good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
  np.savez(good, cls=np.zeros((1, 1, 192), np.float32), x=np.ones((64, 64), np.float32))
  bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  line = _one_error_line(_cli(
      "--config", "configs/default.py", "--workdir", str(tmp_path / "run"),
      "--config.data.name=image_folder", f"--config.data.root={root}",
      "--config.data.image_size=16", "--config.scenario.num_tasks=2",
      "--config.model.name=vit_ti4", f"--config.model.checkpoint={bad}"), 1)
  assert line == (f"cft_jax: error: model.checkpoint: {bad} is not a readable .npz (BadZipFile: "
                  f"File is not a zip file); the download may be truncated: download it again")


def test_cifar10_is_a_dataset_name():
  """``data.name=cifar10`` validates (it was an error suggesting cifar100); --describe shows it."""
  out = _cli("--config", "configs/default.py", "--describe", "--config.data.name=cifar10")
  assert out.returncode == 0, out.stderr[-2000:]
  row = [line.split() for line in out.stdout.splitlines() if line.startswith("data.name ")][0]
  assert row[1:3] == ["'cifar10'", "'fashion_mnist'"]
