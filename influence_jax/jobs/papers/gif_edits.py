"""The GIF jobs' shared machinery: the models of a config, the target sets, every solver's update and its metrics
under every step rule (`gif_job` runs class removal and label change on it)."""

from __future__ import annotations

import jax
import ml_collections
from absl import logging

from influence_jax import flax_adapters
from influence_jax.examples import tasks
from influence_jax.methods import gif_selection
from influence_jax.methods import gif_steps
from influence_jax.methods import gif_tasks
from influence_jax.methods import gif_updates
from influence_jax.methods import training


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
    task = tasks.build_example(with_seed(config, seed))
    strip = lambda b: {"x": b["x"], "y": b["y"]}
    return strip(task.splits["train"]), strip(task.splits["test"])

  def init(self, config, seed: int):
    """Returns the initial params of `seed`."""
    return tasks.init_variables(self.task, with_seed(config, seed))["params"]

  def train(self, config, init_params, batch: dict, seed: int, optimizer):
    """Returns params trained from `init_params` on `batch` as config.train says (minibatch order from `seed`)."""
    t = config.train
    params, _ = training.train(self.fns.loss_fn, init_params, {"x": batch["x"], "y": batch["y"]},
                               optimizer=optimizer, num_epochs=t.num_epochs, batch_size=t.batch_size, seed=seed)
    return params


def solver_kwargs(e, solver: str, method: str) -> dict:
  """Returns `gif_tasks.influence_update`'s solver keywords for `solver` (an entry of config.edit.solvers)."""
  if solver == "neumann":
    return dict(solver="neumann", max_iters=e.neumann_iters, tol=1e-9,
                neumann=dict(normaliser=e.neumann_normaliser, growth=e.neumann_growth, rule=e.neumann_rule,
                             max_restarts=e.neumann_max_restarts))
  if solver == "cg":
    return dict(solver="cg" if method == "gif" else "normal", tol=e.cg_tol, max_iters=e.cg_max_iters)
  raise ValueError(f"Unknown config.edit.solvers entry {solver!r}; expected 'neumann' or 'cg'.")


def target_sets(config, models: Models, params, selection_batch, seed: int, notes: list) -> list:
  """Returns [(label, mask)] for every ratio and selection; logs the per-layer counts (and notes them once)."""
  e = config.edit
  out = []
  for ratio in e.ratios:
    for sel in e.selections:
      t = gif_selection.select_parameters(params, ratio=ratio, method=sel, loss_fn=models.fns.loss_fn,
                                          target_batch=selection_batch, seed=seed, fill=e.partial_fill)
      label = f"{sel} {100 * ratio:g}%"
      line = f"selected parameters, {label}: {t.counts()}"
      if line not in notes:
        notes.append(line)
        logging.info("Target set %s:\n%s", label, t.summary())
      out.append((label, t.mask))
  return out


def row(problem, update, metrics_fn, paper_score, practical_score, target, e) -> dict:
  """Returns the metrics of θ + sΔ under every step rule, with each rule's s and the solve's diagnostics."""
  theta, delta = problem.params, update.delta
  walk = dict(step=e.walk_step, max_steps=e.walk_max_steps, patience=e.walk_patience)
  paper = gif_steps.walk(paper_score, theta, delta, **walk).scale
  scales = {
      "paper_": paper,
      "nearest_": gif_steps.nearest_scale(metrics_fn, target, theta, delta, tuple(e.scales))[0],
      # Label change scores both walks by the same training-data f1: the same walk, run once.
      "practical_": paper if practical_score is paper_score else gif_steps.walk(practical_score, theta, delta,
                                                                                 **walk).scale,
      "loss_": gif_steps.line_search(problem.train_loss, theta, delta, tuple(e.scales))[0],
      "first_order_": 1.0,
  }
  row = dict(rel_residual=float(update.relative_residual), iters=int(update.num_iters),
             normaliser=float(update.normaliser))
  for prefix, s in scales.items():
    m = metrics_fn(gif_updates.apply_update(theta, delta, s))
    row.update({prefix + k: v for k, v in m.items()}, **{prefix + "scale": s})
  return row


def edits(config, make_problem, models, selection_batch, seed, metrics_fn, scores, target, notes) -> dict:
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
      targets = target_sets(config, models, problem.params, selection_batch, seed, notes)
    jobs = [("IF (all)", "if", None)] if "if" in e.methods else []
    jobs += [(f"{m.upper()} ({label})", m, mask) for label, mask in targets for m in e.methods if m != "if"]
    for name, method, mask in jobs:
      update = gif_tasks.influence_update(method, problem.hessian, problem.g, mask, **solver_kwargs(e, solver, method))
      rows[f"{name} {solver}"] = row(problem, update, metrics_fn, *scores, target, e)
  return rows


def curvature_kwargs(config, models: Models, seed: int, damping: float) -> dict:
  """Returns the curvature keywords of a class-removal or label-change problem (config.edit; no L2 term when
  config.edit.curvature_l2 is False)."""
  e = config.edit
  return dict(damping=damping, curvature=e.curvature, seed=seed,
              curvature_loss_fn=None if e.curvature_l2 else models.fns.per_example_loss_fn,
              hessian_examples=e.hessian_examples if e.hessian_examples > 0 else None)


def with_seed(config, seed: int):
  """Returns a copy of `config` with config.seed = seed."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = seed
  return c
