r"""GIF label change on digits with the TinyNet-like CNN (`examples.models.TinyNet`: the 8x8 images upsampled to
32x32, four 3x3 stride-2 convolutions, a linear head; 102,282 parameters, so 5 % is 5,112), trained as the GIF
authors train (SGD, momentum 0.9, weight decay 5e-4; learning rate 0.01: at their 0.1 the model trained on the
corrupted labels collapsed here to predicting 7 everywhere; flax's default initialisation is not PyTorch's), on their
label-change protocol (influence_jax/jobs/papers/gif_config.py).

  python scripts/gif_label_change.py --config=configs/gif_label_change_tinynet.py --workdir=runs/gif_label_change_tinynet
"""

import ml_collections

from influence_jax.jobs.papers import gif_job


def get_config() -> ml_collections.ConfigDict:
  c = gif_job.default_config("label_change")
  c.model = ml_collections.ConfigDict(dict(name="tinynet", features=(16, 32, 64, 128), num_classes=10, upsample=4))
  c.train = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.01, momentum=0.9, l2=5e-4,
                                           num_epochs=15, batch_size=64))
  # Sized for 2 shared CPU cores (a curvature product on 512 images is ~1 s there): the authors use 2,048 clean
  # examples and 1,000 iterations; here 64 and 100, GIF and IF only, and a shorter walk.
  c.edit.hessian_examples = 64
  c.edit.neumann_iters = 100
  c.edit.methods = ("gif", "if")
  c.edit.walk_max_steps = 96
  c.edit.walk_patience = 24
  return c
