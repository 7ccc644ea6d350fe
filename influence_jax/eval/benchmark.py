"""Runs every attribution method on benchmark problems and scores it against retraining.

For each problem: train θ* (saving checkpoints for TracIn), retrain the LDS
subsets and the leave-one-out models (cached on disk), run each method, and
report fit / score seconds (first call, JIT compilation included; and a second,
warm call), LDS, leave-one-out Pearson / Spearman and Pearson agreement with
exact influence. All settings come from the config, fixed before any result.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import pathlib
from typing import Callable

import jax
import numpy as np

from influence_jax import config_keys
from influence_jax.eval import baselines, metrics, problems, retraining

COLUMNS = ("problem", "method", "settings", "fit_s", "score_s", "fit_s_warm", "score_s_warm",
           "lds", "loo_pearson", "loo_spearman", "exact_pearson", "info")

TRAINING_KEYS = ("kind", "hidden", "l2", "dtype", "num_train", "num_test", "data_seed", "init_seed",
                 "steps", "learning_rate", "lds_same_init")


# Every key a benchmark config may set: the top level, each problem of config.problems, each method of
# config.methods (its `method` and the keyword settings of that baselines function).
TOP_KEYS = ("workdir", "warm_timings", "problems", "methods", "method_order", "problem_order")
PROBLEM_KEYS = ("kind", "hidden", "l2", "dtype", "num_train", "num_test", "data_seed", "init_seed", "steps",
                "learning_rate", "batch_size", "damping", "lds_subsets", "lds_fraction", "lds_seed", "lds_same_init",
                "loo_points", "loo_seed", "chunk_size", "num_checkpoints", "overrides", "skip")


def method_keys(kind: str) -> tuple:
  """Returns the keys a method of `kind` (baselines.METHODS) may set: "method" and its keyword settings."""
  params = inspect.signature(baselines.METHODS[kind]).parameters
  return ("method",) + tuple(n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY)


def check_config(config) -> None:
  """Raises ValueError naming a key the benchmark does not know (top level, a problem's, a method's
  setting or a problem's override of one), with the key it most resembles, or an unknown method kind."""
  for name, method in config.get("methods", {}).items():
    if method.get("method") not in baselines.METHODS:
      raise ValueError(f"config.methods.{name}.method = {method.get('method')!r}: it must be one of "
                       f"{sorted(baselines.METHODS)}.")
  reference = {key: None for key in TOP_KEYS}
  reference["problems"] = {
      name: dict({k: None for k in PROBLEM_KEYS},
                 overrides={kind: dict.fromkeys(method_keys(kind)) for kind in baselines.METHODS})
      for name in config.get("problems", {}).keys()}
  reference["methods"] = {name: dict.fromkeys(method_keys(m.method)) for name, m in config.get("methods", {}).items()}
  config_keys.check_keys(config, reference, what="the benchmark", new_top_level=False,
                        defaults="influence_jax.eval.benchmark (TOP_KEYS, PROBLEM_KEYS, method_keys)")


def build_problem(cfg) -> problems.Problem:
  """Returns the Problem named by cfg.kind ("digits_mlp" or "digits_logreg") with cfg's sizes."""
  dtype = np.dtype(cfg.dtype)
  common = dict(l2=cfg.l2, num_train=cfg.num_train, num_test=cfg.num_test, seed=cfg.data_seed, dtype=dtype)
  if cfg.kind == "digits_mlp":
    return problems.digits_mlp(hidden=tuple(cfg.hidden), **common)
  if cfg.kind == "digits_logreg":
    return problems.digits_logreg(**common)
  raise ValueError(f"Unknown problem kind {cfg.kind!r}; expected 'digits_mlp' or 'digits_logreg'.")


def method_settings(method_cfg, problem_cfg) -> dict:
  """Returns the keyword settings of a method: its config, with the problem's damping and overrides.

  A method that takes `damping` gets the problem's damping unless it sets its own;
  problem_cfg.overrides[method] (if any) replaces individual settings.
  """
  settings = {k: v for k, v in dict(method_cfg).items() if k != "method"}
  fn = baselines.METHODS[method_cfg.method]
  if "damping" in inspect.signature(fn).parameters and "damping" not in settings:
    settings["damping"] = float(problem_cfg.damping)
  overrides = problem_cfg.get("overrides", {}) or {}
  settings.update(dict(overrides.get(method_cfg.method, {})))
  return settings


def lds_truth(train_fn, evaluate, num_train: int, cfg, **cache) -> retraining.LDSGroundTruth:
  """Returns the LDS ground truth of cfg: one model per random subset.

  With cfg.lds_same_init every model starts from init_fn(key(cfg.init_seed))
  (the initialisation of θ*); otherwise each has its own seed (dattri's default).
  """
  if not cfg.get("lds_same_init", False):
    return retraining.lds_ground_truth(
        train_fn, evaluate, num_train, num_subsets=cfg.lds_subsets, fraction=cfg.lds_fraction,
        seed=cfg.lds_seed, dtype=np.dtype(cfg.dtype), **cache)
  masks = retraining.random_subsets(num_train, cfg.lds_subsets, cfg.lds_fraction, cfg.lds_seed)
  weights = (masks * (num_train / masks.sum(1, keepdims=True))).astype(np.dtype(cfg.dtype))
  seeds = np.full((cfg.lds_subsets,), cfg.init_seed, np.uint32)
  targets = retraining.retrain(train_fn, evaluate, weights, seeds, **cache).targets
  return retraining.LDSGroundTruth(masks, seeds, targets)


def _compact(d: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in d.items())


def run_problem(name: str, cfg, methods_cfg, *, workdir: str, warm_timings: bool = True,
                log: Callable[[str], None] = print, order=None) -> list[dict]:
  """Returns one row per method (dicts keyed by COLUMNS) for the problem configured by cfg.

  Methods run in `order` (names of methods_cfg; default: its key order), exact first.
  """
  prob = build_problem(cfg)
  params, checkpoints = problems.train_with_checkpoints(
      prob, steps=cfg.steps, learning_rate=cfg.learning_rate, num_checkpoints=cfg.num_checkpoints,
      seed=cfg.init_seed)
  log(f"[{name}] {prob.num_train} train / {cfg.num_test} test examples, "
      f"{sum(x.size for x in jax.tree.leaves(params))} params, ‖∇L(θ*)‖ = {problems.gradient_norm(prob, params):.2e}")
  train_fn = problems.make_train_fn(prob, steps=cfg.steps, learning_rate=cfg.learning_rate)
  evaluate = problems.loss_targets(prob)
  # Only what defines train_fn and the target keys the cache: methods' settings can change freely.
  key_config = {k: cfg[k] for k in TRAINING_KEYS if k in cfg}
  key_config["target"] = "per-example test loss"
  cache = dict(cache_dir=str(pathlib.Path(workdir) / "retraining"), config=key_config,
               chunk_size=cfg.chunk_size, log=lambda s: log(f"[{name}] {s}"))
  lds_gt = lds_truth(train_fn, evaluate, prob.num_train, cfg, **cache)
  loo_gt = None
  if cfg.loo_points:
    loo_idx = np.random.default_rng(cfg.loo_seed).choice(prob.num_train, cfg.loo_points, replace=False)
    loo_gt = retraining.loo_ground_truth(
        train_fn, evaluate, prob.num_train, loo_idx, seed=cfg.init_seed, dtype=np.dtype(cfg.dtype), **cache)
  batch = cfg.batch_size
  task = baselines.MethodInputs(
      loss_fn=prob.loss_fn, per_example_loss_fn=prob.per_example_loss_fn, params=params,
      train_batches=[{k: v[i:i + batch] for k, v in prob.train.items()} for i in range(0, prob.num_train, batch)],
      test_batches=[prob.test],
      checkpoints=[(c.params, c.learning_rate) for c in checkpoints], split_loss=prob.split_loss())

  rows, exact_scores = [], None
  unknown = sorted(set(order or ()) - set(methods_cfg.keys()))
  if unknown:
    raise ValueError(f"config.method_order names methods that config.methods lacks: {unknown}.")
  names = [n for n in (order or methods_cfg.keys()) if n not in set(cfg.get("skip", ()))]
  names.sort(key=lambda n: methods_cfg[n].method != "exact")  # The reference first (stable sort).
  for method_name in names:
    row, scores = _method_row(name, method_name, methods_cfg[method_name], cfg, task, lds_gt, loo_gt, exact_scores,
                              warm_timings)
    if methods_cfg[method_name].method == "exact" and exact_scores is None:
      exact_scores = scores
    log(f"[{name}] {method_name}: LDS {row['lds']:.3f}  LOO r {row['loo_pearson']:.3f}  "
        f"vs exact r {row['exact_pearson']:.3f}  fit {row['fit_s']:.2f}s  score {row['score_s']:.2f}s  {row['info']}")
    rows.append(row)
  return rows


def _method_row(name, method_name, method_cfg, cfg, task, lds_gt, loo_gt, exact_scores, warm_timings) -> tuple:
  """Returns (the row of one method keyed by COLUMNS, its (T, N) scores): run once (and once more
  for warm timings), scored against LDS, LOO and the exact scores when they are known."""
  fn = baselines.METHODS[method_cfg.method]
  settings = method_settings(method_cfg, cfg)
  result = fn(task, **settings)
  warm = fn(task, **settings) if warm_timings else None
  finite = bool(np.all(np.isfinite(result.scores)))
  loo = (metrics.loo_correlation(result.scores, loo_gt.indices, loo_gt.deltas)
         if finite and loo_gt is not None else None)
  if exact_scores is None and method_cfg.method == "exact":
    exact_scores = result.scores
  row = {
      "problem": name,
      "method": method_name,
      "settings": _compact(settings),
      "fit_s": result.fit_seconds,
      "score_s": result.score_seconds,
      "fit_s_warm": warm.fit_seconds if warm else float("nan"),
      "score_s_warm": warm.score_seconds if warm else float("nan"),
      "lds": metrics.lds(result.scores, lds_gt.masks, lds_gt.targets) if finite else float("nan"),
      "loo_pearson": loo.pearson if loo else float("nan"),
      "loo_spearman": loo.spearman if loo else float("nan"),
      "exact_pearson": (metrics.row_pearson(result.scores, exact_scores)
                        if finite and exact_scores is not None else float("nan")),
      "info": _compact(result.info),
  }
  return row, result.scores


def _fmt(v) -> str:
  if isinstance(v, float):
    return "nan" if not np.isfinite(v) else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
  return str(v)


def to_markdown(rows: list[dict]) -> str:
  """Returns the rows as a markdown table (floats to 3 decimals)."""
  out = io.StringIO()
  out.write("| " + " | ".join(COLUMNS) + " |\n")
  out.write("|" + "---|" * len(COLUMNS) + "\n")
  for r in rows:
    out.write("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n")
  return out.getvalue()


def write_tables(rows: list[dict], workdir: str) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes results.md and results.csv under workdir; returns their paths."""
  folder = pathlib.Path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  md, cs = folder / "results.md", folder / "results.csv"
  md.write_text(to_markdown(rows))
  with cs.open("w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
  return md, cs


def run(config, log: Callable[[str], None] = print) -> list[dict]:
  """Runs every problem of config.problems with every method of config.methods; writes and returns the rows.

  config.problem_order / config.method_order (optional tuples of names) fix the order of the runs.
  """
  rows = []
  order = config.get("problem_order", None) or tuple(config.problems.keys())
  unknown = sorted(set(order) - set(config.problems.keys()))
  if unknown:
    raise ValueError(f"config.problem_order names problems that config.problems lacks: {unknown}.")
  for name in order:
    rows += run_problem(name, config.problems[name], config.methods, workdir=config.workdir,
                        warm_timings=config.warm_timings, log=log, order=config.get("method_order", None))
    write_tables(rows, config.workdir)
  (pathlib.Path(config.workdir) / "config.json").write_text(config.to_json(indent=1) if hasattr(config, "to_json")
                                                            else json.dumps(config, default=str))
  return rows
