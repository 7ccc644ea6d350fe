"""Layer-wise projections found from the computation: any `per_example_loss_fn(params, batch)`.

The per-example loss of one example (a batch of one) is traced once to a jaxpr and read for the
contractions `dot_general(x, W)` (either operand order, any contracting dimensions, no batch
dimensions) in which W is a parameter leaf (or a dtype conversion of one) and x, the other
operand, holds one vector per example (its free dimensions have size 1): a Dense layer applied
once, whatever wrote it (plain `x @ W`, Flax NNX / Linen, equinox-style `W @ x` under vmap).
The per-example gradient of such a W is x δᵀ, δ the loss's gradient with respect to the
contraction's output, so ⟨∇_W ℓ(z), U_j⟩ = xᵀ U_j δ (`layer_gradients.factored_dense`: a matmul
of x with the k directions, no per-example gradient).

The jaxpr is then evaluated by a small interpreter that records each such x and adds a zero
perturbation to the contraction's output, whose per-example gradient is δ; every other leaf (biases,
norms, convolution kernels, embedding tables, weights applied at many positions, weights that a
`while`, `cond`, custom-derivative function or a scan inside a scan reads) gets its exact
per-example gradient from the same VJP, over those leaves only. Calls (`jit`, `closed_call`,
`checkpoint`) are inlined, so contractions inside them are found too. A `scan` that reads a leaf
runs its body through the interpreter: a stacked weight (L, ...) that the scan slices (a scanned
layer) is projected slice by slice, Σ_l x_lᵀ U_j[l] δ_l; a weight every iteration reads (an RNN
cell) sums its iterations' products. A leaf used by several such contractions (a weight used
twice, a scan's iterations) sums their products; when squared norms are asked for it is left to
the exact per-leaf gradient instead (‖Σ_uses g‖² has cross terms).

No Flax import: this is the layer-wise path of plain functions and NNX models (`flax_adapters`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from influence_jax import layer_gradients
from influence_jax.jaxpr_contractions import Discovery, Site, discover, factored_leaves, interpret

def _oriented(site: Site, u):
  """Returns (k, *W shape) directions as (k, in, out): W's contracted dimensions first."""
  perm = (0,) + tuple(1 + d for d in site.w_contract + site.w_free)
  return jnp.transpose(u, perm).reshape(u.shape[0], site.in_size, site.out_size)


def _layout(site: Site, u):
  """Returns a site's kernel directions (k, *leaf shape) in `layer_gradients.dense_layout`; a sliced
  site's stacked over its leaf's leading axis (L, chunks, in, c·out)."""
  if site.sliced:
    return jax.vmap(lambda v: layer_gradients.dense_layout(_oriented(site, v)), in_axes=1)(u)
  return layer_gradients.dense_layout(_oriented(site, u))


def _rows(site: Site, x, d, dtype):
  """Returns inputs (B, [L,] *x_shape) and output gradients (B, [L,] *out_shape) as (B, [L,] in) and
  (B, [L,] out), x in the order of `_oriented` (L: a scan's iterations)."""
  lead = 2 if site.scan else 1
  x2 = jnp.transpose(x, tuple(range(lead)) + tuple(lead + d_ for d_ in site.x_order))
  return (x2.reshape(x.shape[:lead] + (site.in_size,)).astype(dtype),
          d.reshape(d.shape[:lead] + (site.out_size,)).astype(dtype))


def _site_projection(site: Site, x2, d2, layout, k, with_norms):
  """Returns ((B, k) ⟨x δᵀ, U_j⟩ summed over a scan's iterations, (B,) squared norms or 0)."""
  if not site.scan:
    return layer_gradients.factored_dense(x2, d2, layout, None, k, with_norms)
  b, length = x2.shape[:2]
  if not site.sliced:  # One leaf for every iteration: its gradient Σ_l x_l δ_lᵀ (norms only when L = 1).
    proj, sq = layer_gradients.factored_dense(x2.reshape(b * length, -1), d2.reshape(b * length, -1), layout, None,
                                              k, with_norms)
    return proj.reshape(b, length, k).sum(axis=1), (jnp.reshape(sq, (b, length)).sum(axis=1) if with_norms else 0.0)

  def one(args):
    x_l, d_l, u_l = args
    proj, sq = layer_gradients.factored_dense(x_l, d_l, u_l, None, k, with_norms)
    return proj, jnp.broadcast_to(sq, (b,))

  proj, sq = jax.lax.map(one, (jnp.moveaxis(x2, 1, 0), jnp.moveaxis(d2, 1, 0), layout))
  return proj.sum(axis=0), (sq.sum(axis=0) if with_norms else 0.0)


def _leaf_gradients(site: Site, leaf_shape, x2, d2):
  """Returns (B, *leaf shape) per-example gradients of one contraction's leaf: x δᵀ (summed over a
  scan's iterations, or stacked along the leaf's leading axis for a sliced site)."""
  if site.sliced:
    g = jnp.einsum("bli,blo->blio", x2, d2)
    w_shape, lead = leaf_shape[1:], 2
  else:
    g = jnp.einsum("bli,blo->bio", x2, d2) if site.scan else x2[:, :, None] * d2[:, None, :]
    w_shape, lead = leaf_shape, 1
  oriented = tuple(w_shape[d] for d in site.w_contract + site.w_free)
  g = g.reshape(g.shape[:lead] + oriented)
  inverse = [0] * len(w_shape)
  for i, d in enumerate(site.w_contract + site.w_free):
    inverse[d] = i + lead
  return jnp.transpose(g, list(range(lead)) + inverse)


def _split_directions(leaves, directions):
  out, start = [], 0
  for leaf in leaves:
    out.append(directions[:, start:start + leaf.size].reshape((directions.shape[0],) + leaf.shape))
    start += leaf.size
  return out


def _layouts(found, factored, dirs, k) -> dict:
  layouts = {}
  for s in found.sites:
    if s.leaf in factored and s.layout_key not in layouts:
      layouts[s.layout_key] = _layout(s, dirs[s.leaf])
  return layouts


class _Recorder:
  """Adds the active sites' perturbations to their outputs and records their inputs, in site order.

  active: per site, its index among the active sites (those perturbed) or None; groups: per
  scan (in evaluation order), the indices of its sites."""

  def __init__(self, active, perts, groups=()):
    self.active, self.perts, self.groups, self.inputs, self.i, self.scans = active, perts, groups, [], 0, 0

  def contraction(self, site, x, y):
    i, self.i = self.i, self.i + 1
    j = self.active[i]
    if j is None:
      return y
    self.inputs.append(x)
    return y + self.perts[j]

  def other(self, leaf):
    pass

  def scan_begin(self, length):
    self._group = [i for i in self.groups[self.scans] if self.active[i] is not None]
    self.scans += 1
    return [self.perts[self.active[i]] for i in self._group]

  def scan_body(self, length, perts):
    order = {i: j for j, i in enumerate(self._group)}
    return _Recorder([order.get(i) for i in self.groups[self.scans - 1]], perts)

  def scan_end(self, inputs):
    self.inputs.extend(inputs)
    self.i += len(self.groups[self.scans - 1])


@dataclasses.dataclass(frozen=True, eq=False)
class TracedLayerwiseLoss:
  """A per-example loss that also projects its per-example gradients layer by layer, the layers
  found from its jaxpr (module doc). Callable as `per_example_loss_fn(params, batch) -> (B,)`;
  a `types.LayerwiseLossFn`. Hashable by identity (a static jit argument like any function)."""

  fn: Callable[[Any, Any], jax.Array]
  _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def __call__(self, params, batch) -> jax.Array:
    return self.fn(params, batch)

  def discover(self, params, example) -> Discovery:
    """Returns the `Discovery` of one example's loss (cached by shapes)."""
    key = ("found",) + _shape_key(params, example)
    if key not in self._cache:
      self._cache[key] = discover(self.fn, params, example)
    return self._cache[key]

  def micro_projector(self, params, directions, with_norms, example, prepared=None) -> Callable:
    """Returns mb ↦ ((micro, k) projections D ∇ℓ(z), (micro,) ‖∇ℓ(z)‖² or zeros), as
    `layerwise.LayerwiseLoss.micro_projector`."""
    return self._projector(params, directions, with_norms, example, prepared=prepared)

  def micro_projector_with_gradients(self, params, directions, example, gradient_fn, chunk, prepared=None):
    """Returns mb ↦ (projections, ‖∇ℓ(z)‖², gradient_fn of the flat gradients assembled `chunk`
    examples at a time, ℓ(z)), as `layerwise.LayerwiseLoss`."""
    return self._projector(params, directions, True, example, gradient_fn=gradient_fn, chunk=chunk,
                           prepared=prepared)

  def prepare_directions(self, params, directions, with_norms, example, with_gradients=False) -> dict:
    """Returns the factored contractions' kernel directions in `layer_gradients.dense_layout`."""
    found = self.discover(params, example)
    factored = factored_leaves(found, with_norms and not with_gradients)
    return _layouts(found, factored, _split_directions(jax.tree.leaves(params), directions), directions.shape[0])

  def factored_fraction(self, params, example) -> float:
    """Returns the fraction of the parameters projected without a per-example gradient of theirs."""
    found = self.discover(params, example)
    leaves = jax.tree.leaves(params)
    factored = factored_leaves(found, False)
    return sum(leaves[i].size for i in factored) / max(1, sum(x.size for x in leaves))

  def bytes_per_example(self, params, k: int, example) -> int:
    """Returns an estimate of the working memory one example takes in `micro_projector`."""
    found = self.discover(params, example)
    leaves = jax.tree.leaves(params)
    factored = factored_leaves(found, False)
    itemsize = jnp.dtype(leaves[0].dtype).itemsize
    total = sum(x.size for i, x in enumerate(leaves) if i not in factored)
    for s in found.sites:
      if s.leaf in factored:
        columns = max(s.out_size, min(k * s.out_size, layer_gradients.FACTORED_COLUMNS))
        total += max(1, s.scan) * (s.in_size + 2 * s.out_size) + columns
    # Activations of the forward pass, once: the contractions' outputs stand for them.
    total += sum(max(1, s.scan) * s.out_size for s in found.sites)
    return max(1, total * itemsize)

  def _projector(self, params, directions, with_norms, example, *, gradient_fn=None, chunk=1, prepared=None):
    found = self.discover(params, example)
    with_gradients = gradient_fn is not None
    norms = with_norms and not with_gradients
    factored = factored_leaves(found, norms)
    leaves = jax.tree.leaves(params)
    k = directions.shape[0]
    dirs = _split_directions(leaves, directions)
    is_rest = [i not in factored for i in range(len(leaves))]
    rest = [x for x, r in zip(leaves, is_rest) if r]
    rest_dirs = [d for d, r in zip(dirs, is_rest) if r]
    active_sites = [s for s in found.sites if s.leaf in factored]
    active, j = [], 0
    for s in found.sites:
      active.append(j if s.leaf in factored else None)
      j += s.leaf in factored
    layouts = _layouts(found, factored, dirs, k) if prepared is None else prepared
    closed = found.closed
    n = len(leaves)

    groups = found.groups()

    def loss_and_inputs(rest_leaves, perts, ex):
      it = iter(rest_leaves)
      full = [next(it) if r else x for x, r in zip(leaves, is_rest)]
      recorder = _Recorder(active, perts, groups)
      args = full + jax.tree.leaves(ex)
      tags = [(i, False) for i in range(n)] + [None] * (len(args) - n)
      (loss,) = interpret(closed.jaxpr, closed.consts, args, tags, recorder)
      return loss, recorder.inputs

    def grads_one(ex):
      ex = jax.tree.map(lambda x: x[None], ex)
      perts = [jnp.zeros(s.pert_shape, s.out_dtype) for s in active_sites]
      loss, vjp_fn, inputs = jax.vjp(lambda r, p: loss_and_inputs(r, p, ex), rest, perts, has_aux=True)
      g_rest, deltas = vjp_fn(jnp.ones_like(loss))
      return g_rest, deltas, inputs, loss

    def pieces(inputs, deltas):
      return [(s,) + _rows(s, x, d, directions.dtype) for s, x, d in zip(active_sites, inputs, deltas)]

    def one_micro(mb):
      g_rest, deltas, inputs, losses = jax.vmap(grads_one)(mb)
      proj, sq = _pair(g_rest, rest_dirs, norms)
      for s, x2, d2 in pieces(inputs, deltas):
        p_i, s_i = _site_projection(s, x2, d2, layouts[s.layout_key], k, norms)
        proj, sq = proj + p_i, sq + s_i
      proj = proj.astype(directions.dtype)
      if with_gradients:
        sq, out = _over_flat_gradients(leaves, is_rest, (g_rest, inputs, deltas), pieces, gradient_fn, chunk,
                                       directions.dtype)
        return proj, sq, out, losses
      sq = sq.astype(directions.dtype) if with_norms else jnp.zeros(proj.shape[:1], proj.dtype)
      return proj, sq

    return one_micro


def _over_flat_gradients(leaves, is_rest, micro_pieces, pieces, gradient_fn, chunk, dtype):
  """Returns ((micro,) ‖g‖², gradient_fn(g) stacked) for the flat per-example gradients g, assembled
  in `ravel_pytree` order `chunk` examples at a time from the rest gradients and the contractions'
  inputs and output gradients."""

  def chunk_leaves(piece):
    g_rest, inputs, deltas = piece
    by_leaf = {}
    for s, x2, d2 in pieces(inputs, deltas):
      g = _leaf_gradients(s, leaves[s.leaf].shape, x2, d2)
      by_leaf[s.leaf] = by_leaf[s.leaf] + g if s.leaf in by_leaf else g
    rest = iter(g_rest)
    return [next(rest) if r else by_leaf[i] for i, r in enumerate(is_rest)]

  return layer_gradients.over_flat_gradient_chunks(chunk_leaves, micro_pieces, chunk, dtype, gradient_fn)


def _pair(gs, us, with_norms):
  """Returns ((B, k) Σ_leaves ⟨g_b, u_j⟩, (B,) Σ ‖g_b‖²) for per-example g (B, ...) and u (k, ...)."""
  proj, sq = 0.0, 0.0
  for g, u in zip(gs, us):
    g2 = g.reshape(g.shape[0], -1).astype(u.dtype)
    proj = proj + g2 @ u.reshape(u.shape[0], -1).T
    if with_norms:
      sq = sq + jnp.sum(g2 * g2, axis=1)
  return proj, sq


def _shape_key(params, example) -> tuple:
  return (jax.tree.structure((params, example)),
          tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in jax.tree.leaves((params, example))))


__all__ = ["TracedLayerwiseLoss"]
