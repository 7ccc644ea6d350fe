r"""GIF label change (backdoor trigger, fixed by an influence edit) on digits with the small CNN.

  python scripts/gif_label_change.py --config=configs/gif_label_change_cnn.py --workdir=runs/gif_label_change_cnn
"""

import ml_collections

from influence_jax.jobs.papers import gif_job


def get_config() -> ml_collections.ConfigDict:
  c = gif_job.default_config("label_change")
  c.model = ml_collections.ConfigDict(dict(name="cnn", features=(8, 16), num_classes=10))
  c.train.num_epochs = 40
  c.edit.hessian_examples = 256  # A Conv HVP on all ~1,400 images is ~0.15 s on 2 CPU cores: subsample.
  c.edit.cg_max_iters = 60
  return c
