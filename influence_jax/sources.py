"""Random-access example sources: what the jobs stream training and query examples from.

A source is any object with `len(source)` and `source[i]` returning one example as a pytree of
numpy arrays (grain's random-access sources, e.g. `grain.sources.ArrayRecordDataSource` followed
by a parse step, or a plain class over numpy files). A batch is examples stacked on a leading axis.
A source may also offer `read_batch(indices)` returning the stacked batch at once (a vectorised
read: much faster than one example at a time in Python) or grain's `_getitems(indices)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from influence_jax import io as io_lib


class ArraySource:
  """A source over in-memory arrays: `ArraySource({"x": (N, ...), "y": (N,)})[i]` is example i."""

  def __init__(self, arrays: Any):
    leaves = jax.tree.leaves(arrays)
    if not leaves:
      raise ValueError("ArraySource needs at least one array.")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"ArraySource arrays must share a leading example axis; got sizes {sorted(map(str, sizes))}.")
    self.arrays = jax.tree.map(np.asarray, arrays)
    self._len = sizes.pop()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Any:
    return jax.tree.map(lambda x: x[index], self.arrays)

  def read_batch(self, indices: Sequence[int]) -> Any:
    """Returns examples `indices` stacked into a batch (one fancy-indexing read per array)."""
    idx = np.asarray(indices)
    return jax.tree.map(lambda x: x[idx], self.arrays)

  def fingerprint_parts(self) -> list:
    """Returns what identifies this source: the digest of its arrays' content (they are in memory)."""
    return [io_lib.digest(self.arrays)]


class SubsetSource:
  """The examples `indices` of `source`, in that order (e.g. the fixed curvature sample)."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]

  def read_batch(self, rows: Sequence[int]) -> Any:
    """Returns examples `rows` of the subset stacked, read from the source as one batch."""
    return read_rows(self.source, self.indices[np.asarray(rows, np.int64)], "a subset of a source")

  def fingerprint_parts(self) -> list:
    return [source_fingerprint(self.source), hashlib.sha256(self.indices.tobytes()).hexdigest()[:16]]


def read_rows(source: Any, rows: np.ndarray, what: str) -> Any:
  """Returns examples `rows` of `source` stacked into a batch: `source.read_batch(rows)` when it has one
  (one vectorised read), else grain's batched-read protocol `source._getitems`, else `source[row]` one
  by one; raises ValueError naming the first example that differs from the first in structure or shape."""
  if hasattr(source, "read_batch"):
    return source.read_batch(rows)
  if hasattr(source, "_getitems"):
    examples = source._getitems([int(r) for r in rows])  # noqa: SLF001 (grain's batched-read protocol)
  else:
    examples = [source[int(r)] for r in rows]
  return stack(examples, what, int(rows[0]))


def check_source(source: Any, what: str) -> int:
  """Returns len(source); raises ValueError naming `what` if it is not a non-empty random-access source."""
  if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
    raise TypeError(f"{what} must be a random-access source (len() and [i]), got {type(source).__name__}.")
  n = len(source)
  if n == 0:
    raise ValueError(f"{what} is empty: it holds no examples.")
  return n


def example_signature(example: Any) -> tuple:
  """Returns (pytree structure, per-leaf (shape, dtype)) of one example, to compare examples by."""
  leaves, treedef = jax.tree.flatten(example)
  return treedef, tuple((np.shape(x), np.asarray(x).dtype.str) for x in leaves)


def stack(examples: Sequence[Any], what: str, first_index: int = 0) -> Any:
  """Returns `examples` stacked into a batch; raises ValueError naming the first that differs in structure
  or shape from the first one (`first_index` is the first example's index in `what`)."""
  flat = [jax.tree.flatten(ex) for ex in examples]
  treedef = flat[0][1]
  try:
    if any(t != treedef for _, t in flat):
      raise ValueError
    leaves = [np.stack([f[0][i] for f in flat]) for i in range(len(flat[0][0]))]
  except ValueError:
    ref = example_signature(examples[0])
    j = next(j for j, ex in enumerate(examples) if example_signature(ex) != ref)
    raise ValueError(
        f"{what}[{first_index + j}] differs from {what}[{first_index}] in structure or shape: "
        f"{_describe(example_signature(examples[j]))} vs {_describe(ref)}. Every example of a source must have "
        "the same leaves and shapes.") from None
  return jax.tree.unflatten(treedef, leaves)


def _describe(signature: tuple) -> str:
  treedef, leaves = signature
  return f"{treedef} with leaves {list(leaves)}"


def sample_indices(num_examples: int, num_samples: int, seed: int) -> np.ndarray:
  """Returns min(num_samples, N) distinct indices of range(num_examples), sorted, fixed by `seed`
  (all of them when num_samples < 0)."""
  if num_samples < 0 or num_samples >= num_examples:
    return np.arange(num_examples)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_examples, size=num_samples, replace=False))


def file_identity(paths: Sequence[str]) -> list:
  """Returns [name, size, mtime_ns] of each file: what a file-backed source's `fingerprint_parts()` returns
  (object storage: the object's name, size and generation or etag instead). Rewriting a file changes it."""
  out = []
  for path in paths:
    st = os.stat(path)
    out.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
  return out


def offers_identity(source: Any) -> bool:
  """Returns True when `source` says what identifies its content: `fingerprint_parts()` (files' identity, a
  version) or a `paths` attribute; a subset offers its source's. Without it, `source_fingerprint` sees
  only the type, the length and sampled examples."""
  if isinstance(source, SubsetSource):
    return offers_identity(source.source)
  return hasattr(source, "fingerprint_parts") or bool(getattr(source, "paths", None))


def source_fingerprint(source: Any, num_samples: int = 8) -> str:
  """Returns a short hash of what identifies `source`, without reading it all.

  Parts: its type and length; what the source says identifies it (`fingerprint_parts()`, e.g. its
  files' names, sizes and modification times; for sources with a `paths` attribute, `file_identity`
  of them); and the bytes of `num_samples` examples spread evenly over it (the first and last
  included). A source offering neither (`offers_identity`) is seen only through those examples.
  """
  n = check_source(source, "source")
  h = hashlib.sha256()
  h.update(f"{type(source).__module__}.{type(source).__qualname__}:{n}".encode())
  if hasattr(source, "fingerprint_parts"):
    h.update(json.dumps(source.fingerprint_parts(), default=str).encode())
  if getattr(source, "paths", None):
    h.update(json.dumps(file_identity(source.paths)).encode())
  for i in np.unique(np.linspace(0, n - 1, min(num_samples, n)).round().astype(np.int64)):
    for leaf in jax.tree.leaves(source[int(i)]):
      arr = np.ascontiguousarray(np.asarray(leaf))
      h.update(f"{arr.dtype}{arr.shape}".encode())
      h.update(arr.tobytes())
  return h.hexdigest()[:16]
