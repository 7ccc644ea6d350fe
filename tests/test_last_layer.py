"""Closed-form last-layer influence against dense jax.hessian influence (float64, tiny)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence_jax import solvers
from influence_jax.methods import last_layer as ll

D, C, N, T = 3, 3, 14, 5


def _problem(seed=0, d=D, c=C, n=N, t=T):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n, d))
  labels = rng.integers(0, c, size=n).astype(np.int32)
  test_feats = rng.normal(size=(t, d))
  test_labels = rng.integers(0, c, size=t).astype(np.int32)
  params = {"bias": 0.3 * rng.normal(size=(c,)), "kernel": 0.5 * rng.normal(size=(d, c))}
  return feats, labels, test_feats, test_labels, params


def _per_example_ce(params, batch):
  logits = batch["x"] @ params["kernel"] + params["bias"]
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]


def _loss(l2):
  def loss(params, batch):
    return jnp.mean(_per_example_ce(params, batch)) + 0.5 * l2 * jnp.sum(ravel_pytree(params)[0] ** 2)
  return loss


def _rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_gradients_match_jax_grad_in_ravel_pytree_order():
  feats, labels, _, _, params = _problem()
  got = ll.last_layer_gradients(feats, labels, params["kernel"], params["bias"])
  flat, unravel = ravel_pytree(params)
  want = jax.jacrev(lambda f: _per_example_ce(unravel(f), {"x": feats, "y": labels}))(flat)
  assert got.shape == (N, (D + 1) * C)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  # The first C entries are the bias gradient (ravel_pytree sorts "bias" before "kernel").
  p = jax.nn.softmax(feats @ params["kernel"] + params["bias"])
  np.testing.assert_allclose(got[:, :C], p - np.eye(C)[labels], atol=1e-14)


def test_hessian_matches_jax_hessian():
  feats, labels, _, _, params = _problem()
  got = ll.last_layer_hessian(feats, labels, params["kernel"], params["bias"], l2=0.07)
  want = solvers.dense_hessian(_loss(0.07), params, [{"x": feats, "y": labels}])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  # Chunked accumulation (14 = 2·5 + 4: padded last chunk) gives the same matrix.
  chunked = ll.last_layer_hessian(feats, labels, params["kernel"], params["bias"], l2=0.07, chunk_size=5)
  np.testing.assert_allclose(chunked, want, rtol=1e-12, atol=1e-14)


def test_softmax_shift_directions_are_null_and_gradients_orthogonal():
  feats, labels, _, _, params = _problem()
  hess = ll.last_layer_hessian(feats, labels, params["kernel"], params["bias"])
  grads = ll.last_layer_gradients(feats, labels, params["kernel"], params["bias"])
  for i in range(D + 1):
    v = np.kron(np.eye(D + 1)[i], np.ones(C))
    assert np.max(np.abs(hess @ v)) < 1e-14
    assert np.max(np.abs(grads @ v)) < 1e-14
  assert np.sum(np.linalg.eigvalsh(np.asarray(hess)) < 1e-12) == D + 1


@pytest.mark.parametrize("factorization", ["cholesky", "eigh"])
@pytest.mark.parametrize("l2,damping", [(0.05, 0.0), (0.0, 0.02), (0.01, 0.03)])
def test_influence_matches_dense_exact_influence(l2, damping, factorization):
  feats, labels, tfeats, tlabels, params = _problem()
  k, b = params["kernel"], params["bias"]
  curv = ll.fit_last_layer(feats, labels, k, b, l2=l2, damping=damping, factorization=factorization)
  assert (curv.cholesky is not None) == (factorization == "cholesky")
  assert (curv.eigenvectors is not None) == (factorization == "eigh")
  g_train = ll.last_layer_gradients(feats, labels, k, b)
  g_test = ll.last_layer_gradients(tfeats, tlabels, k, b)
  got = ll.last_layer_influence(curv, g_test, g_train)
  want = solvers.exact_influence(
      _loss(l2), _per_example_ce, params, [{"x": tfeats, "y": tlabels}], [{"x": feats, "y": labels}],
      damping=damping)
  assert got.shape == (T, N)
  assert _rel_err(got, want) < 1e-8
  self_inf = ll.last_layer_self_influence(curv, g_train)
  np.testing.assert_allclose(self_inf, np.diag(ll.last_layer_influence(curv, g_train, g_train)), rtol=1e-10)
  assert np.all(self_inf > 0)
  ihvp = ll.last_layer_inverse_hvp(curv, g_train)
  hess = ll.last_layer_hessian(feats, labels, k, b, l2=l2 + damping)
  np.testing.assert_allclose(ihvp @ hess, g_train, atol=1e-10)


def test_zero_regularization_is_the_pseudo_inverse_limit():
  feats, labels, tfeats, tlabels, params = _problem(seed=1)
  k, b = params["kernel"], params["bias"]
  curv = ll.fit_last_layer(feats, labels, k, b, l2=0.0)  # "auto": eigh, the pseudo-inverse
  with pytest.raises(ValueError, match="Cholesky factorization needs l2 \\+ damping > 0"):
    ll.fit_last_layer(feats, labels, k, b, l2=0.0, factorization="cholesky")
  assert int(np.sum(curv.inverse_eigenvalues == 0)) == D + 1  # the softmax shift directions
  g_train = ll.last_layer_gradients(feats, labels, k, b)
  g_test = ll.last_layer_gradients(tfeats, tlabels, k, b)
  got = ll.last_layer_influence(curv, g_test, g_train)
  hess = np.asarray(ll.last_layer_hessian(feats, labels, k, b))
  pinv = np.linalg.pinv(hess, rcond=1e-10, hermitian=True)
  assert _rel_err(got, g_test @ pinv @ g_train.T) < 1e-8
  tiny_l2 = ll.last_layer_influence(ll.fit_last_layer(feats, labels, k, b, l2=1e-9), g_test, g_train)
  assert _rel_err(tiny_l2, got) < 1e-6


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4)(x))
    return nn.Dense(C)(h)


def test_frozen_body_mlp_equals_influence_of_model_with_constant_body():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(N, 2)), rng.integers(0, C, size=N).astype(np.int32)
  tx, ty = rng.normal(size=(T, 2)), rng.integers(0, C, size=T).astype(np.int32)
  model = _MLP()
  variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(0), x))
  head = variables["params"]["Dense_1"]
  assert set(head) == {"bias", "kernel"}
  l2 = 0.03

  def with_head(head_params):
    return {"params": {**variables["params"], "Dense_1": head_params}}

  def per_example(head_params, batch):  # the body (Dense_0) is a constant
    logp = jax.nn.log_softmax(model.apply(with_head(head_params), batch["x"]))
    return -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]

  def loss(head_params, batch):
    return jnp.mean(per_example(head_params, batch)) + 0.5 * l2 * jnp.sum(ravel_pytree(head_params)[0] ** 2)

  want = solvers.exact_influence(loss, per_example, head, [{"x": tx, "y": ty}], [{"x": x, "y": y}])

  body = variables["params"]["Dense_0"]
  features = lambda inp: np.tanh(inp @ body["kernel"] + body["bias"])
  k, b = head["kernel"], head["bias"]
  curv = ll.fit_last_layer(features(x), y, k, b, l2=l2)
  got = ll.last_layer_influence(
      curv, ll.last_layer_gradients(features(tx), ty, k, b), ll.last_layer_gradients(features(x), y, k, b))
  assert _rel_err(got, want) < 1e-8

  # The head block of the full model's Hessian is the closed-form Hessian.
  def full_loss(params, batch):
    logp = jax.nn.log_softmax(model.apply({"params": params}, batch["x"]))
    ce = -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]
    return jnp.mean(ce) + 0.5 * l2 * jnp.sum(ravel_pytree(params["Dense_1"])[0] ** 2)

  full = solvers.dense_hessian(full_loss, variables["params"], [{"x": x, "y": y}])
  n_body = ravel_pytree(body)[0].size  # ravel_pytree order: Dense_0 then Dense_1
  np.testing.assert_allclose(full[n_body:, n_body:], ll.last_layer_hessian(features(x), y, k, b, l2=l2),
                             rtol=1e-10, atol=1e-13)


def test_jit_of_the_whole_pipeline_matches_eager():
  feats, labels, tfeats, tlabels, params = _problem()
  k, b = params["kernel"], params["bias"]

  def pipeline(f, tf, k, b):
    curv = ll.fit_last_layer(f, labels, k, b, l2=0.05)
    return ll.last_layer_influence(
        curv, ll.last_layer_gradients(tf, tlabels, k, b), ll.last_layer_gradients(f, labels, k, b))

  np.testing.assert_allclose(jax.jit(pipeline)(feats, tfeats, k, b), pipeline(feats, tfeats, k, b), rtol=1e-10)


def test_float32_matches_float64_with_small_l2():
  # No real curvature direction is cut off in float32 (only rounding-level eigenvalues count as 0).
  feats, labels, tfeats, tlabels, params = _problem(seed=4, d=6, c=4, n=60)
  feats, tfeats = 4 * feats, 4 * tfeats  # max curvature μ ≈ 4, float32 rounding of μ ≈ 5e-7
  feats[:, 0] *= 3e-3  # real curvature eigenvalues ≈ 1e-5: above rounding, below 10·P·eps·max μ
  f32 = lambda a: np.asarray(a, np.float32)

  def scores(cast):
    k, b = cast(params["kernel"]), cast(params["bias"])
    curv = ll.fit_last_layer(cast(feats), labels, k, b, l2=1e-4)
    g = ll.last_layer_gradients(cast(feats), labels, k, b)
    return ll.last_layer_influence(curv, ll.last_layer_gradients(cast(tfeats), tlabels, k, b), g)

  s32, s64 = scores(f32), scores(np.asarray)
  assert s32.dtype == jnp.float32 and s64.dtype == jnp.float64
  assert _rel_err(s32, s64) < 1e-2  # measured 1.4e-3; clipping μ below 10·P·eps·max μ gave 7e-2
  # With l2 > 0 nothing is cut off: the softmax shift directions get 1/l2 (the exact inverse), even
  # with l2 below 10·P·eps·max μ (≈ 1.5e-4 here); float32 rounding of μ is ≈ 5e-7, so ≈ 0.5% error.
  curv = ll.fit_last_layer(f32(feats), labels, f32(params["kernel"]), f32(params["bias"]), l2=1e-4)
  shift = np.kron(np.eye(7)[:2], np.ones(4) / 2.0).astype(np.float32)
  got = np.asarray(ll.last_layer_inverse_hvp(curv, shift))
  assert np.linalg.norm(got - shift / 1e-4) < 2e-2 * np.linalg.norm(shift / 1e-4)


def test_bad_inputs_raise_clear_errors():
  feats, labels, _, _, params = _problem()
  k, b = params["kernel"], params["bias"]
  with pytest.raises(ValueError, match="features must have shape"):
    ll.last_layer_gradients(feats[:, :2], labels, k, b)
  with pytest.raises(ValueError, match="bias must have shape"):
    ll.last_layer_gradients(feats, labels, k, b[:2])
  with pytest.raises(ValueError, match="labels must have shape"):
    ll.last_layer_gradients(feats, labels[:3], k, b)
  with pytest.raises(TypeError, match="integer"):
    ll.last_layer_gradients(feats, labels.astype(float), k, b)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    ll.last_layer_gradients(feats, labels + 3, k, b)
  bad = feats.copy()
  bad[2, 1] = np.nan
  with pytest.raises(ValueError, match="features has non-finite"):
    ll.fit_last_layer(bad, labels, k, b, l2=0.1)
  with pytest.raises(ValueError, match=r"\['kernel'\]"):
    ll.fit_last_layer(feats, labels, k * np.inf, b, l2=0.1)
  with pytest.raises(ValueError, match="l2 and damping"):
    ll.fit_last_layer(feats, labels, k, b, l2=-1.0)
  with pytest.raises(ValueError, match="factorization must be one of"):
    ll.fit_last_layer(feats, labels, k, b, l2=0.1, factorization="qr")
  curv = ll.fit_last_layer(feats, labels, k, b, l2=0.1)
  g = ll.last_layer_gradients(feats, labels, k, b)
  with pytest.raises(ValueError, match="test_grads has 5 columns"):
    ll.last_layer_influence(curv, g[:, :5], g)
  with pytest.raises(ValueError, match="train_grads must be a"):
    ll.last_layer_influence(curv, g, g[0])
