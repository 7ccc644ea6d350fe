r"""Benchmark: the residual basis's cost against the curvature products of an Arnoldi fit, on example models.

For each model prints, measured in one run (after a warm-up call of each timed function):
- basis s: `residual_basis.fit_residual_basis` at the jobs' defaults (rank 128, oversample 16, one
  power iteration) on a sample of --sample examples;
- ÷ grad pass: that time ÷ one pass of jax.grad of the mean loss over the same sample (batches of
  128): the basis's cost in gradient passes;
- ÷ fit: that time ÷ the Arnoldi fit's curvature products at the model's job config (n_iters HVPs
  over arnoldi.num_examples examples, one HVP timed over its batch and scaled): the fraction of a
  fit the project job spends on the basis (Arnoldi's own overhead excluded: scripts/bench_arnoldi.py).

  nice -n 10 python scripts/bench_residual_basis.py --models=mlp,transformer --sample=512
"""

from __future__ import annotations

import os
import runpy
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.flatten_util import ravel_pytree

from influence_jax import curvature, data as data_lib, residual_basis
from influence_jax.examples import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODELS = flags.DEFINE_list("models", ["mlp", "transformer"], "mlp: configs/digits_mlp.py with hidden (256, 256) "
                            "(85,002 parameters); transformer: "
                            "configs/seq2seq_transformer.py with sequences of 32, d_model 64, 2 layers.")
_SAMPLE = flags.DEFINE_integer("sample", 512, "Examples the basis is fitted on (the jobs' default is 1,024).")
_RANK = flags.DEFINE_integer("rank", 128, "Rows of the basis (project.residual_rank).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions of the gradient pass and of one HVP.")


def _config(model: str):
  if model == "mlp":  # The 85,002-parameter MLP of configs/benchmark_digits85k.py.
    c = runpy.run_path(os.path.join(ROOT, "configs", "digits_mlp.py"))["get_config"]()
    c.model.features = (256, 256)
    return c
  c = runpy.run_path(os.path.join(ROOT, "configs", "seq2seq_transformer.py"))["get_config"]()
  c.data.seq_len, c.data.num_examples = 32, 2400
  c.model.d_model, c.model.d_ff, c.model.num_layers = 64, 256, 2
  return c


def _best(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def bench(model: str) -> str:
  config = _config(model)
  example = tasks.build_example(config)
  fns = tasks.model_fns(example, tasks.init_variables(example, config), config)
  train = example.splits["train"]
  n = min(_SAMPLE.value, data_lib.batch_size(train))
  sample = list(data_lib.iterate(data_lib.take(train, 0, n), 128))
  params = fns.params
  p = ravel_pytree(params)[0].size
  k = config.arnoldi.top_k
  u = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (p, k)))[0].T  # Orthonormal stand-in for U.

  grad = jax.jit(jax.grad(fns.loss_fn))
  grad_pass = _best(lambda: [grad(params, b) for b in sample], _REPEATS.value)
  curv_batch = data_lib.take(train, 0, min(config.arnoldi.batch_size, data_lib.batch_size(train)))
  op = curvature.curvature_operator(fns.loss_fn, params, [curv_batch])
  v = jnp.ones(p, u.dtype)
  matvec = jax.jit(op.matvec)  # As Arnoldi's jitted step calls it.
  hvp = _best(lambda: matvec(op.operands, v), _REPEATS.value)
  num_curvature = data_lib.batch_size(train) if config.arnoldi.num_examples < 0 else config.arnoldi.num_examples
  fit = config.arnoldi.n_iters * hvp * num_curvature / data_lib.batch_size(curv_batch)
  fit_basis = lambda: residual_basis.fit_residual_basis(u, fns.per_example_loss_fn, params, sample, _RANK.value)
  jax.block_until_ready(fit_basis())
  start = time.perf_counter()
  jax.block_until_ready(fit_basis())
  basis = time.perf_counter() - start
  return (f"| {model} | {p:,} | {n} | {basis:.2f} | {basis / grad_pass:.1f} | {basis / fit:.3f} "
          f"(fit ≈ {fit:.1f} s: {config.arnoldi.n_iters} HVPs over {num_curvature:,} examples) |")


def main(argv):
  del argv
  print("| model | params | sample | basis s | ÷ grad pass | ÷ fit |\n|---|---|---|---|---|---|", flush=True)
  for model in _MODELS.value:
    print(bench(model), flush=True)


if __name__ == "__main__":
  app.run(main)
