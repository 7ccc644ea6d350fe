"""Editing tasks: update dispatch, line search, metrics, and edits against exact retraining on a convex model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence_jax import curvature
from influence_jax.methods import gif_steps
from influence_jax.methods import gif_tasks
from influence_jax.methods import gif_updates
from tests import toy_problems

LAM = 1e-2


def _flat(t):
  return np.asarray(ravel_pytree(t)[0])


def _logits(p, x):
  return x @ p["w"] + p["b"]


def _per_example(p, b):
  ce = jax.nn.logsumexp(_logits(p, b["x"]), -1) - jnp.take_along_axis(_logits(p, b["x"]), b["y"][:, None], 1)[:, 0]
  return ce + 0.5 * LAM * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))


def _loss(p, b):
  return jnp.mean(_per_example(p, b))


def _newton_fit(params, batch, steps=30):
  flat, unravel = ravel_pytree(params)
  f = lambda v: _loss(unravel(v), batch)
  step = jax.jit(lambda v: v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v)))
  for _ in range(steps):
    flat = step(flat)
  return unravel(flat)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  n, d, k = 240, 4, 4
  x = rng.normal(size=(n, d))
  y = np.argmax(x @ rng.normal(size=(d, k)) + rng.gumbel(size=(n, k)), -1).astype(np.int32)
  # Class 3 is rare, so removing it is a small edit where first order is accurate.
  keep = (y != 3) | (np.arange(n) < 40)
  x, y = x[keep], y[keep]
  params = _newton_fit({"w": jnp.zeros((d, k)), "b": jnp.zeros(k)}, {"x": x, "y": y})
  return x, y, params


def test_class_removal_edit_if_matches_retraining_and_line_search_is_argmin(data):
  x, y, theta = data
  n_removed = int((y == 3).sum())
  assert 0 < n_removed <= 0.05 * y.size
  retrained = _newton_fit(theta, {"x": x[y != 3], "y": y[y != 3]})
  res = gif_tasks.class_removal_edit(_per_example, theta, {"x": x, "y": y}, 3, method="if", scales=(1.0,),
                                     solver="cg", tol=1e-12)
  # The edit is exactly θ + H⁻¹g with g over the class and H on the remaining examples.
  remaining = {"x": x[y != 3], "y": y[y != 3]}
  g = gif_updates.removal_gradient(_per_example, theta, [{"x": x[y == 3], "y": y[y == 3]}], num_remaining=y.size - n_removed)
  op = curvature.curvature_operator(_loss, theta, [remaining])
  np.testing.assert_allclose(_flat(res.update.delta), _flat(gif_updates.if_update(op, g, solver="cg", tol=1e-12).delta),
                             rtol=1e-8, atol=1e-12)
  # Forgetting a whole class is not a small edit (its bias falls far): first order gets the
  # direction and most of the length, not the exact retrained parameters.
  true_shift = _flat(retrained) - _flat(theta)
  shift = _flat(res.params) - _flat(theta)
  assert shift @ true_shift / np.linalg.norm(shift) / np.linalg.norm(true_shift) > 0.9
  assert np.linalg.norm(shift - true_shift) < 0.5 * np.linalg.norm(true_shift)
  # With the line search: the chosen scale minimises the remaining-set loss over the grid.
  res2 = gif_tasks.class_removal_edit(_per_example, theta, {"x": x, "y": y}, 3, method="if", solver="cg", tol=1e-12)
  losses = [float(_loss(gif_updates.apply_update(theta, res2.update, s), remaining)) for s in gif_steps.DEFAULT_SCALES]
  np.testing.assert_allclose(res2.scale_losses, losses, rtol=1e-10)
  assert res2.scale == gif_steps.DEFAULT_SCALES[int(np.argmin(losses))]
  assert min(losses) < losses[gif_steps.DEFAULT_SCALES.index(1.0)]  # the search does better than scale 1 here
  assert np.linalg.norm(_flat(res2.params) - _flat(retrained)) < np.linalg.norm(shift - true_shift)


def _relabelled_fit(data):
  """Returns (x, y, changed, wrong labels, θ fitted to them): rows 0, 5, 9 relabelled to the next class."""
  x, y, _ = data
  changed = np.zeros(y.size, bool)
  changed[[0, 5, 9]] = True
  wrong = y.copy()
  wrong[changed] = (y[changed] + 1) % 4
  return x, y, changed, wrong, _newton_fit({"w": jnp.zeros((4, 4)), "b": jnp.zeros(4)}, {"x": x, "y": wrong})


def test_label_change_edit_if_matches_retraining(data):
  x, y, changed, wrong, theta = _relabelled_fit(data)
  retrained = _newton_fit(theta, {"x": x, "y": y})
  res = gif_tasks.label_change_edit(_per_example, theta, {"x": x, "y": wrong}, changed, y[changed], method="if",
                                    scales=(1.0,), solver="cg", tol=1e-12)
  true_shift = _flat(retrained) - _flat(theta)
  assert np.linalg.norm(_flat(res.params) - _flat(retrained)) < 0.1 * np.linalg.norm(true_shift)


def test_influence_update_dispatches_to_each_method(data):
  x, y, theta = data
  op = curvature.curvature_operator(_loss, theta, [{"x": x, "y": y}])
  g = gif_updates.removal_gradient(_per_example, theta, [{"x": x[:3], "y": y[:3]}], num_remaining=y.size - 3)
  mask = {"w": np.zeros((4, 4), bool), "b": np.ones(4, bool)}
  mask["w"][:, 1] = True
  for name, fn in [("gif", gif_updates.gif_update), ("fif", gif_updates.fif_update), ("pif", gif_updates.pif_update)]:
    np.testing.assert_allclose(_flat(gif_tasks.influence_update(name, op, g, mask, tol=1e-12).delta),
                               _flat(fn(op, g, mask, tol=1e-12).delta), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(_flat(gif_tasks.influence_update("if", op, g, tol=1e-12).delta),
                             _flat(gif_updates.if_update(op, g, tol=1e-12).delta), rtol=1e-12, atol=1e-15)
  with pytest.raises(ValueError, match="needs a target mask"):
    gif_tasks.influence_update("gif", op, g)
  with pytest.raises(ValueError, match="Unknown method"):
    gif_tasks.influence_update("tracin", op, g, mask)


def test_line_search_minimises_the_objective_over_the_grid():
  params = {"a": jnp.array([1.0, 2.0])}
  delta = {"a": jnp.array([1.0, -1.0])}
  target = np.array([2.5, 0.5])  # = params + 1.5 · delta
  obj = lambda p: jnp.sum((p["a"] - target) ** 2)
  scale, values = gif_steps.line_search(obj, params, delta, (0.0, 1.0, 1.5, 2.0))
  assert scale == 1.5
  np.testing.assert_allclose(values, [4.5, 0.5, 0.0, 0.5])
  assert gif_steps.line_search(lambda p: 0.0, params, delta, (0.5, 1.0))[0] == 0.5  # ties: first listed
  with pytest.raises(ValueError, match="not finite"):
    gif_steps.line_search(lambda p: jnp.log(p["a"][0] - 1.5), params, delta, (0.0, 1.0))


def test_metrics_on_hand_built_predictions():
  # outputs = x itself: the prediction is the argmax of the input row.
  logits_fn = lambda p, batch: batch["x"]
  eye = np.eye(3)
  x = eye[[0, 1, 2, 2, 1, 0]]
  y = np.array([0, 1, 1, 2, 0, 0], np.int32)  # predictions [0,1,2,2,1,0]: wrong at 2 and 4
  m = gif_tasks.class_removal_metrics(logits_fn, None, {"x": x, "y": y}, removed_class=0)
  assert m == {"removed": 2 / 3, "rest": 2 / 3}
  m = gif_tasks.class_removal_metrics(logits_fn, None, {"x": x, "y": y}, removed_class=2)
  assert m["removed"] == 1.0 and m["rest"] == 3 / 5
  changed = {"x": eye[[1, 2]], "y": np.array([1, 0], np.int32)}
  m = gif_tasks.label_change_metrics(logits_fn, None, {"x": x, "y": y}, changed, wrong_labels=np.array([2, 2]))
  assert m == {"clean": 4 / 6, "relabelled": 0.5, "backdoor": 0.5}


def test_edits_reject_bad_input(data):
  x, y, theta = data
  with pytest.raises(ValueError, match="Class 7"):
    gif_tasks.class_removal_edit(_per_example, theta, {"x": x, "y": y}, 7, method="if")
  with pytest.raises(ValueError, match="one label per changed example"):
    gif_tasks.label_change_edit(_per_example, theta, {"x": x, "y": y}, np.ones(y.size, bool), [1, 2], method="if")


def test_hessian_examples_average_the_curvature_over_a_fixed_subset(data):
  x, y, theta = data
  batch = {"x": x, "y": y}
  full = gif_tasks.class_removal_problem(_per_example, theta, batch, 3)
  sub = gif_tasks.class_removal_problem(_per_example, theta, batch, 3, hessian_examples=50, seed=4)
  # Same g and line-search objective; H is the exact Hessian of the mean loss on the 50 drawn remaining examples.
  np.testing.assert_array_equal(_flat(sub.g), _flat(full.g))
  assert float(sub.train_loss(theta)) == float(full.train_loss(theta))
  remaining = {"x": x[y != 3], "y": y[y != 3]}
  drawn = np.zeros(remaining["y"].size, bool)
  drawn[np.random.default_rng(4).choice(drawn.size, 50, replace=False)] = True
  flat, unravel = ravel_pytree(theta)
  exact = jax.hessian(lambda v: _loss(unravel(v), {"x": remaining["x"][drawn], "y": remaining["y"][drawn]}))(flat)
  np.testing.assert_allclose(toy_problems.dense_matrix(sub.hessian), exact, rtol=1e-10, atol=1e-12)
  assert not np.allclose(toy_problems.dense_matrix(full.hessian), exact)
  # solve_edit on the problem is the edit function's result.
  res = gif_tasks.solve_edit(full, "if", scales=(1.0,), solver="cg", tol=1e-12)
  ref = gif_tasks.class_removal_edit(_per_example, theta, batch, 3, method="if", scales=(1.0,), solver="cg", tol=1e-12)
  np.testing.assert_allclose(_flat(res.params), _flat(ref.params), rtol=1e-12)


def test_nearest_scale_and_removal_f1():
  params = {"a": jnp.array([0.0])}
  delta = {"a": jnp.array([1.0])}
  metrics = lambda p: {"removed": float(abs(1.0 - p["a"][0] / 4)), "rest": 0.9}
  s, m = gif_steps.nearest_scale(metrics, {"removed": 0.5, "rest": 0.9}, params, delta, (0.0, 1.0, 2.0, 3.0))
  assert s == 2.0 and m == {"removed": 0.5, "rest": 0.9}
  assert gif_tasks.removal_f1(0.0, 1.0) == 1.0 and gif_tasks.removal_f1(1.0, 0.9) == 0.0
  assert gif_tasks.removal_f1(0.5, 0.9) == pytest.approx(2 * 0.5 * 0.9 / 1.4)
  assert gif_tasks.removal_f1(1.0, 0.0) == 0.0
  assert gif_tasks.edit_f1(0.8, 0.9) == pytest.approx(2 * 0.8 * 0.9 / 1.7) and gif_tasks.edit_f1(0.0, 0.0) == 0.0


def test_clean_curvature_excludes_exactly_the_corrupted_rows(data):
  x, y, _ = data
  changed = np.zeros(y.size, bool)
  changed[[0, 5, 9, 30]] = True
  np.testing.assert_array_equal(gif_tasks.curvature_rows(changed, "clean"), np.flatnonzero(~changed))
  np.testing.assert_array_equal(gif_tasks.curvature_rows(changed, "edited"), np.arange(y.size))
  sub = gif_tasks.curvature_rows(changed, "clean", num_examples=50, seed=3)
  assert sub.size == 50 and not np.any(changed[sub])
  np.testing.assert_array_equal(sub, gif_tasks.curvature_rows(changed, "clean", num_examples=50, seed=3))
  corrupted = changed.copy()
  corrupted[7] = True  # A corrupted row outside the edited subset (a re-draw) is still excluded.
  assert 7 not in gif_tasks.curvature_rows(changed, "clean", corrupted=corrupted)
  with pytest.raises(ValueError, match="curvature data"):
    gif_tasks.curvature_rows(changed, "dirty")


def test_label_change_clean_curvature_is_the_exact_hessian_of_the_clean_cross_entropy(data):
  x, y, changed, wrong, theta = _relabelled_fit(data)
  ce = lambda p, b: _per_example(p, b) - 0.5 * LAM * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))
  batch = {"x": x, "y": wrong}
  clean = gif_tasks.label_change_problem(_per_example, theta, batch, changed, y[changed], curvature_data="clean",
                                         curvature_loss_fn=ce)
  edited = gif_tasks.label_change_problem(_per_example, theta, batch, changed, y[changed])
  flat, unravel = ravel_pytree(theta)
  keep = ~changed
  exact = jax.hessian(lambda v: jnp.mean(ce(unravel(v), {"x": x[keep], "y": y[keep]})))(flat)
  np.testing.assert_allclose(toy_problems.dense_matrix(clean.hessian), exact, rtol=1e-10, atol=1e-12)
  fixed = wrong.copy()
  fixed[changed] = y[changed]
  exact_edited = jax.hessian(lambda v: _loss(unravel(v), {"x": x, "y": fixed}))(flat)
  np.testing.assert_allclose(toy_problems.dense_matrix(edited.hessian), exact_edited, rtol=1e-10, atol=1e-12)
  assert not np.allclose(exact, exact_edited)
  # Same g and the same line-search objective (the corrected set's training loss) either way.
  np.testing.assert_array_equal(_flat(clean.g), _flat(edited.g))
  assert float(clean.train_loss(theta)) == float(edited.train_loss(theta))
