"""Query-side solves preconditioned by the eigenspace: near-exact H⁻¹∇ℓ(x) for a few products.

The spectral tail (docs/design.md, "Arnoldi influence and the spectral tail") approximates the inverse damped curvature by

    P = Uᵀ (Λ + δ)⁻¹ U + c⁻¹ (I − UᵀU),     c = λ_k + δ by default,

exact on the top-k eigenspace and a constant on its complement. Used as the
preconditioner of conjugate gradients on (H + δI) x = ∇ℓ(x), started from
x₀ = P ∇ℓ(x), the preconditioned operator P(H + δI) is the identity on the
top-k eigenspace and (H + δI)/c on the rest, whose spectrum lies in (0, 1]
when the eigenspace holds every eigenvalue above λ_k: a few iterations
correct what the tail approximation misses. With zero iterations the solve
is the tail approximation itself, so the scores equal `influence(...,
tail=True)`; with k = p, P = (H + δI)⁻¹ and they are exact.

Cost model (T queries, N training examples, k eigenvectors, p parameters):
  - fit, once per model: the eigenspace (n_iters curvature products);
  - per query: 1 + cg_iters curvature products (each a pass over the
    curvature batches) and 2·(1 + cg_iters) applications of P (O(k·p));
  - per training example: one per-example gradient, dotted with the T solved
    vectors (T·p multiply-adds). No training-side projection on U is needed;
  - or, from a projection store (`solved_query_side`): per training example
    nothing new (its stored [U∇ℓ(z), R(I − UᵀU)∇ℓ(z)]), per query (k + m)
    numbers dotted with each stored row.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import curvature as curvature_lib
from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import sharding as sharding_lib
from influence_jax import solvers
from influence_jax import validation
from influence_jax.eigenspace import (Eigenspace, check_params, default_tail_constant, inverse_eigenvalues,
                                      scoring_damping)
from influence_jax.residual_basis import stored_directions
from influence_jax.sketch import KroneckerSketch, apply_sketch
from influence_jax.types import LossFn, PerExampleLossFn


class TailInverse(NamedTuple):
  """P = Wᵀ M W + (I − WᵀW)/c: an inverse exact on the span of W's orthonormal rows, 1/c beyond.

  directions: (d, P) orthonormal rows W (flat layout, zero beyond p); inverse: M, (d,) a diagonal
  ((Λ + δ)⁻¹ for the eigenvectors: `eigenspace_tail_inverse`) or (d, d) symmetric positive definite
  ((W C Wᵀ + δI)⁻¹: `galerkin.galerkin_tail_inverse`); tail_constant: c > 0.
  """

  directions: jax.Array
  inverse: jax.Array
  tail_constant: jax.Array


def apply_tail_inverse(eigenvectors: jax.Array, inverse: jax.Array, tail_constant, rows: jax.Array) -> jax.Array:
  """Returns P r for each row r of `rows` (T, p), or one (p,) row: Wᵀ M W r + (r − WᵀW r)/c.

  eigenvectors: (d, p) orthonormal rows W; inverse: M, (d,) (a diagonal, e.g. 1/(λ_j + δ)) or (d, d);
  c = tail_constant > 0.
  """
  coeffs = rows @ eigenvectors.T
  inner = coeffs * inverse if inverse.ndim == 1 else coeffs @ inverse
  return rows / tail_constant + (inner - coeffs / tail_constant) @ eigenvectors


def _tail_inverse(operands, r):
  """The matvec of P: operands a TailInverse (a module function: hashable, compiled once by CG)."""
  return apply_tail_inverse(*operands, r)


class _Shifted:
  """The matvec of C + δI: operands (C's operands, δ)."""

  def __init__(self, inner):
    self.inner = inner

  def __call__(self, operands, v):
    return self.inner(operands[0], v) + operands[1] * v

  def __eq__(self, other):
    return isinstance(other, _Shifted) and other.inner == self.inner

  def __hash__(self):
    return hash((_Shifted, self.inner))


def eigenspace_tail_inverse(eigenspace: Eigenspace, damping: Optional[float] = None,
                            tail_constant: Optional[float] = None) -> TailInverse:
  """Returns the spectral tail's P = Uᵀ(Λ + δ)⁻¹U + c⁻¹(I − UᵀU) (δ: the eigenspace's by default, c: λ_k + δ);
  raises ValueError unless every λ_j + δ and c are positive (P positive definite)."""
  delta = scoring_damping(eigenspace, damping)
  c = default_tail_constant(eigenspace, delta) if tail_constant is None else float(tail_constant)
  if not c > 0:
    raise ValueError(f"The tail constant must be positive, got {c}.")
  inv = inverse_eigenvalues(eigenspace, delta)
  if bool(jnp.any(inv <= 0)):
    raise ValueError("Some kept eigenvalue + damping is negative: the preconditioner would not be positive definite.")
  u = eigenspace.eigenvectors
  return TailInverse(u, inv.astype(u.dtype), jnp.asarray(c, u.dtype))


def preconditioned_solve(
    op: curvature_lib.LinearOperator,
    eigenspace: Eigenspace,
    b: jax.Array,
    *,
    cg_iters: int,
    damping: Optional[float] = None,
    tail_constant: Optional[float] = None,
    tol: float = 0.0,
    keep_best: bool = True,
    preconditioner: Optional[TailInverse] = None,
) -> solvers.CGResult:
  """Returns the solutions of (C + δI) x = b for each row of b (T, p), by CG preconditioned with P.

  `op` is the undamped curvature C the eigenspace was fitted on; δ defaults
  to the eigenspace's damping, c to λ_k + δ. P is `preconditioner`, by default
  the eigenspace's spectral tail (`eigenspace_tail_inverse`). Starts from P b and
  runs at most `cg_iters` iterations per row (one product with C each, the block's
  rows advanced together: `solvers.conjugate_gradient`), stopping a row when
  ‖b − (C + δI)x‖ ≤ tol·‖b‖ or on non-positive curvature. cg_iters = 0 returns
  P b, the spectral-tail approximation. With `keep_best` (default) each row's
  iterate of smallest residual is returned, so where C + δI is indefinite the
  result never solves worse than P b. b may be in the flat layout of the
  operator's mesh (T, sharding.padded_dim(p, mesh)) with P's directions laid
  out alike: the solves then run on the mesh, rows over 'data', columns over
  'model', and return in that layout.
  """
  if not isinstance(b, jax.Array):
    b = jnp.asarray(b)
  padded = sharding_lib.padded_dim(op.dim, op.mesh)
  if b.ndim != 2 or b.shape[1] not in (op.dim, padded):
    raise ValueError(f"b must be (num_queries, {op.dim}); got shape {b.shape}.")
  if op.dim not in (eigenspace.num_params, eigenspace.eigenvectors.shape[1]):
    raise ValueError(f"The eigenspace has {eigenspace.num_params} parameters; the operator acts on {op.dim}.")
  if not isinstance(cg_iters, int) or cg_iters < 0:
    raise ValueError(f"cg_iters must be a non-negative integer, got {cg_iters!r}.")
  if not tol >= 0:
    raise ValueError(f"tol must be non-negative, got {tol}.")
  validation.check_finite(b, "b")
  delta = scoring_damping(eigenspace, damping)
  pre = eigenspace_tail_inverse(eigenspace, delta, tail_constant) if preconditioner is None else preconditioner
  w = pre.directions
  if w.shape[1] < b.shape[1]:
    raise ValueError(f"The preconditioner's directions have {w.shape[1]} columns; b has {b.shape[1]}.")
  if w.shape[1] > b.shape[1]:  # A mesh's flat layout is zero beyond p.
    w = w[:, :b.shape[1]]
  dtype = w.dtype
  b = b.astype(dtype)
  shifted = op.replace(matvec=_Shifted(op.matvec), operands=(op.operands, jnp.asarray(delta, dtype)))
  tail = curvature_lib.LinearOperator(_tail_inverse, TailInverse(w, pre.inverse.astype(dtype),
                                                                 jnp.asarray(pre.tail_constant, dtype)),
                                      b.shape[1], dtype, op.mesh)
  return solvers.conjugate_gradient(shifted, b, x0=tail(b), tol=tol, max_iters=cg_iters, preconditioner=tail,
                                   keep_best=keep_best)


def solved_query_side(eigenspace: Eigenspace, sketch: KroneckerSketch, solved: jax.Array,
                      basis: Optional[jax.Array] = None) -> jax.Array:
  """Returns (T, k [+ r] + m) query vectors [W x̂, R(I − WᵀW) x̂] of solved vectors x̂ (T, p), W = [U; V].

  V: an optional residual basis (r, p) (`residual_basis.fit_residual_basis`), stored exactly beside U.
  Against a projection store's rows `scoring.row_side` [W∇ℓ(z), R(I − WᵀW)∇ℓ(z)] (made with the
  same W and `sketch`), q · row = x̂ᵀWᵀW∇ℓ(z) + x̂ᵀ(I − WᵀW)RᵀR(I − WᵀW)∇ℓ(z) ≈ x̂ᵀ∇ℓ(z), the score of
  `influence_preconditioned` (positive: z is a proponent of x), exact when the sketch is (m ≥ p₁p₂):
  preconditioned scores for a new query set without touching the training set. x̂ may be in a mesh's
  flat layout (T, P ≥ p columns, zero beyond p), with U and V laid out alike or on the host.
  """
  p = sketch.num_params
  if solved.ndim != 2 or solved.shape[1] < p:
    raise ValueError(f"solved must be (num_queries, {p}) for this sketch; got shape {solved.shape}.")
  if basis is not None and (np.ndim(basis) != 2 or np.shape(basis)[1] < p):
    raise ValueError(f"basis must be (rank, {p}); got shape {np.shape(basis)}.")
  return directions_query_side(stored_directions(eigenspace.eigenvectors, basis), sketch, solved)


def directions_query_side(directions: jax.Array, sketch: KroneckerSketch, solved: jax.Array) -> jax.Array:
  """Returns (T, d + m) [W x̂, R(I − WᵀW) x̂] for the stored directions W (d, p or a flat layout's P) and
  solved vectors x̂ (T, ·) laid out alike: `solved_query_side` with W given."""
  return _solved_side(sketch.num_params, solved, directions, sketch.left, sketch.right)


@functools.partial(jax.jit, static_argnums=0)
def _solved_side(p, solved, w, left, right):
  columns = min(solved.shape[1], w.shape[1])
  solved, w = solved[:, :columns].astype(w.dtype), w[:, :columns]
  coeffs = solved @ w.T
  remainder = (solved - coeffs @ w)[:, :p]
  return jnp.concatenate([coeffs, apply_sketch(KroneckerSketch(left, right, p), remainder).astype(w.dtype)], axis=1)


def solve_queries(
    eigenspace: Eigenspace,
    per_example_loss_fn: PerExampleLossFn,
    params,
    test_batches,
    *,
    loss_fn: LossFn,
    curvature_batches,
    cg_iters: int = 10,
    tail_constant: Optional[float] = None,
    damping: Optional[float] = None,
    tol: float = 0.0,
    keep_best: bool = True,
    microbatch_size: Optional[int] = None,
) -> solvers.CGResult:
  """Returns the CGResult of `preconditioned_solve` for the test examples' gradients: x̂(x) ≈ (C + δI)⁻¹∇ℓ(x).

  C is the curvature of the mean of `loss_fn` over `curvature_batches`, of the kind the eigenspace
  was fitted on (eigenspace.info.curvature; "hessian" when unknown): pass the batches of the fit.
  """
  check_params(eigenspace, params)
  validation.check_finite(params, "params")
  test_batches = data_lib.materialize(test_batches, "test_batches")
  kind = eigenspace.info.curvature if eigenspace.info is not None else "hessian"
  op = curvature_lib.curvature_operator(loss_fn, params, curvature_batches, curvature=kind,
                                        microbatch_size=microbatch_size)
  grads = projection.gradients(per_example_loss_fn, params, test_batches).astype(eigenspace.eigenvectors.dtype)
  return preconditioned_solve(op, eigenspace, grads, cg_iters=cg_iters, damping=damping,
                              tail_constant=tail_constant, tol=tol, keep_best=keep_best)


def influence_preconditioned(
    eigenspace: Eigenspace,
    per_example_loss_fn: PerExampleLossFn,
    params,
    test_batches,
    train_batches,
    *,
    method: str = "vjp",
    microbatch_size: Optional[int] = None,
    return_solve: bool = False,
    **solve_options,
):
  """Returns the (T, N) scores ∇ℓ(x)ᵀ x̂(x) with x̂ ≈ (C + δI)⁻¹∇ℓ(x) from `solve_queries`.

  `solve_options` are `solve_queries`' keywords (loss_fn and curvature_batches required; cg_iters,
  tail_constant, damping, tol, keep_best). Positive: z is a proponent of x. Each score is
  x̂(x)ᵀ∇ℓ(z): the training set is read once, projected on the T solved vectors. With
  `return_solve`, returns (scores, solvers.CGResult).
  """
  solve = solve_queries(eigenspace, per_example_loss_fn, params, test_batches, microbatch_size=microbatch_size,
                        **solve_options)
  train_batches = data_lib.materialize(train_batches, "train_batches")
  scores = projection.project_on(solve.x, per_example_loss_fn, params, train_batches,
                                 method=method, microbatch_size=microbatch_size).values.T
  return (scores, solve) if return_solve else scores
