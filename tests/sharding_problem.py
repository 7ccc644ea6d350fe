"""The small problem shared by tests/test_sharding.py and tests/multiprocess_worker.py (float64)."""

import numpy as np

from tests import toy_problems

GLOBAL_BATCH = 16  # global batch of the multi-process projections (8 examples per process)


def problem():
  """Returns (params, loss_fn, per_example_loss_fn, train batches, test batches, fit kwargs).

  A 6-12-4 tanh MLP: p = 136 = 8 × 17 parameters, so a 'model' axis of 8
  holds 17 columns per device; 58 training examples in batches of 32 and 26
  (not a multiple of the global batch: the last one is padded and masked).
  """
  rng = np.random.default_rng(7)
  x = rng.normal(size=(58, 6))
  y = rng.integers(0, 4, size=58).astype(np.int32)
  loss, per_example = toy_problems.mlp_classifier(l2=1e-2)
  params = toy_problems.mlp_init([6, 12, 4], seed=7)
  batches = [{"x": x[:32], "y": y[:32]}, {"x": x[32:], "y": y[32:]}]
  test = [{"x": rng.normal(size=(5, 6)), "y": rng.integers(0, 4, size=5).astype(np.int32)}]
  return params, loss, per_example, batches, test, dict(n_iters=40, top_k=8)
