"""The query side of the score stage: each query's vector q(x), with score(z, x) = q(x) · [stored row of z].

Three ways, by config (docs/jobs.md, "The query side"):
- score.tail=False: G(x)(Λ+δ)⁻¹ against G(z), top-k only;
- score.cg_iters=0: one projection of the queries like the store's rows [W∇ℓ(x), S(x)], W = [U; V],
  then score.preconditioner's inverse applied to it: "galerkin" (W C Wᵀ + δI)⁻¹ on W's coordinates
  (`galerkin`), "tail" (Λ+δ)⁻¹ on U's and 1/c on V's; and S(x)/c. No pass over the curvature sample;
- score.cg_iters > 0: the queries' gradients solved by that many CG iterations over the query-side
  curvature sample (the first score.solve_examples examples of the curvature sample; 0: all of it),
  started from and preconditioned with score.preconditioner's inverse, score.solve_block queries
  advanced together (`solvers.conjugate_gradient`), in the flat layout of the job's mesh (vectors
  over 'model', queries over 'data'; nothing p-sized leaves the devices but the (T, d + m) vectors),
  with a progress line and progress saved per process under the scoring fingerprint, like the
  scoring loop's: a killed job resumes at the first unsaved block.
H_W = W C Wᵀ is formed once per store and query-side sample (d = k + r products) and saved beside
the store under its fingerprint (`restricted_curvature`).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from influence_jax import curvature as curvature_lib
from influence_jax import data as data_lib
from influence_jax import galerkin
from influence_jax import io as io_lib
from influence_jax import preconditioning
from influence_jax import projection
from influence_jax import residual_basis as residual_basis_lib
from influence_jax import scoring
from influence_jax import sharding
from influence_jax import sketch as sketch_lib
from influence_jax import solvers
from influence_jax import store as store_lib
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace, default_tail_constant, inverse_eigenvalues
from influence_jax.jobs import common
from influence_jax.jobs import progress as progress_lib
from influence_jax.jobs import task as task_lib
from influence_jax.jobs import workdir as workdir_lib
from influence_jax.jobs.context import Context

PRECONDITIONERS = ("galerkin", "tail")
GALERKIN_FILE = "galerkin.npz"


class QueryVectors(NamedTuple):
  """What `project_queries` returns: vectors (T, d) on the host, with score(z, x) = vectors[x] · [stored
  row of z]; grad_norms (T,) ‖∇ℓ(x)‖; cg: the report of the preconditioned solves (`cg_report`), or None
  without them; galerkin: how (H_W + δI)⁻¹ was made (`galerkin_report`), or None without it."""

  vectors: np.ndarray
  grad_norms: np.ndarray
  cg: Optional[dict]
  galerkin: Optional[dict] = None


class Solver(NamedTuple):
  """What the query side needs of the store: W (d, P) in the mesh's flat layout, the residual basis (or
  None), the sketch on the mesh, c, and the Galerkin inverse (or None with score.preconditioner="tail")."""

  directions: jax.Array
  basis: Any
  sketch: sketch_lib.KroneckerSketch
  tail_constant: float
  inverse: Optional[galerkin.GalerkinInverse]


def solve_examples(ctx: Context) -> int:
  """Returns how many examples of the curvature sample the query side's curvature averages over."""
  total = len(task_lib.curvature_source(ctx.task, ctx.config))  # Its length: nothing is read.
  n = int(ctx.config.score.solve_examples)
  return total if n <= 0 else min(n, total)


def solve_operator(ctx: Context, es: Eigenspace) -> curvature_lib.LinearOperator:
  """Returns the undamped curvature C over the query-side sample (`solve_examples`), on the job's mesh."""
  batches = workdir_lib.curvature_batches(ctx)
  sample = data_lib.take(data_lib.concatenate(batches), 0, solve_examples(ctx))
  kind = es.info.curvature if es.info is not None else ctx.curvature
  size = ctx.config.arnoldi.batch_size
  parts = [data_lib.take(sample, lo, lo + size) for lo in range(0, data_lib.batch_size(sample), size)]
  return curvature_lib.curvature_operator(ctx.task.loss_fn, sharding.place_params(ctx.task.params, ctx.mesh), parts,
                                          curvature=kind, mesh=ctx.mesh,
                                          microbatch_size=ctx.config.arnoldi.microbatch_size or None)


def restricted_curvature(ctx: Context, es: Eigenspace, directions: jax.Array, d: int, *,
                         quiet: bool = True) -> np.ndarray:
  """Returns H_W = W C Wᵀ (d, d) over the query-side sample: saved in the store's directory under the
  fingerprint of the store, the curvature and the sample, or formed (d products) and saved."""
  path = ctx.path("store", GALERKIN_FILE)
  kind = es.info.curvature if es.info is not None else ctx.curvature
  fingerprint = io_lib.digest(workdir_lib.store_fingerprint(ctx), kind, solve_examples(ctx), d)
  saved = io_lib.load_checked_npz(path, fingerprint)
  if _everywhere(saved is not None):  # Forming H_W is collective: every process forms it, or none.
    return saved["restricted"]
  bar = progress_lib.Progress(d, f"forming H_W = W C Wᵀ over {solve_examples(ctx)} examples (once per store)",
                              "products", quiet=quiet or not common.is_writer())
  h = galerkin.restricted_curvature(solve_operator(ctx, es), directions, block_size=ctx.config.score.solve_block,
                                    callback=bar.update)
  if common.is_writer():
    io_lib.save_checked_npz(path, fingerprint, {"restricted": h})
  return h


def make_solver(ctx: Context, es: Eigenspace, store: store_lib.ProjectionStore, *, quiet: bool = True) -> Solver:
  """Returns the Solver of this store and config (loads the residual basis, forms or loads H_W)."""
  s = ctx.config.score
  p = sharding.num_params(ctx.task.params)
  basis = workdir_lib.load_residual_basis(ctx, es) if store.meta.residual_rank else None
  if store.meta.residual_rank and (basis is None or np.shape(basis)[0] != store.meta.residual_rank):
    raise store_lib.StoreError(f"The store has {store.meta.residual_rank} residual columns but "
                               f"{workdir_lib.basis_path(ctx)} is missing or from other inputs: delete {ctx.path('store')} "
                               "and run scripts/project.py again.")
  sk = workdir_lib.make_sketch(ctx, p)
  rep = sharding.replicated(ctx.mesh)
  sk = sketch_lib.KroneckerSketch(sharding.put(sk.left, rep), sharding.put(sk.right, rep), sk.num_params)
  directions = residual_basis_lib.stored_directions(es.eigenvectors, basis)
  c = default_tail_constant(es)
  inverse = None
  if s.preconditioner == "galerkin":
    h = restricted_curvature(ctx, es, directions, directions.shape[0], quiet=quiet)
    inverse = galerkin.galerkin_inverse(h, es.damping, c)
  return Solver(directions, basis, sk, c, inverse)


def galerkin_report(inverse: Optional[galerkin.GalerkinInverse]) -> Optional[dict]:
  """Returns summary.json's "galerkin": d, the smallest eigenvalue of H_W + δI, how many were raised to c."""
  if inverse is None:
    return None
  return {"directions": int(inverse.inverse.shape[0]), "min_eigenvalue": inverse.min_eigenvalue,
          "raised_to_tail_constant": inverse.floored}


def project_queries(ctx: Context, es: Eigenspace, store: store_lib.ProjectionStore, batch: Any, *,
                    fingerprint: str = "", out: str = "", quiet: bool = True,
                    fault: Optional[str] = None) -> QueryVectors:
  """Returns the QueryVectors q(x) of the query set, with score(z, x) = q(x) · [stored row of z]
  (the module docstring says how, by config). `batch`: every query, as read (`input.read_all`).
  With `out`, the solves' progress is saved in out/progress/ under `fingerprint` and resumed."""
  s = ctx.config.score
  if s.tail and s.cg_iters > 0:
    solver = make_solver(ctx, es, store, quiet=quiet)
    return solve_in_blocks(ctx, es, batch, solver, fingerprint=fingerprint, out=out, quiet=quiet, fault=fault)
  solver = make_solver(ctx, es, store, quiet=quiet) if s.tail else None
  directions = es.eigenvectors if solver is None else solver.directions
  params = sharding.place_params(ctx.task.params, ctx.mesh)
  inverse = np.asarray(sharding.to_host(inverse_eigenvalues(es)), np.float64)
  dtype = es.eigenvectors.dtype
  parts, norms = [], []
  for lo in range(0, data_lib.batch_size(batch), s.batch_size):
    chunk = data_lib.take(batch, lo, lo + s.batch_size)
    n = data_lib.batch_size(chunk)
    chunk = sharding.put_tree(chunk, sharding.replicated(ctx.mesh))
    res = sketch_lib.project_and_sketch(directions, None if solver is None else solver.sketch,
                                        ctx.task.per_example_loss_fn, params, chunk,
                                        microbatch_size=ctx.config.project.microbatch_size)
    validation.check_finite_rows(sharding.to_host(res.losses)[:n], "Query set (loss)", row_ids=np.arange(lo, lo + n))
    norms.append(np.sqrt(np.maximum(np.asarray(sharding.to_host(res.sq_norms), np.float64)[:n], 0)))
    proj = np.asarray(sharding.to_host(res.projections), np.float64)
    if solver is None:
      parts.append((proj * inverse).astype(dtype))
    elif solver.inverse is not None:
      parts.append(galerkin.galerkin_query_side(solver.inverse.inverse, solver.tail_constant, proj,
                                                sharding.to_host(res.sketch)).astype(dtype))
    else:
      parts.append(np.asarray(scoring.query_side(
          es, jnp.asarray(proj[:, :es.k]), jnp.asarray(sharding.to_host(res.sketch)),
          query_residual=jnp.asarray(proj[:, es.k:]) if solver.basis is not None else None,
          tail_constant=solver.tail_constant), dtype))
  vectors = np.concatenate(parts)
  validation.check_finite_rows(vectors, "Query set (query vectors)")
  return QueryVectors(vectors, np.concatenate(norms), None,
                      galerkin_report(solver.inverse) if solver is not None else None)


def _progress_path(out: str) -> str:
  return os.path.join(out, "progress", f"solves_process_{jax.process_index():04d}.npz")


_FIELDS = ("vectors", "grad_norms", "num_iters", "residual_norm", "positive_curvature")


def _everywhere(flag: bool) -> bool:
  """Returns whether `flag` holds on every process (a collective with several)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray([flag]))))


def _resume(path: str, fingerprint: str) -> dict:
  """Returns the saved solves' arrays, cut to the first query every process reached ({} to start clean)."""
  saved = io_lib.load_checked_npz(path, fingerprint) if path else None
  mine = int(saved["next_query"]) if saved is not None else 0
  agreed = mine
  if jax.process_count() > 1:
    agreed = int(np.min(multihost_utils.process_allgather(np.asarray([mine], np.int64))))
  if not agreed:
    return {}
  return {k: saved[k][:agreed] for k in _FIELDS}


def solve_in_blocks(ctx: Context, es: Eigenspace, batch: Any, solver: Solver, *, fingerprint: str, out: str,
                    quiet: bool, fault: Optional[str]) -> QueryVectors:
  """Returns the QueryVectors [W x̂, R(I − WᵀW) x̂] of x̂ ≈ (C + δI)⁻¹∇ℓ(x), solved score.solve_block
  queries at a time (the module docstring), resuming from saved progress."""
  s = ctx.config.score
  mesh, total = ctx.mesh, data_lib.batch_size(batch)
  data_size = sharding.axis_size(mesh, sharding.DATA)
  block = data_size * -(-int(s.solve_block) // data_size)
  params = sharding.place_params(ctx.task.params, mesh)
  op = solve_operator(ctx, es)
  pre = (galerkin.galerkin_tail_inverse(solver.directions, solver.inverse.inverse, solver.tail_constant)
         if solver.inverse is not None else None)
  path = _progress_path(out) if out else ""
  done = _resume(path, fingerprint)
  parts = {k: [done[k]] if done else [] for k in _FIELDS}
  start = len(done["vectors"]) if done else 0
  bar = progress_lib.Progress(total, "solving queries", "queries", start=start, quiet=quiet or not common.is_writer())
  saver = workdir_lib.SaveTimer(s.checkpoint_every, s.checkpoint_seconds)
  for count, lo in enumerate(range(start, total, block), 1):
    chunk = data_lib.take(batch, lo, lo + block)
    n = data_lib.batch_size(chunk)
    losses, grads = projection.per_example_losses_and_gradients(ctx.task.per_example_loss_fn, params,
                                                                 data_lib.pad(chunk, block), mesh=mesh)
    validation.check_finite_rows(sharding.to_host(losses)[:n], "Query set (loss)", row_ids=np.arange(lo, lo + n))
    grads = grads.astype(solver.directions.dtype)
    grads = _zero_rows_from(grads, n)  # Padding rows: b = 0, solved at once (x = 0).
    res = preconditioning.preconditioned_solve(op, es, grads, cg_iters=int(s.cg_iters),
                                               tail_constant=solver.tail_constant, preconditioner=pre)
    side = preconditioning.directions_query_side(solver.directions, solver.sketch, res.x)
    host = [np.asarray(sharding.to_host(x))[:n] for x in (side, jnp.linalg.norm(grads, axis=1), res.num_iters,
                                                         res.residual_norm, res.positive_curvature)]
    for k, x in zip(_FIELDS, host):
      parts[k].append(x)
    bar.update(n)
    if path and saver.due(count) and lo + n < total:
      arrays = {k: np.concatenate(v) for k, v in parts.items()}
      saver.save(lambda: io_lib.save_checked_npz(path, fingerprint, dict(arrays, next_query=np.int64(lo + n))))
    common.maybe_kill(fault, "solve", count)
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  validation.check_finite_rows(arrays["vectors"], "Query set (query vectors)")
  report = cg_report(solvers.CGResult(None, arrays["num_iters"], arrays["residual_norm"], None,
                                      arrays["positive_curvature"]), arrays["grad_norms"], int(s.cg_iters))
  return QueryVectors(arrays["vectors"].astype(es.eigenvectors.dtype), arrays["grad_norms"].astype(np.float64), report,
                      galerkin_report(solver.inverse))


@jax.jit
def _zero_rows(x, n):
  return jnp.where(jnp.arange(x.shape[0])[:, None] < n, x, 0)


def _zero_rows_from(x: jax.Array, n: int) -> jax.Array:
  """Returns `x` with rows n and beyond set to zero (its layout kept)."""
  return x if n == x.shape[0] else _zero_rows(x, n)


def cg_report(solves: solvers.CGResult, grad_norms: np.ndarray, cg_iters: int) -> dict:
  """Returns how the queries' preconditioned CG solves went (summary.json's "cg"); `solves`: the queries'
  num_iters, residual_norm and positive_curvature, in order.

  non_positive_curvature: the queries whose solve met dᵀ(C + δI)d ≤ 0 (C + δI not positive definite
  on their Krylov space): how many, at which iteration (the count per iteration, and the first ids);
  such a solve stops there and returns its iterate of smallest residual, which at iteration 1 is the
  preconditioner's own solve (what score.cg_iters = 0 gives). relative_residual: ‖∇ℓ(x) − (C + δI)x̂‖ / ‖∇ℓ(x)‖.
  """
  positive = np.atleast_1d(np.asarray(solves.positive_curvature)).astype(bool)
  if not positive.size:
    return {"iterations": cg_iters, "queries": 0}
  iters = np.atleast_1d(np.asarray(solves.num_iters)).astype(np.int64)
  residual = np.atleast_1d(np.asarray(solves.residual_norm)).astype(np.float64)
  relative = residual / np.maximum(grad_norms, np.finfo(np.float64).tiny)
  bad = np.flatnonzero(~positive)
  at = {str(int(i)): int(c) for i, c in zip(*np.unique(iters[bad], return_counts=True))}
  return {
      "iterations": cg_iters, "queries": int(positive.size),
      "non_positive_curvature": {"queries": int(bad.size), "at_iteration": at,
                                 "returned_plain_tail": int(np.sum(iters[bad] == 1)),
                                 "query_ids": [int(i) for i in bad[:50]]},
      "relative_residual": {"max": float(np.max(relative)), "median": float(np.median(relative))},
  }


def _remedy(curvature: str) -> str:
  return ("arnoldi.curvature='gauss_newton' (refit) or a larger arnoldi.damping (no refit; the fit's "
          "eigenvalues.json gives the most negative Ritz value to exceed)" if curvature == "hessian"
          else "a larger arnoldi.damping (no refit)")


def log_galerkin_report(report: Optional[dict], curvature: str) -> None:
  """Logs a warning when W(C + δI)Wᵀ had eigenvalues ≤ 0 (raised to c: those directions get the tail's 1/c)."""
  if report and report["raised_to_tail_constant"]:
    logging.warning(
        "W(C + δI)Wᵀ is not positive definite on the stored directions W = [U; V] (smallest eigenvalue %.3g): "
        "%d of its %d eigenvalues were raised to the tail constant c, so the query solves treat those "
        "directions as the tail. Remedy: %s.", report["min_eigenvalue"], report["raised_to_tail_constant"],
        report["directions"], _remedy(curvature))


def log_cg_report(report: Optional[dict], curvature: str) -> None:
  """Logs the solves' report: a warning naming how many queries met non-positive curvature, where, and
  the remedy; else one info line."""
  if not report or not report.get("queries"):
    return
  npc = report["non_positive_curvature"]
  if npc["queries"]:
    where = ", ".join(f"iteration {i}: {c}" for i, c in npc["at_iteration"].items())
    remedy = _remedy(curvature)
    logging.warning(
        "CG met non-positive curvature dᵀ(C + δI)d ≤ 0 on %d of %d queries (%s): C + δI is not positive definite, "
        "so their solves stopped there and return their best iterate; %d of them returned the preconditioner's "
        "own solve (what score.cg_iters=0 gives). Remedy: %s. Query ids: %s%s", npc["queries"], report["queries"],
        where, npc["returned_plain_tail"], remedy, npc["query_ids"][:10], " ..." if npc["queries"] > 10 else "")
  else:
    logging.info("CG: %d queries solved, %d iterations each, positive curvature throughout; relative residual "
                 "median %.2g, max %.2g", report["queries"], report["iterations"],
                 report["relative_residual"]["median"], report["relative_residual"]["max"])
