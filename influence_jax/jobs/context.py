"""What every stage starts from: the checked config, the task, the mesh, and the fingerprints that
tie each stage's outputs to what they were computed from (the workdir's layout: jobs/workdir.py)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax

from influence_jax import io as io_lib
from influence_jax import sharding
from influence_jax import sources
from influence_jax.jobs import config as config_lib
from influence_jax.jobs import task as task_lib

# Keys left out of the eigenspace's and the store's fingerprints: those that change how a stage runs,
# not what it computes, and the damping δ, which only the scoring applies ((Λ + δ)⁻¹, c = λ_k + δ).
# arnoldi.residual_tol only flags pairs in the reports; arnoldi.curvature enters as resolved ("auto" is
# the curvature it picks: `Context.curvature`).
_NOT_FINGERPRINTED = ("checkpoint_every", "checkpoint_seconds", "num_threads", "microbatch_size", "grid_examples",
                      "self_influence_rows", "batch_size", "rows_per_block", "name", "damping", "residual_tol")


def _what(section) -> dict:
  return {k: v for k, v in section.to_dict().items() if k not in _NOT_FINGERPRINTED}


@dataclasses.dataclass
class Context:
  """A stage's inputs: config (checked), workdir, task, mesh; fingerprints computed on first use."""

  config: Any
  workdir: str
  task: task_lib.Task
  mesh: jax.sharding.Mesh

  @functools.cached_property
  def params_fingerprint(self) -> str:
    return io_lib.digest(self.task.params)

  @functools.cached_property
  def curvature_choice(self) -> tuple:
    """(curvature, why): arnoldi.curvature resolved against the task's loss (`config.resolve_curvature`)."""
    return config_lib.resolve_curvature(self.config.arnoldi.curvature, self.task.loss_fn)

  @property
  def curvature(self) -> str:
    """The curvature the fit uses: "gauss_newton" or "hessian" ("auto" resolved)."""
    return self.curvature_choice[0]

  @functools.cached_property
  def eigenspace_fingerprint(self) -> str:
    c = self.config
    return io_lib.digest(c.task, self.params_fingerprint, c.seed, dict(_what(c.arnoldi), curvature=self.curvature),
                         sources.source_fingerprint(task_lib.curvature_source(self.task, c)))

  @functools.cached_property
  def store_fingerprint(self) -> str:
    c = self.config
    basis = (c.project.residual_rank, c.project.residual_examples) if c.project.residual_rank else ()
    return io_lib.digest(self.eigenspace_fingerprint, sources.source_fingerprint(self.task.train),
                         c.project.sketch_dim, c.project.chunk_rows, c.seed, *basis)

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)


def job_mesh(config) -> jax.sharding.Mesh:
  """Returns the mesh of every stage: `sharding.make_mesh(config.mesh_shape)` over all devices of all
  processes (a single device is a 1 × 1 mesh)."""
  return sharding.make_mesh(config.get("mesh_shape", None))


def prepare(config, workdir: str, *, task: Optional[task_lib.Task] = None) -> Context:
  """Returns the Context of a stage: checks the config, sets config.workdir, loads the task."""
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  if "workdir" in config and config.workdir != workdir:
    config.workdir = workdir
  task = task_lib.load_task(config) if task is None else task
  ctx = Context(config, workdir, task, job_mesh(config))
  ctx.curvature_choice  # noqa: B018 (a 'gauss_newton' the loss cannot give is refused before any work)
  return ctx
