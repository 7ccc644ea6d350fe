"""The types every layer shares: parameters, batches, the loss functions, example sources, the jobs' Task.

A batch is examples stacked on a leading axis (a pytree of arrays). Every signature of the
package that takes a loss takes one of the Protocols below. The projections take the layer-wise
path of a loss that is a `LayerwiseLossFn` (`isinstance`), and wrap any other in one that finds
its layers from its jaxpr (`projection.as_layerwise`, `traced.TracedLayerwiseLoss`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import jax

Params = Any  # A pytree of arrays: the model's parameters (what gradients and curvature are taken over).
Batch = Any  # A pytree of arrays whose leaves share a leading example axis.
Example = Any  # One example: a pytree of (numpy) arrays, a batch without its leading axis.


class LossFn(Protocol):
  """loss_fn(params, batch) -> scalar: the training objective (mean loss plus any regulariser)."""

  def __call__(self, params: Params, batch: Batch) -> jax.Array: ...


class PerExampleLossFn(Protocol):
  """per_example_loss_fn(params, batch) -> (B,): each example's loss, no regulariser."""

  def __call__(self, params: Params, batch: Batch) -> jax.Array: ...


class OutputsFn(Protocol):
  """outputs_fn(params, batch) -> (B, ...) the model's outputs (e.g. logits)."""

  def __call__(self, params: Params, batch: Batch) -> jax.Array: ...


@runtime_checkable
class LayerwiseLossFn(Protocol):
  """A per-example loss that also projects its per-example gradients layer by layer
  (`traced.TracedLayerwiseLoss` for any function, `layerwise.LayerwiseLoss` for Linen modules): the
  fast path of `projection.project_on` and `sketch.project_and_sketch`."""

  def __call__(self, params: Params, batch: Batch) -> jax.Array: ...

  def micro_projector(self, params: Params, directions: jax.Array, with_norms: bool, example: Batch,
                      prepared: Optional[dict] = None) -> Callable: ...

  def micro_projector_with_gradients(self, params: Params, directions: jax.Array, example: Batch,
                                     gradient_fn: Callable, chunk: int, prepared: Optional[dict] = None) -> Callable: ...

  def factored_fraction(self, params: Params, example: Batch) -> float: ...

  def prepare_directions(self, params: Params, directions: jax.Array, with_norms: bool, example: Batch,
                         with_gradients: bool = False) -> dict: ...


@runtime_checkable
class Source(Protocol):
  """A random-access source of examples: `len(source)` and `source[i]` -> one Example.

  Optional, found by `hasattr`: `read_batch(indices) -> Batch` (a vectorised read) and
  `fingerprint_parts() -> list` (what identifies the data beyond sampled examples).
  """

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...


@dataclasses.dataclass(frozen=True)
class Task:
  """What the jobs need to trace predictions back to training examples (`config.task` returns one).

  params: the trained parameters (restore them from your checkpoint).
  loss_fn: the training objective whose curvature is used (mean loss plus any L2 term); a
    `curvature.SplitLoss` (what the Flax adapters return) makes the jobs' default curvature
    (`arnoldi.curvature="auto"`) Gauss-Newton, positive semi-definite for a convex output loss;
    any other callable gets the Hessian.
  per_example_loss_fn: each example's loss, no regulariser.
  train: the training examples; row ids in every table are indices into it.
  queries: the examples to explain (ids in the tables index it).
  curvature: optional source the curvature averages over (default: a fixed sample of `train` of
    config.arnoldi.num_examples examples, drawn with config.seed).
  label_fn(example) -> str: optional label shown in tables and pictures (default: none).
  image_fn(example) -> 2-D array: optional picture of an example for influence_grid.png.
  """

  params: Params
  loss_fn: LossFn
  per_example_loss_fn: PerExampleLossFn
  train: Source
  queries: Source
  curvature: Optional[Source] = None
  label_fn: Optional[Callable[[Example], str]] = None
  image_fn: Optional[Callable[[Example], Any]] = None

  def replace(self, **changes) -> "Task":
    return dataclasses.replace(self, **changes)


__all__ = ["Batch", "Example", "LayerwiseLossFn", "LossFn", "OutputsFn", "Params", "PerExampleLossFn",
           "Source", "Task"]
