r"""GIF label change on digits with the MLP: a backdoor trigger on 10% of the training images (labelled 7), fixed
by an influence edit, against retraining on the corrected labels (docs/design.md, "The papers' methods").

  python scripts/gif_label_change.py --config=configs/gif_label_change_mlp.py --workdir=runs/gif_label_change_mlp

Random label flips instead of the trigger: --config.corruption.kind=flip --config.corruption.fraction=0.1.
Every key and its meaning: influence_jax/jobs/papers/gif_job.py, default_config.
"""

import ml_collections

from influence_jax.jobs.papers import gif_job


def get_config() -> ml_collections.ConfigDict:
  return gif_job.default_config("label_change")
