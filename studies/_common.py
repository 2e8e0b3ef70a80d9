"""Pieces the study scripts share: loading a config file, command-line overrides, the compile
cache, mean ± std. Each study keeps its own run/reuse policy and report."""

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


# --- Paired comparisons over seeds (the protocol of docs/results/protocol.md) ---------------


def paired_t_interval(a: Sequence[float], b: Sequence[float],
                      confidence: float = 0.95) -> Dict[str, float]:
  """Paired difference ``a - b`` over seeds with a Student-t confidence interval.

  ``a[i]`` and ``b[i]`` are two methods' scores (e.g. class-IL final accuracy, %) of the same
  seed ``i`` (same class order, validation split, data subset and order), so the per-seed
  differences ``d_i = a_i - b_i`` cancel the seed-to-seed variation the two runs share.
  Interval: ``mean(d) ± t_{(1+confidence)/2, n-1} * std(d, ddof=1) / sqrt(n)`` (Student 1908;
  the one-sample t interval on the differences).

  Args:
    a, b: scores of equal length ``n >= 2`` (paired by position).
    confidence: the interval's coverage, in (0, 1).

  Returns:
    ``{"mean", "std", "n", "lo", "hi"}``: mean and sample std (ddof 1) of ``d``, the number of
    pairs, the interval's bounds (same unit as the scores).

  Raises:
    ValueError: lengths differ, fewer than 2 pairs, a non-finite score, or ``confidence``
      outside (0, 1).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = _paired_differences(a, b)
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  n = len(d)
  mean, std = float(d.mean()), float(d.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * std / np.sqrt(n)
  return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half}


def paired_bootstrap_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                              num_resamples: int = 10000, seed: int = 0) -> Tuple[float, float]:
  """Percentile bootstrap interval of the mean paired difference ``mean(a - b)`` (Efron &
  Tibshirani 1993, ch. 13): the seeds are resampled with replacement ``num_resamples`` times
  (numpy ``default_rng(seed)``: reproducible), and the ``(1 -+ confidence) / 2`` quantiles of
  the resampled means are returned as ``(lo, hi)``. With few seeds it is narrower than the t
  interval (it cannot see beyond the observed differences); the protocol reports both and
  decides with the t interval.

  Raises:
    ValueError: as :func:`paired_t_interval`, or ``num_resamples < 1``.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  d = _paired_differences(a, b)
  if not 0.0 < confidence < 1.0 or num_resamples < 1:
    raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence}, "
                     f"{num_resamples}")
  idx = np.random.default_rng(seed).integers(0, len(d), size=(num_resamples, len(d)))
  means = d[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
  return float(lo), float(hi)


def _paired_differences(a, b):
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired scores need two 1-D sequences of equal length, got shapes "
                     f"{a.shape} and {b.shape}")
  if len(a) < 2:
    raise ValueError(f"a paired interval needs >= 2 seeds, got {len(a)}")
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError("paired scores must be finite (a run failed or is missing)")
  return a - b


VERDICTS = ("reproduced", "not reproduced", "inconclusive")


def claim_verdict(lo: float, hi: float, margin: float = 1.0) -> str:
  """The verdict on a claim "A beats B" from the 95% interval ``[lo, hi]`` of the paired
  difference ``A - B`` (points of accuracy; for a claim "A is below B" pass the interval of
  ``B - A``):

  * ``"reproduced"``: ``lo > 0`` — the whole interval is a gain;
  * ``"not reproduced"``: ``hi < margin`` — the interval excludes every gain of ``margin``
    points or more (the smallest effect the claim is about; the aEPG paper's gains are 1.3-1.6
    points), including a significant loss;
  * ``"inconclusive"``: otherwise (the interval straddles 0 and reaches ``margin``).

  Raises:
    ValueError: ``lo > hi`` or a negative ``margin``.
  """
  if lo > hi or margin < 0:
    raise ValueError(f"need lo <= hi and margin >= 0, got lo={lo}, hi={hi}, margin={margin}")
  if lo > 0:
    return "reproduced"
  if hi < margin:
    return "not reproduced"
  return "inconclusive"


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
