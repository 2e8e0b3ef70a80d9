"""Tests of cft_jax.data."""
