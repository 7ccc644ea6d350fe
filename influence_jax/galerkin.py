"""The Galerkin solve on the stored directions W = [U; V]: the inverse curvature exact on span W, 1/c beyond.

A projection store keeps every training gradient's coordinates W∇ℓ(z) exactly on d = k + r orthonormal
directions (the eigenvectors U and the residual basis V) and only a sketch of the rest. Restricting
(C + δI) x = g to span W (Galerkin) needs C only through the (d, d) matrix H_W = W C Wᵀ, formed once
from d curvature products (`restricted_curvature`); beyond W the tail's 1/c stands in for the inverse:

    x̂(g) = Wᵀ (H_W + δI)⁻¹ W g + (I − WᵀW) g / c,      c = λ_k + δ,

which is `preconditioning.apply_tail_inverse` with the dense M = (H_W + δI)⁻¹. Against a stored row
[W∇ℓ(z), R(I − WᵀW)∇ℓ(z)] its query side is [(H_W + δI)⁻¹ W g, R(I − WᵀW) g / c]
(`galerkin_query_side`): a (d, d) product per query on the query's own projections, no pass over the
curvature sample. On W = U alone, H_W = Λ (the Ritz values) and it is the plain spectral tail; V's rows
are where it adds what the tail misses (V C Vᵀ and the coupling U C Vᵀ). It is also the preconditioner
and start of CG iterations that refine it (`galerkin_tail_inverse` into `preconditioned_solve`).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import sharding as sharding_lib
from influence_jax import solvers
from influence_jax.curvature import LinearOperator
from influence_jax.preconditioning import TailInverse


def restricted_curvature(op: LinearOperator, directions: jax.Array, *, block_size: int = 32,
                         callback: Optional[Callable[[int], None]] = None) -> np.ndarray:
  """Returns H_W = W C Wᵀ (d, d) in float64, symmetrised, for the rows W of `directions` (d, p), or
  (d, P) in the flat layout of the operator's mesh; `block_size` rows a pass over C's batches;
  `callback(rows)` after each pass (for progress)."""
  d, columns = directions.shape
  if columns not in (op.dim, sharding_lib.padded_dim(op.dim, op.mesh)):
    raise ValueError(f"directions must be (d, {op.dim}) or in the operator's flat layout; got {directions.shape}.")
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}.")
  rows = []
  for lo in range(0, d, block_size):
    block = directions[lo:lo + block_size]
    if block.shape[0] < block_size and d > block_size:  # One compiled pass: pad the last block with zeros.
      block = jnp.concatenate([block, jnp.zeros((block_size - block.shape[0], columns), block.dtype)])
    rows.append(np.asarray(sharding_lib.to_host(
        _restricted_rows(op.matvec, op.dim, op.mesh, op.operands, block, directions)), np.float64))
    if callback is not None:
      callback(min(block_size, d - lo))
  h = np.concatenate(rows)[:d]
  return (h + h.T) / 2


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _restricted_rows(fn, dim, mesh, operands, block, directions):
  """Returns (B, d) rows (C w_b) · w_j for the rows w_b of `block`."""
  return solvers.block_matvec(fn, operands, dim, mesh, block) @ directions.T


class GalerkinInverse(NamedTuple):
  """(H_W + δI)⁻¹ (d, d) float64, and how it was made: smallest eigenvalue of H_W + δI before the floor,
  and how many eigenvalues were raised to the floor (`galerkin_inverse`)."""

  inverse: np.ndarray
  min_eigenvalue: float
  floored: int


def galerkin_inverse(restricted: np.ndarray, damping: float, tail_constant: float) -> GalerkinInverse:
  """Returns (H_W + δI)⁻¹ from H_W (d, d), by an eigendecomposition in float64.

  Eigenvalues μ of H_W + δI that are not positive (C + δI indefinite on span W: the Hessian away
  from a minimum) are raised to the tail constant c, i.e. treated as the directions beyond W are,
  so the result is always symmetric positive definite; how many were is reported (`floored`).
  """
  restricted = np.asarray(restricted, np.float64)
  if restricted.ndim != 2 or restricted.shape[0] != restricted.shape[1]:
    raise ValueError(f"H_W must be square; got shape {restricted.shape}.")
  if not np.all(np.isfinite(restricted)):
    raise ValueError("H_W has non-finite entries: the curvature products were not finite.")
  if not (np.isfinite(tail_constant) and tail_constant > 0):
    raise ValueError(f"The tail constant must be finite and positive, got {tail_constant}.")
  mu, q = np.linalg.eigh(restricted + damping * np.eye(restricted.shape[0]))
  bad = mu <= 0
  return GalerkinInverse((q / np.where(bad, tail_constant, mu)) @ q.T, float(mu.min()), int(bad.sum()))


def galerkin_tail_inverse(directions: jax.Array, inverse: np.ndarray, tail_constant: float) -> TailInverse:
  """Returns the preconditioner P = Wᵀ(H_W + δI)⁻¹W + (I − WᵀW)/c for `preconditioning.preconditioned_solve`
  (W: the (d, P) directions, laid out as the solve's vectors)."""
  dtype = directions.dtype
  mesh = sharding_lib.mesh_of(directions)
  rep = sharding_lib.replicated(mesh)
  return TailInverse(directions, sharding_lib.put(np.asarray(inverse, dtype), rep),
                     sharding_lib.put(np.asarray(tail_constant, dtype), rep))


def galerkin_query_side(inverse: np.ndarray, tail_constant: float, projections: np.ndarray,
                        sketch=None) -> np.ndarray:
  """Returns the (T, d [+ m]) query vectors [(H_W + δI)⁻¹ W g, R(I − WᵀW) g / c] of queries whose stored-row
  form is [W g (T, d), R(I − WᵀW) g (T, m)]: score(z, x) = q(x) · [W∇ℓ(z), R(I − WᵀW)∇ℓ(z)] ≈ ∇ℓ(x)ᵀ x̂(z)
  (positive: z is a proponent of x), x̂ the Galerkin solve of the module docstring."""
  projections = np.asarray(projections, np.float64)
  if projections.ndim != 2 or projections.shape[1] != inverse.shape[0]:
    raise ValueError(f"projections must be (T, {inverse.shape[0]}); got shape {projections.shape}.")
  top = projections @ inverse
  if sketch is None:
    return top
  return np.concatenate([top, np.asarray(sketch, np.float64) / tail_constant], axis=1)
