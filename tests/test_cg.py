"""Conjugate gradients against numpy.linalg.solve on tiny dense systems and on curvature operators."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax import curvature, solvers
from tests import toy_problems


def _spd(n, seed, cond=100.0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eig = np.geomspace(1.0, cond, n)
  return (q * eig) @ q.T, rng.normal(size=n)


def test_cg_matches_numpy_solve_on_spd_callable():
  a, b = _spd(12, 0)
  a_j = jnp.asarray(a)
  res = solvers.conjugate_gradient(lambda v: a_j @ v, jnp.asarray(b), tol=1e-12, max_iters=100)
  assert bool(res.converged)
  np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
  assert float(res.residual_norm) <= 1e-12 * np.linalg.norm(b)
  true_res = np.linalg.norm(b - a @ np.asarray(res.x))
  assert true_res <= 1e-9 * np.linalg.norm(b)
  assert 1 <= int(res.num_iters) <= 100


def test_cg_stops_at_max_iters_and_reports_not_converged():
  a, b = _spd(20, 1, cond=1e4)
  a_j = jnp.asarray(a)
  res = solvers.conjugate_gradient(lambda v: a_j @ v, jnp.asarray(b), tol=1e-12, max_iters=3)
  assert int(res.num_iters) == 3
  assert not bool(res.converged)
  np.testing.assert_allclose(float(res.residual_norm), np.linalg.norm(b - a @ np.asarray(res.x)), rtol=1e-6)


def test_cg_uses_x0():
  a, b = _spd(8, 2)
  exact = np.linalg.solve(a, b)
  a_j = jnp.asarray(a)
  res = solvers.conjugate_gradient(lambda v: a_j @ v, jnp.asarray(b), x0=jnp.asarray(exact), tol=1e-8)
  assert int(res.num_iters) == 0
  assert bool(res.converged)


def test_cg_semidefinite_consistent_system_gives_minimum_norm_solution():
  rng = np.random.default_rng(3)
  u = rng.normal(size=(10, 6))
  a = u @ u.T  # rank 6, PSD
  b = a @ rng.normal(size=10)  # in the range of a
  a_j = jnp.asarray(a)
  res = solvers.conjugate_gradient(lambda v: a_j @ v, jnp.asarray(b), tol=1e-12, max_iters=200)
  np.testing.assert_allclose(res.x, np.linalg.pinv(a) @ b, rtol=1e-7, atol=1e-8)


def test_cg_stops_on_negative_curvature():
  a = jnp.diag(jnp.array([1.0, -1.0]))
  res = solvers.conjugate_gradient(lambda v: a @ v, jnp.array([0.0, 1.0]), tol=1e-10, max_iters=10)
  assert not bool(res.converged)
  assert np.all(np.isfinite(res.x))


def test_cg_on_damped_curvature_operator_matches_dense_solve():
  def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["y"][:, None], 1)[:, 0])

  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(3, 4))), "b1": jnp.zeros(4), "w2": jnp.asarray(rng.normal(size=(4, 3)))}
  batches = [{"x": rng.normal(size=(10, 3)), "y": rng.integers(0, 3, size=10).astype(np.int32)} for _ in range(2)]
  op = curvature.curvature_operator(loss_fn, params, batches, curvature="hessian", damping=5.0)
  dense = np.asarray(toy_problems.dense_matrix(op))
  assert np.linalg.eigvalsh(dense).min() > 0
  b = rng.normal(size=op.dim)
  res = solvers.conjugate_gradient(op, jnp.asarray(b), tol=1e-11, max_iters=200)
  assert bool(res.converged)
  np.testing.assert_allclose(res.x, np.linalg.solve(dense, b), rtol=1e-8, atol=1e-9)
  # The operator's __call__ path (a plain callable) agrees.
  res2 = solvers.conjugate_gradient(op.__call__, jnp.asarray(b), tol=1e-11, max_iters=200)
  np.testing.assert_allclose(res2.x, res.x, rtol=1e-9, atol=1e-10)


def test_cg_rejects_bad_input():
  f = lambda v: v
  with pytest.raises(ValueError, match="flat"):
    solvers.conjugate_gradient(f, jnp.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="non-finite"):
    solvers.conjugate_gradient(f, jnp.array([1.0, jnp.nan]))
  with pytest.raises(ValueError, match="x0"):
    solvers.conjugate_gradient(f, jnp.ones(3), x0=jnp.ones(2))
  with pytest.raises(ValueError, match="tol"):
    solvers.conjugate_gradient(f, jnp.ones(3), tol=-1.0)
  with pytest.raises(ValueError, match="preconditioner"):
    solvers.conjugate_gradient(f, jnp.ones(3), preconditioner=f)


def test_preconditioned_cg_with_the_exact_inverse_converges_in_one_step():
  """M⁻¹ = A⁻¹: the first preconditioned step solves the system; a Jacobi preconditioner on an
  ill-conditioned diagonal-dominant matrix converges in fewer steps than plain CG, to the same x."""
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
  a = (q * np.logspace(0, 4, 30)) @ q.T
  b = jnp.asarray(rng.normal(size=30))
  op = lambda m: curvature.LinearOperator(_Dense(), jnp.asarray(m), 30, jnp.float64)
  exact = np.linalg.solve(a, np.asarray(b))
  res = solvers.conjugate_gradient(op(a), b, tol=1e-10, max_iters=50, preconditioner=op(np.linalg.inv(a)))
  assert int(res.num_iters) == 1 and bool(res.converged) and bool(res.positive_curvature)
  np.testing.assert_allclose(res.x, exact, rtol=1e-8)
  d = np.diag(rng.uniform(1, 1e4, 30)) + 0.1 * (q @ q.T)
  plain = solvers.conjugate_gradient(op(d), b, tol=1e-10, max_iters=200)
  jacobi = solvers.conjugate_gradient(op(d), b, tol=1e-10, max_iters=200, preconditioner=op(np.diag(1 / np.diag(d))))
  np.testing.assert_allclose(jacobi.x, np.linalg.solve(d, np.asarray(b)), rtol=1e-7)
  assert int(jacobi.num_iters) < int(plain.num_iters)


class _Dense:
  def __call__(self, m, v):
    return m @ v

  def __eq__(self, other):
    return isinstance(other, _Dense)

  def __hash__(self):
    return 0


def test_batched_cg_solves_each_right_hand_side_on_its_own():
  """A batch of right-hand sides: each solution, iteration count and flag is its own single solve's
  (the batched product rounds differently: counts may differ by one step at the threshold)."""
  a, _ = _spd(16, 4, cond=1e3)
  rng = np.random.default_rng(5)
  eigvecs = np.linalg.eigh(a)[1]
  # b0 in a 2-dimensional invariant subspace (CG converges in 2 steps), b1 and b2 generic, b3 tiny scale.
  b = np.stack([eigvecs[:, :2] @ rng.normal(size=2), rng.normal(size=16), rng.normal(size=16),
                1e-3 * rng.normal(size=16)])
  a_j = jnp.asarray(a)
  res = solvers.conjugate_gradient(lambda v: a_j @ v, jnp.asarray(b), tol=1e-10, max_iters=60)
  assert res.x.shape == (4, 16) and res.num_iters.shape == (4,) and res.converged.shape == (4,)
  np.testing.assert_allclose(res.x, np.linalg.solve(a, b.T).T, rtol=1e-7, atol=1e-9)
  assert int(res.num_iters[0]) <= 3 < int(res.num_iters[1])
  for i in range(4):
    one = solvers.conjugate_gradient(lambda v: a_j @ v, jnp.asarray(b[i]), tol=1e-10, max_iters=60)
    assert abs(int(one.num_iters) - int(res.num_iters[i])) <= 1 and bool(one.converged) == bool(res.converged[i])
    np.testing.assert_allclose(res.x[i], one.x, rtol=1e-8, atol=1e-10)
    assert float(res.residual_norm[i]) <= 1e-10 * np.linalg.norm(b[i])
  # A cap stops the slow ones (not converged) while the fast one has converged.
  capped = solvers.conjugate_gradient(lambda v: a_j @ v, jnp.asarray(b), tol=1e-10, max_iters=3)
  assert bool(capped.converged[0]) and not bool(capped.converged[1])
  np.testing.assert_array_equal(capped.num_iters[1:], 3)


def test_batched_cg_on_a_linear_operator_matches_dense_solve():
  def loss_fn(params, batch):
    return jnp.mean(jnp.log1p(jnp.exp(-batch["y"] * (batch["x"] @ params["w"])))) + 0.5 * jnp.sum(params["w"] ** 2)

  rng = np.random.default_rng(6)
  params = {"w": jnp.asarray(rng.normal(size=5))}
  batches = [{"x": rng.normal(size=(12, 5)), "y": np.sign(rng.normal(size=12))}]
  op = curvature.curvature_operator(loss_fn, params, batches, damping=0.1)
  assert jax.tree.leaves(op) == jax.tree.leaves(op.operands)  # only arrays are pytree leaves
  dense = np.asarray(toy_problems.dense_matrix(op))
  b = rng.normal(size=(3, 5))
  res = solvers.conjugate_gradient(op, jnp.asarray(b), tol=1e-12, max_iters=50)
  assert bool(np.all(res.converged))
  np.testing.assert_allclose(res.x, np.linalg.solve(dense, b.T).T, rtol=1e-9, atol=1e-11)
  with pytest.raises(ValueError, match="size 5"):
    solvers.conjugate_gradient(op, jnp.ones((2, 4)))


def test_keep_best_returns_the_iterate_of_smallest_residual_on_an_indefinite_system():
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.normal(size=(14, 14)))
  a = (q * np.concatenate([np.geomspace(1.0, 50.0, 12), [-0.3, -2.0]])) @ q.T  # Two negative eigenvalues.
  a_j = jnp.asarray(a)
  matvec = lambda v: a_j @ v  # One function for every solve: compiled once, not once a call.
  for seed in range(4):
    b = jnp.asarray(np.random.default_rng(seed).normal(size=14))
    iterates = [solvers.conjugate_gradient(matvec, b, tol=0.0, max_iters=j).x for j in range(15)]
    true_res = [np.linalg.norm(np.asarray(b) - a @ np.asarray(x)) for x in iterates]
    best = solvers.conjugate_gradient(matvec, b, tol=0.0, max_iters=14, keep_best=True)
    j = int(np.argmin(true_res))
    np.testing.assert_allclose(best.x, iterates[j], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(best.residual_norm), true_res[j], rtol=1e-6)
    assert float(best.residual_norm) <= np.linalg.norm(np.asarray(b))  # Never worse than x0 = 0.
  # The safeguard matters here: the last iterate of some solve is worse than its best.
  last = [solvers.conjugate_gradient(matvec, jnp.asarray(np.random.default_rng(s).normal(size=14)),
                                     tol=0.0, max_iters=14) for s in range(4)]
  keep = [solvers.conjugate_gradient(matvec, jnp.asarray(np.random.default_rng(s).normal(size=14)),
                                     tol=0.0, max_iters=14, keep_best=True) for s in range(4)]
  assert any(float(k.residual_norm) < 0.5 * float(lst.residual_norm) for k, lst in zip(keep, last))
