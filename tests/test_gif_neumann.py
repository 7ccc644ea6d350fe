"""The authors' Neumann iteration against exact solves (float64)."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax import curvature
from influence_jax.methods import gif_neumann
from influence_jax.methods import gif_updates


def _spd(n, cond, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return (q * np.geomspace(1.0, cond, n)) @ q.T


def test_neumann_equals_lstsq_on_a_well_conditioned_system():
  a = _spd(12, 5.0, 0) * 3.0  # eigenvalues 3 … 15: the normaliser must grow from 1 (divergence) to ≥ √7.5
  b = np.random.default_rng(1).normal(size=12)
  res = gif_neumann.neumann_solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), max_iters=2000, tol=1e-14)
  np.testing.assert_allclose(res.x, np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-10, atol=1e-12)
  assert bool(res.converged) and res.restarts >= 1 and res.normaliser ** 2 > 15 / 2


def test_early_stopping_regularises_the_small_eigenvalues():
  a = np.diag([4.0, 1e-3])
  res = gif_neumann.neumann_solve(lambda v: jnp.asarray(a) @ v, jnp.asarray([4.0, 1e-3]), max_iters=30,
                                  normaliser=2.0)
  # x_k = (1 − (1 − λ/n²)^(k+1)) b/λ: the large eigenvalue is solved, the small one barely started.
  np.testing.assert_allclose(res.x, [1.0, 1 - (1 - 1e-3 / 4) ** 31], rtol=1e-9)
  assert int(res.num_iters) == 30 and not bool(res.converged)


def test_neumann_rejects_an_indefinite_operator_and_bad_input():
  with pytest.raises(ValueError, match="diverged"):
    gif_neumann.neumann_solve(lambda v: -v, jnp.ones(3), max_restarts=3)
  with pytest.raises(ValueError, match="max_iters"):
    gif_neumann.neumann_solve(lambda v: v, jnp.ones(3), max_iters=0)
  with pytest.raises(ValueError, match="non-finite"):
    gif_neumann.neumann_solve(lambda v: v, jnp.array([1.0, jnp.nan]))


def test_gif_update_with_neumann_equals_the_least_squares_solution():
  # A well-conditioned quadratic loss: H = A exactly, so GIF's Δ_T = lstsq(H[:, T], g).
  a = _spd(8, 4.0, 2)
  loss_fn = lambda p, b: 0.5 * p["w"] @ (jnp.asarray(a) @ p["w"]) + 0.0 * jnp.sum(b["x"])
  params = {"w": jnp.zeros(8)}
  op = curvature.curvature_operator(loss_fn, params, [{"x": np.zeros((2, 1))}])
  g = {"w": jnp.asarray(np.random.default_rng(3).normal(size=8))}
  mask = {"w": np.arange(8) < 5}
  exact = np.zeros(8)
  exact[:5] = np.linalg.lstsq(a[:, :5], np.asarray(g["w"]), rcond=None)[0]
  upd = gif_updates.gif_update(op, g, mask, solver="neumann", max_iters=5000, tol=1e-15)
  np.testing.assert_allclose(upd.delta["w"], exact, rtol=1e-9, atol=1e-12)
  cg = gif_updates.gif_update(op, g, mask, solver="cg", tol=1e-14)
  np.testing.assert_allclose(cg.delta["w"], exact, rtol=1e-9, atol=1e-12)
  assert np.isfinite(upd.normaliser) and np.isnan(cg.normaliser)


def test_additive_normaliser_follows_the_hand_computed_sequence():
  # The authors' rule: n = 1, 6, 11, 16, ...; the iteration converges once n² > λ_max / 2 = 150 (n = 16, the
  # first of the sequence above √150 ≈ 12.2); every smaller n diverges (|1 − 300/n²| > 1).
  a = jnp.asarray(np.diag([300.0, 1.0]))
  b = jnp.asarray([300.0, 1.0])
  res = gif_neumann.neumann_solve(lambda v: a @ v, b, max_iters=20000, normaliser=1.0, growth=5.0, rule="add",
                                  tol=1e-13)
  assert res.normalisers == (1.0, 6.0, 11.0, 16.0) and res.normaliser == 16.0 and res.restarts == 3
  np.testing.assert_allclose(res.x, [1.0, 1.0], rtol=1e-9)
  # The multiplicative rule from the same start: 1, 2, 4, 8, 16.
  mul = gif_neumann.neumann_solve(lambda v: a @ v, b, max_iters=50, normaliser=1.0, growth=2.0, rule="multiply")
  assert mul.normalisers == (1.0, 2.0, 4.0, 8.0, 16.0)
  assert gif_neumann.next_normaliser(1.0, 5.0, "add") == 6.0 and gif_neumann.next_normaliser(1.5, 2.0) == 3.0
  with pytest.raises(ValueError, match="rule"):
    gif_neumann.neumann_solve(lambda v: v, jnp.ones(2), rule="double")
  with pytest.raises(ValueError, match="growth > 0"):
    gif_neumann.neumann_solve(lambda v: v, jnp.ones(2), rule="add", growth=0.0)
