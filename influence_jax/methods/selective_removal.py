"""Selective removal of memorized points during training (docs/design.md, "The papers' methods").

At chosen epochs, rank the still-kept training points (`removal_ranking`: the
MEMORIZED ones of a memorization.Memorization, most negative A first), drop up
to a budget of them (`select_removals`), continue training on the rest
(`train_with_removal`). Measured on digits (docs/memorization_results.md): it
beats removing as many random points, but not ranking *all* kept points by A
or by self-influence, because points not yet fitted at the removal epoch (many
flipped labels early in training) are by definition not MEMORIZED and so are
never candidates.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from influence_jax import data as data_lib
from influence_jax.methods import memorization as mz
from influence_jax.methods import training
from influence_jax.types import LossFn


def removal_ranking(mem: mz.Memorization, indices=None) -> np.ndarray:
  """Returns the MEMORIZED points, most negative A first (ties: lower index first).

  `indices` maps the rows of `mem` to training-set indices (default: 0..N−1);
  the result is in those indices.
  """
  idx = np.arange(mem.label.size) if indices is None else np.asarray(indices)
  if idx.shape != mem.label.shape:
    raise ValueError(f"indices must have shape {mem.label.shape} like the labels; got {idx.shape}.")
  rows = np.flatnonzero(mem.label == mz.MEMORIZED)
  order = np.lexsort((idx[rows], mem.influence[rows]))
  return idx[rows[order]]


def select_removals(ranking, budget: int, removed) -> np.ndarray:
  """Returns the first `budget` entries of `ranking` not yet in `removed` (a bool mask), in order.

  Raises ValueError on a negative budget or when `ranking` repeats an index.
  """
  ranking = np.asarray(ranking, np.int64)
  removed = np.asarray(removed, bool)
  if budget < 0:
    raise ValueError(f"budget must be ≥ 0; got {budget}.")
  if np.unique(ranking).size != ranking.size:
    raise ValueError("ranking repeats a training index.")
  if ranking.size and (ranking.min() < 0 or ranking.max() >= removed.size):
    raise ValueError(f"ranking has indices outside [0, {removed.size}).")
  return ranking[~removed[ranking]][:budget]


class RemovalHistory(NamedTuple):
  """What `train_with_removal` did.

  removed: one int array per removal event, the training indices dropped then (in ranking order).
  kept: (N,) bool, the points still trained on at the end.
  kept_per_epoch: (num_epochs,) how many points each epoch trained on.
  example_epochs: Σ over epochs of the points trained on (the training cost).
  losses: (steps,) minibatch losses.
  """

  removed: list
  kept: np.ndarray
  kept_per_epoch: np.ndarray
  example_epochs: int
  losses: np.ndarray


def train_with_removal(
    loss_fn: LossFn,
    params: Any,
    train_batch: dict,
    *,
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    batch_size: int,
    removal_epochs: Sequence[int] = (),
    rank_fn: Optional[Callable[[Any, np.ndarray, int], np.ndarray]] = None,
    budgets: int | Sequence[int] = 0,
    seed: int = 0,
) -> tuple[Any, RemovalHistory]:
  """Returns (params, RemovalHistory): minibatch training that drops points at chosen epochs.

  Before epoch e for each e in `removal_epochs` (0 < e < num_epochs),
  rank_fn(params, kept_indices, event) returns training indices to drop in
  priority order (e.g. `removal_ranking` of the kept points' Memorization, or
  a random permutation); the first budgets[event] of them not already
  removed are dropped (`select_removals`), so no point is dropped twice.
  Training goes on with the optimizer state carried over; each stretch
  between removals is one `training.train_segment` over the kept points
  (each epoch a fresh permutation in batches of min(batch_size, kept),
  remainder dropped). Deterministic given `seed`.
  """
  n = data_lib.batch_size(train_batch)
  events = [int(e) for e in removal_epochs]
  if any(not 0 < e < num_epochs for e in events) or events != sorted(set(events)):
    raise ValueError(f"removal_epochs must be increasing epochs in (0, {num_epochs}); got {tuple(removal_epochs)}.")
  budgets = [int(budgets)] * len(events) if np.ndim(budgets) == 0 else [int(b) for b in budgets]
  if len(budgets) != len(events):
    raise ValueError(f"budgets has {len(budgets)} entries for {len(events)} removal epochs.")
  if events and rank_fn is None:
    raise ValueError("removal_epochs given without a rank_fn.")
  train_batch = jax.tree.map(jnp.asarray, train_batch)
  opt_state = optimizer.init(params)
  kept = np.ones(n, bool)
  removed, kept_per_epoch, losses = [], [], []
  keys = jax.random.split(jax.random.key(seed), len(events) + 1)
  bounds = [0, *events, num_epochs]
  for seg in range(len(bounds) - 1):
    if seg > 0:
      ranking = rank_fn(params, np.flatnonzero(kept), seg - 1)
      drop = select_removals(ranking, budgets[seg - 1], ~kept)
      kept[drop] = False
      removed.append(drop)
    idx = np.flatnonzero(kept)
    if idx.size == 0:
      raise ValueError("every training point was removed; lower the budgets.")
    bs = min(batch_size, idx.size)
    epochs = bounds[seg + 1] - bounds[seg]
    subset = jax.tree.map(lambda x: x[idx], train_batch)
    params, opt_state, seg_losses, _ = training.train_segment(
        loss_fn, optimizer, params, opt_state, subset, keys[seg], batch_size=bs,
        num_steps=epochs * (idx.size // bs))
    losses.append(np.asarray(seg_losses))
    kept_per_epoch += [idx.size] * epochs
  kpe = np.asarray(kept_per_epoch)
  return params, RemovalHistory(removed, kept, kpe, int(kpe.sum()), np.concatenate(losses))
