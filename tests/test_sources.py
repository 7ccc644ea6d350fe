"""Sources read in batches: ArrayRecord shards (grain), subsets of a source, and the one-by-one fallback
all give the examples that indexing one at a time gives."""

import os

import numpy as np

from influence_jax import io, sources
from influence_jax.examples import synthetic


class _OneByOne:
  """A source with only len() and [i] (no batched read)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


def _assert_rows(batch, source, rows):
  for j, r in enumerate(rows):
    one = source[int(r)]
    np.testing.assert_array_equal(batch["x"][j], one["x"])
    assert batch["y"][j] == one["y"]


def test_npy_records_equal_array_records(tmp_path):
  npy = synthetic.NpyRecordSource(synthetic.write_npy_records(str(tmp_path), 300, seed=4))
  ar = synthetic.ArrayRecordSource(synthetic.write_array_records(str(tmp_path), 300, num_shards=1, seed=4))
  rows = np.array([0, 1, 2, 17, 298, 299])  # Runs of consecutive rows and single ones.
  _assert_rows(npy.read_batch(rows), ar, rows)
  assert len(npy) == 300 and sources.source_fingerprint(npy) == sources.source_fingerprint(npy)


def test_array_records_subsets_and_fallback_read_the_same_examples(tmp_path):
  paths = synthetic.write_array_records(str(tmp_path), 700, num_shards=2, block=256)
  src = synthetic.ArrayRecordSource(paths)
  assert len(src) == 700
  rows = np.array([0, 5, 255, 256, 257, 349, 350, 699])  # Across chunks of 256 and the two shards.
  _assert_rows(src.read_batch(rows), src, rows)
  _assert_rows(sources.read_rows(_OneByOne(src), rows, "train"), src, rows)
  sub = sources.SubsetSource(src, [3, 400, 699, 10])
  batch = sub.read_batch([1, 3])
  _assert_rows(batch, src, [400, 10])
  _assert_rows(sources.read_rows(sub, np.array([0, 2]), "train"), src, [3, 699])


def test_row_digest_sees_every_byte_and_not_the_batching():
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(10, 3)).astype(np.float32), "y": np.arange(10, dtype=np.int32)}
  whole = io.rows_digest(data)
  split = io.rows_digest([{k: v[:3] for k, v in data.items()}, {k: v[3:] for k, v in data.items()}])
  assert whole == split
  edited = {"x": data["x"].copy(), "y": data["y"]}
  edited["x"][7, 1] = np.nextafter(edited["x"][7, 1], np.float32(1))  # One bit of one example.
  assert io.rows_digest(edited) != whole
  assert io.rows_digest({"x": data["x"][:9], "y": data["y"][:9]}) != whole  # A row fewer.
  assert io.rows_digest({"x": data["x"].astype(np.float64), "y": data["y"]}) != whole  # Same values, other dtype.


def test_identity_is_what_a_source_offers(tmp_path):
  npy = synthetic.NpyRecordSource(synthetic.write_npy_records(str(tmp_path), 50, seed=1))
  arrays = sources.ArraySource({"x": np.zeros((50, 2)), "y": np.zeros(50)})
  assert sources.offers_identity(npy) and sources.offers_identity(arrays)
  assert sources.offers_identity(sources.SubsetSource(npy, [1, 2]))
  assert not sources.offers_identity(_OneByOne(npy))
  before = sources.source_fingerprint(npy)
  os.utime(npy.path, ns=(0, os.stat(npy.path).st_mtime_ns + 10**9))  # The file touched: another identity.
  assert sources.source_fingerprint(npy) != before
  other = sources.ArraySource({"x": np.zeros((50, 2)), "y": np.eye(50)[20]})  # Example 20, not sampled, edited.
  assert sources.source_fingerprint(other) != sources.source_fingerprint(arrays)
  plain, plain_other = _OneByOne(arrays), _OneByOne(other)
  assert sources.source_fingerprint(plain) == sources.source_fingerprint(plain_other)  # What it cannot see.
