"""Streaming top-k (device merges of blocks) against a full sort, with ties and fewer rows than k."""

import numpy as np
import pytest

import influence_jax as ij
from influence_jax import ranking


def full_sort(scores, k):
  cols = np.arange(scores.shape[1])
  pro = np.stack([np.lexsort((cols, -row))[:k] for row in scores])
  opp = np.stack([np.lexsort((cols, row))[:k] for row in scores])
  return pro, opp


@pytest.mark.parametrize("num_rows, block, k", [(1000, 128, 7), (300, 300, 5), (4, 3, 10), (257, 16, 16),
                                                 (5000, 1024, 7)])
def test_streaming_top_k_equals_a_full_sort(num_rows, block, k):
  rng = np.random.default_rng(num_rows)
  queries = rng.integers(-2, 3, (6, 4)).astype(np.float32)  # Small integers: many exact ties.
  rows = rng.integers(-2, 3, (num_rows, 4)).astype(np.float32)
  scores = queries @ rows.T
  blocks = [(lo, rows[lo:lo + block]) for lo in range(0, num_rows, block)]
  got = ij.stream_top_k(queries, blocks, k)
  pro, opp = full_sort(scores, k)
  kk = min(k, num_rows)
  np.testing.assert_array_equal(got.proponents[:, :kk], pro)
  np.testing.assert_array_equal(got.opponents[:, :kk], opp)
  np.testing.assert_array_equal(got.proponent_scores[:, :kk], np.take_along_axis(scores, pro, 1))
  np.testing.assert_array_equal(got.opponent_scores[:, :kk], np.take_along_axis(scores, opp, 1))
  assert (got.proponents[:, kk:] == -1).all() and np.isneginf(got.proponent_scores[:, kk:]).all()


@pytest.mark.parametrize("n, k, num_valid", [(2048, 1, 2048), (2048, 5, 2048), (2048, 16, 2048), (2048, 5, 1000),
                                              (2048, 5, 3), (2000, 5, 2000), (256, 5, 256)])
def test_block_extremes_equal_a_full_sort_with_ties(n, k, num_valid):
  """The grouped search (n a multiple of GROUP, k small) and the plain top-k (otherwise) give the sort's order."""
  rng = np.random.default_rng(n + k)
  scores = rng.integers(-3, 4, (5, n)).astype(np.float32)  # Ties inside and across groups.
  scores[0, ::97] = 9.0  # One row whose maxima tie in many groups.
  pro_s, pro_i, opp_s, opp_i = (np.asarray(x) for x in ranking.block_extremes(scores, k, num_valid))
  valid = scores[:, :num_valid]
  kk = min(k, num_valid)
  pro, opp = full_sort(valid, kk)
  np.testing.assert_array_equal(pro_i[:, :kk], pro)
  np.testing.assert_array_equal(opp_i[:, :kk], opp)
  np.testing.assert_array_equal(pro_s[:, :kk], np.take_along_axis(valid, pro, 1))
  np.testing.assert_array_equal(-opp_s[:, :kk], np.take_along_axis(valid, opp, 1))
  assert np.isneginf(pro_s[:, kk:]).all() and np.isneginf(opp_s[:, kk:]).all()


def test_block_extremes_break_ties_by_column_across_groups():
  """A tie at the k-th place between a later group with a larger maximum and an earlier group."""
  g = ranking.GROUP
  row = np.full(64 * g, -5.0, np.float32)
  row[5 * g], row[5 * g + 1] = 9.0, 1.0  # Group 5: the largest maximum, and a 1.
  row[2 * g], row[2 * g + 1] = 3.0, 1.0  # Group 2: the next maximum, and a 1 at a lower column.
  scores = np.stack([row, -row])
  pro_s, pro_i, opp_s, opp_i = (np.asarray(x) for x in ranking.block_extremes(scores, 3))
  np.testing.assert_array_equal(pro_i[0], [5 * g, 2 * g, 2 * g + 1])
  np.testing.assert_array_equal(opp_i[1], [5 * g, 2 * g, 2 * g + 1])
  np.testing.assert_array_equal(pro_s[0], [9, 3, 1])


def test_padded_blocks_ignore_their_padding():
  rng = np.random.default_rng(0)
  queries, rows = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(10, 5)).astype(np.float32)
  padded = np.concatenate([rows, np.full((6, 5), 100.0, np.float32)])  # Padding would win if it counted.
  got = ranking.to_host(ranking.merge_rows(ranking.empty_top_k(3, 4), queries, padded, 0, num_valid=10))
  want = ij.top_k(queries @ rows.T, 4)
  np.testing.assert_array_equal(got.proponents, want.proponents)
  np.testing.assert_array_equal(got.opponents, want.opponents)


def test_tiled_block_with_padding_in_a_later_tile_equals_a_full_sort():
  rng = np.random.default_rng(1)
  block = 2 * ranking.TILE_ROWS + 1024  # Four tiles of 4,352 rows.
  assert ranking.tile_rows(block) < block and block % ranking.tile_rows(block) == 0
  queries = rng.integers(-2, 3, (3, 4)).astype(np.float32)  # Many exact ties across tile boundaries.
  rows = rng.integers(-2, 3, (block, 4)).astype(np.float32)
  num_valid = block - 1500
  rows[num_valid:] = 100.0  # Padding would win if it counted.
  got = ranking.to_host(ranking.merge_rows(ranking.empty_top_k(3, 9), queries, rows, 40, num_valid=num_valid))
  pro, opp = full_sort(queries @ rows[:num_valid].T, 9)
  np.testing.assert_array_equal(got.proponents, pro + 40)
  np.testing.assert_array_equal(got.opponents, opp + 40)


def test_tile_rows_divides_the_block_or_takes_it_whole():
  assert ranking.tile_rows(65536) == ranking.TILE_ROWS
  assert ranking.tile_rows(100) == 100
  assert ranking.tile_rows(3 * 4099) == 4099
  assert ranking.tile_rows(2 * 8209) == 2 * 8209  # 8,209 is prime: only tiles of 2 rows divide it.


def test_running_largest_equals_a_sort_with_ties():
  values = np.array([3, 1, 3, 2, 5, 3, 0, 5], np.float64)
  running = ranking.empty_largest(5)
  for lo in range(0, 8, 3):
    running = ranking.merge_largest(running, values[lo:lo + 3], lo)
  np.testing.assert_array_equal(running.indices, np.lexsort((np.arange(8), -values))[:5])
