"""The GIF editing jobs' work (scripts/gif_class_removal.py, scripts/gif_label_change.py) as library functions.

For each seed s in range(config.seeds): the data split (datasets.load_digits
seed), the initialisation, the minibatch order, the corrupted examples and the
random unit selection all use s. A model is trained (training.train, Adam) on
the training set, then

- class removal: edited to forget every training example of
  config.edit.removed_class, and compared with a model retrained from the same
  initialisation without that class. Metrics on the test set: accuracy on the
  removed class ("removed", lower is better), on the other classes ("rest"),
  and f1 = harmonic mean of (1 − removed) and rest (`gif_tasks.removal_f1`),
  also divided by the retrained model's f1 ("f1_rel");
- label change: trained on labels corrupted by a backdoor trigger
  (datasets.add_trigger: the trigger stamped on a fraction of the images,
  their label set to the target class) or by random flips (datasets.flip_labels),
  edited to correct them, and compared with retraining on the corrected labels.
  Metrics: "clean" test accuracy, "relabelled" = accuracy of the corrupted
  training examples against their corrected labels, "corrupted" = the fraction
  of them still predicted as their wrong label, and for the trigger
  "attack" = the fraction of triggered test images (true class ≠ target)
  predicted as the target class.

Each edit (IF on every parameter; GIF, FIF, PIF on the units chosen by each
selection in config.edit.selections; output and gradient selection score units
on the examples being edited: the removed class, or the corrupted examples with
their wrong labels) takes the step size with the lowest
edited *training* loss (no test labels). Reported apart: the plain first-order
step (scale 1, columns prefixed "first_order_") and the oracle step (metrics,
test labels included, closest to the retrained model's, `gif_tasks.oracle_scale`,
prefixed "oracle_"). Mean ± std are over seeds, std with ddof=0. The job writes to the work directory:

  results.md    mean ± std over seeds, one table per step rule, one row per model / method (selection)
  results.csv   one row per seed and model: every metric
  results.json  the config, the per-seed values and their mean and std
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from influence_jax import flax_adapters
from influence_jax.examples import datasets
from influence_jax.methods import gif
from influence_jax.methods import gif_tasks
from influence_jax.examples import tasks
from influence_jax.jobs import common
from influence_jax.examples import training

TASKS = ("class_removal", "label_change")
STEP_RULES = (
    ("", "step size by the line search on the edited training loss (no test labels)"),
    ("first_order_", "plain first-order step, scale 1"),
    ("oracle_", "oracle step size: metrics closest to the retrained model's (looks at test labels)"),
)
_COLUMNS = {
    "class_removal": ("removed", "rest", "f1", "f1_rel"),
    "label_change": ("clean", "relabelled", "corrupted", "attack"),
}


def _models(config) -> tuple[tasks.Example, flax_adapters.ModelFns, Callable, Callable]:
  """Returns (task of seed 0, ModelFns, per-example loss with the L2 term inside, jitted logits(params, x)).

  The functions do not depend on the seed, so the jitted training, curvature
  and CG loops are compiled once for all seeds.
  """
  task = tasks.build_example(config)
  fns = tasks.model_fns(task, tasks.init_variables(task, config), config)
  l2 = config.train.l2
  per_example = lambda p, b: fns.per_example_loss_fn(p, b) + l2 * flax_adapters.l2_penalty(p)
  logits = jax.jit(lambda p, x: fns.outputs_fn(p, {"x": x}))
  return task, fns, per_example, logits


def _train(config, fns: flax_adapters.ModelFns, init_params, batch: dict, seed: int, optimizer):
  t = config.train
  params, _ = training.train(fns.loss_fn, init_params, {"x": batch["x"], "y": batch["y"]}, optimizer=optimizer,
                             num_epochs=t.num_epochs, batch_size=t.batch_size, seed=seed)
  return params


def _edits(config, problem: gif_tasks.EditProblem, fns, selection_batch, seed: int, metrics_fn, target) -> dict:
  """Returns {row name: metrics + scale, residual, CG iterations and the oracle's metrics} for every edit."""
  e = config.edit
  solver = dict(tol=e.cg_tol, max_iters=e.cg_max_iters)
  jobs = [("IF (all)", "if", None)] if "if" in e.methods else []
  for sel in e.selections:
    s = gif.select_parameters(problem.params, ratio=e.ratio, method=sel, loss_fn=fns.loss_fn,
                              target_batch=selection_batch, seed=seed)
    if seed == 0:
      logging.info("Selection %s:\n%s", sel, s.summary())
    jobs += [(f"{m.upper()} ({sel})", m, s.mask) for m in e.methods if m != "if"]
  rows = {}
  for name, method, mask in jobs:
    res = gif_tasks.solve_edit(problem, method, mask, tuple(e.scales), **solver)
    oracle_s, oracle_m = gif_tasks.oracle_scale(metrics_fn, target, problem.params, res.update.delta, tuple(e.scales))
    first_order = metrics_fn(gif.apply_update(problem.params, res.update))
    rows[name] = dict(metrics_fn(res.params), scale=res.scale, rel_residual=float(res.update.relative_residual),
                      cg_iters=int(res.update.num_iters),
                      **{f"first_order_{k}": v for k, v in first_order.items()}, first_order_scale=1.0,
                      **{f"oracle_{k}": v for k, v in oracle_m.items()}, oracle_scale=oracle_s)
  return rows


def _class_removal_seed(config, seed: int, models, optimizer) -> dict:
  task, fns, per_example, logits = models
  c = config.edit.removed_class
  train_b, test_b = _splits(config, seed)
  init = tasks.init_variables(task, _with_seed(config, seed))["params"]
  keep = train_b["y"] != c
  params = _train(config, fns, init, train_b, seed, optimizer)
  retrained = _train(config, fns, init, gif_tasks.select_examples(train_b, keep), seed, optimizer)

  def metrics(p):
    m = gif_tasks.class_removal_metrics(logits, p, test_b, c)
    return dict(m, f1=gif_tasks.removal_f1(m["removed"], m["rest"]))

  target = metrics(retrained)
  problem = gif_tasks.class_removal_problem(per_example, params, train_b, c, **_curvature_kwargs(config, seed))
  rows = {"original": metrics(params), "retrained": target}
  rows.update(_edits(config, problem, fns, gif_tasks.select_examples(train_b, ~keep), seed, metrics,
                     {"removed": target["removed"], "rest": target["rest"]}))
  for r in rows.values():
    for prefix, _ in STEP_RULES:
      if prefix + "f1" in r:
        r[prefix + "f1_rel"] = r[prefix + "f1"] / target["f1"] if target["f1"] > 0 else float("nan")
  return rows


def _label_change_seed(config, seed: int, models, optimizer) -> dict:
  task, fns, per_example, logits = models
  k = config.corruption
  train_b, test_b = _splits(config, seed)
  init = tasks.init_variables(task, _with_seed(config, seed))["params"]
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
  wrong_b, fixed_b = {"x": x, "y": wrong_y}, {"x": x, "y": y}
  params = _train(config, fns, init, wrong_b, seed, optimizer)
  retrained = _train(config, fns, init, fixed_b, seed, optimizer)
  changed_b = gif_tasks.select_examples(fixed_b, changed)

  def metrics(p):
    m = gif_tasks.label_change_metrics(logits, p, test_b, changed_b, wrong_y[changed])
    m = {"clean": m["clean"], "relabelled": m["relabelled"], "corrupted": m["backdoor"]}
    if attack_b is not None:
      m["attack"] = gif_tasks.accuracy(logits, p, attack_b)
    return m

  target = metrics(retrained)
  problem = gif_tasks.label_change_problem(per_example, params, wrong_b, changed, y[changed],
                                           **_curvature_kwargs(config, seed))
  rows = {"original": metrics(params), "retrained": target}
  rows.update(_edits(config, problem, fns, gif_tasks.select_examples(wrong_b, changed), seed, metrics, target))
  return rows


def _curvature_kwargs(config, seed: int) -> dict:
  e = config.edit
  return dict(damping=e.damping, curvature=e.curvature, seed=seed,
              hessian_examples=e.hessian_examples if e.hessian_examples > 0 else None)


def _with_seed(config, seed: int):
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = seed
  return c


def _splits(config, seed: int) -> tuple[dict, dict]:
  task = tasks.build_example(_with_seed(config, seed))
  strip = lambda b: {"x": b["x"], "y": b["y"]}
  return strip(task.splits["train"]), strip(task.splits["test"])


def summarise(per_seed: list[dict]) -> dict:
  """Returns {row: {metric: {"mean", "std", "values"}}} over seeds (std with ddof=0; nan-aware)."""
  out = {}
  for name in per_seed[0]:
    out[name] = {}
    for key in per_seed[0][name]:
      v = np.array([r[name][key] for r in per_seed], np.float64)
      finite = v[np.isfinite(v)]
      out[name][key] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                        "std": float(finite.std()) if finite.size else float("nan"), "values": v.tolist()}
  return out


def _cell(stat) -> str:
  return "" if stat is None or not np.isfinite(stat["mean"]) else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def markdown_table(summary: dict, columns: tuple[str, ...], prefix: str = "") -> str:
  """Returns a markdown table, one row per model, of `columns` under the step rule `prefix` (see STEP_RULES).

  The original and retrained models (no step) show their plain metrics in every table.
  """
  extra = ("scale", "rel_residual", "cg_iters") if prefix == "" else ("scale",)
  cols = [c for c in columns + extra if any(prefix + c in r or c in r for r in summary.values())]
  lines = ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
  for name, r in summary.items():
    edited = "scale" in r
    cells = [_cell(r.get(prefix + c if edited else c)) for c in cols]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _write(workdir: str, config, per_seed: list[dict], summary: dict, columns, seconds: float) -> dict:
  paths = {k: os.path.join(workdir, f"results.{k}") for k in ("md", "csv", "json")}
  keys = sorted({k for r in per_seed for row in r.values() for k in row})
  rows = [["seed", "model"] + keys]
  for seed, r in enumerate(per_seed):
    for name, row in r.items():
      rows.append([seed, name] + [f"{row[k]:.6g}" if k in row else "" for k in keys])
  record = {"task": config.task, "config": config.to_dict(), "seeds": len(per_seed), "seconds": seconds,
            "summary": summary}
  header = (f"# {config.task} on digits, model {config.model.name}: mean ± std over {len(per_seed)} seeds "
            f"({seconds:.0f} s)\n\n")
  tables = [f"## {what}\n\n{markdown_table(summary, columns, prefix)}\n" for prefix, what in STEP_RULES]
  common.atomic_write_csv(paths["csv"], rows)
  common.atomic_write_json(paths["json"], record)
  common.atomic_write_text(paths["md"], header + "\n".join(tables))
  return paths


def run(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict:
  """Runs config.task over config.seeds seeds; writes results.{md,csv,json} in workdir and returns their paths."""
  if config.task not in TASKS:
    raise ValueError(f"Unknown config.task {config.task!r}; expected one of {TASKS}.")
  if config.seeds < 1:
    raise ValueError(f"config.seeds must be at least 1; got {config.seeds}.")
  bad = set(config.edit.methods) - set(gif_tasks.METHODS)
  if bad:
    raise ValueError(f"Unknown config.edit.methods {sorted(bad)}; expected some of {gif_tasks.METHODS}.")
  os.makedirs(workdir, exist_ok=True)
  models = _models(config)
  optimizer = common.optimizer_from_config(config.train)
  run_seed = _class_removal_seed if config.task == "class_removal" else _label_change_seed
  t0 = time.perf_counter()
  per_seed = []
  for seed in range(config.seeds):
    per_seed.append(run_seed(config, seed, models, optimizer))
    if not quiet:
      logging.info("seed %d done after %.0f s", seed, time.perf_counter() - t0)
  summary = summarise(per_seed)
  return _write(workdir, config, per_seed, summary, _COLUMNS[config.task], time.perf_counter() - t0)


def job_main(task: str) -> Callable[[list], None]:
  """Returns the absl `main` of the job for `task` ("class_removal" or "label_change").

  It reads --config/--workdir (influence_jax.cli), refuses a config made for the other task,
  runs `run`, and prints the results table and the paths written.
  """
  from influence_jax.jobs import cli# Defines the absl flags: only the jobs need them.

  def main(argv):
    del argv
    config, workdir, quiet, _ = cli.setup()
    if config.task != task:
      raise ValueError(f"config.task is {config.task!r}; this job runs {task!r} (use configs/gif_{task}_*.py).")
    paths = run(config, workdir, quiet=quiet)
    with open(paths["md"]) as f:
      print(f.read())
    print("\n".join(f"  {k}: {v}" for k, v in paths.items()))

  return main
