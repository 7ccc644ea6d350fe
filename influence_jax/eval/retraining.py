"""Ground truth by retraining: leave-one-out and random-subset (LDS) models, vmapped, cached, resumable.

`train_fn(weights (N,), seed) -> params` trains one model on the weighted
objective (1/N) Σ w_i ℓ(z_i) + (λ/2)‖θ‖² (see problems.py); `evaluate_fn(params)
-> (T,)` is the target, e.g. per-example test losses. Many models are one
`jax.vmap` of evaluate_fn ∘ train_fn over rows of weights and seeds, run in
chunks. Each finished chunk is written to `cache_dir/<key>/chunk_XXXXX.npz`,
where key hashes the caller's config with the exact weights and seeds, so a
killed run reuses every finished chunk and recomputes only the rest.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import io as io_lib
from influence_jax.types import Params


# train_fn(weights (N,), seed) -> params: one model trained with per-example weights (pure, vmappable).
TrainFn = Callable[[jax.Array, jax.Array], Params]
# evaluate_fn(params) -> (T,) targets, e.g. the per-example test losses.
EvaluateFn = Callable[[Params], jax.Array]


class Retrained(NamedTuple):
  """targets: (M, T) evaluate_fn of each retrained model; key: the cache key; reused_chunks: chunks read from disk."""

  targets: np.ndarray
  key: str
  reused_chunks: int


def cache_key(config: Any, weights: np.ndarray, seeds: np.ndarray) -> str:
  """Returns io.digest of (config as sorted JSON, weights, seeds): a short hex digest.

  `config` must name everything that defines train_fn and evaluate_fn (model,
  data, steps, learning rate, dtype...): functions themselves are not hashed.
  """
  # The config as sorted JSON, so that its keys count too (fingerprint hashes pytree leaves).
  return io_lib.digest(json.dumps(config, sort_keys=True, default=str), np.asarray(weights), np.asarray(seeds))


def retrain(
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn,
    weights: np.ndarray,
    seeds: np.ndarray,
    *,
    chunk_size: int = 16,
    cache_dir: Optional[str] = None,
    config: Any = None,
    log: Optional[Callable[[str], None]] = None,
) -> Retrained:
  """Returns the (M, T) targets evaluate_fn(train_fn(weights[m], seeds[m])) for every row m.

  Models are trained `chunk_size` at a time with one jitted vmap (the last
  chunk is padded, so it compiles once). With `cache_dir`, finished chunks
  are saved and reused (resumable); `config` must then describe train_fn and
  evaluate_fn (it is part of the cache key).
  """
  weights = np.asarray(weights)
  seeds = np.asarray(seeds, np.uint32)
  if weights.ndim != 2:
    raise ValueError(f"weights must be (num_models, num_train); got shape {weights.shape}.")
  if seeds.shape != (weights.shape[0],):
    raise ValueError(f"seeds must have shape ({weights.shape[0]},), one per model; got {seeds.shape}.")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0):
    raise ValueError("weights must be finite and non-negative.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  if cache_dir is not None and config is None:
    raise ValueError("A cache needs `config` describing train_fn and evaluate_fn (it keys the cache).")
  key = cache_key(config, weights, seeds)
  folder = None
  if cache_dir is not None:
    folder = pathlib.Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    io_lib.atomic_write_text(str(folder / "config.json"), json.dumps(
        {"config": config, "num_models": int(weights.shape[0]), "chunk_size": chunk_size},
        sort_keys=True, indent=1, default=str))
  run = _runner(train_fn, evaluate_fn)
  num_models = weights.shape[0]
  num_chunks = math.ceil(num_models / chunk_size)
  outputs, reused = [], 0
  start = time.perf_counter()
  for c in range(num_chunks):
    lo, hi = c * chunk_size, min((c + 1) * chunk_size, num_models)
    path = None if folder is None else folder / f"chunk_{c:05d}_of_{num_chunks:05d}_size_{chunk_size}.npz"
    if path is not None and path.exists():
      with np.load(path) as f:
        out = f["targets"]
      if out.shape[0] != hi - lo:
        raise ValueError(f"Cached chunk {path} holds {out.shape[0]} models, expected {hi - lo}; delete it.")
      outputs.append(out)
      reused += 1
      continue
    w, s = weights[lo:hi], seeds[lo:hi]
    if hi - lo < chunk_size:
      fill = chunk_size - (hi - lo)
      w = np.concatenate([w, np.repeat(w[:1], fill, 0)])
      s = np.concatenate([s, np.repeat(s[:1], fill, 0)])
    out = np.asarray(run(jnp.asarray(w), jnp.asarray(s)))[: hi - lo]
    if not np.all(np.isfinite(out)):
      raise FloatingPointError(f"Retrained models {lo}..{hi - 1} gave non-finite targets.")
    if path is not None:
      io_lib.atomic_write(str(path), lambda f, out=out: np.savez(f, targets=out), binary=True)
    outputs.append(out)
    if log is not None:
      log(f"retrained models {lo}..{hi - 1} of {num_models} ({time.perf_counter() - start:.1f}s so far)")
  return Retrained(np.concatenate(outputs), key, reused)


@functools.lru_cache(maxsize=8)
def _runner(train_fn: TrainFn, evaluate_fn: Callable) -> Callable:
  """Returns jit(vmap(evaluate_fn ∘ train_fn)), one per pair of functions, so LDS and LOO share a compile."""
  return jax.jit(jax.vmap(lambda w, s: evaluate_fn(train_fn(w, s))))


def random_subsets(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
  """Returns (num_subsets, num_train) boolean masks, each with round(fraction · num_train) examples, uniform."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
  size = int(round(fraction * num_train))
  if size < 1:
    raise ValueError(f"fraction {fraction} of {num_train} examples leaves an empty subset.")
  rng = np.random.default_rng(seed)
  masks = np.zeros((num_subsets, num_train), bool)
  for m in range(num_subsets):
    masks[m, rng.choice(num_train, size, replace=False)] = True
  return masks


class LDSGroundTruth(NamedTuple):
  """masks: (M, N) training subsets; seeds: (M,) each model's seed; targets: (M, T) its per-test-example targets."""

  masks: np.ndarray
  seeds: np.ndarray
  targets: np.ndarray


def lds_ground_truth(
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn,
    num_train: int,
    *,
    num_subsets: int,
    fraction: float = 0.5,
    seed: int = 0,
    dtype=np.float64,
    **retrain_kwargs,
) -> LDSGroundTruth:
  """Returns the LDS ground truth: one model per random subset, each with its own seed (as dattri).

  Model m minimises the mean loss over its subset: weights = mask · N/|S|.
  """
  masks = random_subsets(num_train, num_subsets, fraction, seed)
  seeds = np.random.default_rng([seed, 1]).integers(0, 2**31 - 1, num_subsets).astype(np.uint32)
  weights = (masks * (num_train / masks.sum(1, keepdims=True))).astype(dtype)
  out = retrain(train_fn, evaluate_fn, weights, seeds, **retrain_kwargs)
  return LDSGroundTruth(masks, seeds, out.targets)


class LOOGroundTruth(NamedTuple):
  """indices: (R,) removed training examples; deltas: (R, T) target(θ₋ⱼ) − target(θ), same seed and procedure."""

  indices: np.ndarray
  deltas: np.ndarray
  base: np.ndarray


def loo_ground_truth(
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn,
    num_train: int,
    indices,
    *,
    seed: int = 0,
    dtype=np.float64,
    **retrain_kwargs,
) -> LOOGroundTruth:
  """Returns leave-one-out changes of the target: one model per removed index, all from the same seed.

  Removing z_j sets w_j = 0 (the others stay 1): upweighting z_j by ε = −1/N,
  so influence predicts deltas[:, x] ≈ score(z_j, x)/N (docs/design.md, "What a score means"). The
  reference model is train_fn(ones, seed), trained in the same vmap.
  """
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1 or np.any(indices < 0) or np.any(indices >= num_train):
    raise ValueError(f"indices must be a vector of training indices in [0, {num_train}).")
  weights = np.ones((len(indices) + 1, num_train), dtype)
  weights[np.arange(1, len(indices) + 1), indices] = 0
  seeds = np.full((len(indices) + 1,), seed, np.uint32)
  out = retrain(train_fn, evaluate_fn, weights, seeds, **retrain_kwargs).targets
  return LOOGroundTruth(indices, out[1:] - out[:1], out[0])
