"""GIF / FIF / PIF / IF updates against dense float64 closed forms, and IF against exact retraining."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence_jax import curvature, solvers
from influence_jax.methods import gif_selection
from influence_jax.methods import gif_updates
from tests import toy_problems

TIGHT = dict(tol=1e-13, max_iters=3000)


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(nn.Dense(5, param_dtype=jnp.float64)(x)))


def _per_example_ce(logits, y):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]


@pytest.fixture(scope="module")
def problem():
  """A 38-parameter tanh MLP part-way through training, so its Hessian is indefinite."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 3))
  y = rng.integers(0, 3, size=40).astype(np.int32)
  model = _MLP()
  params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
  # A small L2 term removes the null direction of softmax (a shift of every output bias).
  l2 = lambda p: 5e-3 * sum(jnp.sum(a ** 2) for a in jax.tree.leaves(p))
  per_example = lambda p, b: _per_example_ce(model.apply({"params": p}, b["x"]), b["y"]) + l2(p)
  loss_fn = lambda p, b: jnp.mean(per_example(p, b))
  full = {"x": x, "y": y}
  grad = jax.jit(jax.grad(loss_fn))
  for _ in range(30):
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grad(params, full))
  removed = [{"x": x[:4], "y": y[:4]}]
  remaining = [{"x": x[4:22], "y": y[4:22]}, {"x": x[22:], "y": y[22:]}]
  g = gif_updates.removal_gradient(per_example, params, removed, num_remaining=36)
  op = curvature.curvature_operator(loss_fn, params, remaining)
  hess = np.asarray(jax.jit(lambda p: solvers.dense_hessian(loss_fn, p, remaining))(params))
  return dict(params=params, g=g, op=op, hess=hess, g_flat=np.asarray(ravel_pytree(g)[0]), loss_fn=loss_fn,
              per_example=per_example, removed=removed, remaining=remaining)


def _random_masks(params, count, seed):
  flat, unravel = ravel_pytree(params)
  rng = np.random.default_rng(seed)
  masks = []
  for _ in range(count):
    m = rng.random(flat.size) < rng.uniform(0.2, 0.7)
    masks.append(jax.tree.map(lambda a: np.asarray(a) > 0.5, unravel(jnp.asarray(m, flat.dtype))))
  return masks


def _idx(mask):
  return np.flatnonzero(ravel_pytree(jax.tree.map(lambda m: jnp.asarray(m, jnp.float64), mask))[0])


def _flat(delta):
  return np.asarray(ravel_pytree(delta)[0])


def test_hessian_is_indefinite_and_operator_matches_it(problem):
  eig = np.linalg.eigvalsh(problem["hess"])
  assert eig.min() < -1e-3 * eig.max() and eig.max() > 0
  assert np.abs(eig).min() > 1e-8  # nonsingular: H⁻¹g is defined
  np.testing.assert_allclose(np.asarray(toy_problems.dense_matrix(problem["op"])), problem["hess"], atol=1e-10)


def test_gif_is_the_least_squares_solution_and_satisfies_the_block_equations(problem):
  h, g = problem["hess"], problem["g_flat"]
  for mask in _random_masks(problem["params"], 4, seed=0):
    t = _idx(mask)
    f = np.setdiff1d(np.arange(h.shape[0]), t)
    upd = gif_updates.gif_update(problem["op"], problem["g"], mask, **TIGHT)
    d = _flat(upd.delta)
    assert np.all(d[f] == 0.0)
    expected = np.linalg.lstsq(h[:, t], g, rcond=None)[0]
    np.testing.assert_allclose(d[t], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    htt, htf = h[np.ix_(t, t)], h[np.ix_(t, f)]
    lhs = (htt @ htt + htf @ htf.T) @ d[t]
    rhs = htt @ g[t] + htf @ g[f]
    np.testing.assert_allclose(lhs, rhs, atol=1e-6 * np.abs(rhs).max())
    np.testing.assert_allclose(float(upd.residual_norm), np.linalg.norm(h[:, t] @ d[t] - g), rtol=1e-8)
    np.testing.assert_allclose(float(upd.relative_residual), float(upd.residual_norm) / np.linalg.norm(g))


def test_gif_on_all_parameters_is_the_inverse_hessian_update(problem):
  h, g = problem["hess"], problem["g_flat"]
  mask = gif_selection.full_mask(problem["params"])
  exact = np.linalg.solve(h, g)
  d = _flat(gif_updates.gif_update(problem["op"], problem["g"], mask, **TIGHT).delta)
  np.testing.assert_allclose(d, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
  d_if = _flat(gif_updates.if_update(problem["op"], problem["g"], **TIGHT).delta)
  np.testing.assert_allclose(d_if, exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


def test_fif_and_pif_match_their_closed_forms(problem):
  h, g = problem["hess"], problem["g_flat"]
  full = np.linalg.solve(h, g)
  indefinite = 0
  for mask in _random_masks(problem["params"], 3, seed=1):
    t = _idx(mask)
    htt = h[np.ix_(t, t)]
    assert np.abs(np.linalg.eigvalsh(htt)).min() > 1e-8
    indefinite += np.linalg.eigvalsh(htt).min() < 0
    fif = _flat(gif_updates.fif_update(problem["op"], problem["g"], mask, **TIGHT).delta)
    expected = np.linalg.solve(htt, g[t])
    np.testing.assert_allclose(fif[t], expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    pif = _flat(gif_updates.pif_update(problem["op"], problem["g"], mask, **TIGHT).delta)
    np.testing.assert_allclose(pif[t], full[t], rtol=1e-6, atol=1e-6 * np.abs(full).max())
    outside = np.setdiff1d(np.arange(h.shape[0]), t)
    assert np.all(fif[outside] == 0.0) and np.all(pif[outside] == 0.0)
  assert indefinite > 0  # the default solver (CG on H_TT²) handles an indefinite H_TT


def test_fif_plain_cg_with_damping_matches_damped_closed_form(problem):
  damping = 2.0 * abs(np.linalg.eigvalsh(problem["hess"]).min()) + 0.1
  op = curvature.curvature_operator(problem["loss_fn"], problem["params"], problem["remaining"], damping=damping)
  mask = _random_masks(problem["params"], 1, seed=2)[0]
  t = _idx(mask)
  upd = gif_updates.fif_update(op, problem["g"], mask, solver="cg", **TIGHT)
  assert bool(upd.converged)
  htt = problem["hess"][np.ix_(t, t)] + damping * np.eye(t.size)
  np.testing.assert_allclose(_flat(upd.delta)[t], np.linalg.solve(htt, problem["g_flat"][t]), rtol=1e-7)


def test_gif_residual_is_no_larger_than_fif_or_pif(problem):
  for mask in _random_masks(problem["params"], 6, seed=3):
    r_gif = float(gif_updates.gif_update(problem["op"], problem["g"], mask, **TIGHT).residual_norm)
    r_fif = float(gif_updates.fif_update(problem["op"], problem["g"], mask, **TIGHT).residual_norm)
    r_pif = float(gif_updates.pif_update(problem["op"], problem["g"], mask, **TIGHT).residual_norm)
    assert r_gif <= r_fif * (1 + 1e-8) and r_gif <= r_pif * (1 + 1e-8)
    assert r_gif < min(r_fif, r_pif)  # strictly better on a random mask


def test_update_rejects_bad_input(problem):
  mask = gif_selection.full_mask(problem["params"])
  with pytest.raises(ValueError, match="selects no parameter"):
    gif_updates.gif_update(problem["op"], problem["g"], jax.tree.map(lambda m: ~m, mask))
  bad = jax.tree.map(lambda x: x, mask)
  bad["Dense_0"]["bias"] = np.ones(7, bool)
  with pytest.raises(ValueError, match="Dense_0.*bias"):
    gif_updates.gif_update(problem["op"], problem["g"], bad)
  with pytest.raises(ValueError, match="solver"):
    gif_updates.fif_update(problem["op"], problem["g"], mask, solver="lissa")
  with pytest.raises(TypeError, match="LinearOperator"):
    gif_updates.gif_update(problem["hess"], problem["g"], mask)


# ---------------------------------------------------------------------------
# First-order sanity against exact retraining on a convex model.

LAM = 1e-2


def _softmax_regression(n=200, d=4, k=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  w_true = rng.normal(size=(d, k))
  y = np.argmax(x @ w_true + rng.gumbel(size=(n, k)), -1).astype(np.int32)

  def per_example(p, b):  # the L2 term inside each example's loss: loss_fn = mean(per_example)
    logits = b["x"] @ p["w"] + p["b"]
    reg = 0.5 * LAM * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))
    return _per_example_ce(logits, b["y"]) + reg

  loss_fn = lambda p, b: jnp.mean(per_example(p, b))
  return x, y, per_example, loss_fn, {"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}


def _newton_fit(loss_fn, params, batch, steps=30):
  flat, unravel = ravel_pytree(params)
  f = lambda v: loss_fn(unravel(v), batch)
  step = jax.jit(lambda v: v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v)))
  for _ in range(steps):
    flat = step(flat)
  assert float(jnp.linalg.norm(jax.grad(f)(flat))) < 1e-12
  return unravel(flat)


def test_removal_update_matches_exact_retraining_on_convex_model():
  x, y, per_example, loss_fn, init = _softmax_regression()
  theta = _newton_fit(loss_fn, init, {"x": x, "y": y})
  keep = np.arange(3, len(y))
  remaining = {"x": x[keep], "y": y[keep]}
  retrained = _newton_fit(loss_fn, theta, remaining)
  g = gif_updates.removal_gradient(per_example, theta, [{"x": x[:3], "y": y[:3]}], num_remaining=keep.size)
  op = curvature.curvature_operator(loss_fn, theta, [remaining])
  upd = gif_updates.if_update(op, g, solver="cg", tol=1e-12)
  true_shift = _flat(retrained) - _flat(theta)
  err = np.linalg.norm(_flat(upd.delta) - true_shift) / np.linalg.norm(true_shift)
  assert err < 0.05, err
  # The opposite sign would be off by about 200%: the sign convention is checked.
  assert np.linalg.norm(-_flat(upd.delta) - true_shift) / np.linalg.norm(true_shift) > 1.5
  # GIF on all parameters gives the same edit.
  d_gif = _flat(gif_updates.gif_update(op, g, gif_selection.full_mask(theta), tol=1e-12).delta)
  np.testing.assert_allclose(d_gif, _flat(upd.delta), rtol=1e-5, atol=1e-9)


def test_label_change_update_matches_exact_retraining_on_convex_model():
  x, y, per_example, loss_fn, init = _softmax_regression(seed=1)
  wrong_y = y.copy()
  wrong_y[:3] = (y[:3] + 1) % 3
  theta = _newton_fit(loss_fn, init, {"x": x, "y": wrong_y})
  corrected = {"x": x, "y": y}
  retrained = _newton_fit(loss_fn, theta, corrected)
  g = gif_updates.label_change_gradient(per_example, theta, [{"x": x[:3], "y": wrong_y[:3]}],
                                [{"x": x[:3], "y": y[:3]}], num_examples=len(y))
  op = curvature.curvature_operator(loss_fn, theta, [corrected])
  upd = gif_updates.if_update(op, g, solver="cg", tol=1e-12)
  true_shift = _flat(retrained) - _flat(theta)
  err = np.linalg.norm(_flat(upd.delta) - true_shift) / np.linalg.norm(true_shift)
  assert err < 0.05, err
  params_edited = gif_updates.apply_update(theta, upd)
  np.testing.assert_allclose(_flat(params_edited), _flat(theta) + _flat(upd.delta))
