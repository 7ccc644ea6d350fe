"""The residual basis (top principal directions of gradient remainders) against a dense SVD (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import preconditioning, residual_basis, solvers
from tests import toy_problems


@pytest.fixture(scope="module")
def mlp():
  params, loss, per_example, batches = toy_problems.small_mlp_problem()
  es = ij.fit_eigenspace(loss, params, batches, n_iters=20, top_k=8, damping=0.5)
  u = np.asarray(es.eigenvectors)
  g = np.asarray(solvers.gradient_matrix(per_example, params, batches))
  return params, loss, per_example, batches, es, u, g - (g @ u.T) @ u


def test_basis_spans_the_top_singular_vectors_of_the_remainders(mlp):
  params, _, per_example, batches, _, u, remainders = mlp
  sample = [batches[0]]  # 25 examples: rank + oversample = 25 sees their whole span, so the result is exact.
  v = np.asarray(residual_basis.fit_residual_basis(u, per_example, params, sample, 6, oversample=19))
  np.testing.assert_allclose(v @ v.T, np.eye(6), atol=1e-10)
  np.testing.assert_allclose(v @ u.T, 0.0, atol=1e-10)
  _, s, vt = np.linalg.svd(remainders[:25], full_matrices=False)
  assert s[5] > 1.01 * s[6]  # A gap: the top-6 subspace is well defined.
  np.testing.assert_allclose(v.T @ v, vt[:6].T @ vt[:6], atol=1e-8)
  # Rows in order of singular value, each the singular vector up to sign.
  np.testing.assert_allclose(np.abs(np.sum(v * vt[:6], axis=1)), 1.0, atol=1e-8)


def test_power_iterations_approach_the_optimum_with_little_oversampling(mlp):
  params, _, per_example, batches, _, u, remainders = mlp
  best = np.linalg.svd(remainders, compute_uv=False)
  energy = lambda v: np.sum((remainders @ np.asarray(v).T) ** 2) / np.sum(best[:4] ** 2)
  crude = residual_basis.fit_residual_basis(u, per_example, params, batches, 4, oversample=2, power_iters=0)
  refined = residual_basis.fit_residual_basis(u, per_example, params, batches, 4, oversample=2, power_iters=3)
  assert energy(crude) <= energy(refined) + 1e-12
  assert 0.99 < energy(refined) <= 1 + 1e-9
  for v in (crude, refined):
    np.testing.assert_allclose(np.asarray(v) @ np.asarray(v).T, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(np.asarray(v) @ u.T, 0.0, atol=1e-10)


def test_float32_power_iterations_keep_the_rank_and_a_repeated_sample_gives_fewer_rows(mlp):
  params, _, per_example, batches, _, u, remainders = mlp
  f32 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32) if np.asarray(x).dtype == np.float64 else x, t)
  v = np.asarray(residual_basis.fit_residual_basis(f32(u), per_example, f32(params), f32(batches), 10, oversample=4,
                                                   power_iters=2), np.float64)
  assert v.shape == (10, u.shape[1])  # Squaring the spectrum in float32 loses no direction.
  np.testing.assert_allclose(v @ v.T, np.eye(10), atol=2e-5)
  best = np.linalg.svd(remainders, compute_uv=False)
  assert np.sum((remainders @ v.T) ** 2) / np.sum(best[:10] ** 2) > 0.98
  # Three distinct examples, repeated: their remainders span 3 dimensions, so 3 rows, not 5.
  three = {k: np.concatenate([x[:3]] * 10) for k, x in batches[0].items()}
  v = np.asarray(residual_basis.fit_residual_basis(u, per_example, params, [three], 5, oversample=0))
  assert v.shape == (3, u.shape[1])
  np.testing.assert_allclose(v @ v.T, np.eye(3), atol=1e-10)
  np.testing.assert_allclose(remainders[:3] - (remainders[:3] @ v.T) @ v, 0.0, atol=1e-10)


def test_store_rows_with_the_whole_remainder_span_score_exactly_with_any_sketch(mlp):
  # V spans every training remainder: the sketched part of each stored row is zero, so even a
  # 4-row sketch gives the preconditioned scores exactly.
  params, loss, per_example, batches, es, u, _ = mlp
  test = [{"x": batches[0]["x"][:6] * 1.5, "y": batches[0]["y"][:6][::-1].copy()}]
  direct, solve = preconditioning.influence_preconditioned(
      es, per_example, params, test, batches, loss_fn=loss, curvature_batches=batches, cg_iters=3, return_solve=True)
  v = residual_basis.fit_residual_basis(u, per_example, params, batches, 40, oversample=0)
  tiny = ij.sketch.make_sketch(u.shape[1], 4, seed=0, dtype=jnp.float64)
  rows = [ij.sketch.project_and_sketch(jnp.concatenate([es.eigenvectors, v]), tiny, per_example, params, b)
          for b in batches]
  np.testing.assert_allclose(jnp.concatenate([r.sketch for r in rows]), 0.0, atol=1e-9)
  stored = ij.scoring.row_side(jnp.concatenate([r.projections for r in rows]), jnp.concatenate([r.sketch for r in rows]))
  got = preconditioning.solved_query_side(es, tiny, solve.x, v) @ stored.T
  np.testing.assert_allclose(got, direct, rtol=1e-8, atol=1e-10)


def test_refuses_more_rows_than_the_sample_spans(mlp):
  params, _, per_example, batches, _, u, _ = mlp
  with pytest.raises(ValueError, match="15 sample examples"):
    residual_basis.fit_residual_basis(u, per_example, params, [batches[1]], 16)
  with pytest.raises(ValueError, match="positive integer"):
    residual_basis.fit_residual_basis(u, per_example, params, batches, 0)


def test_plain_tail_from_rows_with_a_residual_basis_equals_in_memory_tail(mlp):
  # q = [G(x)(Λ+δ)⁻¹, V∇ℓ(x)/c, S(x)/c] against [G(z), V∇ℓ(z), S(z)], exact sketch: the tail of `influence`.
  params, loss, per_example, batches, es, u, _ = mlp
  test = [{"x": batches[0]["x"][:6] * 1.5, "y": batches[0]["y"][:6][::-1].copy()}]
  v = residual_basis.fit_residual_basis(u, per_example, params, batches, 12)
  exact_sketch = ij.sketch.make_sketch(u.shape[1], u.shape[1] + 100, seed=0, dtype=jnp.float64)
  w = jnp.concatenate([es.eigenvectors, v])
  stored = lambda bs: [ij.sketch.project_and_sketch(w, exact_sketch, per_example, params, b) for b in bs]
  train, queries = stored(batches), stored(test)[0]
  rows = ij.row_side(jnp.concatenate([r.projections[:, :8] for r in train]), jnp.concatenate([r.sketch for r in train]),
                     jnp.concatenate([r.projections[:, 8:] for r in train]))
  q = ij.query_side(es, queries.projections[:, :8], queries.sketch, query_residual=queries.projections[:, 8:])
  np.testing.assert_allclose(q @ rows.T, ij.influence(es, per_example, params, test, batches, tail=True),
                             rtol=1e-8, atol=1e-10)


def test_orthonormal_rows_resolve_small_singular_values_in_float32():
  # Singular values from 1 down to 3e-4: a single Gram matrix resolves only ~4 % of the largest in
  # float32 (l = 48); the deflation rounds must find every direction above 1000·eps (1.2e-4).
  rng = np.random.default_rng(0)
  l, p = 48, 3000
  s = np.geomspace(1.0, 3e-4, l)
  left = np.linalg.qr(rng.standard_normal((l, l)))[0]
  right = np.linalg.qr(rng.standard_normal((p, l)))[0].T
  y = (left * s) @ right
  against = np.zeros((1, p))
  q = np.asarray(residual_basis.orthonormal_rows(jnp.asarray(y, jnp.float32), jnp.asarray(against, jnp.float32)),
                 np.float64)
  assert np.sum(np.linalg.norm(q, axis=1) > 0.5) == l
  np.testing.assert_allclose(q @ q.T, np.eye(l), atol=1e-5)
  np.testing.assert_allclose(q.T @ (q @ right.T), right.T, atol=1e-3)  # Spans all of y's row space.
