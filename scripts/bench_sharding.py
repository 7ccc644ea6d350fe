r"""Benchmark: Arnoldi and projection wall time per mesh shape, on virtual CPU devices (or real accelerators).

For each mesh (data, model) — and "none", the unsharded one-device code path —
prints the time of n Arnoldi steps (curvature batches over 'data', basis
columns over 'model'), of projecting every digits example on k eigenvectors
(batches over 'data'), and the largest eigenvalue difference from the
unsharded run (a correctness check, not a timing).

  python scripts/bench_sharding.py --num_cpu_devices=8 --meshes=none,8x1,1x8,2x4,4x2

Virtual CPU devices (`--num_cpu_devices`) share the machine's cores: they show
that the sharded programs run and what their communication and partitioning
cost, not a speed-up; a speed-up needs as many real devices (or cores) as the
mesh has.
"""

import time

from absl import app, flags
import jax
import numpy as np
import optax
from sklearn import datasets

_DEVICES = flags.DEFINE_integer("num_cpu_devices", 8, "Virtual CPU devices (set before JAX starts; CPU only).")
_MESHES = flags.DEFINE_list("meshes", ["none", "8x1", "1x8", "2x4", "4x2"], "Mesh shapes data x model, or none.")
_N = flags.DEFINE_integer("n_iters", 60, "Arnoldi steps.")
_K = flags.DEFINE_integer("top_k", 20, "Eigenvectors to project on.")
_HIDDEN = flags.DEFINE_list(
    "hidden", ["60", "62"], "Hidden layer widths of the digits MLP (default: p = 8312 = 8 x 1039, no column padding).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repetitions after the compiling run (the minimum is kept).")


def mlp_params(sizes, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  return [{"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jax.numpy.zeros(n)}
          for k, m, n in zip(keys, sizes[:-1], sizes[1:])]


def per_example_loss(params, batch):
  h = batch["x"]
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"])
  logits = h @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def loss_fn(params, batch):
  return per_example_loss(params, batch).mean()


def timed(fn, repeats):
  """Returns (first call's time, including compilation; best of `repeats` further calls)."""
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return first, best


def main(_):
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)  # before any computation starts the backend
  from influence_jax import arnoldi, curvature, eigenspace, sharding

  d = datasets.load_digits()
  x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
  n = 1792  # a multiple of 8 and 16: every mesh splits the batches evenly
  train = [{"x": x[:n // 2], "y": y[:n // 2]}, {"x": x[n // 2:n], "y": y[n // 2:n]}]
  params = mlp_params([64] + [int(h) for h in _HIDDEN.value] + [10])
  p = sum(leaf.size for leaf in jax.tree.leaves(params))
  dev = jax.devices()[0]
  print(f"devices: {jax.device_count()} x {dev.platform} ({dev.device_kind}); host cores: {_cores()}; "
        f"p = {p}; n = {_N.value}; k = {_K.value}; projected examples = {n}; float32")
  print(f"{'mesh':>6} {'arnoldi s':>10} {'(1st)':>7} {'s/step':>8} {'project s':>10} {'(1st)':>7} {'ex/s':>8} "
        f"{'max |dλ|':>9}")
  reference = None
  for name in _MESHES.value:
    mesh = None if name == "none" else sharding.make_mesh(tuple(int(s) for s in name.split("x")))
    op = curvature.curvature_operator(loss_fn, params, train, mesh=mesh)
    start = eigenspace.start_vector(op.dim, op.dtype, 0, mesh=op.mesh)
    state = None

    def fit():
      nonlocal state
      state = arnoldi.run(op, arnoldi.init(start, _N.value))
      state.hessenberg.block_until_ready()

    a_first, a_best = timed(fit, _REPEATS.value)
    es = eigenspace.distill(op, state, top_k=_K.value, compute_residuals=False)
    if reference is None:
      reference = np.asarray(es.eigenvalues)
    diff = float(np.max(np.abs(np.asarray(es.eigenvalues) - reference)))
    project = lambda: eigenspace.project(es, per_example_loss, params, train).block_until_ready()
    p_first, p_best = timed(project, _REPEATS.value)
    print(f"{name:>6} {a_best:10.3f} {a_first:7.2f} {a_best / _N.value * 1e3:6.1f}ms {p_best:10.3f} {p_first:7.2f} "
          f"{n / p_best:8.0f} {diff:9.1e}")


def _cores():
  import os
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
  app.run(main)
