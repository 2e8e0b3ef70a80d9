"""cft_jax: continual fine-tuning of pretrained vision models in JAX/Flax.

``cft_jax.load_run(workdir)`` loads a finished run for prediction (:mod:`cft_jax.predict`); the
trainer is :func:`cft_jax.train.run` (CLI: ``python -m cft_jax.main``).

The package root stands outside the layers (``.importlinter``): it re-exports the top layer's
``load_run`` lazily (PEP 562 ``__getattr__``), so ``import cft_jax.errors`` or
``cft_jax.schema`` stays light — the one function-level import of a package module, allowed by
``tests/test_architecture.py``.
"""


def __getattr__(name: str):
  """``cft_jax.load_run`` -> :func:`cft_jax.predict.load_run`, imported on first use.

  Raises:
    AttributeError: any other name.
  """
  if name == "load_run":
    from cft_jax.predict import load_run  # pylint: disable=g-import-not-at-top
    return load_run
  raise AttributeError(f"module 'cft_jax' has no attribute {name!r}")
