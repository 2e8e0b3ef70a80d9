"""Every file of a run checked before its first step (issue 26: a corrupt *test* image used to
stop the run only after that task had trained).

:func:`check_splits` runs :func:`cft_jax.data.sources.check_example` (JPEG: a 1/8-scale decode;
PNG: chunk CRCs; an empty or unreadable file: named) over the examples a run uses — its tasks'
train, validation and test indices, nothing else — in a thread pool, with a progress bar. It
reports every bad file at once: an error naming them (one line each, up to ``limit``) unless
``data.skip_corrupt``, whose per-split counts go into ``metrics.json`` (``skipped_corrupt``).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from cft_jax.data.sources import BadDataError, check_example

SPLITS = ("train", "val", "test")


def find_corrupt(source: Any, indices: Sequence[int], threads: int = 8, progress: bool = False,
                 desc: str = "checking images") -> List[Tuple[int, str]]:
  """The examples of ``source`` among ``indices`` that cannot be used.

  Args:
    source: a random-access source (:mod:`cft_jax.data.sources`).
    indices: example indices (duplicates are checked once).
    threads: worker threads (file reads and PIL decoding release the GIL).
    progress: show a tqdm bar.
    desc: the bar's label.

  Returns:
    ``[(index, "<file or record>: <reason>")]`` sorted by index.
  """
  idx = np.unique(np.asarray(indices, np.int64))
  if not len(idx) or source is None:
    return []
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  bad = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool, \
      tqdm(total=len(idx), desc=desc, leave=False, dynamic_ncols=True,
           disable=None if progress else True) as bar:  # None: a bar on a terminal only
    for i, reason in zip(idx, pool.map(lambda i: check_example(source, int(i)), idx)):
      bar.update(1)
      if reason is not None:
        bad.append((int(i), f"{source.describe(int(i))}: {reason}"))
  return bad


def check_splits(splits: Dict[str, Tuple[Any, Sequence[int]]], skip_corrupt: bool,
                 threads: int = 8, progress: bool = False, limit: int = 20
                 ) -> Tuple[Dict[str, int], List[str]]:
  """Checks every example a run uses, before it trains.

  Args:
    splits: ``{split: (source, indices)}``, e.g. ``train`` / ``val`` (both from the training
      source) and ``test``.
    skip_corrupt: ``data.skip_corrupt``: count the bad files instead of raising.
    threads: worker threads (``data.read_threads``).
    progress: show a progress bar.
    limit: the most files named (the rest are counted).

  Returns:
    ``(counts, lines)``: bad examples per split (``{"train": n, ...}``) and one line per bad
    file (at most ``limit``, then ``"... and N more"``).

  Raises:
    BadDataError: any bad file when not ``skip_corrupt``: one line for one file (``cannot decode
      image PATH: REASON (test split); ...``), else a first line with the counts per split and
      what to do, then one line per file.
  """
  total = sum(len(np.unique(np.asarray(ix))) for _, ix in splits.values())
  counts, found, first = {}, [], ""
  for split, (source, indices) in splits.items():
    bad = find_corrupt(source, indices, threads, progress,
                       desc=f"checking {total:,} images ({split})")
    counts[split] = len(bad)
    found += [f"  {split}: {what}" for _, what in bad]
    first = first or (f"cannot decode image {bad[0][1]} ({split} split)" if bad else "")
  lines = found[:limit] + ([f"  ... and {len(found) - limit} more"] if len(found) > limit else [])
  if len(found) == 1 and not skip_corrupt:  # one line
    raise BadDataError(f"{first}; nothing was trained. Remove or replace it, or set "
                       f"data.skip_corrupt=True to skip such files.")
  if found and not skip_corrupt:
    per_split = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    raise BadDataError(
        f"{len(found)} of the {total:,} images this run uses cannot be decoded ({per_split}); "
        f"nothing was trained. Remove or replace them, or set data.skip_corrupt=True to skip "
        f"them:\n" + "\n".join(lines))
  return counts, lines
