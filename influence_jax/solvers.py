"""Inverse-curvature solvers. Exact (dense; tiny models only) here.

The dense path forms H with `jax.hessian`, so it is the reference every
approximate method is tested against.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib

Params = Any


def dense_hessian(loss_fn: Callable, params: Params, batches) -> jax.Array:
  """Returns the (p, p) Hessian of the example-weighted mean of loss_fn over `batches`.

  Flat parameter order is that of `ravel_pytree(params)`.
  """
  batches = data_lib.materialize(batches, "batches")
  flat, unravel = ravel_pytree(params)
  sizes = [data_lib.batch_size(b) for b in batches]
  total = sum(sizes)
  batch_hessian = jax.jit(jax.hessian(lambda f, b: loss_fn(unravel(f), b)))
  hess = jnp.zeros((flat.size, flat.size), flat.dtype)
  for b, n in zip(batches, sizes):
    hess = hess + batch_hessian(flat, b) * (n / total)
  return hess


def per_example_gradients(per_example_loss_fn: Callable, params: Params, batches) -> jax.Array:
  """Returns the (N, p) matrix of flat per-example gradients ∇ℓ(z_i) (tiny problems only)."""
  flat, unravel = ravel_pytree(params)
  batch_jacobian = jax.jit(jax.jacrev(lambda f, b: per_example_loss_fn(unravel(f), b)))
  return jnp.concatenate([batch_jacobian(flat, b) for b in data_lib.materialize(batches, "batches")])


def exact_influence(
    loss_fn: Callable,
    per_example_loss_fn: Callable,
    params: Params,
    test_batches,
    train_batches,
    *,
    damping: float = 0.0,
    hessian_batches=None,
) -> jax.Array:
  """Returns the (T, N) matrix ∇ℓ(x)ᵀ (H + damping·I)⁻¹ ∇ℓ(z), H dense and exact.

  Positive: z is a proponent of x (DESIGN §1). H is the Hessian of the mean of
  `loss_fn` over `hessian_batches` (default: `train_batches`). Raises if
  H + damping·I is singular.
  """
  hess = dense_hessian(loss_fn, params, hessian_batches if hessian_batches is not None else train_batches)
  hess = hess + damping * jnp.eye(hess.shape[0], dtype=hess.dtype)
  g_test = per_example_gradients(per_example_loss_fn, params, test_batches)
  g_train = per_example_gradients(per_example_loss_fn, params, train_batches)
  if np.linalg.cond(np.asarray(hess, np.float64)) > 1e15:
    raise np.linalg.LinAlgError(
        "H + damping·I is singular or nearly so; use a positive damping for exact influence.")
  return g_test @ jnp.linalg.solve(hess, g_train.T)
