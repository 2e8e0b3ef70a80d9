"""Command line: ``python -m cft_jax.main --config configs/default.py --workdir DIR``.

``--config FILE.py`` (or ``FILE.py:ARG``, the argument of the file's ``get_config``, e.g.
``configs/cifar10.py:aepg,lae``). Any config value can be overridden with
``--config.section.key=value``; ``--describe`` lists every key with its default, allowed values
and meaning (and this config's value). Re-running the same command on the same workdir resumes
after the last finished task. A mistake on the command line or in the config stops with one
``cft_jax: error: ...`` line (exit status 2 for the command line itself, 1 for the config or the
data).
"""

import sys

from absl import app
from absl import flags
from absl import logging

from cft_jax import parallel
from cft_jax import train
from cft_jax import config as config_lib
from cft_jax.config import ConfigError
from cft_jax.data import DatasetNotFoundError
from cft_jax.train import ConfigMismatchError

_CONFIG = flags.DEFINE_string("config", None, "Experiment config file: FILE.py, or FILE.py:ARG "
                              "(the argument of its get_config), e.g. configs/cifar10.py:aepg,lae. "
                              "Override any key with --config.section.key=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics.json).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete the workdir's checkpoints and results and train again.")
_DESCRIBE = flags.DEFINE_bool("describe", False,
                              "Print every config key (value, default, allowed values, meaning) "
                              "for this config and its method, then exit.")


_OVERRIDES = []  # "KEY=VALUE" of every --config.KEY=VALUE argument (config.apply_overrides)
_HELP = ("-h", "-?", "--help", "--helpshort", "--helpfull")
USAGE = 2  # exit status of a mistake on the command line (1: in the config or the data)


def _fail(message, status: int = 1):
  """Stops with one ``cft_jax: error: MESSAGE`` line on stderr (exit ``status``)."""
  text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f"cft_jax: error: {text}", file=sys.stderr, flush=True)
  raise SystemExit(status)


def _parse_flags(argv):
  """absl parsing of everything but ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``), which
  :func:`cft_jax.config.apply_overrides` applies: it knows the method's own keys and answers an
  unknown key with one error line and a "did you mean". ``--help`` prints the flags and exits
  0; a flag error is one line (exit 2)."""
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
  if any(arg in _HELP for arg in rest[1:]):
    app.usage(shorthelp="--helpfull" not in rest, writeto_stdout=True, exitcode=0)
  sys.argv[:] = rest
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    _fail(f"{e} (--help lists the flags)", USAGE)


def _load_config():
  """The ``--config`` file's config with the ``--config.KEY=VALUE`` overrides applied.

  Raises:
    SystemExit: one error line: no ``--config`` or a file that does not exist or an unknown
      ``:ARG`` (status 2), an invalid override (status 1).
  """
  if not _CONFIG.value:
    _fail("--config FILE.py is required, e.g. --config configs/default.py (--help lists the "
          "flags)", USAGE)
  try:
    config = config_lib.load_config(_CONFIG.value)
  except ConfigError as e:
    _fail(e, USAGE)
  try:
    return config_lib.apply_overrides(config, _OVERRIDES)
  except ConfigError as e:
    _fail(e)


def main(argv):
  """Loads, overrides and validates the config, then trains (or resumes) into ``--workdir``.

  Args:
    argv: the positional arguments absl left (only the program name is expected).

  Raises:
    SystemExit: after one ``cft_jax: error:`` line (status 2: the command line; 1: the config,
      the data or a mismatching workdir), or 130 after an interrupt.
  """
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]} (options are --name=value; --help lists them)",
          USAGE)
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  config = _load_config()
  try:
    # pure: starts no JAX backend; a key given on the command line counts as set (its component
    # must read it) even at its default value
    resolved = config_lib.validate_config(config, explicit=[o.partition("=")[0]
                                                            for o in _OVERRIDES])
    if _DESCRIBE.value:
      print(config_lib.describe(config))
      return
  except ConfigError as e:
    _fail(e)
  if not _WORKDIR.value:
    _fail("--workdir DIR is required (the output folder)", USAGE)
  try:  # multi-host: before any other JAX call (config.distributed, or SLURM / TPU-pod env)
    parallel.init_distributed(resolved.distributed)
  except ValueError as e:
    _fail(e)
  try:
    train.run(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
  except (ConfigError, ConfigMismatchError, DatasetNotFoundError) as e:
    _fail(e)
  except KeyboardInterrupt as e:  # SIGINT/SIGTERM: the trainer saved a checkpoint first
    print(f"cft_jax: {e or 'interrupted'}", flush=True)
    raise SystemExit(130) from None


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
