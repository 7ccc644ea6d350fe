r"""The README demo: an MLP on scikit-learn's digits, the eigenspace of its curvature (Gauss-Newton:
arnoldi.curvature="auto" with the adapters' SplitLoss), influence of every training image on every test image.

  python scripts/run_all.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

Override any key, e.g. --config.arnoldi.n_iters=200 --config.score.tail=False. The built-in task
is a factory of the same interface as your own (README, "Your own model and data").
"""

import ml_collections

from influence_jax.jobs import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.task = "influence_jax.examples.tasks:get_task"
  c.model_dir = ""  # "": WORKDIR/model (scripts/train.py writes it).
  c.data = dict(name="digits", test_fraction=0.2, num_train=-1, num_test=-1, label_noise=0.0)
  c.model = dict(name="mlp", features=(64,), num_classes=10, activation="tanh")
  c.train = dict(optimizer="adam", learning_rate=3e-3, num_epochs=80, batch_size=128, l2=1e-3, momentum=0.9)
  c.arnoldi.n_iters = 150
  c.arnoldi.top_k = 100
  c.arnoldi.damping = 1e-2  # ≈ 1 % of the top eigenvalue, fixed in advance.
  c.arnoldi.num_examples = -1  # The curvature averages over all 1,438 training images.
  c.project.batch_size = 256
  c.project.chunk_rows = 512
  c.score.rows_per_block = 1024
  return c
