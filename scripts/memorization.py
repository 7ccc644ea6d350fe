r"""Labels every training point memorized / generalizes (docs/design.md, "The papers' methods") on digits with flipped labels.

Writes --workdir/{memorization.csv, histogram.png, metrics.json} and prints the metrics.

  python scripts/memorization.py --config=configs/memorization_digits.py --workdir=runs/memorization
"""

import json

from influence_jax.jobs import cli
from influence_jax.jobs.papers import memorization_job


def job(run):
  print(json.dumps(memorization_job.run_memorization(run.config, run.workdir), indent=1))


if __name__ == "__main__":
  cli.run(job, memorization_job.config_checker('memorization'))
