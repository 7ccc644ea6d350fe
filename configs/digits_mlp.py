r"""The README demo: an MLP on scikit-learn's digits, its Hessian eigenspace, influence of every
training image on every test image.

  python scripts/run_all.py --config=configs/digits_mlp.py --workdir=runs/digits_mlp

Override any key, e.g. --config.arnoldi.n_iters=200 --config.score.tail=False.

Sharded on a device mesh (fit and score): --config.mesh_shape=(2,4) (data, model); one entry may
be -1. Several processes (hosts): train once in one process, then run fit_eigenspace.py and
score.py in every process with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(README, "Running on several hosts").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Device mesh (data, model) of fit and score; None: every device of every process on 'data'
  # (no mesh at all with a single device). Not part of any fingerprint: an eigenspace fitted on
  # one mesh is loaded on another.
  c.mesh_shape = ml_collections.config_dict.placeholder(tuple)
  c.data = dict(name="digits", test_fraction=0.2, num_train=-1, num_test=-1, label_noise=0.0)
  c.model = dict(name="mlp", features=(64,), num_classes=10, activation="tanh")
  c.train = dict(optimizer="adam", learning_rate=3e-3, num_epochs=80, batch_size=128, l2=1e-3, momentum=0.9)
  c.arnoldi = dict(
      n_iters=150,  # Krylov steps.
      top_k=100,  # Eigenpairs kept.
      damping=1e-2,  # δ in (Λ + δ)⁻¹, fixed in advance (≈ 1% of the top eigenvalue).
      curvature="hessian",  # or "gauss_newton"
      selection="largest",  # or "magnitude"
      num_examples=-1,  # Training examples the curvature averages over (-1: all).
      batch_size=2048,
      microbatch_size=0,  # 0: whole batches.
      block_size=32,
      checkpoint_every=25,
  )
  c.score = dict(
      batch_size=256,  # Training examples projected per step (one shard each).
      top_k=10,  # Proponents and opponents kept per test example.
      tail=True,  # Add the spectral tail (DESIGN §2).
      method="vjp",  # or "jvp"
      microbatch_size=0,
      checkpoint_every=2,
      grid_examples=6,
  )
  return ml_collections.ConfigDict(c)
