"""Metrics of the evaluation harness against scipy and hand-built cases with known answers."""

import numpy as np
import pytest
from scipy import stats

from influence_jax.eval import metrics


def test_spearman_columns_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 4, size=(30, 3)).astype(float)  # Many ties.
  b = rng.normal(size=(30, 3))
  got = metrics.spearman_columns(a, b)
  want = [stats.spearmanr(a[:, j], b[:, j]).correlation for j in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_pearson_columns_matches_corrcoef_and_is_nan_for_constant():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(20, 2)), rng.normal(size=(20, 2))
  b[:, 1] = 3.0
  got = metrics.pearson_columns(a, b)
  np.testing.assert_allclose(got[0], np.corrcoef(a[:, 0], b[:, 0])[0, 1], rtol=1e-12)
  assert np.isnan(got[1])


def test_lds_is_one_when_the_loss_is_a_decreasing_function_of_summed_scores():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(4, 30))
  masks = rng.random((25, 30)) < 0.5
  summed = masks @ scores.T  # (M, T)
  # A proponent lowers the loss: a monotone decreasing map of the summed scores.
  np.testing.assert_allclose(metrics.lds_per_example(scores, masks, -np.tanh(summed) + 3), 1.0)
  assert metrics.lds(scores, masks, summed) == pytest.approx(-1.0)


def test_lds_of_unrelated_scores_is_near_zero():
  rng = np.random.default_rng(3)
  masks = rng.random((400, 50)) < 0.5
  value = metrics.lds(rng.normal(size=(20, 50)), masks, rng.normal(size=(400, 20)))
  assert abs(value) < 0.05


def test_loo_correlation_is_positive_for_proponents_raising_the_loss():
  rng = np.random.default_rng(4)
  scores = rng.normal(size=(3, 40))
  idx = np.array([0, 5, 7, 11, 30])
  deltas = scores[:, idx].T / 40 + 1e-3 * rng.normal(size=(5, 3))
  out = metrics.loo_correlation(scores, idx, deltas)
  assert out.pearson > 0.99 and out.spearman > 0.8
  assert metrics.loo_correlation(-scores, idx, deltas).pearson < -0.99


def test_metrics_reject_misshaped_inputs():
  with pytest.raises(ValueError, match="targets must be"):
    metrics.lds(np.zeros((3, 5)), np.ones((4, 5), bool), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="masks must be"):
    metrics.lds(np.zeros((3, 5)), np.ones((4, 6), bool), np.zeros((4, 3)))
  with pytest.raises(ValueError, match="deltas must be"):
    metrics.loo_correlation(np.zeros((3, 5)), [0, 1], np.zeros((3, 2)))
