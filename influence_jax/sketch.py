"""A Kronecker-structured random sketch of per-example gradients, for a reusable spectral tail.

The tail term of a score needs ∇ℓ(x)ᵀ(I − UᵀU)∇ℓ(z) for every query x and training example z
(docs/design.md, "Arnoldi influence and the spectral tail"). Storing, beside G(z) = U∇ℓ(z), the sketch S(z) = R(I − UᵀU)∇ℓ(z) with a
random R of m rows and E[RᵀR] = I makes that term S(x)ᵀS(z) for any later query set, without
touching the training set again (Johnson–Lindenstrauss, as TRAK does for whole gradients).

R = A ⊗ B acts on the flat gradient reshaped to (p₁, p₂), p₁p₂ ≥ p (zero padded): R g = A G Bᵀ,
with A (m₁ × p₁) and B (m₂ × p₂) having orthonormal rows scaled by √(p₁/m₁) and √(p₂/m₂), so
m = m₁m₂ and applying it costs m₁(p + m₂p₂) per example instead of m·p. When m ≥ p₁p₂ the sketch
is an orthogonal map and S(x)ᵀS(z) is exact.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import sharding as sharding_lib
from influence_jax.types import PerExampleLossFn


class KroneckerSketch(NamedTuple):
  """R = left ⊗ right on gradients reshaped to (left.shape[1], right.shape[1]); dim = m₁m₂ rows."""

  left: jax.Array
  right: jax.Array
  num_params: int

  @property
  def dim(self) -> int:
    return self.left.shape[0] * self.right.shape[0]


def _factor_shape(num_params: int) -> tuple[int, int]:
  p1 = math.isqrt(num_params)
  p1 += p1 * p1 < num_params
  return p1, -(-num_params // p1)


def _scaled_orthonormal_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
  q, _ = np.linalg.qr(rng.standard_normal((cols, rows)))
  return q.T * np.sqrt(cols / rows)  # float64: cast once, to the sketch's dtype.


def make_sketch(num_params: int, dim: int, seed: int, dtype=jnp.float32) -> KroneckerSketch:
  """Returns a sketch of about `dim` rows (m₁m₂ ≤ dim, m₁ ≈ m₂; exact when dim ≥ p₁p₂) fixed by `seed`."""
  if dim < 1:
    raise ValueError(f"The sketch dimension must be positive, got {dim}.")
  p1, p2 = _factor_shape(num_params)
  if dim >= p1 * p2:
    m1, m2 = p1, p2
  else:
    m1 = min(p1, max(1, math.isqrt(dim)))
    m2 = min(p2, max(1, dim // m1))
  rng = np.random.default_rng(seed)
  left = _scaled_orthonormal_rows(rng, m1, p1)
  right = _scaled_orthonormal_rows(rng, m2, p2)
  return KroneckerSketch(jnp.asarray(left, dtype), jnp.asarray(right, dtype), int(num_params))


def apply_sketch(sketch: KroneckerSketch, vectors: jax.Array, mesh: Optional[Mesh] = None) -> jax.Array:
  """Returns (B, m) R v for (B, c) flat vectors v, c ≥ p (columns beyond p are ignored).

  Without `mesh` on one device. With `mesh`, the vectors in its flat layout (`sharding.to_flat_layout`;
  traceable) and each 'model' device sketches its own columns (`_sketch_piece`): it holds B·P/|model|
  numbers of the vectors and the factors A (m₁ × p₁) and B (m₂ × p₂), of about √(m·p) numbers each,
  never a p-sized product; the (B, m) partial results are summed over 'model'.
  """
  p = sketch.num_params
  if mesh is None:
    return _sketch_piece(sketch.left, sketch.right, vectors[:, :p], 0, p, p)
  columns = sharding_lib.padded_dim(p, mesh)
  x = sharding_lib.pad_last(vectors[:, :min(vectors.shape[1], columns)], columns)
  rows = sharding_lib.DATA if x.shape[0] % sharding_lib.axis_size(mesh, sharding_lib.DATA) == 0 else None
  piece = columns // sharding_lib.axis_size(mesh, sharding_lib.MODEL)

  def local(left, right, x):
    start = jax.lax.axis_index(sharding_lib.MODEL) * piece
    return jax.lax.psum(_sketch_piece(left, right, x, start, p, columns), sharding_lib.MODEL)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(rows, sharding_lib.MODEL)), out_specs=P(rows, None))(
      sketch.left, sketch.right, x)


def _sketch_piece(left: jax.Array, right: jax.Array, x: jax.Array, start, num_params: int, columns: int) -> jax.Array:
  """Returns (B, m₁m₂) Σ_i A[:, i // p₂] ⊗ B[:, i % p₂] v_i over the columns i = start … start + c − 1 of
  (B, columns) flat vectors (only i < num_params) held in `x` (B, c): R v restricted to them (R v when
  start = 0 and c ≥ p).

  The piece is laid on the rows of the (p₁, p₂) grid it meets (at most ⌈(c + p₂ − 1) / p₂⌉, zeros around
  it), multiplied by Bᵀ, then by those rows' columns of A (zero columns beyond p₁).
  """
  p2 = right.shape[1]
  size, c = x.shape
  rows = -(-(c + p2 - 1) // p2)
  start = jnp.asarray(start, jnp.int32)
  x = jnp.where(start + jnp.arange(c, dtype=jnp.int32) < num_params, x.astype(left.dtype), 0)
  grid = jax.lax.dynamic_update_slice(jnp.zeros((size, rows * p2), left.dtype), x, (jnp.int32(0), start % p2))
  half = jnp.einsum("brj,cj->brc", grid.reshape(size, rows, p2), right)
  # Grid rows past p₁ hold only zeros: A is extended by zero columns so that no slice is clamped.
  left = jnp.pad(left, ((0, 0), (0, max(0, -(-columns // p2) - left.shape[1]) + rows)))
  a = jax.lax.dynamic_slice_in_dim(left, start // p2, rows, axis=1)
  return jnp.einsum("ar,brc->bac", a, half).reshape(size, -1)


class SketchedProjections(NamedTuple):
  """Per example: projections (B, k) U∇ℓ, sq_norms (B,) ‖∇ℓ‖², sketch (B, m) R(I − UᵀU)∇ℓ (or (B, 0)),
  losses (B,) ℓ (for finiteness checks: a NaN loss can have a finite, zero gradient)."""

  projections: jax.Array
  sq_norms: jax.Array
  sketch: jax.Array
  losses: jax.Array


def divisor_at_most(n: int, limit: int) -> int:
  """Returns the largest divisor of n that is ≤ limit (≥ 1)."""
  best = 1
  for d in range(1, int(math.isqrt(n)) + 1):
    if n % d == 0:
      for c in (d, n // d):
        if best < c <= limit:
          best = c
  return best


def _by_micro(batch, micro: int):
  size = data_lib.batch_size(batch)
  return jax.tree.map(lambda x: x.reshape((size // micro, micro) + x.shape[1:]), batch)


def sketch_directions(sketch: KroneckerSketch, directions: jax.Array) -> jax.Array:
  """Returns the (k, m) rows R u_j of directions U ((k, p), or a mesh's flat layout (k, P), zero beyond p), on
  the directions' mesh: what `project_and_sketch` subtracts, R(I − UᵀU)g = Rg − (RUᵀ)(Ug). Compute it once for
  a stream of batches (it costs a pass over U)."""
  mesh = sharding_lib.mesh_of(directions)
  return _sketch_rows(int(sketch.num_params), mesh)((sketch.left, sketch.right), directions)


@functools.lru_cache(maxsize=16)
def _sketch_rows(p: int, mesh):
  return jax.jit(lambda factors, directions: apply_sketch(KroneckerSketch(*factors, p), directions, mesh))


def _static_sketch(sketch: KroneckerSketch | None, directions: jax.Array, sketched: jax.Array | None) -> tuple:
  """Returns (factors (A, B, R Uᵀ rows) or None, p): a sketch as the jitted paths take it (p static)."""
  if sketch is None:
    return None, 0
  sketched = sketch_directions(sketch, directions) if sketched is None else sketched
  return (sketch.left, sketch.right, sketched), int(sketch.num_params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _project_and_sketch(per_example_loss_fn: PerExampleLossFn, microbatch_size: int, mesh, p: int, params, directions,
                        factors, batch):
  """The "vjp" path: per-example gradients of a micro-batch in `mesh`'s flat layout, then U g and R g from them."""
  sketch = None if factors is None else KroneckerSketch(*factors[:2], p)
  columns = directions.shape[1]  # ≥ p: a mesh's flat layout, zero beyond p.

  def one_micro(mb):
    losses, grads = projection.flat_value_and_grads(per_example_loss_fn, params, mb, columns, mesh)
    grads = grads.astype(directions.dtype)
    proj = grads @ directions.T
    sq = jnp.sum(grads * grads, axis=1)
    sk = jnp.zeros((grads.shape[0], 0), grads.dtype) if sketch is None else apply_sketch(sketch, grads, mesh)
    return proj, sq, sk, losses

  size = data_lib.batch_size(batch)
  proj, sq, sk, losses = jax.lax.map(one_micro, _by_micro(batch, microbatch_size))
  proj, sq, sk = proj.reshape(size, -1), sq.reshape(size), sk.reshape(size, -1)
  if sketch is not None:
    sk = sk - proj @ factors[2]  # R(I − UᵀU)g = Rg − (RUᵀ)(Ug)
  return proj, sq, sk, losses.reshape(size)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _layerwise_project_and_sketch(per_example_loss_fn: PerExampleLossFn, micro: int, chunk: int, mesh, p: int, params,
                                  directions, factors, batch):
  """The "layerwise" path: U g layer by layer (no p-sized buffer for the matmul with U); the flat gradients
  for R g and ‖g‖² assembled from the same pass's layer pieces, `chunk` examples at a time (kept in cache)."""
  sketch = None if factors is None else KroneckerSketch(*factors[:2], p)
  size = data_lib.batch_size(batch)
  example = jax.tree.map(lambda x: x[:1], batch)
  if sketch is None:
    gradient_fn = lambda g: jnp.zeros((g.shape[0], 0), g.dtype)
  else:
    gradient_fn = lambda g: apply_sketch(sketch, g, mesh)
  projector = per_example_loss_fn.micro_projector_with_gradients(params, directions, example, gradient_fn, chunk)
  proj, sq, sk, losses = jax.lax.map(projector, _by_micro(batch, micro))
  proj, sk = proj.reshape(size, -1), sk.reshape(size, -1)
  if sketch is not None:
    sk = sk - proj @ factors[2]  # R(I − UᵀU)g = Rg − (RUᵀ)(Ug)
  return proj, sq.reshape(size), sk, losses.reshape(size)


# Flat per-example gradients held at once: 256 MiB when a matmul with the k directions follows (its
# arithmetic intensity grows with the micro-batch), 8 MiB when only the sketch does (kept in cache).
_PROJECT_GRADIENT_BYTES = 256 * 2**20
_SKETCH_GRADIENT_BYTES = 8 * 2**20


def store_method(per_example_loss_fn: PerExampleLossFn, method: str | None, sketched: bool, params: Any, example: Any) -> str:
  """Returns how `project_and_sketch` computes U∇ℓ: `method` when given; else `projection.resolve_method`'s
  default, except "vjp" for a sketched store of a model with less than half its parameters in layers
  projected without their per-example gradient (`LayerwiseLoss.factored_fraction`; `example`: a batch
  of one, arrays or shapes). The sketch needs every flat per-example gradient, so the layer-wise pass
  then saves little, and one matmul with U beats many small per-layer ones (a Transformer's
  position-wise layers; docs/throughput.md)."""
  resolved = projection.resolve_method(per_example_loss_fn, method)
  if method is None and resolved == "layerwise" and sketched:
    if projection.as_layerwise(per_example_loss_fn).factored_fraction(params, example) < 0.5:
      return "vjp"
  return resolved


def project_and_sketch(directions: jax.Array, sketch: KroneckerSketch | None, per_example_loss_fn: PerExampleLossFn,
                       params: Any, batch: Any, *, microbatch_size: int = 0, method: str | None = None,
                       sketched_directions: jax.Array | None = None) -> SketchedProjections:
  """Returns U∇ℓ, ‖∇ℓ‖², R(I − UᵀU)∇ℓ and ℓ for every example of `batch`.

  Directions U: (k, p) orthonormal rows, or an eigenspace's (k, P) flat layout (zero beyond p). It runs on
  the directions' mesh (`sharding.mesh_of`): per-example gradients and the sketch in its flat layout
  (`apply_sketch`), params as laid out (a model split over 'model' keeps its layout).

  `method` ("vjp" or "layerwise"; None: `store_method`'s choice from the model's layers) is how
  U∇ℓ is computed. "vjp" forms per-example gradients, a micro-batch at a time, and
  multiplies them by U. "layerwise" projects layer by layer in the same forward and backward pass
  that assembles the flat per-example gradients, a few examples at a time, for R∇ℓ and ‖∇ℓ‖².
  Micro-batches divide the batch; `microbatch_size` (0: from a memory budget) is how many flat
  per-example gradients exist at once. `sketched_directions`: `sketch_directions(sketch, directions)`,
  computed here when not given (pass it when projecting many batches on the same directions).
  """
  example = projection.shape_of_one(batch)
  method = store_method(per_example_loss_fn, method, sketch is not None, params, example)
  if method not in ("vjp", "layerwise"):
    raise ValueError(f"project_and_sketch needs method 'vjp' or 'layerwise', got {method!r} (jvp never forms the "
                     "gradient that the sketch and the squared norm need).")
  size = data_lib.batch_size(batch)
  num_params = sum(x.size for x in jax.tree.leaves(params))  # Shapes only: nothing is concatenated per batch.
  mesh = sharding_lib.mesh_of(directions)
  directions = sharding_lib.to_flat_layout(directions, num_params, mesh)
  factors, p = _static_sketch(sketch, directions, sketched_directions)
  gradient_bytes = num_params * jnp.dtype(directions.dtype).itemsize
  if method == "layerwise":
    per_example_loss_fn = projection.as_layerwise(per_example_loss_fn)
  if method == "vjp":
    micro = divisor_at_most(size, microbatch_size or max(1, _PROJECT_GRADIENT_BYTES // gradient_bytes))
    return SketchedProjections(*_project_and_sketch(per_example_loss_fn, micro, mesh, p, params, directions, factors,
                                                    batch))
  per_example = per_example_loss_fn.bytes_per_example(params, directions.shape[0], example)
  micro = divisor_at_most(size, max(1, projection.LAYERWISE_BYTES // per_example))
  chunk = divisor_at_most(micro, microbatch_size or max(1, _SKETCH_GRADIENT_BYTES // gradient_bytes))
  return SketchedProjections(*_layerwise_project_and_sketch(per_example_loss_fn, micro, chunk, mesh, p, params,
                                                            directions, factors, batch))
