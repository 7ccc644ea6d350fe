"""Batches streamed from random-access sources with grain: deterministic order, batched, prefetched by
reader threads, each process reading only the rows it is given; never a whole split in memory."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from influence_jax import data as data_lib
from influence_jax import sharding
from influence_jax import sources


class _Rows:
  """source restricted to `rows`, each example tagged with its row: (row, example)."""

  def __init__(self, source: Any, rows: np.ndarray):
    self.source, self.rows = source, rows

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int):
    row = int(self.rows[i])
    return row, self.source[row]

  def _getitems(self, indices: Sequence[int]) -> list:
    rows = [int(self.rows[i]) for i in indices]
    if hasattr(self.source, "_getitems"):
      return list(zip(rows, self.source._getitems(rows)))  # noqa: SLF001 (grain's batched-read protocol)
    return [(r, self.source[r]) for r in rows]


def batches(source: Any, rows: np.ndarray, batch_size: int, what: str, *,
            num_threads: int = 8) -> Iterator[tuple[np.ndarray, Any]]:
  """Yields (rows, batch) for consecutive `batch_size` slices of `rows` of `source`, in order.

  Examples are read by grain's reader threads ahead of use. Raises ValueError naming the first
  example whose structure or shapes differ from its batch's first example.
  """
  rows = np.asarray(rows, np.int64)
  if rows.size == 0:
    return

  def stack(items):
    ids = np.asarray([r for r, _ in items], np.int64)
    return ids, sources.stack([ex for _, ex in items], what, int(ids[0]))

  dataset = grain.MapDataset.source(_Rows(source, rows)).batch(batch_size, batch_fn=stack)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, 2 * num_threads))
  yield from dataset.to_iter_dataset(options)


def read_all(source: Any, what: str, batch_size: int = 1024) -> Any:
  """Returns every example of a (small) source as one batch: for query sets and curvature samples."""
  n = sources.check_source(source, what)
  return data_lib.concatenate([b for _, b in batches(source, np.arange(n), batch_size, what)])


def process_rows(rows: np.ndarray, global_batch_size: int, mesh) -> tuple[int, int]:
  """Returns (local batch size, steps): every process runs the same number of steps of
  global_batch_size // processes of its own rows (the agreed maximum)."""
  count = jax.process_count()
  data = sharding.axis_size(mesh, sharding.DATA)
  if global_batch_size % count or global_batch_size % data:
    raise ValueError(f"The batch size {global_batch_size} is the global batch: it must be a multiple of the "
                     f"mesh's 'data' axis ({data}, config.mesh_shape) and of the {count} processes.")
  local = global_batch_size // count
  return local, sharding.num_steps(len(rows), local)


def global_batches(source: Any, rows: np.ndarray, global_batch_size: int, mesh, what: str, *,
                   num_threads: int = 8) -> Iterator[tuple[np.ndarray, Any]]:
  """Yields (local rows, global batch) with this process's `rows` fed into global batches on `mesh`.

  Every process yields the same number of batches; batches are padded at the end by repeating an
  example, and `local rows` lists only this process's real rows (the first len(rows) of its share).
  """
  local, steps = process_rows(rows, global_batch_size, mesh)
  spec = sharding.batch_sharding(mesh)
  template = sources.stack([source[0]], what)  # Padding rows repeat a real example.
  stream = batches(source, rows, local, what, num_threads=num_threads)
  for _ in range(steps):
    got = next(stream, None)
    if got is None:  # This process has run out: a padding batch of its first example.
      ids, batch = np.zeros(0, np.int64), template
    else:
      ids, batch = got
    batch = data_lib.pad(batch, local)
    make = lambda x: jax.make_array_from_process_local_data(spec, np.asarray(x), (global_batch_size,) + x.shape[1:])
    yield ids, jax.tree.map(make, batch)


def local_rows(x: jax.Array, mesh) -> np.ndarray:
  """Returns this process's rows of a global (B, ...) array laid out over 'data' (in its feed order)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, sharding.BATCH_SPEC))
