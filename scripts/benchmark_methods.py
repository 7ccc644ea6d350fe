r"""Runs the attribution-method benchmark (influence_jax.eval) from an ml_collections config.

  PYTHONPATH=. python scripts/benchmark_methods.py --config=configs/benchmark_digits.py

Writes results.md and results.csv (and the config) under --config.workdir;
retrained models are cached there, so a killed run resumes.
"""

from absl import app, flags, logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file.", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  config = _CONFIG.value
  if any(p.dtype == "float64" for p in config.problems.values()):
    jax.config.update("jax_enable_x64", True)
  from influence_jax.eval import benchmark  # After x64 is set.

  def log(msg):
    logging.info(msg)
    print(msg, flush=True)

  rows = benchmark.run(config, log=log)
  print(benchmark.to_markdown(rows))
  print(f"Tables written to {config.workdir}/results.md and results.csv")


if __name__ == "__main__":
  app.run(main)
