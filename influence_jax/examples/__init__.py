"""Runnable examples (python -m influence_jax.examples.<name>)."""
