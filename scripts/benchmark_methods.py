r"""Runs the attribution-method benchmark (influence_jax.eval) from an ml_collections config.

  python scripts/benchmark_methods.py --config=configs/benchmark_digits.py

Writes results.md and results.csv (and the config) under --workdir (default: the config's workdir);
retrained models are cached there, so a killed run resumes.
"""

import jax
from absl import logging

from influence_jax.jobs import cli


def _set_precision(config):
  if any(p.get("dtype") == "float64" for p in config.problems.values()):
    jax.config.update("jax_enable_x64", True)


def benchmark_config_check(config):
  """The config's keys checked before the job starts (an unknown key or method setting is an error)."""
  _set_precision(config)
  from influence_jax.eval import benchmark  # noqa: PLC0415 (after x64 is set)

  benchmark.check_config(config)


def job(run):
  config = run.config
  _set_precision(config)
  from influence_jax.eval import benchmark  # noqa: PLC0415 (after x64 is set)

  def log(msg):
    logging.info(msg)
    print(msg, flush=True)

  rows = benchmark.run(config, log=log)
  print(benchmark.to_markdown(rows))
  print(f"Tables written to {config.workdir}/results.md and results.csv")


if __name__ == "__main__":
  cli.run(job, benchmark_config_check)
