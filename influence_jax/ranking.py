"""Top-k proponents and opponents, over all training examples at once or streamed block by block.

Streaming keeps, per query, the k largest scores (proponents, descending) and the k smallest
(opponents, ascending) with their training indices, on the device: each block of training rows
is one jitted program that scores it tile by tile and merges each tile with the running state, so
memory is bounded by the block and k, never by N. Merging blocks in any split gives the same result
as `extremes` over all columns at once; ties go to the lower training index.

A tile's merge looks at maxima (minima) of groups of GROUP columns first: only groups past a
query's running k-th score can change its list, and in a stream in no particular order they soon
become rare, so top-k (a sort on XLA:CPU) is spent on the few queries and groups a tile changes. A
block merged into lists not yet filled (the first) takes a lower bound of its own k-th scores from
a first pass over it, so that its own tiles are filtered too.
"""

from __future__ import annotations

import functools
from typing import Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Extremes(NamedTuple):
  """Per query (rows): indices and scores of the most positive (proponents) and most negative (opponents).

  Slots not filled yet (fewer than k training examples seen) hold index −1 and score ∓inf. Scores
  compare as numbers (−0.0 ties +0.0, to the lower index). `merge_rows` gives NaN scores to a query
  with a non-finite number, and to every query once a merged row has one: their rankings mean
  nothing.
  """

  proponents: np.ndarray
  proponent_scores: np.ndarray
  opponents: np.ndarray
  opponent_scores: np.ndarray


def extremes(scores: jax.Array, k: int) -> Extremes:
  """Returns the k largest (proponents, descending) and k smallest (opponents, ascending) per row."""
  k = min(k, scores.shape[1])
  pro_s, pro_i = jax.lax.top_k(scores, k)
  opp_s, opp_i = jax.lax.top_k(-scores, k)
  return Extremes(np.asarray(pro_i), np.asarray(pro_s), np.asarray(opp_i), np.asarray(-opp_s))


def empty_extremes(num_queries: int, k: int, dtype=jnp.float32) -> Extremes:
  """Returns a running Extremes with no candidates yet (indices −1, scores ∓inf)."""
  idx = -np.ones((num_queries, k), np.int32)
  inf = np.full((num_queries, k), np.inf, dtype)
  return Extremes(idx, -inf, idx.copy(), inf.copy())


# Columns a group when a block's top-k is searched through group extremes (`block_extremes`).
GROUP = 32


def _group_extremes(grouped, num_valid, sign):
  """Returns (T, G): per row and group of `grouped` (T, G, GROUP) the largest sign × score over columns
  < num_valid (−inf where the group has none)."""
  extremes = jnp.max(grouped, axis=2) if sign == 1 else -jnp.min(grouped, axis=2)
  num_groups = grouped.shape[1]
  whole = num_valid // GROUP  # Groups before it are entirely valid, after it entirely not.
  part = jax.lax.dynamic_index_in_dim(grouped, jnp.minimum(whole, num_groups - 1), axis=1, keepdims=False)
  part = jnp.where(whole * GROUP + jnp.arange(GROUP) < num_valid, sign * part, -jnp.inf).max(axis=1)
  group = jnp.arange(num_groups)
  return jnp.where(group < whole, extremes, jnp.where(group == whole, part[:, None], -jnp.inf))


def _positive_zeros(x):
  """Returns x with −0.0 as +0.0: `lax.top_k` ranks +0.0 above −0.0, but they are equal scores (a
  tie, to the lower index) here, as for the comparisons that filter candidates."""
  return jnp.where(x == 0, jnp.zeros_like(x), x)


def _top_in_groups(grouped, extremes, k, sign, num_valid, entering=None):
  """Returns (values, columns): per row the k largest of sign × `grouped` (T, G, GROUP) over columns <
  num_valid (−inf past them), searched in the k groups with the largest `extremes` only. With
  `entering` (a function of the (T, k × GROUP) candidates), candidates it rejects are −inf too: XLA:CPU's
  top-k, a sort, is several times faster on them."""
  _, groups = jax.lax.top_k(_positive_zeros(extremes), k)
  groups = jnp.sort(groups, axis=1)  # Candidates in column order, so that top_k breaks ties by column.
  num = groups.shape[0]
  columns = (groups[:, :, None] * GROUP + jnp.arange(GROUP, dtype=groups.dtype)).reshape(num, k * GROUP)
  candidates = sign * jnp.take_along_axis(grouped, groups[:, :, None], axis=1).reshape(num, k * GROUP)
  kept = columns < num_valid
  if entering is not None:
    kept &= entering(candidates)
  values, pos = jax.lax.top_k(jnp.where(kept, _positive_zeros(candidates), -jnp.inf), k)
  return values, jnp.take_along_axis(columns, pos, axis=1)


def _is_grouped(n, k):
  """Whether a block of n columns is searched through group extremes for a top-k (else a plain top-k)."""
  return n % GROUP == 0 and 4 * k * GROUP <= n


def block_extremes(scores: jax.Array, k: int, num_valid=None):
  """Returns (largest, their columns, negated smallest, their columns): per row the k largest scores
  (descending) and the k smallest (as −score, descending), ties to the lower column, columns ≥
  `num_valid` ignored (−inf): `lax.top_k` of the scores and of their negation.

  Rows cut into groups of GROUP columns are searched in their k best groups only (by maximum, or
  minimum; ties to the lower group), in column order: every top-k entry lies in them, since at
  most k groups have an extreme that comes at or before the k-th entry in that order. So one pass
  over the scores (maxima and minima of groups) and top-k over G = columns / GROUP extremes and
  k × GROUP candidates replace two top-k over every column.
  """
  n = scores.shape[1]
  k = min(k, n)
  num_valid = n if num_valid is None else num_valid
  if not _is_grouped(n, k):
    masked = lambda sign: jnp.where(jnp.arange(n) < num_valid, _positive_zeros(sign * scores), -jnp.inf)
    return tuple(jax.lax.top_k(masked(1), k)) + tuple(jax.lax.top_k(masked(-1), k))
  grouped = scores.reshape(scores.shape[0], n // GROUP, GROUP)
  return sum((_top_in_groups(grouped, _group_extremes(grouped, num_valid, sign), k, sign, num_valid)
              for sign in (1, -1)), ())


def _merge_side(run_scores, run_idx, cand_s, cand_i, offset):
  k = run_scores.shape[1]
  scores = jnp.concatenate([run_scores, cand_s], axis=1)
  idx = jnp.concatenate([run_idx, cand_i.astype(run_idx.dtype) + offset], axis=1)
  best_s, pos = jax.lax.top_k(_positive_zeros(scores), k)  # Stable: the running (lower-index) entries win ties.
  return best_s, jnp.take_along_axis(idx, pos, axis=1)


# A query whose running k-th score is beaten in at most this many groups of a tile merges those groups'
# columns alone; more, in any query, and the tile is merged through `_top_in_groups` for every query.
FEW_GROUPS = 8
# How many queries (rows of a tile) such a merge gathers when only they have a score past their k-th.
ROW_BUCKETS = (16, 64, 256)


def _entering(kth, floor):
  """Returns a function of scores (R, W): whether each may enter a running list whose k-th score is
  `kth` (R,) (not at or below it: a later column loses the tie; NaN may, as top_k ranks it first) and
  that ends at or above `floor` (R,)."""
  return lambda s: jnp.logical_not(s <= kth[:, None]) & jnp.logical_not(s < floor[:, None])


def _beating_candidates(side, grouped, num_valid, rows):
  """Returns (running scores, running indices, candidate scores, their columns) of the queries `rows`
  (R,) of one side: the columns of their first FEW_GROUPS beating groups (those hold every column
  past the running k-th), −inf where a column cannot enter."""
  beats = side.beats.at[rows].get(mode="clip")
  num_groups = beats.shape[1]
  rank = jnp.where(beats, jnp.cumsum(beats, axis=1), 0)  # 1, 2, ... along a row's beating groups.
  slot = jnp.arange(1, FEW_GROUPS + 1)[:, None]
  groups = jnp.sum(jnp.where(rank[:, None, :] == slot, jnp.arange(num_groups), 0), axis=2)  # (R, FEW)
  present = jnp.any(rank[:, None, :] == slot, axis=2)
  num = rows.shape[0]
  columns = (groups[:, :, None] * GROUP + jnp.arange(GROUP)).reshape(num, -1)
  values = (side.sign * grouped.at[rows[:, None], groups].get(mode="clip")).reshape(num, -1)
  old_s, old_i = side.scores.at[rows].get(mode="clip"), side.indices.at[rows].get(mode="clip")
  kept = jnp.repeat(present, GROUP, axis=1) & (columns < num_valid)
  kept &= _entering(old_s[:, -1], side.floor.at[rows].get(mode="clip"))(values)
  # Scores that cannot enter as −inf: XLA:CPU's top-k (a sort) is several times faster on them.
  return old_s, old_i, jnp.where(kept, values, -jnp.inf), columns


class _Side(NamedTuple):
  """One side of a tile's merge: sign, running (sign ×) scores and indices, floor, group extremes and
  which groups beat the running k-th."""

  sign: int
  scores: jax.Array
  indices: jax.Array
  floor: jax.Array
  extremes: jax.Array
  beats: jax.Array


def _merge_where_beaten(running: Extremes, grouped, offset, num_valid, floors) -> Extremes:
  """Returns `running` merged with the tile `grouped` (T, G, GROUP), columns offset.., looking only at
  the groups that hold a score past a query's running k-th (a later column at it loses the tie) on
  either side: while every query has at most FEW_GROUPS of them, the queries that have any (gathered
  into the smallest of ROW_BUCKETS that holds them) merge those groups' columns alone. A stream in
  no particular order reaches that state once the k-th scores have risen, and then spends on top-k
  only for the few queries a tile changes; otherwise `_top_in_groups` merges every query. One
  conditional a tile (XLA:CPU spends ~0.1 ms on each).

  Groups below `floors` ((T,) each side), lower bounds of the k-th scores at the end of the call,
  are not merged either: their columns cannot be in its result, though an intermediate state may
  then miss them.
  """
  num_rows, k = running.proponents.shape
  sides = []
  for sign, scores, indices, floor in ((1, running.proponent_scores, running.proponents, floors[0]),
                                       (-1, -running.opponent_scores, running.opponents, floors[1])):
    extremes = _group_extremes(grouped, num_valid, sign)
    sides.append(_Side(sign, scores, indices, floor, extremes, _entering(scores[:, -1], floor)(extremes)))
  per_query = [jnp.sum(side.beats, axis=1) for side in sides]

  def result(pro, opp):
    return Extremes(pro[1], pro[0], opp[1], -opp[0])

  def few(size):
    merged = []
    for side, n in zip(sides, per_query):
      rows = jnp.arange(num_rows) if size == num_rows else jnp.nonzero(n, size=size, fill_value=num_rows)[0]
      new_s, new_i = _merge_side(*_beating_candidates(side, grouped, num_valid, rows), offset)
      merged.append((side.scores.at[rows].set(new_s, mode="drop"), side.indices.at[rows].set(new_i, mode="drop")))
    return result(*merged)

  def every_query():
    merged = []
    for side in sides:
      entering = _entering(side.scores[:, -1], side.floor)
      best = _top_in_groups(grouped, jnp.where(side.beats, side.extremes, -jnp.inf), k, side.sign, num_valid,
                            entering)
      merged.append(_merge_side(side.scores, side.indices, *best, offset))
    return result(*merged)

  sizes = [b for b in ROW_BUCKETS if b < num_rows] + [num_rows]
  branches = [lambda: running] + [functools.partial(few, b) for b in sizes] + [every_query]
  num_beaten = jnp.maximum(*(jnp.sum(n > 0) for n in per_query))
  crowded = jnp.maximum(*(jnp.max(n) for n in per_query)) > FEW_GROUPS
  return jax.lax.switch(jnp.where(crowded, len(branches) - 1, jnp.sum(num_beaten > jnp.array([0] + sizes[:-1]))),
                        branches)


@jax.jit
def _merge_scores(running: Extremes, scores: jax.Array, offset: jax.Array, num_valid: jax.Array,
                  floors=None) -> Extremes:
  """Returns `running` updated with a (T, B) block of scores of training examples offset..offset+B−1 (only
  the first `num_valid` columns count). `floors`: lower bounds (T,) of the call's final k-th largest score
  and of the negated k-th smallest (see `_merge_where_beaten`)."""
  k, n = running.proponents.shape[1], scores.shape[1]
  if n % GROUP or k > n // GROUP:  # Too few groups to search a query's top-k in its k best.
    pro_s, pro_i, opp_s, opp_i = block_extremes(scores, k, num_valid)
    pro_s, pro_i = _merge_side(running.proponent_scores, running.proponents, pro_s, pro_i, offset)
    opp_s, opp_i = _merge_side(-running.opponent_scores, running.opponents, opp_s, opp_i, offset)
    return Extremes(pro_i, pro_s, opp_i, -opp_s)
  if floors is None:
    floors = (jnp.full(scores.shape[:1], -jnp.inf, scores.dtype),) * 2
  return _merge_where_beaten(running, scores.reshape(scores.shape[0], n // GROUP, GROUP), offset, num_valid,
                             floors)


# Rows scored at once inside one jitted merge: bounds the (T, rows) score buffer (8 MiB at T = 1,000)
# however large the block read from disk is; tiles this small stay in cache for the pass over their
# group extremes, and the merges only grow with the queries a tile changes.
TILE_ROWS = 2048


def tile_rows(num_rows: int) -> int:
  """Returns the rows of one tile of a `num_rows` block: its largest divisor ≤ TILE_ROWS (the whole
  block when that divisor is below TILE_ROWS / 8, i.e. for awkward sizes)."""
  tile = next(d for d in range(min(num_rows, TILE_ROWS), 0, -1) if num_rows % d == 0)
  return tile if tile >= min(num_rows, TILE_ROWS // 8) else num_rows


def _block_floors(queries, tiles, k, num_valid):
  """Returns lower bounds (T,) of the k-th largest score of the block's `tiles` (num, rows, d) and of
  its negated k-th smallest, without a wide top-k (slow on XLA:CPU): the block's columns cut into
  about 8k parts, the k-th largest of the parts' maxima (of −minima), as k parts each hold a score
  at least that."""
  num_tiles, rows = tiles.shape[:2]
  parts = next(p for p in range(-(-8 * k // num_tiles), rows + 1) if rows % p == 0)

  def tile_extremes(t):
    scores = (queries @ tiles[t].T).reshape(queries.shape[0], parts, rows // parts)
    valid = t * rows + jnp.arange(rows).reshape(parts, rows // parts) < num_valid
    return (jnp.max(jnp.where(valid, scores, -jnp.inf), axis=2),
            jnp.max(jnp.where(valid, -scores, -jnp.inf), axis=2))

  hi, lo = jax.lax.map(tile_extremes, jnp.arange(num_tiles))
  # The merge forms the same scores in another program, so they may differ in rounding: by at most
  # 2·d·u·Σ|q_i r_i| ≤ d·eps·‖q‖₁·max|r| (u = eps / 2; a dot product's rounding in any order), taken
  # off here with a quarter to spare.
  d = queries.shape[1]
  margin = 1.25 * d * jnp.finfo(queries.dtype).eps * jnp.sum(jnp.abs(queries), axis=1) * jnp.max(jnp.abs(tiles))
  kth = lambda e: jax.lax.top_k(jnp.moveaxis(e, 0, 1).reshape(queries.shape[0], -1), k)[0][:, -1] - margin
  return kth(hi), kth(lo)


@jax.jit
def _merge_rows(running: Extremes, queries: jax.Array, rows: jax.Array, offset: jax.Array,
                num_valid: jax.Array) -> Extremes:
  tile = tile_rows(rows.shape[0])
  tiles = rows.reshape(rows.shape[0] // tile, tile, rows.shape[1])
  k = running.proponents.shape[1]
  no_floor = jnp.full(queries.shape[:1], -jnp.inf, queries.dtype)
  floors = (no_floor, no_floor)
  if tile % GROUP == 0 and k <= tile // GROUP and jax.default_backend() == "cpu":
    # While some query has fewer than k scores (the first block), its k-th score is no filter: a
    # first pass over the block's group extremes gives each query one. (Only where both passes'
    # products round alike: elsewhere a float32 matmul may run at reduced precision.)
    unfilled = jnp.any(jnp.isneginf(running.proponent_scores[:, -1]))
    floors = jax.lax.cond(unfilled, lambda: _block_floors(queries, tiles, k, num_valid), lambda: floors)

  def merge_tile(carry, t):
    run, finite = carry
    lo = t * tile
    # Checked while the tile is in cache, not in a pass over the block.
    finite &= jnp.all(jnp.isfinite(tiles[t]) | (lo + jnp.arange(tile) >= num_valid)[:, None])
    return (_merge_scores(run, queries @ tiles[t].T, offset + lo, num_valid - lo, floors), finite), None

  steps = jnp.arange(tiles.shape[0], dtype=jnp.int32)
  merged, finite = jax.lax.scan(merge_tile, (running, jnp.bool_(True)), steps)[0]
  # A score of a non-finite query or row ranks nowhere sensible (and XLA:CPU's max skips NaN):
  # such a query's scores become NaN, and every query's for such a row.
  broken = jnp.logical_not(jnp.all(jnp.isfinite(queries), axis=1) & finite)
  return merged._replace(proponent_scores=jnp.where(broken[:, None], jnp.nan, merged.proponent_scores),
                         opponent_scores=jnp.where(broken[:, None], jnp.nan, merged.opponent_scores))


def merge_rows(running: Extremes, queries: jax.Array, rows: jax.Array, offset: int,
               num_valid: Optional[int] = None) -> Extremes:
  """Returns `running` updated with the scores queries @ rowsᵀ of training rows offset..offset+B−1.

  `queries` (T, d) and `rows` (B, d) are the two sides of a bilinear score (e.g.
  `scoring.query_side` and `scoring.row_side`); a block padded to a fixed B (with
  `num_valid` real rows) compiles once. Scores are formed `tile_rows(B)` rows at a time, so the
  device memory of one call is bounded by T × TILE_ROWS, not T × B.
  """
  num_valid = rows.shape[0] if num_valid is None else num_valid
  return _merge_rows(running, jnp.asarray(queries), jnp.asarray(rows), jnp.int32(offset), jnp.int32(num_valid))


def device_block(rows: np.ndarray, size: int) -> jax.Array:
  """Returns host `rows` (B ≤ size, d) padded with zero rows to `size`, as a device array.

  The rows are copied once, into a fresh 64-byte-aligned host buffer that a CPU device then shares
  rather than copying it again (`jnp.asarray` of an unaligned array copies at a fraction of memory
  speed); nothing else holds that buffer, so it is never written again.
  """
  rows = np.asarray(rows)
  if rows.shape[0] > size:
    raise ValueError(f"a block of {rows.shape[0]} rows does not fit in {size} rows")
  nbytes = size * rows.shape[1] * rows.dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = -raw.ctypes.data % 64
  out = raw[start:start + nbytes].view(rows.dtype).reshape(size, rows.shape[1])
  out[: rows.shape[0]] = rows
  out[rows.shape[0]:] = 0
  return jax.device_put(out)


def stream_extremes(queries: jax.Array, blocks: Iterable[tuple[int, jax.Array]], k: int,
                 running: Optional[Extremes] = None) -> Extremes:
  """Returns the top-k of queries @ rowsᵀ over every (offset, rows) block, on the host.

  Host blocks are padded to the largest block so far (`device_block`): a shorter last block
  compiles nothing new.
  """
  running = empty_extremes(queries.shape[0], k, queries.dtype) if running is None else running
  size = 0
  for offset, rows in blocks:
    if isinstance(rows, jax.Array):
      running = merge_rows(running, queries, rows, offset)
      continue
    rows = np.asarray(rows)
    size = max(size, rows.shape[0])
    running = merge_rows(running, queries, device_block(rows, size), offset, rows.shape[0])
  return to_host(running)


def to_host(running: Extremes) -> Extremes:
  """Returns `running` with numpy arrays."""
  return Extremes(*(np.asarray(x) for x in running))


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
