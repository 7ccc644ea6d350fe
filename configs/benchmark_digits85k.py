r"""Benchmark on an 85,002-parameter MLP where exact inversion is out of reach (issue 15).

dattri's protocol: MLP 64-256-256-10 tanh, L2 1e-3 in the objective, 1,437
training digits, 100 query digits, 100 models retrained from the same
initialisation as θ* on random half subsets (one jax.vmap per chunk, cached
under workdir and resumable), target = −query loss. float32; full-batch Adam,
300 steps, cosine-decayed learning rate 0.01. No leave-one-out and no dense
exact influence (85,002² is out of reach).

Every setting was fixed before any LDS was seen. The methods run cheapest
first; seconds are one run each (warm_timings off), JIT compilation included.

  PYTHONPATH=. nice -n 10 python scripts/benchmark_methods.py \
      --config=configs/benchmark_digits85k.py --config.workdir=/tmp/influence_jax_benchmark85k

`--config=configs/benchmark_digits85k.py:small` is the same model on 500
training / 50 query digits, 50 subsets, 200 steps, fewer methods: what 2
shared CPU cores finish in about half an hour.
"""

import ml_collections

_FULL = dict(num_train=1437, num_test=100, lds_subsets=100, steps=300)
_SMALL = dict(num_train=500, num_test=50, lds_subsets=50, steps=200)


def _problem(damping, sizes):
  return ml_collections.ConfigDict(dict(
      kind="digits_mlp", hidden=(256, 256), l2=1e-3, dtype="float32", data_seed=0, init_seed=0,
      learning_rate=0.01, batch_size=500, lds_fraction=0.5, lds_seed=0, lds_same_init=True,
      loo_points=0, loo_seed=0, chunk_size=10, num_checkpoints=5, damping=damping, overrides={}, skip=(),
      **sizes))


def get_config(arg=None):
  small = arg == "small"
  sizes = _SMALL if small else _FULL
  config = ml_collections.ConfigDict()
  config.workdir = "/tmp/influence_jax_benchmark85k" + ("_small" if small else "")
  config.warm_timings = False
  config.problems = ml_collections.ConfigDict({
      "digits85k_d1e-3": _problem(1e-3, sizes),
      "digits85k_d1e-2": _problem(1e-2, sizes),
  })
  methods = {"gradient_dot": dict(method="gradient_dot")}
  for n, k in ((150, 100),) if small else ((150, 100), (300, 200)):
    methods[f"arnoldi_n{n}_k{k}"] = dict(method="arnoldi", top_k=k, n_iters=n, tail=False)
    methods[f"arnoldi_tail_n{n}_k{k}"] = dict(method="arnoldi", top_k=k, n_iters=n, tail=True)
  for i in (2, 3, 5, 10):
    methods[f"arnoldi_pcg_n150_k100_i{i}"] = dict(method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=i)
  for m in (1024, 4096, 16384):  # The same solves scored against stored rows [U∇ℓ(z), R(I − UᵀU)∇ℓ(z)].
    methods[f"arnoldi_pcg_store{m}_n150_k100_i5"] = dict(method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=5,
                                                         sketch_dim=m)
    methods[f"arnoldi_sketched{m}_n150_k100"] = dict(method="arnoldi_sketched", top_k=100, n_iters=150, sketch_dim=m)
  for r in (128, 256):  # The store with a residual basis of r exact rows (fitted on 1,024 training examples).
    methods[f"arnoldi_pcg_store16384_r{r}_n150_k100_i3"] = dict(
        method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=3, sketch_dim=16384, residual_rank=r,
        residual_examples=1024)
  for m, r, i in ((1024, 0, 0), (1024, 0, 3), (1024, 128, 0), (1024, 128, 3), (1024, 256, 3), (4096, 128, 3)):
    # The jobs' default store (m = 1,024, r = 128) and its neighbours; i = 0 is the plain tail.
    methods[f"arnoldi_pcg_store{m}_r{r}_n150_k100_i{i}"] = dict(
        method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=i, sketch_dim=m, residual_rank=r,
        residual_examples=1024)
  for dtype in ("bfloat16", "float16"):  # The jobs' default store kept in 16 bits (project.store_dtype).
    methods[f"arnoldi_pcg_store1024_r128_n150_k100_i3_{dtype}"] = dict(
        method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=3, sketch_dim=1024, residual_rank=128,
        residual_examples=1024, store_dtype=dtype)
  methods["arnoldi_pcg_n300_k200_i3"] = dict(method="arnoldi_pcg", top_k=200, n_iters=300, cg_iters=3)
  for n, k in ((150, 100), (300, 200)):  # 3 iterations from a store, k = 100 and 200.
    methods[f"arnoldi_pcg_store16384_n{n}_k{k}_i3"] = dict(method="arnoldi_pcg", top_k=k, n_iters=n, cg_iters=3,
                                                           sketch_dim=16384)
  # Gauss-Newton curvature (the jobs' default for a cross-entropy loss) in place of the Hessian.
  gn = dict(curvature="gauss_newton")
  methods["arnoldi_gn_n150_k100"] = dict(method="arnoldi", top_k=100, n_iters=150, tail=False, **gn)
  methods["arnoldi_tail_gn_n150_k100"] = dict(method="arnoldi", top_k=100, n_iters=150, tail=True, **gn)
  methods["arnoldi_pcg_gn_n150_k100_i3"] = dict(method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=3, **gn)
  methods["arnoldi_pcg_store1024_r128_gn_n150_k100_i3"] = dict(
      method="arnoldi_pcg", top_k=100, n_iters=150, cg_iters=3, sketch_dim=1024, residual_rank=128,
      residual_examples=1024, **gn)
  if not small:
    methods["lissa"] = dict(method="lissa", scale=20.0, depth=300, batch_size=64, repeats=1, tol=1e-2)
  methods["cg"] = dict(method="cg", tol=1e-10, max_iters=100)
  methods["cg_gn"] = dict(method="cg", tol=1e-10, max_iters=100, **gn)
  config.methods = ml_collections.ConfigDict(methods)
  config.method_order = tuple(methods)  # Cheapest first (ConfigDict sorts its keys).
  config.problem_order = ("digits85k_d1e-3", "digits85k_d1e-2")
  return config
