"""Tests of cft_jax.peft."""
