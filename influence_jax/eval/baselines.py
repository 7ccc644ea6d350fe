"""Attribution methods behind one interface, for benchmarking against retraining.

Every method is `method(inputs, **settings) -> MethodResult` whose scores are
(T, N) with the docs/design.md, "What a score means" sign: scores[x, z] > 0 means training example z is a
proponent of test example x. The influence methods estimate
∇ℓ(x)ᵀ (H + δI)⁻¹ ∇ℓ(z), H the Hessian of the training objective at
`inputs.params`; gradient dot product and TracIn replace H⁻¹ by I (TracIn:
summed over checkpoints, each weighted by its learning rate).

Timings are wall seconds measured around the work, blocking on results, JIT
compilation included (call a method twice to see the warm cost): `fit` is
everything done once per model (a factorisation, an eigenspace), `score`
everything that depends on the test examples.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import (curvature, data as data_lib, preconditioning, projection, residual_basis, scoring, sketch,
                           solvers, store)
from influence_jax.curvature import curvature_operator
from influence_jax.eigenspace import fit_eigenspace
from influence_jax.scoring import influence
from influence_jax.types import LossFn, PerExampleLossFn


class MethodInputs(NamedTuple):
  """What a method sees: the losses, the trained params, the data, and checkpoints for TracIn.

  checkpoints: a sequence of (params, learning_rate) saved during training.
  split_loss: loss_fn as a `curvature.SplitLoss` (the same objective), for methods run with
    curvature="gauss_newton"; None: only the Hessian.
  """

  loss_fn: LossFn
  per_example_loss_fn: PerExampleLossFn
  params: Any
  train_batches: Sequence[Any]
  test_batches: Sequence[Any]
  checkpoints: Sequence[tuple[Any, float]] = ()
  split_loss: Optional[curvature.SplitLoss] = None


class MethodResult(NamedTuple):
  """scores: (T, N) numpy, docs/design.md, "What a score means" sign; fit_seconds, score_seconds: wall time incl. JIT; info: diagnostics."""

  scores: np.ndarray
  fit_seconds: float
  score_seconds: float
  info: dict


class _Clock:
  def __init__(self):
    self.start = time.perf_counter()

  def lap(self, *values) -> float:
    jax.block_until_ready(values)
    now = time.perf_counter()
    out, self.start = now - self.start, now
    return out


def query_gradients(inputs: MethodInputs, params=None) -> jax.Array:
  """Returns the (T, p) flat per-example gradients of the test examples (T × p must fit in memory)."""
  params = inputs.params if params is None else params
  return projection.gradients(inputs.per_example_loss_fn, params, data_lib.materialize(inputs.test_batches, "test_batches"))


def _dots_with_train(inputs: MethodInputs, directions: jax.Array, params=None) -> jax.Array:
  """Returns the (T, N) matrix directions · ∇ℓ(z) over all training examples z (no N × p gradients kept)."""
  params = inputs.params if params is None else params
  return projection.project_on(directions, inputs.per_example_loss_fn, params, inputs.train_batches).values.T


def curvature_loss(inputs: MethodInputs, kind: str) -> LossFn:
  """Returns the loss whose curvature `kind` ("hessian" or "gauss_newton") a method inverts: loss_fn,
  or for Gauss-Newton its SplitLoss (ValueError when the inputs have none)."""
  if kind == "hessian":
    return inputs.loss_fn
  if kind != "gauss_newton":
    raise ValueError(f"Unknown curvature {kind!r}; expected 'hessian' or 'gauss_newton'.")
  if inputs.split_loss is None:
    raise ValueError("curvature='gauss_newton' needs MethodInputs.split_loss (the objective as a SplitLoss).")
  return inputs.split_loss


def _dense_curvature(loss_fn, params, batches, kind: str, chunk: int = 256) -> jax.Array:
  """Returns the (p, p) dense curvature `kind` of the example-weighted mean of loss_fn over `batches`."""
  batches = data_lib.materialize(batches, "batches")
  total = sum(data_lib.batch_size(b) for b in batches)
  if kind == "hessian":
    return sum(_dense_hessian(loss_fn, params, b) * (data_lib.batch_size(b) / total) for b in batches)
  op = curvature_operator(loss_fn, params, batches, curvature=kind)
  columns = jax.jit(jax.vmap(op.matvec, in_axes=(None, 0)))
  eye = jnp.eye(op.dim, dtype=op.dtype)
  dense = jnp.concatenate([columns(op.operands, eye[i:i + chunk]) for i in range(0, op.dim, chunk)])
  return (dense + dense.T) / 2


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian(loss_fn, params, batch):
  """Returns the (p, p) Hessian of loss_fn on one batch (flat ravel_pytree order), jitted."""
  flat, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


def exact(inputs: MethodInputs, *, damping: float = 0.0, curvature: str = "hessian") -> MethodResult:
  """Exact influence ∇ℓ(x)ᵀ(H + δI)⁻¹∇ℓ(z) with a dense H (tiny models only); with
  curvature="gauss_newton" the dense Gauss-Newton matrix G instead of H.

  Fit: the dense curvature and its eigendecomposition (info: its smallest
  eigenvalue and the number of negative ones after damping).
  """
  clock = _Clock()
  hess = _dense_curvature(curvature_loss(inputs, curvature), inputs.params, inputs.train_batches, curvature)
  hess = hess + damping * jnp.eye(hess.shape[0], dtype=hess.dtype)
  evals, evecs = jnp.linalg.eigh(hess)
  if bool(jnp.any(evals == 0)):
    raise np.linalg.LinAlgError("H + damping·I is singular; use a positive damping.")
  fit_s = clock.lap(evals, evecs)
  g = query_gradients(inputs)
  solved = ((g @ evecs) / evals) @ evecs.T
  scores = _dots_with_train(inputs, solved)
  score_s = clock.lap(scores)
  info = {"min_eigenvalue": float(evals[0]), "num_negative": int(jnp.sum(evals < 0)), "dim": int(hess.shape[0])}
  return MethodResult(np.asarray(scores), fit_s, score_s, info)


def conjugate_gradients(inputs: MethodInputs, *, damping: float = 0.0, tol: float = 1e-6,
                        max_iters: int = 500, microbatch_size: Optional[int] = None,
                        curvature: str = "hessian") -> MethodResult:
  """Influence with (H + δI)⁻¹∇ℓ(x) solved by conjugate gradients, all test examples at once (with
  curvature="gauss_newton", (G + δI)⁻¹∇ℓ(x)).

  The T solves run as one batched CG (`solvers.conjugate_gradient`, each
  test example stopping on its own criteria); nothing is fitted.
  CG stops early where H + δI shows non-positive curvature: info reports
  how many solves converged and the iterations taken.
  """
  clock = _Clock()
  op = curvature_operator(curvature_loss(inputs, curvature), inputs.params, inputs.train_batches,
                          curvature=curvature, damping=damping, microbatch_size=microbatch_size)
  fit_s = clock.lap()
  g = query_gradients(inputs)
  res = solvers.conjugate_gradient(op, g, tol=tol, max_iters=max_iters)
  scores = _dots_with_train(inputs, res.x)
  score_s = clock.lap(scores)
  info = {"converged": f"{int(jnp.sum(res.converged))}/{g.shape[0]}",
          "mean_iters": float(jnp.mean(res.num_iters)),
          "max_rel_residual": float(jnp.max(res.residual_norm / jnp.linalg.norm(g, axis=1)))}
  return MethodResult(np.asarray(scores), fit_s, score_s, info)


def _hvp_rows(loss_fn, unravel, params, batch, h):
  """Returns H_batch h for each row of h (T, p), H the Hessian of loss_fn on `batch`."""
  return jax.vmap(lambda r: ravel_pytree(curvature.hvp(loss_fn, params, batch, unravel(r)))[0])(h)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _lissa(loss_fn, unravel, depth, batch_size, params, examples, v, damping, scale, key):
  """Returns (h_depth / scale, the largest ‖h_j‖/‖v‖ per step) for the rows of v."""
  num = data_lib.batch_size(examples)

  def step(h, k):
    if batch_size is None:
      batch = examples
    else:
      idx = jax.random.choice(k, num, (batch_size,), replace=False)
      batch = jax.tree.map(lambda x: x[idx], examples)
    new = v + h - (_hvp_rows(loss_fn, unravel, params, batch, h) + damping * h) / scale
    return new, jnp.max(jnp.linalg.norm(new, axis=1) / jnp.linalg.norm(v, axis=1))

  h, growth = jax.lax.scan(step, v, jax.random.split(key, depth))
  return h / scale, jnp.max(growth)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _relative_residuals(loss_fn, unravel, params, examples, x, v, damping):
  """Returns ‖(H + δI)x − v‖/‖v‖ per row, H the full-batch Hessian."""
  r = _hvp_rows(loss_fn, unravel, params, examples, x) + damping * x - v
  return jnp.linalg.norm(r, axis=1) / jnp.linalg.norm(v, axis=1)


def lissa(inputs: MethodInputs, *, damping: float = 0.0, scale: float = 10.0, depth: int = 1000,
          batch_size: Optional[int] = None, repeats: int = 1, tol: float = 1e-2, seed: int = 0) -> MethodResult:
  """Influence with (H + δI)⁻¹∇ℓ(x) from the LiSSA recursion (Agarwal et al. 2017; Koh & Liang's form).

  h₀ = v, h_j = v + h_{j−1} − (H_B + δI) h_{j−1}/scale over `depth` steps,
  H_B the Hessian on a random mini-batch of `batch_size` training examples
  (None: all of them, deterministic); (H + δI)⁻¹v ≈ h/scale, averaged over
  `repeats`. It converges only when every eigenvalue of H + δI lies in
  (0, 2·scale), at rate 1 − (λ_min + δ)/scale. info reports the final
  relative residual ‖(H + δI)x − v‖/‖v‖ with the full-batch H (converged:
  below `tol`) and divergence (non-finite iterates, or ‖h‖ beyond 10⁸‖v‖:
  the scores are then NaN).
  """
  if depth < 1 or repeats < 1 or not scale > 0:
    raise ValueError(f"Need depth ≥ 1, repeats ≥ 1 and scale > 0; got {depth}, {repeats}, {scale}.")
  clock = _Clock()
  examples = jax.tree.map(jnp.asarray, data_lib.concatenate(data_lib.materialize(inputs.train_batches)))
  flat, unravel = ravel_pytree(inputs.params)
  fit_s = clock.lap()
  g = query_gradients(inputs)
  dtype = flat.dtype
  total, growth = 0, 0.0
  for r in range(repeats):
    h, grow = _lissa(inputs.loss_fn, unravel, int(depth), batch_size, inputs.params, examples, g,
                     jnp.asarray(damping, dtype), jnp.asarray(scale, dtype), jax.random.key(seed + r))
    total = total + h
    growth = max(growth, float(grow))
  solved = total / repeats
  diverged = not bool(jnp.all(jnp.isfinite(solved))) or not np.isfinite(growth) or growth > 1e8
  scores = _dots_with_train(inputs, jnp.nan_to_num(solved))
  score_s = clock.lap(scores)
  residuals = np.asarray(_relative_residuals(inputs.loss_fn, unravel, inputs.params, examples,
                                             jnp.nan_to_num(solved), g, jnp.asarray(damping, dtype)))
  if diverged:
    scores = jnp.full_like(scores, jnp.nan)
  info = {"converged": f"{int(np.sum(residuals < tol))}/{g.shape[0]}",
          "median_rel_residual": float(np.median(residuals)), "diverged": diverged}
  return MethodResult(np.asarray(scores), fit_s, score_s, info)


def gradient_dot(inputs: MethodInputs) -> MethodResult:
  """Returns scores ∇ℓ(x)ᵀ∇ℓ(z) at the final params (H replaced by I)."""
  clock = _Clock()
  scores = _dots_with_train(inputs, query_gradients(inputs))
  return MethodResult(np.asarray(scores), 0.0, clock.lap(scores), {})


def tracin(inputs: MethodInputs) -> MethodResult:
  """Returns TracIn-CP scores Σ_c η_c ∇ℓ(x; θ_c)ᵀ∇ℓ(z; θ_c) over inputs.checkpoints (θ_c, η_c)."""
  if not inputs.checkpoints:
    raise ValueError("TracIn needs inputs.checkpoints: a non-empty sequence of (params, learning_rate).")
  clock = _Clock()
  scores = 0
  for params, lr in inputs.checkpoints:
    scores = scores + lr * _dots_with_train(inputs, query_gradients(inputs, params), params)
  return MethodResult(np.asarray(scores), 0.0, clock.lap(scores), {"num_checkpoints": len(inputs.checkpoints)})


def arnoldi(inputs: MethodInputs, *, top_k: int, n_iters: Optional[int] = None, damping: float = 0.0,
            tail: bool = False, seed: int = 0, curvature: str = "hessian") -> MethodResult:
  """Arnoldi influence (docs/design.md, "Arnoldi influence and the spectral tail"): top-k eigenpairs, with the spectral tail when `tail`.

  n_iters defaults to 1.5 · top_k. Fit: `fit_eigenspace`; score: `influence`.
  """
  n_iters = int(n_iters or round(1.5 * top_k))
  clock = _Clock()
  es = fit_eigenspace(curvature_loss(inputs, curvature), inputs.params, inputs.train_batches, n_iters=n_iters,
                      top_k=top_k, damping=damping, seed=seed, curvature=curvature)
  fit_s = clock.lap(es.eigenvectors)
  scores = influence(es, inputs.per_example_loss_fn, inputs.params, inputs.test_batches, inputs.train_batches, tail=tail)
  score_s = clock.lap(scores)
  info = {"k": es.k, "n_iters": n_iters, "smallest_kept_eigenvalue": float(jnp.min(es.eigenvalues)),
          "max_residual": float(jnp.max(es.residuals)), "min_ritz_value": es.info.min_ritz_value}
  return MethodResult(np.asarray(scores), fit_s, score_s, info)


def _stored_rows(inputs: MethodInputs, directions, sk: sketch.KroneckerSketch, batches) -> tuple[jax.Array, jax.Array]:
  """Returns what a projection store holds for `batches`: (N, k) W∇ℓ(z) and (N, m) R(I − WᵀW)∇ℓ(z)
  for orthonormal directions W (the eigenvectors, and a residual basis if any)."""
  rows = [sketch.project_and_sketch(directions, sk, inputs.per_example_loss_fn, inputs.params, b) for b in batches]
  return jnp.concatenate([r.projections for r in rows]), jnp.concatenate([r.sketch for r in rows])


def arnoldi_sketched(inputs: MethodInputs, *, top_k: int, n_iters: Optional[int] = None, damping: float = 0.0,
                     sketch_dim: int = 1024, seed: int = 0, curvature: str = "hessian") -> MethodResult:
  """Arnoldi influence with the spectral tail from stored sketches (what the projection store holds):
  score = G(x)(Λ+δ)⁻¹G(z) + S(x)·S(z)/c with S = R(I − UᵀU)∇ℓ, R a Kronecker sketch of `sketch_dim` rows."""
  n_iters = int(n_iters or round(1.5 * top_k))
  clock = _Clock()
  es = fit_eigenspace(curvature_loss(inputs, curvature), inputs.params, inputs.train_batches, n_iters=n_iters,
                      top_k=top_k, damping=damping, seed=seed, curvature=curvature)
  fit_s = clock.lap(es.eigenvectors)
  sk = sketch.make_sketch(es.num_params, sketch_dim, seed, es.eigenvectors.dtype)
  test_proj, test_sketch = _stored_rows(inputs, es.eigenvectors, sk, inputs.test_batches)
  scores = scoring.query_side(es, test_proj, test_sketch) @ scoring.row_side(
      *_stored_rows(inputs, es.eigenvectors, sk, inputs.train_batches)).T
  score_s = clock.lap(scores)
  return MethodResult(np.asarray(scores), fit_s, score_s, {"k": es.k, "n_iters": n_iters, "sketch_dim": sk.dim})


def arnoldi_pcg(inputs: MethodInputs, *, top_k: int, cg_iters: int, n_iters: Optional[int] = None, damping: float = 0.0,
                seed: int = 0, curvature: str = "hessian", sketch_dim: int = 0, residual_rank: int = 0,
                residual_examples: int = 1024, store_dtype: Optional[str] = None) -> MethodResult:
  """Influence with the query side solved by CG preconditioned with the eigenspace's tail (see preconditioning).

  Fit: `fit_eigenspace` (n_iters defaults to 1.5 · top_k); score: the test
  gradients, `cg_iters` preconditioned CG iterations from the tail solution,
  then either one pass over the training set dotted with the T solved vectors
  (sketch_dim = 0) or, as from a projection store, the training rows
  [W∇ℓ(z), R(I − WᵀW)∇ℓ(z)] with a sketch of `sketch_dim` rows against
  `preconditioning.solved_query_side` (the rows are counted in the score time).
  W = U, or [U; V] with a residual basis V of `residual_rank` rows fitted on
  the first `residual_examples` training examples (counted in the fit time). `store_dtype`: the stored
  rows rounded as a store of that dtype returns them (`store.as_stored`; project.store_dtype); None:
  as computed (float64 in an x64 run).
  """
  n_iters = int(n_iters or round(1.5 * top_k))
  clock = _Clock()
  loss_fn = curvature_loss(inputs, curvature)
  es = fit_eigenspace(loss_fn, inputs.params, inputs.train_batches, n_iters=n_iters, top_k=top_k,
                      damping=damping, seed=seed, curvature=curvature)
  basis = None
  if residual_rank:
    basis = residual_basis.fit_residual_basis(es.eigenvectors, inputs.per_example_loss_fn, inputs.params,
                                              [data_lib.take(data_lib.concatenate(list(inputs.train_batches)), 0, residual_examples)],
                                              int(residual_rank), seed=seed)
  fit_s = clock.lap(es.eigenvectors if basis is None else basis)
  res = preconditioning.solve_queries(es, inputs.per_example_loss_fn, inputs.params, inputs.test_batches,
                                      loss_fn=loss_fn, curvature_batches=inputs.train_batches, cg_iters=int(cg_iters))
  if sketch_dim:
    sk = sketch.make_sketch(es.num_params, sketch_dim, seed, es.eigenvectors.dtype)
    directions = residual_basis.stored_directions(es.eigenvectors, basis)
    rows = _stored_rows(inputs, directions, sk, inputs.train_batches)
    stored = scoring.row_side(*(rows if store_dtype is None else [jnp.asarray(store.as_stored(x, store_dtype))
                                                                  for x in rows]))
    scores = preconditioning.solved_query_side(es, sk, res.x, basis) @ stored.T
  else:
    scores = _dots_with_train(inputs, res.x)
  score_s = clock.lap(scores)
  g_norm = jnp.linalg.norm(query_gradients(inputs), axis=1)
  info = {"k": es.k, "n_iters": n_iters, "cg_iters": int(cg_iters),
          "max_rel_residual": float(jnp.max(res.residual_norm / g_norm)),
          "positive_curvature": f"{int(jnp.sum(res.positive_curvature))}/{g_norm.shape[0]}"}
  if sketch_dim:
    info["sketch_dim"] = sk.dim
  if residual_rank:
    info["residual_rank"] = int(residual_rank)
  if store_dtype is not None:
    info["store_dtype"] = store_dtype
  return MethodResult(np.asarray(scores), fit_s, score_s, info)


METHODS = {
    "exact": exact,
    "cg": conjugate_gradients,
    "lissa": lissa,
    "gradient_dot": gradient_dot,
    "tracin": tracin,
    "arnoldi": arnoldi,
    "arnoldi_sketched": arnoldi_sketched,
    "arnoldi_pcg": arnoldi_pcg,
}
