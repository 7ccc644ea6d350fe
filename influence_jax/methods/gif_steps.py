"""Step rules: how far to move along an influence update Δ (θ + sΔ; docs/design.md, "The papers' methods").

An influence update gives a direction and a first-order length; on a finite
edit (a whole class, 5–10 % of the data) the length is off by a factor of
several. Three rules pick s:

- `line_search`: the s of a grid minimising an objective (e.g. the edited
  training loss; no evaluation labels).
- `nearest_scale`: the s of a grid whose metrics are closest (L1) to a target
  (the retrained model's): an oracle, it looks at evaluation labels and at
  the retrained model.
- `walk`: the GIF authors' protocol: fixed-length steps along Δ, coarse then
  finer near the best point, keeping the point with the highest score. With
  an evaluation-data F1 as the score it is an oracle; with an F1 computed on
  the training data the user holds (the examples to forget or relabel and the
  rest) it needs no evaluation label.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from influence_jax.methods import gif_updates
from influence_jax.types import Params


DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)


def _values(objective_fn, params, delta, scales) -> tuple:
  values = tuple(float(objective_fn(gif_updates.apply_update(params, delta, s))) for s in scales)
  if not all(np.isfinite(values)):
    bad = [s for s, v in zip(scales, values) if not np.isfinite(v)]
    raise ValueError(f"The objective is not finite at scales {bad}.")
  return values


def line_search(objective_fn: Callable[[Params], Any], params: Params, delta: Params,
                scales: Sequence[float] = DEFAULT_SCALES) -> tuple[float, tuple]:
  """Returns (the scale s of `scales` minimising objective_fn(θ + sΔ), the objective at every scale).

  Ties go to the first scale listed.
  """
  if not scales:
    raise ValueError("scales is empty.")
  values = _values(objective_fn, params, delta, scales)
  return float(scales[int(np.argmin(values))]), values


def nearest_scale(metrics_fn: Callable[[Params], dict], target: dict, params: Params, delta: Params,
                  scales: Sequence[float] = DEFAULT_SCALES) -> tuple[float, dict]:
  """Returns (s, metrics_fn(θ + sΔ)) for the scale s of `scales` whose metrics are closest to `target`.

  Closeness is Σ_k |metrics_fn(θ + sΔ)[k] − target[k]| over target's keys;
  with target = the retrained model's evaluation metrics this is an oracle.
  """
  gap = lambda p: sum(abs(metrics_fn(p)[k] - v) for k, v in target.items())
  s, _ = line_search(gap, params, delta, scales)
  return s, metrics_fn(gif_updates.apply_update(params, delta, s))


class WalkResult(NamedTuple):
  """scale: the best s (θ + sΔ; one coarse step is `step` in these units); score: its score;
  scales / scores: every point visited, in order."""

  scale: float
  score: float
  scales: tuple
  scores: tuple


def walk(score_fn: Callable[[Params], float], params: Params, delta: Params, *, step: float = 0.25,
         max_steps: int = 256, patience: int = 16, refinements: int = 3) -> WalkResult:
  """Returns the point of highest score_fn(θ + sΔ) found by a coarse-then-fine walk along Δ.

  Coarse: s = step, 2·step, … (every step has the same length, step · ‖Δ‖),
  stopping after `max_steps` or after `patience` steps without a better score.
  Fine: around the best s, s ± step/2, then ± step/4, … (`refinements` halvings),
  each time moving to the better point. Start s = 0 (the unedited model)
  counts; ties go to the earlier point. score_fn sees nothing but the
  parameters it is given.
  """
  if not step > 0 or max_steps < 1 or patience < 1 or refinements < 0:
    raise ValueError(f"Need step > 0, max_steps ≥ 1, patience ≥ 1, refinements ≥ 0; got {step}, {max_steps}, "
                     f"{patience}, {refinements}.")
  visited = {}

  def score(s):
    if s not in visited:
      visited[s] = float(score_fn(gif_updates.apply_update(params, delta, s)))
      if not np.isfinite(visited[s]):
        raise ValueError(f"score_fn is not finite at scale {s}.")
    return visited[s]

  best_s, best, since = 0.0, score(0.0), 0
  for k in range(1, max_steps + 1):
    v = score(k * step)
    if v > best:
      best_s, best, since = k * step, v, 0
    else:
      since += 1
      if since >= patience:
        break
  h = step
  for _ in range(refinements):
    h /= 2
    for s in (best_s - h, best_s + h):
      if s >= 0 and score(s) > best:
        best_s, best = s, visited[s]
  return WalkResult(best_s, best, tuple(visited), tuple(visited.values()))
