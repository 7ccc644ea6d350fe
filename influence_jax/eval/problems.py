"""Benchmark problems: tiny models with per-example weighted objectives, and their training loops.

A problem's objective with per-example weights w (DESIGN §1):

    L_w(θ) = (1/N) Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖²,

so w = 1 is the training objective, w = 1 − e_j removes z_j (upweighting it by
ε = −1/N) and w = mask / fraction is the mean over a subset. Training is a
pure function `train_fn(weights, seed) -> params`, so retraining many models is
one `jax.vmap` over (weights, seed).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

Params = Any
Batch = Any


class Problem(NamedTuple):
  """A supervised problem: data, model and objective.

  init_fn(key) -> params; per_example_loss_fn(params, batch) -> (B,);
  l2: the strength λ of (λ/2)‖θ‖²; train, test: one batch each (dicts of arrays).
  """

  name: str
  init_fn: Callable[[jax.Array], Params]
  per_example_loss_fn: Callable[[Params, Batch], jax.Array]
  l2: float
  train: Batch
  test: Batch

  @property
  def num_train(self) -> int:
    return int(jax.tree.leaves(self.train)[0].shape[0])

  def loss_fn(self, params: Params, batch: Batch) -> jax.Array:
    """Returns mean ℓ over `batch` + (λ/2)‖θ‖²: the training objective, as a loss_fn."""
    return jnp.mean(self.per_example_loss_fn(params, batch)) + l2_penalty(params, self.l2)

  def weighted_loss(self, params: Params, weights: jax.Array) -> jax.Array:
    """Returns (1/N) Σ w_i ℓ(z_i) + (λ/2)‖θ‖² over the training set."""
    losses = self.per_example_loss_fn(params, self.train)
    return jnp.sum(weights * losses) / losses.shape[0] + l2_penalty(params, self.l2)


def l2_penalty(params: Params, l2: float) -> jax.Array:
  """Returns (l2/2) ‖θ‖² summed over every leaf."""
  return 0.5 * l2 * sum(jnp.sum(x**2) for x in jax.tree.leaves(params))


def digits(num_train: int, num_test: int, *, seed: int = 0, dtype=np.float64):
  """Returns (train, test) batches {"x": (n, 64) in [0, 1], "y": int32} of scikit-learn digits.

  The 1,797 images are shuffled with `seed`; train and test never overlap.
  """
  d = datasets.load_digits()
  if num_train + num_test > len(d.target):
    raise ValueError(f"digits has {len(d.target)} examples; asked for {num_train} + {num_test}.")
  perm = np.random.default_rng(seed).permutation(len(d.target))
  x = (d.data[perm] / 16.0).astype(dtype)
  y = d.target[perm].astype(np.int32)
  train = {"x": x[:num_train], "y": y[:num_train]}
  test = {"x": x[num_train:num_train + num_test], "y": y[num_train:num_train + num_test]}
  return train, test


def mlp_init(sizes, dtype) -> Callable[[jax.Array], Params]:
  """Returns init_fn(key) -> [{"w", "b"}, ...] for a tanh MLP with layer `sizes`."""

  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n), dtype) / np.sqrt(m), "b": jnp.zeros((n,), dtype)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]

  return init


def mlp_logits(params: Params, x: jax.Array) -> jax.Array:
  h = x
  for layer in params[:-1]:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params: Params, batch: Batch) -> jax.Array:
  """Returns (B,) softmax cross-entropy of `mlp_logits` (a linear model when params has one layer)."""
  return optax.softmax_cross_entropy_with_integer_labels(mlp_logits(params, batch["x"]), batch["y"])


def digits_mlp(*, hidden=(20,), l2=1e-3, num_train=500, num_test=100, seed=0, dtype=np.float64) -> Problem:
  """Returns a tanh MLP 64-hidden-10 on digits with softmax cross-entropy (1,510 params for hidden=(20,))."""
  train, test = digits(num_train, num_test, seed=seed, dtype=dtype)
  return Problem("digits_mlp", mlp_init((64, *hidden, 10), dtype), cross_entropy, float(l2), train, test)


def digits_logreg(*, l2=1e-2, num_train=500, num_test=100, seed=0, dtype=np.float64) -> Problem:
  """Returns multinomial L2 logistic regression on digits (650 params; convex, H ⪰ λI)."""
  train, test = digits(num_train, num_test, seed=seed, dtype=dtype)
  return Problem("digits_logreg", mlp_init((64, 10), dtype), cross_entropy, float(l2), train, test)


class Checkpoint(NamedTuple):
  """Parameters saved during training, with the learning rate in force at that step (for TracIn)."""

  params: Params
  learning_rate: float
  step: int


def schedule(learning_rate: float, steps: int) -> optax.Schedule:
  """Returns the training learning-rate schedule: cosine decay from learning_rate to 1% of it over `steps`."""
  return optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01)


def make_train_fn(problem: Problem, *, steps: int, learning_rate: float) -> Callable[[jax.Array, jax.Array], Params]:
  """Returns a pure train_fn(weights (N,), seed) -> params: full-batch Adam on L_w from init_fn(key(seed)).

  The learning rate follows `schedule(learning_rate, steps)`: cosine decay to
  1% of it, so the last iterates settle near a stationary point.
  Deterministic given (weights, seed); vmap it over both to retrain many models.
  """
  opt = optax.adam(schedule(learning_rate, steps))

  def train_fn(weights, seed):
    params = problem.init_fn(jax.random.key(seed))
    state = opt.init(params)

    def step(carry, _):
      p, s = carry
      g = jax.grad(problem.weighted_loss)(p, weights)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, state), None, length=steps)
    return params

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
  opt = optax.adam(lr_schedule)
  weights = jnp.ones((problem.num_train,), jax.tree.leaves(problem.train)[0].dtype)
  seg = steps // num_checkpoints

  @jax.jit
  def segment(carry):
    def step(carry, _):
      p, s = carry
      g = jax.grad(problem.weighted_loss)(p, weights)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, carry, None, length=seg)[0]

  params = problem.init_fn(jax.random.key(seed))
  carry = (params, opt.init(params))
  checkpoints = []
  for c in range(num_checkpoints):
    carry = segment(carry)
    checkpoints.append(Checkpoint(carry[0], float(lr_schedule((c + 1) * seg - 1)), (c + 1) * seg))
  return carry[0], checkpoints


def gradient_norm(problem: Problem, params: Params) -> float:
  """Returns ‖∇L(θ)‖ of the full training objective: how far θ is from a stationary point."""
  g = jax.grad(problem.loss_fn)(params, problem.train)
  return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g))))


def loss_targets(problem: Problem) -> Callable[[Params], jax.Array]:
  """Returns evaluate_fn(params) -> (T,) per-example test losses (the LDS / LOO target)."""
  return lambda params: problem.per_example_loss_fn(params, problem.test)
