"""Pieces the study scripts share: loading a config file, command-line overrides, the compile
cache, mean ± std, the tuning selection rule. Each study keeps its own run/reuse policy and report;
the protocol's statistics are in ``stats.py``, its claims in ``claims.py``."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple


def load_config_module(path: str, name: str = "study_config"):
  """Imports a ``configs/*.py`` file by path (a module with ``get_config(arg)``);
  :func:`cft_jax.config.load_config_module`."""
  from cft_jax.config import load_config_module as load  # pylint: disable=g-import-not-at-top
  return load(path, name)


def same_settings(saved: Dict[str, Any], config) -> bool:
  """Whether a finished run's saved ``config.json`` computes the same numbers as ``config``:
  :func:`cft_jax.config.same_run` over the sections that decide the metrics (``eval``
  included), against the resolved ``config``; keys present on one side only are skipped."""
  from cft_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  return not config_lib.same_run(saved, config_lib.validate_config(config),
                                 sections=config_lib.RESULT_SECTIONS)


def add_override_args(p, what: str = "per task") -> None:
  """``--train-limit/--test-limit/--image-size/--epochs/--learning-rate`` (the arguments
  :func:`apply_overrides` reads) on the argparse parser ``p``."""
  p.add_argument("--train-limit", type=int, default=None, help=f"training images {what}")
  p.add_argument("--test-limit", type=int, default=None, help=f"test images {what}")
  p.add_argument("--image-size", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--learning-rate", type=float, default=None)


def apply_overrides(c, args, seed: int):
  """Sets ``seed`` and the optional ``--train-limit/--test-limit/--image-size/--epochs/
  --learning-rate`` arguments (those the parser defines and the user gave) on config ``c``, and
  turns progress bars, plots and the per-task report off (studies print one line per run)."""
  c.seed = int(seed)
  for arg, section, key in (("train_limit", "data", "train_limit"),
                            ("test_limit", "data", "test_limit"),
                            ("image_size", "data", "image_size"), ("epochs", "train", "epochs"),
                            ("learning_rate", "optim", "learning_rate")):
    val = getattr(args, arg, None)
    if val is not None:
      c[section][key] = val
  c.train.progress = False
  c.train.plots = False
  c.train.verbose = False
  return c


def enable_compile_cache(directory: Optional[str], min_compile_secs: float = 0.0) -> None:
  """JAX's persistent compilation cache in ``directory`` ('' / None: off): the runs of a study
  differ only in their inputs, so runs after the first reuse the compiled executables."""
  if not directory:
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def mean_std(xs: Iterable[float]) -> Tuple[float, float]:
  """Mean and sample std (ddof 1; 0 for one value) of the finite values; NaNs if none."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  xs = np.asarray([x for x in xs if x is not None and np.isfinite(x)], float)
  if not len(xs):
    return float("nan"), float("nan")
  return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


# The Fashion-MNIST studies (objectives_study, robust_ft_study, dlcft_study) came before the
# registered protocol; their reports compare means and say so with this paragraph.
DESCRIPTIVE = (
    "**Descriptive, not a test.** These runs predate the registered protocol "
    "(`docs/results/protocol.md`): fixed hyper-parameters, no validation split, no registered "
    "claims, no paired intervals, no multiplicity correction. The comparisons below describe "
    "these runs' means: a difference larger than the seed spread is not a significance test, and "
    "one within it is not equivalence. The registered tests of the papers' claims are in "
    "`docs/results/claims.md`.")


# --- Tuning (the paired statistics live in stats.py) ----------------------------------------


def select_best(scores: Dict[Any, Sequence[float]]) -> Any:
  """The setting with the highest mean score over its tuning seeds (the protocol's selection
  rule; NaN scores, e.g. a diverged run, count as 0). Ties go to the earliest key in ``scores``'
  order (list the grid from the more conservative value on).

  Raises:
    ValueError: ``scores`` is empty or a setting has no score.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not scores:
    raise ValueError("select_best needs at least one setting")
  best, best_mean = None, -np.inf
  for key, xs in scores.items():
    if not len(xs):
      raise ValueError(f"setting {key!r} has no score")
    m = float(np.mean(np.nan_to_num(np.asarray(xs, float), nan=0.0)))
    if m > best_mean:
      best, best_mean = key, m
  return best
