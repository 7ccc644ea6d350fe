"""Influence scores from projected gradients (DESIGN §1–§2).

Every score is an estimate of ∇ℓ(x)ᵀ (H + δI)⁻¹ ∇ℓ(z) for test x and
training z. Positive: z is a proponent of x (upweighting z lowers x's loss).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace, check_params, on_mesh


def inverse_eigenvalues(eigenspace: Eigenspace, damping: Optional[float] = None) -> jax.Array:
  """Returns (k,) 1/(λ_j + δ); δ defaults to the eigenspace's damping. Raises if some λ_j + δ is 0."""
  delta = eigenspace.damping if damping is None else float(damping)
  shifted = eigenspace.eigenvalues + delta
  if bool(jnp.any(shifted == 0)):
    raise ValueError("Some eigenvalue + damping is exactly 0; use a positive damping.")
  return 1.0 / shifted


def default_tail_constant(eigenspace: Eigenspace, damping: Optional[float] = None) -> float:
  """Returns λ_k + δ: the smallest kept eigenvalue plus damping (DESIGN §2, the spectral tail)."""
  delta = eigenspace.damping if damping is None else float(damping)
  return float(jnp.min(eigenspace.eigenvalues)) + delta


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
  c = default_tail_constant(eigenspace, damping) if tail_constant is None else float(tail_constant)
  if not c > 0:
    raise ValueError(f"The tail constant must be positive, got {c}.")
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
    c = default_tail_constant(eigenspace, damping) if tail_constant is None else float(tail_constant)
    out = out + (sq_norms - jnp.sum(train_proj**2, axis=1)) / c
  return out


class TopK(NamedTuple):
  """Per test example: indices and scores of the most positive (proponents) and most negative (opponents)."""

  proponents: np.ndarray
  proponent_scores: np.ndarray
  opponents: np.ndarray
  opponent_scores: np.ndarray


def top_k(scores: jax.Array, k: int) -> TopK:
  """Returns the k largest (proponents, descending) and k smallest (opponents, ascending) per row."""
  k = min(k, scores.shape[1])
  pro_s, pro_i = jax.lax.top_k(scores, k)
  opp_s, opp_i = jax.lax.top_k(-scores, k)
  return TopK(np.asarray(pro_i), np.asarray(pro_s), np.asarray(opp_i), np.asarray(-opp_s))


def empty_top_k(num_test: int, k: int, dtype=jnp.float32) -> TopK:
  """Returns a running TopK with no candidates yet (indices −1, scores ∓inf)."""
  idx = -np.ones((num_test, k), np.int32)
  inf = np.full((num_test, k), np.inf, dtype)
  return TopK(idx, -inf, idx.copy(), inf.copy())


def merge_top_k(running: TopK, scores: jax.Array, offset: int) -> TopK:
  """Returns `running` updated with a (T, B) block of scores for train examples offset..offset+B−1.

  Merging blocks in any split gives the same result as `top_k` over all
  columns at once (ties broken toward the lower index).
  """
  k = running.proponents.shape[1]
  scores = np.asarray(scores)
  cols = np.broadcast_to(np.arange(offset, offset + scores.shape[1], dtype=np.int32), scores.shape)

  def best(cand_idx, cand_scores, sign):
    order = np.lexsort((cand_idx, -sign * cand_scores), axis=1)[:, :k]
    return np.take_along_axis(cand_idx, order, 1), np.take_along_axis(cand_scores, order, 1)

  pro = best(np.concatenate([running.proponents, cols], 1),
             np.concatenate([running.proponent_scores, scores.astype(running.proponent_scores.dtype)], 1), 1)
  opp = best(np.concatenate([running.opponents, cols], 1),
             np.concatenate([running.opponent_scores, scores.astype(running.opponent_scores.dtype)], 1), -1)
  return TopK(pro[0], pro[1], opp[0], opp[1])


def influence(
    eigenspace: Eigenspace,
    per_example_loss_fn: Callable,
    params,
    test_batches,
    train_batches,
    *,
    tail: bool = False,
    tail_constant: Optional[float] = None,
    damping: Optional[float] = None,
    method: str = "vjp",
    microbatch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> jax.Array:
  """Returns the (T, N) influence scores of every train example on every test example.

  score(z, x) ≈ ∇ℓ(x)ᵀ (H + δI)⁻¹ ∇ℓ(z); positive: z is a proponent of x.
  `tail=True` adds the spectral-tail remainder (DESIGN §2): the training
  examples are projected on [eigenvectors; test gradients] in one pass, so no
  p-sized per-example gradient of the training set is ever held (the T test
  gradients are: T × p numbers).
  The eigenspace is used on its own mesh, or laid out on `mesh` when one is
  given; test and train batches are split over its 'data' axis (see
  `projection.project_on`; global train batches keep their padding rows,
  to be masked by the caller) and the scores' train axis follows the train
  projections' layout.
  """
  check_params(eigenspace, params)
  validation.check_finite(params, "params")
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
