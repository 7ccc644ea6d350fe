"""Agreement metrics between attribution scores and retraining (numpy, float64).

Scores follow docs/design.md, "What a score means": scores[x, z] > 0 means training example z is a
proponent of test example x (removing z raises x's loss).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats


def _check_2d(a, name):
  a = np.asarray(a, np.float64)
  if a.ndim != 2:
    raise ValueError(f"{name} must be 2-D; got shape {a.shape}.")
  return a


def pearson_columns(a, b) -> np.ndarray:
  """Returns the Pearson correlation of each column of a with the same column of b (NaN where one is constant)."""
  a, b = _check_2d(a, "a"), _check_2d(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"Shapes differ: {a.shape} and {b.shape}.")
  a = a - a.mean(0)
  b = b - b.mean(0)
  den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), np.nan)


def spearman_columns(a, b) -> np.ndarray:
  """Returns the Spearman rank correlation of each column pair (ties get average ranks)."""
  a, b = _check_2d(a, "a"), _check_2d(b, "b")
  return pearson_columns(stats.rankdata(a, axis=0), stats.rankdata(b, axis=0))


def lds_per_example(scores, masks, targets) -> np.ndarray:
  """Returns (T,) linear datamodeling scores, as dattri computes them.

  scores: (T, N) attributions; masks: (M, N) training subsets; targets: (M, T)
  the loss of test example x under the model trained on subset m. For each
  x: the Spearman correlation over m of Σ_{z∈S_m} scores[x, z] with −targets[m, x]
  (dattri negates the target so that a proponent, which lowers the loss,
  counts positively; with our sign a good method gets LDS > 0).
  """
  scores, targets = _check_2d(scores, "scores"), _check_2d(targets, "targets")
  masks = np.asarray(masks)
  if masks.ndim != 2 or masks.shape[1] != scores.shape[1]:
    raise ValueError(f"masks must be (num_subsets, {scores.shape[1]}); got {masks.shape}.")
  if targets.shape != (masks.shape[0], scores.shape[0]):
    raise ValueError(f"targets must be (num_subsets, num_test) = {(masks.shape[0], scores.shape[0])}; got {targets.shape}.")
  summed = masks.astype(np.float64) @ scores.T  # (M, T)
  return spearman_columns(summed, -targets)


def lds(scores, masks, targets) -> float:
  """Returns the mean over test examples of `lds_per_example` (NaN rows, from constant inputs, skipped)."""
  return float(np.nanmean(lds_per_example(scores, masks, targets)))


class LOOCorrelation(NamedTuple):
  """Mean over test examples of the correlation, across removed points, of score[x, z] with Δloss(x)."""

  pearson: float
  spearman: float


def loo_correlation(scores, indices, deltas) -> LOOCorrelation:
  """Returns correlations of scores[:, indices] with leave-one-out changes deltas (R, T).

  deltas[j, x] = loss(x; θ without z_j) − loss(x; θ); a proponent (score > 0)
  raises the loss when removed, so a good method correlates positively.
  """
  scores, deltas = _check_2d(scores, "scores"), _check_2d(deltas, "deltas")
  indices = np.asarray(indices)
  if deltas.shape != (len(indices), scores.shape[0]):
    raise ValueError(f"deltas must be (num_removed, num_test) = {(len(indices), scores.shape[0])}; got {deltas.shape}.")
  predicted = scores[:, indices].T  # (R, T)
  return LOOCorrelation(float(np.nanmean(pearson_columns(predicted, deltas))),
                        float(np.nanmean(spearman_columns(predicted, deltas))))


def row_pearson(a, b) -> float:
  """Returns the mean over test examples (rows) of the Pearson correlation of two (T, N) score matrices."""
  a, b = _check_2d(a, "a"), _check_2d(b, "b")
  return float(np.nanmean(pearson_columns(a.T, b.T)))
