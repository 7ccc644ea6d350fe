"""Top-k proponents and opponents, over all training examples at once or streamed block by block.

Streaming keeps, per query, the k largest scores (proponents, descending) and the k smallest
(opponents, ascending) with their training indices, on the device: each block of training rows
is one jitted matmul + a top-k (`block_extremes`) merged with the running state, so memory is
bounded by the block and k, never by N. Merging blocks in any split gives the same result as
`top_k` over all columns at once; ties go to the lower training index.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class TopK(NamedTuple):
  """Per query (rows): indices and scores of the most positive (proponents) and most negative (opponents).

  Slots not filled yet (fewer than k training examples seen) hold index −1 and score ∓inf.
  """

  proponents: np.ndarray
  proponent_scores: np.ndarray
  opponents: np.ndarray
  opponent_scores: np.ndarray


def top_k(scores: jax.Array, k: int) -> TopK:
  """Returns the k largest (proponents, descending) and k smallest (opponents, ascending) per row."""
  k = min(k, scores.shape[1])
  pro_s, pro_i = jax.lax.top_k(scores, k)
  opp_s, opp_i = jax.lax.top_k(-scores, k)
  return TopK(np.asarray(pro_i), np.asarray(pro_s), np.asarray(opp_i), np.asarray(-opp_s))


def empty_top_k(num_queries: int, k: int, dtype=jnp.float32) -> TopK:
  """Returns a running TopK with no candidates yet (indices −1, scores ∓inf)."""
  idx = -np.ones((num_queries, k), np.int32)
  inf = np.full((num_queries, k), np.inf, dtype)
  return TopK(idx, -inf, idx.copy(), inf.copy())


# Columns a group when a block's top-k is searched through group extremes (`block_extremes`).
GROUP = 32


def _top_in_groups(grouped, extremes, k, sign):
  """Returns (values, columns) of the k largest of sign × `grouped` (T, G, GROUP), searched in the k groups
  with the largest sign × `extremes` (T, G) only."""
  rows = grouped.shape[0]
  _, groups = jax.lax.top_k(sign * extremes, k)
  groups = jnp.sort(groups, axis=1)  # Candidates in column order, so that top_k breaks ties by column.
  columns = (groups[:, :, None] * GROUP + jnp.arange(GROUP, dtype=groups.dtype)).reshape(rows, k * GROUP)
  candidates = jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(rows, k * GROUP)
  values, pos = jax.lax.top_k(sign * candidates, k)
  return values, jnp.take_along_axis(columns, pos, axis=1)


def _grouped_extremes(scores, k):
  grouped = scores.reshape(scores.shape[0], scores.shape[1] // GROUP, GROUP)
  pro_s, pro_i = _top_in_groups(grouped, jnp.max(grouped, axis=2), k, 1)
  opp_s, opp_i = _top_in_groups(grouped, jnp.min(grouped, axis=2), k, -1)
  return pro_s, pro_i, opp_s, opp_i


def block_extremes(scores: jax.Array, k: int, num_valid=None):
  """Returns (largest, their columns, negated smallest, their columns): per row the k largest scores
  (descending) and the k smallest (as −score, descending), ties to the lower column, columns ≥
  `num_valid` ignored (−inf): `lax.top_k` of the scores and of their negation.

  Rows cut into groups of GROUP columns are searched in their k best groups only (by maximum, or
  minimum; ties to the lower group), in column order: every top-k entry lies in them, since at
  most k groups have an extreme that comes at or before the k-th entry in that order. So one pass
  over the scores (maxima and minima of groups) and top-k over G = columns / GROUP extremes and
  k × GROUP candidates replace two top-k over every column (a block with ignored columns, the
  last of a stream, is masked first).
  """
  n = scores.shape[1]
  k = min(k, n)
  num_valid = n if num_valid is None else num_valid
  masked = lambda sign: jnp.where(jnp.arange(n) < num_valid, sign * scores, -jnp.inf)
  plain = lambda: tuple(jax.lax.top_k(masked(1), k)) + tuple(jax.lax.top_k(masked(-1), k))
  if n % GROUP or 4 * k * GROUP > n:
    return plain()
  return jax.lax.cond(num_valid >= n, lambda: _grouped_extremes(scores, k), plain)


def _merge_side(run_scores, run_idx, cand_s, cand_i, offset):
  k = run_scores.shape[1]
  scores = jnp.concatenate([run_scores, cand_s], axis=1)
  idx = jnp.concatenate([run_idx, cand_i.astype(run_idx.dtype) + offset], axis=1)
  best_s, pos = jax.lax.top_k(scores, k)  # Stable: the running (lower-index) entries win ties.
  return best_s, jnp.take_along_axis(idx, pos, axis=1)


@jax.jit
def _merge_scores(running: TopK, scores: jax.Array, offset: jax.Array, num_valid: jax.Array) -> TopK:
  pro_s, pro_i, opp_s, opp_i = block_extremes(scores, running.proponents.shape[1], num_valid)
  pro_s, pro_i = _merge_side(running.proponent_scores, running.proponents, pro_s, pro_i, offset)
  opp_s, opp_i = _merge_side(-running.opponent_scores, running.opponents, opp_s, opp_i, offset)
  return TopK(pro_i, pro_s, opp_i, -opp_s)


def merge_top_k(running: TopK, scores: jax.Array, offset: int, num_valid: Optional[int] = None) -> TopK:
  """Returns `running` updated with a (T, B) block of scores of training examples offset..offset+B−1.

  Only the first `num_valid` columns count (padding after them is ignored). Runs on the device;
  the result holds jax arrays (convert with `to_host`).
  """
  num_valid = scores.shape[1] if num_valid is None else num_valid
  return _merge_scores(running, jnp.asarray(scores), jnp.int32(offset), jnp.int32(num_valid))


# Rows scored at once inside one jitted merge: bounds the (T, rows) score buffer (32 MiB at T = 1,000)
# however large the block read from disk is.
TILE_ROWS = 8192


def tile_rows(num_rows: int) -> int:
  """Returns the rows of one tile of a `num_rows` block: its largest divisor ≤ TILE_ROWS (the whole
  block when that divisor is below TILE_ROWS / 8, i.e. for awkward sizes)."""
  tile = next(d for d in range(min(num_rows, TILE_ROWS), 0, -1) if num_rows % d == 0)
  return tile if tile >= min(num_rows, TILE_ROWS // 8) else num_rows


@jax.jit
def _merge_rows(running: TopK, queries: jax.Array, rows: jax.Array, offset: jax.Array,
                num_valid: jax.Array) -> TopK:
  tile = tile_rows(rows.shape[0])
  tiles = rows.reshape(rows.shape[0] // tile, tile, rows.shape[1])

  def merge_tile(run, t):
    lo = t * tile
    return _merge_scores(run, queries @ tiles[t].T, offset + lo, num_valid - lo), None

  return jax.lax.scan(merge_tile, running, jnp.arange(tiles.shape[0], dtype=jnp.int32))[0]


def merge_rows(running: TopK, queries: jax.Array, rows: jax.Array, offset: int,
               num_valid: Optional[int] = None) -> TopK:
  """Returns `running` updated with the scores queries @ rowsᵀ of training rows offset..offset+B−1.

  `queries` (T, d) and `rows` (B, d) are the two sides of a bilinear score (e.g.
  `scoring.query_side` and `scoring.row_side`); a block padded to a fixed B (with
  `num_valid` real rows) compiles once. Scores are formed `tile_rows(B)` rows at a time, so the
  device memory of one call is bounded by T × TILE_ROWS, not T × B.
  """
  num_valid = rows.shape[0] if num_valid is None else num_valid
  return _merge_rows(running, jnp.asarray(queries), jnp.asarray(rows), jnp.int32(offset), jnp.int32(num_valid))


def stream_top_k(queries: jax.Array, blocks: Iterable[tuple[int, jax.Array]], k: int,
                 running: Optional[TopK] = None) -> TopK:
  """Returns the top-k of queries @ rowsᵀ over every (offset, rows) block, on the host."""
  running = empty_top_k(queries.shape[0], k, queries.dtype) if running is None else running
  for offset, rows in blocks:
    running = merge_rows(running, queries, rows, offset)
  return to_host(running)


def to_host(running: TopK) -> TopK:
  """Returns `running` with numpy arrays."""
  return TopK(*(np.asarray(x) for x in running))


class RunningLargest(NamedTuple):
  """The `k` largest values seen so far and their indices (−1 / −inf where not filled)."""

  indices: np.ndarray
  values: np.ndarray


def empty_largest(k: int) -> RunningLargest:
  return RunningLargest(-np.ones(k, np.int64), np.full(k, -np.inf, np.float64))


def merge_indexed(running: RunningLargest, indices: np.ndarray, values: np.ndarray) -> RunningLargest:
  """Returns `running` updated with (indices[i], values[i]) pairs (ties to the lower index, unfilled last)."""
  k = running.indices.shape[0]
  idx = np.concatenate([running.indices, np.asarray(indices, np.int64)])
  vals = np.concatenate([running.values, np.asarray(values, np.float64)])
  order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -vals))[:k]
  return RunningLargest(idx[order], vals[order])


def merge_largest(running: RunningLargest, values: np.ndarray, offset: int) -> RunningLargest:
  """Returns `running` updated with values[i] of index offset + i (ties to the lower index)."""
  k = running.indices.shape[0]
  if k == 0 or values.size == 0:
    return running
  cand = np.argsort(-np.asarray(values, np.float64), kind="stable")[:k]
  return merge_indexed(running, cand + offset, np.asarray(values)[cand])
