"""Pure, jitted optax training loops and accuracy.

`train_segment` is the one training scan (pure, jit- and vmap-able, resumable);
`train` runs minibatch (or full-batch) first-order training as one segment;
`train_to_convergence` runs full-batch L-BFGS until the gradient norm is below a
tolerance, which is what influence theory wants (θ* near a minimum of L). Any
L2 term belongs in `loss_fn` (see flax_adapters).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from influence_jax import data as data_lib
from influence_jax import validation
from influence_jax.types import Batch, LossFn, OutputsFn, Params



def epoch_indices(key: jax.Array, n: int, batch_size: int, num_steps: int) -> jax.Array:
  """Returns (num_steps, batch_size) example indices: a fresh permutation each epoch, remainder dropped."""
  steps_per_epoch = n // batch_size
  num_epochs = -(-num_steps // steps_per_epoch)
  keys = jax.random.split(key, num_epochs)
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(keys)
  idx = perms[:, : steps_per_epoch * batch_size].reshape(num_epochs * steps_per_epoch, batch_size)
  return idx[:num_steps]


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "batch_size", "num_steps"))
def train_segment(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    opt_state: Any,
    train_batch: Batch,
    key: jax.Array,
    *,
    batch_size: int,
    num_steps: int,
) -> tuple[Params, Any, jax.Array, jax.Array]:
  """Returns (params, opt_state, losses (num_steps,), grad_norms (num_steps,)) after `num_steps` updates.

  The one training scan of the package: a pure function of its array
  arguments, so it can be jitted (it is), resumed (pass the returned
  opt_state back) and vmapped, e.g. over per-example weights carried in
  `train_batch` (a leaf loss_fn reads, such as batch["weight"]) and over
  `key`s. batch_size == N trains full-batch (key unused); otherwise
  `epoch_indices(key, ...)` picks the minibatches. losses[i] is the minibatch
  loss before update i and grad_norms[i] its gradient norm. `loss_fn`,
  `optimizer`, `batch_size` and `num_steps` are static.
  """
  n = data_lib.batch_size(train_batch)
  full_batch = batch_size == n
  idx = None if full_batch else epoch_indices(key, n, batch_size, num_steps)

  def step(carry, i):
    params, opt_state = carry
    batch = train_batch if full_batch else jax.tree.map(lambda x: x[idx[i]], train_batch)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), (loss, otu.tree_norm(grads))

  (params, opt_state), (losses, grad_norms) = jax.lax.scan(step, (params, opt_state), jnp.arange(num_steps))
  return params, opt_state, losses, grad_norms


def train(
    loss_fn: LossFn,
    params: Params,
    train_batch: Batch,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int | None = None,
    num_epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> tuple[Params, dict[str, np.ndarray]]:
  """Returns (trained params, history) after optax training on `train_batch`.

  Give exactly one of `num_steps` or `num_epochs`. `batch_size=None` (or ≥ N)
  trains full-batch; otherwise each epoch visits a fresh permutation of the
  examples (drawn from `seed`) in batches of `batch_size`, dropping the last
  N mod batch_size. history = {"loss": (steps,) minibatch loss before each
  update, "grad_norm": (steps,) its gradient norm, "final_loss": full-batch
  loss after training}. Deterministic given `seed`. `loss_fn` and `optimizer`
  are static to jit: reuse the same objects to avoid recompiling.
  """
  if (num_steps is None) == (num_epochs is None):
    raise ValueError("give exactly one of num_steps or num_epochs.")
  n = data_lib.batch_size(train_batch)
  bs = n if batch_size is None or batch_size >= n else int(batch_size)
  if bs < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  steps = int(num_steps) if num_steps is not None else int(num_epochs) * (n // bs)
  if steps < 1:
    raise ValueError(f"training needs at least one step; got num_steps/num_epochs giving {steps}.")
  validation.check_finite(params, "params")
  train_batch = jax.tree.map(jnp.asarray, train_batch)
  params, _, losses, grad_norms = train_segment(
      loss_fn, optimizer, params, optimizer.init(params), train_batch, jax.random.key(seed),
      batch_size=bs, num_steps=steps)
  history = {
      "loss": np.asarray(losses),
      "grad_norm": np.asarray(grad_norms),
      "final_loss": float(jax.jit(loss_fn)(params, train_batch)),
  }
  return params, history


@functools.partial(jax.jit, static_argnames=("loss_fn", "max_steps", "memory_size"))
def _lbfgs_loop(loss_fn, params, batch, tol, *, max_steps, memory_size):
  fun = lambda p: loss_fn(p, batch)
  opt = optax.lbfgs(memory_size=memory_size)
  value_and_grad = optax.value_and_grad_from_state(fun)

  def body(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state

  def cond(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tol))

  params, state = jax.lax.while_loop(cond, body, (params, opt.init(params)))
  value, grad = jax.value_and_grad(fun)(params)
  return params, otu.tree_get(state, "count"), value, otu.tree_norm(grad)


def train_to_convergence(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    tol: float = 1e-6,
    max_steps: int = 1000,
    memory_size: int = 10,
) -> tuple[Params, dict[str, Any]]:
  """Returns (params, info) after full-batch L-BFGS (optax.lbfgs, zoom line search) on `batch`.

  Stops when ‖∇L‖ < `tol` or after `max_steps`. info = {"steps", "loss",
  "grad_norm" (at the returned params), "converged" (grad_norm < tol)}.
  Meant for small, (nearly) convex problems, e.g. a damped/L2 model or the
  last layer, where influence needs θ* at a minimum. Use float64 for tol < 1e-5.
  """
  validation.check_finite(params, "params")
  batch = jax.tree.map(jnp.asarray, batch)
  params, steps, loss, grad_norm = _lbfgs_loop(
      loss_fn, params, batch, jnp.asarray(tol), max_steps=int(max_steps), memory_size=int(memory_size))
  info = {"steps": int(steps), "loss": float(loss), "grad_norm": float(grad_norm),
          "converged": bool(grad_norm < tol)}
  return params, info


def predict(outputs_fn: OutputsFn, params: Params, batch: Batch,
            *, batch_size: int = 1024) -> np.ndarray:
  """Returns outputs_fn(params, batch) computed in chunks of `batch_size` examples (numpy)."""
  fn = jax.jit(outputs_fn)
  return np.concatenate([np.asarray(fn(params, b)) for b in data_lib.iterate(batch, batch_size)])


def accuracy(outputs_fn: OutputsFn, params: Params, batch: Batch,
             *, label_key: str = "y", batch_size: int = 1024) -> float:
  """Returns the fraction of argmax(outputs_fn(params, batch), −1) equal to batch[label_key] (nan for an
  empty batch).

  Per token for sequence outputs (B, L, V) with labels (B, L).
  """
  if label_key not in batch:
    raise KeyError(f"batch has no label key {label_key!r}; its keys are {sorted(batch)}.")
  if np.size(batch[label_key]) == 0:
    return float("nan")
  logits = predict(outputs_fn, params, batch, batch_size=batch_size)
  labels = np.asarray(batch[label_key])
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} do not match labels {labels.shape} (expected labels.shape + (C,)).")
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def optimizer_from_config(train_config):
  """Returns the optax optimizer named by config.train: optimizer ('adam' | 'sgd'), learning_rate, momentum."""
  name = train_config.get("optimizer", "adam")
  if name == "adam":
    return optax.adam(train_config.learning_rate)
  if name == "sgd":
    return optax.sgd(train_config.learning_rate, momentum=train_config.get("momentum", 0.9))
  raise ValueError(f"Unknown config.train.optimizer {name!r}; expected 'adam' or 'sgd'.")
