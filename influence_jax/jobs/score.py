"""The score stage: a query set scored against the projection store, many times, without the training set.

Only the queries are projected; the store is streamed in blocks of `score.rows_per_block` rows,
each one jitted matmul + top-k merge on the device, so memory is bounded by the block and the
top-k state, never by N. Each process scores its own chunks of the store; the per-process states
are merged at the end and process 0 writes the tables. Progress (the running state and the next
row) is saved per process by wall-time interval under the fingerprint of everything the scores depend
on, the queries' full content digest included: progress of a query set that changed since, even by
one example, is never resumed (it starts clean). A store whose training set changed since it was
written (`workdir.check_training_set`) is refused.

Every output of a query set goes to scores/<score.name>/ ("queries" by default); the store's
self-influence ranking to scores/self_influence/, one per way of computing it (`reports`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib
from influence_jax import io as io_lib
from influence_jax import preconditioning
from influence_jax import ranking
from influence_jax import residual_basis as residual_basis_lib
from influence_jax import scoring
from influence_jax import sharding
from influence_jax import sketch as sketch_lib
from influence_jax import store as store_lib
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace, default_tail_constant, inverse_eigenvalues
from influence_jax.jobs import common
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import progress as progress_lib
from influence_jax.jobs import reports
from influence_jax.jobs import task as task_lib
from influence_jax.jobs import workdir as workdir_lib
from influence_jax.jobs.context import Context


def output_dir(ctx: Context) -> str:
  """Returns where every output of the query set goes (tables, summary, progress): scores/<score.name>/."""
  return ctx.path("scores", ctx.config.score.name)


def project_queries(ctx: Context, es: Eigenspace, store: store_lib.ProjectionStore, batch: Any) -> np.ndarray:
  """Returns the (T, d) query vectors q(x), on the host, with score(z, x) = q(x) · [stored row of z].

  score.tail=False: G(x)(Λ+δ)⁻¹ against G(z). With the tail, against [G(z), V∇ℓ(z), S(z)]: each
  query solved by score.cg_iters preconditioned CG iterations over the curvature sample,
  `preconditioning.solved_query_side`, or with cg_iters = 0 the plain tail [G(x)(Λ+δ)⁻¹, V∇ℓ(x)/c, S(x)/c].
  `batch`: every query, as read (`input.read_all`).
  """
  s = ctx.config.score
  mesh = ctx.mesh
  params = sharding.place_params(ctx.task.params, mesh)
  p = ravel_pytree(ctx.task.params)[0].size
  basis = workdir_lib.load_residual_basis(ctx, es) if store.meta.residual_rank else None
  if store.meta.residual_rank and (basis is None or basis.shape[0] != store.meta.residual_rank):
    raise store_lib.StoreError(f"The store has {store.meta.residual_rank} residual columns but "
                               f"{workdir_lib.basis_path(ctx)} is missing or from other inputs: delete {ctx.path('store')} "
                               "and run scripts/project.py again.")
  es_host = es.replace(eigenvalues=jnp.asarray(sharding.to_host(es.eigenvalues)))
  tail_constant = default_tail_constant(es) if s.tail else None
  solve = s.tail and s.cg_iters > 0
  sketch, directions = None, es.eigenvectors
  if solve:  # On one device per process: host copies of the eigenspace and params.
    es_host = es_host.replace(eigenvectors=jnp.asarray(sharding.to_host(es.eigenvectors)[:, :p]))
    host_params = jax.tree.map(lambda x: jnp.asarray(sharding.to_host(x)), ctx.task.params)
    host_sketch = workdir_lib.make_sketch(ctx, p)
    curvature = workdir_lib.curvature_batches(ctx)
  elif s.tail:  # The queries projected like the store's rows, on the mesh.
    sk = workdir_lib.make_sketch(ctx, p)
    sketch = sketch_lib.KroneckerSketch(*(sharding.put(x, sharding.replicated(mesh)) for x in sk[:2]), sk.num_params)
    directions = residual_basis_lib.stored_directions(es.eigenvectors, basis)
  parts = []
  for lo in range(0, data_lib.batch_size(batch), s.batch_size):
    chunk = jax.tree.map(lambda x: x[lo: lo + s.batch_size], batch)
    n = data_lib.batch_size(chunk)
    if solve:
      losses = workdir_lib.per_example_losses(ctx.task.per_example_loss_fn, host_params, chunk)
      validation.check_finite_rows(losses, "Query set (loss)", row_ids=np.arange(lo, lo + n))
      solved = preconditioning.solve_queries(
          es_host, ctx.task.per_example_loss_fn, host_params, [chunk], loss_fn=ctx.task.loss_fn,
          curvature_batches=curvature, cg_iters=int(s.cg_iters), tail_constant=tail_constant)
      parts.append(np.asarray(preconditioning.solved_query_side(es_host, host_sketch, solved.x, basis)))
      continue
    chunk = sharding.put_tree(chunk, sharding.replicated(mesh))
    out = sketch_lib.project_and_sketch(directions, sketch, ctx.task.per_example_loss_fn, params, chunk,
                                        microbatch_size=ctx.config.project.microbatch_size)
    validation.check_finite_rows(sharding.to_host(out.losses)[:n], "Query set (loss)", row_ids=np.arange(lo, lo + n))
    proj = sharding.to_host(out.projections)
    if not s.tail:
      parts.append(np.asarray(scoring.query_side(es_host, jnp.asarray(proj))))
      continue
    parts.append(np.asarray(scoring.query_side(
        es_host, jnp.asarray(proj[:, :es.k]), jnp.asarray(sharding.to_host(out.sketch)),
        query_residual=jnp.asarray(proj[:, es.k:]) if basis is not None else None, tail_constant=tail_constant)))
  vectors = np.concatenate(parts)
  validation.check_finite_rows(vectors, "Query set (query vectors)")
  return vectors


def _progress_path(out: str) -> str:
  return os.path.join(out, "progress", f"process_{jax.process_index():04d}.npz")


def _save_progress(path: str, fingerprint: str, running: ranking.Extremes, largest: ranking.RunningLargest,
                   next_row: int) -> None:
  io_lib.save_checked_npz(path, fingerprint, dict(
      ranking.to_host(running)._asdict(), largest_indices=largest.indices, largest_values=largest.values,
      next_row=np.int64(next_row)))


def stored_self_influence(rows: dict, inverse: np.ndarray, tail_constant: Optional[float]) -> np.ndarray:
  """Returns the (n,) self-influence of stored rows, in float64: G(z)ᵀ(Λ+δ)⁻¹G(z), plus with the tail
  (‖∇ℓ(z)‖² − ‖G(z)‖²)/c (`scoring.self_influence` on the store's columns)."""
  g = rows["projections"].astype(np.float64)
  top = np.sum(g * g * inverse, axis=1)
  if tail_constant is None:
    return top
  return top + (rows["sq_norms"] - np.sum(g * g, axis=1)) / tail_constant


def score_rows(ctx: Context, store: store_lib.ProjectionStore, vectors: np.ndarray, es: Eigenspace,
               rows: range, fingerprint: str, out: str, *, quiet: bool, fault: Optional[str]) -> tuple:
  """Returns (Extremes, RunningLargest self-influence) over store rows `rows` (this process's), resuming."""
  s = ctx.config.score
  k = s.top_k
  num_largest = store.meta.num_rows if s.self_influence_rows < 0 else s.self_influence_rows
  path = _progress_path(out)
  saved = io_lib.load_checked_npz(path, fingerprint)
  if saved is not None:
    running = ranking.Extremes(*(saved[n] for n in ranking.Extremes._fields))
    largest = ranking.RunningLargest(saved["largest_indices"], saved["largest_values"])
    start = int(saved["next_row"])
  else:
    running, largest, start = ranking.empty_extremes(vectors.shape[0], k, np.float32), ranking.empty_largest(num_largest), rows.start
  inverse = np.asarray(sharding.to_host(inverse_eigenvalues(es)), np.float64)
  tail_constant = default_tail_constant(es) if s.tail else None
  side_names = ("projections",)
  if s.tail:
    side_names += ("residual", "sketch") if store.meta.residual_rank else ("sketch",)
  queries = jnp.asarray(vectors)
  block = s.rows_per_block
  bar = progress_lib.Progress(len(rows), "scoring", "examples", start=start - rows.start,
                              quiet=quiet or not common.is_writer())
  saver = workdir_lib.SaveTimer(s.checkpoint_every, s.checkpoint_seconds)
  for count, lo in enumerate(range(start, rows.stop, block), 1):
    hi = min(lo + block, rows.stop)
    part = store.read(lo, hi, side_names + ("sq_norms",))
    side = np.concatenate([part[n] for n in side_names], axis=1)
    padded = ranking.device_block(side.astype(np.float32, copy=False), block)
    previous, running = running, ranking.merge_rows(running, queries, padded, lo, hi - lo)
    jax.block_until_ready(previous)  # At most two merges queued: the host never runs ahead by more.
    largest = ranking.merge_largest(largest, stored_self_influence(part, inverse, tail_constant), lo)
    bar.update(hi - lo)
    if saver.due(count) and hi < rows.stop:
      running = jax.block_until_ready(running)  # The queued merges are scoring, not saving: not timed.
      saver.save(lambda: _save_progress(path, fingerprint, running, largest, hi))
    common.maybe_kill(fault, "score", count)
  running = jax.block_until_ready(running)
  saver.save(lambda: _save_progress(path, fingerprint, running, largest, rows.stop))
  if not quiet:
    logging.info("Scoring: %s", saver.describe())
  return ranking.to_host(running), largest


def _gather(x: np.ndarray) -> np.ndarray:
  """Returns (processes, ...) stacking every process's `x` (x itself, with one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def combine(running: ranking.Extremes, largest: ranking.RunningLargest) -> tuple:
  """Returns the Extremes and self-influence ranking over all processes' states (ties to the lower index)."""
  tops = [_gather(x) for x in running]
  out = []
  k = running.proponents.shape[1]
  for idx_all, sc_all, sign in ((tops[0], tops[1], 1.0), (tops[2], tops[3], -1.0)):
    idx = np.concatenate(list(idx_all), axis=1)
    sc = np.concatenate(list(sc_all), axis=1).astype(np.float64)
    key_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((key_idx, -sign * sc), axis=1)[:, :k]
    out += [np.take_along_axis(idx, order, 1), np.take_along_axis(np.concatenate(list(sc_all), 1), order, 1)]
  merged = ranking.empty_largest(largest.indices.shape[0])
  for idx, vals in zip(_gather(largest.indices), _gather(largest.values)):
    keep = idx >= 0
    merged = ranking.merge_indexed(merged, idx[keep], vals[keep])
  return ranking.Extremes(*out), merged


def run_score(ctx: Context, es: Eigenspace, *, quiet: bool = False, fault: Optional[str] = None) -> dict:
  """Scores the query set against the store; returns the paths written ({} on processes other than 0).

  Sets glibc's mmap threshold for the process (`common.release_freed_blocks`): flat memory in N.
  """
  common.release_freed_blocks()
  s = ctx.config.score
  store = store_lib.open_store(ctx.path("store"), workdir_lib.store_fingerprint(ctx))
  workdir_lib.check_training_set(ctx, store)
  if s.tail and not store.meta.sketch_dim:
    raise ValueError("config.score.tail=True needs the store's sketch of the remainder, but it was built with "
                     "config.project.sketch_dim=0: set project.sketch_dim > 0 and run scripts/project.py in a fresh "
                     "workdir, or score with --config.score.tail=False.")
  queries = task_lib.query_source(ctx.task, ctx.config)
  batch = input_lib.read_all(queries, "query source", s.batch_size)
  vectors = project_queries(ctx, es, store, batch)
  out = output_dir(ctx)
  settings = scoring_settings(ctx, es, store, io_lib.rows_digest(batch))
  fingerprint = io_lib.digest(settings, jax.process_count())
  owned = store_lib.chunk_owner(store.meta, jax.process_index(), jax.process_count())
  lo = store.meta.chunk_bounds(owned.start)[0] if len(owned) else store.meta.num_rows
  hi = store.meta.chunk_bounds(owned.stop - 1)[1] if len(owned) else store.meta.num_rows
  if not quiet:
    logging.info("Scoring %d queries against %d stored training examples (rows %d–%d here)",
                 vectors.shape[0], store.meta.num_rows, lo, hi)
  running, largest = score_rows(ctx, store, vectors, es, range(lo, hi), fingerprint, out, quiet=quiet, fault=fault)
  running, largest = combine(running, largest)
  if not common.is_writer():
    return {}
  summary = dict(settings, num_train=store.meta.num_rows, num_queries=int(vectors.shape[0]),
                 store=store_lib.describe(store), fingerprint=fingerprint)
  return reports.write_score_tables(out, ctx.path("scores"), ctx.task, queries, running, largest, summary,
                                    grid_examples=s.grid_examples)


def scoring_settings(ctx: Context, es: Eigenspace, store: store_lib.ProjectionStore, queries_digest: str) -> dict:
  """Returns every setting the query set's tables depend on (JSON-able; its digest keys the progress):
  what was scored (the queries' content digest, the store, the training set's identity) and how (top_k,
  damping, tail, its constant c and CG iterations, the self-influence rows)."""
  s = ctx.config.score
  return {"name": s.name, "queries": s.queries or "Task.queries", "queries_digest": queries_digest,
          "store_fingerprint": store.meta.fingerprint, "training_identity": workdir_lib.training_identity(ctx),
          "eigenspace_fingerprint": workdir_lib.eigenspace_fingerprint(ctx), "k": store.meta.k,
          "residual_rank": store.meta.residual_rank, "sketch_dim": store.meta.sketch_dim, "top_k": int(s.top_k),
          "damping": es.damping, "tail": bool(s.tail), "tail_constant": default_tail_constant(es) if s.tail else None,
          "cg_iters": int(s.cg_iters) if s.tail else 0, "self_influence_rows": int(s.self_influence_rows)}
