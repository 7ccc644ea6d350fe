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

V is found by a randomized SVD of the (n × p) sample matrix G⊥ (Halko,
Martinsson & Tropp 2011, Algorithm 4.4) without ever holding it: each pass
over the sample forms the per-example gradients of a chunk of rows at a time
(`CHUNK_BYTES`) and multiplies them into GᵀW or GQᵀ, so a pass costs one
per-example backward pass an example plus a (c × p) · (p × l) matmul a chunk,
whatever l (a weighted-VJP product would cost l backward passes an example,
every token's included); rows are made orthonormal from l × l Gram matrices
after projecting out U twice. Everything p-sized — the chunk's gradients, the
(l, P) products and V — is in the mesh's flat layout (`sharding`), split over
'model', and the params keep their own layout.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import sharding
from influence_jax import validation
from influence_jax.types import PerExampleLossFn


def orthonormal_rows(y: jax.Array, against: jax.Array) -> jax.Array:
  """Returns (l, p) rows spanning those of `y` (l, p) minus their part in the span of `against`'s orthonormal
  rows: orthonormal up to the remainder's numerical rank (singular values > 1000·eps·the largest), zero
  beyond it (a fixed shape whatever the data: no recompilation downstream).

  The projection is applied twice (re-orthogonalisation). The rows come from (l × l) Gram matrices, l²p
  multiply-adds each where a QR or SVD of the wide (l, p) matrix is tens of times slower on CPU:
  Λ^(-1/2) Aᵀ y for y yᵀ = A Λ Aᵀ, applied `GRAM_PASSES` times (as CholeskyQR is repeated): the first
  pass leaves rows of small singular value far from orthonormal (a Gram matrix squares the condition
  number), the next ones, on better and better conditioned rows, make them orthonormal to rounding.
  """
  for _ in range(2):
    y = y - (y @ against.T) @ against
  eps = jnp.finfo(y.dtype).eps
  floor = 1000 * eps * jnp.sqrt(jnp.max(jnp.linalg.eigvalsh(_gram(y))))
  for i in range(GRAM_PASSES):
    y = _gram_orthonormal(y, floor if i == 0 else 1000 * eps)
  return y


# Passes of `_gram_orthonormal` in `orthonormal_rows`: with singular values down to 1000·eps of the largest
# (a condition number of 1/(1000·eps)), one pass leaves errors of eps·κ² and each further pass squares
# what is left, so three reach rounding.
GRAM_PASSES = 3


def _gram(y: jax.Array) -> jax.Array:
  return jnp.matmul(y, y.T, precision=jax.lax.Precision.HIGHEST)


def _gram_orthonormal(y: jax.Array, floor) -> jax.Array:
  """Returns (l, p) rows Λ^(-1/2) Aᵀ y (y yᵀ = A Λ Aᵀ, largest first) for the singular values √λ above
  `floor`, zero rows beyond them."""
  w, a = jnp.linalg.eigh(_gram(y))
  w, a = w[::-1], a[:, ::-1]
  s = jnp.sqrt(jnp.maximum(w, 0.0))
  keep = s > floor
  return (a * jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)).T @ y


def _numerical_rank(singular_values: jax.Array) -> int:
  """Returns how many of the (descending) singular values exceed 1000·eps·the largest (0 if all are zero)."""
  s = singular_values
  return int(jnp.sum(s > 1000 * jnp.finfo(s.dtype).eps * s[0])) if s.size and float(s[0]) > 0 else 0


# Per-example gradients formed at once while fitting a basis: a chunk of the sample of at most this many
# bytes (and at most MAX_CHUNK_ROWS rows), so memory stays bounded whatever p is.
CHUNK_BYTES = 64 << 20
MAX_CHUNK_ROWS = 128


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=5)
def _add_weighted_gradients(per_example_loss_fn, mesh, params, chunk, weights: jax.Array, total: jax.Array) -> jax.Array:
  """Returns `total` (l, P) + Σ_i weights[i] ∇ℓ(z_i) over the examples of `chunk`, `weights` (c, l), in `mesh`'s
  flat layout."""
  g = projection.flat_value_and_grads(per_example_loss_fn, params, chunk, total.shape[1], mesh)[1]
  out = total + weights.T.astype(total.dtype) @ g.astype(total.dtype)
  return jax.lax.with_sharding_constraint(out, sharding.flat_sharding(mesh, 2))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _projected_gradients(per_example_loss_fn, mesh, params, chunk, rows: jax.Array) -> jax.Array:
  """Returns the (c, l) products ∇ℓ(z_i) · rows[j] over the examples of `chunk`, `rows` (l, P) in `mesh`'s flat
  layout."""
  g = projection.flat_value_and_grads(per_example_loss_fn, params, chunk, rows.shape[1], mesh)[1]
  return g.astype(rows.dtype) @ rows.T


class _Sample:
  """The basis's sample as equal chunks of rows (the last padded by repeating an example), on `mesh`: every
  pass over it forms each chunk's per-example gradients once, in the flat layout, and multiplies them, one
  compiled program a product."""

  def __init__(self, batches, num_params: int, itemsize: int, mesh):
    self.examples = data_lib.concatenate(batches)
    self.size = data_lib.batch_size(self.examples)
    self.rows = max(1, min(MAX_CHUNK_ROWS, self.size, CHUNK_BYTES // (num_params * itemsize)))
    self.mesh = mesh

  def chunks(self):
    """Yields (lo, hi, chunk of self.rows examples, replicated on the mesh) covering rows lo..hi−1."""
    for lo in range(0, self.size, self.rows):
      hi = min(lo + self.rows, self.size)
      chunk = data_lib.pad(data_lib.take(self.examples, lo, hi), self.rows)
      yield lo, hi, sharding.put_tree(chunk, sharding.replicated(self.mesh))

  def transpose_products(self, per_example_loss_fn, params, weights: jax.Array, columns: int) -> jax.Array:
    """Returns (l, P) GᵀW = Σ_i W[i] ∇ℓ(z_i), W (n, l) (`orthonormal_rows` then takes the part outside D)."""
    padded = jnp.pad(weights, ((0, self.rows), (0, 0)))  # Padding rows weigh 0.
    total = sharding.put(np.zeros((weights.shape[1], columns), weights.dtype), sharding.flat_sharding(self.mesh, 2))
    for lo, _, chunk in self.chunks():
      total = _add_weighted_gradients(per_example_loss_fn, self.mesh, params, chunk, padded[lo:lo + self.rows], total)
    return total

  def projections(self, per_example_loss_fn, params, rows: jax.Array) -> jax.Array:
    """Returns (n, l) G rowsᵀ: every sample example's gradient on each of the (l, P) `rows`."""
    return jnp.concatenate([_projected_gradients(per_example_loss_fn, self.mesh, params, chunk, rows)[:hi - lo]
                            for lo, hi, chunk in self.chunks()])


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
    mesh: Optional[jax.sharding.Mesh] = None,
) -> jax.Array:
  """Returns V (r, P), r ≤ rank: orthonormal rows, orthogonal to `directions`, the top right singular vectors
  of the sample's remainders (I − DᵀD)∇ℓ(z), largest first, each with its largest entry positive; r < rank
  when the remainders numerically span fewer than `rank` dimensions (e.g. softmax gradients, whose logit
  parts sum to zero). V is in the flat layout of `mesh` (default: the directions' mesh, one device for host
  directions; `sharding`): ravel_pytree order, P = padded_dim(p) columns split over 'model', zero beyond p,
  so no device holds more than (r + rank + oversample)·P / |model| numbers of it; params keep their layout.

  `directions` D: (k, p) orthonormal rows, or an eigenspace's (k, P) flat layout (zero beyond p);
  `batches`: the sample (held in memory); cost, with l = rank + oversample (at most the sample size
  and p − k): 2 + 2·power_iters passes over the sample, each one per-example gradient an example and
  2·l·p multiply-adds an example. When l reaches the rank of the sample's remainders the result is exact.
  """
  p = sharding.num_params(params)
  if np.ndim(directions) != 2 or np.shape(directions)[1] < p:
    raise ValueError(f"directions have shape {np.shape(directions)}; expected (k, p) or (k, P ≥ p) for params of "
                     f"{p} numbers.")
  mesh = sharding.mesh_of(directions) if mesh is None else mesh
  d = sharding.to_flat_layout(directions, p, mesh)
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
  params = sharding.place_params(params, mesh)
  weights = sharding.put(np.random.default_rng(seed).standard_normal((n, width)).astype(d.dtype),
                         sharding.replicated(mesh))
  sample = _Sample(batches, p, jnp.dtype(d.dtype).itemsize, mesh)
  q = _orthonormal_rows(mesh, sample.transpose_products(per_example_loss_fn, params, weights, d.shape[1]), d)
  for _ in range(power_iters):
    b = sample.projections(per_example_loss_fn, params, q)  # G⊥Qᵀ = GQᵀ (Q ⊥ D).
    b = jnp.linalg.qr(b)[0]  # Orthonormal columns: G⊥ᵀb keeps κ, not κ², in float32.
    q = _orthonormal_rows(mesh, sample.transpose_products(per_example_loss_fn, params, b, d.shape[1]), d)
  b = sample.projections(per_example_loss_fn, params, q)
  _, s, vt = jnp.linalg.svd(b.astype(q.dtype), full_matrices=False)
  return _leading_rows(mesh, vt[:min(int(rank), _numerical_rank(s))], q)


def _orthonormal_rows(mesh, y: jax.Array, against: jax.Array) -> jax.Array:
  """`orthonormal_rows` in one program, the result in `mesh`'s flat layout (no gather of the (l, P) rows)."""
  return _on_flat_layout(orthonormal_rows, mesh)(y, against)


def _signed_rows(coefficients: jax.Array, q: jax.Array) -> jax.Array:
  """Returns the rows coefficients @ q, each signed so that its largest entry is positive."""
  v = coefficients.astype(q.dtype) @ q
  return v * jnp.sign(v[jnp.arange(v.shape[0]), jnp.argmax(jnp.abs(v), axis=1)])[:, None]


def _leading_rows(mesh, coefficients: jax.Array, q: jax.Array) -> jax.Array:
  """Returns `_signed_rows` (r, P) in `mesh`'s flat layout."""
  return _on_flat_layout(_signed_rows, mesh)(coefficients, q)


@functools.lru_cache(maxsize=16)
def _on_flat_layout(fn, mesh):
  return jax.jit(fn, out_shardings=sharding.flat_sharding(mesh, 2))


def stored_directions(directions: jax.Array, basis: Optional[jax.Array]) -> jax.Array:
  """Returns W = [D; V] (k + r, ·): the directions a stored row is exact on, in the layout of `directions`
  ((k, p), or a mesh's flat layout (k, P)); `directions` itself when `basis` is None.

  V: a residual basis of `fit_residual_basis`, (r, p) or a flat layout (r, P ≥ p) of any mesh (zero beyond p),
  host or device values; read in place when it is already in the directions' layout.
  """
  if basis is None:
    return directions
  columns = min(np.shape(basis)[1], directions.shape[1])  # Both zero beyond p: the narrower one's columns.
  v = sharding.to_flat_layout(basis if isinstance(basis, jax.Array) else np.asarray(basis, directions.dtype), columns,
                              sharding.mesh_of(directions)).astype(directions.dtype)
  return _concatenate_rows(directions.sharding)(directions, v)


@functools.lru_cache(maxsize=8)
def _concatenate_rows(out_sharding):
  return jax.jit(lambda a, b: jnp.concatenate([a, b]), out_shardings=out_sharding)
