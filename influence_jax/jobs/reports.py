"""The score stage's tables and pictures, written atomically from the merged ranking.

Everything of a query set lives in its own directory, scores/<score.name>/ ("queries" by default):
  top_k.csv            test_id, test_label, kind, rank, train_id, train_label, score
  top_k_relative.csv, top_k_cosine.csv: the same for score.normalize "relative" / "cosine"
  summary.json         every setting the tables depend on, which self-influence ranking goes with them,
                       and how the CG solves went
  influence_grid.png   queries next to their top proponents / opponents (with Task.image_fn);
                       influence_grid_relative.png, influence_grid_cosine.png likewise
  progress/            the running state of each process (resume)
What belongs to the store, whatever the query set, is written once per way of computing it:
  scores/self_influence/<tail|no_tail>_damping_<δ>_rows_<n|all>.csv   rank, train_id, train_label,
      self_influence (highest first)
  ... .json            how it was computed (store, damping, tail and its constant, rows)
so no run overwrites another's outputs made with other settings. Ids index Task.train / the query source.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from influence_jax import io as io_lib
from influence_jax import paths as paths_lib
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


SELF_INFLUENCE_DIR = "self_influence"
# What the store's self-influence ranking depends on (the rest of a query set's settings does not count).
_SELF_INFLUENCE_SETTINGS = ("store_fingerprint", "training_identity", "eigenspace_fingerprint", "k", "residual_rank",
                            "sketch_dim", "damping", "tail", "tail_constant", "self_influence_rows")


def self_influence_name(summary: dict) -> str:
  """Returns the file name (no extension) of the self-influence ranking computed as `summary` says, e.g.
  'tail_damping_0.01_rows_10000': one file per way of computing it."""
  rows = summary["self_influence_rows"]
  return (f"{'tail' if summary['tail'] else 'no_tail'}_damping_{summary['damping']:g}_"
          f"rows_{'all' if rows < 0 else rows}")


def self_influence_record(summary: dict, rows: int) -> dict:
  """Returns the self-influence ranking's own summary: how it was computed and from what."""
  formula = "G(z)ᵀ(Λ+δ)⁻¹G(z)" + (" + (‖∇ℓ(z)‖² − ‖G(z)‖²)/c" if summary["tail"] else "")
  return dict({k: summary[k] for k in _SELF_INFLUENCE_SETTINGS}, rows_written=rows, formula=formula)


def table_name(stem: str, normalization: str, ext: str) -> str:
  """Returns a table's file name: top_k.csv for "none", top_k_relative.csv for "relative", ..."""
  return f"{stem}{'' if normalization == 'none' else '_' + normalization}.{ext}"


def write_score_tables(out: str, scores_dir: str, task: task_lib.Task, queries: Any,
                       running: dict, largest: ranking.RunningLargest, summary: dict,
                       *, grid_examples: int) -> dict:
  """Writes the tables (and the pictures when the task has image_fn); returns their paths.

  `running`: {normalization ("none", "relative", "cosine"): Extremes}, one top-k table (and grid) each.
  The top-k tables and summary.json go to `out` (the query set's directory); the self-influence ranking,
  a property of the store, to scores_dir/self_influence/ under its settings' name, written only when
  missing or computed from other inputs (`self_influence_record`).
  """
  name = self_influence_name(summary)
  paths = {("top_k" if n == "none" else f"top_k_{n}"): paths_lib.join(out, table_name("top_k", n, "csv"))
           for n in running}
  paths.update(summary=paths_lib.join(out, "summary.json"),
               self_influence=paths_lib.join(scores_dir, SELF_INFLUENCE_DIR, name + ".csv"))
  keep = largest.indices >= 0
  record = self_influence_record(summary, int(keep.sum()))
  record_path = paths_lib.join(scores_dir, SELF_INFLUENCE_DIR, name + ".json")
  write_self = io_lib.read_json(record_path) != record or not paths_lib.exists(paths["self_influence"])
  ids = [np.concatenate([e.proponents.ravel(), e.opponents.ravel()]) for e in running.values()]
  train_label = _Labels(task, task.train).prefetch(np.concatenate(ids + ([largest.indices] if write_self else [])))
  num_queries = next(iter(running.values())).proponents.shape[0]
  query_label = _Labels(task, queries).prefetch(np.arange(num_queries))
  for n, extremes in running.items():
    io_lib.atomic_write_csv(paths["top_k" if n == "none" else f"top_k_{n}"],
                            top_k_rows(extremes, train_label, query_label))
  if write_self:
    # A property of the store alone: written once, not again for every query set.
    io_lib.atomic_write_csv(paths["self_influence"], [SELF_INFLUENCE_HEADER] + [
        [r + 1, int(j), train_label(int(j)), f"{v:.6g}"]
        for r, (j, v) in enumerate(zip(largest.indices[keep], largest.values[keep]))])
    io_lib.atomic_write_json(record_path, record)
  shown = min(grid_examples, num_queries)
  if task.image_fn is not None and shown:
    for n, extremes in running.items():
      key = "grid" if n == "none" else f"grid_{n}"
      title = None if n == "none" else f"{n} influence: test image | top proponents (green) | top opponents (red)"
      paths[key] = _grid(paths_lib.join(out, table_name("influence_grid", n, "png")), task, queries, query_label,
                         train_label, extremes, shown, title=title)
  summary = dict(summary, self_influence=paths_lib.relative(paths["self_influence"], scores_dir),
                 most_self_influential_train_ids=[int(j) for j in largest.indices[keep][:10]])
  io_lib.atomic_write_json(paths["summary"], summary)
  return paths


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
