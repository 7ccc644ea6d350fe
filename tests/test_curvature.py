"""Curvature products against dense jax.hessian (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence_jax import curvature, solvers
from tests import toy_problems


@pytest.mark.parametrize("problem", [toy_problems.logistic_regression, toy_problems.small_mlp_problem])
@pytest.mark.parametrize("microbatch_size", [None, 7])
def test_hvp_equals_dense_hessian(problem, microbatch_size):
  params, loss, _, batches = problem()
  hess = solvers.dense_hessian(loss, params, batches)
  op = curvature.curvature_operator(loss, params, batches, microbatch_size=microbatch_size)
  v = jax.random.normal(jax.random.key(1), (op.dim,), jnp.float64)
  np.testing.assert_allclose(op(v), hess @ v, atol=1e-10, rtol=0)
  np.testing.assert_allclose(toy_problems.dense_matrix(op), hess, atol=1e-10, rtol=0)


def test_hessian_is_indefinite_on_the_mlp_problem():
  params, loss, _, batches = toy_problems.small_mlp_problem()
  eig = np.linalg.eigvalsh(np.asarray(solvers.dense_hessian(loss, params, batches)))
  assert eig.min() < -1e-4 and eig.max() > 1e-4


def test_damping_adds_identity():
  params, loss, _, batches = toy_problems.logistic_regression()
  hess = solvers.dense_hessian(loss, params, batches)
  op = curvature.curvature_operator(loss, params, batches, damping=0.3)
  np.testing.assert_allclose(toy_problems.dense_matrix(op), hess + 0.3 * np.eye(hess.shape[0]), atol=1e-10)


def test_unequal_batches_are_weighted_by_examples():
  params, loss, _, batches = toy_problems.logistic_regression(num_examples=50)
  uneven = [{k: v[:13] for k, v in batches[0].items()},
            {k: np.concatenate([batches[0][k][13:], batches[1][k]]) for k in batches[0]}]
  whole = [{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}]
  op = curvature.curvature_operator(loss, params, uneven, microbatch_size=6)
  np.testing.assert_allclose(toy_problems.dense_matrix(op), solvers.dense_hessian(loss, params, whole), atol=1e-10)


def test_gauss_newton_equals_jt_hout_j():
  params, _, _, batches = toy_problems.small_mlp_problem()
  l2 = 0.01

  def output_loss(logits, b):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), b["y"][:, None], axis=1))

  reg = lambda p: 0.5 * l2 * sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
  split = curvature.SplitLoss(lambda p, b: toy_problems.mlp_logits(p, b["x"]), output_loss, reg)
  op = curvature.curvature_operator(split, params, batches, curvature="gauss_newton")
  flat, unravel = ravel_pytree(params)
  total = sum(len(b["y"]) for b in batches)
  expected = l2 * np.eye(flat.size)
  for b in batches:
    jac = jax.jacfwd(lambda f: toy_problems.mlp_logits(unravel(f), b["x"]).reshape(-1))(flat)
    logits = toy_problems.mlp_logits(params, b["x"]).reshape(-1)
    h_out = jax.hessian(lambda o: output_loss(o.reshape(len(b["y"]), -1), b))(logits)
    expected = expected + jac.T @ h_out @ jac * (len(b["y"]) / total)
  dense = toy_problems.dense_matrix(op)
  np.testing.assert_allclose(dense, expected, atol=1e-10)
  assert np.linalg.eigvalsh(np.asarray(dense)).min() > 0  # PSD + l2
  # The split loss is still a loss_fn: its Hessian product works too.
  assert curvature.curvature_operator(split, params, batches).dim == flat.size


def test_gauss_newton_needs_split_loss():
  params, loss, _, batches = toy_problems.logistic_regression()
  with pytest.raises(TypeError, match="SplitLoss"):
    curvature.curvature_operator(loss, params, batches, curvature="gauss_newton")


def test_unknown_curvature():
  params, loss, _, batches = toy_problems.logistic_regression()
  with pytest.raises(ValueError, match="Unknown curvature 'fisher'"):
    curvature.curvature_operator(loss, params, batches, curvature="fisher")


def test_microbatches_divide_the_examples_when_a_divisor_is_near():
  assert curvature.dividing_microbatch(1080, 256) == 216  # 5 micro-batches, no remainder.
  assert curvature.dividing_microbatch(1080, 256, multiple=8) == 216
  assert curvature.dividing_microbatch(37, 8) == 8  # Prime: no divisor in [4, 8], the remainder stays.
  assert curvature.dividing_microbatch(1024, 300, multiple=4) == 256
  params, loss, _, batches = toy_problems.logistic_regression(num_examples=50)
  hess = solvers.dense_hessian(loss, params, batches)
  op = curvature.curvature_operator(loss, params, batches, microbatch_size=7)  # 50 = 10 × 5: no remainder.
  assert op.operands[2] is None and jax.tree.leaves(op.operands[1])[0].shape[:2] == (10, 5)
  np.testing.assert_allclose(toy_problems.dense_matrix(op), hess, atol=1e-10)
  whole = [{k: np.concatenate([b[k] for b in batches])[:37] for k in batches[0]}]
  op = curvature.curvature_operator(loss, params, whole, microbatch_size=8)  # 37 = 4 × 8 + 5.
  assert op.operands[2] is not None
  np.testing.assert_allclose(toy_problems.dense_matrix(op), solvers.dense_hessian(loss, params, whole), atol=1e-10)


def test_the_default_micro_batch_keeps_a_products_activations_near_the_budget(monkeypatch):
  """activation_bytes_per_example counts what the loss computes per example; the default micro-batch is the
  largest batch unless that exceeds MICROBATCH_ACTIVATION_BYTES; the product is the same either way."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 50)))
  loss = lambda p, b: jnp.mean(jnp.sum(jnp.tanh(b["x"] @ (p * w)) ** 2, axis=1))
  batch = {"x": jnp.asarray(np.random.default_rng(1).normal(size=(40, 6)))}
  per_example = curvature.activation_bytes_per_example(loss, jnp.ones((6, 50)), batch)
  assert 3 * 50 * 8 <= per_example <= 10 * 50 * 8  # Three (50,) float64 intermediates an example, and a few more.
  whole = curvature.curvature_operator(loss, jnp.ones((6, 50)), [batch])
  assert whole.matvec.micro == 40
  monkeypatch.setattr(curvature, "MICROBATCH_ACTIVATION_BYTES", 10 * per_example)
  split = curvature.curvature_operator(loss, jnp.ones((6, 50)), [batch])
  assert split.matvec.micro == 10
  v = jnp.asarray(np.random.default_rng(2).normal(size=300))
  np.testing.assert_allclose(split(v), whole(v), rtol=1e-12)
