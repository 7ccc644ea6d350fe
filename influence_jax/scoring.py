"""Influence scores from projected gradients (docs/design.md, "What a score means"; docs/design.md, "Arnoldi influence and the spectral tail").

Every score is an estimate of ∇ℓ(x)ᵀ (H + δI)⁻¹ ∇ℓ(z) for test x and
training z. Positive: z is a proponent of x (upweighting z lowers x's loss).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from influence_jax import data as data_lib
from influence_jax import preconditioning
from influence_jax import projection
from influence_jax import validation
from influence_jax.eigenspace import (Eigenspace, check_params, inverse_eigenvalues, on_mesh, scoring_damping,
                                      tail_constant_or_default)
from influence_jax.types import LossFn, PerExampleLossFn


def _check_proj(eigenspace: Eigenspace, proj: jax.Array, name: str) -> None:
  if proj.ndim != 2 or proj.shape[1] != eigenspace.k:
    raise ValueError(f"{name} has shape {proj.shape}; expected (num_examples, {eigenspace.k}).")


def influence_scores(
    eigenspace: Eigenspace,
    test_proj: jax.Array,
    train_proj: jax.Array,
    *,
    damping: Optional[float] = None,
) -> jax.Array:
  """Returns the (T, N) scores G(x)ᵀ (Λ + δ)⁻¹ G(z) (top-k eigenspace only).

  Positive: train example z is a proponent of test example x.
  """
  _check_proj(eigenspace, test_proj, "test_proj")
  _check_proj(eigenspace, train_proj, "train_proj")
  return (test_proj * inverse_eigenvalues(eigenspace, damping)) @ train_proj.T


def influence_scores_with_tail(
    eigenspace: Eigenspace,
    test_proj: jax.Array,
    train_proj: jax.Array,
    gradient_dots: jax.Array,
    *,
    tail_constant: Optional[float] = None,
    damping: Optional[float] = None,
) -> jax.Array:
  """Returns (T, N) scores with the spectral tail: G(x)ᵀ(Λ+δ)⁻¹G(z) + (∇ℓ(x)ᵀ∇ℓ(z) − G(x)ᵀG(z))/c.

  `gradient_dots` is the (T, N) matrix ∇ℓ(x)ᵀ∇ℓ(z); c defaults to λ_k + δ.
  Positive: z is a proponent of x.
  """
  c = tail_constant_or_default(eigenspace, damping, tail_constant)
  if gradient_dots.shape != (test_proj.shape[0], train_proj.shape[0]):
    raise ValueError(
        f"gradient_dots has shape {gradient_dots.shape}; expected "
        f"({test_proj.shape[0]}, {train_proj.shape[0]}).")
  top = influence_scores(eigenspace, test_proj, train_proj, damping=damping)
  return top + (gradient_dots - test_proj @ train_proj.T) / c


def self_influence(
    eigenspace: Eigenspace,
    train_proj: jax.Array,
    *,
    damping: Optional[float] = None,
    sq_norms: Optional[jax.Array] = None,
    tail_constant: Optional[float] = None,
) -> jax.Array:
  """Returns (N,) self-influence G(z)ᵀ(Λ+δ)⁻¹G(z) ≥ 0 for positive Λ + δ.

  With `sq_norms` (‖∇ℓ(z)‖²) the spectral tail (‖∇ℓ(z)‖² − ‖G(z)‖²)/c is added.
  """
  _check_proj(eigenspace, train_proj, "train_proj")
  out = jnp.sum(train_proj**2 * inverse_eigenvalues(eigenspace, damping), axis=1)
  if sq_norms is not None:
    c = tail_constant_or_default(eigenspace, damping, tail_constant)
    out = out + (sq_norms - jnp.sum(train_proj**2, axis=1)) / c
  return out


def query_side(
    eigenspace: Eigenspace,
    query_proj: jax.Array,
    query_sketch: Optional[jax.Array] = None,
    *,
    query_residual: Optional[jax.Array] = None,
    damping: Optional[float] = None,
    tail_constant: Optional[float] = None,
) -> jax.Array:
  """Returns (T, k [+ r + m]) query vectors q(x) with score(z, x) ≈ q(x) · row_side(z).

  q(x) = [G(x)(Λ+δ)⁻¹, V∇ℓ(x)/c, S(x)/c]: with the residual coordinates V∇ℓ (`residual_basis`) and
  the sketches S = R(I − WᵀW)∇ℓ, W = [U; V], of `sketch.py` (made on W) the rest gives the spectral
  tail (∇ℓ(x)ᵀ(I − UᵀU)∇ℓ(z))/c; without them, top-k scores only. Positive scores: z is a proponent of x.
  """
  _check_proj(eigenspace, query_proj, "query_proj")
  top = query_proj * inverse_eigenvalues(eigenspace, damping)
  if query_sketch is None and query_residual is None:
    return top
  c = tail_constant_or_default(eigenspace, damping, tail_constant)
  rest = [x / c for x in (query_residual, query_sketch) if x is not None]
  return jnp.concatenate([top, *rest], axis=1)


def row_side(projections: jax.Array, sketch: Optional[jax.Array] = None,
             residual: Optional[jax.Array] = None) -> jax.Array:
  """Returns (N, k [+ r + m]) training-side vectors [G(z), V∇ℓ(z), S(z)] matching `query_side`."""
  return jnp.concatenate([x for x in (projections, residual, sketch) if x is not None], axis=1)


def influence(
    eigenspace: Eigenspace,
    per_example_loss_fn: PerExampleLossFn,
    params,
    test_batches,
    train_batches,
    *,
    tail: bool = False,
    tail_constant: Optional[float] = None,
    damping: Optional[float] = None,
    loss_fn: Optional[LossFn] = None,
    curvature_batches=None,
    cg_iters: int = 3,
    method: str = "vjp",
    microbatch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> jax.Array:
  """Returns the (T, N) influence scores of every train example on every test example.

  score(z, x) ≈ ∇ℓ(x)ᵀ (H + δI)⁻¹ ∇ℓ(z); positive: z is a proponent of x.

  - `tail=False`: the top-k eigenspace only, G(x)ᵀ(Λ+δ)⁻¹G(z).
  - `tail=True` with `loss_fn` and `curvature_batches` (the fit's): each query is solved by
    `cg_iters` conjugate-gradient iterations preconditioned with the spectral tail
    (`preconditioning.influence_preconditioned`), the default since it is as faithful as
    100-iteration CG at a tenth of its cost (docs/eval_results.md). Cost per query: 1 + cg_iters
    curvature products over the curvature batches; per training example: one gradient dotted with
    the T solved vectors. `cg_iters=0` is the plain tail below.
  - `tail=True` otherwise: the spectral tail (docs/design.md, "Arnoldi influence and the spectral tail"), G(x)ᵀ(Λ+δ)⁻¹G(z) + (∇ℓ(x)ᵀ∇ℓ(z) −
    G(x)ᵀG(z))/c: the training examples are projected on [eigenvectors; test gradients] in one
    pass (no p-sized per-example gradient of the training set is held; the T test gradients are).

  The eigenspace is used on its own mesh, or laid out on `mesh` when one is
  given; test and train batches are split over its 'data' axis (see
  `projection.project_on`; global train batches keep their padding rows,
  to be masked by the caller) and the scores' train axis follows the train
  projections' layout. The preconditioned solve runs on one device (no `mesh`).
  """
  check_params(eigenspace, params)
  validation.check_finite(params, "params")
  scoring_damping(eigenspace, damping)  # Refused before any gradient is computed.
  if (loss_fn is None) != (curvature_batches is None):
    raise ValueError("Pass both loss_fn and curvature_batches (the preconditioned tail solves with the curvature "
                     "of the fit) or neither (the plain tail).")
  if tail and loss_fn is not None and cg_iters:
    if (mesh is not None and mesh.devices.size > 1) or eigenspace.mesh.devices.size > 1:
      raise ValueError("The preconditioned tail (loss_fn given, cg_iters > 0) runs on one device: pass no mesh and "
                       "an eigenspace on one device, or cg_iters=0 for the plain tail on a mesh.")
    return preconditioning.influence_preconditioned(
        eigenspace, per_example_loss_fn, params, test_batches, train_batches, method=method,
        microbatch_size=microbatch_size, loss_fn=loss_fn, curvature_batches=curvature_batches, cg_iters=cg_iters,
        tail_constant=tail_constant, damping=damping)
  eigenspace = on_mesh(eigenspace, mesh)
  mesh = eigenspace.mesh
  test_batches = data_lib.materialize(test_batches, "test_batches")
  train_batches = data_lib.materialize(train_batches, "train_batches")
  kw = dict(method=method, microbatch_size=microbatch_size, mesh=mesh)
  if not tail:
    test_proj = projection.project_on(eigenspace.eigenvectors, per_example_loss_fn, params, test_batches, **kw).values
    train_proj = projection.project_on(eigenspace.eigenvectors, per_example_loss_fn, params, train_batches, **kw).values
    return influence_scores(eigenspace, test_proj, train_proj, damping=damping)
  test_grads = projection.gradients(per_example_loss_fn, params, test_batches, mesh=mesh)
  test_grads = test_grads.astype(eigenspace.eigenvectors.dtype)
  test_proj = test_grads @ eigenspace.eigenvectors.T
  directions = jnp.concatenate([eigenspace.eigenvectors, test_grads])
  both = projection.project_on(directions, per_example_loss_fn, params, train_batches, **kw).values
  train_proj, dots = both[:, : eigenspace.k], both[:, eigenspace.k:].T
  return influence_scores_with_tail(
      eigenspace, test_proj, train_proj, dots, tail_constant=tail_constant, damping=damping)
