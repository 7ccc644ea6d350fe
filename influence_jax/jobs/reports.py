"""The score stage's tables and pictures, written atomically from the merged ranking.

scores/top_k.csv          test_id, test_label, kind, rank, train_id, train_label, score
scores/top_k_relative.csv, top_k_cosine.csv: the same for score.normalize "relative" / "cosine"
scores/self_influence.csv rank, train_id, train_label, self_influence (highest first)
scores/summary.json       what was scored, with what (and how the CG solves went)
scores/influence_grid.png queries next to their top proponents / opponents (with Task.image_fn);
                          influence_grid_relative.png, influence_grid_cosine.png likewise
Ids are indices into Task.train / the query source.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from influence_jax import io as io_lib
from influence_jax import ranking
from influence_jax.jobs import input as input_lib
from influence_jax.jobs import plots
from influence_jax.jobs import task as task_lib

TOP_K_HEADER = ["test_id", "test_label", "kind", "rank", "train_id", "train_label", "score"]
SELF_INFLUENCE_HEADER = ["rank", "train_id", "train_label", "self_influence"]


class _Labels:
  """Labels of source rows, each example read at most once; `prefetch` reads many in sorted batches
  through grain (one random read per example costs milliseconds on a large on-disk source)."""

  def __init__(self, task: task_lib.Task, source: Any):
    self.task, self.source, self.cache = task, source, {}

  def prefetch(self, ids) -> "_Labels":
    if self.task.label_fn is None:
      return self
    todo = np.unique([int(i) for i in np.ravel(ids) if i >= 0 and int(i) not in self.cache])
    for rows, batch in input_lib.batches(self.source, todo, 1024, "labels"):
      for j, row in enumerate(rows):
        self.cache[int(row)] = task_lib.label(self.task, jax.tree.map(lambda x: x[j], batch))
    return self

  def __call__(self, i: int) -> str:
    if self.task.label_fn is None:
      return ""
    if i not in self.cache:
      self.cache[i] = task_lib.label(self.task, self.source[i])
    return self.cache[i]


def top_k_rows(running: ranking.Extremes, train_label, query_label) -> list:
  """Returns top_k.csv's rows (header first); unfilled slots (fewer training examples than k) are skipped."""
  rows = [TOP_K_HEADER]
  for t in range(running.proponents.shape[0]):
    for kind, idx, sc in (("proponent", running.proponents, running.proponent_scores),
                          ("opponent", running.opponents, running.opponent_scores)):
      for r in range(idx.shape[1]):
        j = int(idx[t, r])
        if j >= 0:
          rows.append([t, query_label(t), kind, r + 1, j, train_label(j), f"{float(sc[t, r]):.6g}"])
  return rows


def table_name(stem: str, normalization: str, ext: str) -> str:
  """Returns a table's file name: top_k.csv for "none", top_k_relative.csv for "relative", ..."""
  return f"{stem}{'' if normalization == 'none' else '_' + normalization}.{ext}"


def write_score_tables(out: str, train_out: str, task: task_lib.Task, queries: Any,
                       running: dict, largest: ranking.RunningLargest, summary: dict,
                       *, grid_examples: int) -> dict:
  """Writes the tables (and the pictures when the task has image_fn); returns their paths.

  `running`: {normalization ("none", "relative", "cosine"): Extremes}, one top-k table (and grid)
  each. The top-k tables and summary.json go to `out` (the query set's directory); self_influence.csv,
  a property of the training set alone, to `train_out`.
  """
  paths = {("top_k" if name == "none" else f"top_k_{name}"): os.path.join(out, table_name("top_k", name, "csv"))
           for name in running}
  paths.update(self_influence=os.path.join(train_out, "self_influence.csv"), summary=os.path.join(out, "summary.json"))
  keep = largest.indices >= 0
  record = {"store": summary["store_fingerprint"], "rows": int(keep.sum()), "tail": summary["tail"],
            "damping": summary["damping"]}
  write_self = _read_json(paths["self_influence"] + ".json") != record or not os.path.exists(paths["self_influence"])
  ids = [np.concatenate([e.proponents.ravel(), e.opponents.ravel()]) for e in running.values()]
  train_label = _Labels(task, task.train).prefetch(np.concatenate(ids + ([largest.indices] if write_self else [])))
  num_queries = next(iter(running.values())).proponents.shape[0]
  query_label = _Labels(task, queries).prefetch(np.arange(num_queries))
  for name, extremes in running.items():
    io_lib.atomic_write_csv(paths["top_k" if name == "none" else f"top_k_{name}"],
                            top_k_rows(extremes, train_label, query_label))
  if write_self:
    # A property of the store alone: written once, not again for every query set.
    io_lib.atomic_write_csv(paths["self_influence"], [SELF_INFLUENCE_HEADER] + [
        [r + 1, int(j), train_label(int(j)), f"{v:.6g}"]
        for r, (j, v) in enumerate(zip(largest.indices[keep], largest.values[keep]))])
    io_lib.atomic_write_json(paths["self_influence"] + ".json", record)
  shown = min(grid_examples, num_queries)
  if task.image_fn is not None and shown:
    for name, extremes in running.items():
      key = "grid" if name == "none" else f"grid_{name}"
      title = None if name == "none" else f"{name} influence: test image | top proponents (green) | top opponents (red)"
      paths[key] = _grid(os.path.join(out, table_name("influence_grid", name, "png")), task, queries, query_label,
                         train_label, extremes, shown, title=title)
  summary = dict(summary, most_self_influential_train_ids=[int(j) for j in largest.indices[keep][:10]])
  io_lib.atomic_write_json(paths["summary"], summary)
  return paths


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _grid(path, task, queries, query_label, train_label, running: ranking.Extremes, shown: int, num_shown: int = 4,
          title=None):
  cols = min(num_shown, running.proponents.shape[1])
  pro, opp = running.proponents[:shown, :cols], running.opponents[:shown, :cols]
  needed = [int(j) for j in np.unique(np.concatenate([pro.ravel(), opp.ravel()])) if j >= 0]
  where = {j: i for i, j in enumerate(needed)}
  remap = np.vectorize(lambda j: where.get(int(j), 0))
  image = lambda source, i: np.asarray(task.image_fn(source[i]))
  return plots.influence_grid(
      path, np.stack([image(queries, t) for t in range(shown)]), [query_label(t) for t in range(shown)],
      np.stack([image(task.train, j) for j in needed]), [train_label(j) for j in needed],
      remap(pro), running.proponent_scores[:shown, :cols], remap(opp), running.opponent_scores[:shown, :cols],
      num_shown=cols, title=title or "")
