"""Throughput of projecting per-example gradients, against its floor and a plain batched gradient.

For each model and k, prints examples/s of `projection.project_on` for the
default method (layer-wise: Linen models by module interception, `layerwise`;
the plain-function and NNX twins of the small MLP, `mlp_small_plain` and
`mlp_small_nnx`, by the layers found from the jaxpr, `traced`; any model
name + `_traced`: that Linen model's loss through `traced`) and the
old "vjp" and "jvp" methods, and two ratios measured in the same run:
- × floor: time per example ÷ (floor FLOPs ÷ the run's jitted float32 matmul
  rate), floor FLOPs = 3 × the forward pass's FLOPs (XLA's count; 6 × weights
  for an MLP) + 2·k·p;
- × grad: time per example ÷ that of jax.grad of the mean loss on batches of
  the same size (one backward pass for the whole batch, no per-example work).

With --store_rows, the same for `sketch.project_and_sketch` (default method:
`sketch.store_method`), what the project job runs: the k
eigenvector directions plus --residual_rank residual directions and a Kronecker sketch of
--sketch_dim rows; its floor adds the sketch's FLOPs (2·m₁·p₁p₂ + 2·m₁m₂p₂ + 2·(k + r)·m).

Each figure is the best of --repeats timed passes after one warm-up. With --interleave (default
method only), the models are timed in turn in each of --repeats rounds, with the matmul rate and
their batched gradients, so that on a shared machine all see the same spells of load.

  nice -n 10 python scripts/bench_throughput.py --out docs/throughput_results.txt
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import flax_adapters, projection, ranking, sketch, traced
from influence_jax.examples import models

# Any name + "_traced": that Linen model's loss through `traced` instead of its module interception.
MODELS = ("mlp_small", "mlp_small_plain", "mlp_small_nnx", "mlp_big", "cnn", "transformer")


def _plain_mlp_outputs(params, batch):
  """The 784-128-10 ReLU MLP written as a plain JAX function over a dict of arrays (x @ W + b)."""
  h = jax.nn.relu(batch["x"] @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"])
  return h @ params["output"]["kernel"] + params["output"]["bias"]


def _plain_fns(params, outputs_fn, per_example_loss_fn=None):
  """Returns ModelFns of a plain function (its per-example loss a plain function too unless given)."""
  per_example = per_example_loss_fn or (lambda p, b: models.softmax_cross_entropy(outputs_fn(p, b), b["y"]))
  return flax_adapters.ModelFns(params, lambda p, b: jnp.mean(per_example(p, b)), per_example, outputs_fn,
                                lambda p: p)


def make_problem(name: str, batch: int, key):
  """Returns (ModelFns, list of device batches) for one benchmark model on random data."""
  if name.endswith("_traced"):  # A Linen model's loss as a plain function: its layers found from the jaxpr.
    fns, data = make_problem(name.removesuffix("_traced"), batch, key)
    return fns._replace(per_example_loss_fn=traced.TracedLayerwiseLoss(fns.per_example_loss_fn.fn)), data
  kx, ky, ki = jax.random.split(key, 3)
  if name == "transformer":
    length, vocab = 32, 64
    module = models.Transformer(vocab_size=vocab, max_len=length, d_model=64, num_heads=4, d_ff=256, num_layers=2)
    src = jax.random.randint(kx, (batch, length), 1, vocab)
    tgt = jax.random.randint(ky, (batch, length), 1, vocab)
    variables = module.init(ki, src[:1], tgt[:1])
    fns = flax_adapters.linen_loss_fns(module, variables, models.sequence_cross_entropy, input_key=("src", "tgt"))
    return fns, {"src": src, "tgt": tgt, "y": tgt}
  # The small MLP three ways, the same weights: Linen (module interception, `layerwise`), a plain
  # function and NNX (layers found from the jaxpr, `traced`).
  base = name.removesuffix("_plain").removesuffix("_nnx")
  module = {"mlp_small": models.MLP(features=(128,)), "mlp_big": models.MLP(features=(512, 512)),
            "cnn": models.CNN(features=(16, 32), use_batch_norm=True)}[base]
  x = jax.random.normal(kx, (batch, 784), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, 10)
  variables = module.init(ki, x[:1])
  fns = flax_adapters.linen_loss_fns(module, variables, models.softmax_cross_entropy)
  if name.endswith("_plain"):
    fns = _plain_fns(variables["params"], _plain_mlp_outputs)
  elif name.endswith("_nnx"):
    fns = flax_adapters.nnx_loss_fns(models.nnx_mlp_from_linen(module, variables["params"]),
                                     models.softmax_cross_entropy)
  return fns, {"x": x, "y": y}


def best_time(fn, repeats: int) -> float:
  """Returns the best wall time of `repeats` calls of fn (after one warm-up call); fn blocks."""
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_rate(repeats: int, calls: int = 16) -> float:
  """Returns the jitted float32 matmul rate (FLOP/s) on 1,024 × 1,024 matrices, sustained over `calls`
  back-to-back products (~0.1 s, as long as a timed projection pass; best of `repeats`)."""
  a = jax.random.normal(jax.random.PRNGKey(1), (1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)

  def run():
    for _ in range(calls):
      out = f(a)
    out.block_until_ready()

  return calls * 2 * 1024**3 / best_time(run, repeats)


def forward_flops(fns, batch) -> float:
  """Returns XLA's FLOP count of one forward pass (model outputs) per example."""
  cost = jax.jit(fns.outputs_fn).lower(fns.params, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / projection.data_lib.batch_size(batch)


def run(names, ks, methods, batch_size, repeats, write):
  key = jax.random.PRNGKey(0)
  for name in names:
    fns, batch = make_problem(name, batch_size, key)
    p = ravel_pytree(fns.params)[0].size
    fwd = forward_flops(fns, batch)
    default = projection.resolve_method(fns.per_example_loss_fn, None)
    grad = jax.jit(jax.grad(fns.loss_fn))
    grad_t = best_time(lambda: jax.block_until_ready(grad(fns.params, batch)), repeats) / batch_size
    for k in ks:
      directions = jax.random.normal(jax.random.PRNGKey(k), (k, p), jnp.float32)
      for method in methods:
        call = lambda: projection.project_on(directions, fns.per_example_loss_fn, fns.params, [batch],
                                             method=method).values.block_until_ready()
        t = best_time(call, repeats) / batch_size
        rate = matmul_rate(repeats)  # Measured next to each figure: the machine is shared.
        floor_t = (3 * fwd + 2 * k * p) / rate
        label = method or f"default ({default})"
        write(f"| {name} | {p:,} | {k} | {label} | {1 / t:,.0f} | {t / floor_t:.2f} | {t / grad_t:.1f} |")


def run_interleaved(names, ks, batch_size, repeats, write):
  """As `run` for the default method, the models timed in turn within each of `repeats` rounds (and the
  matmul rate and each model's batched gradient in the same rounds), each figure the best of its
  rounds: on a shared machine, every model and the floor then see the same spells of load."""
  key = jax.random.PRNGKey(0)
  problems = []
  for name in names:
    fns, batch = make_problem(name, batch_size, key)
    grad = jax.jit(jax.grad(fns.loss_fn))
    problems.append((name, fns, batch, ravel_pytree(fns.params)[0].size, forward_flops(fns, batch),
                     lambda fns=fns, batch=batch, grad=grad: jax.block_until_ready(grad(fns.params, batch))))
  for k in ks:
    calls = []
    for name, fns, batch, p, fwd, grad_call in problems:
      directions = jax.random.normal(jax.random.PRNGKey(k), (k, p), jnp.float32)
      call = (lambda fns=fns, batch=batch, directions=directions: projection.project_on(
          directions, fns.per_example_loss_fn, fns.params, [batch]).values.block_until_ready())
      call(), grad_call()  # Compiled before the rounds.
      calls.append(call)
    times = [[] for _ in problems]
    grad_times = [[] for _ in problems]
    rates = []
    for _ in range(repeats):
      for i, ((_, _, _, _, _, grad_call), call) in enumerate(zip(problems, calls)):
        times[i].append(best_time(call, 1))
        grad_times[i].append(best_time(grad_call, 1))
      rates.append(matmul_rate(1))
    rate = max(rates)
    for (name, fns, _, p, fwd, _), ts, gs in zip(problems, times, grad_times):
      t, grad_t = min(ts) / batch_size, min(gs) / batch_size
      default = projection.resolve_method(fns.per_example_loss_fn, None)
      write(f"| {name} | {p:,} | {k} | default ({default}) | {1 / t:,.0f} | {t / ((3 * fwd + 2 * k * p) / rate):.2f} | "
            f"{t / grad_t:.1f} |")


def store_rows(names, ks, methods, residual_rank, sketch_dim, batch_size, repeats, write):
  """Prints examples/s of `sketch.project_and_sketch` (a projection store's rows) against its floor."""
  key = jax.random.PRNGKey(0)
  for name in names:
    fns, batch = make_problem(name, batch_size, key)
    p = ravel_pytree(fns.params)[0].size
    fwd = forward_flops(fns, batch)
    default = sketch.store_method(fns.per_example_loss_fn, None, True, fns.params, projection.shape_of_one(batch))
    sk = sketch.make_sketch(p, sketch_dim, seed=0)
    (m1, p1), (m2, p2) = sk.left.shape, sk.right.shape
    for k in ks:
      rows = k + residual_rank
      directions = jax.random.normal(jax.random.PRNGKey(k), (rows, p), jnp.float32)
      for method in methods:
        call = lambda: jax.block_until_ready(sketch.project_and_sketch(
            directions, sk, fns.per_example_loss_fn, fns.params, batch, method=method))
        t = best_time(call, repeats) / batch_size
        rate = matmul_rate(repeats)
        floor_t = (3 * fwd + 2 * rows * p + 2 * m1 * p1 * p2 + 2 * m1 * m2 * p2 + 2 * rows * sk.dim) / rate
        label = method or f"default ({default})"
        write(f"| {name} | {p:,} | {k} + {residual_rank} | {sk.dim} | {label} | {1 / t:,.0f} | {t / floor_t:.2f} |")


def scoring(num_queries: int, num_rows: int, k: int, block: int, repeats: int, write) -> None:
  """Prints the streaming top-10's time over num_rows distinct rows of k numbers, read in host blocks
  as from a store, against its floor, 2·T·N·k FLOPs at the run's matmul rate. Twice: rows in random
  order (a shuffled training set's), and rising along the stream in a direction every query leans
  on (each tile changes every query's list on one side: the slowest order)."""
  rng = np.random.default_rng(0)
  queries = jnp.asarray(rng.standard_normal((num_queries, k)), jnp.float32)
  rows = rng.standard_normal((num_rows, k), dtype=np.float32)
  blocks = lambda: ((lo, rows[lo:lo + block]) for lo in range(0, num_rows, block))
  for order in ("random", "rising"):
    if order == "rising":
      lean = np.asarray(queries).sum(axis=0)
      rows += np.linspace(0, 1000, num_rows, dtype=np.float32)[:, None] * (lean / np.linalg.norm(lean))
    t = best_time(lambda: ranking.stream_extremes(queries, blocks(), 10), repeats)
    floor_t = 2 * num_queries * num_rows * k / matmul_rate(repeats)
    write(f"| scoring T={num_queries:,} N={num_rows:,} k={k}, blocks of {block:,}, {order} order | {t:.2f} s | "
          f"floor {floor_t:.2f} s | × floor {t / floor_t:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--ks", default="50,100")
  parser.add_argument("--methods", default="default,vjp,jvp")
  parser.add_argument("--batch_size", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None, help="also append the table to this file")
  parser.add_argument("--scoring", default="1000,1000000,100",
                      help="T,N,k of the scoring measurement ('' to skip)")
  parser.add_argument("--block", type=int, default=65536, help="rows per scoring block")
  parser.add_argument("--interleave", action="store_true",
                      help="the default method only, the models timed in turn in each round (a shared machine)")
  parser.add_argument("--store_rows", action="store_true",
                      help="measure sketch.project_and_sketch (the project job's rows) instead of project_on")
  parser.add_argument("--residual_rank", type=int, default=128, help="residual directions (with --store_rows)")
  parser.add_argument("--sketch_dim", type=int, default=1024, help="sketch rows (with --store_rows)")
  args = parser.parse_args()
  lines = []

  def write(line):
    print(line, flush=True)
    lines.append(line)

  write(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, batch {args.batch_size}")
  methods = [None if m == "default" else m for m in args.methods.split(",")]
  ks = [int(k) for k in args.ks.split(",")]
  if args.models and args.store_rows:
    write("| model | p | k + r | m | method | examples/s | × floor |")
    write("|---|---|---|---|---|---|---|")
    store_rows(args.models.split(","), ks, methods, args.residual_rank, args.sketch_dim, args.batch_size,
               args.repeats, write)
  elif args.models:
    write("| model | p | k | method | examples/s | × floor | × grad |")
    write("|---|---|---|---|---|---|---|")
    if args.interleave:
      run_interleaved(args.models.split(","), ks, args.batch_size, args.repeats, write)
    else:
      run(args.models.split(","), ks, methods, args.batch_size, args.repeats, write)
  if args.scoring:
    scoring(*(int(v) for v in args.scoring.split(",")), args.block, args.repeats, write)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
