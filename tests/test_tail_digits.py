"""On a digits MLP the spectral-tail remainder brings top-100 Arnoldi closer to exact influence.

Damping δ = 0.01 was fixed before looking at any result (a typical 1% of the
top eigenvalue ≈ 1.35 here); the exact reference is dense (H + δI)⁻¹.
"""

import numpy as np

import influence_jax as ij
from influence_jax import solvers
from tests import toy_problems

DAMPING = 0.01


def mean_row_pearson(a, b):
  return float(np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(a.shape[0])]))


def test_tail_is_closer_to_exact_than_plain_top_k():
  (xtr, ytr), (xte, yte) = toy_problems.digits(num_train=600)
  loss, per_example = toy_problems.mlp_classifier(l2=1e-3)
  train = {"x": xtr, "y": ytr}
  params = toy_problems.train_full_batch(loss, toy_problems.mlp_init([64, 12, 10]), train, steps=300, lr=0.01)
  test = [{"x": xte[:20], "y": yte[:20]}]

  exact = np.asarray(solvers.exact_influence(loss, per_example, params, test, [train], damping=DAMPING))
  es = ij.fit_eigenspace(loss, params, [train], n_iters=150, top_k=100, damping=DAMPING)
  assert es.k == 100
  plain = np.asarray(ij.influence(es, per_example, params, test, [train]))
  tail = np.asarray(ij.influence(es, per_example, params, test, [train], tail=True))

  plain_r, tail_r = mean_row_pearson(plain, exact), mean_row_pearson(tail, exact)
  assert tail_r > plain_r
  assert tail_r > 0.99  # Measured 0.998 (plain top-100: 0.934).
