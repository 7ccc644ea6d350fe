"""The project stage: every training example projected once into the projection store.

Before any row is written the store's residual basis V (`influence_jax.residual_basis`, r =
project.residual_rank rows) is fitted on the first project.residual_examples examples of the
curvature sample, on the mesh in its flat layout (split over 'model', beside the eigenvectors), and
saved with orbax (store/residual_basis/, fingerprinted, each process writing its own columns); a
resumed run loads it, so every row of a store is made with the same V. The rows are projected on
W = [U; V] as laid out, with the params as the task gives them (a model split over 'model' keeps
its layout).

Each process projects the chunks of rows it owns (`store.chunk_owner`), fed into global batches on
the mesh, and writes them itself; a chunk is written whole and then marked done, so a run killed
at any moment resumes at the first unfinished chunk of each process and never recomputes a
finished one. A chunk whose files are missing is recomputed (its marker is dropped first).
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from influence_jax import data as data_lib
from influence_jax import io as io_lib
from influence_jax import residual_basis as residual_basis_lib
from influence_jax import sharding
from influence_jax import sketch as sketch_lib
from influence_jax import store as store_lib
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace
from influence_jax.jobs import common
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import progress as progress_lib
from influence_jax.jobs import workdir as workdir_lib
from influence_jax.jobs.context import Context


def store_meta(ctx: Context, es: Eigenspace, residual_rank: int) -> store_lib.StoreMeta:
  """Returns the meta of the stage's store: shapes, chunking, fingerprint; `residual_rank`: the rows of
  its residual basis. Nothing in a store depends on the damping δ (the score job applies it)."""
  c = ctx.config.project
  sketch_dim = workdir_lib.make_sketch(ctx, sharding.num_params(ctx.task.params)).dim if c.sketch_dim else 0
  return store_lib.StoreMeta(
      num_rows=len(ctx.task.train), k=es.k, sketch_dim=sketch_dim, chunk_rows=c.chunk_rows,
      fingerprint=workdir_lib.store_fingerprint(ctx),
      attrs={"eigenspace_fingerprint": workdir_lib.eigenspace_fingerprint(ctx)},
      residual_rank=residual_rank, store_dtype=c.store_dtype)


def residual_basis(ctx: Context, es: Eigenspace, *, quiet: bool = False) -> Optional[jax.Array]:
  """Returns the store's residual basis V (r, P) in the flat layout of the stage's mesh (None when
  project.residual_rank = 0): loaded when saved, else fitted on the first project.residual_examples examples
  of the curvature sample and saved by every process (its own columns). r ≤ the requested rank (fewer when
  the sample's remainders span fewer dimensions)."""
  rank = workdir_lib.requested_residual_rank(ctx, es)
  if not rank:
    return None
  basis = workdir_lib.load_residual_basis(ctx, es)
  if basis is not None:
    return basis
  start = time.perf_counter()
  params = sharding.place_params(ctx.task.params, ctx.mesh)
  sample = data_lib.concatenate(workdir_lib.curvature_batches(ctx))
  sample = data_lib.take(sample, 0, min(ctx.config.project.residual_examples, data_lib.batch_size(sample)))
  basis = residual_basis_lib.fit_residual_basis(es.eigenvectors, ctx.task.per_example_loss_fn, params, [sample], rank,
                                                seed=ctx.config.seed, mesh=ctx.mesh)
  workdir_lib.save_residual_basis(ctx, basis, rank)
  _sync("influence_jax residual basis saved")
  basis = workdir_lib.load_residual_basis(ctx, es)
  if basis is None:
    raise RuntimeError(f"The residual basis just saved to {workdir_lib.basis_path(ctx)} cannot be read back.")
  if not quiet:
    logging.info("Residual basis: %d rows (of %d asked) fitted on %d examples in %.1f s", basis.shape[0], rank,
                 data_lib.batch_size(sample), time.perf_counter() - start)
  return basis


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def open_for_writing(ctx: Context, meta: store_lib.StoreMeta) -> store_lib.ProjectionStore:
  """Returns the store, created by process 0 (or reopened), opened by every process after it."""
  directory = ctx.path("store")
  if common.is_writer():
    store_lib.create(directory, meta)
  _sync("influence_jax store created")
  return store_lib.create(directory, meta, writer=False)


class ChunkDigests:
  """The digest (`io.RowDigest`) of the examples of each store chunk, fed (rows, batch) in row order."""

  def __init__(self, chunk_rows: int):
    self.chunk_rows, self.open = chunk_rows, {}

  def update(self, ids: np.ndarray, batch) -> None:
    chunks = np.asarray(ids) // self.chunk_rows
    for chunk in np.unique(chunks):
      where = np.flatnonzero(chunks == chunk)  # Contiguous: rows come in order.
      part = jax.tree.map(lambda x, a=where[0], b=where[-1] + 1: x[a:b], batch)
      self.open.setdefault(int(chunk), io_lib.RowDigest()).update(part)

  def pop(self, chunk: int) -> str:
    return self.open.pop(chunk).hexdigest() if chunk in self.open else ""


def verify_chunks(ctx: Context, store: store_lib.ProjectionStore, chunks: list, *, quiet: bool) -> list:
  """Re-reads the examples of finished `chunks`, compares each chunk's digest with the one recorded when it
  was projected, and marks those that differ (or recorded none) unfinished; returns them."""
  c = ctx.config.project
  digests = ChunkDigests(store.meta.chunk_rows)
  rows = input_lib.RowRanges([store.meta.chunk_bounds(ch) for ch in chunks])
  for ids, batch in input_lib.batches(ctx.task.train, rows, c.batch_size, "Task.train", num_threads=c.num_threads):
    digests.update(ids, batch)
  changed = [ch for ch in chunks if digests.pop(ch) != store.chunk_digest(ch) or not store.chunk_digest(ch)]
  for ch in changed:
    store.unmark(ch)
  if not quiet:
    logging.info("Verified %d chunks (%d rows) against their digests: %d changed %s, re-projected", len(chunks),
                 rows.size, len(changed), changed)
  return changed


def check_or_verify(ctx: Context, store: store_lib.ProjectionStore, *, quiet: bool) -> None:
  """With project.verify, verifies this process's finished chunks (`verify_chunks`); without it, refuses a
  store whose training set's identity changed (`workdir.check_training_set`). Then process 0 records the
  training set's identity with the store (before any new row is written)."""
  if ctx.config.project.verify:
    owned = store_lib.chunk_owner(store.meta, jax.process_index(), jax.process_count())
    verify_chunks(ctx, store, [ch for ch in owned if store.is_done(ch)], quiet=quiet)
  else:
    workdir_lib.check_training_set(ctx, store)
  _sync("influence_jax store verified")
  if common.is_writer() and store.recorded_source() != workdir_lib.training_identity(ctx):
    store.record_source(workdir_lib.training_identity(ctx))


def run_project(ctx: Context, es: Eigenspace, *, quiet: bool = False,
                fault: Optional[str] = None) -> store_lib.ProjectionStore:
  """Projects every training example not yet in the store, each chunk with the digest of its examples;
  returns the complete store. Refuses a store whose training set changed unless project.verify."""
  basis = residual_basis(ctx, es, quiet=quiet)
  meta = store_meta(ctx, es, 0 if basis is None else basis.shape[0])
  store = open_for_writing(ctx, meta)
  check_or_verify(ctx, store, quiet=quiet)
  mine = [ch for ch in store_lib.chunk_owner(meta, jax.process_index(), jax.process_count())
          if not store.is_done(ch)]
  rows = input_lib.RowRanges([meta.chunk_bounds(ch) for ch in mine])
  c = ctx.config.project
  mesh = ctx.mesh
  params = sharding.place_params(ctx.task.params, mesh)
  sketch = None
  if meta.sketch_dim:
    sk = workdir_lib.make_sketch(ctx, sharding.num_params(ctx.task.params))
    sketch = jax.tree.map(lambda x: sharding.put(x, sharding.replicated(mesh)), sk._asdict())
    sketch = sketch_lib.KroneckerSketch(**sketch)
  directions = residual_basis_lib.stored_directions(es.eigenvectors, basis if meta.residual_rank else None)
  sketched = None if sketch is None else sketch_lib.sketch_directions(sketch, directions)  # R Wᵀ, once.
  if not quiet:
    logging.info("Projecting %d training examples (%d left on this process) on k=%d eigenvectors, r=%d residual "
                 "directions, sketch %d", meta.num_rows, rows.size, meta.k, meta.residual_rank, meta.sketch_dim)
  bar = progress_lib.Progress(int(rows.size), "projection", "examples", quiet=quiet or not common.is_writer())
  pending, chunk_queue, digests = [], list(mine), ChunkDigests(meta.chunk_rows)
  start = time.perf_counter()
  for step, (ids, batch, host) in enumerate(input_lib.global_batches(
      ctx.task.train, rows, c.batch_size, mesh, "Task.train", num_threads=c.num_threads, with_host=True), 1):
    digests.update(ids, host)
    out = sketch_lib.project_and_sketch(directions, sketch, ctx.task.per_example_loss_fn, params, batch,
                                        microbatch_size=c.microbatch_size, sketched_directions=sketched)
    local = {name: input_lib.local_rows(x, mesh)[: ids.size] for name, x in out._asdict().items()}
    local["residual"] = local["projections"][:, meta.k:]
    local["projections"] = local["projections"][:, :meta.k]
    if ids.size:
      pending.append(local)
      bar.update(int(ids.size))
    pending = _write_full_chunks(store, chunk_queue, pending, digests)
    if fault == f"project:{step}":
      _sync(f"fault injection after batch {step}")  # Every process has written this step's chunks.
    common.maybe_kill(fault, "project", step)
  if pending or chunk_queue:
    raise RuntimeError(f"Projection ended with {len(chunk_queue)} chunks unwritten: the training source "
                       "returned fewer rows than its len().")
  seconds = time.perf_counter() - start
  logging.warning("Projected %d examples in %.1f s (%.0f examples/s on process %d)", rows.size, seconds,
                  rows.size / max(seconds, 1e-9), jax.process_index())
  _sync("influence_jax store written")
  return store_lib.open_store(store.directory, meta.fingerprint)


def _write_full_chunks(store, chunk_queue: list, pending: list, digests: ChunkDigests) -> list:
  """Writes every chunk of `chunk_queue` whose rows are all in `pending`, each with the digest of its examples;
  returns the rows left over."""
  if not pending:
    return pending
  rows = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
  taken = 0
  while chunk_queue:
    lo, hi = store.meta.chunk_bounds(chunk_queue[0])
    if rows["projections"].shape[0] - taken < hi - lo:
      break
    part = {name: x[taken: taken + hi - lo] for name, x in rows.items()}
    if not store.meta.sketch_dim:
      part.pop("sketch")
    if not store.meta.residual_rank:
      part.pop("residual")
    for name, x in part.items():
      validation.check_finite_rows(x, f"Training set (Task.train, {name})", row_ids=np.arange(lo, hi))
    chunk = chunk_queue.pop(0)
    store.write_chunk(chunk, part, digests.pop(chunk))
    taken += hi - lo
  return [{name: x[taken:] for name, x in rows.items()}] if taken < rows["projections"].shape[0] else []
