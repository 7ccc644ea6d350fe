"""The task interface: a user's trained model and data, as the jobs see them.

A config names a factory, `config.task = "my_pkg.my_module:get_task"`; the jobs import it (from
the working directory or an installed package) and call `get_task(config)`, which returns a Task.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Any, Callable, Optional

from influence_jax import sources as sources_lib


@dataclasses.dataclass(frozen=True)
class Task:
  """What the jobs need to trace predictions back to training examples.

  params: the trained parameters (a pytree of arrays; restore them from your checkpoint).
  loss_fn(params, batch) -> scalar: the training objective whose curvature is used (mean loss plus
    any L2 term); a `curvature.SplitLoss` makes `arnoldi.curvature="gauss_newton"` available.
  per_example_loss_fn(params, batch) -> (B,): each example's loss, no regulariser.
  train: random-access source of the training examples (len() and [i] -> one example, a pytree of
    numpy arrays); row ids in every table are indices into it.
  queries: random-access source of the examples to explain (ids in the tables index it).
  curvature: optional source the curvature averages over (default: a fixed sample of `train` of
    config.arnoldi.num_examples examples, drawn with config.seed).
  label_fn(example) -> str: optional label shown in tables and pictures (default: none).
  image_fn(example) -> 2-D array: optional picture of an example for influence_grid.png.
  A batch is examples stacked on a leading axis (what `loss_fn` and `per_example_loss_fn` receive).
  """

  params: Any
  loss_fn: Callable
  per_example_loss_fn: Callable
  train: Any
  queries: Any
  curvature: Optional[Any] = None
  label_fn: Optional[Callable[[Any], str]] = None
  image_fn: Optional[Callable[[Any], Any]] = None

  def replace(self, **changes) -> "Task":
    return dataclasses.replace(self, **changes)


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
