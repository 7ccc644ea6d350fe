"""Classification influence: margins, their gradients, and dm(x)/dε by retraining (float64, tiny)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence_jax.methods import classification as cl
from influence_jax.methods import last_layer as ll
from tests import toy_problems

D, C, N, T, L2 = 2, 3, 15, 6, 0.05


def _data(seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(scale=1.5, size=(C, D))
  y = rng.integers(0, C, size=N).astype(np.int32)
  x = centers[y] + rng.normal(size=(N, D))
  ty = rng.integers(0, C, size=T).astype(np.int32)
  tx = centers[ty] + rng.normal(size=(T, D))
  return x, y, tx, ty


def _logits(params, batch):
  return batch["x"] @ params["kernel"] + params["bias"]


def _per_example_ce(params, batch):
  logp = jax.nn.log_softmax(_logits(params, batch))
  return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]


def _loss(params, batch):
  return jnp.mean(_per_example_ce(params, batch)) + 0.5 * L2 * jnp.sum(ravel_pytree(params)[0] ** 2)


def _template():
  return {"bias": np.zeros(C), "kernel": np.zeros((D, C))}


def _newton_fit(x, y, upweight_index=None, eps=0.0):
  """Minimises mean CE + eps·ℓ(z) + (L2/2)‖θ‖² by Newton's method to machine precision."""
  flat0, unravel = ravel_pytree(_template())
  batch = {"x": x, "y": y}

  def objective(f):
    obj = _loss(unravel(f), batch)
    if upweight_index is not None:
      obj = obj + eps * _per_example_ce(unravel(f), batch)[upweight_index]
    return obj

  return unravel(toy_problems.newton_to_tolerance(objective, flat0, tol=1e-15, final_tol=1e-13))


def test_margin_and_its_logit_gradient():
  logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.5, 3.0, -1.0]])
  labels = jnp.array([0, 2, 1], jnp.int32)
  np.testing.assert_allclose(cl.margin(logits, labels), [1.0, -2.0, 2.5])
  np.testing.assert_array_equal(cl.runner_up(logits, labels), [1, 0, 0])
  g = jax.vmap(jax.grad(lambda lg, y: cl.margin(lg[None], y[None])[0]))(logits, labels)
  np.testing.assert_allclose(cl.margin_logit_gradients(logits, labels), g)


def test_last_layer_margin_gradients_match_jax():
  x, y, tx, ty = _data()
  params = _newton_fit(x, y)
  got = cl.last_layer_margin_gradients(tx, ty, params["kernel"], params["bias"])
  want = cl.per_example_margin_gradients(_logits, params, [{"x": tx, "y": ty}])
  assert got.shape == (T, (D + 1) * C)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_classification_influence_is_d_margin_d_epsilon_by_retraining():
  x, y, tx, ty = _data()
  params = _newton_fit(x, y)
  k, b = params["kernel"], params["bias"]
  curv = ll.fit_last_layer(x, y, k, b, l2=L2)
  g_train = ll.last_layer_gradients(x, y, k, b)
  cls = cl.last_layer_classification_influence(curv, cl.last_layer_margin_gradients(tx, ty, k, b), g_train)
  score = ll.last_layer_influence(curv, ll.last_layer_gradients(tx, ty, k, b), g_train)
  dense = cl.exact_classification_influence(
      _loss, _per_example_ce, _logits, params, [{"x": tx, "y": ty}], [{"x": x, "y": y}])
  np.testing.assert_allclose(cls, dense, rtol=1e-9, atol=1e-12)

  test_batch = {"x": tx, "y": ty}
  eps = 1e-4
  for z in (0, 4, 11):
    plus, minus = _newton_fit(x, y, z, eps), _newton_fit(x, y, z, -eps)
    dm = (cl.margin(_logits(plus, test_batch), ty) - cl.margin(_logits(minus, test_batch), ty)) / (2 * eps)
    dloss = (_per_example_ce(plus, test_batch) - _per_example_ce(minus, test_batch)) / (2 * eps)
    np.testing.assert_allclose(cls[:, z], dm, rtol=1e-5, atol=1e-5 * np.max(np.abs(dm)))  # measured 2e-7
    # docs/design.md, "What a score means": upweighting z changes the loss on x by −ε·score(z, x).
    np.testing.assert_allclose(-score[:, z], dloss, rtol=1e-3, atol=1e-3 * np.max(np.abs(dloss)))
    assert np.max(np.abs(dm)) > 1e-3  # the check is not vacuous


def test_positive_classification_influence_means_more_correct():
  # Self-classification influence of a training point is mostly positive: upweighting z helps classify z.
  x, y, _, _ = _data(seed=2)
  params = _newton_fit(x, y)
  k, b = params["kernel"], params["bias"]
  curv = ll.fit_last_layer(x, y, k, b, l2=L2)
  cls = cl.last_layer_classification_influence(
      curv, cl.last_layer_margin_gradients(x, y, k, b), ll.last_layer_gradients(x, y, k, b))
  assert np.mean(np.diag(cls) > 0) > 0.8


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="a margin needs C ≥ 2"):
    cl.margin(jnp.zeros((3, 1)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="labels must have shape"):
    cl.margin(jnp.zeros((3, 4)), jnp.zeros(2, jnp.int32))
  with pytest.raises(TypeError, match="integer"):
    cl.margin(jnp.zeros((3, 4)), jnp.zeros(3))
  x, y, _, _ = _data()
  with pytest.raises(ValueError, match="features has non-finite"):
    cl.last_layer_margin_gradients(np.where(x > 1, np.inf, x), y, np.zeros((D, C)), np.zeros(C))
