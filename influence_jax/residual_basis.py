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
orthonormal by an SVD after projecting out U twice.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import sharding
from influence_jax import validation
from influence_jax.types import PerExampleLossFn


def orthonormal_rows(y: jax.Array, against: jax.Array) -> jax.Array:
  """Returns (l, p) rows spanning those of `y` (l, p) minus their part in the span of `against`'s orthonormal
  rows: orthonormal up to the remainder's numerical rank (singular values > 1000·eps·the largest), zero
  beyond it (a fixed shape whatever the data: no recompilation downstream).

  The projection is applied twice (re-orthogonalisation); the rows come from an SVD of the remainder.
  """
  for _ in range(2):
    y = y - (y @ against.T) @ against
  _, s, vt = jnp.linalg.svd(y, full_matrices=False)
  return vt * (jnp.arange(vt.shape[0]) < _numerical_rank(s))[:, None].astype(vt.dtype)


def _numerical_rank(singular_values: jax.Array) -> int:
  """Returns how many of the (descending) singular values exceed 1000·eps·the largest (0 if all are zero)."""
  s = singular_values
  return int(jnp.sum(s > 1000 * jnp.finfo(s.dtype).eps * s[0])) if s.size and float(s[0]) > 0 else 0


@functools.partial(jax.jit, static_argnums=0)
def _weighted_gradients(per_example_loss_fn: PerExampleLossFn, params, batch, weights: jax.Array) -> jax.Array:
  """Returns (l, p) Σ_i weights[i, j] ∇ℓ(z_i) for each column j of (B, l) `weights`."""
  flat, unravel = ravel_pytree(params)
  _, vjp_fn = jax.vjp(lambda f: per_example_loss_fn(unravel(f), batch), flat)
  return jax.vmap(lambda w: vjp_fn(w.astype(flat.dtype))[0])(weights.T)


def _transpose_products(per_example_loss_fn, params, batches, weights, dtype, columns: int = 32) -> jax.Array:
  """Returns (l, p) GᵀW = Σ_i W[i] ∇ℓ(z_i) over the examples of `batches`, W (n, l) (`orthonormal_rows`
  then takes the part outside D: G⊥ᵀW).

  The l weighted gradients are taken `columns` at a time (one compiled program; memory: `columns`
  backward passes of a batch).
  """
  l = weights.shape[1]
  padded = jnp.pad(weights, ((0, 0), (0, -l % columns)))
  blocks = []
  for c in range(0, padded.shape[1], columns):
    total, start = 0.0, 0
    for batch in batches:
      n = data_lib.batch_size(batch)
      total = total + _weighted_gradients(per_example_loss_fn, params, batch,
                                          padded[start:start + n, c:c + columns]).astype(dtype)
      start += n
    blocks.append(total)
  return jnp.concatenate(blocks)[:l]


def fit_residual_basis(
    directions: jax.Array,
    per_example_loss_fn: PerExampleLossFn,
    params: Any,
    batches: Iterable[Any],
    rank: int,
    *,
    oversample: int = 16,
    power_iters: int = 1,
    seed: int = 0,
) -> jax.Array:
  """Returns V (r, p), r ≤ rank: orthonormal rows, orthogonal to `directions`, the top right singular vectors
  of the sample's remainders (I − DᵀD)∇ℓ(z), largest first, each with its largest entry positive; r < rank when the remainders numerically span
  fewer than `rank` dimensions (e.g. softmax gradients, whose logit parts sum to zero). V is on one
  device, in ravel_pytree order (`sharding.to_flat_layout` puts it on a mesh beside an eigenspace).

  `directions` D: (k, p) orthonormal rows, or an eigenspace's (k, P) flat layout (zero beyond p);
  `batches`: the sample (held in memory); cost, with l = rank + oversample (at most the sample size
  and p − k): (1 + power_iters) × l weighted gradients and (1 + power_iters) projections of the
  sample on l directions. When l reaches the rank of the sample's remainders the result is exact.
  """
  flat, _ = ravel_pytree(params)
  p = flat.size
  if np.ndim(directions) != 2 or np.shape(directions)[1] < p:
    raise ValueError(f"directions have shape {np.shape(directions)}; expected (k, p) or (k, P ≥ p) for params of "
                     f"{p} numbers.")
  d = jnp.asarray(directions)[:, :p]
  batches = data_lib.materialize(batches, "batches")
  n = sum(data_lib.batch_size(b) for b in batches)
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a positive integer, got {rank!r}.")
  if oversample < 0 or power_iters < 0:
    raise ValueError(f"oversample and power_iters must be non-negative, got {oversample} and {power_iters}.")
  rank, most = int(rank), min(n, p - d.shape[0])
  if rank > most:
    raise ValueError(f"rank {rank} is more than the sample's remainders can span: {n} sample examples, "
                     f"p − k = {p - d.shape[0]} parameters outside the eigenspace.")
  width = min(rank + oversample, most)
  validation.check_finite(params, "params")
  weights = jnp.asarray(np.random.default_rng(seed).standard_normal((n, width)), d.dtype)
  q = orthonormal_rows(_transpose_products(per_example_loss_fn, params, batches, weights, d.dtype), d)
  for _ in range(power_iters):
    b = projection.project_on(q, per_example_loss_fn, params, batches).values  # G⊥Qᵀ = GQᵀ (Q ⊥ D).
    b = jnp.linalg.qr(b.astype(d.dtype))[0]  # Orthonormal columns: G⊥ᵀb keeps κ, not κ², in float32.
    q = orthonormal_rows(_transpose_products(per_example_loss_fn, params, batches, b, d.dtype), d)
  b = projection.project_on(q, per_example_loss_fn, params, batches).values
  _, s, vt = jnp.linalg.svd(b.astype(q.dtype), full_matrices=False)
  v = vt[:min(int(rank), _numerical_rank(s))] @ q
  return v * jnp.sign(v[jnp.arange(v.shape[0]), jnp.argmax(jnp.abs(v), axis=1)])[:, None]  # Largest entry > 0.


def stored_directions(directions: jax.Array, basis: Optional[jax.Array]) -> jax.Array:
  """Returns W = [D; V] (k + r, ·): the directions a stored row is exact on, in the layout of `directions`
  ((k, p), or a mesh's flat layout (k, P)); `directions` itself when `basis` is None.

  V (r, p) is a residual basis of `fit_residual_basis` (host or device values).
  """
  if basis is None:
    return directions
  v = sharding.to_flat_layout(jnp.asarray(basis, directions.dtype), np.shape(basis)[1], sharding.mesh_of(directions))
  return _concatenate_rows(directions.sharding)(directions, v)


@functools.lru_cache(maxsize=8)
def _concatenate_rows(out_sharding):
  return jax.jit(lambda a, b: jnp.concatenate([a, b]), out_shardings=out_sharding)
