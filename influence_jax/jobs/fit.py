"""The fit stage: the top-k eigenspace of the curvature over a fixed sample of the training set.

Resumes from `arnoldi_progress/` (saved by wall-time interval and every `checkpoint_every` steps,
only ever from a finite step: `arnoldi.NonFiniteStep`; progress restored with non-finite values is
discarded); a fit that fails on non-finite curvature names the curvature sample's rows whose loss is
not finite. The eigenspace is committed to `eigenspace/`, and its reports (eigenvalues.json, spectrum.png)
are (re)written from it whenever they are missing, so a finished stage always has them.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree

from influence_jax import arnoldi
from influence_jax import checkpoint
from influence_jax import curvature as curvature_lib
from influence_jax import data as data_lib
from influence_jax import diagnostics as diagnostics_lib
from influence_jax import eigenspace as eigenspace_lib
from influence_jax import io as io_lib
from influence_jax import paths as paths_lib
from influence_jax import sharding
from influence_jax import validation
from influence_jax.jobs import common
from influence_jax.jobs import plots
from influence_jax.jobs import progress as progress_lib
from influence_jax.jobs import task as task_lib
from influence_jax.jobs import workdir as workdir_lib
from influence_jax.jobs.context import Context


def run_fit(ctx: Context, *, quiet: bool = False, fault: Optional[str] = None) -> eigenspace_lib.Eigenspace:
  """Fits (or loads, or resumes) the eigenspace; returns it, laid out on the stage's mesh."""
  final_dir = ctx.path("eigenspace")
  fp = workdir_lib.eigenspace_fingerprint(ctx)
  if paths_lib.isdir(final_dir):
    try:
      es = checkpoint.load_eigenspace(final_dir, fingerprint=fp, mesh=ctx.mesh)
      write_reports(ctx, es, only_missing=True)
      return workdir_lib.with_scoring_damping(ctx, es)
    except FileNotFoundError:
      pass  # A directory with no finished step: fit again.
  task, a, mesh = ctx.task, ctx.config.arnoldi, ctx.mesh
  flat = ravel_pytree(task.params)[0]
  template = arnoldi.init(eigenspace_lib.start_vector(flat.size, curvature_lib.vector_dtype(flat.dtype), ctx.config.seed,
                                                       mesh=mesh),
                          a.n_iters, block_size=a.block_size)
  columns = sharding.padded_dim(flat.size, mesh)
  # A basis padded for another 'model' size has other columns: not this job's progress.
  store = checkpoint.CheckpointDir(ctx.path("arnoldi_progress"),
                           fp if columns == flat.size else io_lib.digest(fp, columns))
  try:
    found = store.restore_latest(target=template._asdict())
  except checkpoint.CorruptCheckpoint as e:  # Resumable work: recomputed, never trusted.
    logging.warning("%s Starting the Arnoldi iteration again.", e)
    store.discard()
    found = None
  if found is not None and validation.nonfinite_leaves(found[1]):  # Saved by an older version: unsound.
    logging.warning("%s holds non-finite Arnoldi progress: discarded, starting the Arnoldi iteration again.",
                    ctx.path("arnoldi_progress"))
    store.discard()
    found = None
  state = arnoldi.ArnoldiState(**found[1]) if found is not None else template
  batches = workdir_lib.curvature_batches(ctx)
  if not quiet:
    logging.info("Fitting the top-%d eigenspace of the %s curvature (%s): %d parameters, curvature over %d "
                 "examples, %d steps", a.top_k, ctx.curvature, ctx.curvature_choice[1], flat.size,
                 sum(data_lib.batch_size(b) for b in batches), a.n_iters)
  bar = progress_lib.Progress(a.n_iters, "arnoldi", "iterations", start=int(state.num_steps),
                              quiet=quiet or not common.is_writer())
  saver = workdir_lib.SaveTimer(a.checkpoint_every, a.checkpoint_seconds)

  def callback(s: arnoldi.ArnoldiState) -> None:
    bar.update()
    step = int(s.num_steps)
    if step < a.n_iters and not bool(s.breakdown) and saver.due(step):
      saver.save(lambda: store.save(step, s._asdict()))
    common.maybe_kill(fault, "arnoldi", step)

  try:
    es = eigenspace_lib.fit_eigenspace(
        task.loss_fn, task.params, batches, n_iters=a.n_iters, top_k=a.top_k, damping=a.damping,
        curvature=ctx.curvature, seed=ctx.config.seed, selection=a.selection,
        microbatch_size=a.microbatch_size or None, block_size=a.block_size, callback=callback,
        initial_state=state, compute_residuals=a.residuals, mesh=mesh)
  except ValueError:
    check_curvature_rows(ctx, batches)  # Names the examples when the data are at fault.
    raise
  checkpoint.save_eigenspace(final_dir, es, fingerprint=fp)
  store.close()
  logging.info("Arnoldi: %s", saver.describe())
  common.maybe_kill(fault, "fit_saved", 0)  # Between the commit and its reports (a rerun writes them).
  write_reports(ctx, es)
  return es


def check_curvature_rows(ctx: Context, batches: list) -> None:
  """Raises ValueError naming the curvature sample's examples whose per-example loss is NaN or inf (by
  their rows in Task.train, or in Task.curvature when the task gives one); returns when there are none."""
  source = task_lib.curvature_source(ctx.task, ctx.config)
  rows = getattr(source, "indices", None)
  what = ("The curvature sample (Task.curvature" if ctx.task.curvature is not None
          else "The curvature sample (by Task.train row") + "; no Arnoldi progress was saved from a non-finite step)"
  params, lo = jax.tree.map(lambda x: jnp.asarray(sharding.to_host(x)), ctx.task.params), 0
  for batch in batches:
    n = data_lib.batch_size(batch)
    losses = workdir_lib.per_example_losses(ctx.task.per_example_loss_fn, params, batch)
    ids = np.arange(lo, lo + n) if rows is None else rows[lo: lo + n]
    validation.check_finite_rows(losses, what, row_ids=ids)
    lo += n


def diagnostics(ctx: Context, es: eigenspace_lib.Eigenspace) -> diagnostics_lib.FitDiagnostics:
  """Returns the eigenspace's FitDiagnostics at the config's damping and arnoldi.residual_tol."""
  return diagnostics_lib.diagnose(es, damping=float(ctx.config.arnoldi.damping),
                                 residual_tol=float(ctx.config.arnoldi.residual_tol))


def log_diagnostics(diag: diagnostics_lib.FitDiagnostics) -> None:
  """Logs the fit's diagnostics: k kept and why, unconverged pairs, definiteness (warnings as warnings)."""
  for level, message in diag.notes():
    (logging.warning if level == "warning" else logging.info)("%s", message)


def write_reports(ctx: Context, es: eigenspace_lib.Eigenspace, *, only_missing: bool = False) -> dict:
  """Writes eigenvalues.json and spectrum.png from `es` (process 0; every process must call it), and
  logs the diagnostics (`diagnostics.diagnose`) when it writes them.

  eigenvalues.json: the eigenvalues, residuals and Ritz estimates; the curvature used and how it was
  chosen; "diagnostics": k asked vs kept and why, the unconverged pairs (residual above
  residual_tol·|λ|), the most negative Ritz value and whether C + δI is positive definite on the
  fitted subspace, with the warning and its remedy when it is not. spectrum.png draws unconverged
  pairs distinctly. With `only_missing`, a report is rewritten only when absent or unreadable.
  """
  host = {name: sharding.to_host(getattr(es, name)) for name in ("eigenvalues", "residuals", "ritz_estimates")}
  paths = {"eigenvalues": ctx.path("eigenvalues.json"), "spectrum": ctx.path("spectrum.png")}
  diag = diagnostics(ctx, es)  # On every process: reading the eigenvalues to the host may be a collective.
  if not common.is_writer():
    return paths
  curvature = es.info.curvature if es.info is not None else ctx.curvature
  if not (only_missing and _readable_json(paths["eigenvalues"], es.k)):
    log_diagnostics(diag)
    record = {
        "eigenvalues": host["eigenvalues"].astype(np.float64).tolist(),
        "residuals": host["residuals"].astype(np.float64).tolist(),
        "ritz_estimates": host["ritz_estimates"].astype(np.float64).tolist(),
        "curvature": curvature, "curvature_choice": ctx.curvature_choice[1],
        "damping": es.damping, "arnoldi": ctx.config.arnoldi.to_dict(),
        "num_steps": es.info.num_steps, "breakdown": es.info.breakdown,
        "num_params": es.info.num_params, "num_examples": es.info.num_examples,
        "diagnostics": dict(diag.to_json(), warning=diag.indefinite_warning() or None),
    }
    io_lib.atomic_write_json(paths["eigenvalues"], record)
  if not (only_missing and paths_lib.exists(paths["spectrum"])):
    plots.spectrum(paths["spectrum"], host["eigenvalues"], host["residuals"], es.damping,
                   title=f"top-{es.k} of {diag.top_k} {curvature} eigenvalues", unconverged=diag.unconverged,
                   residual_tol=diag.residual_tol, min_ritz_value=diag.min_ritz_value)
  return paths


def _readable_json(path: str, k: int) -> bool:
  try:
    return len(io_lib.read_json(path)["eigenvalues"]) == k
  except (KeyError, TypeError):
    return False
