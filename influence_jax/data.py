"""Batches as pytrees of arrays: sizes, padding, concatenation, micro-batches.

A batch is any pytree whose leaves share a leading example axis. Functions here
are pure and work on numpy or jax arrays alike.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import jax
import numpy as np

from influence_jax.types import Batch



def batch_size(batch: Batch) -> int:
  """Returns the size of the leading (example) axis shared by all leaves."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
  if not leaves:
    raise ValueError("A batch must have at least one array leaf; got an empty pytree.")
  sizes = {}
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(
          f"Batch leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs "
          "a leading example axis.")
    sizes[jax.tree_util.keystr(path)] = shape[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(f"Batch leaves disagree on the number of examples: {sizes}.")
  return next(iter(sizes.values()))


def materialize(batches: Iterable[Batch], what: str = "batches") -> list[Batch]:
  """Returns `batches` as a list, checking it is non-empty and uniformly structured.

  Raises ValueError naming the first batch whose pytree structure or
  per-example shapes differ from the first batch's, or if there are no
  batches or a batch holds no examples.
  """
  if isinstance(batches, dict) or not isinstance(batches, (list, tuple)) and hasattr(batches, "shape"):
    raise TypeError(f"{what} must be an iterable of batches (e.g. a list), not a single batch.")
  out = list(batches)
  if not out:
    raise ValueError(f"{what} is empty: at least one batch is needed.")
  ref_def = jax.tree_util.tree_structure(out[0])
  ref_shapes = [np.shape(x)[1:] for x in jax.tree_util.tree_leaves(out[0])]
  for i, b in enumerate(out):
    if jax.tree_util.tree_structure(b) != ref_def:
      raise ValueError(
          f"{what}[{i}] has pytree structure {jax.tree_util.tree_structure(b)}, "
          f"but {what}[0] has {ref_def}.")
    n = batch_size(b)
    if n == 0:
      raise ValueError(f"{what}[{i}] holds no examples.")
    shapes = [np.shape(x)[1:] for x in jax.tree_util.tree_leaves(b)]
    if shapes != ref_shapes:
      raise ValueError(
          f"{what}[{i}] has per-example shapes {shapes}, but {what}[0] has {ref_shapes}.")
  return out


def concatenate(batches: list[Batch]) -> Batch:
  """Returns one batch holding the examples of `batches` in order."""
  if len(batches) == 1:
    return batches[0]
  return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *batches)


def take(batch: Batch, start: int, stop: int) -> Batch:
  """Returns examples [start, stop) of `batch`."""
  return jax.tree.map(lambda x: x[start:stop], batch)


def pad(batch: Batch, size: int) -> Batch:
  """Returns `batch` padded to `size` examples by repeating its first example.

  Padded rows are real examples (so losses stay finite); callers drop their
  results by slicing to the original size.
  """
  n = batch_size(batch)
  if n > size:
    raise ValueError(f"Cannot pad a batch of {n} examples down to {size}.")
  if n == size:
    return batch

  def _pad(x):
    x = np.asarray(x)
    filler = np.repeat(x[:1], size - n, axis=0)
    return np.concatenate([x, filler])

  return jax.tree.map(_pad, batch)


def stack_microbatches(batch: Batch, microbatch_size: int) -> tuple[Batch, Batch | None]:
  """Splits `batch` into equal micro-batches and a remainder.

  Returns (stacked, remainder): `stacked` has leaves of shape
  (num_micro, microbatch_size, ...) holding the first
  num_micro * microbatch_size examples; `remainder` holds the rest (None when
  there are none). No example is duplicated or dropped.
  """
  n = batch_size(batch)
  m = min(microbatch_size, n)
  num = n // m
  stacked = jax.tree.map(lambda x: np.asarray(x)[: num * m].reshape((num, m) + np.shape(x)[1:]), batch)
  remainder = take(batch, num * m, n) if num * m < n else None
  return stacked, remainder


def iterate(batch: Batch, size: int) -> Iterator[Batch]:
  """Yields consecutive slices of at most `size` examples of `batch`."""
  n = batch_size(batch)
  for start in range(0, n, size):
    yield take(batch, start, min(start + size, n))
