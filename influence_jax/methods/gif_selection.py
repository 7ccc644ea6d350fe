"""GIF target sets: which parameters an edit may move (Lyu et al.; docs/design.md, "The papers' methods").

A target set T is a boolean mask shaped like params (`TargetSet.mask`). It is
chosen per Dense/Conv layer with an exact budget of int(ratio · layer size)
parameters: the top-ranked whole output units (a kernel column or a filter with
its bias), then kernel entries of the next-ranked unit to fill the budget:
seeded random ones (fill="random", as the authors' selection does) or its first
ones in memory order (fill="first"). Units are ranked by the
|mean pre-activation| ("output") or the |mean ∂L/∂pre-activation|
("gradient") on the examples being edited, or drawn at random ("random").
Norm layers and other non-Dense/Conv parameters are never selected.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import validation
from influence_jax.types import Batch, LossFn, Params


SELECTION_METHODS = ("output", "gradient", "random")
FILLS = ("first", "random")


class LayerSelection(NamedTuple):
  """The target parameters of one Dense/Conv layer.

  units_selected: whole output units in T; partial_params: parameters of the
  next-ranked unit added to fill the budget (0 ≤ partial_params < unit size);
  params_selected = units_selected · unit size + partial_params = int(ratio · params_total).
  """

  path: tuple[str, ...]
  units_selected: int
  units_total: int
  partial_params: int
  params_selected: int
  params_total: int


class TargetSet(NamedTuple):
  """GIF's target set T: `mask` (bool pytree shaped like params; True = in T) and per-layer counts."""

  mask: Params
  layers: tuple[LayerSelection, ...]

  def summary(self) -> str:
    """Returns a table of the selected units (whole + partial) and parameters of every layer."""
    rows = [f"{'layer':<24} {'units':>13} {'partial':>8} {'params':>19}"]
    for l in self.layers:
      rows.append(f"{'/'.join(l.path):<24} {l.units_selected:>6} / {l.units_total:<4} {l.partial_params:>8} "
                  f"{l.params_selected:>8} / {l.params_total:<8}")
    sel = sum(l.params_selected for l in self.layers)
    total = sum(int(np.size(x)) for x in jax.tree.leaves(self.mask))
    rows.append(f"selected {sel} of {total} parameters ({100.0 * sel / max(total, 1):.1f}%); "
                "norm-layer and other parameters are never selected")
    return "\n".join(rows)

  def counts(self) -> str:
    """Returns the selected parameters per layer on one line, e.g. 'Dense_0 208/2080, Dense_1 33/330'."""
    return ", ".join(f"{'/'.join(l.path)} {l.params_selected}/{l.params_total}" for l in self.layers)


class UnitLayer(NamedTuple):
  """A Dense/Conv-like layer of a params pytree (see `unit_layers`)."""

  key: tuple[str, ...]  # path of the layer's dict inside params
  module_path: tuple[str, ...]  # the same path without a leading 'params' collection key
  units: int
  unit_size: int  # parameters per unit: kernel column / filter, plus its bias
  has_bias: bool


def unit_layers(params: Params) -> list[UnitLayer]:
  """Returns the Dense/Conv-like layers of a Linen params pytree, in sorted path order.

  A layer is a dict holding exactly a 'kernel' of rank ≥ 2 (output units on
  its last axis) and optionally a 'bias' of shape (units,). Norm layers
  ('scale'/'bias' without a kernel), embeddings, DenseGeneral kernels with
  several output axes (e.g. attention projections) and anything else are not
  layers here, so their parameters are never selected.
  """
  layers = []
  strip = 1 if isinstance(params, dict) and set(params) == {"params"} else 0

  def walk(node, key):
    if not isinstance(node, dict):
      return
    kernel = node.get("kernel")
    if kernel is not None and not isinstance(kernel, dict) and np.ndim(kernel) >= 2:
      units = int(np.shape(kernel)[-1])
      bias = node.get("bias")
      has_bias = bias is not None and np.shape(bias) == (units,)
      if (bias is not None and not has_bias) or set(node) - {"kernel", "bias"}:
        return  # not Dense/Conv-shaped (e.g. DenseGeneral with several output axes): never selected
      unit_size = int(np.size(kernel)) // units + int(has_bias)
      layers.append(UnitLayer(key, key[strip:], units, unit_size, has_bias))
      return
    for k in sorted(node):
      walk(node[k], key + (str(k),))

  walk(params, ())
  return layers


def layer_budget(ratio: float, layer_size: int) -> int:
  """Returns the number of parameters to select in a layer: int(ratio · layer_size).

  Floor, with a relative slack of 1e-9 that absorbs float round-off (0.29 · 100 counts as 29).
  """
  return min(layer_size, int(math.floor(ratio * layer_size * (1 + 1e-9))))


def _layer_outputs(loss_fn, params, batch, layers, perturbations=None):
  """Runs loss_fn(params, batch), capturing (and optionally perturbing) each layer's output.

  Returns (loss, {module_path: output}). Only module `__call__`s whose path
  is a layer of `layers` are touched.
  """
  by_path = {l.module_path: l for l in layers}
  outputs = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name != "__call__" or path not in by_path:
      return out
    if path in outputs:
      raise ValueError(
          f"Layer {'/'.join(path)} is called more than once in loss_fn; selection by "
          "outputs or gradients needs one call per layer (shared layers are not supported).")
    units = by_path[path].units
    if not hasattr(out, "shape") or out.shape[-1:] != (units,):
      raise ValueError(
          f"Layer {'/'.join(path)} returned shape {getattr(out, 'shape', None)}; expected "
          f"output units ({units}) on the last axis.")
    if perturbations is not None:
      out = out + perturbations[path]
    outputs[path] = out
    return out

  with nn.intercept_methods(interceptor):
    loss = loss_fn(params, batch)
  missing = [l.module_path for l in layers if l.module_path not in outputs]
  if missing:
    raise ValueError(
        f"loss_fn never called the Linen modules {['/'.join(m) for m in missing]}. It must run "
        "module.apply(...) on these params when called (an already-traced jax.jit'ed loss_fn "
        "does not re-run the modules, so pass the un-jitted function).")
  return loss, outputs


def unit_scores(loss_fn: LossFn, params: Params, batch: Batch, method: str) -> dict:
  """Returns {layer key: (units,) scores} for ranking output units of each Dense/Conv layer.

  "output":   |mean over the batch (and spatial positions) of the unit's pre-activation|.
  "gradient": |mean over the batch (and positions) of ∂L/∂(pre-activation)|, L = loss_fn
              on `batch` (for a Dense layer this is |∂L/∂bias_j| up to a per-layer factor).
  `loss_fn(params, batch)` must call the Linen module's apply on `params`.
  """
  layers = unit_layers(params)
  reduce = lambda t: jnp.abs(jnp.mean(t.reshape(-1, t.shape[-1]), axis=0))
  if method == "output":
    _, outs = _layer_outputs(loss_fn, params, batch, layers)
    return {l.key: np.asarray(reduce(outs[l.module_path])) for l in layers}
  if method == "gradient":
    _, outs = _layer_outputs(loss_fn, params, batch, layers)
    zeros = {k: jnp.zeros_like(v) for k, v in outs.items()}
    grads = jax.grad(lambda z: _layer_outputs(loss_fn, params, batch, layers, z)[0])(zeros)
    return {l.key: np.asarray(reduce(grads[l.module_path])) for l in layers}
  raise ValueError(f"Unknown scoring method {method!r}; expected 'output' or 'gradient'.")


def partial_rows(fan_in: int, count: int, fill: str, rng: Optional[np.random.Generator] = None) -> np.ndarray:
  """Returns the `count` (≤ fan_in) kernel rows of a partly taken unit: the first ones (fill="first") or
  `count` distinct rows drawn uniformly by `rng` (fill="random"), sorted."""
  if not 0 <= count <= fan_in:
    raise ValueError(f"count must be in [0, {fan_in}]; got {count}.")
  if fill == "first":
    return np.arange(count)
  if fill == "random":
    if rng is None:
      raise ValueError("fill='random' needs a numpy Generator.")
    return np.sort(rng.choice(fan_in, size=count, replace=False))
  raise ValueError(f"Unknown fill {fill!r}; expected one of {FILLS}.")


def _layer_masks(layer: UnitLayer, kernel_shape, order, budget: int, fill: str, rng):
  """Returns (kernel mask, bias mask or None): the units `order[:whole]` whole, then
  `budget − whole · unit_size` (< unit size) kernel entries of unit `order[whole]` (`partial_rows`)."""
  fan_in = int(np.prod(kernel_shape[:-1]))
  kernel = np.zeros((fan_in, layer.units), bool)
  bias = np.zeros(layer.units, bool)
  whole, partial = divmod(budget, layer.unit_size)
  kernel[:, order[:whole]] = True
  bias[order[:whole]] = True
  if partial:
    kernel[partial_rows(fan_in, partial, fill, rng), order[whole]] = True
  return kernel.reshape(kernel_shape), (bias if layer.has_bias else None)


def select_parameters(
    params: Params,
    *,
    ratio: float,
    method: str = "output",
    loss_fn: Optional[LossFn] = None,
    target_batch: Optional[Batch] = None,
    seed: int = 0,
    fill: str = "first",
) -> TargetSet:
  """Returns the target set T: exactly int(ratio · size) parameters of each Dense/Conv layer.

  In each layer the units are ranked by `method` ("output" or "gradient", see
  `unit_scores`, computed with `loss_fn` on `target_batch`, the examples being
  edited; ties go to the lower unit index) or drawn uniformly at random
  ("random", numpy seeded by `seed`); the top units are taken whole and the
  next one in part until the budget `layer_budget(ratio, size)` is spent: its
  first kernel entries in C order (fill="first") or kernel entries drawn at
  random (fill="random", the authors' rule; numpy seeded by `seed`, layer after
  layer in sorted path order). Norm-layer parameters and anything that is not a
  Dense/Conv kernel or bias are never selected.
  """
  if method not in SELECTION_METHODS:
    raise ValueError(f"Unknown selection method {method!r}; expected one of {SELECTION_METHODS}.")
  if fill not in FILLS:
    raise ValueError(f"Unknown fill {fill!r}; expected one of {FILLS}.")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio must be in [0, 1]; got {ratio}.")
  validation.check_finite(params, "params")
  layers = unit_layers(params)
  if not layers:
    raise ValueError("params holds no Dense/Conv layer (a dict with a rank ≥ 2 'kernel').")
  if method == "random":
    rng = np.random.default_rng(seed)
    scores = {l.key: rng.permutation(l.units).astype(np.float64) for l in layers}
  else:
    if loss_fn is None or target_batch is None:
      raise ValueError(f"method={method!r} needs loss_fn and target_batch (the examples to forget).")
    scores = unit_scores(loss_fn, params, target_batch, method)

  leaf_masks = {}
  rows = []
  fill_rng = np.random.default_rng([seed, 1])  # Independent of the "random" ranking's stream.
  for l in layers:
    node = params
    for k in l.key:
      node = node[k]
    size = l.units * l.unit_size
    budget = layer_budget(ratio, size)
    order = np.argsort(-scores[l.key], kind="stable")
    kernel, bias = _layer_masks(l, np.shape(node["kernel"]), order, budget, fill, fill_rng)
    leaf_masks[l.key + ("kernel",)] = kernel
    if bias is not None:
      leaf_masks[l.key + ("bias",)] = bias
    whole, partial = divmod(budget, l.unit_size)
    rows.append(LayerSelection(l.module_path, whole, l.units, partial, budget, size))

  def leaf_mask(path, leaf):
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    return leaf_masks.get(keys, np.zeros(np.shape(leaf), bool))

  mask = jax.tree_util.tree_map_with_path(leaf_mask, params)
  return TargetSet(mask=mask, layers=tuple(rows))


def full_mask(params: Params) -> Params:
  """Returns the all-True mask shaped like params (T = every parameter: GIF becomes IF)."""
  return jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)
