"""The benchmark job end to end on a tiny logistic regression, and its config."""

import csv

import ml_collections
import numpy as np

from configs import benchmark_digits
from influence_jax.eval import baselines, benchmark


def tiny_config(workdir):
  config = benchmark_digits.get_config()
  config.workdir = str(workdir)
  config.warm_timings = False
  problem = config.problems.digits_logreg
  problem.update(dict(num_train=40, num_test=4, steps=200, batch_size=20, lds_subsets=8, loo_points=4,
                      chunk_size=4, num_checkpoints=2, l2=0.05))
  del config.problems["digits_mlp"]
  config.methods = ml_collections.ConfigDict({
      "gradient_dot": dict(method="gradient_dot"),
      "exact": dict(method="exact"),
  })
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
