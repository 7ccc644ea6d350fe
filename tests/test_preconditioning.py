"""Eigenspace-preconditioned query-side CG against dense solves (float64)."""

import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import curvature, preconditioning, solvers
from tests import toy_problems


@pytest.fixture(scope="module")
def mlp():
  params, loss, per_example, batches = toy_problems.small_mlp_problem()
  hess = np.asarray(solvers.dense_hessian(loss, params, batches))
  damping = max(0.0, -np.linalg.eigvalsh(hess)[0]) + 0.05  # H + δI positive definite.
  test = [{"x": batches[0]["x"][:6] * 1.5, "y": batches[0]["y"][:6][::-1].copy()}]
  return params, loss, per_example, batches, test, hess, damping


def _grads(per_example, params, test):
  return np.asarray(solvers.gradient_matrix(per_example, params, test))


def test_preconditioned_solve_equals_dense_solve(mlp):
  params, loss, per_example, batches, test, hess, damping = mlp
  p = hess.shape[0]
  es = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=8, damping=damping)
  op = curvature.curvature_operator(loss, params, batches)
  g = _grads(per_example, params, test)
  expected = np.linalg.solve(hess + damping * np.eye(p), g.T).T
  res = preconditioning.preconditioned_solve(op, es, jnp.asarray(g), cg_iters=p, tol=1e-12)
  np.testing.assert_allclose(res.x, expected, rtol=1e-7, atol=1e-9)
  assert np.all(np.asarray(res.positive_curvature))
  assert np.all(np.asarray(res.num_iters) < p)  # Converged before the cap.
  # A few iterations already improve on the tail approximation (cg_iters = 0).
  err = lambda x: np.linalg.norm(np.asarray(x) - expected, axis=1)
  tail = preconditioning.preconditioned_solve(op, es, jnp.asarray(g), cg_iters=0).x
  three = preconditioning.preconditioned_solve(op, es, jnp.asarray(g), cg_iters=3).x
  assert np.all(err(three) < 0.5 * err(tail))


def test_zero_iterations_is_the_tail_and_full_rank_is_exact(mlp):
  params, loss, per_example, batches, test, hess, damping = mlp
  p = hess.shape[0]
  kw = dict(loss_fn=loss, curvature_batches=batches)
  es = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=8, damping=damping)
  tail = ij.influence(es, per_example, params, test, batches, tail=True)
  got = preconditioning.influence_preconditioned(es, per_example, params, test, batches, cg_iters=0, **kw)
  np.testing.assert_allclose(got, tail, rtol=1e-8, atol=1e-10)
  exact = solvers.exact_influence(loss, per_example, params, test, batches, damping=damping)
  solved = preconditioning.influence_preconditioned(es, per_example, params, test, batches, cg_iters=p, tol=1e-12, **kw)
  np.testing.assert_allclose(solved, exact, rtol=1e-6, atol=1e-9)


def test_full_rank_eigenspace_is_exact_without_iterations():
  # k = p: the preconditioner is (H + δI)⁻¹ itself (convex problem, H positive definite).
  params, loss, per_example, batches = toy_problems.logistic_regression(num_examples=80, num_features=7)
  test = [{"x": batches[0]["x"][:5] + 0.3, "y": 1 - batches[0]["y"][:5]}]
  full = ij.fit_eigenspace(loss, params, batches, n_iters=8, top_k=8, damping=0.01)
  assert full.k == 8
  exact = solvers.exact_influence(loss, per_example, params, test, batches, damping=0.01)
  scores, res = preconditioning.influence_preconditioned(
      full, per_example, params, test, batches, loss_fn=loss, curvature_batches=batches,
      cg_iters=0, return_solve=True)
  np.testing.assert_allclose(scores, exact, rtol=1e-6, atol=1e-9)
  np.testing.assert_array_less(np.asarray(res.residual_norm), 1e-8)


def test_tail_inverse_matches_its_definition(mlp):
  params, loss, _, batches, _, hess, damping = mlp
  es = ij.fit_eigenspace(loss, params, batches, n_iters=12, top_k=5, damping=damping)
  u, lam = np.asarray(es.eigenvectors), np.asarray(es.eigenvalues)
  c = lam[-1] + damping
  dense = u.T @ np.diag(1 / (lam + damping)) @ u + (np.eye(hess.shape[0]) - u.T @ u) / c
  rows = np.random.default_rng(0).normal(size=(3, hess.shape[0]))
  got = preconditioning.apply_tail_inverse(es.eigenvectors, 1 / (es.eigenvalues + damping), c, jnp.asarray(rows))
  np.testing.assert_allclose(got, rows @ dense, rtol=1e-10)


def test_bad_input_is_rejected(mlp):
  params, loss, _, batches, _, hess, damping = mlp
  es = ij.fit_eigenspace(loss, params, batches, n_iters=12, top_k=5, damping=damping)
  op = curvature.curvature_operator(loss, params, batches)
  good = jnp.ones((2, hess.shape[0]))
  with pytest.raises(ValueError, match="b must be"):
    preconditioning.preconditioned_solve(op, es, good[:, :-1], cg_iters=2)
  with pytest.raises(ValueError, match="cg_iters"):
    preconditioning.preconditioned_solve(op, es, good, cg_iters=-1)
  with pytest.raises(ValueError, match="tail constant"):
    preconditioning.preconditioned_solve(op, es, good, cg_iters=1, tail_constant=0.0)
  with pytest.raises(ValueError, match="non-finite|NaN|finite"):
    preconditioning.preconditioned_solve(op, es, good.at[0, 0].set(jnp.nan), cg_iters=1)


def test_solved_queries_scored_against_stored_rows_equal_direct_scores(mlp):
  params, loss, per_example, batches, test, hess, damping = mlp
  p = hess.shape[0]
  es = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=8, damping=damping)
  kw = dict(loss_fn=loss, curvature_batches=batches, cg_iters=3)
  direct, solve = preconditioning.influence_preconditioned(es, per_example, params, test, batches, return_solve=True,
                                                           **kw)
  exact_sketch = ij.sketch.make_sketch(p, p + 100, seed=0, dtype=jnp.float64)  # m ≥ p₁p₂: R orthogonal.
  rows = [ij.sketch.project_and_sketch(es.eigenvectors, exact_sketch, per_example, params, b) for b in batches]
  stored = ij.scoring.row_side(jnp.concatenate([r.projections for r in rows]),
                               jnp.concatenate([r.sketch for r in rows]))
  queries = preconditioning.solved_query_side(es, exact_sketch, solve.x)
  np.testing.assert_allclose(queries @ stored.T, direct, rtol=1e-8, atol=1e-10)
  # A sketch smaller than p approximates the same scores (JL: error shrinks with m).
  small = ij.sketch.make_sketch(p, p // 2, seed=0, dtype=jnp.float64)
  rows = [ij.sketch.project_and_sketch(es.eigenvectors, small, per_example, params, b) for b in batches]
  approx = preconditioning.solved_query_side(es, small, solve.x) @ ij.scoring.row_side(
      jnp.concatenate([r.projections for r in rows]), jnp.concatenate([r.sketch for r in rows])).T
  assert np.corrcoef(np.ravel(approx), np.ravel(direct))[0, 1] > 0.9


def test_influence_with_the_curvature_solves_by_default_and_keeps_the_plain_tail_by_argument(mlp):
  params, loss, per_example, batches, test, hess, damping = mlp
  es = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=8, damping=damping)
  kw = dict(loss_fn=loss, curvature_batches=batches)
  solved = ij.influence(es, per_example, params, test, batches, tail=True, **kw)
  np.testing.assert_allclose(
      solved, preconditioning.influence_preconditioned(es, per_example, params, test, batches, cg_iters=3, **kw),
      rtol=1e-10, atol=1e-12)
  plain = ij.influence(es, per_example, params, test, batches, tail=True)
  np.testing.assert_allclose(ij.influence(es, per_example, params, test, batches, tail=True, cg_iters=0, **kw), plain,
                             rtol=1e-10, atol=1e-12)
  exact = solvers.exact_influence(loss, per_example, params, test, batches, damping=damping)
  err = lambda s: np.linalg.norm(np.asarray(s) - exact)
  assert err(solved) < 0.5 * err(plain)  # Three iterations beyond the tail, closer to (H + δI)⁻¹.
  with pytest.raises(ValueError, match="both loss_fn and curvature_batches"):
    ij.influence(es, per_example, params, test, batches, tail=True, loss_fn=loss)
