"""Attribution baselines against dense exact answers on a tiny L2 logistic regression (float64)."""

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence_jax import solvers
from influence_jax.eval import baselines
from tests import toy_problems


def tiny_task(checkpoints=()):
  params, loss, per_example, batches = toy_problems.logistic_regression(num_examples=60)
  params = toy_problems.newton_minimize(loss, params, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
  rng = np.random.default_rng(5)
  x = rng.normal(size=(7, 5))
  test = [{"x": x, "y": (x[:, 0] > 0).astype(np.float64)}]
  return baselines.MethodInputs(loss, per_example, params, batches, test, checkpoints)


def dense_reference(task, damping=0.0):
  hess = np.asarray(solvers.dense_hessian(task.loss_fn, task.params, task.train_batches)) + damping * np.eye(6)
  g_train = np.asarray(solvers.gradient_matrix(task.per_example_loss_fn, task.params, task.train_batches))
  g_test = np.asarray(solvers.gradient_matrix(task.per_example_loss_fn, task.params, task.test_batches))
  return hess, g_test, g_train


def test_exact_and_cg_match_a_dense_solve():
  task = tiny_task()
  hess, g_test, g_train = dense_reference(task, 0.01)
  want = g_test @ np.linalg.solve(hess, g_train.T)
  ex = baselines.exact(task, damping=0.01)
  np.testing.assert_allclose(ex.scores, want, rtol=1e-9, atol=1e-12)
  assert ex.scores.shape == (7, 60) and ex.fit_seconds > 0 and ex.score_seconds > 0
  cg = baselines.conjugate_gradients(task, damping=0.01, tol=1e-12, max_iters=50)
  np.testing.assert_allclose(cg.scores, want, rtol=1e-7, atol=1e-10)
  assert cg.info["converged"] == "7/7"


def test_lissa_converges_to_exact_on_a_positive_definite_problem():
  task = tiny_task()
  hess, g_test, g_train = dense_reference(task)
  top = np.linalg.eigvalsh(hess)[-1]
  want = g_test @ np.linalg.solve(hess, g_train.T)
  # Full batch: the recursion contracts by 1 − λ_min/scale a step (λ_min ≥ L2 = 0.05).
  out = baselines.lissa(task, scale=top, depth=3000, tol=1e-10)
  np.testing.assert_allclose(out.scores, want, rtol=1e-8, atol=1e-10)
  assert out.info["converged"] == "7/7" and not out.info["diverged"]
  assert out.info["median_rel_residual"] < 1e-9
  # Mini-batches: unbiased but noisy; still close, and reported as not converged at a tight tol.
  noisy = baselines.lissa(task, scale=2 * top, depth=3000, batch_size=20, repeats=4, tol=1e-10)
  assert np.corrcoef(noisy.scores.ravel(), want.ravel())[0, 1] > 0.95
  assert noisy.info["converged"] == "0/7"


def test_lissa_reports_non_convergence_and_divergence():
  task = tiny_task()
  hess, _, _ = dense_reference(task)
  top = np.linalg.eigvalsh(hess)[-1]
  short = baselines.lissa(task, scale=top, depth=3, tol=1e-2)
  assert short.info["converged"] == "0/7" and not short.info["diverged"]
  assert short.info["median_rel_residual"] > 1e-2
  blown = baselines.lissa(task, scale=top / 4, depth=500)  # (H)/scale has eigenvalues > 2.
  assert blown.info["diverged"] and np.all(np.isnan(blown.scores))
  with pytest.raises(ValueError, match="scale > 0"):
    baselines.lissa(task, scale=0.0)


def test_gradient_dot_and_tracin_on_one_checkpoint_is_lr_times_gradient_dot():
  task = tiny_task()
  _, g_test, g_train = dense_reference(task)
  dot = baselines.gradient_dot(task)
  np.testing.assert_allclose(dot.scores, g_test @ g_train.T, rtol=1e-10, atol=1e-13)
  one = baselines.tracin(task._replace(checkpoints=[(task.params, 0.3)]))
  np.testing.assert_allclose(one.scores, 0.3 * dot.scores, rtol=1e-12, atol=1e-14)
  # Two checkpoints: the lr-weighted sum of each one's dot products.
  other = {"w": task.params["w"] * 0.5, "b": task.params["b"]}
  two = baselines.tracin(task._replace(checkpoints=[(task.params, 0.3), (other, 0.1)]))
  np.testing.assert_allclose(
      two.scores, one.scores + 0.1 * baselines.gradient_dot(task._replace(params=other)).scores, rtol=1e-12)
  with pytest.raises(ValueError, match="checkpoints"):
    baselines.tracin(task)


def test_arnoldi_with_every_eigenpair_is_exact_and_the_tail_helps_at_small_k():
  task = tiny_task()
  hess, g_test, g_train = dense_reference(task, 0.01)
  want = g_test @ np.linalg.solve(hess, g_train.T)
  full = baselines.arnoldi(task, top_k=6, n_iters=6, damping=0.01)
  np.testing.assert_allclose(full.scores, want, rtol=1e-7, atol=1e-9)
  err = lambda s: np.linalg.norm(s - want) / np.linalg.norm(want)
  plain = baselines.arnoldi(task, top_k=2, n_iters=6, damping=0.01)
  tail = baselines.arnoldi(task, top_k=2, n_iters=6, damping=0.01, tail=True)
  assert err(tail.scores) < err(plain.scores)


def test_arnoldi_pcg_is_the_tail_without_iterations_and_exact_with_enough():
  task = tiny_task()
  hess, g_test, g_train = dense_reference(task, 0.01)
  want = g_test @ np.linalg.solve(hess, g_train.T)
  tail = baselines.arnoldi(task, top_k=2, n_iters=6, damping=0.01, tail=True)
  zero = baselines.arnoldi_pcg(task, top_k=2, n_iters=6, cg_iters=0, damping=0.01)
  np.testing.assert_allclose(zero.scores, tail.scores, rtol=1e-8, atol=1e-11)
  solved = baselines.arnoldi_pcg(task, top_k=2, n_iters=6, cg_iters=6, damping=0.01)
  np.testing.assert_allclose(solved.scores, want, rtol=1e-7, atol=1e-10)
  assert solved.info["positive_curvature"] == "7/7" and solved.info["max_rel_residual"] < 1e-8
  stored = baselines.arnoldi_pcg(task, top_k=2, n_iters=6, cg_iters=6, damping=0.01, sketch_dim=10_000)
  np.testing.assert_allclose(stored.scores, want, rtol=1e-7, atol=1e-10)  # An exact sketch: the store's rows.
  assert stored.info["sketch_dim"] >= ravel_pytree(task.params)[0].size
  # A residual basis spanning every remainder outside the k = 2 eigenvectors (6 − 2 = 4 rows): exact
  # scores from the store whatever the sketch.
  based = baselines.arnoldi_pcg(task, top_k=2, n_iters=6, cg_iters=6, damping=0.01, sketch_dim=1, residual_rank=4,
                                residual_examples=60)
  np.testing.assert_allclose(based.scores, want, rtol=1e-7, atol=1e-10)
  assert based.info["residual_rank"] == 4


def test_arnoldi_pcg_from_a_16_bit_store_is_exact_to_its_rounding():
  task = tiny_task()
  hess, g_test, g_train = dense_reference(task, 0.01)
  want = g_test @ np.linalg.solve(hess, g_train.T)
  for dtype, rel in (("float32", 1e-6), ("bfloat16", 2.0 ** -7), ("float16", 2.0 ** -10)):
    got = baselines.arnoldi_pcg(task, top_k=2, n_iters=6, cg_iters=6, damping=0.01, sketch_dim=10_000,
                                store_dtype=dtype)
    assert got.info["store_dtype"] == dtype
    # Each stored number rounded to `dtype` (relative error ≤ its unit roundoff), the query side exact.
    np.testing.assert_allclose(got.scores, want, atol=rel * np.abs(want).max())
    assert dtype == "float32" or not np.allclose(got.scores, want, rtol=1e-7, atol=0)
