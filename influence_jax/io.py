"""Files the jobs and the evaluation write: atomic writes, checked .npz records, content digests.

Atomic writes (`paths.write_bytes`: a local path or gs://) leave the old file or the new one, never a
part, so a reader (or a job killed half-way) never sees a half-written file. `digest` is the one
hash that ties an output to what it was computed from (configs, arrays, data).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import Any, Callable, Optional

import jax
import numpy as np

from influence_jax import paths


def digest(*parts: Any) -> str:
  """Returns a short stable hash of JSON-able parts (configs) and arrays (data, params), their structure
  (dict keys, None entries) included."""
  h = hashlib.sha256()
  for part in parts:
    h.update(str(jax.tree.structure(part)).encode())
    for leaf in jax.tree.leaves(part):
      if isinstance(leaf, (np.ndarray, jax.Array)) or hasattr(leaf, "dtype"):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
      else:
        h.update(json.dumps(leaf, sort_keys=True, default=str).encode())
    h.update(b"|")
  return h.hexdigest()[:16]


class RowDigest:
  """A digest of examples fed batch by batch (`update(batch)`), the same however the rows are split into
  batches: one sha256 per leaf over its rows' bytes in order, with the tree structure and each leaf's dtype
  and row shape. What a store chunk, a query set or a curvature sample is identified by: its content."""

  def __init__(self):
    self._leaves, self._kinds, self.rows = None, None, 0

  def update(self, batch: Any) -> "RowDigest":
    leaves, treedef = jax.tree.flatten(batch)
    arrays = [np.ascontiguousarray(np.asarray(x)) for x in leaves]
    kinds = (str(treedef), [f"{a.dtype}{a.shape[1:]}" for a in arrays])
    if self._leaves is None:
      self._leaves, self._kinds = [hashlib.sha256() for _ in arrays], kinds
    elif kinds != self._kinds:
      raise ValueError(f"Rows of another structure or shape ({kinds}) than the first ({self._kinds}).")
    for h, a in zip(self._leaves, arrays):
      h.update(a.tobytes())
    self.rows += int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 0
    return self

  def hexdigest(self) -> str:
    """Returns the short digest of every row fed so far ("" before any)."""
    if self._leaves is None:
      return ""
    return digest(self._kinds, self.rows, [h.hexdigest() for h in self._leaves])


def rows_digest(batches: Any) -> str:
  """Returns the `RowDigest` of a batch, or of a list of batches in order."""
  d = RowDigest()
  for batch in (batches if isinstance(batches, list) else [batches]):
    d.update(batch)
  return d.hexdigest()


def atomic_write(path: str, write: Callable[[Any], None], *, binary: bool = False) -> str:
  """Calls write(file) on an in-memory file, then writes its content to `path` atomically
  (`paths.write_bytes`: a local path or gs://); returns `path`."""
  buffer = io.BytesIO() if binary else io.StringIO(newline="")
  write(buffer)
  data = buffer.getvalue()
  return paths.write_bytes(path, data if binary else data.encode())


def save_checked_npz(path: str, fingerprint: str, arrays: dict) -> str:
  """Writes `arrays` atomically as .npz with their checksum and `fingerprint` (what they belong to)."""
  record = dict(arrays, checksum=np.asarray(digest(arrays)), fingerprint=np.asarray(fingerprint))
  return atomic_write(path, lambda f: np.savez(f, **record), binary=True)


def load_checked_npz(path: str, fingerprint: str) -> Optional[dict]:
  """Returns the arrays of `save_checked_npz` when the file exists, is intact and belongs to
  `fingerprint`; else None (missing, damaged, or from other inputs)."""
  try:
    with np.load(io.BytesIO(paths.read_bytes(path))) as f:
      record = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError):
    return None
  checksum, owner = str(record.pop("checksum", "")), str(record.pop("fingerprint", ""))
  if owner != fingerprint or digest(record) != checksum:
    return None
  return record


def atomic_write_text(path: str, text: str) -> str:
  """Writes `text` to `path` atomically; returns `path`."""
  return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str, obj: Any) -> str:
  """Writes `obj` as indented JSON to `path` atomically; returns `path`."""
  return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def atomic_write_csv(path: str, rows: list) -> str:
  """Writes `rows` (lists, the first the header) as CSV to `path` atomically; returns `path`."""
  return atomic_write(path, lambda f: csv.writer(f).writerows(rows))


def read_json(path: str) -> Any:
  """Returns the JSON at `path`, or None when it is missing or unreadable."""
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return None


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, (set, tuple)):
    return list(x)
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")
