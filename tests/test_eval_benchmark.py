"""The benchmark job end to end on a tiny logistic regression, and its config."""

import csv

import ml_collections
import numpy as np

from configs import benchmark_digits, benchmark_digits85k
from influence_jax.eval import baselines, benchmark


def tiny_config(workdir):
  config = benchmark_digits.get_config()
  config.workdir = str(workdir)
  config.warm_timings = False
  problem = config.problems.digits_logreg
  problem.update(dict(num_train=40, num_test=4, steps=200, batch_size=20, lds_subsets=8, loo_points=4,
                      chunk_size=4, num_checkpoints=2, l2=0.05))
  del config.problems["digits_mlp"]
  config.problem_order = ("digits_logreg",)
  config.methods = ml_collections.ConfigDict({
      "gradient_dot": dict(method="gradient_dot"),
      "exact": dict(method="exact"),
  })
  config.method_order = tuple(config.methods.keys())
  return config


def test_config_names_known_methods_and_fixed_damping():
  config = benchmark_digits.get_config()
  for name, method in config.methods.items():
    assert method.method in baselines.METHODS, name
  mlp = config.problems.digits_mlp
  settings = benchmark.method_settings(config.methods.lissa, mlp)
  assert settings["damping"] == mlp.damping and settings["scale"] == mlp.overrides["lissa"]["scale"]
  assert "damping" not in benchmark.method_settings(config.methods.gradient_dot, mlp)


def test_benchmark_writes_a_table_with_exact_as_reference(tmp_path):
  rows = benchmark.run(tiny_config(tmp_path), log=lambda s: None)
  by_name = {r["method"]: r for r in rows}
  assert [r["method"] for r in rows][0] == "exact"  # The reference runs first.
  assert by_name["exact"]["exact_pearson"] == 1.0
  for r in rows:
    assert np.isfinite(r["lds"]) and np.isfinite(r["loo_pearson"]) and r["score_s"] > 0
  assert by_name["exact"]["loo_pearson"] > 0.8  # Convex, L2 0.05: influence tracks leave-one-out (0.94).
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [t["method"] for t in table] == [r["method"] for r in rows]
  assert (tmp_path / "results.md").read_text().count("\n") == len(rows) + 2
  assert len(list((tmp_path / "retraining").iterdir())) == 2  # LDS and LOO caches.

  # Rerun with another damping (a method setting, not a training one): every retrained model is reused.
  config = tiny_config(tmp_path)
  config.problems.digits_logreg.damping = 0.01
  logs = []
  again = benchmark.run(config, log=logs.append)
  assert not any("retrained" in line for line in logs)
  assert len(list((tmp_path / "retraining").iterdir())) == 2
  assert {r["method"]: r for r in again}["exact"]["settings"] == "damping=0.01"


def test_85k_configs_name_known_methods_in_a_full_order():
  for arg in (None, "small"):
    config = benchmark_digits85k.get_config(arg)
    assert sorted(config.method_order) == sorted(config.methods.keys())
    assert sorted(config.problem_order) == sorted(config.problems.keys())
    for name, method in config.methods.items():
      assert method.method in baselines.METHODS, name
    for problem in config.problems.values():
      assert problem.hidden == (256, 256) and problem.lds_same_init and problem.loo_points == 0
  full = benchmark_digits85k.get_config().problems["digits85k_d1e-3"]
  assert (full.num_train, full.num_test, full.lds_subsets, full.damping) == (1437, 100, 100, 1e-3)


def test_same_initialisation_lds_without_loo_in_the_given_order(tmp_path):
  config = tiny_config(tmp_path)
  problem = config.problems.digits_logreg
  problem.update(dict(loo_points=0))
  problem.lds_same_init = True
  config.method_order = ("exact", "gradient_dot")
  logs = []
  rows = benchmark.run(config, log=logs.append)
  assert [r["method"] for r in rows] == ["exact", "gradient_dot"]
  assert all(np.isfinite(r["lds"]) and np.isnan(r["loo_pearson"]) for r in rows)
  assert len(list((tmp_path / "retraining").iterdir())) == 1  # LDS only.
  gt = benchmark.lds_truth(lambda w, s: None, None, 40, problem, cache_dir=str(tmp_path / "retraining"),
                           config={**{k: problem[k] for k in benchmark.TRAINING_KEYS if k in problem},
                                   "target": "per-example test loss"}, chunk_size=problem.chunk_size)
  assert np.all(gt.seeds == problem.init_seed) and gt.targets.shape == (8, 4)  # Read back from the cache.
