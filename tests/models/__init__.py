"""Tests of cft_jax.models."""
