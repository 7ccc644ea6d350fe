"""Bad input raises clear errors that name the problem."""

import jax.numpy as jnp
import numpy as np
import pytest

import influence_jax as ij
from tests import toy_problems


@pytest.fixture(scope="module")
def problem():
  return toy_problems.logistic_regression()


def test_nonfinite_params_name_the_leaf(problem):
  params, loss, _, batches = problem
  bad = dict(params, w=params["w"].at[2].set(jnp.nan))
  with pytest.raises(ValueError, match=r"params has non-finite.*\['w'\]"):
    ij.fit_eigenspace(loss, bad, batches, n_iters=3, top_k=2)


def test_nonfinite_loss(problem):
  params, loss, _, batches = problem
  nan_batches = [dict(b, x=np.full_like(b["x"], np.inf)) for b in batches]
  with pytest.raises(ValueError, match="not finite"):
    ij.fit_eigenspace(loss, params, nan_batches, n_iters=3, top_k=2)


def test_top_k_larger_than_n_iters(problem):
  params, loss, _, batches = problem
  with pytest.raises(ValueError, match=r"top_k \(5\) cannot exceed n_iters \(3\)"):
    ij.fit_eigenspace(loss, params, batches, n_iters=3, top_k=5)


def test_empty_batches(problem):
  params, loss, per_example, batches = problem
  with pytest.raises(ValueError, match="batches is empty"):
    ij.fit_eigenspace(loss, params, [], n_iters=3, top_k=2)
  with pytest.raises(ValueError, match="holds no examples"):
    ij.fit_eigenspace(loss, params, [{"x": np.zeros((0, 5)), "y": np.zeros(0)}], n_iters=3, top_k=2)
  es = ij.fit_eigenspace(loss, params, batches, n_iters=3, top_k=2)
  with pytest.raises(ValueError, match="empty"):
    ij.project(es, per_example, params, [])
  with pytest.raises(ValueError, match="test_batches is empty"):
    ij.influence(es, per_example, params, [], batches)


def test_mismatched_structures(problem):
  params, loss, per_example, batches = problem
  es = ij.fit_eigenspace(loss, params, batches, n_iters=3, top_k=2)
  with pytest.raises(ValueError, match=r"missing leaves \[\"\['b'\]\"\]"):
    ij.project(es, per_example, {"w": params["w"], "c": params["b"]}, batches)
  with pytest.raises(ValueError, match=r"params leaf \['w'\] has shape \(6,\)"):
    ij.project(es, per_example, {"w": jnp.zeros(6), "b": params["b"]}, batches)
  with pytest.raises(ValueError, match=r"batches\[1\] has pytree structure"):
    ij.fit_eigenspace(loss, params, [batches[0], {"x": batches[1]["x"]}], n_iters=3, top_k=2)
  with pytest.raises(ValueError, match="disagree on the number of examples"):
    ij.fit_eigenspace(loss, params, [{"x": batches[0]["x"], "y": batches[0]["y"][:3]}], n_iters=3, top_k=2)
  with pytest.raises(ValueError, match="expected \\(num_examples, 2\\)"):
    ij.influence_scores(es, jnp.zeros((3, 4)), jnp.zeros((5, 2)))


def test_bad_settings(problem):
  params, loss, _, batches = problem
  with pytest.raises(ValueError, match="Unknown selection"):
    ij.fit_eigenspace(loss, params, batches, n_iters=3, top_k=2, selection="smallest")
  with pytest.raises(ValueError, match="damping"):
    ij.fit_eigenspace(loss, params, batches, n_iters=3, top_k=2, damping=-1.0)
  with pytest.raises(ValueError, match="n_iters"):
    ij.fit_eigenspace(loss, params, batches, n_iters=0, top_k=1)
  with pytest.raises(ValueError, match="scalar"):
    ij.fit_eigenspace(lambda p, b: jnp.zeros(2), params, batches, n_iters=3, top_k=1)
