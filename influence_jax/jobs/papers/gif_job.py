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
  images (true class ≠ target) predicted as the target class.

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

Mean ± std are over seeds, std with ddof=0. The job writes to the work directory:

  results.md    mean ± std over seeds, one table per step rule, one row per model
  results.csv   one row per seed and model: every metric
  results.json  the config, the per-seed values and their mean and std
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from influence_jax import flax_adapters
from influence_jax import paths as paths_lib
from influence_jax.examples import datasets
from influence_jax.examples import tasks
from influence_jax.jobs import config as config_lib
from influence_jax.jobs.papers import gif_report
from influence_jax.methods import gif_selection
from influence_jax.methods import gif_steps
from influence_jax.methods import gif_tasks
from influence_jax.methods import gif_updates
from influence_jax.methods import training

TASKS = ("class_removal", "label_change")
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


class Models:
  """The task of seed 0, its ModelFns, the per-example loss with the L2 term inside and jitted outputs(params, batch).

  The functions do not depend on the seed, so the jitted training, curvature
  and solver loops are compiled once for all seeds. This is the job's only
  use of the built-in examples (influence_jax.examples.tasks) (with `splits` and `init`).
  """

  def __init__(self, config):
    self.task = tasks.build_example(config)
    self.fns = tasks.model_fns(self.task, tasks.init_variables(self.task, config), config)
    l2 = config.train.l2
    self.per_example = lambda p, b: self.fns.per_example_loss_fn(p, b) + l2 * flax_adapters.l2_penalty(p)
    self.outputs = jax.jit(self.fns.outputs_fn)

  def splits(self, config, seed: int) -> tuple[dict, dict]:
    """Returns the (train, test) batches {"x", "y"} of `seed`."""
    task = tasks.build_example(_with_seed(config, seed))
    strip = lambda b: {"x": b["x"], "y": b["y"]}
    return strip(task.splits["train"]), strip(task.splits["test"])

  def init(self, config, seed: int):
    """Returns the initial params of `seed`."""
    return tasks.init_variables(self.task, _with_seed(config, seed))["params"]

  def train(self, config, init_params, batch: dict, seed: int, optimizer):
    t = config.train
    params, _ = training.train(self.fns.loss_fn, init_params, {"x": batch["x"], "y": batch["y"]},
                               optimizer=optimizer, num_epochs=t.num_epochs, batch_size=t.batch_size, seed=seed)
    return params


def _solver_kwargs(e, solver: str, method: str) -> dict:
  if solver == "neumann":
    return dict(solver="neumann", max_iters=e.neumann_iters, tol=1e-9,
                neumann=dict(normaliser=e.neumann_normaliser, growth=e.neumann_growth))
  if solver == "cg":
    return dict(solver="cg" if method == "gif" else "normal", tol=e.cg_tol, max_iters=e.cg_max_iters)
  raise ValueError(f"Unknown config.edit.solvers entry {solver!r}; expected 'neumann' or 'cg'.")


def _targets(config, models: Models, params, selection_batch, seed: int, notes: list) -> list:
  """Returns [(label, mask)] for every ratio and selection; logs the per-layer counts (and notes them once)."""
  e = config.edit
  out = []
  for ratio in e.ratios:
    for sel in e.selections:
      t = gif_selection.select_parameters(params, ratio=ratio, method=sel, loss_fn=models.fns.loss_fn,
                                          target_batch=selection_batch, seed=seed)
      label = f"{sel} {100 * ratio:g}%"
      line = f"selected parameters, {label}: {t.counts()}"
      if line not in notes:
        notes.append(line)
        logging.info("Target set %s:\n%s", label, t.summary())
      out.append((label, t.mask))
  return out


def _row(problem, update, metrics_fn, paper_score, practical_score, target, e) -> dict:
  """Returns the metrics of θ + sΔ under every step rule, with each rule's s and the solve's diagnostics."""
  theta, delta = problem.params, update.delta
  walk = dict(step=e.walk_step, max_steps=e.walk_max_steps, patience=e.walk_patience)
  scales = {
      "paper_": gif_steps.walk(paper_score, theta, delta, **walk).scale,
      "nearest_": gif_steps.nearest_scale(metrics_fn, target, theta, delta, tuple(e.scales))[0],
      "practical_": gif_steps.walk(practical_score, theta, delta, **walk).scale,
      "loss_": gif_steps.line_search(problem.train_loss, theta, delta, tuple(e.scales))[0],
      "first_order_": 1.0,
  }
  row = dict(rel_residual=float(update.relative_residual), iters=int(update.num_iters),
             normaliser=float(update.normaliser))
  for prefix, s in scales.items():
    m = metrics_fn(gif_updates.apply_update(theta, delta, s))
    row.update({prefix + k: v for k, v in m.items()}, **{prefix + "scale": s})
  return row


def _edits(config, make_problem, models, selection_batch, seed, metrics_fn, scores, target, notes) -> dict:
  """Returns {row name: metrics under every step rule} for every solver, method and target set."""
  e = config.edit
  rows = {}
  problems = {}
  targets = None
  for solver in e.solvers:
    damping = 0.0 if solver == "neumann" else e.damping
    if damping not in problems:
      problems[damping] = make_problem(damping)
    problem = problems[damping]
    if targets is None:
      targets = _targets(config, models, problem.params, selection_batch, seed, notes)
    jobs = [("IF (all)", "if", None)] if "if" in e.methods else []
    jobs += [(f"{m.upper()} ({label})", m, mask) for label, mask in targets for m in e.methods if m != "if"]
    for name, method, mask in jobs:
      update = gif_tasks.influence_update(method, problem.hessian, problem.g, mask, **_solver_kwargs(e, solver, method))
      rows[f"{name} {solver}"] = _row(problem, update, metrics_fn, *scores, target, e)
  return rows


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
                                                         **_curvature_kwargs(config, seed, damping))
  rows = {"original": metrics(params), "retrained": target}
  rows.update(_edits(config, make, models, gif_tasks.select_examples(train_b, ~keep), seed, metrics,
                     (test_f1, train_f1), {k: target[k] for k in NEAREST_KEYS["class_removal"]}, notes))
  return rows


def _corrupt(config, train_b, test_b, seed):
  """Returns (x, wrong labels, changed mask, triggered test batch or None) of config.corruption."""
  k = config.corruption
  x, y = train_b["x"], train_b["y"]
  if k.kind == "trigger":
    x, wrong_y, changed = datasets.add_trigger(x, y, fraction=k.fraction, target_class=k.target_class, seed=seed,
                                               size=k.trigger_size)
    others = test_b["y"] != k.target_class
    attack_b = {"x": datasets.stamp_trigger(test_b["x"][others], size=k.trigger_size),
                "y": np.full(int(others.sum()), k.target_class, np.int32)}
  elif k.kind == "flip":
    wrong_y, changed = datasets.flip_labels(y, k.fraction, config.model.num_classes, seed)
    attack_b = None
  else:
    raise ValueError(f"Unknown config.corruption.kind {k.kind!r}; expected 'trigger' or 'flip'.")
  if not changed.any():
    raise ValueError(f"config.corruption.fraction={k.fraction} corrupts no training example.")
  return x, wrong_y, changed, attack_b


def _label_change_seed(config, seed: int, models: Models, optimizer, notes) -> dict:
  train_b, test_b = models.splits(config, seed)
  init = models.init(config, seed)
  x, wrong_y, changed, attack_b = _corrupt(config, train_b, test_b, seed)
  y = train_b["y"]
  wrong_b, fixed_b = {"x": x, "y": wrong_y}, {"x": x, "y": y}
  params = models.train(config, init, wrong_b, seed, optimizer)
  retrained = models.train(config, init, fixed_b, seed, optimizer)
  changed_b = gif_tasks.select_examples(fixed_b, changed)
  clean_b = gif_tasks.select_examples(fixed_b, ~changed)

  def train_metrics(p):  # The authors' metrics: training data (the editor holds these labels).
    m = gif_tasks.label_change_metrics(models.outputs, p, clean_b, changed_b, wrong_y[changed])
    return dict(clean=m["clean"], relabelled=m["relabelled"], attack=m["backdoor"],
                f1=gif_tasks.edit_f1(m["relabelled"], m["clean"]))

  def metrics(p):
    m = dict(train_metrics(p), test_clean=training.accuracy(models.outputs, p, test_b))
    m["test_attack"] = training.accuracy(models.outputs, p, attack_b) if attack_b is not None else float("nan")
    return m

  f1 = lambda p: train_metrics(p)["f1"]
  target = metrics(retrained)
  make = lambda damping: gif_tasks.label_change_problem(models.per_example, params, wrong_b, changed, y[changed],
                                                        **_curvature_kwargs(config, seed, damping))
  rows = {"original": metrics(params), "retrained": target}
  nearest = {k: target[k] for k in NEAREST_KEYS["label_change"] if np.isfinite(target[k])}
  rows.update(_edits(config, make, models, gif_tasks.select_examples(wrong_b, changed), seed, metrics, (f1, f1),
                     nearest, notes))
  return rows


def _curvature_kwargs(config, seed: int, damping: float) -> dict:
  e = config.edit
  return dict(damping=damping, curvature=e.curvature, seed=seed,
              hessian_examples=e.hessian_examples if e.hessian_examples > 0 else None)


def _with_seed(config, seed: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = seed
  return c


def run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict:
  """Runs config.gif_task over config.seeds seeds; writes results.{md,csv,json} in workdir (after every seed,
  so a stopped run leaves the seeds it finished) and returns their paths."""
  if config.gif_task not in TASKS:
    raise ValueError(f"Unknown config.gif_task {config.gif_task!r}; expected one of {TASKS}.")
  if config.seeds < 1:
    raise ValueError(f"config.seeds must be at least 1; got {config.seeds}.")
  bad = set(config.edit.methods) - set(gif_tasks.METHODS)
  if bad:
    raise ValueError(f"Unknown config.edit.methods {sorted(bad)}; expected some of {gif_tasks.METHODS}.")
  for solver in config.edit.solvers:
    _solver_kwargs(config.edit, solver, "gif")
  paths_lib.makedirs(workdir)
  models = Models(config)
  optimizer = training.optimizer_from_config(config.train)
  run_seed = _class_removal_seed if config.gif_task == "class_removal" else _label_change_seed
  e = config.edit
  notes = [f"solvers: neumann = {e.neumann_iters} Neumann iterations, no damping, normaliser from "
           f"{e.neumann_normaliser} × {e.neumann_growth} on divergence; cg = CG (normal equations) to relative "
           f"residual {e.cg_tol} or {e.cg_max_iters} iterations, damping {e.damping}",
           f"curvature: {e.curvature} of the edited training loss on "
           f"{'all' if e.hessian_examples <= 0 else e.hessian_examples} edited training examples",
           f"walk: steps of {e.walk_step}·‖Δ‖, at most {e.walk_max_steps}, stop after {e.walk_patience} without "
           "improvement, then 3 halvings around the best point; `scale` is in units of Δ"]
  t0 = time.perf_counter()
  per_seed = []
  paths = None
  for seed in range(config.seeds):
    per_seed.append(run_seed(config, seed, models, optimizer, notes))
    if not quiet:
      logging.info("seed %d done after %.0f s", seed, time.perf_counter() - t0)
    paths = gif_report.write(workdir, config, per_seed, COLUMNS[config.gif_task], STEP_RULES, notes,
                             time.perf_counter() - t0)
  return paths


def default_config(gif_task: str = "class_removal") -> ml_collections.ConfigDict:
  """Returns every key of a GIF job, at the MLP's values; `gif_task` ("class_removal" or "label_change")
  picks the edit (label change: 5 % of the parameters by output ranking and a backdoor-trigger corruption)."""
  if gif_task not in TASKS:
    raise ValueError(f"Unknown gif_task {gif_task!r}; expected one of {TASKS}.")
  c = ml_collections.ConfigDict()
  c.gif_task = gif_task
  c.seed = 0  # Only builds the model; each of the `seeds` runs uses its own seed for data, init and selection.
  c.seeds = 5
  c.data = dict(name="digits", test_fraction=0.2, num_train=-1, num_test=-1)
  c.model = dict(name="mlp", features=(32,), num_classes=10, activation="tanh")
  # Retraining too; momentum: sgd only.
  c.train = dict(optimizer="adam", learning_rate=3e-3, num_epochs=60, batch_size=128, l2=1e-3, momentum=0.9)
  c.edit = dict(
      ratios=(0.1, 0.3, 0.5),  # Fraction of each Dense/Conv layer's parameters in the target set (exact budget).
      selections=("gradient",),  # Unit ranking: "output", "gradient" or "random".
      methods=("gif", "fif", "pif", "if"),
      solvers=("neumann", "cg"),  # Every edit is solved by each; one row per solver.
      neumann_iters=30,  # The authors' early-stopped Neumann iteration (no damping).
      neumann_normaliser=1.0,
      neumann_growth=1.25,
      damping=1e-3,  # CG only: added to the Hessian of the edited training loss.
      curvature="hessian",  # or "gauss_newton"
      hessian_examples=-1,  # Edited-training-set examples the curvature averages over (-1: all).
      cg_max_iters=100,
      cg_tol=1e-5,
      scales=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0),
      walk_step=0.25,  # The walks' step, in units of the update Δ.
      walk_max_steps=256,
      walk_patience=64,  # Steps without a better score before the coarse walk stops (f1 has plateaus).
  )
  if gif_task == "class_removal":
    c.edit.removed_class = 8
  else:
    c.edit.ratios = (0.05,)  # The authors' label-change setting: 5 % of the parameters, output ranking.
    c.edit.selections = ("output",)
    c.corruption = dict(
        kind="trigger",  # "trigger": datasets.add_trigger (stamp + target label); "flip": datasets.flip_labels.
        fraction=0.1,  # Of the training examples (the authors: 10 %).
        target_class=7,  # The trigger's label (unused by "flip").
        trigger_size=3,
    )
  return c


def config_checker(gif_task: str) -> Callable:
  """Returns the `cli.run` check of a GIF job's config: every key must be one of
  `default_config(config.gif_task)`'s (a config for the other task is refused by the job itself)."""

  def check(config) -> None:
    kind = config.get("gif_task", gif_task)
    kind = kind if kind in TASKS else gif_task
    config_lib.check_keys(config, default_config(kind), what=f"the GIF {kind} job", new_top_level=False,
                          defaults=f"influence_jax.jobs.papers.gif_job.default_config({kind!r})")

  return check


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
