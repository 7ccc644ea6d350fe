"""Editing tasks with influence updates (docs/design.md, "The papers' methods"): class removal and label change.

Pure functions over a generic `per_example_loss_fn(params, batch) -> (B,)` and
`outputs_fn(params, batch) -> (B, classes)`; batches are {"x": inputs, "y": int labels}.
The training loss is taken to be mean(per_example_loss_fn) (any L2 term inside
it). An edit is an `EditProblem` (θ, g, the curvature operator, the edited
training loss: `class_removal_problem`, `label_change_problem`), solved by
`solve_edit` for any method and target set, its step by a line search of the
edited training loss (step rules: `gif_steps`). `removal_f1` and `edit_f1`
combine forgetting (or relabelling) and keeping.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import curvature as curvature_lib
from influence_jax.methods import gif_steps
from influence_jax.methods import gif_updates
from influence_jax.methods import training
from influence_jax.types import Batch, OutputsFn, Params, PerExampleLossFn


METHODS = ("gif", "fif", "pif", "if")


class EditResult(NamedTuple):
  """An applied edit: params = θ + scale · update.delta.

  scale: the step size chosen by the line search on the edited training loss.
  scale_losses: that loss at each scale of the grid (same order as `scales`).
  """

  params: Params
  update: gif_updates.InfluenceUpdate
  scale: float
  scales: tuple
  scale_losses: tuple


def influence_update(method: str, hessian, g: Params, mask: Optional[Params] = None,
                     **solver_kwargs) -> gif_updates.InfluenceUpdate:
  """Returns the update of `method` ("gif", "fif", "pif" on `mask`; "if" on every parameter)."""
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
  if method == "if":
    return gif_updates.if_update(hessian, g, **solver_kwargs)
  if mask is None:
    raise ValueError(f"method={method!r} needs a target mask (e.g. gif_selection.select_parameters(...).mask).")
  fn = {"gif": gif_updates.gif_update, "fif": gif_updates.fif_update, "pif": gif_updates.pif_update}[method]
  return fn(hessian, g, mask, **solver_kwargs)


def select_examples(batch: Batch, keep) -> Batch:
  """Returns the examples of `batch` where the boolean (B,) array `keep` is True."""
  keep = np.asarray(keep, bool)
  return jax.tree.map(lambda x: np.asarray(x)[keep], batch)


def class_removal_metrics(outputs_fn: OutputsFn, params: Params, test_batch: Batch, removed_class: int) -> dict:
  """Returns {"removed": accuracy on the removed class, "rest": accuracy on the other classes}."""
  is_removed = np.asarray(test_batch["y"]) == removed_class
  return {"removed": training.accuracy(outputs_fn, params, select_examples(test_batch, is_removed)),
          "rest": training.accuracy(outputs_fn, params, select_examples(test_batch, ~is_removed))}


def label_change_metrics(outputs_fn: OutputsFn, params: Params, test_batch: Batch, changed_batch: Batch,
                         wrong_labels) -> dict:
  """Returns clean test accuracy, accuracy on the relabelled examples (corrected labels, changed_batch["y"]),
  and the backdoor rate: the fraction of relabelled examples still predicted as their wrong label."""
  pred = np.argmax(training.predict(outputs_fn, params, changed_batch), -1)
  return {"clean": training.accuracy(outputs_fn, params, test_batch),
          "relabelled": float(np.mean(pred == np.asarray(changed_batch["y"]))),
          "backdoor": float(np.mean(pred == np.asarray(wrong_labels)))}


class EditProblem(NamedTuple):
  """One edit to make, independent of the method: θ, g, the curvature and the edited training objective.

  hessian: curvature of the mean loss on the edited training set (+ damping·I),
    or on a fixed random subset of it (`hessian_examples`), a
    `curvature_lib.LinearOperator`; build it once and reuse it for every method
    and target set (the jitted CG loops are then compiled once).
  train_loss: jitted θ ↦ mean loss on the edited training set (the line-search
    objective, no test labels).
  """

  params: Params
  g: Params
  hessian: curvature_lib.LinearOperator
  train_loss: Callable[[Params], jax.Array]


CURVATURE_DATA = ("edited", "clean")


def sample_rows(candidates, num_examples: Optional[int] = None, seed: int = 0) -> np.ndarray:
  """Returns the sorted row indices `candidates`, or num_examples of them drawn once without replacement
  (numpy `seed`) when 0 < num_examples < their count."""
  rows = np.asarray(candidates, np.int64)
  if num_examples is not None and 0 < num_examples < rows.size:
    rows = np.random.default_rng(seed).choice(rows, int(num_examples), replace=False)
  return np.sort(rows)


def curvature_rows(changed, data: str = "edited", num_examples: Optional[int] = None, seed: int = 0,
                   corrupted=None) -> np.ndarray:
  """Returns the sorted training rows a label change's curvature averages over.

  data="edited": every row (the corrected training set); data="clean": the
  rows never corrupted, ~`corrupted` (default ~`changed`), as the GIF authors
  do. With num_examples = k, k of them drawn once (`sample_rows`).
  """
  changed = np.asarray(changed, bool)
  corrupted = changed if corrupted is None else np.asarray(corrupted, bool)
  if corrupted.shape != changed.shape:
    raise ValueError(f"corrupted has shape {corrupted.shape}; the changed mask has {changed.shape}.")
  if data == "edited":
    candidates = np.arange(changed.size)
  elif data == "clean":
    candidates = np.flatnonzero(~corrupted)
  else:
    raise ValueError(f"Unknown curvature data {data!r}; expected one of {CURVATURE_DATA}.")
  if candidates.size == 0:
    raise ValueError(f"No training row is left for the {data!r} curvature.")
  return sample_rows(candidates, num_examples, seed)


def _problem(per_example_loss_fn, params, new_train_batch, g, curv_batch, damping, curvature, microbatch_size,
             curvature_loss_fn=None):
  loss_fn = lambda p, b: jnp.mean(per_example_loss_fn(p, b))
  curv_fn = curvature_loss_fn or per_example_loss_fn
  curv_loss = lambda p, b: jnp.mean(curv_fn(p, b))
  hessian = curvature_lib.curvature_operator(curv_loss, params, [curv_batch], curvature=curvature,
                                             damping=damping, microbatch_size=microbatch_size)
  batch = jax.tree.map(jnp.asarray, new_train_batch)
  return EditProblem(params, g, hessian, jax.jit(lambda p: loss_fn(p, batch)))


def _rows(batch: Batch, rows) -> Batch:
  return jax.tree.map(lambda x: np.asarray(x)[rows], batch)


def solve_edit(problem: EditProblem, method: str, mask: Optional[Params] = None,
               scales: Sequence[float] = gif_steps.DEFAULT_SCALES, **solver_kwargs) -> EditResult:
  """Returns θ + sΔ, Δ the `method` update on `mask` and s the scale of `scales` with the lowest edited training loss."""
  update = influence_update(method, problem.hessian, problem.g, mask, **solver_kwargs)
  scale, losses = gif_steps.line_search(problem.train_loss, problem.params, update.delta, scales)
  return EditResult(gif_updates.apply_update(problem.params, update, scale), update, scale, tuple(scales), losses)


def edit_f1(a: float, b: float) -> float:
  """Returns the harmonic mean 2ab / (a + b) of two accuracies (0 when both are 0).

  Label change: edit_f1(relabelled accuracy, clean accuracy), as the GIF authors report it.
  """
  return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def removal_f1(removed_accuracy: float, rest_accuracy: float) -> float:
  """Returns the harmonic mean of forgetting (1 − removed-class accuracy) and keeping (rest accuracy).

  1 for a model that never predicts the removed class on its examples and is
  right on every other; 0 when either is 0. Compare it with the retrained
  model's value (`class_removal_metrics` reports both parts).
  """
  return edit_f1(1.0 - removed_accuracy, rest_accuracy)


def class_removal_problem(
    per_example_loss_fn: PerExampleLossFn, params: Params, train_batch: Batch, removed_class: int, *,
    damping: float = 0.0, curvature: str = "hessian", microbatch_size: Optional[int] = None,
    hessian_examples: Optional[int] = None, seed: int = 0, curvature_loss_fn: Optional[PerExampleLossFn] = None,
) -> EditProblem:
  """Returns the EditProblem of forgetting every training example of `removed_class`.

  g = removal_gradient over that class, H = curvature of the mean loss
  (`curvature_loss_fn`, default per_example_loss_fn) on the remaining training
  examples (+ damping·I); with `hessian_examples` = k, on k of them drawn once
  (numpy, `seed`) to make each product cheaper.
  """
  is_removed = np.asarray(train_batch["y"]) == removed_class
  if not is_removed.any() or is_removed.all():
    raise ValueError(f"Class {removed_class} must hold some but not all training examples; it holds {is_removed.sum()}.")
  removed, remaining = select_examples(train_batch, is_removed), select_examples(train_batch, ~is_removed)
  g = gif_updates.removal_gradient(per_example_loss_fn, params, [removed], num_remaining=int((~is_removed).sum()))
  curv = _rows(remaining, sample_rows(np.arange(int((~is_removed).sum())), hessian_examples, seed))
  return _problem(per_example_loss_fn, params, remaining, g, curv, damping, curvature, microbatch_size,
                  curvature_loss_fn)


def class_removal_edit(
    per_example_loss_fn: PerExampleLossFn, params: Params, train_batch: Batch, removed_class: int, *,
    method: str = "gif", mask: Optional[Params] = None, damping: float = 0.0, curvature: str = "hessian",
    microbatch_size: Optional[int] = None, scales: Sequence[float] = gif_steps.DEFAULT_SCALES, **solver_kwargs,
) -> EditResult:
  """Returns θ edited to forget every training example of `removed_class`.

  g = removal_gradient over that class, H = curvature of the mean loss on the
  remaining training examples (+ damping·I), Δ by `method` on `mask`; the step
  is the scale of `scales` with the lowest remaining-set training loss (pass
  scales=(1.0,) for the plain first-order edit).
  """
  problem = class_removal_problem(per_example_loss_fn, params, train_batch, removed_class, damping=damping,
                                  curvature=curvature, microbatch_size=microbatch_size)
  return solve_edit(problem, method, mask, scales, **solver_kwargs)


def label_change_problem(
    per_example_loss_fn: PerExampleLossFn, params: Params, train_batch: Batch, changed, corrected_labels, *,
    damping: float = 0.0, curvature: str = "hessian", microbatch_size: Optional[int] = None,
    hessian_examples: Optional[int] = None, seed: int = 0, curvature_data: str = "edited",
    curvature_loss_fn: Optional[PerExampleLossFn] = None, corrupted=None,
) -> EditProblem:
  """Returns the EditProblem of fixing the labels of the `changed` training examples.

  `changed` is a boolean (N,) array of the examples whose label is fixed and
  `corrected_labels` their new labels (in order). g = label_change_gradient
  (scaled by 1/N). H = curvature (+ damping·I) of the mean of
  `curvature_loss_fn` (default per_example_loss_fn; the GIF authors: the
  cross-entropy without the L2 term) on the rows of `curvature_rows`: the
  corrected training set (curvature_data="edited") or the examples never
  corrupted (curvature_data="clean", ~`corrupted`, default ~changed; the
  authors' protocol), `hessian_examples` of them drawn once with `seed`.
  The line-search objective is the corrected training set's mean loss.
  """
  changed = np.asarray(changed, bool)
  corrected_labels = np.asarray(corrected_labels)
  if changed.shape != np.shape(train_batch["y"]) or corrected_labels.shape != (int(changed.sum()),):
    raise ValueError(f"changed must be a boolean mask over the {np.shape(train_batch['y'])} training labels and "
                     f"corrected_labels hold one label per changed example; got {changed.shape} and "
                     f"{corrected_labels.shape}.")
  wrong = select_examples(train_batch, changed)
  fixed = dict(wrong, y=corrected_labels.astype(np.asarray(train_batch["y"]).dtype))
  new_y = np.array(train_batch["y"])
  new_y[changed] = fixed["y"]
  corrected = dict(train_batch, y=new_y)
  g = gif_updates.label_change_gradient(per_example_loss_fn, params, [wrong], [fixed], num_examples=changed.size)
  curv = _rows(corrected, curvature_rows(changed, curvature_data, hessian_examples, seed, corrupted))
  return _problem(per_example_loss_fn, params, corrected, g, curv, damping, curvature, microbatch_size,
                  curvature_loss_fn)


def label_change_edit(
    per_example_loss_fn: PerExampleLossFn, params: Params, train_batch: Batch, changed, corrected_labels, *,
    method: str = "gif", mask: Optional[Params] = None, damping: float = 0.0, curvature: str = "hessian",
    microbatch_size: Optional[int] = None, scales: Sequence[float] = gif_steps.DEFAULT_SCALES, **solver_kwargs,
) -> EditResult:
  """Returns θ (trained on train_batch's wrong labels) edited towards retraining on corrected labels.

  See `label_change_problem`; the step is chosen by the corrected-set training loss.
  """
  problem = label_change_problem(per_example_loss_fn, params, train_batch, changed, corrected_labels,
                                 damping=damping, curvature=curvature, microbatch_size=microbatch_size)
  return solve_edit(problem, method, mask, scales, **solver_kwargs)
