r"""The query side of the score job on the 85,002-parameter task: LDS and seconds of each way to solve.

The task of docs/eval_results.md (configs/benchmark_digits85k.py, problem digits85k_d1e-3: MLP
64-256-256-10 tanh, 1,437 training digits, δ = 1e-3, the Hessian, n = 150, k = 100) scored from a
store as the jobs make it (m = 1,024 sketch rows, residual basis r = 128 fitted on 1,024 training
examples), every candidate's query vectors computed by the functions the score job calls:
- pcg_tail_i3: today's default, 3 CG iterations preconditioned with the spectral tail (U, Λ, c);
- galerkin_i{0..3}: the Galerkin solve on W = [U; V] (H_W = W C Wᵀ formed once, `galerkin`), then
  i CG iterations started from and preconditioned with it;
- *_s256: the same with the query-side curvature sample cut to 256 examples (score.solve_examples).
LDS on the 100 query digits (retraining read from --workdir's cache: make it with the command of
docs/eval_results.md), seconds for T = 100 and T = 1,000 queries (the 100 digits and 900 training
digits: timing only; LDS needs a retrained model's loss on each query and digits holds 360 examples
outside the training set). Then the cost of a solved query in HVP-equivalents (one product with C
over the curvature sample, a single vector), blocks of --block queries against one at a time.

  PYTHONPATH=. nice -n 10 python scripts/bench_query_solves.py --workdir=/tmp/ij27_85k
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import (curvature, data, eigenspace, galerkin, preconditioning, projection, residual_basis,
                           scoring, sketch)
from influence_jax.eval import benchmark, metrics, problems


def _clock(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def _benchmark_config():
  path = pathlib.Path(__file__).resolve().parent.parent / "configs" / "benchmark_digits85k.py"
  spec = importlib.util.spec_from_file_location("benchmark_digits85k", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _setup(workdir):
  cfg = _benchmark_config().problems["digits85k_d1e-3"]
  prob = benchmark.build_problem(cfg)
  params, _ = problems.train_with_checkpoints(prob, steps=cfg.steps, learning_rate=cfg.learning_rate,
                                              num_checkpoints=cfg.num_checkpoints, seed=cfg.init_seed)
  key_config = {k: cfg[k] for k in benchmark.TRAINING_KEYS if k in cfg}
  key_config["target"] = "per-example test loss"
  train_fn = problems.make_train_fn(prob, steps=cfg.steps, learning_rate=cfg.learning_rate)
  lds_gt = benchmark.lds_truth(train_fn, problems.loss_targets(prob), prob.num_train, cfg,
                               cache_dir=f"{workdir}/retraining", config=key_config, chunk_size=cfg.chunk_size,
                               log=print)
  return cfg, prob, params, lds_gt


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/ij27_85k", help="Holds retraining/ of the 85k benchmark.")
  parser.add_argument("--block", type=int, default=100, help="Queries solved together.")
  parser.add_argument("--small_sample", type=int, default=256, help="Curvature examples of the *_s candidates.")
  args = parser.parse_args()
  cfg, prob, params, lds_gt = _setup(args.workdir)
  per_example, loss_fn = prob.per_example_loss_fn, prob.loss_fn
  train = [{k: v[i:i + 500] for k, v in prob.train.items()} for i in range(0, prob.num_train, 500)]
  es, fit_s = _clock(lambda: eigenspace.fit_eigenspace(loss_fn, params, train, n_iters=150, top_k=100,
                                                         damping=cfg.damping, seed=0))
  basis = residual_basis.fit_residual_basis(es.eigenvectors, per_example, params,
                                            [data.take(prob.train, 0, 1024)], 128, seed=0)
  w = residual_basis.stored_directions(es.eigenvectors, basis)
  sk = sketch.make_sketch(es.num_params, 1024, 0, es.eigenvectors.dtype)
  rows = [sketch.project_and_sketch(w, sk, per_example, params, b) for b in train]
  stored = np.asarray(scoring.row_side(jnp.concatenate([r.projections for r in rows]),
                                       jnp.concatenate([r.sketch for r in rows])))
  c = eigenspace.default_tail_constant(es)
  small = [data.take(prob.train, 0, args.small_sample)]
  ops = {"": curvature.curvature_operator(loss_fn, params, train),
         "_s": curvature.curvature_operator(loss_fn, params, small)}
  inverses = {}
  for tag, op in ops.items():
    h, h_s = _clock(lambda op=op: jnp.asarray(galerkin.restricted_curvature(op, w, block_size=args.block)))
    inv = galerkin.galerkin_inverse(np.asarray(h), cfg.damping, c)
    inverses[tag] = inv
    print(f"H_W over {'all' if not tag else args.small_sample} curvature examples: {h_s:.1f} s "
          f"({w.shape[0]} products), min eigenvalue of H_W + δI {inv.min_eigenvalue:.2e}, floored {inv.floored}")
  print(f"fit {fit_s:.1f} s; p = {es.num_params}, d = k + r = {w.shape[0]}, c = {c:.3g}")
  queries = {100: prob.test, 1000: data.concatenate([prob.test, data.take(prob.train, 0, 900)])}

  def solve(batch, candidate, block):
    tag = "_s" if candidate.endswith("_s256") else ""
    name = candidate.removesuffix("_s256")
    iters = int(name[-1])
    if name.startswith("galerkin") and iters == 0:
      out = sketch.project_and_sketch(w, sk, per_example, params, batch)
      return galerkin.galerkin_query_side(inverses[tag].inverse, c, out.projections, out.sketch)
    pre = (galerkin.galerkin_tail_inverse(w, inverses[tag].inverse, c) if name.startswith("galerkin") else None)
    parts = []
    for lo in range(0, data.batch_size(batch), block):
      g = projection.per_example_gradients(per_example, params, data.take(batch, lo, lo + block))
      res = preconditioning.preconditioned_solve(ops[tag], es, g, cg_iters=iters, preconditioner=pre)
      parts.append(np.asarray(preconditioning.solved_query_side(es, sk, res.x, basis)))
    return np.concatenate(parts)

  candidates = ["pcg_tail_i3", "galerkin_i0", "galerkin_i1", "galerkin_i2", "galerkin_i3", "pcg_tail_i3_s256",
                "galerkin_i1_s256"]
  print("| candidate | LDS (T = 100) | s, T = 100 | s, T = 1,000 |")
  print("|---|---|---|---|")
  for cand in candidates:
    solve(data.take(queries[100], 0, args.block), cand, args.block)  # Compile.
    q100, s100 = _clock(lambda: solve(queries[100], cand, args.block))
    _, s1000 = _clock(lambda: solve(queries[1000], cand, args.block))
    lds = metrics.lds(q100 @ stored.T, lds_gt.masks, lds_gt.targets)
    print(f"| {cand} | {lds:.3f} | {s100:.2f} | {s1000:.2f} |", flush=True)
  _hvp_equivalents(ops[""], es.num_params, es.eigenvectors.dtype, solve, data.take(queries[100], 0, args.block),
                   args.block, prob.num_train)


def _hvp_equivalents(op, num_params, dtype, solve, batch, block, num_examples):
  """Prints the cost of a solved query in curvature products of one vector over the sample, in blocks of
  `block` queries against one at a time (10 queries)."""
  v = jnp.asarray(np.random.default_rng(0).normal(size=num_params), dtype)
  op(v).block_until_ready()
  _, hvp_s = _clock(lambda: [op(v) for _ in range(5)])
  hvp_s /= 5
  for cand in ("pcg_tail_i3", "galerkin_i1"):
    per = {}
    for size in (1, block):
      solve(data.take(batch, 0, size), cand, size)  # Compile.
      n = block if size > 1 else 10
      _, secs = _clock(lambda: solve(data.take(batch, 0, n), cand, size))
      per[size] = secs / n / hvp_s
    print(f"{cand}: a solved query costs {per[1]:.2f} HVP-equivalents one at a time, {per[block]:.3f} in "
          f"blocks of {block} ({per[1] / per[block]:.1f}× less); one HVP over the "
          f"{num_examples}-example sample: {hvp_s * 1e3:.1f} ms")

if __name__ == "__main__":
  main()
