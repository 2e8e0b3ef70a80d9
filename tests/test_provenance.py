"""cft_jax/provenance.py on a real git checkout: what counts as the code a run's numbers come from.

A study pairs runs on ``(code_commit, cpu_model)`` and treats a dirty checkout as its own version;
a study's results written into the checkout it runs from must not make its runs "dirty"."""

import os
import subprocess

import pytest

from cft_jax import provenance

_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t"}


def _git(repo, *args):
  return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                        text=True, env=_ENV).stdout.strip()


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


@pytest.fixture
def repo(tmp_path):
  try:
    _git(tmp_path, "init", "-q")
  except (OSError, subprocess.SubprocessError):
    pytest.skip("git is not installed")
  _write(tmp_path / "cft_jax" / "losses.py", "A = 1\n")
  _write(tmp_path / "configs" / "c.py", "B = 1\n")
  _write(tmp_path / "setup.cfg", "[metadata]\n")
  _write(tmp_path / "docs" / "results" / "study_selected.json", "{}\n")
  _git(tmp_path, "add", "-A")
  _git(tmp_path, "commit", "-qm", "code")
  return tmp_path


def test_results_written_into_the_checkout_leave_it_clean(repo):
  pkg = str(repo / "cft_jax")
  code = _git(repo, "rev-parse", "HEAD")
  assert provenance.checkout_state(pkg) == {"commit": code, "code_commit": code, "dirty": False}
  # a study writes its selections into the tracked docs/results/ and new files beside the code
  _write(repo / "docs" / "results" / "study_selected.json", '{"ce_seq": {"lr": 0.001}}\n')
  _write(repo / "cft_jax" / "untracked_notes.txt", "x\n")
  assert provenance.checkout_state(pkg)["dirty"] is False
  # a docs-only commit moves the commit, not the code commit
  _git(repo, "commit", "-qam", "results")
  state = provenance.checkout_state(pkg)
  assert state["commit"] != code and state["code_commit"] == code and state["dirty"] is False


@pytest.mark.parametrize("path", ["cft_jax/losses.py", "configs/c.py", "setup.cfg"])
def test_an_uncommitted_change_to_the_code_makes_it_dirty(repo, path):
  _write(repo / path, "changed = True\n")
  assert provenance.checkout_state(str(repo / "cft_jax"))["dirty"] is True
  _git(repo, "checkout", "--", path)
  assert provenance.checkout_state(str(repo / "cft_jax"))["dirty"] is False


def test_outside_a_git_checkout_nothing_is_claimed(tmp_path):
  (tmp_path / "pkg").mkdir()
  assert provenance.checkout_state(str(tmp_path / "pkg")) == {
      "commit": None, "code_commit": None, "dirty": None}


def test_cpu_id_names_the_generation_and_the_instruction_set(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                  "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu sse4_2 avx2 fma avx512f\n"
                  "\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n")
  assert provenance.cpu_id(str(info)) == \
      "AuthenticAMD family 26 model 2 stepping 1; sse4_2 avx2 fma avx512f"
  assert provenance.cpu_id(str(tmp_path / "missing")) is None
