"""Tiny float64 problems with exact answers, shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets as sk_datasets
from sklearn import preprocessing

from influence_jax.examples import datasets
from influence_jax.methods import training


def logistic_regression(num_examples=80, num_features=5, l2=0.05, seed=0):
  """Returns (params, loss_fn, per_example_loss_fn, batches): L2 logistic regression, random data."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_examples, num_features))
  y = (x @ rng.normal(size=num_features) + 0.5 * rng.normal(size=num_examples) > 0).astype(np.float64)

  def per_example(p, b):
    z = b["x"] @ p["w"] + p["b"]
    return jnp.logaddexp(0.0, z) - b["y"] * z

  def loss(p, b):
    return per_example(p, b).mean() + 0.5 * l2 * (jnp.sum(p["w"] ** 2) + p["b"] ** 2)

  params = {"w": jnp.asarray(rng.normal(size=num_features) * 0.3), "b": jnp.asarray(0.1)}
  half = num_examples // 2
  batches = [{"x": x[:half], "y": y[:half]}, {"x": x[half:], "y": y[half:]}]
  return params, loss, per_example, batches


def mlp_init(sizes, seed=0, dtype=jnp.float64):
  """Returns a list of {"w", "b"} layers with scaled normal weights."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  return [
      {"w": jax.random.normal(k, (m, n), dtype) / np.sqrt(m), "b": 0.1 * jnp.ones((n,), dtype)}
      for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def mlp_logits(params, x):
  h = x
  for layer in params[:-1]:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def mlp_classifier(l2=0.0):
  """Returns (loss_fn, per_example_loss_fn) of softmax cross-entropy (+ l2/2 ‖θ‖²) for `mlp_logits`."""

  def per_example(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(mlp_logits(p, b["x"]), b["y"])

  def loss(p, b):
    reg = sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    return per_example(p, b).mean() + 0.5 * l2 * reg

  return loss, per_example


def small_mlp_problem(seed=0):
  """Returns (params, loss_fn, per_example_loss_fn, batches): a 4-6-3 tanh MLP on random data (indefinite H)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(40, 4))
  y = rng.integers(0, 3, size=40).astype(np.int32)
  loss, per_example = mlp_classifier()
  params = mlp_init([4, 6, 3], seed)
  return params, loss, per_example, [{"x": x[:25], "y": y[:25]}, {"x": x[25:], "y": y[25:]}]


def digits(num_train=None, seed=0):
  """Returns ((x_train, y_train), (x_test, y_test)) of scikit-learn digits in [0, 1], float64."""
  x, y = datasets.digits_arrays()
  perm = np.random.default_rng(seed).permutation(len(y))
  x, y = x[perm].astype(np.float64), y[perm]
  split = int(0.8 * len(y))
  xtr, ytr, xte, yte = x[:split], y[:split], x[split:], y[split:]
  if num_train is not None:
    xtr, ytr = xtr[:num_train], ytr[:num_train]
  return (xtr, ytr), (xte, yte)


def train_full_batch(loss_fn, params, batch, steps=500, lr=0.05):
  """Returns params after `steps` full-batch Adam steps (deterministic; methods.training.train)."""
  return training.train(loss_fn, params, batch, optimizer=optax.adam(lr), num_steps=steps)[0]


def newton_minimize(loss_fn, params, batch, steps=30):
  """Returns params after `steps` full Newton steps (convex, tiny problems; float64)."""
  from jax.flatten_util import ravel_pytree

  flat, unravel = ravel_pytree(params)
  f = lambda v: loss_fn(unravel(v), batch)

  def step(v, _):
    g = jax.grad(f)(v)
    h = jax.hessian(f)(v)
    return v - jnp.linalg.solve(h, g), None

  flat, _ = jax.lax.scan(step, flat, None, length=steps)
  return unravel(flat)


def breast_cancer(seed=0):
  """Returns standardised (x, y) of scikit-learn's breast-cancer data (569 × 30, labels 0/1)."""
  d = sk_datasets.load_breast_cancer()
  x = preprocessing.StandardScaler().fit_transform(d.data)
  perm = np.random.default_rng(seed).permutation(len(d.target))
  return x[perm], d.target[perm].astype(np.float64)


def dense_matrix(op) -> jax.Array:
  """Returns the (dim, dim) matrix of a `curvature.LinearOperator` by applying it to the identity."""
  eye = jnp.eye(op.dim, dtype=op.dtype)
  return jax.vmap(lambda e: op.matvec(op.operands, e))(eye).T


def newton_to_tolerance(objective, flat0, *, tol: float, final_tol: float):
  """Returns the flat minimiser of a smooth convex `objective` by Newton steps from `flat0`, stopping when
  max |∇| < tol (at most 100 steps); asserts max |∇| < final_tol at the end."""
  grad, hess = jax.jit(jax.grad(objective)), jax.jit(jax.hessian(objective))
  f = flat0
  for _ in range(100):
    g = grad(f)
    if np.max(np.abs(g)) < tol:
      break
    f = f - jnp.linalg.solve(hess(f), g)
  assert np.max(np.abs(grad(f))) < final_tol
  return f
