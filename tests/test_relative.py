"""Relative influence: scale invariance, the Cauchy–Schwarz bound, and the floor (float64, tiny)."""

import numpy as np
import pytest

from influence_jax.methods import last_layer as ll
from influence_jax.methods import relative

D, C, N, T = 3, 3, 12, 4


def _scores(seed=0, scale=None):
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=(N, D)), rng.integers(0, C, size=N).astype(np.int32)
  tx, ty = rng.normal(size=(T, D)), rng.integers(0, C, size=T).astype(np.int32)
  k, b = 0.5 * rng.normal(size=(D, C)), 0.3 * rng.normal(size=(C,))
  curv = ll.fit_last_layer(x, y, k, b, l2=0.05)
  g_train = np.asarray(ll.last_layer_gradients(x, y, k, b))
  if scale is not None:
    g_train = g_train * scale[:, None]
  g_test = ll.last_layer_gradients(tx, ty, k, b)
  return (ll.last_layer_influence(curv, g_test, g_train), ll.last_layer_self_influence(curv, g_train),
          ll.last_layer_self_influence(curv, g_test))


def test_unchanged_when_a_training_gradient_is_scaled():
  scores, self_inf, _ = _scores()
  scale = np.ones(N)
  scale[[2, 7]] = [25.0, 0.2]
  scaled, scaled_self, _ = _scores(scale=scale)
  np.testing.assert_allclose(scaled[:, 2], 25.0 * scores[:, 2], rtol=1e-10)  # raw scores do change
  rel = relative.relative_influence(scores, self_inf, floor=0.0)
  np.testing.assert_allclose(relative.relative_influence(scaled, scaled_self, floor=0.0), rel, rtol=1e-10)


def test_bounded_by_square_root_of_test_self_influence():
  scores, self_inf, test_self = _scores(seed=1)
  rel = np.asarray(relative.relative_influence(scores, self_inf))
  bound = np.sqrt(np.asarray(test_self))[:, None]
  assert np.all(np.abs(rel) <= bound * (1 + 1e-12))
  assert np.max(np.abs(rel) / bound) > 0.3  # the bound is not vacuous here
  # Raw scores are not bounded that way once a gradient is large.
  scale = np.ones(N)
  scale[0] = 1e3
  big, _, _ = _scores(seed=1, scale=scale)
  assert np.any(np.abs(np.asarray(big)) > bound)


def test_floor_prevents_blow_up_for_near_zero_self_influence():
  scores, self_inf, _ = _scores(seed=2)
  self_inf = np.asarray(self_inf).copy()
  scores = np.asarray(scores).copy()
  self_inf[3], scores[:, 3] = 1e-30, 1e-16
  self_inf[5] = -1e-18  # rounding-level negative value
  floor = 0.01 * np.median(np.maximum(self_inf, 0))
  np.testing.assert_allclose(relative.relative_floor(self_inf), floor, rtol=1e-12)
  rel = np.asarray(relative.relative_influence(scores, self_inf))
  assert np.all(np.isfinite(rel))
  np.testing.assert_allclose(rel, scores / np.sqrt(np.maximum(self_inf, floor)), rtol=1e-12)
  np.testing.assert_allclose(rel[:, 3], 1e-16 / np.sqrt(floor), rtol=1e-12)
  # Columns above the floor are plain score / √self.
  np.testing.assert_allclose(rel[:, 0], scores[:, 0] / np.sqrt(self_inf[0]), rtol=1e-12)
  # An absolute floor overrides the fraction; all-zero input gives zeros, not NaN.
  np.testing.assert_allclose(relative.relative_influence(scores, self_inf, floor=4.0)[:, 3], 1e-16 / 2.0)
  assert np.all(np.asarray(relative.relative_influence(np.zeros((2, 3)), np.zeros(3))) == 0)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="self_influence must have shape"):
    relative.relative_influence(np.zeros((2, 3)), np.ones(4))
  with pytest.raises(ValueError, match=r"scores must be a \(T, N\)"):
    relative.relative_influence(np.zeros(3), np.ones(3))
  with pytest.raises(ValueError, match="self_influence has non-finite"):
    relative.relative_influence(np.zeros((2, 3)), np.array([1.0, np.nan, 1.0]))
  with pytest.raises(ValueError, match="floor must be ≥ 0"):
    relative.relative_influence(np.zeros((2, 3)), np.ones(3), floor=-1.0)
