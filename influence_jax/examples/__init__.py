"""Example data sets, models and training loops (python -m influence_jax.examples.<name>)."""
