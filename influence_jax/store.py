"""The projection store: every training example projected once, kept on disk, read in chunks.

A store is a directory (local or gs://: `paths`) of row-aligned on-disk arrays (tensorstore's zarr v3 driver, one file per
chunk of rows, each with a crc32c checksum that tensorstore verifies on every read):

  meta.json        what the rows are: num_rows, k, sketch_dim, chunk_rows, fingerprint, attrs, residual_rank,
                   store_dtype (of projections, residual and sketch: float32, bfloat16 or float16; read as float32)
  projections/     (N, k)  G(z) = U ∇ℓ(z)
  residual/        (N, r)  V ∇ℓ(z) on a residual basis V (`residual_basis`; only when residual_rank > 0)
  sq_norms/        (N,)    ‖∇ℓ(z)‖²
  sketch/          (N, m)  R(I − WᵀW)∇ℓ(z), W = [U; V], the sketched remainder (only when sketch_dim > 0)
  done/            one file per finished chunk of rows, holding the digest of the examples it was projected
                   from (`io.RowDigest`; "" in stores written before digests)
  source.json      the training set's identity when the rows were written (`record_source`)
  residual_basis/     orbax: V (r, P) in the flat layout, its fingerprint and checksum (the project job)

Rows are written chunk by chunk; a chunk counts only once its `done/` marker exists, so a writer
killed at any moment loses at most the chunks it had not finished, and a reader never sees a
half-written chunk. Nothing in a store depends on the damping δ. Missing chunk files are an error on read (never zeros), as is a checksum
mismatch. Several processes write disjoint chunk ranges of one store (`chunk_owner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any, Iterator, Optional

import numpy as np
import tensorstore as ts

from influence_jax import paths

FORMAT = 2  # 2: no self_influence array (the damping is applied when scoring).
ARRAYS = ("projections", "sq_norms", "residual", "sketch")
BASIS_FILE = "residual_basis"
SOURCE_FILE = "source.json"
STORE_DTYPES = ("float32", "bfloat16", "float16")


class StoreError(ValueError):
  """A store that cannot be used as asked: from another eigenspace, incomplete, or corrupted."""


@dataclasses.dataclass(frozen=True)
class StoreMeta:
  """What a store's rows are. `fingerprint` names what they were computed from (eigenspace, data)."""

  num_rows: int
  k: int
  sketch_dim: int
  chunk_rows: int
  fingerprint: str
  attrs: dict = dataclasses.field(default_factory=dict)
  residual_rank: int = 0  # Stores written before the residual basis have none.
  store_dtype: str = "float32"  # Of projections, residual and sketch (`STORE_DTYPES`); sq_norms stay float32.

  def __post_init__(self):
    if self.store_dtype not in STORE_DTYPES:
      raise StoreError(f"store_dtype {self.store_dtype!r} is not one of {', '.join(STORE_DTYPES)}.")

  def array_dtype(self, name: str) -> str:
    """Returns the dtype array `name` is stored in: `store_dtype`, except sq_norms (float32: the tail term
    ‖∇ℓ(z)‖² − ‖G(z)‖² is a difference that a 16-bit ‖∇ℓ(z)‖² would swamp)."""
    return "float32" if name == "sq_norms" else self.store_dtype

  @property
  def num_chunks(self) -> int:
    return -(-self.num_rows // self.chunk_rows)

  def chunk_bounds(self, chunk: int) -> tuple[int, int]:
    """Returns the rows [lo, hi) of `chunk`."""
    lo = chunk * self.chunk_rows
    return lo, min(lo + self.chunk_rows, self.num_rows)

  def shapes(self) -> dict:
    out = {"projections": (self.num_rows, self.k), "sq_norms": (self.num_rows,)}
    if self.residual_rank:
      out["residual"] = (self.num_rows, self.residual_rank)
    if self.sketch_dim:
      out["sketch"] = (self.num_rows, self.sketch_dim)
    return out


def chunk_owner(meta: StoreMeta, process_index: int, process_count: int) -> range:
  """Returns the chunks process `process_index` of `process_count` writes: a contiguous near-equal share."""
  bounds = np.linspace(0, meta.num_chunks, process_count + 1).round().astype(int)
  return range(int(bounds[process_index]), int(bounds[process_index + 1]))


def _spec(directory: str, name: str, shape: Optional[tuple] = None, chunk_rows: int = 0,
          dtype: str = "float32") -> dict:
  spec = {"driver": "zarr3", "kvstore": paths.kvstore_spec(paths.join(directory, name)),
          "fill_missing_data_reads": False}
  if shape is not None:
    spec["metadata"] = {
        "shape": list(shape), "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, *shape[1:]]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    }
  return spec


def _read_meta(directory: str) -> Optional[StoreMeta]:
  path = paths.join(directory, "meta.json")
  try:
    text = paths.read_text(path)
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
    if record.pop("format", None) != FORMAT:
      raise ValueError("unknown format")
    return StoreMeta(**record)
  except (ValueError, TypeError) as e:
    raise StoreError(f"{path} is not a projection store's metadata ({e}); delete {directory} and run the "
                     "projection job again to recompute it.") from e


def _stored(rows: Any, dtype: np.dtype, what: str) -> np.ndarray:
  """Returns `rows` cast to the store's `dtype`; raises StoreError when a finite value overflows it."""
  value = np.asarray(rows)
  with np.errstate(over="ignore"):
    cast = value.astype(dtype)
  if not np.all(np.isfinite(cast.astype(np.float32))) and np.all(np.isfinite(value)):
    raise StoreError(f"{what}: values up to {np.abs(value).max():.3g} overflow {dtype} (store_dtype); store "
                     "them as float32 or bfloat16.")
  return cast


def as_stored(rows: Any, store_dtype: str) -> np.ndarray:
  """Returns `rows` as a store of `store_dtype` gives them back: rounded to it, read as float32."""
  return _stored(np.asarray(rows, np.float32), np.dtype(_numpy_dtype(store_dtype)), "rows").astype(np.float32)


def _numpy_dtype(store_dtype: str):
  import ml_dtypes  # noqa: PLC0415 (bfloat16's numpy dtype)

  return ml_dtypes.bfloat16 if store_dtype == "bfloat16" else np.dtype(store_dtype)


class ProjectionStore:
  """An open store: `write_chunk`, `read`, `chunks`; see the module docstring for the layout."""

  def __init__(self, directory: str, meta: StoreMeta, arrays: dict):
    self.directory = directory
    self.meta = meta
    self._arrays = arrays

  # ------------------------------------------------------------------ progress

  def _marker(self, chunk: int) -> str:
    return paths.join(self.directory, "done", f"chunk_{chunk:08d}")

  def is_done(self, chunk: int) -> bool:
    return paths.exists(self._marker(chunk))

  def done_chunks(self) -> list[int]:
    """Returns the finished chunks, ascending."""
    names = paths.listdir(paths.join(self.directory, "done"))
    return sorted(int(n[len("chunk_"):]) for n in names if n.startswith("chunk_") and n[len("chunk_"):].isdigit())

  def chunk_digest(self, chunk: int) -> str:
    """Returns the digest of the examples chunk `chunk` was projected from ("" when unknown or not done)."""
    try:
      return paths.read_text(self._marker(chunk)).strip()
    except OSError:
      return ""

  def unmark(self, chunk: int) -> None:
    """Marks `chunk` unfinished (it is projected again by the next projection job)."""
    with contextlib.suppress(OSError):
      paths.remove(self._marker(chunk))

  def recorded_source(self) -> Optional[str]:
    """Returns the training set's identity recorded with the rows (`record_source`), or None."""
    try:
      return json.loads(paths.read_text(paths.join(self.directory, SOURCE_FILE)))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
      return None

  def record_source(self, identity: str) -> None:
    """Records `identity` (`sources.source_fingerprint` of the training set) as the one the rows are from."""
    paths.write_bytes(paths.join(self.directory, SOURCE_FILE), json.dumps({"identity": identity}).encode())

  def missing_chunks(self) -> list[int]:
    done = set(self.done_chunks())
    return [c for c in range(self.meta.num_chunks) if c not in done]

  # ------------------------------------------------------------------ writing

  def write_chunk(self, chunk: int, rows: dict, digest: str = "") -> None:
    """Writes all rows of `chunk` ({array name: (rows, ...)}), then marks it done with `digest` (the
    digest of the examples they were projected from), atomically."""
    lo, hi = self.meta.chunk_bounds(chunk)
    futures = []
    for name, array in self._arrays.items():
      value = _stored(rows[name], array.dtype.numpy_dtype, f"chunk {chunk} of {name}")
      if value.shape != (hi - lo,) + array.shape[1:]:
        raise ValueError(f"Chunk {chunk} of {name}: got shape {value.shape}, expected {(hi - lo,) + array.shape[1:]}.")
      futures.append(array[lo:hi].write(value))
    for f in futures:
      f.result()
    paths.write_bytes(self._marker(chunk), digest.encode())

  # ------------------------------------------------------------------ reading

  def read(self, lo: int, hi: int, names: Optional[tuple] = None) -> dict:
    """Returns {array name: rows [lo, hi)} as float32 numpy arrays; raises StoreError on damage."""
    names = tuple(self._arrays) if names is None else names
    try:
      return self._read(lo, hi, names)
    except ValueError as e:
      damaged = self._unmark_damaged(lo, hi, names)
      rows = ", ".join("{}–{}".format(*self.meta.chunk_bounds(c)) for c in damaged)
      raise StoreError(
          f"The projection store {self.directory} is damaged: chunk(s) {damaged} (rows {rows}) fail their "
          f"checksum or are missing ({str(e)[:200]}). They are marked unfinished: run scripts/project.py "
          "again to re-project them, then score again.") from e

  def _read(self, lo: int, hi: int, names: tuple) -> dict:
    futures = {n: self._arrays[n][lo:hi].read() for n in names}
    return {n: np.asarray(f.result(), np.float32) for n, f in futures.items()}

  def _unmark_damaged(self, lo: int, hi: int, names: tuple) -> list[int]:
    """Returns the chunks in rows [lo, hi) that cannot be read, their done markers removed."""
    first, last = lo // self.meta.chunk_rows, (hi - 1) // self.meta.chunk_rows
    damaged = []
    for chunk in range(first, last + 1):
      try:
        self._read(*self.meta.chunk_bounds(chunk), names)
      except ValueError:
        damaged.append(chunk)
        self.unmark(chunk)
    return damaged

  def chunks(self, rows_per_read: Optional[int] = None, names: Optional[tuple] = None,
             start: int = 0) -> Iterator[tuple[int, dict]]:
    """Yields (lo, rows) blocks of `rows_per_read` rows (a multiple of chunk_rows) from row `start` on."""
    step = rows_per_read or self.meta.chunk_rows
    for lo in range(start, self.meta.num_rows, step):
      yield lo, self.read(lo, min(lo + step, self.meta.num_rows), names)


def create(directory: str, meta: StoreMeta, *, writer: bool = True) -> ProjectionStore:
  """Returns the store at `directory` for writing: created empty, or reopened when it holds the same meta.

  A store made from other inputs (another fingerprint or shape) is refused with StoreError: nothing
  is mixed. With several processes, only `writer` (process 0) creates; the others must open after it.
  """
  found = _read_meta(directory)
  if found is not None and found != meta:
    raise StoreError(
        f"{directory} holds projections made from other inputs (fingerprint {found.fingerprint}, "
        f"{found.num_rows}×{found.k}; this job's: {meta.fingerprint}, {meta.num_rows}×{meta.k}). Use another "
        "--workdir, or delete that directory to recompute it.")
  if found is None and writer:
    paths.makedirs(paths.join(directory, "done"))
    for name, shape in meta.shapes().items():
      ts.open(_spec(directory, name, shape, meta.chunk_rows, meta.array_dtype(name)), create=True,
              delete_existing=True).result()
    record = dict(dataclasses.asdict(meta), format=FORMAT)
    paths.write_bytes(paths.join(directory, "meta.json"),  # The store exists once meta.json does.
                      json.dumps(record, indent=1).encode())
  return open_store(directory, meta.fingerprint, require_complete=False)


def open_store(directory: str, fingerprint: Optional[str] = None, *,
               require_complete: bool = True) -> ProjectionStore:
  """Returns the store at `directory`; checks its fingerprint (when given) and that every chunk is done.

  Raises StoreError naming the directory when it is not a store, was made from other inputs, or
  (with `require_complete`) has unfinished chunks.
  """
  meta = _read_meta(directory)
  if meta is None:
    raise StoreError(f"No projection store in {directory}: run the projection job (scripts/project.py) first.")
  if fingerprint is not None and meta.fingerprint != fingerprint:
    raise StoreError(
        f"The projection store {directory} was made from another eigenspace or training set (fingerprint "
        f"{meta.fingerprint}, expected {fingerprint}). Run scripts/project.py with this config to rebuild "
        "it, or delete that directory.")
  try:
    arrays = {name: ts.open(_spec(directory, name), read=True, write=True).result()
              for name in meta.shapes()}
  except ValueError as e:
    raise StoreError(f"The projection store {directory} is damaged ({e}). Delete {directory} and run the "
                     "projection job again to recompute it.") from e
  store = ProjectionStore(directory, meta, arrays)
  paths.makedirs(paths.join(directory, "done"))
  if require_complete:
    missing = store.missing_chunks()
    if missing:
      raise StoreError(f"The projection store {directory} is incomplete: {len(missing)} of {meta.num_chunks} "
                       f"chunks are not finished (first: {missing[0]}). Run scripts/project.py to finish it.")
  return store


def describe(store: ProjectionStore) -> dict[str, Any]:
  """Returns a JSON-able summary of `store` (rows, k, sketch size, chunks done)."""
  m = store.meta
  return {"directory": store.directory, "num_rows": m.num_rows, "k": m.k, "residual_rank": m.residual_rank,
          "sketch_dim": m.sketch_dim, "store_dtype": m.store_dtype,
          "chunk_rows": m.chunk_rows, "chunks_done": len(store.done_chunks()), "num_chunks": m.num_chunks}
