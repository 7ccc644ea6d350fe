"""What every stage starts from: the checked config, the task, the mesh, the parameters' fingerprint
(the fingerprints of what each stage computes, and the workdir's layout: jobs/workdir.py)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax

from influence_jax import io as io_lib
from influence_jax import paths
from influence_jax import sharding
from influence_jax.jobs import config as config_lib
from influence_jax.jobs import task as task_lib


@dataclasses.dataclass
class Context:
  """A stage's inputs: config (checked), workdir, task, mesh; `cache` holds what the workdir layer computes
  once per stage (the curvature sample, the fingerprints: jobs/workdir.py)."""

  config: Any
  workdir: str
  task: task_lib.Task
  mesh: jax.sharding.Mesh
  cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @functools.cached_property
  def params_fingerprint(self) -> str:
    """The parameters' digest (`io.params_digest`): the same on every process and for any sharding."""
    return io_lib.params_digest(self.task.params)

  @functools.cached_property
  def curvature_choice(self) -> tuple:
    """(curvature, why): arnoldi.curvature resolved against the task's loss (`config.resolve_curvature`)."""
    return config_lib.resolve_curvature(self.config.arnoldi.curvature, self.task.loss_fn)

  @property
  def curvature(self) -> str:
    """The curvature the fit uses: "gauss_newton" or "hessian" ("auto" resolved)."""
    return self.curvature_choice[0]

  def path(self, *parts: str) -> str:
    return paths.join(self.workdir, *parts)


def job_mesh(config) -> jax.sharding.Mesh:
  """Returns the mesh of every stage: `sharding.make_mesh(config.mesh_shape)` over all devices of all
  processes (a single device is a 1 × 1 mesh)."""
  return sharding.make_mesh(config.get("mesh_shape", None))


def prepare(config, workdir: str, *, task: Optional[task_lib.Task] = None) -> Context:
  """Returns the Context of a stage: checks the config, sets config.workdir, loads the task."""
  config_lib.validate(config)
  workdir = paths.absolute(workdir)
  if "workdir" in config and config.workdir != workdir:
    config.workdir = workdir
  task = task_lib.load_task(config) if task is None else task
  ctx = Context(config, workdir, task, job_mesh(config))
  ctx.curvature_choice  # noqa: B018 (a 'gauss_newton' the loss cannot give is refused before any work)
  return ctx
