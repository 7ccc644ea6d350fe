"""The projection store: chunks round-trip, resume markers, and damage is an error naming the directory."""

import os

import numpy as np
import pytest

from influence_jax import store as store_lib
from influence_jax.jobs.input import RowRanges


def make(tmp_path, num_rows=10, chunk_rows=4, sketch_dim=3):
  meta = store_lib.StoreMeta(num_rows, 2, sketch_dim, chunk_rows, "fp", {"damping": 0.1})
  return store_lib.create(str(tmp_path / "store"), meta), meta


def chunk_rows(meta, c):
  lo, hi = meta.chunk_bounds(c)
  r = np.arange(lo, hi, dtype=np.float32)
  out = {"projections": np.stack([r, -r], 1), "sq_norms": r * r}
  if meta.sketch_dim:
    out["sketch"] = np.repeat(r[:, None], meta.sketch_dim, 1)
  return out


def test_chunks_round_trip_and_the_store_is_complete_only_when_all_are_done(tmp_path):
  store, meta = make(tmp_path)
  assert meta.num_chunks == 3 and store.missing_chunks() == [0, 1, 2]
  for c in (2, 0):
    store.write_chunk(c, chunk_rows(meta, c))
  with pytest.raises(store_lib.StoreError, match="incomplete: 1 of 3"):
    store_lib.open_store(store.directory)
  store.write_chunk(1, chunk_rows(meta, 1))
  back = store_lib.open_store(store.directory, "fp")
  got = back.read(0, 10)
  np.testing.assert_array_equal(got["projections"][:, 0], np.arange(10))
  np.testing.assert_array_equal(got["sketch"][7], [7, 7, 7])
  assert [lo for lo, _ in back.chunks(4)] == [0, 4, 8]


def test_other_inputs_are_refused(tmp_path):
  store, meta = make(tmp_path)
  with pytest.raises(store_lib.StoreError, match="other inputs"):
    store_lib.create(store.directory, store_lib.StoreMeta(10, 2, 3, 4, "other", {}))
  with pytest.raises(store_lib.StoreError, match="another eigenspace"):
    store_lib.open_store(store.directory, "other", require_complete=False)


def test_a_flipped_byte_and_a_missing_chunk_are_named_errors(tmp_path):
  store, meta = make(tmp_path)
  for c in range(3):
    store.write_chunk(c, chunk_rows(meta, c))
  chunk = os.path.join(store.directory, "projections", "c", "1", "0")
  data = bytearray(open(chunk, "rb").read())
  data[3] ^= 1
  open(chunk, "wb").write(bytes(data))
  with pytest.raises(store_lib.StoreError, match=r"damaged: chunk\(s\) \[1\] \(rows 4–8\).*project.py"):
    store_lib.open_store(store.directory).read(0, 10)
  # The damaged chunk is marked unfinished: the store is incomplete until it is projected again.
  with pytest.raises(store_lib.StoreError, match="incomplete: 1 of 3"):
    store_lib.open_store(store.directory)
  store.write_chunk(1, chunk_rows(meta, 1))
  os.remove(os.path.join(store.directory, "sq_norms", "c", "2"))
  with pytest.raises(store_lib.StoreError, match=r"damaged: chunk\(s\) \[2\]"):
    store_lib.open_store(store.directory).read(8, 10)
  assert store_lib.open_store(store.directory, require_complete=False).missing_chunks() == [2]
  np.testing.assert_array_equal(store_lib.open_store(store.directory, require_complete=False).read(0, 8)["sq_norms"],
                                np.arange(8) ** 2)


def test_chunk_owners_cover_every_chunk_once():
  meta = store_lib.StoreMeta(1000, 2, 0, 64, "fp")
  owned = [list(store_lib.chunk_owner(meta, p, 3)) for p in range(3)]
  assert sum(owned, []) == list(range(meta.num_chunks))


def test_row_ranges_slice_like_the_concatenated_rows():
  ranges = [(0, 5), (10, 12), (20, 27)]
  rows = RowRanges(ranges)
  full = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
  assert len(rows) == full.size
  for a, b in [(0, 3), (3, 9), (6, 14), (0, 14), (13, 20)]:
    np.testing.assert_array_equal(rows[a:b], full[a:b])
