"""Influence predicts leave-one-out retraining on an L2 logistic regression (breast-cancer data).

Strength λ = 0.1 on standardised features: H ⪰ λI, so removing one of 200
points moves θ by at most ‖∇ℓ(z)‖/(Nλ) and each point's leverage
∇ℓᵀH⁻¹∇ℓ/N stays small — the regime where first-order influence holds
(weaker λ = 1e-3 gives Pearson 0.88 on the same points, λ = 0.01 gives 0.97).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import influence_jax as ij
from tests import toy_problems

L2 = 0.1
NUM_TRAIN = 200
NUM_REMOVED = 50


def per_example(p, b):
  z = b["x"] @ p["w"] + p["b"]
  return jnp.logaddexp(0.0, z) - b["y"] * z


def weighted_loss(p, b, w):
  """Σ w_i ℓ_i / N + λ/2‖θ‖²: dropping z (w_z = 0) is upweighting it by ε = −1/N, with the
  data-to-regulariser balance unchanged (dividing by N − 1 instead adds the same shift to every removal)."""
  return jnp.sum(w * per_example(p, b)) / w.shape[0] + 0.5 * L2 * (jnp.sum(p["w"] ** 2) + p["b"] ** 2)


def test_predicted_loss_change_matches_retraining():
  x, y = toy_problems.breast_cancer()
  train = {"x": x[:NUM_TRAIN], "y": y[:NUM_TRAIN]}
  pool = {"x": x[NUM_TRAIN:], "y": y[NUM_TRAIN:]}
  loss = lambda p, b: weighted_loss(p, b, jnp.ones(b["y"].shape[0]))
  params = toy_problems.newton_minimize(loss, {"w": jnp.zeros(30), "b": jnp.asarray(0.0)}, train, steps=40)
  j = int(jnp.argmax(per_example(params, pool)))  # The hardest held-out example: largest effects.
  test = {"x": pool["x"][j : j + 1], "y": pool["y"][j : j + 1]}

  es = ij.fit_eigenspace(loss, params, [train], n_iters=31, top_k=31)
  scores = np.asarray(ij.influence(es, per_example, params, [test], [train]))[0]

  removed = np.random.default_rng(0).choice(NUM_TRAIN, NUM_REMOVED, replace=False)
  weights = np.ones((NUM_REMOVED, NUM_TRAIN))
  weights[np.arange(NUM_REMOVED), removed] = 0.0
  flat, unravel = ravel_pytree(params)

  def retrained_test_loss(w):
    f = lambda v: weighted_loss(unravel(v), train, w)
    step = lambda v, _: (v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v)), None)
    v, _ = jax.lax.scan(step, flat, None, length=8)
    return per_example(unravel(v), test)[0]

  actual = np.asarray(jax.jit(jax.vmap(retrained_test_loss))(jnp.asarray(weights))) - float(per_example(params, test)[0])
  predicted = scores[removed] / NUM_TRAIN  # Removing z raises the loss by about score/N (docs/design.md, "What a score means").
  assert np.corrcoef(predicted, actual)[0, 1] >= 0.98
  assert np.mean(np.sign(predicted) == np.sign(actual)) >= 0.9
