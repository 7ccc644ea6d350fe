"""The Eigenspace value: top-k curvature eigenpairs, fitted once and reused (docs/design.md, "Arnoldi influence and the spectral tail").

H⁻¹ ≈ Uᵀ (Λ + δ)⁻¹ U with U the (k, p) eigenvectors (rows, flat parameter
order of `ravel_pytree(params)`), Λ the eigenvalues of the *undamped*
curvature and δ the damping stored beside them: the damping is applied when
inverting, so it can be changed without refitting (a shift changes no
eigenvector).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import arnoldi
from influence_jax import curvature as curvature_lib
from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import sharding as sharding_lib
from influence_jax import validation
from influence_jax.types import LossFn, PerExampleLossFn


@dataclasses.dataclass(frozen=True)
class EigenspaceInfo:
  """How an eigenspace was made (hashable; saved beside the arrays).

  The Ritz fields describe all num_ritz Ritz values of the Arnoldi run, not only the kept ones:
  num_selectable passed the selection (positive beyond the threshold for "largest", of magnitude
  beyond it for "magnitude"; k = min(top_k, num_selectable)), num_negative_ritz are < 0 and
  min_ritz_value is the smallest (None: an eigenspace saved before these fields existed).
  """

  curvature: str
  selection: str
  n_iters: int
  num_steps: int
  breakdown: bool
  top_k: int
  seed: int
  num_params: int
  num_examples: int
  param_signature: tuple
  num_ritz: int = 0
  num_selectable: int = 0
  num_negative_ritz: int = 0
  min_ritz_value: Optional[float] = None
  selection_threshold: Optional[float] = None


@flax.struct.dataclass
class Eigenspace:
  """Top-k eigenpairs of the curvature.

  eigenvalues: (k,) descending, of the undamped curvature (replicated).
  eigenvectors: (k, P) orthonormal rows in the flat layout of their mesh
    (`sharding` module: P = sharding.padded_dim(p, mesh) ≥ p columns split
    over 'model', the columns beyond p exactly zero; P = p on one device).
    `host_eigenvectors()` returns the (k, p) values as numpy.
  residuals: (k,) ‖Cu − λu‖ measured with one product each (NaN if skipped).
  ritz_estimates: (k,) the Arnoldi residual bound |β_n V[n-1, j]|.
  num_params: p, the number of parameters (static).
  damping: δ ≥ 0 used when inverting, (Λ + δ)⁻¹.
  info: how it was made (EigenspaceInfo).
  """

  eigenvalues: jax.Array
  eigenvectors: jax.Array
  residuals: jax.Array
  ritz_estimates: jax.Array
  num_params: int = flax.struct.field(pytree_node=False)
  damping: float = flax.struct.field(pytree_node=False, default=0.0)
  info: Optional[EigenspaceInfo] = flax.struct.field(pytree_node=False, default=None)

  @property
  def k(self) -> int:
    return int(self.eigenvalues.shape[0])

  @property
  def mesh(self) -> jax.sharding.Mesh:
    """The mesh the eigenvectors are laid out on (the 1 × 1 mesh on one device)."""
    return sharding_lib.mesh_of(self.eigenvectors)

  def host_eigenvectors(self) -> np.ndarray:
    """Returns the (k, p) eigenvectors as numpy, padding stripped (on every process: a collective)."""
    return sharding_lib.to_host(self.eigenvectors)[:, : self.num_params]


def on_mesh(eigenspace: Eigenspace, mesh: Optional[jax.sharding.Mesh]) -> Eigenspace:
  """Returns `eigenspace` laid out on `mesh` (eigenvectors in its flat layout, the rest replicated).

  None or the eigenspace's own mesh returns it unchanged.
  """
  if mesh is None or mesh == eigenspace.mesh:
    return eigenspace
  rep = sharding_lib.replicated(mesh)
  small = lambda x: sharding_lib.put(sharding_lib.to_host(x), rep)
  return eigenspace.replace(
      eigenvalues=small(eigenspace.eigenvalues),
      eigenvectors=sharding_lib.to_flat_layout(eigenspace.eigenvectors, eigenspace.num_params, mesh),
      residuals=small(eigenspace.residuals), ritz_estimates=small(eigenspace.ritz_estimates))


def check_params(eigenspace: Eigenspace, params: Any) -> None:
  """Raises ValueError if `params` are not shaped like those the eigenspace was fitted on."""
  if eigenspace.info is not None:
    validation.check_same_signature(eigenspace.info.param_signature, params, "the eigenspace")
  size = ravel_pytree(params)[0].size
  if size != eigenspace.num_params:
    raise ValueError(f"params have {size} numbers but the eigenspace was fitted on {eigenspace.num_params}.")


def start_vector(num_params: int, dtype, seed: int, *, mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """Returns the Arnoldi start vector: standard normal from `seed`, unnormalised, in `mesh`'s flat layout.

  The first `num_params` entries are the same on every mesh (default: one device).
  """
  mesh = sharding_lib.mesh_or_default(mesh)
  return sharding_lib.to_flat_layout(
      jax.random.normal(jax.random.key(seed), (num_params,), dtype), num_params, mesh)


def distill(
    op: curvature_lib.LinearOperator,
    state: arnoldi.ArnoldiState,
    *,
    top_k: int,
    selection: str = "largest",
    damping: float = 0.0,
    compute_residuals: bool = True,
    info: Optional[EigenspaceInfo] = None,
) -> Eigenspace:
  """Returns the top-k eigenpairs of `op` from a finished Arnoldi `state`.

  U = Vᵀ Q: Ritz vectors of the kept Ritz values, computed in the basis'
  flat layout on the operator's mesh (see `Eigenspace`); eigenvalues and
  diagnostics replicated. With `compute_residuals`, each pair's ‖Cu − λu‖
  costs one more curvature product.
  """
  ritz = arnoldi.ritz(state)
  keep = arnoldi.select(ritz.values, top_k, selection)
  if info is not None:
    threshold = arnoldi.selection_threshold(ritz.values)
    selectable = ritz.values > threshold if selection == "largest" else np.abs(ritz.values) > threshold
    info = dataclasses.replace(
        info, num_ritz=int(ritz.size), num_selectable=int(np.sum(selectable)),
        num_negative_ritz=int(np.sum(ritz.values < 0)), min_ritz_value=float(np.min(ritz.values)),
        selection_threshold=float(threshold))
  if keep.size == 0:
    raise ValueError(
        f"No eigenvalue passed the {selection!r} selection (all {ritz.size} Ritz values are "
        "non-positive or negligible): is the curvature zero at these params?")
  dtype = state.basis.dtype
  rep = sharding_lib.replicated(op.mesh)
  # Zero coefficients on the basis rows beyond the m used: coeffs · basis reads the basis in place (a slice
  # basis[:m] would be a copy of most of it: 0.88 GB more at the peak of a 3.4M-parameter LM's fit).
  coeffs = np.zeros((keep.size, state.basis.shape[0]), dtype)
  coeffs[:, :ritz.size] = ritz.vectors[:, keep].T
  coeffs = sharding_lib.put(coeffs, rep)
  values = sharding_lib.put(np.asarray(ritz.values[keep], dtype), rep)
  vectors, residuals = _ritz_vectors(op.matvec, op.dim, op.mesh, compute_residuals)(
      op.operands, state.basis, coeffs, values)
  return Eigenspace(
      eigenvalues=values,
      eigenvectors=vectors,
      residuals=residuals,
      ritz_estimates=sharding_lib.put(np.asarray(ritz.estimates[keep], dtype), rep),
      num_params=int(op.dim),
      damping=float(damping),
      info=info,
  )


@functools.lru_cache(maxsize=32)
def _ritz_vectors(matvec, dim: int, mesh, compute_residuals: bool):
  """Returns a jitted (operands, basis, coeffs, values) ↦ ((k, P) Ritz vectors coeffs · basis in the
  flat layout, (k,) residuals ‖Cu − λu‖ or NaN, replicated)."""
  flat = sharding_lib.flat_sharding(mesh, 2)
  rep = sharding_lib.replicated(mesh)

  def compute(operands, basis, coeffs, values):
    vectors = jax.lax.with_sharding_constraint(coeffs @ basis, flat)
    if not compute_residuals:
      return vectors, jnp.full(values.shape, jnp.nan, basis.dtype)
    whole = lambda u: jax.lax.with_sharding_constraint(u, rep)[:dim]
    apply = lambda u: sharding_lib.pad_last(matvec(operands, whole(u)), basis.shape[1])
    products = jax.lax.with_sharding_constraint(jax.lax.map(apply, vectors), flat)
    return vectors, jnp.linalg.norm(products - values[:, None] * vectors, axis=1)

  return jax.jit(compute, out_shardings=(flat, rep))


@functools.partial(jax.jit, static_argnums=0)
def _loss_value(loss_fn: LossFn, params: Any, batch: Any) -> jax.Array:
  return loss_fn(params, batch)


def fit_eigenspace(
    loss_fn: LossFn,
    params: Any,
    batches,
    *,
    n_iters: int,
    top_k: int,
    damping: float = 0.0,
    curvature: str = "hessian",
    seed: int = 0,
    selection: str = "largest",
    microbatch_size: Optional[int] = None,
    compute_residuals: bool = True,
    tol: Optional[float] = None,
    block_size: int = 32,
    callback: Optional[Callable[[arnoldi.ArnoldiState], None]] = None,
    initial_state: Optional[arnoldi.ArnoldiState] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> Eigenspace:
  """Returns the top-k eigenpairs of the curvature of the mean loss over `batches`.

  n_iters Arnoldi steps (full re-orthogonalisation) on the undamped
  curvature ("hessian" or "gauss_newton"); `damping` δ is stored for
  inversion. `selection` "largest" keeps the largest positive eigenvalues,
  "magnitude" the largest |λ|. Fewer than top_k pairs come back when the
  Krylov space closes early (rank-deficient curvature).

  `callback(state)` runs after every step (progress, checkpoints);
  `initial_state` resumes a run saved from such a callback (same inputs).

  With a `mesh` (`sharding.make_mesh`; default: one device): curvature
  batches are split over 'data', and the Krylov basis and the eigenvectors
  are in the mesh's flat layout (columns split over 'model' whatever p is,
  never whole on one device; see `Eigenspace`); eigenvalues and diagnostics
  replicated. The same start vector is used, so results equal the one-device
  fit up to rounding.
  """
  if not isinstance(n_iters, (int, np.integer)) or n_iters < 1:
    raise ValueError(f"n_iters must be a positive integer, got {n_iters!r}.")
  if not isinstance(top_k, (int, np.integer)) or top_k < 1:
    raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
  if top_k > n_iters:
    raise ValueError(f"top_k ({top_k}) cannot exceed n_iters ({n_iters}): Arnoldi finds at most n_iters eigenpairs.")
  if selection not in arnoldi.SELECTIONS:
    raise ValueError(f"Unknown selection {selection!r}; expected one of {arnoldi.SELECTIONS}.")
  damping = validation.check_damping(damping)
  validation.check_finite(params, "params")
  batches = data_lib.materialize(batches, "batches")
  # Jitted: op by op, parameters split over several processes' devices would dispatch a sum of leaves (the
  # L2 term) onto each process's own default device, a collective the processes do not share (they hang).
  loss = _loss_value(loss_fn, params, batches[0])
  if np.ndim(loss) != 0:
    raise ValueError(f"loss_fn must return a scalar; got shape {np.shape(loss)}.")
  validation.check_finite_scalar(loss, "loss_fn(params, batches[0])")
  op = curvature_lib.curvature_operator(
      loss_fn, params, batches, curvature=curvature, microbatch_size=microbatch_size, mesh=mesh)
  state = initial_state
  if state is None:
    state = arnoldi.init(start_vector(op.dim, op.dtype, seed, mesh=op.mesh), n_iters, block_size=block_size)
  elif (state.basis.shape[1] != sharding_lib.padded_dim(op.dim, op.mesh)
        or state.hessenberg.shape[1] != n_iters):
    raise ValueError(
        f"initial_state has a basis of shape {state.basis.shape} for n_iters={state.hessenberg.shape[1]}, "
        f"but this fit has {op.dim} parameters and n_iters={n_iters}.")
  state = arnoldi.run(op, state, tol=tol, block_size=block_size, callback=callback)
  validation.check_finite(state.hessenberg, "the Arnoldi Hessenberg matrix (the curvature products)")
  info = EigenspaceInfo(
      curvature=curvature,
      selection=selection,
      n_iters=int(n_iters),
      num_steps=int(state.num_steps),
      breakdown=bool(state.breakdown),
      top_k=int(top_k),
      seed=int(seed),
      num_params=int(op.dim),
      num_examples=sum(data_lib.batch_size(b) for b in batches),
      param_signature=validation.param_signature(params),
  )
  return distill(op, state, top_k=top_k, selection=selection, damping=damping,
                 compute_residuals=compute_residuals, info=info)



def project(
    eigenspace: Eigenspace,
    per_example_loss_fn: PerExampleLossFn,
    params: Any,
    batches,
    *,
    method: Optional[str] = None,
    microbatch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> jax.Array:
  """Returns the (N, k) projections G(z) = U ∇ℓ(z) of every example in `batches`, in order.

  `method`: as `projection.project_on` (None: layer-wise, for any per-example loss).

  The eigenvectors are used on their own mesh, or laid out on `mesh` when one
  is given; the batches are split over its 'data' axis and the result is
  sharded by example (see `projection.project_on`).
  """
  check_params(eigenspace, params)
  validation.check_finite(params, "params")
  return projection.project_on(
      eigenspace.eigenvectors, per_example_loss_fn, params, batches,
      method=method, microbatch_size=microbatch_size, mesh=mesh).values


def scoring_damping(eigenspace: Eigenspace, damping: Optional[float] = None) -> float:
  """Returns the damping δ a score uses: `damping`, or the eigenspace's when None; raises ValueError
  unless it is finite and ≥ 0 (a negative δ flips the sign of every direction with λ < |δ|)."""
  return validation.check_damping(eigenspace.damping if damping is None else damping)


def kept_by_magnitude(eigenspace: Eigenspace) -> bool:
  """Returns True when the eigenpairs were selected by |λ| (`selection="magnitude"`): only then may a
  kept λ be negative, and λ + δ < 0 inverts a direction of negative curvature as it is."""
  return eigenspace.info is not None and eigenspace.info.selection == "magnitude"


def inverse_eigenvalues(eigenspace: Eigenspace, damping: Optional[float] = None) -> jax.Array:
  """Returns (k,) 1/(λ_j + δ); δ defaults to the eigenspace's damping (`scoring_damping`: ≥ 0).

  Raises ValueError when some λ_j + δ is not finite, or ≤ 0 for eigenpairs kept by value (selection
  "largest"). Eigenpairs kept by magnitude (`kept_by_magnitude`) may have λ_j + δ < 0: they were
  chosen to invert an indefinite curvature, negative directions included; only 0 is refused there.
  """
  delta = scoring_damping(eigenspace, damping)
  shifted = eigenspace.eigenvalues + delta
  bad = ~jnp.isfinite(shifted) | (shifted == 0 if kept_by_magnitude(eigenspace) else shifted <= 0)
  if bool(jnp.any(bad)):
    j = int(jnp.argmax(bad))
    raise ValueError(f"Eigenvalue {j} + damping is {float(shifted[j])} (λ = {float(eigenspace.eigenvalues[j])}, "
                     f"δ = {delta}): λ + δ must be finite and positive for eigenpairs kept by value.")
  return 1.0 / shifted


def default_tail_constant(eigenspace: Eigenspace, damping: Optional[float] = None) -> float:
  """Returns λ_k + δ: the smallest kept eigenvalue plus damping (docs/design.md, "Arnoldi influence and the spectral tail")."""
  return float(jnp.min(eigenspace.eigenvalues)) + scoring_damping(eigenspace, damping)


def tail_constant_or_default(eigenspace: Eigenspace, damping: Optional[float] = None,
                             tail_constant: Optional[float] = None) -> float:
  """Returns `tail_constant`, or λ_k + δ when None; raises ValueError unless it is finite and positive."""
  c = default_tail_constant(eigenspace, damping) if tail_constant is None else float(tail_constant)
  if not (np.isfinite(c) and c > 0):
    raise ValueError(f"The tail constant c must be finite and positive, got {c} (λ_k + δ by default: "
                     "check the damping).")
  return c
