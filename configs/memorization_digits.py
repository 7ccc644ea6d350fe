r"""Memorization labels on digits with 20% of the training labels flipped (docs/design.md, "The papers' methods").

  python scripts/memorization.py --config=configs/memorization_digits.py --workdir=runs/memorization

Writes memorization.csv, histogram.png and metrics.json in --workdir. Full-eigenspace
path instead of the exact last layer: --config.memorization.method=eigenspace.
Every key and its meaning: influence_jax/jobs/papers/memorization_job.py, default_config.
"""

import ml_collections

from influence_jax.jobs.papers import memorization_job


def get_config() -> ml_collections.ConfigDict:
  return memorization_job.default_config("memorization")
