"""The score stage: a query set scored against the projection store, many times, without the training set.

Only the queries are projected or solved (`queries`: the query side, its solves' progress saved and
resumed likewise); the store is streamed in blocks of `score.rows_per_block` rows,
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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from influence_jax import io as io_lib
from influence_jax import ranking
from influence_jax import sharding
from influence_jax import store as store_lib
from influence_jax.eigenspace import Eigenspace, default_tail_constant, inverse_eigenvalues
from influence_jax.jobs import common
from influence_jax.jobs import config as config_lib
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import progress as progress_lib
from influence_jax.jobs import queries as queries_lib
from influence_jax.jobs import reports
from influence_jax.jobs import task as task_lib
from influence_jax.jobs import workdir as workdir_lib
from influence_jax.jobs.context import Context


def output_dir(ctx: Context) -> str:
  """Returns where every output of the query set goes (tables, summary, progress): scores/<score.name>/."""
  return ctx.path("scores", ctx.config.score.name)


def _progress_path(out: str) -> str:
  return os.path.join(out, "progress", f"process_{jax.process_index():04d}.npz")


def _key(name: str, field: str) -> str:
  """The progress file's key of a table's Extremes field ("none": the field's own name)."""
  return field if name == "none" else f"{name}__{field}"


def _save_progress(path: str, fingerprint: str, running: dict, largest: ranking.RunningLargest,
                   next_row: int) -> None:
  arrays = {_key(name, field): value for name, ext in running.items()
            for field, value in ranking.to_host(ext)._asdict().items()}
  io_lib.save_checked_npz(path, fingerprint, dict(
      arrays, largest_indices=largest.indices, largest_values=largest.values, next_row=np.int64(next_row)))


def stored_self_influence(rows: dict, inverse: np.ndarray, tail_constant: Optional[float]) -> np.ndarray:
  """Returns the (n,) self-influence of stored rows, in float64: G(z)ᵀ(Λ+δ)⁻¹G(z), plus with the tail
  (‖∇ℓ(z)‖² − ‖G(z)‖²)/c (`scoring.self_influence` on the store's columns)."""
  g = rows["projections"].astype(np.float64)
  top = np.sum(g * g * inverse, axis=1)
  if tail_constant is None:
    return top
  return top + (rows["sq_norms"] - np.sum(g * g, axis=1)) / tail_constant


# Normalised tables: the floor under each training example's normaliser is FLOOR_FRACTION × the median of
# that normaliser over a sample of the store (at most FLOOR_SAMPLE_CHUNKS chunks, evenly spaced: the same
# on every process), as methods.relative.relative_floor does over all rows: no training example is
# amplified more than 1/√FLOOR_FRACTION = 10× beyond a median one.
FLOOR_FRACTION = 0.01
FLOOR_SAMPLE_CHUNKS = 16


def normalization_floors(store: store_lib.ProjectionStore, inverse: np.ndarray,
                         tail_constant: Optional[float]) -> dict:
  """Returns {"relative": floor under score(z, z), "cosine": floor under ‖∇ℓ(z)‖²} from the sample of the store."""
  chunks = np.unique(np.linspace(0, store.meta.num_chunks - 1, min(FLOOR_SAMPLE_CHUNKS, store.meta.num_chunks))
                     .round().astype(int))
  selfs, sq = [], []
  for chunk in chunks:
    part = store.read(*store.meta.chunk_bounds(int(chunk)), ("projections", "sq_norms"))
    selfs.append(stored_self_influence(part, inverse, tail_constant))
    sq.append(part["sq_norms"].astype(np.float64))
  tiny = float(np.finfo(np.float32).tiny)
  floor = lambda x: max(FLOOR_FRACTION * float(np.median(np.maximum(np.concatenate(x), 0))), tiny)
  return {"relative": floor(selfs), "cosine": floor(sq)}


def row_scale(name: str, rows: dict, self_influence: np.ndarray, floors: dict) -> Optional[np.ndarray]:
  """Returns the (n,) factor of the stored rows in table `name`: None ("none"), 1/√max(score(z, z), floor)
  ("relative", `methods.relative.relative_influence`), 1/√max(‖∇ℓ(z)‖², floor) ("cosine")."""
  if name == "none":
    return None
  value = self_influence if name == "relative" else rows["sq_norms"].astype(np.float64)
  return 1.0 / np.sqrt(np.maximum(value, floors[name]))


def query_sides(names: tuple, vectors: queries_lib.QueryVectors) -> dict:
  """Returns {table: (T, d) query side}: the query vectors, for "cosine" divided by ‖∇ℓ(x)‖ (which orders
  nothing within a query; it puts every query's scores on one scale)."""
  tiny = np.finfo(np.float32).tiny
  out = {}
  for name in names:
    v = vectors.vectors
    if name == "cosine":
      v = (v / np.maximum(vectors.grad_norms, tiny)[:, None]).astype(v.dtype)
    out[name] = jnp.asarray(v, np.float32)  # As the rows are merged (float32), also under jax_enable_x64.
  return out


def score_rows(ctx: Context, store: store_lib.ProjectionStore, vectors: queries_lib.QueryVectors, es: Eigenspace,
               rows: range, fingerprint: str, out: str, *, quiet: bool, fault: Optional[str]) -> tuple:
  """Returns ({table: Extremes}, RunningLargest self-influence) over store rows `rows` (this process's),
  resuming. One table per score.normalize choice, all from the same pass over the store."""
  s = ctx.config.score
  names = config_lib.normalizations(s.normalize)
  k = s.top_k
  num_queries = vectors.vectors.shape[0]
  num_largest = store.meta.num_rows if s.self_influence_rows < 0 else s.self_influence_rows
  path = _progress_path(out)
  saved = io_lib.load_checked_npz(path, fingerprint)
  if saved is not None:
    running = {name: ranking.Extremes(*(saved[_key(name, f)] for f in ranking.Extremes._fields)) for name in names}
    largest = ranking.RunningLargest(saved["largest_indices"], saved["largest_values"])
    start = int(saved["next_row"])
  else:
    running = {name: ranking.empty_extremes(num_queries, k, np.float32) for name in names}
    largest, start = ranking.empty_largest(num_largest), rows.start
  inverse = np.asarray(sharding.to_host(inverse_eigenvalues(es)), np.float64)
  tail_constant = default_tail_constant(es) if s.tail else None
  floors = normalization_floors(store, inverse, tail_constant) if set(names) - {"none"} else {}
  side_names = ("projections",)
  if s.tail:
    side_names += ("residual", "sketch") if store.meta.residual_rank else ("sketch",)
  queries = query_sides(names, vectors)
  block = s.rows_per_block
  bar = progress_lib.Progress(len(rows), "scoring", "examples", start=start - rows.start,
                              quiet=quiet or not common.is_writer())
  saver = workdir_lib.SaveTimer(s.checkpoint_every, s.checkpoint_seconds)
  for count, lo in enumerate(range(start, rows.stop, block), 1):
    hi = min(lo + block, rows.stop)
    part = store.read(lo, hi, side_names + ("sq_norms",))
    side = np.concatenate([part[n] for n in side_names], axis=1)
    self_influence = stored_self_influence(part, inverse, tail_constant)
    previous, running = running, dict(running)
    for name in names:
      scale = row_scale(name, part, self_influence, floors)
      rows_side = side if scale is None else side * scale[:, None].astype(side.dtype)
      padded = ranking.device_block(rows_side.astype(np.float32, copy=False), block)
      running[name] = ranking.merge_rows(running[name], queries[name], padded, lo, hi - lo)
    jax.block_until_ready(previous)  # At most two merges queued: the host never runs ahead by more.
    largest = ranking.merge_largest(largest, self_influence, lo)
    bar.update(hi - lo)
    if saver.due(count) and hi < rows.stop:
      running = jax.block_until_ready(running)  # The queued merges are scoring, not saving: not timed.
      saver.save(lambda: _save_progress(path, fingerprint, running, largest, hi))
    common.maybe_kill(fault, "score", count)
  running = jax.block_until_ready(running)
  saver.save(lambda: _save_progress(path, fingerprint, running, largest, rows.stop))
  if not quiet:
    logging.info("Scoring: %s", saver.describe())
  return {name: ranking.to_host(ext) for name, ext in running.items()}, largest, floors


def _gather(x: np.ndarray) -> np.ndarray:
  """Returns (processes, ...) stacking every process's `x` (x itself, with one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def combine_extremes(running: ranking.Extremes) -> ranking.Extremes:
  """Returns the Extremes over all processes' states (ties to the lower index)."""
  tops = [_gather(x) for x in running]
  out = []
  k = running.proponents.shape[1]
  for idx_all, sc_all, sign in ((tops[0], tops[1], 1.0), (tops[2], tops[3], -1.0)):
    idx = np.concatenate(list(idx_all), axis=1)
    sc = np.concatenate(list(sc_all), axis=1).astype(np.float64)
    key_idx = np.where(idx < 0, np.iinfo(np.int64).max, idx)
    order = np.lexsort((key_idx, -sign * sc), axis=1)[:, :k]
    out += [np.take_along_axis(idx, order, 1), np.take_along_axis(np.concatenate(list(sc_all), 1), order, 1)]
  return ranking.Extremes(*out)


def combine_largest(largest: ranking.RunningLargest) -> ranking.RunningLargest:
  """Returns the self-influence ranking over all processes' states."""
  merged = ranking.empty_largest(largest.indices.shape[0])
  for idx, vals in zip(_gather(largest.indices), _gather(largest.values)):
    keep = idx >= 0
    merged = ranking.merge_indexed(merged, idx[keep], vals[keep])
  return merged


def combine(running: ranking.Extremes, largest: ranking.RunningLargest) -> tuple:
  """Returns the Extremes and self-influence ranking over all processes' states (ties to the lower index)."""
  return combine_extremes(running), combine_largest(largest)


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
  curvature = es.info.curvature if es.info is not None else ctx.curvature
  out = output_dir(ctx)
  names = config_lib.normalizations(s.normalize)
  settings = scoring_settings(ctx, es, store, io_lib.rows_digest(batch), curvature)
  fingerprint = io_lib.digest(settings, jax.process_count())
  vectors = queries_lib.project_queries(ctx, es, store, batch, fingerprint=fingerprint, out=out, quiet=quiet,
                                        fault=fault)
  if common.is_writer():
    queries_lib.log_galerkin_report(vectors.galerkin, curvature)
    queries_lib.log_cg_report(vectors.cg, curvature)
  owned = store_lib.chunk_owner(store.meta, jax.process_index(), jax.process_count())
  lo = store.meta.chunk_bounds(owned.start)[0] if len(owned) else store.meta.num_rows
  hi = store.meta.chunk_bounds(owned.stop - 1)[1] if len(owned) else store.meta.num_rows
  num_queries = int(vectors.vectors.shape[0])
  if not quiet:
    logging.info("Scoring %d queries against %d stored training examples (rows %d–%d here; tables: %s)",
                 num_queries, store.meta.num_rows, lo, hi, ", ".join(names))
  running, largest, floors = score_rows(ctx, store, vectors, es, range(lo, hi), fingerprint, out, quiet=quiet,
                                        fault=fault)
  largest = combine_largest(largest)
  running = {name: combine_extremes(ext) for name, ext in running.items()}
  if not common.is_writer():
    return {}
  summary = dict(settings, num_train=store.meta.num_rows, num_queries=num_queries,
                 store=store_lib.describe(store), fingerprint=fingerprint)
  if floors:
    summary["normalization_floors"] = floors
  if vectors.cg is not None:
    summary["cg"] = vectors.cg
  if vectors.galerkin is not None:
    summary["galerkin"] = vectors.galerkin
  return reports.write_score_tables(out, ctx.path("scores"), ctx.task, queries, running, largest, summary,
                                    grid_examples=s.grid_examples)


def scoring_settings(ctx: Context, es: Eigenspace, store: store_lib.ProjectionStore, queries_digest: str,
                     curvature: str) -> dict:
  """Returns every setting the query set's tables depend on (JSON-able; its digest keys the progress):
  what was scored (the queries' content digest, the store, the training set's identity) and how (the
  curvature, top_k, damping, tail, its constant c, the query side's preconditioner, CG iterations,
  sample and block, the normalised tables, the self-influence rows)."""
  s = ctx.config.score
  return {"name": s.name, "queries": s.queries or "Task.queries", "queries_digest": queries_digest,
          "store_fingerprint": store.meta.fingerprint, "training_identity": workdir_lib.training_identity(ctx),
          "eigenspace_fingerprint": workdir_lib.eigenspace_fingerprint(ctx), "k": store.meta.k,
          "residual_rank": store.meta.residual_rank, "sketch_dim": store.meta.sketch_dim, "top_k": int(s.top_k),
          "damping": es.damping, "tail": bool(s.tail), "tail_constant": default_tail_constant(es) if s.tail else None,
          "cg_iters": int(s.cg_iters) if s.tail else 0, "self_influence_rows": int(s.self_influence_rows),
          "preconditioner": s.preconditioner if s.tail else None,
          "solve_examples": queries_lib.solve_examples(ctx) if s.tail and (s.cg_iters or s.preconditioner == "galerkin")
          else None, "solve_block": int(s.solve_block) if s.tail and s.cg_iters else None,
          "curvature": curvature, "normalize": list(config_lib.normalizations(s.normalize))}
