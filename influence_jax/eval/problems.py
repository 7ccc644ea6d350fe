"""Benchmark problems: tiny models with per-example weighted objectives, and their training.

A problem's objective with per-example weights w (docs/design.md, "What a score means"):

    L_w(θ) = (1/N) Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖²,

so w = 1 is the training objective, w = 1 − e_j removes z_j (upweighting it by
ε = −1/N) and w = mask / fraction is the mean over a subset. Training is a
pure function `train_fn(weights, seed) -> params` (one
`methods.training.train_segment`, the weights riding in the batch under
"weight"), so retraining many models is one `jax.vmap` over (weights, seed).
The models are `examples.models.MLP` through `flax_adapters.linen_loss_fns`,
the data `examples.datasets.digits_arrays`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from influence_jax import curvature, flax_adapters
from influence_jax.examples import datasets, models
from influence_jax.methods import training
from influence_jax.types import Batch, Params, PerExampleLossFn


WEIGHT_KEY = "weight"


class Problem(NamedTuple):
  """A supervised problem: data, model and objective.

  init_fn(key) -> params; per_example_loss_fn(params, batch) -> (B,);
  l2: the strength λ of (λ/2)‖θ‖²; train, test: one batch each (dicts of arrays);
  outputs_fn(params, batch) -> logits, when the loss is softmax cross-entropy of them (then
  `split_loss()` gives the objective as a SplitLoss, for Gauss-Newton curvature).
  """

  name: str
  init_fn: Callable[[jax.Array], Params]
  per_example_loss_fn: PerExampleLossFn
  l2: float
  train: Batch
  test: Batch
  outputs_fn: Optional[Callable] = None

  @property
  def num_train(self) -> int:
    return int(jax.tree.leaves(self.train)[0].shape[0])

  def loss_fn(self, params: Params, batch: Batch) -> jax.Array:
    """Returns mean ℓ over `batch` + (λ/2)‖θ‖²: the training objective, as a loss_fn."""
    return jnp.mean(self.per_example_loss_fn(params, batch)) + self.l2 * flax_adapters.l2_penalty(params)

  def split_loss(self) -> Optional[curvature.SplitLoss]:
    """Returns the objective `loss_fn` as a SplitLoss (logits → mean cross-entropy, + L2), or None
    without outputs_fn: what curvature="gauss_newton" needs."""
    if self.outputs_fn is None:
      return None
    return curvature.SplitLoss(
        outputs_fn=self.outputs_fn,
        output_loss_fn=lambda logits, batch: jnp.mean(models.softmax_cross_entropy(logits, batch["y"])),
        regularizer=lambda params: self.l2 * flax_adapters.l2_penalty(params))

  def weighted_loss(self, params: Params, batch: Batch) -> jax.Array:
    """Returns (1/B) Σ w_i ℓ(z_i) + (λ/2)‖θ‖² over `batch`, w = batch[WEIGHT_KEY] (B,)."""
    losses = self.per_example_loss_fn(params, batch)
    return jnp.sum(batch[WEIGHT_KEY] * losses) / losses.shape[0] + self.l2 * flax_adapters.l2_penalty(params)

  def weighted_train(self, weights: jax.Array) -> Batch:
    """Returns the training batch with `weights` (N,) under WEIGHT_KEY, for `weighted_loss`."""
    return {**self.train, WEIGHT_KEY: weights}


def digits(num_train: int, num_test: int, *, seed: int = 0, dtype=np.float64):
  """Returns (train, test) batches {"x": (n, 64) in [0, 1], "y": int32} of scikit-learn digits.

  The 1,797 images of datasets.digits_arrays are shuffled with `seed`; train and test never overlap.
  """
  x, y = datasets.digits_arrays()
  if num_train + num_test > len(y):
    raise ValueError(f"digits has {len(y)} examples; asked for {num_train} + {num_test}.")
  perm = np.random.default_rng(seed).permutation(len(y))
  x, y = x[perm].astype(dtype), y[perm]
  train = {"x": x[:num_train], "y": y[:num_train]}
  test = {"x": x[num_train:num_train + num_test], "y": y[num_train:num_train + num_test]}
  return train, test


def mlp_classifier(hidden, num_inputs: int, num_classes: int, dtype) -> tuple[Callable, Callable, Callable]:
  """Returns (init_fn(key) -> params, per_example_loss_fn, outputs_fn) of a tanh `models.MLP` with softmax
  cross-entropy (outputs_fn(params, batch) -> logits).

  hidden=() is multinomial logistic regression. init_fn is pure (vmappable
  over keys) and casts the parameters to `dtype`.
  """
  module = models.MLP(features=tuple(hidden), num_classes=num_classes, activation="tanh")
  example = jnp.zeros((1, num_inputs), dtype)

  def init_fn(key):
    return jax.tree.map(lambda a: a.astype(dtype), module.init(key, example)["params"])

  fns = flax_adapters.linen_loss_fns(module, {"params": init_fn(jax.random.key(0))}, models.softmax_cross_entropy)
  return init_fn, fns.per_example_loss_fn, fns.outputs_fn


def _digits_problem(name, hidden, l2, num_train, num_test, seed, dtype) -> Problem:
  train, test = digits(num_train, num_test, seed=seed, dtype=dtype)
  init_fn, per_example, outputs_fn = mlp_classifier(hidden, train["x"].shape[1], datasets.DIGITS_NUM_CLASSES, dtype)
  return Problem(name, init_fn, per_example, float(l2), train, test, outputs_fn)


def digits_mlp(*, hidden=(20,), l2=1e-3, num_train=500, num_test=100, seed=0, dtype=np.float64) -> Problem:
  """Returns a tanh MLP 64-hidden-10 on digits with softmax cross-entropy (1,510 params for hidden=(20,))."""
  return _digits_problem("digits_mlp", hidden, l2, num_train, num_test, seed, dtype)


def digits_logreg(*, l2=1e-2, num_train=500, num_test=100, seed=0, dtype=np.float64) -> Problem:
  """Returns multinomial L2 logistic regression on digits (650 params; convex, H ⪰ λI)."""
  return _digits_problem("digits_logreg", (), l2, num_train, num_test, seed, dtype)


class Checkpoint(NamedTuple):
  """Parameters saved during training, with the learning rate in force at that step (for TracIn)."""

  params: Params
  learning_rate: float
  step: int


def schedule(learning_rate: float, steps: int) -> optax.Schedule:
  """Returns the training learning-rate schedule: cosine decay from learning_rate to 1% of it over `steps`."""
  return optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01)


def _train_weighted(problem: Problem, optimizer, params, opt_state, weights, num_steps):
  """Returns (params, opt_state) after `num_steps` full-batch steps on L_w (one training.train_segment)."""
  params, opt_state, _, _ = training.train_segment(
      problem.weighted_loss, optimizer, params, opt_state, problem.weighted_train(weights), jax.random.key(0),
      batch_size=problem.num_train, num_steps=num_steps)
  return params, opt_state


def make_train_fn(problem: Problem, *, steps: int, learning_rate: float) -> Callable[[jax.Array, jax.Array], Params]:
  """Returns a pure train_fn(weights (N,), seed) -> params: full-batch Adam on L_w from init_fn(key(seed)).

  The learning rate follows `schedule(learning_rate, steps)`: cosine decay to
  1% of it, so the last iterates settle near a stationary point.
  Deterministic given (weights, seed); vmap it over both to retrain many models.
  """
  optimizer = optax.adam(schedule(learning_rate, steps))

  def train_fn(weights, seed):
    params = problem.init_fn(jax.random.key(seed))
    return _train_weighted(problem, optimizer, params, optimizer.init(params), weights, steps)[0]

  return train_fn


def train_with_checkpoints(
    problem: Problem, *, steps: int, learning_rate: float, num_checkpoints: int, seed: int = 0,
) -> tuple[Params, list[Checkpoint]]:
  """Returns (final params, checkpoints at `num_checkpoints` evenly spaced steps, the last = final).

  The same trajectory as `make_train_fn(...)(ones, seed)`; each checkpoint
  carries the learning rate of the schedule at its step.
  """
  if num_checkpoints < 1 or steps % num_checkpoints:
    raise ValueError(f"steps ({steps}) must be a positive multiple of num_checkpoints ({num_checkpoints}).")
  lr_schedule = schedule(learning_rate, steps)
  optimizer = optax.adam(lr_schedule)
  weights = jnp.ones((problem.num_train,), jax.tree.leaves(problem.train)[0].dtype)
  seg = steps // num_checkpoints
  params = problem.init_fn(jax.random.key(seed))
  opt_state = optimizer.init(params)
  checkpoints = []
  for c in range(num_checkpoints):
    params, opt_state = _train_weighted(problem, optimizer, params, opt_state, weights, seg)
    checkpoints.append(Checkpoint(params, float(lr_schedule((c + 1) * seg - 1)), (c + 1) * seg))
  return params, checkpoints


def gradient_norm(problem: Problem, params: Params) -> float:
  """Returns ‖∇L(θ)‖ of the full training objective: how far θ is from a stationary point."""
  g = jax.grad(problem.loss_fn)(params, problem.train)
  return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))


def loss_targets(problem: Problem) -> Callable[[Params], jax.Array]:
  """Returns evaluate_fn(params) -> (T,) per-example test losses (the LDS / LOO target)."""
  return lambda params: problem.per_example_loss_fn(params, problem.test)
