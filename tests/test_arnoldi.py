"""Arnoldi iteration and eigenspace fitting against numpy.linalg.eigh of dense jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import arnoldi, curvature, solvers
from tests import toy_problems


@pytest.fixture(scope="module")
def mlp():
  """A 6-12-4 tanh MLP (136 params) on 120 random examples, trained a little; H indefinite."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(120, 6))
  y = rng.integers(0, 4, size=120).astype(np.int32)
  loss, per_example = toy_problems.mlp_classifier(l2=1e-3)
  params = toy_problems.mlp_init([6, 12, 4], seed=3)
  batches = [{"x": x[:60], "y": y[:60]}, {"x": x[60:], "y": y[60:]}]
  params = toy_problems.train_full_batch(loss, params, {"x": x, "y": y}, steps=100)
  hess = np.asarray(solvers.dense_hessian(loss, params, batches))
  return params, loss, per_example, batches, hess


def test_top10_eigenvalues_match_eigh(mlp):
  params, loss, _, batches, hess = mlp
  es = ij.fit_eigenspace(loss, params, batches, n_iters=90, top_k=10)
  exact = np.sort(np.linalg.eigvalsh(hess))[::-1][:10]
  np.testing.assert_allclose(es.eigenvalues, exact, rtol=1e-6)
  assert np.all(np.diff(np.asarray(es.eigenvalues)) <= 0)
  # Eigenvectors: H u = λ u, residuals reported, orthonormal rows.
  u = np.asarray(es.eigenvectors)
  np.testing.assert_allclose(u @ u.T, np.eye(10), atol=1e-8)
  true_res = np.linalg.norm(u @ hess - np.asarray(es.eigenvalues)[:, None] * u, axis=1)
  np.testing.assert_allclose(es.residuals, true_res, atol=1e-10)
  assert np.all(true_res < 1e-5 * exact[0])
  # The free Ritz estimate agrees with the measured residual for converged pairs.
  np.testing.assert_allclose(es.ritz_estimates, es.residuals, atol=1e-8)


def test_magnitude_selection_keeps_negative_eigenvalues(mlp):
  params, loss, _, batches, hess = mlp
  exact = np.linalg.eigvalsh(hess)
  assert exact.min() < -1e-6  # The test needs an indefinite Hessian.
  p = hess.shape[0]
  es = ij.fit_eigenspace(loss, params, batches, n_iters=p, top_k=12, selection="magnitude")
  want = exact[np.argsort(-np.abs(exact))][:12]
  np.testing.assert_allclose(np.asarray(es.eigenvalues), np.sort(want)[::-1], rtol=1e-6, atol=1e-10)


def test_krylov_basis_is_orthonormal(mlp):
  params, loss, _, batches, _ = mlp
  op = curvature.curvature_operator(loss, params, batches)
  state = arnoldi.init(jax.random.normal(jax.random.key(0), (op.dim,), jnp.float64), 60, block_size=8)
  state = arnoldi.run(op, state, block_size=8)
  assert state.basis.shape[0] == 64
  q = np.asarray(state.basis[:61])
  np.testing.assert_array_equal(state.basis[61:], 0)
  assert int(state.num_steps) == 60 and not bool(state.breakdown)
  np.testing.assert_allclose(q @ q.T, np.eye(61), atol=1e-10)
  # Arnoldi relation A Q_n = Q_{n+1} H̄_n.
  dense = np.asarray(toy_problems.dense_matrix(op))
  np.testing.assert_allclose(dense @ q[:60].T, q.T @ np.asarray(state.hessenberg[:61]), atol=1e-10)


def test_resuming_in_chunks_matches_one_run(mlp):
  params, loss, _, batches, _ = mlp
  op = curvature.curvature_operator(loss, params, batches)
  start = jax.random.normal(jax.random.key(0), (op.dim,), jnp.float64)
  whole = arnoldi.run(op, arnoldi.init(start, 20))
  part = arnoldi.init(start, 20)
  for _ in range(4):
    part = arnoldi.run(op, part, num_steps=5)
  np.testing.assert_array_equal(whole.basis, part.basis)
  np.testing.assert_array_equal(whole.hessenberg, part.hessenberg)


def test_rank_deficient_operator_stops_early():
  # Least squares on r = 5 examples with 12 features: H = XᵀX/r has rank 5.
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(5, 12)), rng.normal(size=5)
  loss = lambda p, b: 0.5 * jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
  params = {"w": jnp.zeros(12)}
  es = ij.fit_eigenspace(loss, params, [{"x": x, "y": y}], n_iters=10, top_k=8)
  assert es.info.breakdown and es.info.num_steps <= 6
  assert es.k == 5
  exact = np.sort(np.linalg.eigvalsh(x.T @ x / 5))[::-1][:5]
  np.testing.assert_allclose(es.eigenvalues, exact, rtol=1e-8)


def test_callback_sees_every_step(mlp):
  params, loss, _, batches, _ = mlp
  seen = []
  ij.fit_eigenspace(loss, params, batches, n_iters=7, top_k=3, callback=lambda s: seen.append(int(s.num_steps)))
  assert seen == list(range(1, 8))


def test_float32_fit_is_close_to_float64(mlp):
  params, loss, _, batches, hess = mlp
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  b32 = [{"x": b["x"].astype(np.float32), "y": b["y"]} for b in batches]
  es = ij.fit_eigenspace(loss, p32, b32, n_iters=60, top_k=5)
  assert es.eigenvectors.dtype == jnp.float32
  exact = np.sort(np.linalg.eigvalsh(hess))[::-1][:5]
  np.testing.assert_allclose(es.eigenvalues, exact, rtol=1e-3)
