"""Tests of cft_jax.methods."""
