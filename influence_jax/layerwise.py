"""Per-example gradient projections computed layer by layer (no p-sized per-example buffer).

For a Linen layer y = layer(x; W) inside the model, the per-example gradient of
its parameters is the layer's own vector-Jacobian product at the gradient δ of
the loss with respect to its output y. So ⟨∇ℓ(z), u⟩ = Σ_layers ⟨∇_W ℓ(z), u_W⟩
+ ⟨∇_rest ℓ(z), u_rest⟩ needs only each layer's input x and output gradient δ
(the per-layer products are in `layer_gradients`):

- Dense / DenseGeneral applied once per example: ⟨x δᵀ, U_j⟩ = xᵀ U_j δ, a
  matmul of x with the k directions (cost 2·k·size, no per-example gradient);
- Embed: ⟨Σ_l e_{t_l} δ_lᵀ, U_j⟩ = Σ_l U_j[t_l]·δ_l (a gather) when the
  sequence is shorter than the vocabulary;
- Conv (one feature group; 'SAME', 'VALID' or explicit padding): the layer's
  per-example gradient (its own size, never p) as, per kernel offset, the
  inputs that offset reads times δ summed over output positions (batched
  matmuls), then a matmul with the k directions;
- any of Dense / DenseGeneral / Conv / Embed otherwise (applied at many
  positions): the layer's per-example gradient by a vmapped VJP of the layer
  alone, then a matmul with the k directions.

Inputs are recorded and zero perturbations added to outputs with
`flax.linen.intercept_methods`; the perturbations' per-example gradients are
the δ. Parameters of no such layer (norm scales and offsets, position tables,
layers used through another method) get per-example gradients by a vmapped
VJP over those leaves only. NNX modules are not intercepted: their losses use
`projection`'s vjp / jvp methods.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from influence_jax import layer_gradients
from influence_jax.types import PerExampleLossFn

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed)


class LayerCall(NamedTuple):
  """One call of a covered layer in the forward pass of one example.

  path: the layer's path in params; layer: an unbound copy of it (re-applied
  alone); in_shape / out_shape / out_dtype: for a batch of one.
  """

  path: tuple[str, ...]
  layer: nn.Module
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  out_dtype: Any


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_paths(params) -> list[tuple[str, ...]]:
  """Returns the path (tuple of names) of each leaf of params, in `ravel_pytree` order."""
  return [tuple(_key_name(e) for e in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _layer_params(params, path):
  """Returns the params subtree at `path`, or None if there is none."""
  node = params
  for name in path:
    if not hasattr(node, "keys") or name not in node:
      return None
    node = node[name]
  return node


def discover_calls(per_example_loss_fn: PerExampleLossFn, params, example) -> tuple[LayerCall, ...]:
  """Returns the covered layer calls of one forward pass on `example` (a batch of one), in call order.

  A layer is covered when it is one of LAYER_TYPES, is only ever called as
  `layer(x)` (no other method, no keyword), and its variables are exactly the
  params subtree at its path.
  """
  seen, bad = [], set()

  def interceptor(next_fun, args, kwargs, ctx):
    module = ctx.module
    if not isinstance(module, LAYER_TYPES):
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    out = next_fun(*args, **kwargs)
    if ctx.method_name == "setup":
      return out
    if ctx.method_name != "__call__" or len(args) != 1 or kwargs or not isinstance(out, jax.Array):
      bad.add(path)
    else:
      seen.append((path, module.clone(parent=None), tuple(args[0].shape), tuple(out.shape), out.dtype,
                   jax.tree.map(jnp.shape, module.variables.get("params", {}))))
    return out

  def run(params, example):
    with nn.intercept_methods(interceptor):
      return per_example_loss_fn(params, example)

  jax.eval_shape(run, params, example)
  calls = []
  for path, layer, in_shape, out_shape, out_dtype, shapes in seen:
    own = _layer_params(params, path)
    if path in bad or own is None or jax.tree.map(jnp.shape, own) != shapes:
      continue
    calls.append(LayerCall(path, layer, in_shape, out_shape, out_dtype))
  return tuple(calls)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerwiseLoss:
  """A per-example loss of Linen modules that also projects its per-example gradients layer by layer.

  Callable as `per_example_loss_fn(params, batch) -> (B,)`. `micro_projector`
  returns the projections that `projection.project_on` needs. Hashable by
  identity (a static jit argument like any function).
  """

  fn: Callable[[Any, Any], jax.Array]
  _sizes: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def __call__(self, params, batch) -> jax.Array:
    return self.fn(params, batch)

  def micro_projector(self, params, directions: jax.Array, with_norms: bool, example,
                      prepared: Optional[dict] = None) -> Callable:
    """Returns mb ↦ ((micro, k) projections D ∇ℓ(z), (micro,) ‖∇ℓ(z)‖² or zeros).

    `directions` is (k, p) in `ravel_pytree(params)` order; `example` is any
    batch of one (its shapes fix the layer calls); `prepared` is
    `prepare_directions(params, directions, with_norms, example)`, or None to
    lay the directions out inside the projector.
    """
    return make_micro_projector(self.fn, params, directions, with_norms, example, prepared=prepared)

  def micro_projector_with_gradients(self, params, directions: jax.Array, example, gradient_fn: Callable,
                                     chunk: int, prepared: Optional[dict] = None) -> Callable:
    """Returns mb ↦ ((micro, k) D ∇ℓ(z), (micro,) ‖∇ℓ(z)‖², gradient_fn of the (chunk, p) flat gradients
    stacked to (micro, ...), (micro,) ℓ(z)) in one forward and backward pass.

    The flat per-example gradients are assembled from the layers' inputs and output gradients
    `chunk` examples at a time (a divisor of the micro-batch), so only a few exist at once.
    `prepared`: `prepare_directions(..., with_gradients=True)` or None.
    """
    return make_micro_projector(self.fn, params, directions, True, example, gradient_fn=gradient_fn, chunk=chunk,
                                prepared=prepared)

  def prepare_directions(self, params, directions: jax.Array, with_norms: bool, example,
                         with_gradients: bool = False) -> dict:
    """Returns {layer: directions} of the factored Dense layers, in the layout their products take
    (`_factored_layouts`): made once per set of directions (e.g. per `project_on` call) and passed to the
    projectors as `prepared`, instead of transposed inside every batch's program."""
    calls = discover_calls(self.fn, params, example)
    plans = plan_calls(calls, with_norms and not with_gradients)
    return _factored_layouts(calls, plans, _split_directions(params, directions), directions.shape[0])

  def bytes_per_example(self, params, k: int, example) -> int:
    """Returns an estimate of the working memory one example takes in `micro_projector` (cached by shapes)."""
    key = ("bytes", k) + _shape_key(params, example)
    if key not in self._sizes:
      self._sizes[key] = self._bytes_per_example(params, k, example)
    return self._sizes[key]

  def factored_fraction(self, params, example) -> float:
    """Returns the fraction of the parameters whose projection forms no per-example gradient of theirs
    (Dense / DenseGeneral applied once, Embed lookups shorter than the vocabulary); cached by shapes."""
    key = ("factored",) + _shape_key(params, example)
    if key not in self._sizes:
      calls = discover_calls(self.fn, params, example)
      plans = plan_calls(calls, False)
      # A layer counts when none of its calls needs its per-example gradient.
      covered = {c.path for c in calls} - {c.path for c, plan in zip(calls, plans) if plan == "layer_vjp"}
      sizes = {path: leaf.size for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params))}
      factored = sum(n for path, n in sizes.items() if any(path[:len(c)] == c for c in covered))
      self._sizes[key] = factored / max(1, sum(sizes.values()))
    return self._sizes[key]

  def _bytes_per_example(self, params, k, example):
    calls = discover_calls(self.fn, params, example)
    itemsize = jnp.dtype(jax.tree.leaves(params)[0].dtype).itemsize
    total = 0
    for c in calls:
      total += math.prod(c.in_shape) + 2 * math.prod(c.out_shape)
      own = sum(x.size for x in jax.tree.leaves(_layer_params(params, c.path)))
      # A factored call forms one chunk of directions' products at a time (`_factored_layouts`).
      out = math.prod(c.out_shape)
      chunk_columns = max(out, min(k * out, layer_gradients.FACTORED_COLUMNS))
      total += chunk_columns if layer_gradients.dense_factors(c) else own
    return max(1, total * itemsize)


def _shape_key(params, example) -> tuple:
  return (jax.tree.structure((params, example)),
          tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves((params, example))))


def _split_directions(params, directions):
  """Returns {leaf path: (k, *leaf shape) directions}."""
  leaves = jax.tree.leaves(params)
  out, start = {}, 0
  for path, leaf in zip(leaf_paths(params), leaves):
    out[path] = directions[:, start:start + leaf.size].reshape((directions.shape[0],) + leaf.shape)
    start += leaf.size
  return out


def _sub_directions(dirs, path, tree):
  """Returns the directions of the params subtree `tree` at `path`, as a pytree like it of (k, ...) arrays."""
  paths = leaf_paths(tree)
  return jax.tree.unflatten(jax.tree.structure(tree), [dirs[path + p] for p in paths])


def _pair(tree_g, tree_u, with_norms):
  """Returns ((B, k) Σ_leaves ⟨g_b, u_j⟩, (B,) Σ ‖g_b‖²) for per-example g (B, ...) and u (k, ...)."""
  proj, sq = 0.0, 0.0
  for g, u in zip(jax.tree.leaves(tree_g), jax.tree.leaves(tree_u)):
    g2 = g.reshape(g.shape[0], -1).astype(u.dtype)
    proj = proj + g2 @ u.reshape(u.shape[0], -1).T
    if with_norms:
      sq = sq + jnp.sum(g2 * g2, axis=1)
  return proj, sq


def plan_calls(calls: tuple[LayerCall, ...], with_norms: bool) -> tuple[str, ...]:
  """Returns, per call, how its projection is computed: "factored", "embed" or "layer_vjp" (see module doc).

  A layer called more than once keeps one summed gradient when squared norms
  are asked for (‖Σ_calls g‖² has cross terms), so all its calls are "layer_vjp".
  """
  counts = {}
  for c in calls:
    counts[c.path] = counts.get(c.path, 0) + 1
  plans = []
  for c in calls:
    alone = counts[c.path] == 1 or not with_norms
    if alone and layer_gradients.dense_factors(c):
      plans.append("factored")
    elif alone and isinstance(c.layer, nn.Embed) and math.prod(c.in_shape) < c.layer.num_embeddings:
      plans.append("embed")
    else:
      plans.append("layer_vjp")
  return tuple(plans)


def _recording_loss(per_example_loss_fn, calls, params, is_rest):
  """Returns (rest leaves, output perturbations, example) ↦ (loss, inputs of each call)."""
  leaves, treedef = jax.tree.flatten(params)

  def loss_and_inputs(rest_leaves, perts, ex):
    it = iter(rest_leaves)
    full = jax.tree.unflatten(treedef, [next(it) if r else x for x, r in zip(leaves, is_rest)])
    inputs = []

    def interceptor(next_fun, args, kwargs, ctx):
      i = len(inputs)
      if (not isinstance(ctx.module, LAYER_TYPES) or i >= len(calls) or ctx.method_name != "__call__"
          or tuple(ctx.module.path) != calls[i].path):
        return next_fun(*args, **kwargs)
      inputs.append(args[0])
      return next_fun(*args, **kwargs) + perts[i]

    with nn.intercept_methods(interceptor):
      loss = per_example_loss_fn(full, ex)[0]
    return loss, inputs

  return loss_and_inputs


def _layout_key(path) -> str:
  return "/".join(path)


def _factored_layouts(calls, plans, dirs, k) -> dict:
  """Returns {layer path joined by "/": kernel directions in `layer_gradients.dense_layout`} of the
  layers with "factored" calls."""
  layouts = {}
  for call, plan in zip(calls, plans):
    key = _layout_key(call.path)
    if plan == "factored" and key not in layouts:
      in_size, out_size = layer_gradients.dense_factors(call)
      layouts[key] = layer_gradients.dense_layout(dirs[call.path + ("kernel",)].reshape(k, in_size, out_size))
  return layouts


def make_micro_projector(per_example_loss_fn, params, directions, with_norms, example, *,
                         gradient_fn: Optional[Callable] = None, chunk: int = 1,
                         prepared: Optional[dict] = None) -> Callable:
  """Returns mb ↦ ((micro, k) projections, (micro,) squared norms or zeros); see LayerwiseLoss.

  With `gradient_fn`, mb ↦ (projections, squared norms, gradient_fn's outputs, losses), the squared
  norms and gradient_fn's input taken from flat gradients assembled `chunk` examples at a time.
  `prepared`: the factored calls' direction layouts (`_factored_layouts`), made here when None.
  """
  calls = discover_calls(per_example_loss_fn, params, example)
  with_gradients = gradient_fn is not None
  plans = plan_calls(calls, with_norms and not with_gradients)
  paths = leaf_paths(params)
  is_rest = [not any(p[:len(c.path)] == c.path for c in calls) for p in paths]
  rest = [x for x, r in zip(jax.tree.leaves(params), is_rest) if r]
  dirs = _split_directions(params, directions)
  rest_dirs = [dirs[p] for p, r in zip(paths, is_rest) if r]
  k = directions.shape[0]
  factored_u = _factored_layouts(calls, plans, dirs, k) if prepared is None else prepared
  loss_and_inputs = _recording_loss(per_example_loss_fn, calls, params, is_rest)

  def grads_one(ex):
    ex = jax.tree.map(lambda x: x[None], ex)
    perts = [jnp.zeros(c.out_shape, c.out_dtype) for c in calls]
    loss, vjp_fn, inputs = jax.vjp(lambda r, p: loss_and_inputs(r, p, ex), rest, perts, has_aux=True)
    g_rest, deltas = vjp_fn(jnp.ones_like(loss))
    return g_rest, deltas, inputs, loss

  def one_micro(mb):
    g_rest, deltas, inputs, losses = jax.vmap(grads_one)(mb)
    norms = with_norms and not with_gradients
    proj, sq = _pair(g_rest, rest_dirs, norms)
    layer_grads = {}  # path -> per-example gradients summed over the layer's "layer_vjp" calls.
    for i, c in enumerate(calls):
      own = _layer_params(params, c.path)
      if plans[i] == "factored":
        p_i, s_i = layer_gradients.factored_dense(inputs[i], deltas[i], factored_u[_layout_key(c.path)],
                                   _sub_directions(dirs, c.path, own).get("bias"), k, norms)
      elif plans[i] == "embed":
        p_i, s_i = layer_gradients.gathered_embed(inputs[i], deltas[i], dirs[c.path + ("embedding",)], norms)
      else:
        g = layer_gradients.layer_example_gradients(c, own, inputs[i], deltas[i])
        layer_grads[c.path] = jax.tree.map(jnp.add, layer_grads[c.path], g) if c.path in layer_grads else g
        continue
      proj, sq = proj + p_i, sq + s_i
    for path, g in layer_grads.items():
      p_i, s_i = _pair(g, _sub_directions(dirs, path, g), norms)
      proj, sq = proj + p_i, sq + s_i
    proj = proj.astype(directions.dtype)
    if with_gradients:
      pieces = (g_rest, deltas, inputs, layer_grads)
      sq, out = _over_flat_gradients(calls, plans, params, is_rest, pieces, gradient_fn, chunk, directions.dtype)
      return proj, sq, out, losses
    sq = sq.astype(directions.dtype) if with_norms else jnp.zeros(proj.shape[:1], proj.dtype)
    return proj, sq

  return one_micro


def _over_flat_gradients(calls, plans, params, is_rest, pieces, gradient_fn, chunk, dtype):
  """Returns ((micro,) ‖g‖², gradient_fn(g) stacked) for the micro-batch's flat per-example gradients g,
  assembled in `ravel_pytree` order `chunk` examples at a time from (rest gradients, output
  gradients, inputs, the "layer_vjp" layers' gradients)."""
  paths = leaf_paths(params)

  def chunk_leaves(piece):
    g_rest, deltas, inputs, layer_grads = piece
    by_layer = dict(layer_grads)
    for i, c in enumerate(calls):
      if plans[i] != "layer_vjp":
        g = layer_gradients.layer_example_gradients(c, _layer_params(params, c.path), inputs[i], deltas[i])
        by_layer[c.path] = jax.tree.map(jnp.add, by_layer[c.path], g) if c.path in by_layer else g
    rest = iter(g_rest)
    leaves = []
    for path, rest_leaf in zip(paths, is_rest):
      if rest_leaf:
        leaves.append(next(rest))
        continue
      layer = next(c.path for c in calls if path[:len(c.path)] == c.path)
      node = by_layer[layer]
      for name in path[len(layer):]:
        node = node[name]
      leaves.append(node)
    return leaves

  return layer_gradients.over_flat_gradient_chunks(chunk_leaves, pieces, chunk, dtype, gradient_fn)
