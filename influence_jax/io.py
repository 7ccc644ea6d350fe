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


_MIX1, _MIX2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9
_SEEDS = (0x243F6A88, 0x13198A2E)


def _fmix32(h, xp):
  """murmur3's 32-bit finaliser on uint32 arrays of numpy or jax.numpy `xp` (products wrap mod 2³²)."""
  h = h ^ (h >> xp.uint32(16))
  h = h * xp.uint32(_MIX1)
  h = h ^ (h >> xp.uint32(13))
  h = h * xp.uint32(_MIX2)
  return h ^ (h >> xp.uint32(16))


def _mixed_sums(words, index, xp):
  """Returns the uint32 sums (mod 2³²) over all positions of fmix(word ^ fmix(index·φ + seed)), one per seed:
  sums of terms fixed by each word's value and global position, so the same however the array is split."""
  return [xp.sum(_fmix32(words ^ _fmix32(index * xp.uint32(_GOLDEN) + xp.uint32(seed), xp), xp), dtype=xp.uint32)
          for seed in _SEEDS]


def _numpy_words(x: np.ndarray) -> np.ndarray:
  flat = np.asarray(x, order="C").reshape(-1)
  if x.dtype == bool or x.dtype.itemsize < 4:
    return flat.view(np.dtype(f"u{x.dtype.itemsize}")).astype(np.uint32).reshape(x.shape)
  return flat.view(np.uint32).reshape(x.shape + ((x.dtype.itemsize // 4,) if x.dtype.itemsize > 4 else ()))


def _flat_index(shape, xp):
  """uint32 position of every element of `shape` in C order (mod 2³²)."""
  if xp is np:
    return np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.uint64).astype(np.uint32).reshape(shape)
  index, stride = xp.zeros(shape, xp.uint32), 1
  for d in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(xp.uint32, shape, d) * xp.uint32(stride % 2**32)
    stride *= shape[d]
  return index


def _device_sums(x: jax.Array) -> list:
  import jax.numpy as jnp  # noqa: PLC0415

  if x.dtype == jnp.bool_ or x.dtype.itemsize < 4:
    words = jax.lax.bitcast_convert_type(x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x,
                                         jnp.dtype(f"u{x.dtype.itemsize}")).astype(jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return _mixed_sums(words, _flat_index(words.shape, jnp), jnp)


def array_checksums(leaves: list) -> list:
  """Returns a 64-bit checksum (hex) of each array's values (dtype and shape not included) that does not depend
  on its layout: a numpy array and a jax.Array split any way over the devices of one or several processes give
  the same one. The jax.Arrays are reduced where they lie, all in one program (each device its own shards; the
  sums come back replicated): no process reads a whole array."""
  on_device = [x for x in leaves if isinstance(x, jax.Array)]
  device_sums = iter(jax.device_get(_device_sums_of(on_device)) if on_device else ())
  return ["".join(f"{int(s):08x}" for s in (next(device_sums) if isinstance(x, jax.Array) else _host_sums(x)))
          for x in leaves]


def _host_sums(x: Any) -> list:
  words = _numpy_words(np.asarray(x))
  with np.errstate(over="ignore"):  # uint32 products wrap mod 2³², by design.
    return _mixed_sums(words, _flat_index(words.shape, np), np)


@jax.jit
def _device_sums_of(leaves: list) -> list:
  return [_device_sums(x) for x in leaves]


def params_digest(params: Any) -> str:
  """Returns a short stable hash of a parameter tree (structure, each leaf's dtype, shape and
  `array_checksums`): the same in every process and for any sharding of the leaves, never a host copy of one."""
  h = hashlib.sha256(str(jax.tree.structure(params)).encode())
  leaves = jax.tree.leaves(params)
  is_array = [isinstance(leaf, (np.ndarray, jax.Array)) or hasattr(leaf, "dtype") for leaf in leaves]
  checksums = iter(array_checksums([leaf for leaf, array in zip(leaves, is_array) if array]))
  for leaf, array in zip(leaves, is_array):
    if array:
      h.update(f"{np.dtype(leaf.dtype)}{tuple(leaf.shape)}{next(checksums)}".encode())
    else:
      h.update(json.dumps(leaf, sort_keys=True, default=str).encode())
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
