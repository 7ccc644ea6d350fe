"""The Flax training-loop example runs, and its Linen and NNX loops and exact and Arnoldi scores agree."""

import jax.numpy as jnp
import numpy as np

from influence_jax.examples import flax_training_loop as ex


def test_example_training_loop_runs_and_linen_nnx_agree():
  p = 64 * 1 + 1 + 1 * 10 + 10  # hidden=1: with n_iters = p, Arnoldi resolves the whole spectrum.
  kw = dict(epochs=1, num_train=12, num_probe=2, hidden=1, steps_per_epoch=3, arnoldi_iters=p, dtype=jnp.float64)
  h_linen, h_nnx = ex.linen_run(**kw), ex.nnx_run(**kw)
  assert len(h_linen) == len(h_nnx) == 1
  for a, b in zip(h_linen, h_nnx):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-10)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-10)
    np.testing.assert_allclose(a["self_influence"], b["self_influence"], rtol=1e-8)
    np.testing.assert_allclose(a["arnoldi_self_influence"], a["self_influence"], rtol=1e-6)
