r"""Benchmark of attribution methods against retraining on digits (MLP and L2 logistic regression).

Every setting (damping, LiSSA scale and depth, CG tolerance, Arnoldi sizes) is
fixed here before any result was seen and never tuned on LDS. Damping
δ = 0.01 for the MLP is ~1% of its top Hessian eigenvalue (≈ 1.3); the
logistic regression is convex with H ⪰ λI, so it has δ = 0. LiSSA's scale
is ≈ 2× the top eigenvalue of the full-batch H + δI (it must exceed half of
the largest mini-batch eigenvalue for the recursion to converge).

Run (about 5-10 minutes on 2 CPU cores; retraining is cached under workdir):

  PYTHONPATH=. python scripts/benchmark_methods.py --config=configs/benchmark_digits.py \
      --config.workdir=/tmp/influence_jax_benchmark

Quick smoke run: --config.problems.digits_mlp.lds_subsets=10 --config.warm_timings=False
"""

import ml_collections


def _problem(**kw):
  base = dict(
      dtype="float64", num_train=500, num_test=100, data_seed=0, init_seed=0, batch_size=250,
      lds_subsets=100, lds_fraction=0.5, lds_seed=0, loo_points=50, loo_seed=0, chunk_size=25,
      num_checkpoints=5, overrides={}, skip=(),
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def get_config():
  config = ml_collections.ConfigDict()
  config.workdir = "/tmp/influence_jax_benchmark"
  config.warm_timings = True
  config.problems = ml_collections.ConfigDict({
      # 64-20-10 tanh MLP: 1,510 parameters (dense H is 1,510²).
      "digits_mlp": _problem(kind="digits_mlp", hidden=(20,), l2=1e-3, steps=2000, learning_rate=0.01,
                             damping=0.01, overrides={"lissa": {"scale": 3.0}}),
      # Multinomial logistic regression: 650 parameters, convex.
      "digits_logreg": _problem(kind="digits_logreg", l2=1e-3, steps=2000, learning_rate=0.05,
                                damping=0.0, overrides={"lissa": {"scale": 3.0}}),
  })
  methods = {
      "exact": dict(method="exact"),
      "cg": dict(method="cg", tol=1e-6, max_iters=500),
      "lissa": dict(method="lissa", depth=2000, batch_size=64, repeats=1, tol=1e-2),
      "gradient_dot": dict(method="gradient_dot"),
      "tracin": dict(method="tracin"),
  }
  for k in (10, 50, 100):
    methods[f"arnoldi_k{k}"] = dict(method="arnoldi", top_k=k, n_iters=int(1.5 * k), tail=False)
    methods[f"arnoldi_tail_k{k}"] = dict(method="arnoldi", top_k=k, n_iters=int(1.5 * k), tail=True)
  methods["arnoldi_pcg_k100"] = dict(method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=10)
  # The same with Gauss-Newton curvature G = JᵀH_out J instead of the Hessian (the jobs' default for a
  # cross-entropy loss): exact (G + δI)⁻¹, and the Arnoldi family at k = 100.
  methods["exact_gn"] = dict(method="exact", curvature="gauss_newton")
  methods["arnoldi_gn_k100"] = dict(method="arnoldi", top_k=100, n_iters=150, tail=False, curvature="gauss_newton")
  methods["arnoldi_tail_gn_k100"] = dict(method="arnoldi", top_k=100, n_iters=150, tail=True, curvature="gauss_newton")
  methods["arnoldi_pcg_gn_k100"] = dict(method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=10,
                                        curvature="gauss_newton")
  config.methods = ml_collections.ConfigDict(methods)
  config.method_order = tuple(methods)
  config.problem_order = ("digits_mlp", "digits_logreg")
  return config
