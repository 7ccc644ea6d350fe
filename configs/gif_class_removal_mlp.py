r"""GIF class removal on digits with the MLP: forget every training 8, against retraining without it (docs/design.md, "The papers' methods").

  python scripts/gif_class_removal.py --config=configs/gif_class_removal_mlp.py --workdir=runs/gif_class_removal_mlp

Override any key, e.g. --config.seeds=3 --config.edit.ratios='(0.2,)' --config.edit.removed_class=3.
Writes results.md (mean ± std over seeds), results.csv and results.json in --workdir.
Every key and its meaning: influence_jax/jobs/papers/gif_job.py, default_config.
"""

import ml_collections

from influence_jax.jobs.papers import gif_job


def get_config() -> ml_collections.ConfigDict:
  return gif_job.default_config("class_removal")
