"""Command line: ``python -m cft_jax.main --config configs/default.py --workdir DIR``.

Any config value can be overridden with ``--config.section.key=value``; ``--describe`` lists
every key with its default, allowed values and meaning (and this config's value). Re-running the
same command on the same workdir resumes after the last finished task.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cft_jax import parallel
from cft_jax import train
from cft_jax import config as config_lib
from cft_jax.config import ConfigError
from cft_jax.data import DatasetNotFoundError
from cft_jax.train import ConfigMismatchError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics.json).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete the workdir's checkpoints and results and train again.")
_DESCRIBE = flags.DEFINE_bool("describe", False,
                              "Print every config key (value, default, allowed values, meaning) "
                              "for this config and its method, then exit.")


_OVERRIDES = []  # "KEY=VALUE" of every --config.KEY=VALUE argument (config.apply_overrides)


def _parse_flags(argv):
  """absl parsing of everything but ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``), which
  :func:`cft_jax.config.apply_overrides` applies: it knows the method's own keys and answers an
  unknown key with one error line and a "did you mean"."""
  rest, i = [argv[0]], 1
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config.") and "=" in arg:
      _OVERRIDES.append(arg[len("--config."):])
    elif arg.startswith("--config.") and i + 1 < len(argv):
      _OVERRIDES.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
      i += 1
    else:
      rest.append(arg)
    i += 1
  sys.argv[:] = rest  # config_flags reads sys.argv for the overrides it would define
  return flags.FLAGS(rest)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  try:
    config = config_lib.apply_overrides(_CONFIG.value, _OVERRIDES)
    # pure: starts no JAX backend; a key given on the command line counts as set (its component
    # must read it) even at its default value
    resolved = config_lib.validate_config(config, explicit=[o.partition("=")[0]
                                                            for o in _OVERRIDES])
    if _DESCRIBE.value:
      print(config_lib.describe(config))
      return
  except ConfigError as e:
    raise SystemExit(f"cft_jax: error: {e}") from None
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (the output folder)")
  try:  # multi-host: before any other JAX call (config.distributed, or SLURM / TPU-pod env)
    parallel.init_distributed(resolved.distributed)
  except ValueError as e:
    raise SystemExit(f"cft_jax: error: {e}") from None
  try:
    train.run(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except (ConfigError, ConfigMismatchError, DatasetNotFoundError) as e:
    raise SystemExit(f"cft_jax: error: {e}") from None
  except KeyboardInterrupt as e:  # SIGINT/SIGTERM: the trainer saved a checkpoint first
    print(f"cft_jax: {e or 'interrupted'}", flush=True)
    raise SystemExit(130) from None


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
