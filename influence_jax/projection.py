"""Per-example gradients projected on a few directions, batch by batch.

For directions D (k, p) and each example z, returns D ∇ℓ(z) ∈ ℝᵏ without
keeping p-sized gradients for more than one micro-batch:
- "vjp": per-example gradients of one micro-batch (vmap of grad), then a matmul;
- "jvp": k forward-mode directional derivatives ⟨∇ℓ(z), d_j⟩ for the whole
  micro-batch at once; no p-sized per-example gradient ever exists;
- "layerwise" (the default): layer by layer from each layer's inputs and
  output gradients. A per_example_loss_fn that is a `types.LayerwiseLossFn`
  (`layerwise.LayerwiseLoss`, which the Flax Linen adapters return) does it
  itself; any other (a plain function, NNX, equinox-style) is wrapped in a
  `traced.TracedLayerwiseLoss`, which finds its layers from its jaxpr
  (`as_layerwise`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib
from influence_jax import sharding as sharding_lib
from influence_jax import traced
from influence_jax import validation
from influence_jax.types import LayerwiseLossFn, PerExampleLossFn

METHODS = ("vjp", "jvp", "layerwise")
_MICROBATCH_BYTES = 256 * 2**20
LAYERWISE_BYTES = 128 * 2**20


class Projections(NamedTuple):
  """values: (N, k) projections D ∇ℓ(z); sq_norms: (N,) ‖∇ℓ(z)‖² or None."""

  values: jax.Array
  sq_norms: Optional[jax.Array]


def default_microbatch_size(num_params: int, itemsize: int, batch: int) -> int:
  """Returns a micro-batch size whose per-example gradients take at most ~256 MiB (see balanced_microbatch)."""
  return balanced_microbatch(batch, _MICROBATCH_BYTES // max(1, num_params * itemsize))


def balanced_microbatch(batch: int, most: int) -> int:
  """Returns the smallest size ≤ max(1, most) that splits `batch` in as few micro-batches as `most` does.

  It divides `batch` whenever a divisor does so (1,024 with most 300: 256), and
  pads fewer rows than there are micro-batches otherwise.
  """
  steps = -(-batch // max(1, min(batch, most)))
  return -(-batch // steps)


def resolve_method(per_example_loss_fn: PerExampleLossFn, method: Optional[str]) -> str:
  """Returns `method`, or "layerwise" when None (every per-example loss has it: `as_layerwise`)."""
  if method is None:
    return "layerwise"
  if method not in METHODS:
    raise ValueError(f"Unknown projection method {method!r}; expected one of {METHODS}.")
  return method


def as_layerwise(per_example_loss_fn: PerExampleLossFn) -> LayerwiseLossFn:
  """Returns per_example_loss_fn if it is a `types.LayerwiseLossFn`, else its `traced.TracedLayerwiseLoss`
  (one per function, kept: the same static jit argument, and its jaxpr traced once per shapes)."""
  if isinstance(per_example_loss_fn, LayerwiseLossFn):
    return per_example_loss_fn
  try:
    return _traced(per_example_loss_fn)
  except TypeError:  # Unhashable: a wrapper of its own (compiled anew each call, as any unhashable function).
    return traced.TracedLayerwiseLoss(per_example_loss_fn)


@functools.lru_cache(maxsize=64)
def _traced(per_example_loss_fn):
  return traced.TracedLayerwiseLoss(per_example_loss_fn)


def shape_of_one(batch):
  """Returns the shapes and dtypes of a batch of one example like `batch` (no data is read or moved)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + tuple(np.shape(x))[1:], jnp.result_type(x)), batch)


def _default_micro(per_example_loss_fn, method, params, k, batch, size):
  """Returns the default micro-batch size of `method` for padded batches of `size` examples."""
  if method != "layerwise":
    itemsize = jnp.result_type(*jax.tree.leaves(params)).itemsize
    return default_microbatch_size(sharding_lib.num_params(params), itemsize, size)
  per_example = per_example_loss_fn.bytes_per_example(params, k, shape_of_one(batch))
  return balanced_microbatch(size, LAYERWISE_BYTES // per_example)


def flat_value_and_grads(per_example_loss_fn, params, batch, columns: Optional[int] = None,
                         mesh: Optional[jax.sharding.Mesh] = None):
  """Returns ((B,) losses ℓ(z), (B, columns) flat per-example gradients ∇ℓ(z)) of `batch` (traceable).

  Gradients are taken with respect to `params` as they are laid out (a model split over 'model' keeps
  its layout inside the loss), then flattened in `ravel_pytree` order and zero-padded to `columns`
  (default p). With `mesh` they are constrained to its flat layout (columns split over 'model', examples
  over 'data' when they divide evenly: `sharding.per_example_flat_sharding`), so no device holds more
  than B·columns / |model| of them once formed.
  """
  def one(example):
    single = jax.tree.map(lambda x: x[None], example)
    loss, grad = jax.value_and_grad(lambda p: per_example_loss_fn(p, single)[0])(params)
    return loss, ravel_pytree(grad)[0]

  losses, grads = jax.vmap(one)(batch)
  grads = sharding_lib.pad_last(grads, columns or grads.shape[1])
  if mesh is not None:
    grads = jax.lax.with_sharding_constraint(grads, sharding_lib.per_example_flat_sharding(mesh, grads.shape[0]))
  return losses, grads


def _micro_projector(per_example_loss_fn, method, with_norms, params, directions, example, prepared=None, mesh=None):
  """Returns mb ↦ ((micro, k) projections, (micro,) squared norms or zeros); `example`: a batch of one.

  `directions` are (k, P) in a flat layout (P ≥ p, columns beyond p zero); `prepared`: the
  layer-wise method's direction layouts (`_prepare_directions`) or None; `mesh`: where "vjp" lays out
  its per-example gradients (`flat_value_and_grads`).
  """
  if method == "layerwise":
    if prepared is None:
      return per_example_loss_fn.micro_projector(params, directions, with_norms, example)
    return per_example_loss_fn.micro_projector(params, directions, with_norms, example, prepared)
  flat, unravel = ravel_pytree(params)
  p, columns = flat.size, directions.shape[1]

  def one_micro(mb):
    if method == "vjp":
      grads = flat_value_and_grads(per_example_loss_fn, params, mb, columns, mesh)[1].astype(directions.dtype)
      proj = grads @ directions.T
      sq = jnp.sum(grads * grads, axis=1) if with_norms else jnp.zeros(grads.shape[:1], grads.dtype)
      return proj, sq
    f = lambda prm: per_example_loss_fn(prm, mb)  # The params as laid out; only the tangent is unravelled.
    jvp_one = lambda d: jax.jvp(f, (params,), (unravel(d[:p].astype(flat.dtype)),))[1]
    proj = jax.lax.map(jvp_one, directions, batch_size=min(16, directions.shape[0])).T.astype(directions.dtype)
    return proj, jnp.zeros(proj.shape[:1], proj.dtype)

  return one_micro


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prepare_directions(per_example_loss_fn, with_norms, params, directions, example):
  """Returns the layer-wise projector's direction layouts, made once per `project_on` call."""
  return per_example_loss_fn.prepare_directions(params, directions, with_norms, example)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _project_batch(per_example_loss_fn, method, with_norms, mesh, micro, params, directions, batch, prepared):
  """Returns ((S, k) projections sharded P('data', None), (S,) norms) of a (S, ...) batch sharded P('data').

  Each 'data' device owns a contiguous S/d rows; micro-step j takes micro/d
  rows from every device, so no example moves between devices and the
  result keeps the input's order and layout.
  """
  d = sharding_lib.axis_size(mesh, sharding_lib.DATA)
  size = data_lib.batch_size(batch)
  steps, local = size // micro, micro // d
  spec = lambda *s: sharding_lib.named(mesh, jax.sharding.PartitionSpec(*s))

  def to_micro(x):
    x = x.reshape((d, steps, local) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape((steps, micro) + x.shape[3:])
    return jax.lax.with_sharding_constraint(x, spec(None, sharding_lib.DATA))

  def from_micro(y):
    y = jnp.swapaxes(y.reshape((steps, d, local) + y.shape[2:]), 0, 1).reshape((size,) + y.shape[2:])
    return jax.lax.with_sharding_constraint(y, spec(sharding_lib.DATA))

  example = jax.tree.map(lambda x: x[:1], batch)
  one_micro = _micro_projector(per_example_loss_fn, method, with_norms, params, directions, example, prepared, mesh)
  proj, sq = jax.lax.map(one_micro, jax.tree.map(to_micro, batch))
  return from_micro(proj), from_micro(sq)


def _is_on_mesh(batch, mesh) -> bool:
  """Returns True if every leaf is a jax.Array already laid out P('data') on `mesh` (a global batch)."""
  want = sharding_lib.batch_sharding(mesh)
  return all(isinstance(x, jax.Array) and x.sharding.is_equivalent_to(want, x.ndim) for x in jax.tree.leaves(batch))


def _global_micro(size: int, micro: int, d: int) -> int:
  """Returns the largest multiple of d that divides `size` and is at most max(micro, d)."""
  local = size // d
  best = 1
  for q in range(1, local + 1):
    if local % q == 0 and q * d <= max(micro, d):
      best = q
  return best * d


def project_on(
    directions: jax.Array,
    per_example_loss_fn: PerExampleLossFn,
    params: Any,
    batches: Iterable[Any],
    *,
    method: Optional[str] = None,
    microbatch_size: Optional[int] = None,
    with_sq_norms: bool = False,
    pad_to: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> Projections:
  """Returns the projections D ∇ℓ(z) of every example of `batches`, in order.

  `directions` is (k, p), or (k, P) in a flat layout (`sharding`: P ≥ p,
  the columns beyond p zero), in `ravel_pytree(params)` order. It runs on
  `mesh` (default: the directions' mesh; one device for host directions),
  the directions laid out in its flat layout. Host batches (the same on
  every process) are padded to the first batch's size, or `pad_to` when
  larger (one compiled program for a stream of batches), split over 'data'
  (micro-batches rounded up to a multiple of the 'data' size), and the
  results sliced back. Batches that are global arrays already sharded
  P('data') (e.g. from `sharding.global_batches`) are used whole (no padding
  or slicing: mask their padding rows yourself). Params keep an existing
  sharding on the mesh. The (N, k) result is sharded by example,
  P('data', None), when N is a multiple of the 'data' size (otherwise laid
  out as XLA chose). `method` None picks "layerwise" (`as_layerwise`).
  `with_sq_norms` also returns ‖∇ℓ(z)‖² (not with "jvp").
  """
  method = resolve_method(per_example_loss_fn, method)
  if method == "layerwise":
    per_example_loss_fn = as_layerwise(per_example_loss_fn)
  if with_sq_norms and method == "jvp":
    raise ValueError("Squared gradient norms need method='vjp' or 'layerwise' (jvp never forms the gradient).")
  p = sharding_lib.num_params(params)
  if np.ndim(directions) != 2 or np.shape(directions)[1] not in (p, sharding_lib.padded_dim(p, sharding_lib.mesh_of(directions))):
    raise ValueError(
        f"directions have shape {np.shape(directions)}, but params have {p} numbers: "
        "expected (k, num_params) or (k, padded columns) in a flat layout.")
  mesh = sharding_lib.mesh_of(directions) if mesh is None else mesh
  directions = sharding_lib.to_flat_layout(directions, p, mesh)
  params = sharding_lib.place_params(params, mesh)
  d = sharding_lib.axis_size(mesh, sharding_lib.DATA)
  values, norms = [], []
  padded_size = micro = prepared = prepared_for = None
  for i, batch in enumerate(batches):
    n = data_lib.batch_size(batch)
    if n == 0:
      raise ValueError(f"batch {i} holds no examples.")
    if _is_on_mesh(batch, mesh):
      if n % d:
        raise ValueError(f"global batch {i} has {n} examples, not a multiple of the 'data' axis ({d}).")
      want = microbatch_size or _default_micro(per_example_loss_fn, method, params, directions.shape[0], batch, n)
      size, mb, placed = n, _global_micro(n, want, d), batch
    else:
      if padded_size is None:
        size = max(n, pad_to or 0)
        want = microbatch_size or _default_micro(per_example_loss_fn, method, params, directions.shape[0], batch,
                                                 size)
        micro = d * -(-min(want, size) // d)
        padded_size = micro * -(-size // micro)
      if n > padded_size:
        raise ValueError(
            f"batch {i} has {n} examples, more than the first batch ({padded_size} after padding); "
            "put the largest batch first or use equal batch sizes.")
      size, mb = padded_size, micro
      placed = sharding_lib.put_tree(data_lib.pad(batch, padded_size), sharding_lib.batch_sharding(mesh))
    if method == "layerwise":
      one = shape_of_one(placed)
      if one != prepared_for:  # Layouts follow the layer calls, which follow the examples' shapes.
        prepared = _prepare_directions(per_example_loss_fn, with_sq_norms, params, directions,
                                       jax.tree.map(lambda x: x[:1], placed))
        prepared_for = one
    proj, sq = _project_batch(per_example_loss_fn, method, with_sq_norms, mesh, mb, params, directions, placed,
                              prepared)
    values.append(proj if n == size else proj[:n])
    norms.append(sq if n == size else sq[:n])
  if not values:
    raise ValueError("batches is empty: nothing to project.")
  values = _concatenate_by_example(values, mesh)
  validation.check_finite_rows(values, "projection")
  return Projections(values, _concatenate_by_example(norms, mesh) if with_sq_norms else None)


def _concatenate_by_example(pieces, mesh):
  """Returns the pieces concatenated along examples, sharded P('data') when the count divides evenly."""
  total = sum(x.shape[0] for x in pieces)
  if total % sharding_lib.axis_size(mesh, sharding_lib.DATA):
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)
  spec = sharding_lib.PROJECTIONS_SPEC if pieces[0].ndim == 2 else sharding_lib.BATCH_SPEC
  return _concatenation(sharding_lib.named(mesh, spec))(*pieces)


@functools.lru_cache(maxsize=None)
def _concatenation(sharding):
  """Returns a jitted concatenation laid out as `sharding`, one per sharding (compiled once per shapes)."""
  return jax.jit(lambda *xs: jnp.concatenate(xs), out_shardings=sharding)


def per_example_gradients(per_example_loss_fn: PerExampleLossFn, params: Any, batch: Any,
                          *, mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """Returns the (B, P) flat per-example gradients of one host batch, in `mesh`'s flat layout.

  P = sharding.padded_dim(p, mesh) (the columns beyond p zero), split over
  'model'; default: one device, P = p. Hold only what fits in memory.
  """
  return per_example_losses_and_gradients(per_example_loss_fn, params, batch, mesh=mesh)[1]


def per_example_losses_and_gradients(per_example_loss_fn: PerExampleLossFn, params: Any, batch: Any,
                                     *, mesh: Optional[jax.sharding.Mesh] = None) -> tuple[jax.Array, jax.Array]:
  """Returns ((B,) losses ℓ(z) replicated, (B, P) `per_example_gradients`) of one host batch, from one pass."""
  mesh = sharding_lib.mesh_or_default(mesh)
  return _per_example_gradients(per_example_loss_fn, sharding_lib.padded_dim(sharding_lib.num_params(params), mesh), mesh)(
      sharding_lib.place_params(params, mesh), sharding_lib.put_tree(batch, sharding_lib.replicated(mesh)))


@functools.lru_cache(maxsize=32)
def _per_example_gradients(per_example_loss_fn, columns: int, mesh):
  """Returns a jitted (params, batch) ↦ ((B,) losses, (B, columns) per-example gradients in `mesh`'s flat layout)."""

  def losses_and_grads(params, batch):
    return flat_value_and_grads(per_example_loss_fn, params, batch, columns, mesh)

  return jax.jit(losses_and_grads,
                 out_shardings=(sharding_lib.replicated(mesh), sharding_lib.flat_sharding(mesh, 2)))


def gradients(per_example_loss_fn: PerExampleLossFn, params: Any, batches: Iterable[Any], chunk_size: int = 64,
              *, mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """Returns the (T, P) flat per-example gradients of every example of `batches`, `chunk_size` at a time.

  In `mesh`'s flat layout as `per_example_gradients`. For the few test
  examples whose gradients serve as directions; T × P numbers are held.
  """
  return jnp.concatenate([per_example_gradients(per_example_loss_fn, params, chunk, mesh=mesh)
                          for b in batches for chunk in data_lib.iterate(b, chunk_size)])
