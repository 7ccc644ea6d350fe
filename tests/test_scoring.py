"""Influence scores against exact dense influence (float64)."""

import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import projection, solvers
from tests import toy_problems


@pytest.fixture(scope="module")
def logreg():
  params, loss, per_example, batches = toy_problems.logistic_regression(num_examples=80, num_features=7)
  params = toy_problems.newton_minimize(loss, params, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
  test = [{"x": batches[0]["x"][:9] + 0.3, "y": 1 - batches[0]["y"][:9]}]
  return params, loss, per_example, batches, test


def test_full_rank_scores_equal_exact_influence(logreg):
  params, loss, per_example, batches, test = logreg
  p = 8
  es = ij.fit_eigenspace(loss, params, batches, n_iters=p, top_k=p)
  assert es.k == p
  exact = solvers.exact_influence(loss, per_example, params, test, batches)
  scores = ij.influence(es, per_example, params, test, batches)
  np.testing.assert_allclose(scores, exact, rtol=1e-6, atol=1e-9)
  # Projection-level API gives the same, and self-influence is the diagonal.
  train_proj = ij.project(es, per_example, params, batches)
  test_proj = ij.project(es, per_example, params, test)
  np.testing.assert_allclose(ij.influence_scores(es, test_proj, train_proj), exact, rtol=1e-6, atol=1e-9)
  full = solvers.exact_influence(loss, per_example, params, batches, batches)
  np.testing.assert_allclose(ij.self_influence(es, train_proj), np.diag(full), rtol=1e-6)
  assert np.all(np.asarray(ij.self_influence(es, train_proj)) > 0)


def test_damping_changes_inverse_without_refit(logreg):
  params, loss, per_example, batches, test = logreg
  es = ij.fit_eigenspace(loss, params, batches, n_iters=8, top_k=8, damping=0.2)
  exact = solvers.exact_influence(loss, per_example, params, test, batches, damping=0.2)
  np.testing.assert_allclose(ij.influence(es, per_example, params, test, batches), exact, rtol=1e-6)
  exact_05 = solvers.exact_influence(loss, per_example, params, test, batches, damping=0.5)
  np.testing.assert_allclose(ij.influence(es, per_example, params, test, batches, damping=0.5), exact_05, rtol=1e-6)


def test_tail_formula_matches_definition(logreg):
  params, loss, per_example, batches, test = logreg
  es = ij.fit_eigenspace(loss, params, batches, n_iters=8, top_k=3, damping=0.01)
  g_test = solvers.gradient_matrix(per_example, params, test)
  g_train = solvers.gradient_matrix(per_example, params, batches)
  u, lam = np.asarray(es.eigenvectors), np.asarray(es.eigenvalues)
  c = lam[-1] + 0.01
  inv = u.T @ np.diag(1 / (lam + 0.01)) @ u + (np.eye(8) - u.T @ u) / c
  expected = g_test @ inv @ g_train.T
  got = ij.influence(es, per_example, params, test, batches, tail=True)
  np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)
  assert ij.default_tail_constant(es) == pytest.approx(c)
  # Self-influence with the tail from squared gradient norms.
  proj = projection.project_on(es.eigenvectors, per_example, params, batches, with_sq_norms=True)
  np.testing.assert_allclose(
      ij.self_influence(es, proj.values, sq_norms=proj.sq_norms),
      np.einsum("np,pq,nq->n", g_train, inv, g_train), rtol=1e-8)


@pytest.mark.parametrize("microbatch_size", [1, 4, None])
def test_jvp_and_vjp_projections_agree(microbatch_size):
  params, loss, per_example, batches = toy_problems.small_mlp_problem()
  es = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=6, selection="magnitude")
  g = solvers.gradient_matrix(per_example, params, batches)
  expected = g @ es.eigenvectors.T
  for method in ("vjp", "jvp"):
    got = ij.project(es, per_example, params, batches, method=method, microbatch_size=microbatch_size)
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_uneven_batches_are_padded_and_sliced():
  params, loss, per_example, batches = toy_problems.small_mlp_problem()
  es = ij.fit_eigenspace(loss, params, batches, n_iters=10, top_k=4)
  whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  pieces = [{k: v[s] for k, v in whole.items()} for s in (slice(0, 16), slice(16, 29), slice(29, 40))]
  np.testing.assert_allclose(
      ij.project(es, per_example, params, pieces, microbatch_size=5),
      ij.project(es, per_example, params, [whole]), atol=1e-12)


def test_top_k_proponents_and_opponents():
  scores = jnp.asarray([[0.5, -2.0, 3.0, 0.0], [-1.0, -0.5, 0.25, 4.0]])
  top = ij.extremes(scores, 2)
  np.testing.assert_array_equal(top.proponents, [[2, 0], [3, 2]])
  np.testing.assert_array_equal(top.opponents, [[1, 3], [0, 1]])
  np.testing.assert_allclose(top.opponent_scores, [[-2.0, 0.0], [-1.0, -0.5]])


def test_sign_convention_removal_raises_loss(logreg):
  """Removing a proponent raises the test loss: score > 0 ⇔ loss goes up after removal (retrained)."""
  params, loss, per_example, batches, test = logreg
  whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  es = ij.fit_eigenspace(loss, params, batches, n_iters=8, top_k=8)
  scores = np.asarray(ij.influence(es, per_example, params, test, batches))[0]
  for z in (int(np.argmax(scores)), int(np.argmin(scores))):
    keep = np.arange(len(whole["y"])) != z
    retrained = toy_problems.newton_minimize(loss, params, {k: v[keep] for k, v in whole.items()})
    change = float(per_example(retrained, test[0])[0] - per_example(params, test[0])[0])
    assert np.sign(change) == np.sign(scores[z])
