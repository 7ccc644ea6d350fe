"""Streaming top-k (device merges of blocks) against a full sort, with ties and fewer rows than k."""

import jax.numpy as jnp
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
  got = ij.stream_extremes(queries, blocks, k)
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
  got = ranking.to_host(ranking.merge_rows(ranking.empty_extremes(3, 4), queries, padded, 0, num_valid=10))
  want = ij.extremes(queries @ rows.T, 4)
  np.testing.assert_array_equal(got.proponents, want.proponents)
  np.testing.assert_array_equal(got.opponents, want.opponents)


def test_tiled_block_with_padding_in_a_later_tile_equals_a_full_sort():
  rng = np.random.default_rng(1)
  block = 2 * ranking.TILE_ROWS + 1024  # Tiles of fewer rows than TILE_ROWS.
  assert ranking.tile_rows(block) < block and block % ranking.tile_rows(block) == 0
  queries = rng.integers(-2, 3, (3, 4)).astype(np.float32)  # Many exact ties across tile boundaries.
  rows = rng.integers(-2, 3, (block, 4)).astype(np.float32)
  num_valid = block - 1500
  rows[num_valid:] = 100.0  # Padding would win if it counted.
  got = ranking.to_host(ranking.merge_rows(ranking.empty_extremes(3, 9), queries, rows, 40, num_valid=num_valid))
  pro, opp = full_sort(queries @ rows[:num_valid].T, 9)
  np.testing.assert_array_equal(got.proponents, pro + 40)
  np.testing.assert_array_equal(got.opponents, opp + 40)


def _prime_above(n):
  return next(p for p in range(n + 1, 2 * n + 2) if all(p % d for d in range(2, int(p**0.5) + 1)))


def test_tile_rows_divides_the_block_or_takes_it_whole():
  assert ranking.tile_rows(65536) == ranking.TILE_ROWS
  assert ranking.tile_rows(100) == 100
  p = _prime_above(ranking.TILE_ROWS // 2)
  assert ranking.tile_rows(3 * p) == p
  q = _prime_above(ranking.TILE_ROWS)
  assert ranking.tile_rows(2 * q) == 2 * q  # Only tiles of 2 rows divide it.


def test_running_largest_equals_a_sort_with_ties():
  values = np.array([3, 1, 3, 2, 5, 3, 0, 5], np.float64)
  running = ranking.empty_largest(5)
  for lo in range(0, 8, 3):
    running = ranking.merge_largest(running, values[lo:lo + 3], lo)
  np.testing.assert_array_equal(running.indices, np.lexsort((np.arange(8), -values))[:5])


def _exact_merge(run_s, run_i, scores, offset, k):
  """The k best of a running list and `scores` (columns offset..), ties to the lower index."""
  out_s, out_i = [], []
  for rs, ri, row in zip(run_s, run_i, scores):
    vals = np.concatenate([rs, row])
    idx = np.concatenate([ri, offset + np.arange(row.size)])
    order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -vals))[:k]
    out_s.append(vals[order])
    out_i.append(idx[order])
  return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize("num_beaten, crowded", [(0, False), (5, False), (40, False), (200, False), (300, False),
                                                 (5, True)])
def test_merging_only_the_beaten_queries_equals_an_exact_merge(num_beaten, crowded):
  """Every branch of `_merge_where_beaten` (no query beaten; few of them, gathered into each row
  bucket; all; a query beaten in more than FEW_GROUPS groups) against an exact merge, with ties."""
  rng = np.random.default_rng(num_beaten + crowded)
  t, n, k, offset = 300, 64 * ranking.GROUP, 6, 10_000
  scores = rng.integers(-20, 21, (t, n)).astype(np.float64)
  run_s = -np.sort(-rng.integers(30, 60, (t, k)).astype(np.float64), axis=1)
  run_s[:, -1] = 30.0  # The k-th: a tie for the new scores set to it below.
  run_i = np.sort(rng.choice(offset, (t, k)), axis=1)
  beaten = rng.choice(t, num_beaten, replace=False)
  for q in beaten:  # One to three scores past the k-th (some equal to each other), and ties at it.
    cols = rng.choice(n, rng.integers(1, 4), replace=False)
    scores[q, cols] = rng.choice([31.0, 45.0, 70.0], cols.size)
    scores[q, rng.integers(n)] = 30.0
  if crowded:  # Beaten in one group more than FEW_GROUPS, the last with the largest score.
    groups = np.arange(ranking.FEW_GROUPS + 1) * 3
    scores[beaten[0], groups * ranking.GROUP] = 50.0
    scores[beaten[0], groups[-1] * ranking.GROUP + 5] = 90.0
  scores[[q for q in range(t) if q not in beaten][:3], 0] = 30.0  # Ties at the k-th that must lose.
  want_s, want_i = _exact_merge(run_s, run_i, scores, offset, k)
  running = ranking.Extremes(*(jnp.asarray(x) for x in (run_i, run_s, run_i, -run_s)))
  no_floor = (jnp.full((t,), -jnp.inf),) * 2
  for sign in (1, -1):  # The opponents' side: the same merge of the negated scores.
    grouped = jnp.asarray(sign * scores.reshape(t, n // ranking.GROUP, ranking.GROUP))
    got = ranking._merge_where_beaten(running, grouped, offset, n, no_floor)
    got_i, got_s = (got.proponents, got.proponent_scores) if sign == 1 else (got.opponents, -got.opponent_scores)
    np.testing.assert_array_equal(np.asarray(got_i), want_i)
    np.testing.assert_array_equal(np.asarray(got_s), want_s)


def test_block_floors_are_at_most_the_kth_scores():
  rng = np.random.default_rng(3)
  queries = rng.normal(size=(7, 12)).astype(np.float32)
  rows = rng.normal(size=(4 * 1280, 12)).astype(np.float32)
  for num_valid, k in ((rows.shape[0], 10), (2000, 10), (rows.shape[0], 1), (1300, 3)):
    tiles = jnp.asarray(rows.reshape(4, 1280, 12))
    hi, lo = (np.asarray(x) for x in ranking._block_floors(jnp.asarray(queries), tiles, k, num_valid))
    scores = queries.astype(np.float64) @ rows[:num_valid].T.astype(np.float64)
    kth_hi = -np.sort(-scores, axis=1)[:, k - 1]
    kth_lo = -np.sort(scores, axis=1)[:, k - 1]
    assert (hi <= kth_hi).all() and (lo <= kth_lo).all()
    assert (hi > kth_hi - 1.0).all()  # And near it: a floor far below would filter nothing.


@pytest.mark.parametrize("k", [1, 5, 20])
def test_long_stream_with_ties_equals_a_full_sort(k):
  """Enough rows per query that the k-th scores rise and later tiles merge only the beaten queries,
  with exact ties throughout (integer scores) and a padded last block."""
  rng = np.random.default_rng(k)
  queries = rng.integers(-3, 4, (40, 3)).astype(np.float32)
  rows = rng.integers(-100, 101, (45_000, 3)).astype(np.float32)
  blocks = [(lo, rows[lo:lo + 8192]) for lo in range(0, rows.shape[0], 8192)]
  got = ij.stream_extremes(queries, blocks, k)
  scores = queries @ rows.T
  pro, opp = full_sort(scores, k)
  np.testing.assert_array_equal(got.proponents, pro)
  np.testing.assert_array_equal(got.opponents, opp)
  np.testing.assert_array_equal(got.proponent_scores, np.take_along_axis(scores, pro, 1))


def test_device_block_pads_with_zero_rows():
  rows = np.arange(12, dtype=np.float32).reshape(4, 3)
  block = ranking.device_block(rows, 6)
  np.testing.assert_array_equal(np.asarray(block), np.concatenate([rows, np.zeros((2, 3), np.float32)]))
  assert block.dtype == np.float32
  with pytest.raises(ValueError, match="5 rows does not fit in 4 rows"):
    ranking.device_block(np.zeros((5, 3), np.float32), 4)


def test_negative_zero_ties_positive_zero():
  """−0.0 and +0.0 are equal scores: the lower index wins (lax.top_k alone would rank +0.0 first)."""
  rows = -np.ones((4096, 1), np.float32)
  rows[0], rows[2048] = -0.0, 0.0
  for k in (1, 2):
    got = ij.stream_extremes(np.ones((1, 1), np.float32), [(0, rows)], k)
    np.testing.assert_array_equal(got.proponents[0], [0, 2048][:k])


def test_non_finite_numbers_show_in_the_scores():
  rng = np.random.default_rng(4)
  queries, rows = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(8192, 4)).astype(np.float32)
  queries[2, 1] = np.inf
  got = ij.stream_extremes(queries, [(0, rows[:4096]), (4096, rows[4096:])], 5)
  assert np.isnan(got.proponent_scores[2]).all() and np.isnan(got.opponent_scores[2]).all()
  assert np.isfinite(got.proponent_scores[:2]).all()
  rows[5000, 2] = np.nan
  padded = np.concatenate([rows[4096:], np.full((10, 4), np.nan, np.float32)])  # Padding: not a row.
  got = ij.stream_extremes(queries[:2], [(0, rows[:4096])], 5)
  assert np.isfinite(got.proponent_scores).all()
  running = ranking.merge_rows(ranking.empty_extremes(2, 5), queries[:2], rows[:4096], 0)
  got = ranking.to_host(ranking.merge_rows(running, queries[:2], padded, 4096, num_valid=4096))
  assert np.isnan(got.proponent_scores).all() and np.isnan(got.opponent_scores).all()
  clean = rows[4096:].copy()
  clean[5000 - 4096] = 0.0
  got = ranking.to_host(ranking.merge_rows(running, queries[:2], np.concatenate([clean, padded[-10:]]), 4096,
                                           num_valid=4096))
  assert np.isfinite(got.proponent_scores).all()  # NaN padding past num_valid does not count.
