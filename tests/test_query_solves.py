"""Block query solves and the Galerkin solve on W = [U; V], against one-at-a-time and dense solves (float64),
on one device and on meshes with p not a multiple of 8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import curvature, galerkin, preconditioning, residual_basis, sharding, sketch, solvers
from tests import sharding_problem


@pytest.fixture(scope="module")
def uneven():
  """p = 125 (not a multiple of 2, 4 or 8), H + δI positive definite, 7 queries."""
  params, loss, per_example, batches, _, kw = sharding_problem.uneven_problem()
  hess = np.asarray(solvers.dense_hessian(loss, params, batches))
  damping = max(0.0, -np.linalg.eigvalsh(hess)[0]) + 0.05
  es = ij.fit_eigenspace(loss, params, batches, damping=damping, **kw)
  grads = np.asarray(ij.projection.gradients(per_example, params, batches))[:7]
  basis = residual_basis.fit_residual_basis(es.eigenvectors, per_example, params, batches, 20, seed=0)
  return dict(params=params, loss=loss, per_example=per_example, batches=batches, hess=hess, damping=damping,
              es=es, grads=grads, basis=np.asarray(basis))


def test_block_solves_equal_one_at_a_time(uneven):
  u = uneven
  op = curvature.curvature_operator(u["loss"], u["params"], u["batches"])
  block = preconditioning.preconditioned_solve(op, u["es"], jnp.asarray(u["grads"]), cg_iters=3)
  for i, g in enumerate(u["grads"]):
    one = preconditioning.preconditioned_solve(op, u["es"], jnp.asarray(g[None]), cg_iters=3)
    np.testing.assert_allclose(block.x[i], one.x[0], rtol=1e-10, atol=1e-13)
    for field in ("num_iters", "residual_norm", "positive_curvature"):
      np.testing.assert_allclose(getattr(block, field)[i], getattr(one, field)[0], rtol=1e-10)
  # Each vector stops on its own: a zero right-hand side at once, the others run their 3 iterations.
  mixed = preconditioning.preconditioned_solve(op, u["es"], jnp.asarray(u["grads"]).at[2].set(0.0), cg_iters=3)
  assert int(mixed.num_iters[2]) == 0 and np.all(np.asarray(mixed.x[2]) == 0)
  np.testing.assert_allclose(mixed.x[3], block.x[3], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
def test_block_solves_and_galerkin_on_a_mesh_equal_one_device(uneven, shape):
  u = uneven
  p = u["hess"].shape[0]
  one_op = curvature.curvature_operator(u["loss"], u["params"], u["batches"])
  want = preconditioning.preconditioned_solve(one_op, u["es"], jnp.asarray(u["grads"][:4]), cg_iters=3)
  w_one = residual_basis.stored_directions(u["es"].eigenvectors, u["basis"])
  h_one = galerkin.restricted_curvature(one_op, w_one, block_size=8)
  mesh = sharding.make_mesh(shape)
  es = ij.eigenspace.on_mesh(u["es"], mesh)
  op = curvature.curvature_operator(u["loss"], u["params"], u["batches"], mesh=mesh)
  b = sharding.to_flat_layout(jnp.asarray(u["grads"][:4]), p, mesh)
  got = preconditioning.preconditioned_solve(op, es, b, cg_iters=3)
  assert got.x.shape == (4, sharding.padded_dim(p, mesh))
  rows = sharding.DATA if 4 % shape[0] == 0 else None  # Queries over 'data' where they divide evenly.
  assert got.x.sharding.is_equivalent_to(sharding.named(mesh, jax.sharding.PartitionSpec(rows, sharding.MODEL)), 2)
  np.testing.assert_allclose(np.asarray(got.x)[:, :p], want.x, rtol=1e-9, atol=1e-12)
  np.testing.assert_array_equal(np.asarray(got.x)[:, p:], 0.0)  # The padding stays zero.
  w = residual_basis.stored_directions(es.eigenvectors, u["basis"])
  np.testing.assert_allclose(galerkin.restricted_curvature(op, w, block_size=8), h_one, rtol=1e-9, atol=1e-12)
  sk = sketch.make_sketch(p, 64, seed=0, dtype=jnp.float64)
  rep = sharding.replicated(mesh)
  sk_mesh = sketch.KroneckerSketch(sharding.put(sk.left, rep), sharding.put(sk.right, rep), p)
  np.testing.assert_allclose(preconditioning.directions_query_side(w, sk_mesh, got.x),
                             preconditioning.directions_query_side(w_one, sk, want.x), rtol=1e-9, atol=1e-12)


def test_galerkin_solve_equals_a_dense_solve_restricted_to_w(uneven):
  u = uneven
  hess, damping, es = u["hess"], u["damping"], u["es"]
  p = hess.shape[0]
  op = curvature.curvature_operator(u["loss"], u["params"], u["batches"])
  w = np.asarray(residual_basis.stored_directions(es.eigenvectors, u["basis"]))
  d = w.shape[0]
  np.testing.assert_allclose(w @ w.T, np.eye(d), atol=1e-10)
  h_w = galerkin.restricted_curvature(op, jnp.asarray(w), block_size=5)  # d = 26: blocks of 5, the last padded.
  np.testing.assert_allclose(h_w, w @ hess @ w.T, rtol=1e-9, atol=1e-12)
  c = ij.eigenspace.default_tail_constant(es)
  inv = galerkin.galerkin_inverse(h_w, damping, c)
  assert inv.floored == 0 and inv.min_eigenvalue > 0
  g = u["grads"]
  # The dense reference: (H + δI) x = g solved on span W (Galerkin), and g's part beyond W scaled by 1/c.
  coords = np.linalg.solve(w @ (hess + damping * np.eye(p)) @ w.T, w @ g.T)
  expected = (w.T @ coords).T + (g - (g @ w.T) @ w) / c
  pre = galerkin.galerkin_tail_inverse(jnp.asarray(w), inv.inverse, c)
  np.testing.assert_allclose(preconditioning.apply_tail_inverse(*pre, jnp.asarray(g)), expected, rtol=1e-8, atol=1e-11)
  # With cg_iters = 0 the preconditioned solve is that Galerkin solve; its query side against stored rows
  # [W∇ℓ(z), R(I − WᵀW)∇ℓ(z)] (an exact sketch) gives ∇ℓ(z)ᵀx̂(x).
  solved = preconditioning.preconditioned_solve(op, es, jnp.asarray(g), cg_iters=0, preconditioner=pre)
  np.testing.assert_allclose(solved.x, expected, rtol=1e-8, atol=1e-11)
  exact = sketch.make_sketch(p, p + 100, seed=0, dtype=jnp.float64)
  rows = sketch.project_and_sketch(jnp.asarray(w), exact, u["per_example"], u["params"], u["batches"][0])
  side = galerkin.galerkin_query_side(inv.inverse, c, rows.projections[:7], rows.sketch[:7])
  stored = np.concatenate([rows.projections, rows.sketch], axis=1)
  grads = np.asarray(ij.projection.gradients(u["per_example"], u["params"], [u["batches"][0]]))
  np.testing.assert_allclose(side @ stored.T, expected @ grads.T, rtol=1e-7, atol=1e-10)
  # W spanning everything (d = p): the Galerkin solve is the exact solve.
  full = np.linalg.qr(np.random.default_rng(0).normal(size=(p, p)))[0].T
  inv_full = galerkin.galerkin_inverse(galerkin.restricted_curvature(op, jnp.asarray(full), block_size=64), damping, c)
  x = preconditioning.apply_tail_inverse(jnp.asarray(full), jnp.asarray(inv_full.inverse), c, jnp.asarray(g))
  np.testing.assert_allclose(x, np.linalg.solve(hess + damping * np.eye(p), g.T).T, rtol=1e-7, atol=1e-10)


def test_galerkin_inverse_raises_non_positive_eigenvalues_to_the_tail_constant():
  h = np.diag([3.0, 1.0, -0.5])
  inv = galerkin.galerkin_inverse(h, 0.1, 2.0)
  np.testing.assert_allclose(inv.inverse, np.diag([1 / 3.1, 1 / 1.1, 1 / 2.0]))
  assert inv.floored == 1 and inv.min_eigenvalue == pytest.approx(-0.4)
  with pytest.raises(ValueError, match="square"):
    galerkin.galerkin_inverse(np.ones((2, 3)), 0.1, 1.0)
  with pytest.raises(ValueError, match="tail constant"):
    galerkin.galerkin_inverse(h, 0.1, 0.0)
  with pytest.raises(ValueError, match="non-finite"):
    galerkin.galerkin_inverse(np.full((2, 2), np.nan), 0.1, 1.0)


def test_the_score_job_warns_when_galerkin_eigenvalues_were_raised(caplog):
  from influence_jax.jobs import queries  # noqa: PLC0415

  report = queries.galerkin_report(galerkin.galerkin_inverse(np.diag([3.0, -0.5]), 0.1, 2.0))
  assert report == {"directions": 2, "min_eigenvalue": pytest.approx(-0.4), "raised_to_tail_constant": 1}
  with caplog.at_level("WARNING"):
    queries.log_galerkin_report(report, "hessian")
  assert "not positive definite" in caplog.text and "1 of its 2 eigenvalues" in caplog.text
  assert "gauss_newton" in caplog.text
