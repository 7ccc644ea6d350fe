r"""Runs the attribution-method benchmark (influence_jax.eval) from an ml_collections config.

  python scripts/benchmark_methods.py --config=configs/benchmark_digits.py

Writes results.md and results.csv (and the config) under --workdir (default: the config's workdir);
retrained models are cached there, so a killed run resumes.
"""

import jax
from absl import logging

from influence_jax.jobs import cli


def job(run):
  config = run.config
  if any(p.dtype == "float64" for p in config.problems.values()):
    jax.config.update("jax_enable_x64", True)
  from influence_jax.eval import benchmark  # noqa: PLC0415 (after x64 is set)

  def log(msg):
    logging.info(msg)
    print(msg, flush=True)

  rows = benchmark.run(config, log=log)
  print(benchmark.to_markdown(rows))
  print(f"Tables written to {config.workdir}/results.md and results.csv")


if __name__ == "__main__":
  cli.run(job)
