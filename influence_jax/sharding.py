"""Device meshes and the flat layout rule of sharded influence computations (docs/design.md, "Sharding: one code path, one layout rule").

Every computation runs on a mesh with two axes; no mesh is the 1 × 1 mesh on
one device (`single_device_mesh`), not a separate code path:
- 'data': examples of a batch (curvature products, projections) are split over it;
- 'model': the parameter axis of flat parameter-space arrays is split over it.

The flat layout rule (the only place it is defined). An array of flat
parameter vectors — the (rows, p) Krylov basis, the (k, p) eigenvectors,
(B, p) per-example gradients, one (p,) vector — has its p columns, in
`ravel_pytree(params)` order, zero-padded to `padded_dim(p, mesh)` (a
multiple of the 'model' size) and cut into equal contiguous pieces over
'model' (`flat_sharding`; `to_flat_layout` puts any array so). The padding
stays exactly zero (operators are extended by zero on it), so whatever p is
no device holds more than ⌈p / model⌉ columns; it is stripped only where a
user asks for host arrays (`Eigenspace.host_eigenvectors`). A model whose
parameters are already sharded keeps its own layout: params are passed to
every product as they are; only the p-vector being multiplied is
redistributed between the flat layout and the parameters' layout, once per
product (p numbers, never the n × p basis).

Several processes: `initialize_distributed` first, then a mesh over all
devices of all processes (`make_mesh`), then `to_global` (e.g. through `jobs.input.global_batches`)
to feed each process's own examples into global batches.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)

# Partition specs of the arrays the library shards (see the module docstring).
BASIS_SPEC = P(None, MODEL)        # (rows, p) Krylov basis, (k, p) eigenvectors
VECTOR_SPEC = P(MODEL)             # one (p,) vector of the basis
BATCH_SPEC = P(DATA)               # a batch leaf (B, ...)
MICROBATCHES_SPEC = P(None, DATA)  # stacked micro-batches (num_micro, micro, ...)
PROJECTIONS_SPEC = P(DATA, None)   # (N, k) per-example projections
REPLICATED = P()


def _shape_from(mesh_shape) -> Optional[tuple]:
  """Returns mesh_shape as a tuple, reading `.mesh_shape` or ['mesh_shape'] from a config."""
  if mesh_shape is None:
    return None
  if hasattr(mesh_shape, "mesh_shape"):
    mesh_shape = mesh_shape.mesh_shape
  elif isinstance(mesh_shape, dict) and "mesh_shape" in mesh_shape:
    mesh_shape = mesh_shape["mesh_shape"]
  if mesh_shape is None:
    return None
  return tuple(int(s) for s in mesh_shape)


def make_mesh(mesh_shape=None, *, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Returns a Mesh with axes ('data', 'model') over `devices` (default: all devices of all processes).

  `mesh_shape` is (data, model), or a config with a `mesh_shape` field; one
  entry may be -1 (fill with the remaining devices). Default: every device on
  'data', (num_devices, 1). The axes are AxisType.Auto: the library places
  arrays with explicit NamedShardings and XLA propagates them through the
  unannotated model code.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = _shape_from(mesh_shape) or (n, 1)
  if len(shape) != 2:
    raise ValueError(f"mesh_shape must have two entries (data, model), got {shape}.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape entries must be positive (at most one -1), got {shape}.")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if n % known:
      raise ValueError(f"mesh_shape {shape}: {n} devices are not a multiple of {known}.")
    shape = tuple(n // known if s == -1 else s for s in shape)
  if math.prod(shape) != n:
    raise ValueError(f"mesh_shape {shape} needs {math.prod(shape)} devices, but {n} are available.")
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


@functools.lru_cache(maxsize=None)
def _single_device_mesh(device) -> Mesh:
  return jax.make_mesh((1, 1), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=[device])


def single_device_mesh(device=None) -> Mesh:
  """Returns the 1 × 1 ('data', 'model') mesh on `device` (default: this process's first device): "no mesh"."""
  return _single_device_mesh(jax.local_devices()[0] if device is None else device)


def mesh_or_default(mesh: Optional[Mesh]) -> Mesh:
  """Returns `mesh`, or the single-device mesh when it is None."""
  return single_device_mesh() if mesh is None else mesh


def mesh_of(x: Any) -> Mesh:
  """Returns the mesh `x` is laid out on: its NamedSharding's mesh, else the 1 × 1 mesh on its one device.

  Host values (numpy) give the default single-device mesh.
  """
  s = getattr(x, "sharding", None)
  if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh):
    return s.mesh
  if s is None:
    return single_device_mesh()
  if len(s.device_set) == 1:
    return single_device_mesh(next(iter(s.device_set)))
  raise ValueError(f"The array is laid out as {s}, not on a mesh: put it with a NamedSharding.")


def axis_size(mesh: Optional[Mesh], axis: str) -> int:
  """Returns the number of devices along `axis` (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape[axis])


def named(mesh: Mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)


def flat_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Returns the layout of a flat parameter-space array with `ndim` axes: the last split over 'model'."""
  return NamedSharding(mesh, P(*([None] * (ndim - 1)), MODEL))


def per_example_flat_sharding(mesh: Mesh, num_rows: int) -> NamedSharding:
  """Returns the layout of (num_rows, P) per-example flat vectors: the flat layout's columns over 'model', the
  rows over 'data' when they divide evenly (else repeated on every 'data' device)."""
  rows = DATA if num_rows % axis_size(mesh, DATA) == 0 else None
  return NamedSharding(mesh, P(rows, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of a batch leaf (B, ...): examples over 'data'."""
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, REPLICATED)


def num_params(params: Any) -> int:
  """Returns p, the number of numbers in `params` (from the leaves' shapes: nothing is gathered or concatenated)."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def padded_dim(dim: int, mesh: Optional[Mesh]) -> int:
  """Returns `dim` rounded up to a multiple of the 'model' size: the column count of the flat layout."""
  m = axis_size(mesh, MODEL)
  return m * -(-dim // m)


def pad_last(x: jax.Array, size: int) -> jax.Array:
  """Returns `x` with its last axis zero-padded to `size` (traceable; no copy when already that size)."""
  extra = size - x.shape[-1]
  if extra == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


@functools.lru_cache(maxsize=64)
def _relayout(num_params: int, columns: int, target: NamedSharding):
  return jax.jit(lambda x: pad_last(x[..., :num_params], columns), out_shardings=target)


def to_flat_layout(x: Any, num_params: int, mesh: Mesh) -> jax.Array:
  """Returns `x` (..., c), c ≥ num_params, in the flat layout of `mesh` (see the module docstring).

  Columns beyond `num_params` are dropped and zeros appended up to
  `padded_dim(num_params, mesh)`; the last axis is split over 'model'. An
  array already so laid out is returned as is. Host values must be the same
  on every process.
  """
  columns = padded_dim(num_params, mesh)
  ndim = np.ndim(x)
  if ndim == 0 or np.shape(x)[-1] < num_params:
    raise ValueError(f"Expected flat parameter vectors with at least {num_params} columns, got shape {np.shape(x)}.")
  target = flat_sharding(mesh, ndim)
  if isinstance(x, jax.Array):
    if x.shape[-1] == columns and x.sharding.is_equivalent_to(target, ndim):
      return x
    if x.sharding.device_set == target.device_set:
      return _relayout(num_params, columns, target)(x)
    if x.is_fully_addressable and target.is_fully_addressable:
      return jax.device_put(pad_last(x[..., :num_params], columns), target)
  host = to_host(x)[..., :num_params]
  return put(np.pad(host, [(0, 0)] * (ndim - 1) + [(0, columns - num_params)]), target)


def put(x: Any, sharding: NamedSharding) -> jax.Array:
  """Returns `x` as a global jax.Array laid out with `sharding`.

  A jax.Array already laid out so is returned as is. Host values (numpy, or
  arrays on this process's devices) must hold the same global value on every
  process; each device receives only its own slice.
  """
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_tree(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda x: put(x, sharding), tree)


def place_params(params: Any, mesh: Mesh) -> Any:
  """Returns params on `mesh`: leaves already sharded over this mesh keep their layout, others are replicated."""

  def place(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
      return x
    return put(x, replicated(mesh))

  return jax.tree.map(place, params)


def to_host(x: jax.Array) -> np.ndarray:
  """Returns the full value of a (possibly multi-process) array as numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------- several processes


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kwargs) -> None:
  """Joins this process to a multi-process JAX run (call before any other JAX computation).

  On CPU the cross-process collectives use gloo
  (`jax_cpu_collectives_implementation='gloo'`). Extra keyword arguments go
  to `jax.distributed.initialize` (e.g. `local_device_ids`).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs)


def num_steps(num_local: int, local_batch_size: int) -> int:
  """Returns the number of batches every process runs: the largest process's count (agreed across processes)."""
  mine = -(-num_local // local_batch_size)
  if jax.process_count() == 1:
    return mine
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray([mine], np.int64))))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Returns this process's share of a global batch; raises ValueError unless the global batch is a
  multiple of the 'data' axis and of the process count, and 'data' spans the processes."""
  count = jax.process_count()
  data_size = axis_size(mesh, DATA)
  if global_batch_size % count or global_batch_size % data_size:
    raise ValueError(f"The global batch size {global_batch_size} must be a multiple of the 'data' axis "
                     f"({data_size}) and of the {count} processes.")
  if count > 1 and data_size % count:
    raise ValueError(
        f"The mesh's 'data' axis ({data_size}) must be a multiple of the process count ({count}) "
        "so that each process feeds its own examples.")
  return global_batch_size // count


def to_global(local: Any, global_batch_size: int, mesh: Mesh) -> Any:
  """Returns the (global_batch_size, ...) arrays over 'data' whose rows from this process are `local`
  (leaves of local_batch_size(...) rows; a collective: every process calls it)."""
  spec = batch_sharding(mesh)
  make = lambda x: jax.make_array_from_process_local_data(spec, np.asarray(x), (global_batch_size,) + np.shape(x)[1:])
  return jax.tree.map(make, local)
