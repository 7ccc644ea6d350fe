"""The project stage: every training example projected once into the projection store.

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
from jax.flatten_util import ravel_pytree

from influence_jax import scoring
from influence_jax import sharding
from influence_jax import sketch as sketch_lib
from influence_jax import store as store_lib
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace
from influence_jax.jobs import common
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import progress as progress_lib
from influence_jax.jobs.context import Context


def store_meta(ctx: Context, es: Eigenspace) -> store_lib.StoreMeta:
  """Returns the meta of the stage's store: shapes, chunking, fingerprint, and the δ and c it used."""
  c = ctx.config.project
  num_params = ravel_pytree(ctx.task.params)[0].size
  sketch_dim = make_sketch(ctx, num_params).dim if c.sketch_dim else 0
  return store_lib.StoreMeta(
      num_rows=len(ctx.task.train), k=es.k, sketch_dim=sketch_dim, chunk_rows=c.chunk_rows,
      fingerprint=ctx.store_fingerprint,
      attrs={"damping": es.damping, "tail_constant": scoring.default_tail_constant(es),
             "eigenspace_fingerprint": ctx.eigenspace_fingerprint})


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
  meta = store_meta(ctx, es)
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
  if not quiet:
    logging.info("Projecting %d training examples (%d left on this process) on k=%d eigenvectors, sketch %d",
                 meta.num_rows, rows.size, meta.k, meta.sketch_dim)
  bar = progress_lib.Progress(int(rows.size), "projection", "examples", quiet=quiet or not common.is_writer())
  pending, chunk_queue = [], list(mine)
  start = time.perf_counter()
  for step, (ids, batch) in enumerate(input_lib.global_batches(
      ctx.task.train, rows, c.batch_size, mesh, "Task.train", num_threads=c.num_threads), 1):
    out = sketch_lib.project_and_sketch(es.eigenvectors, sketch, ctx.task.per_example_loss_fn, params, batch,
                                        microbatch_size=c.microbatch_size)
    local = {name: input_lib.local_rows(x, mesh)[: ids.size] for name, x in out._asdict().items()}
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
    for name, x in part.items():
      validation.check_finite_rows(x, f"Training set (Task.train, {name})", row_ids=np.arange(lo, hi))
    store.write_chunk(chunk_queue.pop(0), part)
    taken += hi - lo
  return [{name: x[taken:] for name, x in rows.items()}] if taken < rows["projections"].shape[0] else []
