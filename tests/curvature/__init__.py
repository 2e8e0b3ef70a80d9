"""Tests of cft_jax.curvature."""
