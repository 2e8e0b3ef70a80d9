"""The package's error types: the leaf of the import graph (it imports nothing of ``cft_jax``).

Every layer may raise them, and the CLI (:mod:`cft_jax.main`) prints each as one line, so they
live below everything else: a model loader raising :class:`DatasetNotFoundError` for a missing
weight file or a scenario raising :class:`ConfigError` needs no import of a higher layer.
Re-exported where they were first defined: :class:`ConfigError` from :mod:`cft_jax.config`,
the data errors from :mod:`cft_jax.data` and :mod:`cft_jax.data.sources`.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config key or value is invalid; the message names the key and how to fix it."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are missing; the message says how to install them."""


class MissingDependencyError(DatasetNotFoundError):
  """A Python package that a data source needs (e.g. one tfds imports lazily while preparing a
  dataset) is not installed; the message names it and the ``pip install`` command."""


class BadDataError(DatasetNotFoundError, ValueError):
  """The data are present but unusable (corrupt file, missing class, label out of range, empty
  split); the message names the file, class or split. The CLI prints it as one line."""
