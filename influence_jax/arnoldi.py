"""Arnoldi iteration with full re-orthogonalisation, and distillation to top-k eigenpairs.

The basis is one (rows, p) array, rows ≥ n_iters + 1, preallocated with
zeros, so its parameter axis can be sharded over devices. Each step is one
jitted function: the curvature product, the symmetric three-term recurrence,
a full block-Gram-Schmidt re-orthogonalisation over the filled blocks of the
basis (a second one when the first removed much, the DGKS test), and the
in-place update of the basis and the Hessenberg matrix.

The basis is in the flat layout of the operator's mesh (`sharding`: columns
zero-padded to `sharding.padded_dim(p, mesh)` and split over 'model'; on one
device the 1 × 1 mesh, no padding), and each step keeps it so: every device
reads and writes only its own columns; the Gram-Schmidt coefficients
c_b = Q_b w are local partial dot products summed across 'model'
(block-size scalars per block), and the operator sees the unpadded p-vector.
The Hessenberg matrix and scalars are replicated.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from influence_jax import sharding as sharding_lib
from influence_jax.curvature import LinearOperator


class NonFiniteStep(ValueError):
  """An Arnoldi step produced a non-finite Hessenberg column (hence basis vector): the curvature product
  was not finite. The step is not kept and `run`'s callback never sees it."""


class ArnoldiState(NamedTuple):
  """Progress of an Arnoldi run: a plain pytree, so it can be checkpointed.

  basis: (rows, p), rows = n_iters + 1 rounded up to a multiple of the block
    size; rows [0, num_steps] are orthonormal, the rest zero.
  hessenberg: (rows, n_iters); column j holds the coefficients of step j.
  num_steps: completed steps (int32 scalar).
  norm_estimate: largest ‖A q‖ seen, a lower bound on ‖A‖ (for the breakdown test).
  breakdown: True once the Krylov space closed (no further steps are taken).
  """

  basis: jax.Array
  hessenberg: jax.Array
  num_steps: jax.Array
  norm_estimate: jax.Array
  breakdown: jax.Array


def init(start: jax.Array, n_iters: int, *, block_size: int = 32) -> ArnoldiState:
  """Returns the state before step 0, with `start` normalised as the first basis vector.

  The basis takes its layout from `start`: a flat vector laid out on a mesh
  (e.g. `eigenspace.start_vector(p, dtype, seed, mesh=op.mesh)`) gives a
  basis in that mesh's flat layout; a plain (p,) vector gives a one-device
  basis. It is read in blocks of `block_size` rows; only blocks holding
  vectors are read, so a step streams about as much as the basis has filled.
  """
  if n_iters < 1:
    raise ValueError(f"n_iters must be at least 1, got {n_iters}.")
  if np.ndim(start) != 1:
    raise ValueError(f"The Arnoldi start vector must be flat, got shape {np.shape(start)}.")
  mesh = sharding_lib.mesh_of(start)
  start = sharding_lib.to_flat_layout(start, np.shape(start)[0], mesh)
  norm = jnp.linalg.norm(start)
  if not bool(norm > 0) or not bool(jnp.isfinite(norm)):
    raise ValueError("The Arnoldi start vector must be finite and non-zero.")
  rows = block_size * math.ceil((n_iters + 1) / block_size)
  return _init(rows, n_iters, mesh)(start)


@functools.lru_cache(maxsize=32)
def _init(rows: int, n_iters: int, mesh: jax.sharding.Mesh) -> Callable:
  """Returns a jitted start ↦ ArnoldiState whose outputs are created directly with their shardings."""
  rep = sharding_lib.replicated(mesh)
  shardings = ArnoldiState(sharding_lib.flat_sharding(mesh, 2), rep, rep, rep, rep)

  def make(start):
    return ArnoldiState(
        basis=jnp.zeros((rows, start.shape[0]), start.dtype).at[0].set(start / jnp.linalg.norm(start)),
        hessenberg=jnp.zeros((rows, n_iters), start.dtype),
        num_steps=jnp.zeros((), jnp.int32),
        norm_estimate=jnp.zeros((), start.dtype),
        breakdown=jnp.zeros((), bool),
    )

  return jax.jit(make, out_shardings=shardings)


def default_tolerance(dtype) -> float:
  """Returns the relative size of a new Krylov direction below which the space counts as closed."""
  return float(jnp.finfo(dtype).eps) ** 0.5


def _orthogonalize(blocks: jax.Array, num_blocks: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (w − Qᵀc, c) after one block-Gram-Schmidt pass over the first `num_blocks` blocks.

  Each (block, p) slab is read once for c_b = Q_b w and reused from cache for
  w −= c_bᵀ Q_b (block modified Gram-Schmidt); empty blocks are never read.
  """
  num_total, block, _ = blocks.shape

  def body(b, carry):
    w, coeffs = carry
    q = jax.lax.dynamic_index_in_dim(blocks, b, keepdims=False)
    c = q @ w
    return w - c @ q, jax.lax.dynamic_update_index_in_dim(coeffs, c, b, 0)

  coeffs = jnp.zeros((num_total, block), w.dtype)
  w, coeffs = jax.lax.fori_loop(0, num_blocks, body, (w, coeffs))
  return w, coeffs.reshape(-1)


# Daniel-Gragg-Kaufman-Stewart: repeat the pass when it removed more than this share of w.
_DGKS_ETA = 1 / math.sqrt(2)


def _constrain(x: jax.Array, mesh: jax.sharding.Mesh, spec) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, sharding_lib.named(mesh, spec))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _step(matvec: Callable[[Any, jax.Array], jax.Array], block_size: int, dim: int, mesh: jax.sharding.Mesh,
          operands: Any, state: ArnoldiState, tol: jax.Array) -> ArnoldiState:
  """One Arnoldi step: product, three-term recurrence, full re-orthogonalisation, update in place.

  `dim` is the operator's size (≤ the basis' padded column count); `mesh`
  (static) pins the basis to P(None, 'model') and vectors to P('model').
  """
  basis, hess, i = state.basis, state.hessenberg, state.num_steps
  rows, p = basis.shape
  basis = _constrain(basis, mesh, sharding_lib.BASIS_SPEC)
  blocks = basis.reshape(rows // block_size, block_size, p)
  blocks = _constrain(blocks, mesh, P(None, None, sharding_lib.MODEL))
  num_blocks = i // block_size + 1
  v = _constrain(basis[i], mesh, sharding_lib.VECTOR_SPEC)
  # The operator gets the whole p-vector (one all-gather of p numbers), laid
  # out as it wants; its result is cut back into this device's columns.
  whole = _constrain(v, mesh, sharding_lib.REPLICATED)
  w = matvec(operands, whole if dim == p else whole[:dim])
  w = _constrain(w, mesh, sharding_lib.REPLICATED)
  w = _constrain(sharding_lib.pad_last(w, p), mesh, sharding_lib.VECTOR_SPEC)
  w_norm = jnp.linalg.norm(w)
  # The operator is symmetric: in exact arithmetic only q_i and q_{i-1} have
  # non-zero coefficients. Remove those first (cheap), then re-orthogonalise
  # against the whole filled basis to undo rounding, twice when needed.
  alpha = v @ w
  beta_prev = jnp.where(i > 0, hess[i, jnp.maximum(i - 1, 0)], 0)
  w = w - alpha * v - beta_prev * basis[jnp.maximum(i - 1, 0)]
  h = jnp.zeros((rows,), w.dtype).at[i].add(alpha).at[jnp.maximum(i - 1, 0)].add(beta_prev)
  before = jnp.linalg.norm(w)
  w, c = _orthogonalize(blocks, num_blocks, w)
  h = h + c

  def second_pass(args):
    w, h = args
    w, c = _orthogonalize(blocks, num_blocks, w)
    return w, h + c

  w, h = jax.lax.cond(jnp.linalg.norm(w) < _DGKS_ETA * before, second_pass, lambda a: a, (w, h))
  beta = jnp.linalg.norm(w)
  norm_estimate = jnp.maximum(state.norm_estimate, w_norm)
  closed = beta <= tol * norm_estimate
  new_vector = jnp.where(closed, jnp.zeros_like(w), w / jnp.where(closed, 1, beta))
  basis = _constrain(basis.at[i + 1].set(new_vector), mesh, sharding_lib.BASIS_SPEC)
  h = h.at[i + 1].set(jnp.where(closed, 0, beta))
  hess = _constrain(hess.at[:, i].set(h), mesh, sharding_lib.REPLICATED)
  return ArnoldiState(basis, hess, i + 1, norm_estimate, closed)


def run(
    op: LinearOperator,
    state: ArnoldiState,
    num_steps: Optional[int] = None,
    *,
    tol: Optional[float] = None,
    block_size: int = 32,
    callback: Optional[Callable[[ArnoldiState], None]] = None,
) -> ArnoldiState:
  """Returns `state` advanced by up to `num_steps` steps (default: to the end), stopping at breakdown.

  `block_size` must be the one given to `init`. `callback(state)` is called
  after every step (for progress and checkpointing); it must not keep
  references to the state, whose buffers are donated to the next step.
  A step whose Hessenberg column is not finite (NaN or inf in the curvature
  product; the new basis vector is that column's w / β) raises NonFiniteStep
  before the callback: no callback ever sees a non-finite state.
  Breakdown (the Krylov space closed: the new direction is smaller than
  `tol` × ‖A‖ estimate) ends the run cleanly. The basis is kept in the flat
  layout of the operator's mesh (`op.mesh`).
  """
  mesh = op.mesh
  n_iters = state.hessenberg.shape[1]
  if state.basis.shape[0] % block_size:
    raise ValueError(f"The basis has {state.basis.shape[0]} rows, not a multiple of block_size={block_size}.")
  tol = default_tolerance(state.basis.dtype) if tol is None else tol
  if state.basis.shape[1] != sharding_lib.padded_dim(op.dim, mesh):
    raise ValueError(
        f"The basis has {state.basis.shape[1]} columns; an operator of size {op.dim} on its mesh "
        f"needs {sharding_lib.padded_dim(op.dim, mesh)}: lay the start vector out on the operator's mesh "
        "(eigenspace.start_vector(..., mesh=op.mesh)).")
  tol = sharding_lib.put(np.asarray(tol, state.basis.dtype), sharding_lib.replicated(mesh))
  done = int(state.num_steps)
  stop = n_iters if num_steps is None else min(n_iters, done + num_steps)
  breakdown = bool(state.breakdown)
  while done < stop and not breakdown:
    state = _step(op.matvec, block_size, op.dim, mesh, op.operands, state, tol)
    finite, breakdown = (bool(flag) for flag in jax.device_get(_step_flags(state.hessenberg, state.breakdown)))
    if not finite:
      raise NonFiniteStep(f"Arnoldi step {done + 1}: the curvature product is not finite (NaN or inf in the "
                          "Hessenberg matrix); the step is not kept.")
    done += 1
    if callback is not None:
      callback(state)
  return state


@jax.jit
def _step_flags(hessenberg: jax.Array, breakdown: jax.Array) -> jax.Array:
  """Returns [all of `hessenberg` finite, breakdown] as one array: one host transfer a step."""
  return jnp.stack([jnp.all(jnp.isfinite(hessenberg)), breakdown])


class Ritz(NamedTuple):
  """Eigen-decomposition of the projected operator T = QᵀAQ.

  values: (m,) eigenvalues of T in descending order; vectors: (m, m), column j
  for values[j]; estimates: (m,) residual bounds |β_m| |V[m-1, j]| (exact in
  exact arithmetic; 0 after breakdown); size: m, the basis vectors used.
  """

  values: np.ndarray
  vectors: np.ndarray
  estimates: np.ndarray
  size: int


def ritz(state: ArnoldiState) -> Ritz:
  """Returns the eigenpairs of the symmetric part of the m × m Hessenberg block (float64, numpy)."""
  # After m steps the basis has m vectors (m + 1 without breakdown, the last
  # only feeding the residual estimate through β_m = H[m, m-1]).
  size = int(state.num_steps)
  if size == 0:
    raise ValueError("No Arnoldi steps were taken; run() the state first.")
  hess = sharding_lib.to_host(state.hessenberg)
  beta = float(hess[size, size - 1])
  t = np.asarray(hess[:size, :size], np.float64)
  t = (t + t.T) / 2
  values, vectors = np.linalg.eigh(t)
  order = np.argsort(values)[::-1]
  values, vectors = values[order], vectors[:, order]
  estimates = np.abs(beta * vectors[size - 1, :])
  return Ritz(values, vectors, estimates, size)


SELECTIONS = ("largest", "magnitude")


def selection_threshold(values: np.ndarray, *, rtol: Optional[float] = None) -> float:
  """Returns the size below which `select` counts a Ritz value as negligible: rtol × max|λ|
  (rtol = 100 float32 epsilons by default)."""
  scale = float(np.max(np.abs(values))) if np.size(values) else 0.0
  rtol = 100 * float(np.finfo(np.float32).eps) if rtol is None else rtol
  return rtol * scale


def select(values: np.ndarray, top_k: int, selection: str = "largest", *, rtol: Optional[float] = None) -> np.ndarray:
  """Returns indices (into `values`, descending by value) of the kept eigenpairs.

  "largest": the top_k largest eigenvalues that are positive beyond
  `rtol` × max|λ| (so a rank-r operator yields at most r pairs);
  "magnitude": the top_k largest |λ| beyond the same threshold.
  The result is ordered by descending eigenvalue.
  """
  if selection not in SELECTIONS:
    raise ValueError(f"Unknown selection {selection!r}; expected one of {SELECTIONS}.")
  if top_k < 1:
    raise ValueError(f"top_k must be at least 1, got {top_k}.")
  threshold = selection_threshold(values, rtol=rtol)
  if selection == "largest":
    idx = [i for i in np.argsort(values)[::-1] if values[i] > threshold]
  else:
    idx = [i for i in np.argsort(np.abs(values))[::-1] if abs(values[i]) > threshold]
  idx = np.asarray(idx[:top_k], dtype=np.int64)
  return idx[np.argsort(values[idx])[::-1]]
