r"""Selective removal of memorized points while training on digits with 20% flipped labels (docs/design.md, "The papers' methods").

  python scripts/selective_removal.py --config=configs/selective_removal_digits.py --workdir=runs/removal

For each of removal.num_seeds seeds, trains several ways from the same start: no removal;
before each epoch in removal.epochs, drop up to removal.budgets[i] points labelled memorized
(most negative A first, last-layer path); drop as many random points, or as many of lowest A
among all points, or of highest self-influence, at the same epochs.
Writes removal.md (mean ± std) and removal.json in --workdir.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(test_fraction=0.2, reference_fraction=0.15, label_noise=0.2, num_train=-1, num_test=-1)
  c.model = dict(features=(256,), activation="tanh")
  c.train = dict(optimizer="adam", learning_rate=3e-3, num_epochs=600, batch_size=128, l2=1e-4)
  # How points are labelled at each removal event (as in configs/memorization_digits.py).
  # Quantile 0: every fitted point with A ≤ 0 is a candidate; the ranking by A and the budget choose.
  c.memorization = dict(
      method="last_layer", damping=1e-2, self_influence_quantile=0.0,
      arnoldi=dict(n_iters=200, top_k=150, curvature="hessian", damping=0.1, batch_size=2048, tail=True))
  c.removal = dict(
      num_seeds=5,  # Seeds config.seed, config.seed + 1, ...
      epochs=(200, 400),  # Removal events: before these epochs.
      budgets=(150, 100),  # At most this many points dropped at each event.
      # Arms dropping as many points as removal by A did: random ones, the lowest A among all kept
      # points (fitted or not), the highest self-influence.
      baselines=("random", "lowest_A", "self_influence"),
  )
  return ml_collections.ConfigDict(c)
