"""A decoder-only Transformer LM whose kernels are split over 'model', on generated token data: the task of
scripts/bench_pod.py (a pod in miniature). `config.task = "influence_jax.examples.pod_lm:get_task"`; sizes in
config.user (configs/pod_lm.py; with config.user.data_dir, the tokens are a .npy file there, memory-mapped:
scripts/bench_lm.py). The parameters are the model's initialisation (seeded, untrained): the benchmark
measures time, memory and agreement across layouts, which training would not change."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from influence_jax import sharding, sources
from influence_jax.examples import models
from influence_jax.flax_adapters import linen_loss_fns
from influence_jax.types import Task


def markov_tokens(num_sequences: int, length: int, vocab_size: int, seed: int) -> np.ndarray:
  """Returns (num_sequences, length) int32 tokens of a random sparse bigram chain (4 likely successors a token)."""
  rng = np.random.default_rng(seed)
  successors = rng.integers(0, vocab_size, (vocab_size, 4))
  tokens = np.empty((num_sequences, length), np.int32)
  tokens[:, 0] = rng.integers(0, vocab_size, num_sequences)
  for t in range(1, length):
    follow = successors[tokens[:, t - 1], rng.integers(0, 4, num_sequences)]
    tokens[:, t] = np.where(rng.random(num_sequences) < 0.9, follow, rng.integers(0, vocab_size, num_sequences))
  return tokens


def token_file(directory: str, num_sequences: int, length: int, vocab_size: int, seed: int) -> np.ndarray:
  """Returns `markov_tokens(...)` memory-mapped from `directory`/tokens_<sizes>.npy, written there first
  (atomically) when absent: a data set on disk that the jobs read row by row, never whole."""
  path = os.path.join(directory, f"tokens_{num_sequences}x{length}_v{vocab_size}_s{seed}.npy")
  if not os.path.exists(path):
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial.npy"
    np.save(partial, markov_tokens(num_sequences, length, vocab_size, seed))
    os.replace(partial, path)
  return np.load(path, mmap_mode="r")


def kernel_spec(path: tuple, ndim: int) -> P:
  """Returns where a parameter is split over 'model': attention's query/key/value kernels (d, heads, head_dim)
  by head, its output (heads, head_dim, d) and ff_out (d_ff, d) by input rows, every other kernel and the
  embedding by output columns; biases, scales and positions replicated."""
  name, parent = path[-1], path[-2] if len(path) > 1 else ""
  if name == "embedding":
    return P(None, sharding.MODEL)
  if name != "kernel":
    return P()
  if parent in ("out", "ff_out"):
    return P(sharding.MODEL, *([None] * (ndim - 1)))
  if ndim == 3:
    return P(None, sharding.MODEL, None)
  return P(None, sharding.MODEL)


def split_over_model(params, mesh) -> dict:
  """Returns `params` (host values, the same in every process) as global arrays laid out by `kernel_spec` on
  `mesh`, each process filling only its own devices' shards."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    value = np.asarray(value)
    spec = kernel_spec(path, value.ndim)
    out[path] = jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda index, v=value: v[index])
  return traverse_util.unflatten_dict(out)


def get_task(config) -> Task:
  u = config.user
  model = models.DecoderLM(vocab_size=u.vocab_size, max_len=u.seq_len, d_model=u.d_model, num_heads=u.num_heads,
                           d_ff=u.d_ff, num_layers=u.num_layers)
  tokens = token_file(u.data_dir, u.num_train + u.num_queries, u.seq_len + 1, u.vocab_size, config.seed) \
      if u.get("data_dir") else markov_tokens(u.num_train + u.num_queries, u.seq_len + 1, u.vocab_size, config.seed)
  data = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    variables = jax.jit(model.init)(jax.random.key(config.seed), data["x"][:1])
  variables = jax.tree.map(np.asarray, variables)
  fns = linen_loss_fns(model, variables, models.sequence_cross_entropy, l2=u.l2)
  mesh = sharding.make_mesh(config.get("mesh_shape", None))  # The jobs' mesh (what jobs.context.job_mesh makes).
  params = split_over_model(variables["params"], mesh)
  train = {k: v[: u.num_train] for k, v in data.items()}
  queries = {k: v[u.num_train:] for k, v in data.items()}
  return Task(params=params, loss_fn=fns.loss_fn, per_example_loss_fn=fns.per_example_loss_fn,
              train=sources.ArraySource(train), queries=sources.ArraySource(queries))
