"""Generalized influence functions (GIF; Lyu et al.) and their baselines: the edit Δ of each method.

docs/design.md, "The papers' methods". Removing a set U from N training examples, with H the Hessian of the
mean loss on the N − |U| remaining examples and
g = (1/(N−|U|)) Σ_{z∈U} ∇ℓ(z), the retrained parameters are ≈ θ + Δ with

  IF   Δ = H⁻¹ g                         (every parameter moves)
  GIF  Δ_T = argmin ‖H[:,T] Δ − g‖        (only the target set T moves; the
                                           first-order gradient change is
                                           cancelled on *all* coordinates)
  FIF  Δ_T = H_TT⁻¹ g_T                   (T moves, the rest treated as frozen)
  PIF  Δ_T = (H⁻¹ g)_T                    (the IF update projected on T)

Every update is a params-shaped pytree, zero outside T, to be *added* to θ.
Products with H come from a `curvature.LinearOperator` (flat ravel_pytree
vectors); no p × p matrix is formed. T is a boolean mask shaped like params
(`gif_selection.select_parameters(...).mask`). Each solve runs CG ("cg" /
"normal") or the authors' early-stopped Neumann iteration ("neumann",
`gif_neumann.neumann_solve`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import curvature
from influence_jax import data as data_lib
from influence_jax import solvers
from influence_jax import validation
from influence_jax.methods import gif_neumann
from influence_jax.methods import gif_selection
from influence_jax.types import Params, PerExampleLossFn


SOLVERS = ("cg", "normal", "neumann")

# ---------------------------------------------------------------------------
# The gradient g of an edit.


def _summed_gradient(per_example_loss_fn, params, batches) -> Params:
  grad = jax.jit(jax.grad(lambda p, b: jnp.sum(per_example_loss_fn(p, b))))
  total = None
  for b in batches:
    gb = grad(params, b)
    total = gb if total is None else jax.tree.map(jnp.add, total, gb)
  return total


def removal_gradient(per_example_loss_fn: PerExampleLossFn, params: Params, removed_batches, num_remaining: int) -> Params:
  """Returns g = (1/num_remaining) Σ_{z∈U} ∇ℓ(z) over the removed examples U (a params pytree).

  θ + H⁻¹g approximates the parameters retrained without U (H: Hessian of the
  mean loss on the remaining examples). Any L2 term must be inside ℓ
  (loss_fn = mean of per_example_loss_fn) for this to be the exact first-order
  change; an L2 term outside ℓ leaves an extra −(|U|/num_remaining)·λθ out.
  """
  removed = data_lib.materialize(removed_batches, "removed_batches")
  if num_remaining <= 0:
    raise ValueError(f"num_remaining must be positive; got {num_remaining}.")
  g = _summed_gradient(per_example_loss_fn, params, removed)
  g = jax.tree.map(lambda x: x / num_remaining, g)
  validation.check_finite(g, "removal gradient")
  return g


def label_change_gradient(
    per_example_loss_fn: PerExampleLossFn, params: Params, wrong_batches, corrected_batches, num_examples: int,
) -> Params:
  """Returns g = (1/num_examples) Σ_{changed z} ∇[ℓ(z, wrong label) − ℓ(z, corrected label)].

  `wrong_batches` and `corrected_batches` hold the same inputs with the old and
  the new labels; num_examples is the size of the edited training set (N: a
  label change removes nothing). θ + H⁻¹g approximates retraining on the
  corrected labels, H the Hessian of the mean loss on the corrected set.
  """
  wrong = data_lib.materialize(wrong_batches, "wrong_batches")
  fixed = data_lib.materialize(corrected_batches, "corrected_batches")
  if [data_lib.batch_size(b) for b in wrong] != [data_lib.batch_size(b) for b in fixed]:
    raise ValueError("wrong_batches and corrected_batches must hold the same examples in the same batch sizes.")
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive; got {num_examples}.")
  gw = _summed_gradient(per_example_loss_fn, params, wrong)
  gc = _summed_gradient(per_example_loss_fn, params, fixed)
  g = jax.tree.map(lambda a, b: (a - b) / num_examples, gw, gc)
  validation.check_finite(g, "label-change gradient")
  return g


# ---------------------------------------------------------------------------
# Updates.


class InfluenceUpdate(NamedTuple):
  """An edit Δ (params-shaped, zero outside the target set) to be added to θ.

  residual_norm: ‖H[:,T] Δ_T − g‖ over *all* coordinates (how far the
    first-order gradient change is from cancelling g; GIF minimises it).
  relative_residual: residual_norm / ‖g‖.
  num_iters / converged: of the solve (CG: `solvers.CGResult`; Neumann: iterations with the final normaliser).
  normaliser: the Neumann normaliser n (the operator was divided by n²); nan for CG.
  """

  delta: Params
  residual_norm: jax.Array
  relative_residual: jax.Array
  num_iters: jax.Array
  converged: jax.Array
  normaliser: float = math.nan


def _flatten(hessian, g, mask):
  if not isinstance(hessian, curvature.LinearOperator):
    raise TypeError("hessian must be a curvature.LinearOperator (e.g. from curvature.curvature_operator).")
  if jax.tree.structure(g) != jax.tree.structure(mask):
    raise ValueError(f"mask has pytree structure {jax.tree.structure(mask)}, but g has {jax.tree.structure(g)}.")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(mask)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"mask leaf {jax.tree_util.keystr(path)} has shape {np.shape(b)}, but g's has {np.shape(a)}.")
  validation.check_finite(g, "g")
  g_flat, unravel = ravel_pytree(g)
  if g_flat.size != hessian.dim:
    raise ValueError(f"g has {g_flat.size} entries, but the Hessian operator acts on {hessian.dim}.")
  m = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, g_flat.dtype), mask))[0]
  if not bool(jnp.any(m > 0)):
    raise ValueError("The target mask selects no parameter.")
  return g_flat, m, unravel


@dataclasses.dataclass(frozen=True)
class _Masked:
  """matvec of x ↦ P H Pᵀ x (P = diag(m)); operands (H's operands, m). Hashable, so jit caches it per H."""

  inner: Callable

  def __call__(self, ops, v):
    return ops[1] * self.inner(ops[0], ops[1] * v)


@dataclasses.dataclass(frozen=True)
class _NormalMasked:
  """matvec of x ↦ P H H Pᵀ x = H[:,T]ᵀ H[:,T] x; operands (H's operands, m)."""

  inner: Callable

  def __call__(self, ops, v):
    return ops[1] * self.inner(ops[0], self.inner(ops[0], ops[1] * v))


@dataclasses.dataclass(frozen=True)
class _Squared:
  """matvec of x ↦ A A x (positive semi-definite for symmetric A)."""

  inner: Callable

  def __call__(self, ops, v):
    return self.inner(ops, self.inner(ops, v))


def _derived(op, matvec, operands):
  """Returns a LinearOperator like `op` (dim, dtype, mesh) with another matvec and operands."""
  return op.replace(matvec=matvec, operands=operands)


def _run(op, rhs, psd: bool, solver: str, tol, max_iters, neumann):
  """Solves op x = rhs with op positive semi-definite (psd) or op x = rhs by its normal equations.

  Returns (x, num_iters, converged, normaliser). "cg" on a non-psd op runs plain
  CG (for a positive-definite op, e.g. damped); "normal" and "neumann" on a
  non-psd op solve op² x = op rhs.
  """
  if solver not in SOLVERS:
    raise ValueError(f"Unknown solver {solver!r}; expected one of {SOLVERS}.")
  if solver == "normal" and not psd:
    op, rhs = _derived(op, _Squared(op.matvec), op.operands), op(rhs)
  if solver == "neumann":
    if not psd:
      op, rhs = _derived(op, _Squared(op.matvec), op.operands), op(rhs)
    res = gif_neumann.neumann_solve(op, rhs, max_iters=max_iters or 30, tol=tol, **(neumann or {}))
    return res.x, res.num_iters, res.converged, res.normaliser
  res = solvers.conjugate_gradient(op, rhs, tol=tol, max_iters=max_iters)
  return res.x, res.num_iters, res.converged, math.nan


def _finish(hessian, g_flat, m, unravel, solved) -> InfluenceUpdate:
  x, num_iters, converged, normaliser = solved
  delta = m * x
  r = jnp.linalg.norm(hessian(delta) - g_flat)
  return InfluenceUpdate(unravel(delta), r, r / jnp.linalg.norm(g_flat), num_iters, converged, normaliser)


def gif_update(hessian, g: Params, mask: Params, *, solver: str = "cg", tol: float = 1e-6,
               max_iters: int | None = None, neumann: dict | None = None) -> InfluenceUpdate:
  """Returns the GIF edit: Δ_T = argmin_Δ ‖H[:,T] Δ − g‖, zero outside T (add it to θ).

  Solves the normal equations P H H Pᵀ x = P H g (two products with H an
  iteration; positive semi-definite even when H is indefinite) by CG
  (solver="cg" or "normal": stops at relative residual `tol` or after
  `max_iters`, default p) or by the authors' Neumann iteration
  (solver="neumann": `max_iters`, default 30, iterations; `neumann` holds
  further `gif_neumann.neumann_solve` arguments). In blocks:
  (H_TT² + H_TF H_FT) Δ_T = H_TT g_T + H_TF g_F. With T = all it is H⁻¹ g.
  The reported residual is ‖H[:,T]Δ − g‖ over all coordinates.
  """
  g_flat, m, unravel = _flatten(hessian, g, mask)
  op = _derived(hessian, _NormalMasked(hessian.matvec), (hessian.operands, m))
  return _finish(hessian, g_flat, m, unravel, _run(op, m * hessian(g_flat), True, solver, tol, max_iters, neumann))


def fif_update(hessian, g: Params, mask: Params, *, solver: str = "normal", tol: float = 1e-6,
               max_iters: int | None = None, neumann: dict | None = None) -> InfluenceUpdate:
  """Returns the FIF edit Δ_T = H_TT⁻¹ g_T (the other parameters treated as frozen), zero outside T.

  H_TT may be indefinite for a non-convex model. solver="normal" (default)
  runs CG on H_TT² Δ = H_TT g_T, positive semi-definite: the exact H_TT⁻¹ g_T
  when H_TT is nonsingular, the least-squares solution of H_TT Δ = g_T
  otherwise; "neumann" runs the Neumann iteration on the same equations.
  solver="cg" runs plain CG on H_TT (half the products): only for H_TT
  positive definite, e.g. with enough damping in the operator; it stops with
  converged=False on non-positive curvature.
  """
  g_flat, m, unravel = _flatten(hessian, g, mask)
  op = _derived(hessian, _Masked(hessian.matvec), (hessian.operands, m))
  return _finish(hessian, g_flat, m, unravel, _run(op, m * g_flat, False, solver, tol, max_iters, neumann))


def pif_update(hessian, g: Params, mask: Params, *, solver: str = "normal", tol: float = 1e-6,
               max_iters: int | None = None, neumann: dict | None = None) -> InfluenceUpdate:
  """Returns the PIF edit Δ_T = (H⁻¹ g)_T: the full influence update with the coordinates outside T zeroed.

  The full solve H x = g uses CG on H² x = H g (solver="normal", default; H may
  be indefinite), the Neumann iteration on it ("neumann") or plain CG on H
  ("cg", H positive definite).
  """
  g_flat, m, unravel = _flatten(hessian, g, mask)
  return _finish(hessian, g_flat, m, unravel, _run(hessian, g_flat, False, solver, tol, max_iters, neumann))


def if_update(hessian, g: Params, **solver_kwargs) -> InfluenceUpdate:
  """Returns the classic influence edit Δ = H⁻¹ g on every parameter (θ + Δ ≈ the retrained θ); see `pif_update`."""
  return pif_update(hessian, g, gif_selection.full_mask(g), **solver_kwargs)


def apply_update(params: Params, update, scale: float = 1.0) -> Params:
  """Returns θ + scale · Δ (`update` an InfluenceUpdate or a params-shaped Δ)."""
  delta = update.delta if isinstance(update, InfluenceUpdate) else update
  return jax.tree.map(lambda p, d: p + scale * jnp.asarray(d, jnp.result_type(p)), params, delta)
