r"""GIF class removal on digits with the MLP: forget every training 8, against retraining without it (docs/design.md, "The papers' methods").

  python scripts/gif_class_removal.py --config=configs/gif_class_removal_mlp.py --workdir=runs/gif_class_removal_mlp

Override any key, e.g. --config.seeds=3 --config.edit.ratios='(0.2,)' --config.edit.removed_class=3.
Writes results.md (mean ± std over seeds), results.csv and results.json in --workdir.
"""

import ml_collections

def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "class_removal"
  c.seed = 0  # Only builds the model; each of the `seeds` runs uses its own seed for data, init and selection.
  c.seeds = 5
  c.data = dict(name="digits", test_fraction=0.2, num_train=-1, num_test=-1)
  c.model = dict(name="mlp", features=(32,), num_classes=10, activation="tanh")
  c.train = dict(learning_rate=3e-3, num_epochs=60, batch_size=128, l2=1e-3)  # Adam; the retrained model too.
  c.edit = dict(
      removed_class=8,
      ratios=(0.1, 0.3, 0.5),  # Fraction of each Dense/Conv layer's parameters in the target set (exact budget).
      selections=("gradient",),  # Unit ranking: "output", "gradient" or "random".
      methods=("gif", "fif", "pif", "if"),
      solvers=("neumann", "cg"),  # Every edit is solved by each; one row per solver.
      neumann_iters=30,  # The authors' early-stopped Neumann iteration (no damping).
      neumann_normaliser=1.0,
      neumann_growth=1.25,
      damping=1e-3,  # CG only: added to the Hessian of the edited training loss.
      curvature="hessian",  # or "gauss_newton"
      hessian_examples=-1,  # Edited-training-set examples the curvature averages over (-1: all).
      cg_max_iters=100,
      cg_tol=1e-5,
      scales=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0),
      walk_step=0.25,  # The walks' step, in units of the update Δ.
      walk_max_steps=256,
      walk_patience=64,  # Steps without a better score before the coarse walk stops (f1 has plateaus).

  )
  return ml_collections.ConfigDict(c)
