"""Per-example gradients projected on a few directions, batch by batch.

For directions D (k, p) and each example z, returns D ∇ℓ(z) ∈ ℝᵏ without
keeping p-sized gradients for more than one micro-batch:
- "vjp": per-example gradients of one micro-batch (vmap of grad), then a matmul;
- "jvp": k forward-mode directional derivatives ⟨∇ℓ(z), d_j⟩ for the whole
  micro-batch at once; no p-sized per-example gradient ever exists.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib

METHODS = ("vjp", "jvp")
_MICROBATCH_BYTES = 256 * 2**20


class Projections(NamedTuple):
  """values: (N, k) projections D ∇ℓ(z); sq_norms: (N,) ‖∇ℓ(z)‖² or None."""

  values: jax.Array
  sq_norms: Optional[jax.Array]


def default_microbatch_size(num_params: int, itemsize: int, batch: int) -> int:
  """Returns a micro-batch size whose per-example gradients take at most ~256 MiB."""
  return int(max(1, min(batch, _MICROBATCH_BYTES // max(1, num_params * itemsize))))


def _single_example_grad(per_example_loss_fn, unravel, flat, example):
  one = jax.tree.map(lambda x: x[None], example)
  return jax.grad(lambda f: per_example_loss_fn(unravel(f), one)[0])(flat)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _project_batch(per_example_loss_fn, method, with_norms, params, directions, batch):
  """Returns ((B, k) projections, (B,) squared norms or zeros) for a batch reshaped to micro-batches."""
  flat, unravel = ravel_pytree(params)

  def one_micro(mb):
    if method == "vjp":
      grads = jax.vmap(lambda ex: _single_example_grad(per_example_loss_fn, unravel, flat, ex))(mb)
      grads = grads.astype(directions.dtype)
      proj = grads @ directions.T
      sq = jnp.sum(grads * grads, axis=1) if with_norms else jnp.zeros(grads.shape[:1], grads.dtype)
      return proj, sq
    f = lambda x: per_example_loss_fn(unravel(x), mb)
    jvp_one = lambda d: jax.jvp(f, (flat,), (d.astype(flat.dtype),))[1]
    proj = jax.lax.map(jvp_one, directions, batch_size=min(16, directions.shape[0])).T.astype(directions.dtype)
    return proj, jnp.zeros(proj.shape[:1], proj.dtype)

  proj, sq = jax.lax.map(one_micro, batch)
  return proj.reshape(-1, proj.shape[-1]), sq.reshape(-1)


def project_on(
    directions: jax.Array,
    per_example_loss_fn: Callable,
    params: Any,
    batches: Iterable[Any],
    *,
    method: str = "vjp",
    microbatch_size: Optional[int] = None,
    with_sq_norms: bool = False,
    pad_to: Optional[int] = None,
) -> Projections:
  """Returns the projections D ∇ℓ(z) of every example of `batches`, in order.

  `directions` is (k, p) in `ravel_pytree(params)` order. Batches are padded to
  the first batch's size (one compiled program) and results sliced back.
  `with_sq_norms` also returns ‖∇ℓ(z)‖² (only with method="vjp"). `pad_to`
  fixes the padded batch size across calls (a streaming caller's last, smaller
  batch then reuses the compiled program).
  """
  if method not in METHODS:
    raise ValueError(f"Unknown projection method {method!r}; expected one of {METHODS}.")
  if with_sq_norms and method != "vjp":
    raise ValueError("Squared gradient norms need method='vjp' (jvp never forms the gradient).")
  flat, _ = ravel_pytree(params)
  if directions.ndim != 2 or directions.shape[1] != flat.size:
    raise ValueError(
        f"directions have shape {directions.shape}, but params have {flat.size} numbers: "
        "expected (k, num_params).")
  values, norms = [], []
  padded_size = None
  for i, batch in enumerate(batches):
    n = data_lib.batch_size(batch)
    if n == 0:
      raise ValueError(f"batch {i} holds no examples.")
    if padded_size is None:
      size = max(n, pad_to or 0)
      micro = microbatch_size or default_microbatch_size(flat.size, flat.dtype.itemsize, size)
      micro = min(micro, size)
      padded_size = micro * -(-size // micro)
    if n > padded_size:
      raise ValueError(
          f"batch {i} has {n} examples, more than the first batch ({padded_size} after padding); "
          "put the largest batch first or use equal batch sizes.")
    padded = data_lib.pad(batch, padded_size)
    stacked = jax.tree.map(lambda x: jnp.asarray(x).reshape((padded_size // micro, micro) + x.shape[1:]), padded)
    proj, sq = _project_batch(per_example_loss_fn, method, with_sq_norms, params, directions, stacked)
    values.append(proj[:n])
    norms.append(sq[:n])
  if not values:
    raise ValueError("batches is empty: nothing to project.")
  return Projections(jnp.concatenate(values), jnp.concatenate(norms) if with_sq_norms else None)


def per_example_gradients(per_example_loss_fn: Callable, params: Any, batch: Any) -> jax.Array:
  """Returns the (B, p) flat per-example gradients of one batch (hold only what fits in memory)."""
  return _per_example_gradients(per_example_loss_fn, params, jax.tree.map(jnp.asarray, batch))


@functools.partial(jax.jit, static_argnums=0)
def _per_example_gradients(per_example_loss_fn, params, batch):
  flat, unravel = ravel_pytree(params)
  return jax.vmap(lambda ex: _single_example_grad(per_example_loss_fn, unravel, flat, ex))(batch)


def gradients(per_example_loss_fn: Callable, params: Any, batches: Iterable[Any], chunk_size: int = 64) -> jax.Array:
  """Returns the (T, p) flat per-example gradients of every example of `batches`, `chunk_size` at a time.

  For the few test examples whose gradients serve as directions; T × p numbers are held.
  """
  return jnp.concatenate([per_example_gradients(per_example_loss_fn, params, chunk)
                          for b in batches for chunk in data_lib.iterate(b, chunk_size)])
