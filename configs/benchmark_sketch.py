r"""The sketched spectral tail (what the projection store keeps) against the exact tail, on the digits
MLP of configs/benchmark_digits.py: LDS for sketch dimensions m in {256, 1024, 4096}.

  python scripts/benchmark_methods.py --config=configs/benchmark_sketch.py

Shares the retraining cache of configs/benchmark_digits.py (same workdir and training keys).
"""

import os
import runpy

import ml_collections

_BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_digits.py"))


def get_config():
  config = _BASE["get_config"]()
  config.problems = ml_collections.ConfigDict({"digits_mlp": config.problems.digits_mlp})
  methods = {"exact": dict(method="exact")}
  for k in (50, 100):
    methods[f"arnoldi_tail_k{k}"] = dict(method="arnoldi", top_k=k, n_iters=int(1.5 * k), tail=True)
    for m in (256, 1024, 4096):
      methods[f"arnoldi_sketch{m}_k{k}"] = dict(method="arnoldi_sketched", top_k=k, n_iters=int(1.5 * k),
                                                 sketch_dim=m)
  config.methods = ml_collections.ConfigDict(methods)
  config.warm_timings = False
  return config
