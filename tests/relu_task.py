"""A small ReLU classifier fitted to flipped labels, as a jobs Task (tests/test_curvature_choice.py).

The situation of issue 27: a ReLU net trained until it fits labels flipped on purpose. Its Hessian is
indefinite and the flipped examples have by far the largest gradients, so the plain influence table
ranks them first for every query whatever their label; the Gauss-Newton curvature is positive
semi-definite, and the normalised tables (score.normalize) rank same-label examples first.

Four Gaussian classes in 8 dimensions; config.user.num_train training examples of which
config.user.flip_fraction have another class's label; clean queries; an MLP 8-32-4 (ReLU, 420
parameters) fitted full-batch with Adam. The loss is `linen_loss_fns`' SplitLoss, so
arnoldi.curvature="auto" picks Gauss-Newton.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import influence_jax as ij
from influence_jax.examples import models
from influence_jax.jobs import Task, default_config
from influence_jax.sources import ArraySource

NUM_FEATURES, NUM_CLASSES, HIDDEN = 8, 4, 32


def make_data(num_train: int, num_queries: int, flip_fraction: float, seed: int) -> dict:
  """Returns {"train": {"x", "y"}, "queries": {"x", "y"}, "flipped": (num_train,) bool} (float32 / int32)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(NUM_CLASSES, NUM_FEATURES)) * 1.5

  def draw(n):
    y = rng.integers(0, NUM_CLASSES, n)
    return {"x": (centers[y] + rng.normal(size=(n, NUM_FEATURES))).astype(np.float32), "y": y.astype(np.int32)}

  train, queries = draw(num_train), draw(num_queries)
  flipped = np.zeros(num_train, bool)
  flipped[rng.choice(num_train, int(round(flip_fraction * num_train)), replace=False)] = True
  shift = rng.integers(1, NUM_CLASSES, num_train)
  train["y"] = np.where(flipped, (train["y"] + shift) % NUM_CLASSES, train["y"]).astype(np.int32)
  return {"train": train, "queries": queries, "flipped": flipped}


@functools.lru_cache(maxsize=4)
def trained(num_train: int, num_queries: int, flip_fraction: float, seed: int, steps: int):
  """Returns (data, ModelFns at the trained params): full-batch Adam on mean cross-entropy + L2."""
  data = make_data(num_train, num_queries, flip_fraction, seed)
  module = models.MLP(features=(HIDDEN,), num_classes=NUM_CLASSES, activation="relu")
  variables = module.init(jax.random.key(seed), jnp.zeros((1, NUM_FEATURES), jnp.float32))
  variables = jax.tree.map(lambda a: a.astype(jnp.float32), variables)
  fns = ij.linen_loss_fns(module, variables, models.softmax_cross_entropy, l2=1e-4)
  tx = optax.adam(optax.cosine_decay_schedule(1e-2, steps, alpha=0.05))
  batch = {k: jnp.asarray(v) for k, v in data["train"].items()}

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(fns.loss_fn)(params, batch), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]

  params = run(fns.params)
  return data, fns._replace(params=params)


def get_task(config) -> Task:
  u = config.user
  data, fns = trained(u.num_train, u.num_queries, u.flip_fraction, u.seed, u.steps)
  return Task(params=fns.params, loss_fn=fns.loss_fn, per_example_loss_fn=fns.per_example_loss_fn,
              train=ArraySource(data["train"]), queries=ArraySource(data["queries"]),
              label_fn=lambda ex: str(int(ex["y"])))


def get_config():
  c = default_config()
  c.task = "tests.relu_task:get_task"
  c.user.num_train, c.user.num_queries, c.user.flip_fraction, c.user.seed, c.user.steps = 600, 40, 0.15, 0, 3000
  c.arnoldi.n_iters, c.arnoldi.top_k, c.arnoldi.damping = 120, 80, 1e-3  # The README's example damping.
  c.arnoldi.num_examples = -1
  c.arnoldi.checkpoint_seconds = 1e6
  c.project.batch_size, c.project.chunk_rows, c.project.sketch_dim = 200, 200, 512  # ≥ p₁p₂: an exact sketch
  c.project.residual_rank = 0
  c.score.top_k, c.score.rows_per_block, c.score.checkpoint_seconds = 10, 256, 1e6
  c.score.grid_examples = 0
  return c
