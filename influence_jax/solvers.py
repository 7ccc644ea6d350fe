"""Inverse-curvature solvers: exact (dense; tiny models only) and conjugate gradients (matrix-free).

The dense path forms H with `jax.hessian`, so it is the reference every
approximate method is tested against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import validation
from influence_jax.curvature import LinearOperator
from influence_jax.types import LossFn, Params, PerExampleLossFn



def dense_hessian(loss_fn: LossFn, params: Params, batches) -> jax.Array:
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


def gradient_matrix(per_example_loss_fn: PerExampleLossFn, params: Params, batches) -> jax.Array:
  """Returns the (N, p) matrix of flat per-example gradients ∇ℓ(z_i) on one device (tiny problems only).

  The same as `projection.gradients` without a mesh.
  """
  return projection.gradients(per_example_loss_fn, params, data_lib.materialize(batches, "batches"))


def exact_influence(
    loss_fn: LossFn,
    per_example_loss_fn: PerExampleLossFn,
    params: Params,
    test_batches,
    train_batches,
    *,
    damping: float = 0.0,
    hessian_batches=None,
) -> jax.Array:
  """Returns the (T, N) matrix ∇ℓ(x)ᵀ (H + damping·I)⁻¹ ∇ℓ(z), H dense and exact.

  Positive: z is a proponent of x (docs/design.md, "What a score means"). H is the Hessian of the mean of
  `loss_fn` over `hessian_batches` (default: `train_batches`). Raises if
  H + damping·I is singular.
  """
  damping = validation.check_damping(damping)
  hess = dense_hessian(loss_fn, params, hessian_batches if hessian_batches is not None else train_batches)
  hess = hess + damping * jnp.eye(hess.shape[0], dtype=hess.dtype)
  g_test = gradient_matrix(per_example_loss_fn, params, test_batches)
  g_train = gradient_matrix(per_example_loss_fn, params, train_batches)
  if np.linalg.cond(np.asarray(hess, np.float64)) > 1e15:
    raise np.linalg.LinAlgError(
        "H + damping·I is singular or nearly so; use a positive damping for exact influence.")
  return g_test @ jnp.linalg.solve(hess, g_train.T)


# ---------------------------------------------------------------------------
# Conjugate gradients on a matrix-free symmetric operator.


class CGResult(NamedTuple):
  """The result of `conjugate_gradient`; with a batch of right-hand sides every field has its leading axis.

  x: the approximate solution of A x = b (flat, like b).
  num_iters: CG iterations run (one product with A each).
  residual_norm: ‖b − A x‖ at the end, from the CG recurrence (not recomputed).
  converged: residual_norm ≤ tol · ‖b‖.
  positive_curvature: False when a search direction had pᵀAp ≤ 0 (A not positive definite there).
  """

  x: jax.Array
  num_iters: jax.Array
  residual_norm: jax.Array
  converged: jax.Array
  positive_curvature: jax.Array


def conjugate_gradient(
    matvec,
    b: jax.Array,
    *,
    x0: jax.Array | None = None,
    tol: float = 1e-6,
    max_iters: int | None = None,
    preconditioner: LinearOperator | None = None,
    keep_best: bool = False,
) -> CGResult:
  """Solves A x = b for a symmetric positive (semi-)definite A given as a product; returns a CGResult.

  `b` is one flat (p,) vector or a batch (m, p) of right-hand sides solved
  together (one batched product per iteration), each stopping on its own
  criteria. `matvec` is a `curvature.LinearOperator` (its pure
  `matvec(operands, v)` is fused into the jitted loop, operands passed as
  arguments) or any callable v ↦ A v on flat vectors. The loop is one
  `jax.lax.while_loop`; a solve stops when ‖b − A x‖ ≤ tol · ‖b‖ (relative
  residual), after `max_iters` iterations (default: p), or when pᵀAp ≤ 0 (A
  not positive definite on the Krylov space: the iterate so far is returned
  and converged is False unless the residual test already holds). For a
  consistent semi-definite system (b in the range of A) started from x0 in
  that range, CG returns the minimum-norm solution. With a `preconditioner`
  (a LinearOperator applying M⁻¹ ≈ A⁻¹, symmetric positive definite) it is
  preconditioned CG; tol = 0 runs exactly `max_iters` iterations. With `keep_best` the iterate of
  smallest residual norm seen (x0 included) is returned, not the last: a safeguard where A is
  indefinite and the iterates leave the solution before pᵀAp ≤ 0 shows it.
  """
  b = jnp.asarray(b)
  if b.ndim not in (1, 2):
    raise ValueError(f"conjugate_gradient works on a flat vector or a batch (m, p) of them; got b with shape {b.shape}.")
  if not jnp.issubdtype(b.dtype, jnp.floating):
    raise TypeError(f"b must be floating-point; got dtype {b.dtype}.")
  if not bool(jnp.all(jnp.isfinite(b))):
    raise ValueError("b has non-finite values (NaN or inf).")
  x0 = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
  if x0.shape != b.shape:
    raise ValueError(f"x0 has shape {x0.shape}, but b has shape {b.shape}.")
  if not tol >= 0:
    raise ValueError(f"tol must be non-negative; got {tol}.")
  dim = b.shape[-1]
  max_iters = dim if max_iters is None else int(max_iters)
  if max_iters < 0:
    raise ValueError(f"max_iters must be non-negative; got {max_iters}.")
  if preconditioner is not None:
    if not isinstance(preconditioner, LinearOperator) or preconditioner.dim != dim:
      raise ValueError(f"preconditioner must be a LinearOperator on vectors of size {dim}.")
    precond = (preconditioner.matvec, preconditioner.operands)
  else:
    precond = (None, None)
  if isinstance(matvec, LinearOperator):
    if matvec.dim != dim:
      raise ValueError(f"The operator acts on vectors of size {matvec.dim}, but b has size {dim}.")
    return _cg_loop(matvec.matvec, True, precond[0], bool(keep_best), matvec.operands, precond[1], b, x0, tol,
                    max_iters)
  if not callable(matvec):
    raise TypeError(f"matvec must be a LinearOperator or a callable; got {type(matvec).__name__}.")
  return _cg_loop(matvec, False, precond[0], bool(keep_best), None, precond[1], b, x0, tol, max_iters)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _cg_loop(fn, takes_operands, precond_fn, keep_best, operands, precond_operands, b, x0, tol, max_iters):
  apply = (lambda v: fn(operands, v)) if takes_operands else fn
  precond = (lambda r: precond_fn(precond_operands, r)) if precond_fn is not None else (lambda r: r)
  solve = functools.partial(_cg_one, apply, precond, tol=tol, max_iters=max_iters, keep_best=keep_best)
  return solve(b, x0) if b.ndim == 1 else jax.vmap(solve)(b, x0)


def _cg_one(apply, precond, b, x0, *, tol, max_iters, keep_best) -> CGResult:
  """(Preconditioned) CG for one right-hand side (vmapped for a batch: each lane stops on its own test)."""
  threshold = tol * jnp.linalg.norm(b)
  r0 = b - apply(x0)
  z0 = precond(r0)

  def cond(state):
    _, r, _, rz, k, ok, _, _ = state
    return (jnp.linalg.norm(r) > threshold) & (k < max_iters) & ok & (rz > 0)

  def body(state):
    x, r, p, rz, k, _, best_x, best_res = state
    ap = apply(p)
    pap = jnp.vdot(p, ap)
    ok = pap > 0
    alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1.0), 0.0)
    x = x + alpha * p
    r = r - alpha * ap
    z = precond(r)
    rz_new = jnp.where(ok, jnp.vdot(r, z), rz)
    p = z + (rz_new / rz) * p
    res = jnp.linalg.norm(r)
    better = res < best_res
    if keep_best:
      best_x = jnp.where(better, x, best_x)
    return x, r, p, rz_new, k + 1, ok, best_x, jnp.where(better, res, best_res)

  res0 = jnp.linalg.norm(r0)
  best_x0 = x0 if keep_best else jnp.zeros((), x0.dtype)  # Not carried when not asked for: p numbers a lane.
  init = (x0, r0, z0, jnp.vdot(r0, z0), jnp.asarray(0), jnp.asarray(True), best_x0, res0)
  x, r, _, _, k, ok, best_x, best_res = jax.lax.while_loop(cond, body, init)
  x, res = (best_x, best_res) if keep_best else (x, jnp.linalg.norm(r))
  return CGResult(x=x, num_iters=k, residual_norm=res, converged=res <= threshold, positive_curvature=ok)
