"""Retraining ground truth on ridge regression, where leave-one-out has a closed form.

Leave-one-out here is compared with the *exact* closed form, not at first
order: removing z_i (weight 0, objective (1/N)Σ_{j≠i}ℓ_j + λ/2‖θ‖²) moves θ by
d_i = H⁻¹∇ℓ_i / (N(1 − h_i)), h_i = x_iᵀH⁻¹x_i/N its leverage (Sherman–Morrison),
and the quadratic test loss changes by ∇ℓ(x)ᵀd_i + ½(xᵀd_i)². Influence
score/N is the first-order part of that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax.eval import baselines, metrics, problems, retraining

N, D, L2 = 60, 5, 0.1


def ridge():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N + 20, D))
  y = x @ rng.normal(size=D) + 0.5 * rng.normal(size=N + 20)
  train, test = {"x": x[:N], "y": y[:N]}, {"x": x[N:], "y": y[N:]}
  per_example = lambda p, b: 0.5 * (b["x"] @ p["w"] - b["y"]) ** 2
  prob = problems.Problem("ridge", lambda key: {"w": jnp.zeros(D)}, per_example, L2, train, test)
  xs, ys = jnp.asarray(train["x"]), jnp.asarray(train["y"])

  def train_fn(weights, seed):  # Exact minimiser of (1/N) Σ w_i ℓ_i + λ/2‖θ‖².
    del seed
    a = (xs.T * weights) @ xs / N + L2 * jnp.eye(D)
    return {"w": jnp.linalg.solve(a, (xs.T * weights) @ ys / N)}

  return prob, train_fn


def test_leave_one_out_matches_the_closed_form_and_influence_at_first_order():
  prob, train_fn = ridge()
  params = train_fn(jnp.ones(N), 0)
  removed = np.arange(0, N, 3)
  gt = retraining.loo_ground_truth(train_fn, problems.loss_targets(prob), N, removed, chunk_size=8)

  x, xt = prob.train["x"], prob.test["x"]
  w = np.asarray(params["w"])
  hess = x.T @ x / N + L2 * np.eye(D)
  grads = x * (x @ w - prob.train["y"])[:, None]  # ∇ℓ_i
  hinv_g = np.linalg.solve(hess, grads.T).T  # (N, D)
  leverage = np.einsum("nd,nd->n", x, np.linalg.solve(hess, x.T).T) / N
  d = hinv_g[removed] / (N * (1 - leverage[removed]))[:, None]  # (R, D)
  test_grads = xt * (xt @ w - prob.test["y"])[:, None]
  closed = d @ test_grads.T + 0.5 * (d @ xt.T) ** 2  # (R, T)
  np.testing.assert_allclose(gt.deltas, closed, rtol=1e-8, atol=1e-12)

  task = baselines.MethodInputs(prob.loss_fn, prob.per_example_loss_fn, params, [prob.train], [prob.test])
  scores = baselines.exact(task).scores
  np.testing.assert_allclose(scores, test_grads @ hinv_g.T, rtol=1e-8)
  loo = metrics.loo_correlation(scores, removed, gt.deltas)
  assert loo.pearson > 0.99  # First order: score/N against the exact change.


def test_lds_of_exact_ridge_influence_is_high_and_its_sign_is_ours():
  prob, train_fn = ridge()
  params = train_fn(jnp.ones(N), 0)
  task = baselines.MethodInputs(prob.loss_fn, prob.per_example_loss_fn, params, [prob.train], [prob.test])
  scores = baselines.exact(task).scores
  gt = retraining.lds_ground_truth(train_fn, problems.loss_targets(prob), N, num_subsets=50, chunk_size=16)
  assert gt.masks.shape == (50, N) and np.all(gt.masks.sum(1) == N // 2)
  assert len(set(gt.seeds.tolist())) == 50  # One seed per subset.
  # Measured 0.92: half the data removed is beyond first order, so not exactly 1.
  assert metrics.lds(scores, gt.masks, gt.targets) > 0.85
  assert metrics.lds(-scores, gt.masks, gt.targets) < -0.85


def _tiny_train_fn(scale):
  def train_fn(weights, seed):
    return {"w": scale * weights[:3] + jax.random.normal(jax.random.key(seed), (3,))}
  return train_fn


def test_retrain_matches_a_loop_and_resumes_from_cached_chunks(tmp_path):
  rng = np.random.default_rng(0)
  weights, seeds = rng.random((7, 5)), np.arange(7, dtype=np.uint32)
  evaluate = lambda p: p["w"] ** 2
  config = {"model": "tiny"}
  first = retraining.retrain(_tiny_train_fn(1.0), evaluate, weights, seeds, chunk_size=3,
                             cache_dir=str(tmp_path), config=config)
  loop = np.stack([evaluate(_tiny_train_fn(1.0)(jnp.asarray(w), s)) for w, s in zip(weights, seeds)])
  np.testing.assert_allclose(first.targets, loop, rtol=1e-12)
  assert first.reused_chunks == 0

  # Same key: every chunk is read back, even though this train_fn would give other numbers.
  again = retraining.retrain(_tiny_train_fn(2.0), evaluate, weights, seeds, chunk_size=3,
                             cache_dir=str(tmp_path), config=config)
  assert again.reused_chunks == 3
  np.testing.assert_array_equal(again.targets, first.targets)

  # A killed run: one chunk missing is recomputed, the others reused.
  chunk = sorted((tmp_path / first.key).glob("chunk_00001_*.npz"))
  assert len(chunk) == 1
  chunk[0].unlink()
  resumed = retraining.retrain(_tiny_train_fn(2.0), evaluate, weights, seeds, chunk_size=3,
                               cache_dir=str(tmp_path), config=config)
  assert resumed.reused_chunks == 2
  np.testing.assert_array_equal(resumed.targets[:3], first.targets[:3])
  np.testing.assert_array_equal(resumed.targets[6:], first.targets[6:])
  assert not np.allclose(resumed.targets[3:6], first.targets[3:6])

  # Another config is another key: nothing reused.
  other = retraining.retrain(_tiny_train_fn(1.0), evaluate, weights, seeds, chunk_size=3,
                             cache_dir=str(tmp_path), config={"model": "other"})
  assert other.reused_chunks == 0 and other.key != first.key


def test_retrain_rejects_bad_input():
  f, ev = _tiny_train_fn(1.0), lambda p: p["w"]
  with pytest.raises(ValueError, match="seeds must have shape"):
    retraining.retrain(f, ev, np.ones((3, 5)), np.arange(2))
  with pytest.raises(ValueError, match="non-negative"):
    retraining.retrain(f, ev, -np.ones((3, 5)), np.arange(3))
  with pytest.raises(ValueError, match="needs `config`"):
    retraining.retrain(f, ev, np.ones((3, 5)), np.arange(3), cache_dir="/tmp/unused")
  with pytest.raises(ValueError, match="training indices"):
    retraining.loo_ground_truth(f, ev, 5, [7])


def test_digits_problem_trains_by_one_segment_vmapped_or_checkpointed():
  prob = problems.digits_logreg(num_train=30, num_test=5)
  assert sum(x.size for x in jax.tree.leaves(prob.init_fn(jax.random.key(0)))) == 650
  train_fn = problems.make_train_fn(prob, steps=20, learning_rate=0.05)
  final, ckpts = problems.train_with_checkpoints(prob, steps=20, learning_rate=0.05, num_checkpoints=4, seed=3)
  ones = jnp.ones(30)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  jax.tree.map(close, final, train_fn(ones, 3))
  assert [c.step for c in ckpts] == [5, 10, 15, 20]
  weights = jnp.stack([ones, ones.at[0].set(0.0)])
  mapped = jax.vmap(train_fn)(weights, jnp.asarray([3, 3], jnp.uint32))
  jax.tree.map(lambda a, b: close(a[1], b), mapped, train_fn(weights[1], 3))
  assert not np.allclose(mapped["output"]["kernel"][0], mapped["output"]["kernel"][1])  # z_0 removed.
  assert problems.gradient_norm(prob, final) < problems.gradient_norm(prob, prob.init_fn(jax.random.key(3)))
