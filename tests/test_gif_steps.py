"""Step rules: the walk keeps the best point it visits and sees nothing but the parameters."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax.methods import gif_steps


def test_walk_keeps_the_best_point_on_a_concave_score():
  params, delta = {"a": jnp.array([0.0])}, {"a": jnp.array([1.0])}
  seen = []

  def score(p):
    s = float(p["a"][0])
    seen.append(s)
    return -(s - 3.3) ** 2

  res = gif_steps.walk(score, params, delta, step=0.5, patience=3, refinements=3)
  assert res.scale == pytest.approx(3.3125)  # coarse 3.5, then 3.25, then 3.3125 (within step / 16)
  assert res.score == max(res.scores) and res.scales[int(np.argmax(res.scores))] == res.scale
  assert max(res.scales) == pytest.approx(5.0)  # stopped after `patience` steps without improvement (4, 4.5, 5)
  assert res.scales[:2] == (0.0, 0.5) and seen[0] == 0.0


def test_walk_keeps_the_start_when_every_step_is_worse_and_stops_at_max_steps():
  params, delta = {"a": jnp.array([0.0])}, {"a": jnp.array([1.0])}
  res = gif_steps.walk(lambda p: -float(p["a"][0]), params, delta, step=1.0, patience=2, refinements=1)
  assert res.scale == 0.0 and res.score == 0.0
  up = gif_steps.walk(lambda p: float(p["a"][0]), params, delta, step=1.0, max_steps=7, refinements=0)
  assert up.scale == 7.0 and len(up.scales) == 8


def test_walk_with_a_training_data_score_never_sees_evaluation_labels():
  # The score closes over training data only; the walk passes it nothing but parameters, so a score that
  # would read evaluation labels has to be written to do so by the caller (the oracle).
  params, delta = {"a": jnp.array([0.0])}, {"a": jnp.array([1.0])}
  calls = []

  def score(*args, **kwargs):
    calls.append((args, kwargs))
    return 0.0

  gif_steps.walk(score, params, delta, step=1.0, max_steps=2, patience=5, refinements=0)
  assert all(len(a) == 1 and not k and set(a[0]) == {"a"} for a, k in calls)


def test_nearest_scale_grid_goes_far_enough():
  assert gif_steps.DEFAULT_SCALES[-1] >= 64 and list(gif_steps.DEFAULT_SCALES) == sorted(gif_steps.DEFAULT_SCALES)


def test_walk_rejects_bad_input():
  with pytest.raises(ValueError, match="step"):
    gif_steps.walk(lambda p: 0.0, {"a": jnp.zeros(1)}, {"a": jnp.ones(1)}, step=0.0)
  with pytest.raises(ValueError, match="not finite"):
    gif_steps.walk(lambda p: float("nan"), {"a": jnp.zeros(1)}, {"a": jnp.ones(1)})
