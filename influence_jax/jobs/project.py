"""The project stage: every training example projected once into the projection store.

Before any row is written the store's residual basis V (`influence_jax.residual_basis`, r =
project.residual_rank rows) is fitted on the first project.residual_examples examples of the
curvature sample and saved (store/residual_basis.npz, fingerprinted); a resumed run loads it, so
every row of a store is made with the same V.

Each process projects the chunks of rows it owns (`store.chunk_owner`), fed into global batches on
the mesh, and writes them itself; a chunk is written whole and then marked done, so a run killed
at any moment resumes at the first unfinished chunk of each process and never recomputes a
finished one. A chunk whose files are missing is recomputed (its marker is dropped first).
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree

from influence_jax import checkpoint
from influence_jax import data as data_lib
from influence_jax import residual_basis as residual_basis_lib
from influence_jax import scoring
from influence_jax import sharding
from influence_jax import sketch as sketch_lib
from influence_jax import store as store_lib
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace
from influence_jax.jobs import common
from influence_jax.jobs import fit as fit_lib
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import progress as progress_lib
from influence_jax.jobs import task as task_lib
from influence_jax.jobs.context import Context


def store_meta(ctx: Context, es: Eigenspace, residual_rank: int) -> store_lib.StoreMeta:
  """Returns the meta of the stage's store: shapes, chunking, fingerprint, and the δ and c it used;
  `residual_rank`: the rows of its residual basis."""
  c = ctx.config.project
  num_params = ravel_pytree(ctx.task.params)[0].size
  sketch_dim = make_sketch(ctx, num_params).dim if c.sketch_dim else 0
  return store_lib.StoreMeta(
      num_rows=len(ctx.task.train), k=es.k, sketch_dim=sketch_dim, chunk_rows=c.chunk_rows,
      fingerprint=ctx.store_fingerprint,
      attrs={"damping": es.damping, "tail_constant": scoring.default_tail_constant(es),
             "eigenspace_fingerprint": ctx.eigenspace_fingerprint},
      residual_rank=residual_rank)


def requested_residual_rank(ctx: Context, es: Eigenspace) -> int:
  """Returns project.residual_rank capped at p − k and the basis's sample size (0: no basis)."""
  c = ctx.config.project
  if not c.residual_rank:
    return 0
  p = ravel_pytree(ctx.task.params)[0].size
  sample = min(c.residual_examples, len(task_lib.curvature_source(ctx.task, ctx.config)))
  return max(0, min(c.residual_rank, p - es.k, sample))


# Examples a step when fitting the residual basis: 32 backward passes of a batch run at once
# (`residual_basis`), so 128 holds about what an HVP over a batch of 2,048 does.
BASIS_BATCH = 128


def basis_path(ctx: Context) -> str:
  """Returns where the store's residual basis is saved: beside its rows, in the store's directory."""
  return ctx.path("store", store_lib.BASIS_FILE)


def _basis_fingerprint(ctx: Context, rank: int) -> str:
  return checkpoint.fingerprint(ctx.eigenspace_fingerprint, rank, ctx.config.project.residual_examples, ctx.config.seed)


def load_residual_basis(ctx: Context, es: Eigenspace) -> Optional[np.ndarray]:
  """Returns the saved (r, p) residual basis of this eigenspace and config, or None if there is none intact."""
  saved = common.load_checked_npz(basis_path(ctx), _basis_fingerprint(ctx, requested_residual_rank(ctx, es)))
  return None if saved is None else saved["basis"]


def residual_basis(ctx: Context, es: Eigenspace, *, quiet: bool = False) -> Optional[np.ndarray]:
  """Returns the store's (r, p) residual basis V on the host (None when project.residual_rank = 0): loaded
  when saved, else fitted on the first project.residual_examples examples of the curvature sample and saved
  by process 0. r ≤ the requested rank (fewer when the sample's remainders span fewer dimensions)."""
  rank = requested_residual_rank(ctx, es)
  if not rank:
    return None
  basis = load_residual_basis(ctx, es)
  if basis is not None:
    return basis
  start = time.perf_counter()
  p = ravel_pytree(ctx.task.params)[0].size
  u = jnp.asarray(sharding.to_host(es.eigenvectors)[:, :p])
  params = jax.tree.map(lambda x: jnp.asarray(sharding.to_host(x)), ctx.task.params)
  sample = data_lib.concatenate(fit_lib.curvature_batches(ctx))
  sample = data_lib.take(sample, 0, min(ctx.config.project.residual_examples, data_lib.batch_size(sample)))
  basis = np.asarray(residual_basis_lib.fit_residual_basis(
      u, ctx.task.per_example_loss_fn, params, list(data_lib.iterate(sample, BASIS_BATCH)), rank,
      seed=ctx.config.seed))
  if common.is_writer():
    common.save_checked_npz(basis_path(ctx), _basis_fingerprint(ctx, rank), {"basis": basis})
  _sync("influence_jax residual basis saved")
  basis = load_residual_basis(ctx, es)
  if basis is None:
    raise RuntimeError(f"The residual basis just saved to {basis_path(ctx)} cannot be read back.")
  if not quiet:
    logging.info("Residual basis: %d rows (of %d asked) fitted on %d examples in %.1f s", basis.shape[0], rank,
                 data_lib.batch_size(sample), time.perf_counter() - start)
  return basis


def make_sketch(ctx: Context, num_params: int) -> sketch_lib.KroneckerSketch:
  """Returns the stage's sketch R (fixed by config.seed and config.project.sketch_dim)."""
  return sketch_lib.make_sketch(num_params, ctx.config.project.sketch_dim, ctx.config.seed)


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


def run_project(ctx: Context, es: Eigenspace, *, quiet: bool = False,
                fault: Optional[str] = None) -> store_lib.ProjectionStore:
  """Projects every training example not yet in the store; returns the complete store."""
  basis = residual_basis(ctx, es, quiet=quiet)
  meta = store_meta(ctx, es, 0 if basis is None else basis.shape[0])
  store = open_for_writing(ctx, meta)
  mine = [ch for ch in store_lib.chunk_owner(meta, jax.process_index(), jax.process_count())
          if not store.is_done(ch)]
  rows = input_lib.RowRanges([meta.chunk_bounds(ch) for ch in mine])
  c = ctx.config.project
  mesh = ctx.mesh
  params = sharding.place_params(ctx.task.params, mesh)
  sketch = None
  if meta.sketch_dim:
    sk = make_sketch(ctx, ravel_pytree(ctx.task.params)[0].size)
    sketch = jax.tree.map(lambda x: sharding.put(x, sharding.replicated(mesh)), sk._asdict())
    sketch = sketch_lib.KroneckerSketch(**sketch)
  inverse = np.asarray(sharding.to_host(scoring.inverse_eigenvalues(es)), np.float64)
  tail_constant = meta.attrs["tail_constant"]
  directions = residual_basis_lib.stored_directions(es.eigenvectors, basis if meta.residual_rank else None)
  if not quiet:
    logging.info("Projecting %d training examples (%d left on this process) on k=%d eigenvectors, r=%d residual "
                 "directions, sketch %d", meta.num_rows, rows.size, meta.k, meta.residual_rank, meta.sketch_dim)
  bar = progress_lib.Progress(int(rows.size), "projection", "examples", quiet=quiet or not common.is_writer())
  pending, chunk_queue = [], list(mine)
  start = time.perf_counter()
  for step, (ids, batch) in enumerate(input_lib.global_batches(
      ctx.task.train, rows, c.batch_size, mesh, "Task.train", num_threads=c.num_threads), 1):
    out = sketch_lib.project_and_sketch(directions, sketch, ctx.task.per_example_loss_fn, params, batch,
                                        microbatch_size=c.microbatch_size)
    local = {name: input_lib.local_rows(x, mesh)[: ids.size] for name, x in out._asdict().items()}
    local["residual"] = local["projections"][:, meta.k:]
    local["projections"] = local["projections"][:, :meta.k]
    if ids.size:
      pending.append(local)
      bar.update(int(ids.size))
    pending = _write_full_chunks(store, chunk_queue, pending, inverse, tail_constant)
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


def _write_full_chunks(store, chunk_queue: list, pending: list, inverse: np.ndarray, tail_constant: float) -> list:
  """Writes every chunk of `chunk_queue` whose rows are all in `pending`; returns the rows left over."""
  if not pending:
    return pending
  rows = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
  taken = 0
  while chunk_queue:
    lo, hi = store.meta.chunk_bounds(chunk_queue[0])
    if rows["projections"].shape[0] - taken < hi - lo:
      break
    part = {name: x[taken: taken + hi - lo] for name, x in rows.items()}
    g = part["projections"].astype(np.float64)
    part["self_influence"] = (np.sum(g * g * inverse, axis=1)
                              + (part["sq_norms"] - np.sum(g * g, axis=1)) / tail_constant)
    if not store.meta.sketch_dim:
      part.pop("sketch")
    if not store.meta.residual_rank:
      part.pop("residual")
    for name, x in part.items():
      validation.check_finite_rows(x, f"Training set (Task.train, {name})", row_ids=np.arange(lo, hi))
    store.write_chunk(chunk_queue.pop(0), part)
    taken += hi - lo
  return [{name: x[taken:] for name, x in rows.items()}] if taken < rows["projections"].shape[0] else []
