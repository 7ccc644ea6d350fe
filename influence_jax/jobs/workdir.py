"""What the stages share beneath them: the workdir's paths, the curvature sample, the fingerprints and
digests that tie each output to what it was computed from, the fitted eigenspace as the scoring
settings want it, the store's residual basis and sketch, and when to save progress.

fit, project and score import this module and never each other.

Work directory layout:
  arnoldi_progress/   orbax: Arnoldi state (resume)
  eigenspace/         orbax: the fitted Eigenspace
  eigenvalues.json, spectrum.png
  curvature_digest.json  the curvature sample's content digest, by the identity of its source
  store/              the projection store (influence_jax.store): every training example, once
  scores/<name>/      the tables of query set <name> (score.name, "queries" by default)
  scores/self_influence/  the store's self-influence rankings, one per way of computing it

Content: the curvature sample and the queries are hashed whole (`io.RowDigest`) as they are read;
the training set is seen through its identity (`sources.source_fingerprint`) recorded with the
store, and each store chunk records the digest of the examples it was projected from.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from influence_jax import checkpoint
from influence_jax import io as io_lib
from influence_jax import sharding
from influence_jax import sketch as sketch_lib
from influence_jax import sources
from influence_jax import store as store_lib
from influence_jax.eigenspace import Eigenspace
from influence_jax.jobs import common
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import task as task_lib
from influence_jax.jobs.context import Context


# Keys left out of the eigenspace's and the store's fingerprints: those that change how a stage runs,
# not what it computes, the damping δ, which only the scoring applies ((Λ + δ)⁻¹, c = λ_k + δ), and
# arnoldi.residual_tol, which only flags pairs in the reports; arnoldi.curvature enters resolved ("auto"
# as the curvature it picks: `Context.curvature`).
_NOT_FINGERPRINTED = ("checkpoint_every", "checkpoint_seconds", "num_threads", "microbatch_size", "grid_examples",
                      "self_influence_rows", "batch_size", "rows_per_block", "name", "damping", "verify",
                      "residual_tol")
CURVATURE_DIGEST_FILE = "curvature_digest.json"


def _what(section) -> dict:
  return {k: v for k, v in section.to_dict().items() if k not in _NOT_FINGERPRINTED}


def _cached(ctx: Context, key: str, compute: Callable[[], Any]) -> Any:
  if key not in ctx.cache:
    ctx.cache[key] = compute()
  return ctx.cache[key]


def curvature_batches(ctx: Context) -> list:
  """Returns the fixed list of batches the curvature averages over (the curvature source, read once a stage)."""
  def read():
    source = task_lib.curvature_source(ctx.task, ctx.config)
    a = ctx.config.arnoldi
    return [b for _, b in input_lib.batches(source, np.arange(len(source)), a.batch_size, "curvature source")]
  return _cached(ctx, "curvature_batches", read)


def curvature_digest(ctx: Context) -> str:
  """Returns the digest of every example of the curvature sample (`io.RowDigest`).

  When the sample's source offers an identity (`sources.offers_identity`: its files or a version), the
  digest recorded in curvature_digest.json under the same identity is reused (no read); otherwise, or
  when the identity changed, the sample is read whole (arnoldi.num_examples examples) and hashed.
  """
  source = task_lib.curvature_source(ctx.task, ctx.config)
  identity = sources.source_fingerprint(source) if sources.offers_identity(source) else None
  path = ctx.path(CURVATURE_DIGEST_FILE)
  recorded = io_lib.read_json(path) or {}
  if identity is not None and recorded.get("identity") == identity and recorded.get("digest"):
    return recorded["digest"]
  digest = io_lib.rows_digest(curvature_batches(ctx))
  if identity is not None and common.is_writer():
    io_lib.atomic_write_json(path, {"identity": identity, "digest": digest})
  return digest


def eigenspace_fingerprint(ctx: Context) -> str:
  """Returns what the eigenspace is computed from: task, params, seed, the arnoldi settings (not δ) and the
  curvature sample's content (`curvature_digest`)."""
  c = ctx.config
  return _cached(ctx, "eigenspace_fingerprint", lambda: io_lib.digest(
      c.task, ctx.params_fingerprint, c.seed, dict(_what(c.arnoldi), curvature=ctx.curvature), curvature_digest(ctx)))


def store_fingerprint(ctx: Context) -> str:
  """Returns what the store's layout and directions are computed from: the eigenspace, the training set's
  type and length, the sketch, the chunking, the residual basis. The training set's content is checked
  apart (`check_training_set`), so that a changed example re-projects only its chunk."""
  c = ctx.config
  # "orbax V": rows made with a basis saved by orbax; a store begun with the older residual_basis.npz is refused,
  # not finished with a basis fitted again.
  basis = (c.project.residual_rank, c.project.residual_examples, "orbax V") if c.project.residual_rank else ()
  basis += () if c.project.store_dtype == "float32" else (c.project.store_dtype,)  # float32 stores kept theirs.
  train = f"{type(ctx.task.train).__module__}.{type(ctx.task.train).__qualname__}:{len(ctx.task.train)}"
  return _cached(ctx, "store_fingerprint", lambda: io_lib.digest(
      eigenspace_fingerprint(ctx), train, c.project.sketch_dim, c.project.chunk_rows, c.seed, *basis))


def training_identity(ctx: Context) -> str:
  """Returns the training set's identity: `sources.source_fingerprint` (its files or version when it offers
  them, its type, length and 8 sampled examples), without reading it all."""
  return _cached(ctx, "training_identity", lambda: sources.source_fingerprint(ctx.task.train))


def check_training_set(ctx: Context, store: store_lib.ProjectionStore) -> None:
  """Raises StoreError when the training set's identity differs from the one recorded with the store's
  rows: scores from it would be of other examples. Names the way out (project.verify)."""
  recorded, now = store.recorded_source(), training_identity(ctx)
  if recorded is not None and recorded != now:
    raise store_lib.StoreError(
        f"The training set changed since the projection store {store.directory} was written (its identity: "
        f"{recorded}, now {now}: files, version or sampled examples). Run scripts/project.py with "
        "--config.project.verify=True to re-read every training example, compare each chunk's digest and "
        f"re-project the chunks that changed (a full read of the training set), or delete {store.directory}.")


@functools.partial(jax.jit, static_argnums=0)
def per_example_losses(per_example_loss_fn, params, batch):
  """Returns the (B,) per-example losses of a batch (jitted): what names the examples a NaN comes from."""
  return per_example_loss_fn(params, batch)


def load_eigenspace(ctx: Context) -> Eigenspace:
  """Returns the fitted eigenspace with the config's damping (`with_scoring_damping`); raises
  FileNotFoundError naming the job to run first."""
  try:
    es = checkpoint.load_eigenspace(ctx.path("eigenspace"), fingerprint=eigenspace_fingerprint(ctx), mesh=ctx.mesh)
  except FileNotFoundError:
    raise FileNotFoundError(f"No fitted eigenspace in {ctx.path('eigenspace')}: run scripts/fit_eigenspace.py "
                            "with this config first.") from None
  return with_scoring_damping(ctx, es)


def with_scoring_damping(ctx: Context, es: Eigenspace) -> Eigenspace:
  """Returns `es` with δ = config.arnoldi.damping: the damping is a scoring setting (U and Λ do not
  depend on it, nor does the store), so changing it rescores from the same eigenspace and store."""
  return es.replace(damping=float(ctx.config.arnoldi.damping))


def requested_residual_rank(ctx: Context, es: Eigenspace) -> int:
  """Returns project.residual_rank capped at p − k and the basis's sample size (0: no basis)."""
  c = ctx.config.project
  if not c.residual_rank:
    return 0
  p = sharding.num_params(ctx.task.params)
  sample = min(c.residual_examples, len(task_lib.curvature_source(ctx.task, ctx.config)))
  return max(0, min(c.residual_rank, p - es.k, sample))


def make_sketch(ctx: Context, num_params: int) -> sketch_lib.KroneckerSketch:
  """Returns the store's sketch R (fixed by config.seed and config.project.sketch_dim)."""
  return sketch_lib.make_sketch(num_params, ctx.config.project.sketch_dim, ctx.config.seed)


def basis_path(ctx: Context) -> str:
  """Returns where the store's residual basis is saved (orbax): beside its rows, in the store's directory."""
  return ctx.path("store", store_lib.BASIS_FILE)


def basis_fingerprint(ctx: Context, rank: int) -> str:
  """Returns what a residual basis of `rank` rows is computed from: the eigenspace, its sample, the seed."""
  return io_lib.digest(eigenspace_fingerprint(ctx), rank, ctx.config.project.residual_examples, ctx.config.seed)


def save_residual_basis(ctx: Context, basis: jax.Array, rank: int) -> None:
  """Saves the store's residual basis V (r, P), fitted for `rank` rows, as laid out on the stage's mesh (each
  process writes its own columns; every process calls it)."""
  checkpoint.save_residual_basis(basis_path(ctx), basis, sharding.num_params(ctx.task.params),
                                 basis_fingerprint(ctx, rank))


def load_residual_basis(ctx: Context, es: Eigenspace) -> Optional[jax.Array]:
  """Returns the saved residual basis V (r, P) of this eigenspace and config in the flat layout of the stage's
  mesh (split over 'model', zero beyond p), or None if there is none intact (every process calls it)."""
  try:
    return checkpoint.load_residual_basis(basis_path(ctx), basis_fingerprint(ctx, requested_residual_rank(ctx, es)),
                                          mesh=ctx.mesh)
  except (checkpoint.FingerprintMismatch, checkpoint.CorruptCheckpoint):
    return None


class SaveTimer:
  """Decides when to save progress: every `every` steps (0: never by count) or after `seconds` of wall
  time, the time-driven saves spaced so that they take at most `max_share` of the stage (a save that
  took t seconds waits t·(1 − max_share)/max_share before the next: a 1.3 GB Arnoldi basis that takes
  5 s to write is saved every ~95 s, not every 60); times the saves it is given (`save`) against the
  stage's wall time (`describe`)."""

  def __init__(self, every: int, seconds: float, max_share: float = 0.05):
    self.every, self.seconds, self.max_share, self.last = every, seconds, max_share, time.monotonic()
    self.start, self.saves, self.save_seconds, self.last_cost = self.last, 0, 0.0, 0.0

  def due(self, step: int) -> bool:
    wait = max(self.seconds, self.last_cost * (1 - self.max_share) / self.max_share)
    if (self.every and step % self.every == 0) or time.monotonic() - self.last >= wait:
      self.last = time.monotonic()
      return True
    return False

  def save(self, write: Callable[[], Any]) -> None:
    """Calls write() (one save of progress) and adds its wall time to the total."""
    start = time.monotonic()
    write()
    self.saves += 1
    self.last_cost = time.monotonic() - start
    self.save_seconds += self.last_cost
    self.last = time.monotonic()

  def describe(self) -> str:
    """Returns e.g. 'progress saved 3 times in 0.4 s (0.2 % of 180 s)'."""
    total = max(time.monotonic() - self.start, 1e-9)
    return (f"progress saved {self.saves} times in {self.save_seconds:.1f} s "
            f"({100 * self.save_seconds / total:.1f} % of {total:.0f} s)")
