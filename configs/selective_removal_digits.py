r"""Selective removal of memorized points while training on digits with 20% flipped labels (docs/design.md, "The papers' methods").

  python scripts/selective_removal.py --config=configs/selective_removal_digits.py --workdir=runs/removal

For each of removal.num_seeds seeds, trains several ways from the same start: no removal;
before each epoch in removal.epochs, drop up to removal.budgets[i] points labelled memorized
(most negative A first, last-layer path); drop as many random points, or as many of lowest A
among all points, or of highest self-influence, at the same epochs.
Writes removal.md (mean ± std) and removal.json in --workdir.
Every key and its meaning: influence_jax/jobs/papers/memorization_job.py, default_config.
"""

import ml_collections

from influence_jax.jobs.papers import memorization_job


def get_config() -> ml_collections.ConfigDict:
  return memorization_job.default_config("selective_removal")
