"""Exact stored coordinates beyond the eigenspace: the principal directions of the gradients' remainder.

A projection store keeps U∇ℓ(z) exactly and the remainder (I − UᵀU)∇ℓ(z)
only as a random sketch, whose error in a dot product is of order
‖a‖‖b‖/√m for remainders a and b. A solved query H⁻¹∇ℓ(x) lies mostly
outside the top-k eigenspace, so that error is what separates scores from a
store from scores computed against the gradients themselves.

The residual basis V (r, p) is the top-r right singular vectors of the
remainders (I − UᵀU)∇ℓ(z) of a sample of training examples: the directions
in which training gradients vary most outside the eigenspace. Storing V∇ℓ(z)
exactly and sketching only (I − UᵀU − VᵀV)∇ℓ(z) shrinks the part left to
the sketch (and its error) to what V misses.

V is found by a randomized SVD of the (n × p) sample matrix G⊥ without ever
forming it (Halko, Martinsson & Tropp 2011, Algorithm 4.4): products G⊥ᵀW
are per-example-weighted gradients (one VJP per column of W), products G⊥Qᵀ
are per-example projections (`projection.project_on`); rows are made
orthonormal by Cholesky QR, twice (matmuls only).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import validation


def orthonormal_rows(y: jax.Array, against: jax.Array) -> jax.Array:
  """Returns rows spanning those of `y` (l, p) minus their part in the span of `against`'s orthonormal rows.

  Two rounds of projection and Cholesky QR (CholeskyQR2); raises ValueError when the remaining rows
  are not linearly independent (fewer sample examples than rows asked for).
  """
  for _ in range(2):
    y = y - (y @ against.T) @ against
    gram = y @ y.T
    chol = jnp.linalg.cholesky(gram + 1e-12 * jnp.trace(gram) / gram.shape[0] * jnp.eye(gram.shape[0], dtype=y.dtype))
    if not bool(jnp.all(jnp.isfinite(chol))):
      raise ValueError(f"The {y.shape[0]} sampled remainder directions are not linearly independent: use fewer "
                       "basis rows (rank + oversample) or more sample examples.")
    y = jax.scipy.linalg.solve_triangular(chol, y, lower=True)
  return y


@functools.partial(jax.jit, static_argnums=0)
def _weighted_gradients(per_example_loss_fn: Callable, params, batch, weights: jax.Array) -> jax.Array:
  """Returns (l, p) Σ_i weights[i, j] ∇ℓ(z_i) for each column j of (B, l) `weights`."""
  flat, unravel = ravel_pytree(params)
  _, vjp_fn = jax.vjp(lambda f: per_example_loss_fn(unravel(f), batch), flat)
  return jax.vmap(lambda w: vjp_fn(w.astype(flat.dtype))[0])(weights.T)


def _transpose_products(per_example_loss_fn, params, batches, weights, directions) -> jax.Array:
  """Returns (l, p) G⊥ᵀW = (I − DᵀD) Σ_i W[i] ∇ℓ(z_i) over the examples of `batches`, W (n, l)."""
  total, start = 0.0, 0
  for batch in batches:
    n = data_lib.batch_size(batch)
    total = total + _weighted_gradients(per_example_loss_fn, params, batch, weights[start:start + n])
    start += n
  return total.astype(directions.dtype)


def fit_residual_basis(
    directions: jax.Array,
    per_example_loss_fn: Callable,
    params: Any,
    batches: Iterable[Any],
    rank: int,
    *,
    oversample: int = 16,
    power_iters: int = 1,
    seed: int = 0,
) -> jax.Array:
  """Returns V (rank, p): orthonormal rows, orthogonal to `directions`, spanning the top-`rank` right singular
  vectors of the sample's remainders (I − DᵀD)∇ℓ(z), largest first.

  `directions` D: (k, p) orthonormal rows, or an eigenspace's (k, P) flat layout (zero beyond p);
  `batches`: the sample (held in memory); cost, with l = rank + oversample (at most the sample size
  and p − k): (1 + power_iters) × l weighted gradients and (1 + power_iters) projections of the
  sample on l directions. When l reaches the rank of the sample's remainders the result is exact.
  """
  flat, _ = ravel_pytree(params)
  p = flat.size
  d = jnp.asarray(directions)[:, :p]
  batches = data_lib.materialize(batches, "batches")
  n = sum(data_lib.batch_size(b) for b in batches)
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive integer, got {rank!r}.")
  if oversample < 0 or power_iters < 0:
    raise ValueError(f"oversample and power_iters must be non-negative, got {oversample} and {power_iters}.")
  most = min(n, p - d.shape[0])
  if rank > most:
    raise ValueError(f"rank {rank} is more than the sample's remainders can span: {n} sample examples, "
                     f"p − k = {p - d.shape[0]} parameters outside the eigenspace.")
  width = min(rank + oversample, most)
  validation.check_finite(params, "params")
  weights = jnp.asarray(np.random.default_rng(seed).standard_normal((n, width)), d.dtype)
  q = orthonormal_rows(_transpose_products(per_example_loss_fn, params, batches, weights, d), d)
  for _ in range(power_iters):
    b = projection.project_on(q, per_example_loss_fn, params, batches).values  # G⊥Qᵀ = GQᵀ (Q ⊥ D).
    q = orthonormal_rows(_transpose_products(per_example_loss_fn, params, batches, b, d), d)
  b = projection.project_on(q, per_example_loss_fn, params, batches).values
  _, _, vt = jnp.linalg.svd(b.astype(q.dtype), full_matrices=False)
  return vt[:rank] @ q
