"""The entry points of the scripts: each stage from a config and a work directory, with the stages it
needs run (or loaded) first. A stage that is already done is loaded, its missing reports rewritten."""

from __future__ import annotations

from typing import Optional

from influence_jax.eigenspace import Eigenspace
from influence_jax.jobs import fit, project, score
from influence_jax.jobs import workdir as workdir_lib
from influence_jax.jobs.context import Context


def load_eigenspace(ctx: Context) -> Eigenspace:
  """Returns the stage's fitted eigenspace (its missing reports rewritten); raises FileNotFoundError
  naming the job to run first."""
  es = workdir_lib.load_eigenspace(ctx)
  fit.write_reports(ctx, es, only_missing=True)
  return es


def fit_stage(ctx: Context, *, quiet: bool = False, fault: Optional[str] = None) -> Eigenspace:
  return fit.run_fit(ctx, quiet=quiet, fault=fault)


def project_stage(ctx: Context, *, quiet: bool = False, fault: Optional[str] = None):
  return project.run_project(ctx, load_eigenspace(ctx), quiet=quiet, fault=fault)


def score_stage(ctx: Context, *, quiet: bool = False, fault: Optional[str] = None) -> dict:
  return score.run_score(ctx, load_eigenspace(ctx), quiet=quiet, fault=fault)


def all_stages(ctx: Context, *, quiet: bool = False, fault: Optional[str] = None) -> dict:
  """Runs fit, project and score (each resumes or is skipped when done); returns every output path."""
  es = fit.run_fit(ctx, quiet=quiet, fault=fault)
  project.run_project(ctx, es, quiet=quiet, fault=fault)
  paths = score.run_score(ctx, es, quiet=quiet, fault=fault)
  return dict(fit.write_reports(ctx, es, only_missing=True), store=ctx.path("store"), **paths)
