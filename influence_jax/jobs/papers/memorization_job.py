"""The memorization and selective-removal jobs' work as library functions (docs/design.md, "The papers' methods").

Data: scikit-learn digits split into test (clean labels, for accuracy), a
held-out reference set R (clean labels, for A(z)) and training points, of
which a fraction has its label flipped at random (datasets.flip_labels).

run_memorization writes, in the work directory:
  memorization.csv   per training point: id, training label, true label, flipped, A(z),
                     label, strength |A|, own margin, self-influence
  histogram.png      A(z) of clean vs flipped points
  metrics.json       precision / recall of "memorized" for the flipped points, ROC AUC of
                     −A(z), of self-influence and of −own margin for finding them, accuracies
run_selective_removal writes removal.md (the table), removal.json (every run).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from sklearn import metrics as sk_metrics

from influence_jax import data as data_lib
from influence_jax import eigenspace as eigenspace_lib
from influence_jax import flax_adapters
from influence_jax import io as io_lib
from influence_jax import paths
from influence_jax.examples import datasets
from influence_jax.examples import models
from influence_jax.jobs import config as config_lib
from influence_jax.jobs import plots
from influence_jax.methods import memorization as mz
from influence_jax.methods import selective_removal
from influence_jax.methods import training


JOBS = ("memorization", "selective_removal")


def default_config(job: str = "memorization") -> ml_collections.ConfigDict:
  """Returns every key of the memorization job (scripts/memorization.py) or, with job="selective_removal",
  of the selective-removal job (scripts/selective_removal.py), at the values of configs/*_digits.py."""
  if job not in JOBS:
    raise ValueError(f"Unknown job {job!r}; expected one of {JOBS}.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      test_fraction=0.2,  # Clean test set, for accuracy.
      reference_fraction=0.15,  # Of the rest: the held-out reference set R (clean labels) of A(z).
      label_noise=0.2,  # Fraction of the training labels flipped to another class at random.
      num_train=-1,  # -1: all remaining points.
      num_test=-1,
  )
  c.model = dict(features=(256,), activation="tanh")
  # Long enough to fit the flipped labels (training accuracy on the noisy labels ≈ 1); momentum: sgd only.
  c.train = dict(optimizer="adam", learning_rate=3e-3, num_epochs=800, batch_size=128, l2=1e-4, momentum=0.9)
  c.memorization = dict(
      method="last_layer",  # or "eigenspace" (Arnoldi over all parameters).
      damping=1e-2,  # Last layer: H + δI is inverted (l2 alone leaves H nearly singular).
      self_influence_quantile=0.5,  # > 0: "memorized" also needs s(z) ≥ this quantile of s (0: off).
      arnoldi=dict(n_iters=200, top_k=150, curvature="hessian", damping=0.1, batch_size=2048, tail=True),
  )
  if job == "selective_removal":
    c.train.num_epochs = 600
    # How points are labelled at each removal event. Quantile 0: every fitted point with A ≤ 0 is a
    # candidate; the ranking by A and the budget choose.
    c.memorization.self_influence_quantile = 0.0
    c.removal = dict(
        num_seeds=5,  # Seeds config.seed, config.seed + 1, ...
        epochs=(200, 400),  # Removal events: before these epochs.
        budgets=(150, 100),  # At most this many points dropped at each event.
        # Arms dropping as many points as removal by A did: random ones, the lowest A among all kept
        # points (fitted or not), the highest self-influence.
        baselines=("random", "lowest_A", "self_influence"),
    )
  return c


def config_checker(job: str):
  """Returns the `cli.run` check of `job`'s config: every key must be one of `default_config(job)`'s."""

  def check(config) -> None:
    config_lib.check_keys(config, default_config(job), what=f"the {job} job", new_top_level=False,
                          defaults=f"influence_jax.jobs.papers.memorization_job.default_config({job!r})")

  return check


class NoisyDigits(NamedTuple):
  """Batches with "id": train (noisy labels "y", true ones "y_true"), reference, test; flipped: (N,) bool."""

  train: dict
  reference: dict
  test: dict
  flipped: np.ndarray


def noisy_digits(config) -> NoisyDigits:
  """Returns the split of config.data (test_fraction, reference_fraction, label_noise, num_train) for config.seed."""
  d = config.data
  splits = datasets.load_digits(test_fraction=d.test_fraction, seed=config.seed)
  pool = splits["train"]
  train_idx, ref_idx = datasets.stratified_split(pool["y"], d.reference_fraction, config.seed + 1)
  if d.get("num_train", -1) >= 0:
    train_idx = train_idx[: d.num_train]
  take = lambda idx: {k: v[idx] for k, v in pool.items()}
  train, reference = take(train_idx), take(ref_idx)
  y, flipped = datasets.flip_labels(train["y"], d.label_noise, datasets.DIGITS_NUM_CLASSES, config.seed)
  train = dict(train, y=y, y_true=train["y"])
  test = splits["test"]
  if d.get("num_test", -1) >= 0:
    test = data_lib.take(test, 0, min(d.num_test, data_lib.batch_size(test)))
  return NoisyDigits(train, reference, test, flipped)


def _module(config) -> models.MLP:
  m = config.model
  return models.MLP(features=tuple(m.features), num_classes=datasets.DIGITS_NUM_CLASSES, activation=m.activation)


def _xy(batch: dict) -> dict:
  return {"x": jnp.asarray(batch["x"]), "y": jnp.asarray(batch["y"])}


def compute_memorization(config, module, variables, data: NoisyDigits) -> mz.Memorization:
  """Returns the Memorization of data.train (config.memorization.method: 'last_layer' or 'eigenspace')."""
  c = config.memorization
  fns = flax_adapters.linen_loss_fns(module, variables, models.softmax_cross_entropy, l2=config.train.l2)
  train, ref = _xy(data.train), _xy(data.reference)
  threshold = None
  if c.method == "last_layer":
    mem = mz.linen_memorization(module, variables, train, ref, l2=config.train.l2, damping=c.damping)
  elif c.method == "eigenspace":
    a = c.arnoldi
    batches = list(data_lib.iterate(train, a.batch_size))
    es = eigenspace_lib.fit_eigenspace(fns.loss_fn, fns.params, batches, n_iters=a.n_iters, top_k=a.top_k,
                                       damping=a.damping, curvature=a.curvature, seed=config.seed)
    mem = mz.eigenspace_memorization(es, fns.per_example_loss_fn, fns.outputs_fn, fns.params, batches,
                                     list(data_lib.iterate(ref, a.batch_size)), tail=a.tail)
  else:
    raise ValueError(f"Unknown config.memorization.method {c.method!r}; expected 'last_layer' or 'eigenspace'.")
  if c.self_influence_quantile > 0:
    threshold = float(np.quantile(mem.self_influence, c.self_influence_quantile))
    mem = mz.memorization_labels(mem.influence, mem.own_margin, mem.self_influence, min_self_influence=threshold)
  return mem


def detection_metrics(mem: mz.Memorization, flipped: np.ndarray) -> dict:
  """Returns precision / recall of the MEMORIZED label for `flipped` points and ROC AUCs of the scores."""
  memorized = mem.label == mz.MEMORIZED
  hits = int(np.sum(memorized & flipped))
  return {
      "num_train": int(flipped.size),
      "num_flipped": int(flipped.sum()),
      "num_memorized": int(memorized.sum()),
      "num_generalizes": int(np.sum(mem.label == mz.GENERALIZES)),
      "num_neither": int(np.sum(mem.label == mz.NEITHER)),
      "precision_memorized": hits / max(int(memorized.sum()), 1),
      "recall_memorized": hits / max(int(flipped.sum()), 1),
      "auc_minus_A": float(sk_metrics.roc_auc_score(flipped, -mem.influence)),
      "auc_self_influence": float(sk_metrics.roc_auc_score(flipped, mem.self_influence)),
      "auc_minus_own_margin": float(sk_metrics.roc_auc_score(flipped, -mem.own_margin)),
  }


def run_memorization(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains on noisy digits, labels every training point, writes CSV / PNG / metrics; returns the metrics."""
  start = time.time()
  data = noisy_digits(config)
  module = _module(config)
  variables = module.init(jax.random.key(config.seed), jnp.asarray(data.train["x"][:2]))
  fns = flax_adapters.linen_loss_fns(module, variables, models.softmax_cross_entropy, l2=config.train.l2)
  t = config.train
  params, _ = training.train(fns.loss_fn, fns.params, _xy(data.train), optimizer=training.optimizer_from_config(config.train),
                             num_epochs=t.num_epochs, batch_size=t.batch_size, seed=config.seed)
  acc = lambda b: training.accuracy(fns.outputs_fn, params, _xy(b))
  flipped_batch = {"x": data.train["x"][data.flipped], "y": data.train["y"][data.flipped]}
  trained = {"train_accuracy_noisy_labels": acc(data.train), "flipped_fitted": acc(flipped_batch),
             "test_accuracy": acc(data.test)}
  logging.info("Trained: %s", trained)
  mem = compute_memorization(config, module, fns.merge(params), data)
  out = dict(detection_metrics(mem, data.flipped), **trained, method=config.memorization.method,
             seconds=time.time() - start)
  tr = data.train
  rows = [["train_id", "label", "true_label", "flipped", "A", "memorization_label", "strength", "own_margin",
           "self_influence"]]
  for i in np.argsort(mem.influence, kind="stable"):
    rows.append([int(tr["id"][i]), int(tr["y"][i]), int(tr["y_true"][i]), int(data.flipped[i]),
                 f"{mem.influence[i]:.6g}", mz.LABEL_NAMES[mem.label[i]], f"{mem.strength[i]:.6g}",
                 f"{mem.own_margin[i]:.6g}", f"{mem.self_influence[i]:.6g}"])
  paths.makedirs(workdir)
  io_lib.atomic_write_csv(paths.join(workdir, "memorization.csv"), rows)
  plots.histogram(paths.join(workdir, "histogram.png"),
                  {"clean": mem.influence[~data.flipped], "flipped": mem.influence[data.flipped]},
                  "A(z) = mean held-out classification influence",
                  title=f"{config.memorization.method}: AUC(−A) = {out['auc_minus_A']:.3f}, "
                        f"AUC(self-influence) = {out['auc_self_influence']:.3f}")
  io_lib.atomic_write_json(paths.join(workdir, "metrics.json"), out)
  return out


# ----------------------------------------------------------------------------- selective removal


def _ranker(kind: str, config, module, fns, data: NoisyDigits, seed: int):
  """Returns rank_fn(params, kept, event) for train_with_removal.

  'influence': the MEMORIZED kept points, most negative A first (selective_removal.removal_ranking);
  'lowest_A': every kept point (fitted or not), most negative A first; 'self_influence': every
  kept point, highest self-influence first; 'random': a random permutation.
  """
  if kind == "random":
    rng = np.random.default_rng(seed + 10_000)
    return lambda params, kept, event: rng.permutation(kept)
  if kind not in ("influence", "lowest_A", "self_influence"):
    raise ValueError(f"Unknown removal arm {kind!r}; expected one of {tuple(ARMS)}.")

  def rank(params, kept, event):
    sub = NoisyDigits({k: v[kept] for k, v in data.train.items()}, data.reference, data.test, data.flipped[kept])
    mem = compute_memorization(config, module, fns.merge(params), sub)
    if kind == "self_influence":
      return kept[np.argsort(-mem.self_influence, kind="stable")]
    if kind == "lowest_A":
      return kept[np.argsort(mem.influence, kind="stable")]
    return selective_removal.removal_ranking(mem, kept)

  return rank


def run_selective_removal(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains each seed several ways from the same start; writes removal.md/json, returns {"runs", "table"}.

  Arms: no removal; removal by A (up to config.removal.budgets[i] memorized
  points before epoch config.removal.epochs[i]); and each of
  config.removal.baselines ('random', 'lowest_A', 'self_influence'), which drop exactly
  as many points as the A arm did at each event.
  """
  r = config.removal
  runs = []
  for seed in range(config.seed, config.seed + r.num_seeds):
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.seed = seed
    data = noisy_digits(cfg)
    module = _module(cfg)
    variables = module.init(jax.random.key(seed), jnp.asarray(data.train["x"][:2]))
    fns = flax_adapters.linen_loss_fns(module, variables, models.softmax_cross_entropy, l2=cfg.train.l2)
    train = _xy(data.train)
    train_kw = dict(optimizer=training.optimizer_from_config(cfg.train), num_epochs=cfg.train.num_epochs,
                    batch_size=cfg.train.batch_size, seed=seed)
    row = {"seed": seed, "num_flipped": int(data.flipped.sum())}
    counts = None
    arms = ["none", "influence"] + [a for a in r.baselines if a not in ("none", "influence")]
    for arm in arms:
      start = time.time()
      if arm == "none":
        params, hist = selective_removal.train_with_removal(fns.loss_fn, fns.params, train, **train_kw)
      else:
        budgets = list(r.budgets) if arm == "influence" else counts
        params, hist = selective_removal.train_with_removal(
            fns.loss_fn, fns.params, train, removal_epochs=tuple(r.epochs),
            rank_fn=_ranker(arm, cfg, module, fns, data, seed), budgets=budgets, **train_kw)
      if arm == "influence":
        counts = [int(d.size) for d in hist.removed]
      removed = np.concatenate(hist.removed) if hist.removed else np.zeros(0, int)
      row[arm] = {
          "test_accuracy": training.accuracy(fns.outputs_fn, params, _xy(data.test)),
          "example_epochs": hist.example_epochs,
          "num_removed": int(removed.size),
          "removed_flipped": int(data.flipped[removed].sum()),
          "removed_per_event": [int(d.size) for d in hist.removed],
          "seconds": time.time() - start,
      }
      logging.info("seed %d %s: %s", seed, arm, row[arm])
    runs.append(row)
  table = removal_table(runs)
  paths.makedirs(workdir)
  io_lib.atomic_write_json(paths.join(workdir, "removal.json"), {"config": config.to_dict(), "runs": runs})
  io_lib.atomic_write_text(paths.join(workdir, "removal.md"), table)
  return {"runs": runs, "table": table}


ARMS = {"none": "no removal", "influence": "remove memorized (most negative A first)",
        "random": "remove as many random points",
        "lowest_A": "remove as many points of lowest A, fitted or not",
        "self_influence": "remove as many points of highest self-influence"}


def removal_table(runs: list) -> str:
  """Returns the markdown table: per arm, mean ± std over seeds of test accuracy, cost and removals."""
  names = {arm: name for arm, name in ARMS.items() if arm in runs[0]}
  lines = [f"Over {len(runs)} seeds (mean ± std).", "",
           "| arm | test accuracy | examples × epochs | points removed | of which flipped |",
           "|---|---|---|---|---|"]
  for arm, name in names.items():
    col = lambda key: np.asarray([run[arm][key] for run in runs], np.float64)
    ms = lambda x, fmt: f"{fmt.format(np.mean(x))} ± {fmt.format(np.std(x))}"
    lines.append(f"| {name} | {ms(col('test_accuracy'), '{:.4f}')} | {ms(col('example_epochs'), '{:.0f}')} | "
                 f"{ms(col('num_removed'), '{:.1f}')} | {ms(col('removed_flipped'), '{:.1f}')} |")
  lines.append("")
  for arm in names:
    if arm not in ("none", "influence"):
      wins = sum(run["influence"]["test_accuracy"] > run[arm]["test_accuracy"] for run in runs)
      lines.append(f"Removal by A beat '{names[arm]}' on {wins} of {len(runs)} seeds.")
  return "\n".join(lines) + "\n"
