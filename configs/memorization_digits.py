r"""Memorization labels on digits with 20% of the training labels flipped (docs/design.md, "The papers' methods").

  python scripts/memorization.py --config=configs/memorization_digits.py --workdir=runs/memorization

Writes memorization.csv, histogram.png and metrics.json in --workdir. Full-eigenspace
path instead of the exact last layer: --config.memorization.method=eigenspace.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      test_fraction=0.2,  # Clean test set, for accuracy.
      reference_fraction=0.15,  # Of the rest: the held-out reference set R (clean labels) of A(z).
      label_noise=0.2,  # Fraction of the training labels flipped to another class at random.
      num_train=-1,  # -1: all remaining points.
      num_test=-1,
  )
  c.model = dict(features=(256,), activation="tanh")
  # Long enough to fit the flipped labels (training accuracy on the noisy labels ≈ 1).
  c.train = dict(optimizer="adam", learning_rate=3e-3, num_epochs=800, batch_size=128, l2=1e-4)
  c.memorization = dict(
      method="last_layer",  # or "eigenspace" (Arnoldi over all parameters).
      damping=1e-2,  # Last layer: H + δI is inverted (l2 alone leaves H nearly singular).
      self_influence_quantile=0.5,  # > 0: "memorized" also needs s(z) ≥ this quantile of s (0: off).
      arnoldi=dict(n_iters=200, top_k=150, curvature="hessian", damping=0.1, batch_size=2048, tail=True),
  )
  return ml_collections.ConfigDict(c)
