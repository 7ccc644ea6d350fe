"""Influence scores against exact dense influence (float64)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from influence_jax import eigenspace as eigenspace_lib
from influence_jax import preconditioning, projection, scoring, solvers
from influence_jax.methods import classification, memorization
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


def test_negative_damping_is_refused_by_every_scoring_entry_point(logreg):
  params, loss, per_example, batches, test = logreg
  es = ij.fit_eigenspace(loss, params, batches, n_iters=8, top_k=4, damping=0.01)
  tp, qp = ij.project(es, per_example, params, batches), ij.project(es, per_example, params, test)
  dots = qp @ tp.T
  g = solvers.gradient_matrix(per_example, params, test)
  op = ij.curvature_operator(loss, params, batches)
  outputs = lambda p, b: jnp.stack([jnp.zeros(b["x"].shape[0]), b["x"] @ p["w"] + p["b"]], axis=1)
  batches = [dict(b, y=b["y"].astype(np.int32)) for b in batches]  # Class labels for the margin.
  test = [dict(b, y=b["y"].astype(np.int32)) for b in test]
  calls = {
      "influence_scores": lambda d: ij.influence_scores(es, qp, tp, damping=d),
      "influence_scores_with_tail": lambda d: ij.influence_scores_with_tail(es, qp, tp, dots, damping=d),
      "self_influence": lambda d: ij.self_influence(es, tp, damping=d),
      "query_side": lambda d: scoring.query_side(es, qp, damping=d),
      "influence": lambda d: ij.influence(es, per_example, params, test, batches, damping=d),
      "influence with the tail": lambda d: ij.influence(es, per_example, params, test, batches, tail=True, damping=d),
      "preconditioned influence": lambda d: ij.influence(es, per_example, params, test, batches, tail=True,
                                                         loss_fn=loss, curvature_batches=batches, damping=d),
      "preconditioned_solve": lambda d: preconditioning.preconditioned_solve(op, es, g, cg_iters=2, damping=d),
      "default_tail_constant": lambda d: eigenspace_lib.default_tail_constant(es, d),
      "eigenspace_memorization": lambda d: memorization.eigenspace_memorization(
          es, per_example, outputs, params, batches, test, damping=d, tail=True),
      "exact_influence": lambda d: solvers.exact_influence(loss, per_example, params, test, batches, damping=d),
      "exact_classification_influence": lambda d: classification.exact_classification_influence(
          loss, per_example, outputs, params, test, batches, damping=d),
      "a damped eigenspace": lambda d: ij.influence_scores(es.replace(damping=d), qp, tp),
  }
  for name, call in calls.items():
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(call(0.5))[0]))), name
    with pytest.raises(ValueError, match=r"damping δ must be finite and ≥ 0, got -0.5"):
      call(-0.5)
      raise AssertionError(f"{name} accepted a negative damping")


def test_a_non_positive_shifted_eigenvalue_is_refused_unless_kept_by_magnitude(logreg):
  params, loss, per_example, batches, test = logreg
  es = ij.fit_eigenspace(loss, params, batches, n_iters=8, top_k=4)
  tp = ij.project(es, per_example, params, batches)
  negative = es.replace(eigenvalues=es.eigenvalues.at[-1].set(-1.0))  # The last pair: λ + δ = −1.
  with pytest.raises(ValueError, match=r"Eigenvalue 3 \+ damping is -1.0 .*kept by value"):
    ij.self_influence(negative, tp)
  by_magnitude = negative.replace(info=dataclasses.replace(es.info, selection="magnitude"))
  np.testing.assert_allclose(eigenspace_lib.inverse_eigenvalues(by_magnitude)[-1], -1.0)
