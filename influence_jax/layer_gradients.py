"""Per-example quantities of one layer from its inputs x and output gradients δ (`layerwise`, `traced`).

- `factored_dense`: a Dense / DenseGeneral applied once per example, projected on k directions
  without its gradient (xᵀ U_j δ), the directions a few at a time (`dense_layout`);
- `gathered_embed`: an Embed lookup projected by a gather of the directions' rows;
- `layer_example_gradients`: any layer's own per-example gradient: a Conv's by kernel offsets (the
  input slice each offset reads times δ, summed over output positions: batched matmuls), others by
  a vmapped VJP of the layer alone.

`call` arguments are `layerwise.LayerCall`s (a layer, its input and output shapes for one example); only
the functions that take one import flax, so `traced` (plain functions, NNX) uses the others without it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


def dense_factors(call):
  """Returns (in_size, out_size) if `call` is a Dense/DenseGeneral applied once per example, else None."""
  import flax.linen as nn  # noqa: PLC0415 (Linen calls only: the rest of this module is core)

  layer = call.layer
  if isinstance(layer, nn.Dense):
    n_in = 1
  elif isinstance(layer, nn.DenseGeneral) and not layer.batch_dims:
    axes = layer.axis if isinstance(layer.axis, (tuple, list)) else (layer.axis,)
    n_in = len(axes)
    norm = sorted(a % len(call.in_shape) for a in axes)
    if norm != list(range(len(call.in_shape) - n_in, len(call.in_shape))):
      return None
  else:
    return None
  in_size = math.prod(call.in_shape[len(call.in_shape) - n_in:])
  if math.prod(call.in_shape) != in_size:  # Applied at several positions.
    return None
  return in_size, math.prod(call.out_shape)


class ConvGeometry(NamedTuple):
  """An nn.Conv call's window: per spatial dimension, kernel size, stride, (low, high) padding, input
  and kernel dilation."""

  size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]


def conv_geometry(call) -> Optional[ConvGeometry]:
  """Returns the window of an nn.Conv call on one example (one batch dimension: images folded into
  it are summed over) with one feature group, no mask, no custom convolution, dtype or precision
  and 'SAME' / 'VALID' / explicit padding (as lax pads it); else None."""
  import flax.linen as nn  # noqa: PLC0415
  from flax.linen import linear  # noqa: PLC0415

  layer = call.layer
  if (type(layer) is not nn.Conv or layer.feature_group_count != 1 or layer.mask is not None or layer.dtype is not None
      or layer.precision is not None or layer.conv_general_dilated is not None
      or layer.conv_general_dilated_cls is not None):
    return None
  size = (layer.kernel_size,) if isinstance(layer.kernel_size, int) else tuple(layer.kernel_size)
  if len(call.in_shape) != len(size) + 2:
    return None
  each = lambda v: (1 if v is None else v,) * len(size) if v is None or isinstance(v, int) else tuple(v)
  strides, kernel_dilation = each(layer.strides), each(layer.kernel_dilation)
  padding = linear.canonicalize_padding(layer.padding, len(size))
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None
    dilated = [(k - 1) * d + 1 for k, d in zip(size, kernel_dilation)]
    padding = jax.lax.padtype_to_pads(call.in_shape[1:-1], dilated, strides, padding)
  return ConvGeometry(size, strides, tuple(tuple(p) for p in padding), each(layer.input_dilation), kernel_dilation)


def _conv_gradients(call, geometry, x, d):
  """Returns {"kernel": (B, *size, in, out)[, "bias": (B, out)]}: per-example gradients of a Conv from its
  inputs x (B, n, *spatial, in) and output gradients d (B, n, *spatial', out), n images an example: for
  each kernel offset, Σ over images and output positions of the input it reads ⊗ δ (a batched
  matmul over positions)."""
  b, c_out = x.shape[0], d.shape[-1]
  g = geometry
  pads = [(0, 0, 0)] + [(lo, hi, i - 1) for (lo, hi), i in zip(g.padding, g.input_dilation)] + [(0, 0, 0)]
  x = jax.lax.pad(x.reshape((-1,) + x.shape[2:]), jnp.zeros((), x.dtype), pads)  # (B·n, *padded, in)
  out_spatial = d.shape[2:-1]
  delta = d.reshape(b, -1, c_out)
  grads = []
  for offset in itertools.product(*(range(k) for k in g.size)):
    start = [0] + [o * kd for o, kd in zip(offset, g.kernel_dilation)] + [0]
    limit = [x.shape[0]] + [st + (n - 1) * s + 1 for st, n, s in zip(start[1:-1], out_spatial, g.strides)]
    seen = jax.lax.slice(x, start, limit + [x.shape[-1]], [1] + list(g.strides) + [1]).reshape(b, -1, x.shape[-1])
    grads.append(jnp.einsum("bpc,bpo->bco", seen, delta))
  out = {"kernel": jnp.stack(grads, axis=1).reshape((b,) + g.size + (x.shape[-1], c_out))}
  if call.layer.use_bias:
    out["bias"] = jnp.sum(delta, axis=1)
  return out


def layer_example_gradients(call, own, x, d):
  """Returns the per-example gradients of a layer's params (B, ...) from its inputs x and output gradients d."""
  geometry = conv_geometry(call)
  if geometry is not None:
    return _conv_gradients(call, geometry, x, d)
  one = lambda x1, d1: jax.vjp(lambda p: call.layer.apply({"params": p}, x1), own)[1](d1)[0]
  return jax.vmap(one)(x, d)


# Columns (directions × outputs) of one product x U in `factored_dense`: the directions are taken a
# few at a time, so that the (B, columns) product stays in cache between being formed and used.
FACTORED_COLUMNS = 1024


def _chunk_size(k: int, most: int) -> int:
  """Returns the directions a chunk of k takes, at most `most`: its largest divisor when that is at
  least most / 2, else the even split of k into ⌈k / most⌉ chunks (the last padded)."""
  most = min(k, most)
  divisor = max(d for d in range(1, most + 1) if k % d == 0)
  return divisor if 2 * divisor >= most else -(-k // -(-k // most))


def dense_layout(kernel_directions: jax.Array) -> jax.Array:
  """Returns (k, in, out) kernel directions as (⌈k / c⌉, in, c·out), c directions a chunk
  (`_chunk_size` of at most FACTORED_COLUMNS // out), the last padded with zero directions: the
  layout `factored_dense` takes."""
  k, in_size, out_size = kernel_directions.shape
  c = _chunk_size(k, max(1, FACTORED_COLUMNS // out_size))
  chunks = -(-k // c)
  kern = jnp.pad(kernel_directions, ((0, chunks * c - k), (0, 0), (0, 0))).reshape(chunks, c, in_size, out_size)
  return jnp.transpose(kern, (0, 2, 1, 3)).reshape(chunks, in_size, c * out_size)


def factored_dense(x, d, u_chunks, u_bias, k, with_norms):
  """Returns ((B, k) xᵀ U_j δ (+ ⟨δ, u_bias⟩), (B,) ‖x δᵀ‖² (+ ‖δ‖²)) for a Dense applied once;
  `u_chunks` holds the kernel directions as `dense_layout` lays them out."""
  b = x.shape[0]
  x2 = x.reshape(b, -1).astype(u_chunks.dtype)
  d2 = d.reshape(b, -1).astype(u_chunks.dtype)
  chunk = lambda u: jnp.einsum("bco,bo->bc", (x2 @ u).reshape(b, -1, d2.shape[1]), d2)
  if u_chunks.shape[0] == 1:
    proj = chunk(u_chunks[0])[:, :k]
  else:
    proj = jnp.moveaxis(jax.lax.map(chunk, u_chunks), 0, 1).reshape(b, -1)[:, :k]
  dd = jnp.sum(d2 * d2, axis=1)
  sq = jnp.sum(x2 * x2, axis=1) * dd if with_norms else 0.0
  if u_bias is not None:
    proj = proj + d2 @ u_bias.reshape(k, -1).T
    sq = sq + dd if with_norms else sq
  return proj, sq


def gathered_embed(tokens, d, u_table, with_norms):
  """Returns ((B, k) Σ_l ⟨U_j[t_l], δ_l⟩, (B,) ‖Σ_l e_{t_l} δ_lᵀ‖²) for an Embed lookup."""
  b = tokens.shape[0]
  t = tokens.reshape(b, -1)
  d2 = d.reshape(b, t.shape[1], -1).astype(u_table.dtype)
  proj = jnp.einsum("kbld,bld->bk", u_table[:, t], d2)
  if not with_norms:
    return proj, 0.0
  same = (t[:, :, None] == t[:, None, :]).astype(d2.dtype)
  return proj, jnp.einsum("blm,bld,bmd->b", same, d2, d2)


def over_flat_gradient_chunks(chunk_leaves: Callable, pieces: Any, chunk: int, dtype, gradient_fn: Callable) -> tuple:
  """Returns ((micro,) ‖g‖², gradient_fn(g) stacked to (micro, ...)) for a micro-batch's flat per-example
  gradients g, assembled `chunk` examples at a time: `chunk_leaves(piece)` gives a chunk's per-example
  gradient leaves (chunk, ...) in `ravel_pytree` order from its slice of `pieces` (leading axis micro)."""

  def one_chunk(piece):
    flat = jnp.concatenate([x.reshape(x.shape[0], -1).astype(dtype) for x in chunk_leaves(piece)], axis=1)
    return jnp.sum(flat * flat, axis=1), gradient_fn(flat)

  micro = jax.tree.leaves(pieces)[0].shape[0]
  by_chunk = jax.tree.map(lambda x: x.reshape((micro // chunk, chunk) + x.shape[1:]), pieces)
  sq, out = jax.lax.map(one_chunk, by_chunk)
  return sq.reshape(micro), jax.tree.map(lambda x: x.reshape((micro,) + x.shape[2:]), out)
