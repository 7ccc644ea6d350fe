"""The compilation count every job reports: one per new executable, none for a cached call."""

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax.jobs import compilations


def test_counts_each_new_executable_once():
  f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
  with compilations.counting() as count:
    f(np.ones(7, np.float32)).block_until_ready()
    f(np.ones(7, np.float32)).block_until_ready()  # Same shapes: no new executable.
    assert count.compiled == 1
    f(np.ones(9, np.float32)).block_until_ready()  # New shape: one more.
  f(np.ones(11, np.float32)).block_until_ready()  # Outside the block: not counted.
  assert count.compiled == 2 and count.seconds > 0
  assert count.describe().startswith("2 XLA compilations")
