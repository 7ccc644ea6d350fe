"""The task interface: a user's trained model and data, as the jobs see them (`types.Task`).

A config names a factory, `config.task = "my_pkg.my_module:get_task"`; the jobs import it (from
the working directory or an installed package) and call `get_task(config)`, which returns a Task.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from influence_jax import sources as sources_lib
from influence_jax.types import Task


def import_object(path: str, what: str) -> Any:
  """Returns the object named "package.module:attribute"; the working directory is importable."""
  if not isinstance(path, str) or path.count(":") != 1:
    raise ValueError(f"{what} must be 'package.module:name', got {path!r}.")
  module_name, attr = path.split(":")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{what} = {path!r}: cannot import module {module_name!r} ({e}).") from e
  if not hasattr(module, attr):
    raise ValueError(f"{what} = {path!r}: module {module_name!r} has no attribute {attr!r}.")
  return getattr(module, attr)


def load_task(config) -> Task:
  """Returns the Task of `config.task`, checked: sources non-empty, functions callable."""
  factory = import_object(config.task, "config.task")
  task = factory(config)
  if not isinstance(task, Task):
    raise TypeError(f"config.task = {config.task!r} returned {type(task).__name__}; it must return "
                    "influence_jax.jobs.Task(params=..., loss_fn=..., per_example_loss_fn=..., train=..., queries=...).")
  for name in ("loss_fn", "per_example_loss_fn"):
    if not callable(getattr(task, name)):
      raise TypeError(f"Task.{name} must be callable, got {type(getattr(task, name)).__name__}.")
  sources_lib.check_source(task.train, "Task.train")
  sources_lib.check_source(task.queries, "Task.queries")
  if task.curvature is not None:
    sources_lib.check_source(task.curvature, "Task.curvature")
  return task


def curvature_source(task: Task, config) -> Any:
  """Returns the source the curvature averages over: Task.curvature, or a fixed sample of Task.train."""
  if task.curvature is not None:
    return task.curvature
  indices = sources_lib.sample_indices(len(task.train), config.arnoldi.num_examples, config.seed)
  return sources_lib.SubsetSource(task.train, indices)


def query_source(task: Task, config) -> Any:
  """Returns the query source: config.score.queries ("module:fn", called with config) or Task.queries."""
  spec = config.score.get("queries", "")
  if not spec:
    return task.queries
  source = import_object(spec, "config.score.queries")(config)
  sources_lib.check_source(source, f"config.score.queries ({spec})")
  return source


def label(task: Task, example: Any) -> str:
  """Returns the example's label text ("" without a label_fn)."""
  return "" if task.label_fn is None else str(task.label_fn(example))
