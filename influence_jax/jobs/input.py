"""Batches streamed from random-access sources with grain: deterministic order, batched, prefetched by
reader threads, each process reading only the rows it is given; never a whole split in memory."""

from __future__ import annotations

from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from influence_jax import data as data_lib
from influence_jax import sharding
from influence_jax import sources


class RowRanges:
  """Rows given as half-open ranges [(lo, hi), ...], sliced without materialising them all (a process's
  chunks of 10⁸ rows would otherwise be an 800 MB index array)."""

  def __init__(self, ranges):
    self.ranges = [(int(lo), int(hi)) for lo, hi in ranges if hi > lo]
    self.starts = np.cumsum([0] + [hi - lo for lo, hi in self.ranges])

  @property
  def size(self) -> int:
    return int(self.starts[-1])

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, s: slice) -> np.ndarray:
    start, stop, _ = s.indices(self.size)
    parts = []
    first = int(np.searchsorted(self.starts, start, side="right")) - 1
    for j in range(max(first, 0), len(self.ranges)):
      if self.starts[j] >= stop:
        break
      lo, _ = self.ranges[j]
      a, b = max(start, self.starts[j]) - self.starts[j], min(stop, self.starts[j + 1]) - self.starts[j]
      parts.append(np.arange(lo + a, lo + b))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class _Batches:
  """A random-access source whose element i is (rows, batch) for the i-th `batch_size` slice of `rows`.

  grain reads whole batches with its threads, so its per-element cost is paid once a batch
  (`sources.read_rows`: a vectorised `read_batch` when the source has one).
  """

  def __init__(self, source: Any, rows: np.ndarray, batch_size: int, what: str):
    self.source, self.rows, self.batch_size, self.what = source, rows, batch_size, what

  def __len__(self) -> int:
    return -(-len(self.rows) // self.batch_size)

  def __getitem__(self, i: int):
    rows = self.rows[i * self.batch_size:(i + 1) * self.batch_size]
    return rows, sources.read_rows(self.source, rows, self.what)


def batches(source: Any, rows: np.ndarray, batch_size: int, what: str, *,
            num_threads: int = 8) -> Iterator[tuple[np.ndarray, Any]]:
  """Yields (rows, batch) for consecutive `batch_size` slices of `rows` of `source`, in order.

  Batches are read by grain's reader threads ahead of use. Raises ValueError naming the first
  example whose structure or shapes differ from its batch's first example.
  """
  rows = rows if isinstance(rows, RowRanges) else np.asarray(rows, np.int64)
  if len(rows) == 0:
    return
  dataset = grain.MapDataset.source(_Batches(source, rows, batch_size, what))
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
  yield from dataset.to_iter_dataset(options)


def read_all(source: Any, what: str, batch_size: int = 1024) -> Any:
  """Returns every example of a (small) source as one batch: for query sets and curvature samples."""
  n = sources.check_source(source, what)
  return data_lib.concatenate([b for _, b in batches(source, np.arange(n), batch_size, what)])


def process_rows(rows: np.ndarray, global_batch_size: int, mesh) -> tuple[int, int]:
  """Returns (local batch size, steps): every process runs the same number of steps of
  global_batch_size // processes of its own rows (the agreed maximum)."""
  local = sharding.local_batch_size(global_batch_size, mesh)
  return local, sharding.num_steps(len(rows), local)


def global_batches(source: Any, rows: np.ndarray, global_batch_size: int, mesh, what: str, *,
                   num_threads: int = 8, with_host: bool = False) -> Iterator[tuple]:
  """Yields (local rows, global batch) with this process's `rows` fed into global batches on `mesh`
  (with `with_host`, (local rows, global batch, local host batch): the examples as read, unpadded).

  Every process yields the same number of batches; batches are padded at the end by repeating an
  example, and `local rows` lists only this process's real rows (the first len(rows) of its share).
  """
  local, steps = process_rows(rows, global_batch_size, mesh)
  template = sources.stack([source[0]], what)  # Padding rows repeat a real example.
  stream = batches(source, rows, local, what, num_threads=num_threads)
  for _ in range(steps):
    got = next(stream, None)
    if got is None:  # This process has run out: a padding batch of its first example.
      ids, batch = np.zeros(0, np.int64), template
    else:
      ids, batch = got
    placed = sharding.to_global(data_lib.pad(batch, local), global_batch_size, mesh)
    yield (ids, placed, batch) if with_host else (ids, placed)


def local_rows(x: jax.Array, mesh) -> np.ndarray:
  """Returns this process's rows of a global (B, ...) array laid out over 'data' (in its feed order)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, sharding.BATCH_SPEC))
