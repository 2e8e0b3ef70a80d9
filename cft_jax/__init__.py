"""cft_jax: continual fine-tuning of pretrained vision models in JAX/Flax.

``cft_jax.load_run(workdir)`` loads a finished run for prediction (:mod:`cft_jax.predict`); the
trainer is :func:`cft_jax.train.run` (CLI: ``python -m cft_jax.main``).
"""


def load_run(workdir: str):
  """A finished run's :class:`cft_jax.predict.Predictor` (see :func:`cft_jax.predict.load_run`;
  imported on first use, so ``import cft_jax`` stays light)."""
  from cft_jax.predict import load_run as _load_run  # pylint: disable=g-import-not-at-top
  return _load_run(workdir)
