"""Sources read in batches: ArrayRecord shards (grain), subsets of a source, and the one-by-one fallback
all give the examples that indexing one at a time gives."""

import numpy as np

from influence_jax import sources
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
