"""The GIF editing jobs' work (scripts/gif_class_removal.py, scripts/gif_label_change.py) as library functions.

For each seed s in range(config.seeds): the data split (datasets.load_digits
seed), the initialisation, the minibatch order, the corrupted examples and the
random unit selection all use s. A model is trained (training.train, the
optimizer of config.train) on the training set, then

- class removal: edited to forget every training example of
  config.edit.removed_class, and compared with a model retrained from the same
  initialisation without that class. Test metrics: accuracy on the removed
  class ("removed"), on the other classes ("rest"), f1 = harmonic mean of
  (1 − removed) and rest (`gif_tasks.removal_f1`; the authors' metric); the
  same three on the training data ("train_removed", "train_rest", "train_f1").
- label change: trained on labels corrupted by a backdoor trigger
  (datasets.add_trigger) or by random flips (datasets.flip_labels), edited to
  correct them, and compared with retraining on the corrected labels. Metrics
  on the training data, as the authors measure them: "clean" = accuracy on the
  unchanged examples, "relabelled" = accuracy of the corrupted examples against
  their corrected labels, "attack" = the fraction of them still predicted as
  their wrong label, f1 = harmonic mean of relabelled and clean; and held out:
  "test_clean" = test accuracy, "test_attack" = the fraction of triggered test
  images (true class ≠ target) predicted as the target class. The curvature is
  that of the corrected training set or of the never-corrupted examples only
  (config.edit.curvature_data, the authors' "clean"; `gif_config`). With
  config.edit.spread = "redraws" the spread is the authors': one model (seed
  config.seed) and config.edit.redraws draws of the edited subset (a fraction
  of the corrupted examples; selection and fill seeded by the draw), metrics
  always on every corrupted example.

Edits: IF on every parameter; GIF, FIF, PIF on the target set of every ratio
in config.edit.ratios and selection in config.edit.selections (exact budget
int(r · size) per layer, `gif_selection`), each solved by every solver of
config.edit.solvers ("neumann": the authors' early-stopped Neumann iteration,
no damping; "cg": CG with config.edit.damping). Step rules (`gif_steps`), one
table each:

  paper_      the authors' protocol: walk along Δ, keep the best evaluation F1
              (class removal: test f1, an ORACLE; label change: training-data f1,
              which only uses labels the editor holds)
  nearest_    ORACLE: the scale of config.edit.scales whose test metrics are
              closest (L1) to the retrained model's
  practical_  label-free: walk along Δ, keep the best training-data f1 (the
              examples being edited and the rest of the training set)
  loss_       the scale of config.edit.scales with the lowest edited training loss
  first_order_ scale 1

Mean ± std are over seeds (or re-draws), std with ddof=0. The job writes to the work directory:

  results.md    mean ± std over seeds, one table per step rule, one row per model
  results.csv   one row per seed and model: every metric
  results.json  the config, the per-seed values and their mean and std
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

import ml_collections
import numpy as np
from absl import logging

from influence_jax import paths as paths_lib
from influence_jax.examples import datasets
from influence_jax.jobs.papers import gif_config
from influence_jax.jobs.papers import gif_edits
from influence_jax.jobs.papers import gif_report
from influence_jax.methods import gif_tasks
from influence_jax.methods import training

TASKS = gif_config.TASKS
Models = gif_edits.Models
default_config = gif_config.default_config  # Every key and its meaning (the scripts and configs use these names).
config_checker = gif_config.config_checker
STEP_RULES = (
    ("paper_", "the authors' protocol: walk along the update, keep the best evaluation f1 (class removal: "
               "ORACLE, test labels; label change: training data)"),
    ("nearest_", "ORACLE: scale whose test metrics are closest to the retrained model's"),
    ("practical_", "label-free: walk along the update, keep the best training-data f1"),
    ("loss_", "scale with the lowest edited training loss"),
    ("first_order_", "plain first-order step, scale 1"),
)
COLUMNS = {
    "class_removal": ("removed", "rest", "f1", "train_f1"),
    "label_change": ("clean", "relabelled", "attack", "f1", "test_clean", "test_attack"),
}
NEAREST_KEYS = {
    "class_removal": ("removed", "rest"),
    "label_change": ("clean", "relabelled", "attack", "test_clean", "test_attack"),
}


def _class_removal_seed(config, seed: int, models: Models, optimizer, notes) -> dict:
  c = config.edit.removed_class
  train_b, test_b = models.splits(config, seed)
  init = models.init(config, seed)
  keep = train_b["y"] != c
  params = models.train(config, init, train_b, seed, optimizer)
  retrained = models.train(config, init, gif_tasks.select_examples(train_b, keep), seed, optimizer)

  def metrics(p):
    m = gif_tasks.class_removal_metrics(models.outputs, p, test_b, c)
    t = gif_tasks.class_removal_metrics(models.outputs, p, train_b, c)
    return dict(m, f1=gif_tasks.removal_f1(m["removed"], m["rest"]), train_removed=t["removed"],
                train_rest=t["rest"], train_f1=gif_tasks.removal_f1(t["removed"], t["rest"]))

  def test_f1(p):  # ORACLE: test labels.
    m = gif_tasks.class_removal_metrics(models.outputs, p, test_b, c)
    return gif_tasks.removal_f1(m["removed"], m["rest"])

  def train_f1(p):  # Training data only.
    t = gif_tasks.class_removal_metrics(models.outputs, p, train_b, c)
    return gif_tasks.removal_f1(t["removed"], t["rest"])

  target = metrics(retrained)
  make = lambda damping: gif_tasks.class_removal_problem(models.per_example, params, train_b, c,
                                                         **gif_edits.curvature_kwargs(config, models, seed, damping))
  rows = {"original": metrics(params), "retrained": target}
  rows.update(gif_edits.edits(config, make, models, gif_tasks.select_examples(train_b, ~keep), seed, metrics,
                     (test_f1, train_f1), {k: target[k] for k in NEAREST_KEYS["class_removal"]}, notes))
  return rows


def _corrupt(config, train_b, test_b, seed):
  """Returns (x, wrong labels, changed mask, triggered test batch or None) of config.corruption."""
  k = config.corruption
  x, y = train_b["x"], train_b["y"]
  if k.kind == "trigger":
    trig = dict(size=k.trigger_size, amount=k.amount)
    x, wrong_y, changed = datasets.add_trigger(x, y, fraction=k.fraction, target_class=k.target_class, seed=seed,
                                               trigger=k.trigger, include_target=k.include_target, **trig)
    others = test_b["y"] != k.target_class
    attack_b = {"x": datasets.apply_trigger(test_b["x"][others], k.trigger, **trig),
                "y": np.full(int(others.sum()), k.target_class, np.int32)}
  elif k.kind == "flip":
    wrong_y, changed = datasets.flip_labels(y, k.fraction, config.model.num_classes, seed)
    attack_b = None
  else:
    raise ValueError(f"Unknown config.corruption.kind {k.kind!r}; expected 'trigger' or 'flip'.")
  if not changed.any():
    raise ValueError(f"config.corruption.fraction={k.fraction} corrupts no training example.")
  return x, wrong_y, changed, attack_b


class LabelChangeModels(NamedTuple):
  """One seed's corrupted data and its two trained models (the original, on the wrong labels, and the retrained)."""

  seed: int
  train_b: dict
  test_b: dict
  wrong_b: dict  # The training images with the wrong labels.
  changed: np.ndarray  # (N,) bool: the corrupted examples.
  attack_b: Optional[dict]
  params: object
  retrained: object


def label_change_models(config, seed: int, models: Models, optimizer) -> LabelChangeModels:
  """Returns seed `seed`'s split, corruption (config.corruption) and the models trained on the wrong and the true labels."""
  train_b, test_b = models.splits(config, seed)
  init = models.init(config, seed)
  x, wrong_y, changed, attack_b = _corrupt(config, train_b, test_b, seed)
  wrong_b = {"x": x, "y": wrong_y}
  params = models.train(config, init, wrong_b, seed, optimizer)
  retrained = models.train(config, init, {"x": x, "y": train_b["y"]}, seed, optimizer)
  return LabelChangeModels(seed, train_b, test_b, wrong_b, changed, attack_b, params, retrained)


def _label_change_edits(config, m: LabelChangeModels, edited, draw_seed: int, models: Models, notes) -> dict:
  """Returns the rows of one label-change edit: the `edited` (⊆ m.changed) examples relabelled, selection and
  fill seeded by `draw_seed`; metrics on every corrupted example, as the authors measure them."""
  y, changed = m.train_b["y"], m.changed
  fixed_b = {"x": m.wrong_b["x"], "y": y}
  changed_b = gif_tasks.select_examples(fixed_b, changed)
  clean_b = gif_tasks.select_examples(fixed_b, ~changed)
  wrong_y = m.wrong_b["y"]

  def train_metrics(p):  # The authors' metrics: training data (the editor holds these labels).
    r = gif_tasks.label_change_metrics(models.outputs, p, clean_b, changed_b, wrong_y[changed])
    return dict(clean=r["clean"], relabelled=r["relabelled"], attack=r["backdoor"],
                f1=gif_tasks.edit_f1(r["relabelled"], r["clean"]))

  def metrics(p):
    r = dict(train_metrics(p), test_clean=training.accuracy(models.outputs, p, m.test_b))
    r["test_attack"] = training.accuracy(models.outputs, p, m.attack_b) if m.attack_b is not None else float("nan")
    return r

  f1 = lambda p: train_metrics(p)["f1"]
  target = metrics(m.retrained)
  kwargs = lambda damping: dict(gif_edits.curvature_kwargs(config, models, m.seed, damping),
                                curvature_data=config.edit.curvature_data, corrupted=changed)
  make = lambda damping: gif_tasks.label_change_problem(models.per_example, m.params, m.wrong_b, edited, y[edited],
                                                        **kwargs(damping))
  rows = {"original": metrics(m.params), "retrained": target}
  nearest = {k: target[k] for k in NEAREST_KEYS["label_change"] if np.isfinite(target[k])}
  rows.update(gif_edits.edits(config, make, models, gif_tasks.select_examples(m.wrong_b, edited), draw_seed, metrics,
                     (f1, f1), nearest, notes))
  return rows


def _label_change_seed(config, seed: int, models: Models, optimizer, notes) -> dict:
  m = label_change_models(config, seed, models, optimizer)
  return _label_change_edits(config, m, m.changed, seed, models, notes)


def redraw_subset(changed, fraction: float, draw: int) -> np.ndarray:
  """Returns a (N,) bool mask of round(fraction · |changed|) (at least 1) of the `changed` rows, drawn by numpy
  seed `draw`: the subset one of the authors' re-draws edits."""
  rows = np.flatnonzero(np.asarray(changed, bool))
  k = max(1, int(round(fraction * rows.size)))
  out = np.zeros(np.size(changed), bool)
  out[np.random.default_rng(draw).choice(rows, k, replace=False)] = True
  return out


def _notes(config) -> list:
  e = config.edit
  rule = f"× {e.neumann_growth}" if e.neumann_rule == "multiply" else f"+ {e.neumann_growth}"
  data = e.get("curvature_data", "edited")
  what = ("never-corrupted (clean)" if data == "clean" else "edited") + " training examples"
  return [f"solvers: neumann = {e.neumann_iters} Neumann iterations, no damping, normaliser from "
          f"{e.neumann_normaliser} {rule} on divergence; cg = CG (normal equations) to relative "
          f"residual {e.cg_tol} or {e.cg_max_iters} iterations, damping {e.damping}",
          f"curvature: {e.curvature} of the {'training loss (with its L2 term)' if e.curvature_l2 else 'cross-entropy (no L2 term)'} "
          f"on {'all' if e.hessian_examples <= 0 else f'up to {e.hessian_examples}'} {what}",
          f"selection fill: the partly taken unit's leftover budget on its "
          f"{'first kernel entries' if e.partial_fill == 'first' else 'kernel entries drawn at random (seeded)'}",
          f"walk: steps of {e.walk_step}·‖Δ‖, at most {e.walk_max_steps}, stop after {e.walk_patience} without "
          "improvement, then 3 halvings around the best point; `scale` is in units of Δ"]


def _check(config) -> None:
  if config.gif_task not in TASKS:
    raise ValueError(f"Unknown config.gif_task {config.gif_task!r}; expected one of {TASKS}.")
  if config.seeds < 1:
    raise ValueError(f"config.seeds must be at least 1; got {config.seeds}.")
  bad = set(config.edit.methods) - set(gif_tasks.METHODS)
  if bad:
    raise ValueError(f"Unknown config.edit.methods {sorted(bad)}; expected some of {gif_tasks.METHODS}.")
  for solver in config.edit.solvers:
    gif_edits.solver_kwargs(config.edit, solver, "gif")
  gif_config.check(config)


def _runs(config, models: Models, optimizer, notes):
  """Yields one {row: metrics} per seed, or per re-draw of the edited subset on the model of config.seed."""
  if config.gif_task == "label_change" and config.edit.spread == "redraws":
    m = label_change_models(config, config.seed, models, optimizer)
    for draw in range(config.edit.redraws):
      edited = redraw_subset(m.changed, config.edit.redraw_fraction, draw)
      yield _label_change_edits(config, m, edited, draw, models, notes)
    return
  run_seed = _class_removal_seed if config.gif_task == "class_removal" else _label_change_seed
  for seed in range(config.seeds):
    yield run_seed(config, seed, models, optimizer, notes)


def run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict:
  """Runs config.gif_task over config.seeds seeds (or edit.redraws re-draws); writes results.{md,csv,json} in
  workdir (after every seed or draw, so a stopped run leaves those it finished) and returns their paths."""
  _check(config)
  paths_lib.makedirs(workdir)
  models = gif_edits.Models(config)
  optimizer = training.optimizer_from_config(config.train)
  notes = _notes(config)
  redraws = config.gif_task == "label_change" and config.edit.spread == "redraws"
  if redraws:
    notes.append(f"spread: {config.edit.redraws} re-draws of {config.edit.redraw_fraction:g} of the corrupted "
                 f"examples, edited on the one model of seed {config.seed}; metrics on all corrupted examples")
  t0 = time.perf_counter()
  per_seed = []
  paths = None
  for rows in _runs(config, models, optimizer, notes):
    per_seed.append(rows)
    if not quiet:
      logging.info("%s %d done after %.0f s", "draw" if redraws else "seed", len(per_seed) - 1,
                   time.perf_counter() - t0)
    paths = gif_report.write(workdir, config, per_seed, COLUMNS[config.gif_task], STEP_RULES, notes,
                             time.perf_counter() - t0, spread="re-draws" if redraws else "seeds")
  return paths


def job(gif_task: str) -> Callable:
  """Returns the `cli.run` job of `gif_task`: refuses a config made for the other task, runs `run`,
  prints the results table and the paths written."""

  def run_job(invocation) -> None:
    config = invocation.config
    if config.gif_task != gif_task:
      raise ValueError(f"config.gif_task is {config.gif_task!r}; this job runs {gif_task!r} "
                       f"(use configs/gif_{gif_task}_*.py).")
    paths = run(config, invocation.workdir, quiet=invocation.quiet)
    print(paths_lib.read_text(paths["md"]))
    print("\n".join(f"  {k}: {v}" for k, v in paths.items()))

  return run_job
