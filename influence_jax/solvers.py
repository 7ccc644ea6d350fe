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
from jax.sharding import PartitionSpec as P

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import sharding as sharding_lib
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

  `b` is one flat (p,) vector or a block (m, p) of right-hand sides solved
  together: every iteration applies A to the whole block at once (one batched
  product: for a curvature operator one pass over its batches, the forward
  pass and the data reads shared), with per-vector step sizes, and each vector
  stopping on its own criteria (a stopped vector is frozen). `matvec` is a
  `curvature.LinearOperator` (its pure `matvec(operands, v)` is fused into the
  jitted loop, operands passed as arguments) or any callable v ↦ A v on flat
  vectors. With a LinearOperator on a mesh, `b` may be in the mesh's flat
  layout (`sharding`: p zero-padded to `sharding.padded_dim(op.dim, mesh)`
  columns split over 'model'; the operator sees the unpadded vector and the
  padding stays zero); the block is kept split over 'model' and its vectors
  over 'data' (when m is a multiple of the 'data' size). The loop is one
  `jax.lax.while_loop`; a solve stops when ‖b − A x‖ ≤ tol · ‖b‖ (relative
  residual), after `max_iters` iterations (default: p), or when pᵀAp ≤ 0 (A
  not positive definite on the Krylov space: the iterate so far is returned
  and converged is False unless the residual test already holds). For a
  consistent semi-definite system (b in the range of A) started from x0 in
  that range, CG returns the minimum-norm solution. With a `preconditioner`
  (a LinearOperator applying M⁻¹ ≈ A⁻¹, symmetric positive definite, on vectors
  shaped like b's) it is preconditioned CG; tol = 0 runs exactly `max_iters`
  iterations. With `keep_best` the iterate of smallest residual norm seen (x0
  included) is returned, not the last: a safeguard where A is indefinite and
  the iterates leave the solution before pᵀAp ≤ 0 shows it.
  """
  b = jnp.asarray(b) if not isinstance(b, jax.Array) else b
  if b.ndim not in (1, 2):
    raise ValueError(f"conjugate_gradient works on a flat vector or a batch (m, p) of them; got b with shape {b.shape}.")
  if not jnp.issubdtype(b.dtype, jnp.floating):
    raise TypeError(f"b must be floating-point; got dtype {b.dtype}.")
  if not bool(_all_finite(b)):
    raise ValueError("b has non-finite values (NaN or inf).")
  x0 = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
  if x0.shape != b.shape:
    raise ValueError(f"x0 has shape {x0.shape}, but b has shape {b.shape}.")
  if not tol >= 0:
    raise ValueError(f"tol must be non-negative; got {tol}.")
  columns = b.shape[-1]
  if isinstance(matvec, LinearOperator):
    if columns not in (matvec.dim, sharding_lib.padded_dim(matvec.dim, matvec.mesh)):
      raise ValueError(f"The operator acts on vectors of size {matvec.dim}, but b has size {columns}.")
    fn, operands, dim, mesh = matvec.matvec, matvec.operands, matvec.dim, matvec.mesh
  elif callable(matvec):
    fn, operands, dim, mesh = _Plain(matvec), None, columns, None
  else:
    raise TypeError(f"matvec must be a LinearOperator or a callable; got {type(matvec).__name__}.")
  max_iters = dim if max_iters is None else int(max_iters)
  if max_iters < 0:
    raise ValueError(f"max_iters must be non-negative; got {max_iters}.")
  if preconditioner is not None:
    if not isinstance(preconditioner, LinearOperator) or preconditioner.dim != columns:
      raise ValueError(f"preconditioner must be a LinearOperator on vectors of size {columns}.")
    precond = (preconditioner.matvec, preconditioner.operands)
  else:
    precond = (None, None)
  block = b if b.ndim == 2 else b[None]
  res = _cg_loop(fn, precond[0], bool(keep_best), dim, mesh, operands, precond[1], block,
                 x0 if b.ndim == 2 else x0[None], tol, max_iters)
  return res if b.ndim == 2 else jax.tree.map(lambda a: a[0], res)


class _Plain:
  """A callable v ↦ A v as a matvec(operands, v) that ignores its operands (hashable by identity)."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, operands, v):
    return self.fn(v)

  def __eq__(self, other):
    return isinstance(other, _Plain) and other.fn is self.fn

  def __hash__(self):
    return hash((_Plain, id(self.fn)))


@jax.jit
def _all_finite(x):
  return jnp.all(jnp.isfinite(x))


def _block_spec(mesh, block: jax.Array):
  """Returns the PartitionSpec of a (m, P) block on `mesh`: vectors over 'data', columns over 'model',
  each axis only where it divides evenly (None: no mesh, no constraint)."""
  if mesh is None:
    return None
  data, model = (sharding_lib.axis_size(mesh, a) for a in (sharding_lib.DATA, sharding_lib.MODEL))
  rows, cols = block.shape
  return P(sharding_lib.DATA if rows % data == 0 else None, sharding_lib.MODEL if cols % model == 0 else None)


def block_matvec(fn, operands, dim: int, mesh, block: jax.Array) -> jax.Array:
  """Returns A applied to every row of `block` (m, P ≥ dim), traced inside a jitted function: the rows
  gathered whole (the operator sees dim-vectors laid out as it wants; batches over 'data' are shared by
  all rows), the product vmapped over the rows, zero-padded back to P columns and laid out like `block`."""
  spec = _block_spec(mesh, block)
  columns = block.shape[1]
  if mesh is not None:
    block = jax.lax.with_sharding_constraint(block, sharding_lib.replicated(mesh))
  out = jax.vmap(lambda v: fn(operands, v[:dim] if dim < columns else v))(block)
  out = sharding_lib.pad_last(out.astype(block.dtype), columns)
  if mesh is not None:
    out = jax.lax.with_sharding_constraint(out, sharding_lib.replicated(mesh))
    out = jax.lax.with_sharding_constraint(out, sharding_lib.named(mesh, spec))
  return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _cg_loop(fn, precond_fn, keep_best, dim, mesh, operands, precond_operands, b, x0, tol, max_iters):
  """Block (preconditioned) CG: all rows of b (m, P) advanced together, each with its own α, β and stop."""
  spec = _block_spec(mesh, b)
  lay = (lambda x: x) if mesh is None else (lambda x: jax.lax.with_sharding_constraint(x, sharding_lib.named(mesh, spec)))
  apply = lambda v: block_matvec(fn, operands, dim, mesh, v)
  precond = (lambda r: lay(jax.vmap(lambda v: precond_fn(precond_operands, v))(r))) if precond_fn is not None else (lambda r: r)
  dot = lambda u, v: jnp.sum(u * v, axis=1)
  norm = lambda v: jnp.sqrt(dot(v, v))
  b, x0 = lay(b), lay(x0)
  threshold = tol * norm(b)
  r0 = b - apply(x0)
  z0 = precond(r0)
  rz0 = dot(r0, z0)
  res0 = norm(r0)
  live = lambda res, k, ok, rz: (res > threshold) & (k < max_iters) & ok & (rz > 0)
  m = b.shape[0]

  def cond(state):
    return jnp.any(state[-1])

  def body(state):
    x, r, p, rz, k, ok, best_x, best_res, active = state
    ap = apply(p)
    pap = dot(p, ap)
    step_ok = pap > 0
    alpha = jnp.where(step_ok, rz / jnp.where(step_ok, pap, 1.0), 0.0)
    x_new = x + alpha[:, None] * p
    r_new = r - alpha[:, None] * ap
    z = precond(r_new)
    rz_new = jnp.where(step_ok, dot(r_new, z), rz)
    p_new = z + (rz_new / jnp.where(rz == 0, 1.0, rz))[:, None] * p
    res = norm(r_new)
    better = active & (res < best_res)
    if keep_best:
      best_x = jnp.where(better[:, None], x_new, best_x)
    on = active[:, None]
    x, r, p = jnp.where(on, x_new, x), jnp.where(on, r_new, r), jnp.where(on, p_new, p)
    rz = jnp.where(active, rz_new, rz)
    ok = jnp.where(active, step_ok, ok)
    k = k + active.astype(k.dtype)
    best_res = jnp.where(better, res, best_res)
    return x, r, p, rz, k, ok, best_x, best_res, active & live(norm(r), k, ok, rz)

  best_x0 = x0 if keep_best else jnp.zeros((), x0.dtype)  # Not carried when not asked for: m·p numbers.
  k0, ok0 = jnp.zeros((m,), jnp.int32), jnp.ones((m,), bool)
  init = (x0, r0, z0, rz0, k0, ok0, best_x0, res0, live(res0, k0, ok0, rz0))
  x, r, _, _, k, ok, best_x, best_res, _ = jax.lax.while_loop(cond, body, init)
  x, res = (best_x, best_res) if keep_best else (x, norm(r))
  return CGResult(x=lay(x), num_iters=k, residual_norm=res, converged=res <= threshold, positive_curvature=ok)
