"""The small problems shared by tests/test_sharding.py and tests/multiprocess_worker.py (float64)."""

import numpy as np

from tests import toy_problems

GLOBAL_BATCH = 16  # global batch of the multi-process projections (8 examples per process)


def _mlp_problem(sizes, num_train, first_batch, num_test, seed, fit_kw):
  """Returns (params, loss_fn, per_example_loss_fn, train batches, test batches, fit kwargs) of a tanh MLP."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_train, sizes[0]))
  y = rng.integers(0, sizes[-1], size=num_train).astype(np.int32)
  loss, per_example = toy_problems.mlp_classifier(l2=1e-2)
  params = toy_problems.mlp_init(sizes, seed=seed)
  batches = [{"x": x[:first_batch], "y": y[:first_batch]}, {"x": x[first_batch:], "y": y[first_batch:]}]
  test = [{"x": rng.normal(size=(num_test, sizes[0])),
           "y": rng.integers(0, sizes[-1], size=num_test).astype(np.int32)}]
  return params, loss, per_example, batches, test, fit_kw


def problem():
  """A 6-12-4 tanh MLP: p = 136 = 8 × 17 parameters, so a 'model' axis of 8 holds 17 columns per device;
  58 training examples in batches of 32 and 26 (not a multiple of the global batch: the last one is
  padded and masked); 5 test examples."""
  return _mlp_problem([6, 12, 4], 58, 32, 5, 7, dict(n_iters=40, top_k=8))


def uneven_problem():
  """A 6-11-4 tanh MLP: p = 125 parameters, not a multiple of 2, 4 or 8 (the flat layout pads it to 128
  columns on a 'model' axis of 4 or 8); 40 training examples in batches of 24 and 16; 3 test examples."""
  return _mlp_problem([6, 11, 4], 40, 24, 3, 11, dict(n_iters=30, top_k=6))
