"""What the stages share beneath them: the workdir's paths, the curvature sample, the fitted eigenspace
as the scoring settings want it, the store's residual basis and sketch, and when to save progress.

fit, project and score import this module and never each other.

Work directory layout:
  arnoldi_progress/   orbax: Arnoldi state (resume)
  eigenspace/         orbax: the fitted Eigenspace
  eigenvalues.json, spectrum.png
  store/              the projection store (influence_jax.store): every training example, once
  scores/             tables of the task's query set (scores/<name>/ for a named set)
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import checkpoint
from influence_jax import io as io_lib
from influence_jax import sketch as sketch_lib
from influence_jax import store as store_lib
from influence_jax.eigenspace import Eigenspace
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import task as task_lib
from influence_jax.jobs.context import Context


def curvature_batches(ctx: Context) -> list:
  """Returns the fixed list of batches the curvature averages over (the curvature source, read once)."""
  source = task_lib.curvature_source(ctx.task, ctx.config)
  a = ctx.config.arnoldi
  return [b for _, b in input_lib.batches(source, np.arange(len(source)), a.batch_size, "curvature source")]


def load_eigenspace(ctx: Context) -> Eigenspace:
  """Returns the fitted eigenspace with the config's damping (`with_scoring_damping`); raises
  FileNotFoundError naming the job to run first."""
  try:
    es = checkpoint.load_eigenspace(ctx.path("eigenspace"), fingerprint=ctx.eigenspace_fingerprint, mesh=ctx.mesh)
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
  p = ravel_pytree(ctx.task.params)[0].size
  sample = min(c.residual_examples, len(task_lib.curvature_source(ctx.task, ctx.config)))
  return max(0, min(c.residual_rank, p - es.k, sample))


def make_sketch(ctx: Context, num_params: int) -> sketch_lib.KroneckerSketch:
  """Returns the store's sketch R (fixed by config.seed and config.project.sketch_dim)."""
  return sketch_lib.make_sketch(num_params, ctx.config.project.sketch_dim, ctx.config.seed)


def basis_path(ctx: Context) -> str:
  """Returns where the store's residual basis is saved: beside its rows, in the store's directory."""
  return ctx.path("store", store_lib.BASIS_FILE)


def basis_fingerprint(ctx: Context, rank: int) -> str:
  """Returns what a residual basis of `rank` rows is computed from: the eigenspace, its sample, the seed."""
  return io_lib.digest(ctx.eigenspace_fingerprint, rank, ctx.config.project.residual_examples, ctx.config.seed)


def load_residual_basis(ctx: Context, es: Eigenspace) -> Optional[np.ndarray]:
  """Returns the saved (r, p) residual basis of this eigenspace and config, or None if there is none intact."""
  saved = io_lib.load_checked_npz(basis_path(ctx), basis_fingerprint(ctx, requested_residual_rank(ctx, es)))
  return None if saved is None else saved["basis"]


class SaveTimer:
  """Decides when to save progress: every `every` steps (0: never by count) or after `seconds` of wall
  time; times the saves it is given (`save`) against the stage's wall time (`describe`)."""

  def __init__(self, every: int, seconds: float):
    self.every, self.seconds, self.last = every, seconds, time.monotonic()
    self.start, self.saves, self.save_seconds = self.last, 0, 0.0

  def due(self, step: int) -> bool:
    if (self.every and step % self.every == 0) or time.monotonic() - self.last >= self.seconds:
      self.last = time.monotonic()
      return True
    return False

  def save(self, write: Callable[[], Any]) -> None:
    """Calls write() (one save of progress) and adds its wall time to the total."""
    start = time.monotonic()
    write()
    self.saves += 1
    self.save_seconds += time.monotonic() - start

  def describe(self) -> str:
    """Returns e.g. 'progress saved 3 times in 0.4 s (0.2 % of 180 s)'."""
    total = max(time.monotonic() - self.start, 1e-9)
    return (f"progress saved {self.saves} times in {self.save_seconds:.1f} s "
            f"({100 * self.save_seconds / total:.1f} % of {total:.0f} s)")
