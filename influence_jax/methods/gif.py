"""Generalized influence functions (GIF; Lyu et al.), their baselines, and target-parameter selection.

DESIGN §4. Removing a set U from N training examples, with H the Hessian of the
mean loss on the N − |U| remaining examples and
g = (1/(N−|U|)) Σ_{z∈U} ∇ℓ(z), the retrained parameters are ≈ θ + Δ with

  IF   Δ = H⁻¹ g                         (every parameter moves)
  GIF  Δ_T = argmin ‖H[:,T] Δ − g‖        (only the target set T moves; the
                                           first-order gradient change is
                                           cancelled on *all* coordinates)
  FIF  Δ_T = H_TT⁻¹ g_T                   (T moves, the rest treated as frozen)
  PIF  Δ_T = (H⁻¹ g)_T                    (the IF update projected on T)

Every update is a params-shaped pytree, zero outside T, to be *added* to θ.
Products with H come from a `curvature.LinearOperator` (flat ravel_pytree
vectors); no p × p matrix is formed. Target sets are boolean masks shaped like
params, chosen per Dense/Conv layer as whole output units (`select_parameters`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import curvature
from influence_jax import data as data_lib
from influence_jax import solvers
from influence_jax import validation

Params = Any
Batch = Any

SELECTION_METHODS = ("output", "gradient", "random")

# ---------------------------------------------------------------------------
# Target-parameter selection.


class LayerSelection(NamedTuple):
  """How many output units (and parameters) of one Dense/Conv layer are in the target set."""

  path: tuple[str, ...]
  units_selected: int
  units_total: int
  params_selected: int
  params_total: int


class Selection(NamedTuple):
  """A target set: `mask` (bool pytree shaped like params; True = target) and per-layer counts."""

  mask: Params
  layers: tuple[LayerSelection, ...]

  def summary(self) -> str:
    """Returns a table of selected / total units and parameters per layer."""
    rows = [f"{'layer':<24} {'units':>13} {'params':>19}"]
    for l in self.layers:
      rows.append(f"{'/'.join(l.path):<24} {l.units_selected:>6} / {l.units_total:<4} "
                  f"{l.params_selected:>8} / {l.params_total:<8}")
    sel = sum(l.params_selected for l in self.layers)
    total = sum(int(np.size(x)) for x in jax.tree.leaves(self.mask))
    rows.append(f"selected {sel} of {total} parameters ({100.0 * sel / max(total, 1):.1f}%); "
                "norm-layer and other parameters are never selected")
    return "\n".join(rows)


class _Layer(NamedTuple):
  key: tuple[str, ...]  # path of the layer's dict inside params
  module_path: tuple[str, ...]  # the same path without a leading 'params' collection key
  units: int
  unit_size: int  # parameters per unit: kernel column / filter, plus its bias
  has_bias: bool


def unit_layers(params: Params) -> list[_Layer]:
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
      layers.append(_Layer(key, key[strip:], units, unit_size, has_bias))
      return
    for k in sorted(node):
      walk(node[k], key + (str(k),))

  walk(params, ())
  return layers


def units_to_select(ratio: float, layer_size: int, unit_size: int) -> int:
  """Returns the number of whole units to select: ⌊int(ratio · layer_size) / unit_size⌋.

  The parameter budget is int(ratio · layer_size) (floor; a relative slack of
  1e-9 absorbs float round-off, so 0.29 · 100 counts as 29), and the largest
  number of whole units that fits in it is taken: selected parameters never
  exceed the budget, and a budget smaller than one unit selects nothing.
  """
  budget = int(math.floor(ratio * layer_size * (1 + 1e-9)))
  return budget // unit_size


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


def unit_scores(loss_fn: Callable, params: Params, batch: Batch, method: str) -> dict:
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


def select_parameters(
    params: Params,
    *,
    ratio: float,
    method: str = "output",
    loss_fn: Optional[Callable] = None,
    target_batch: Optional[Batch] = None,
    seed: int = 0,
) -> Selection:
  """Returns the target set T: in each Dense/Conv layer, the top-scoring whole output units.

  Each layer contributes `units_to_select(ratio, layer size, unit size)` units,
  i.e. ⌊int(ratio · size) / unit size⌋; a unit is a kernel column (Dense) or
  filter (Conv) with its bias. Units are ranked by `method` ("output" or
  "gradient", see `unit_scores`, computed with `loss_fn` on `target_batch`, the
  examples to forget; ties go to the lower unit index) or drawn uniformly at
  random ("random", numpy seeded by `seed`). Norm-layer parameters and anything
  that is not a Dense/Conv kernel or bias are never selected.
  """
  if method not in SELECTION_METHODS:
    raise ValueError(f"Unknown selection method {method!r}; expected one of {SELECTION_METHODS}.")
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

  chosen = {}
  rows = []
  for l in layers:
    size = l.units * l.unit_size
    n = units_to_select(ratio, size, l.unit_size)
    order = np.argsort(-scores[l.key], kind="stable")
    chosen[l.key] = np.zeros(l.units, bool)
    chosen[l.key][order[:n]] = True
    rows.append(LayerSelection(l.module_path, n, l.units, n * l.unit_size, size))

  def leaf_mask(path, leaf):
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    units = chosen.get(keys[:-1])
    if units is None or keys[-1] not in ("kernel", "bias"):
      return np.zeros(np.shape(leaf), bool)
    return np.broadcast_to(units, np.shape(leaf)).copy()

  mask = jax.tree_util.tree_map_with_path(leaf_mask, params)
  return Selection(mask=mask, layers=tuple(rows))


def full_mask(params: Params) -> Params:
  """Returns the all-True mask shaped like params (T = every parameter: GIF becomes IF)."""
  return jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)


# ---------------------------------------------------------------------------
# The gradient g of an edit.


def _summed_gradient(per_example_loss_fn, params, batches) -> Params:
  grad = jax.jit(jax.grad(lambda p, b: jnp.sum(per_example_loss_fn(p, b))))
  total = None
  for b in batches:
    gb = grad(params, b)
    total = gb if total is None else jax.tree.map(jnp.add, total, gb)
  return total


def removal_gradient(per_example_loss_fn: Callable, params: Params, removed_batches, num_remaining: int) -> Params:
  """Returns g = (1/num_remaining) Σ_{z∈U} ∇ℓ(z) over the removed examples U (a params pytree).

  θ + H⁻¹g approximates the parameters retrained without U (H: Hessian of the
  mean loss on the remaining examples). Any L2 term must be inside ℓ
  (loss_fn = mean of per_example_loss_fn) for this to be the exact first-order
  change; an L2 term outside ℓ leaves an extra −(|U|/num_remaining)·λθ out.
  """
  removed = data_lib.materialize(removed_batches, "removed_batches")
  if num_remaining <= 0:
    raise ValueError(f"num_remaining must be positive; got {num_remaining}.")
  g = _summed_gradient(per_example_loss_fn, params, removed)
  g = jax.tree.map(lambda x: x / num_remaining, g)
  validation.check_finite(g, "removal gradient")
  return g


def label_change_gradient(
    per_example_loss_fn: Callable, params: Params, wrong_batches, corrected_batches, num_examples: int,
) -> Params:
  """Returns g = (1/num_examples) Σ_{changed z} ∇[ℓ(z, wrong label) − ℓ(z, corrected label)].

  `wrong_batches` and `corrected_batches` hold the same inputs with the old and
  the new labels; num_examples is the size of the edited training set (N: a
  label change removes nothing). θ + H⁻¹g approximates retraining on the
  corrected labels, H the Hessian of the mean loss on the corrected set.
  """
  wrong = data_lib.materialize(wrong_batches, "wrong_batches")
  fixed = data_lib.materialize(corrected_batches, "corrected_batches")
  if [data_lib.batch_size(b) for b in wrong] != [data_lib.batch_size(b) for b in fixed]:
    raise ValueError("wrong_batches and corrected_batches must hold the same examples in the same batch sizes.")
  if num_examples <= 0:
    raise ValueError(f"num_examples must be positive; got {num_examples}.")
  gw = _summed_gradient(per_example_loss_fn, params, wrong)
  gc = _summed_gradient(per_example_loss_fn, params, fixed)
  g = jax.tree.map(lambda a, b: (a - b) / num_examples, gw, gc)
  validation.check_finite(g, "label-change gradient")
  return g


# ---------------------------------------------------------------------------
# Updates.


class InfluenceUpdate(NamedTuple):
  """An edit Δ (params-shaped, zero outside the target set) to be added to θ.

  residual_norm: ‖H[:,T] Δ_T − g‖ over *all* coordinates (how far the
    first-order gradient change is from cancelling g; GIF minimises it).
  relative_residual: residual_norm / ‖g‖.
  num_iters / converged: of the conjugate-gradient solve (`solvers.CGResult`).
  """

  delta: Params
  residual_norm: jax.Array
  relative_residual: jax.Array
  num_iters: jax.Array
  converged: jax.Array


def _flatten(hessian, g, mask):
  if not isinstance(hessian, curvature.LinearOperator):
    raise TypeError("hessian must be a curvature.LinearOperator (e.g. from curvature.curvature_operator).")
  if jax.tree.structure(g) != jax.tree.structure(mask):
    raise ValueError(f"mask has pytree structure {jax.tree.structure(mask)}, but g has {jax.tree.structure(g)}.")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(mask)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"mask leaf {jax.tree_util.keystr(path)} has shape {np.shape(b)}, but g's has {np.shape(a)}.")
  validation.check_finite(g, "g")
  g_flat, unravel = ravel_pytree(g)
  if g_flat.size != hessian.dim:
    raise ValueError(f"g has {g_flat.size} entries, but the Hessian operator acts on {hessian.dim}.")
  m = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, g_flat.dtype), mask))[0]
  if not bool(jnp.any(m > 0)):
    raise ValueError("The target mask selects no parameter.")
  return g_flat, m, unravel


def _finish(hessian, g_flat, m, unravel, res: solvers.CGResult) -> InfluenceUpdate:
  delta = m * res.x
  r = jnp.linalg.norm(hessian(delta) - g_flat)
  return InfluenceUpdate(unravel(delta), r, r / jnp.linalg.norm(g_flat), res.num_iters, res.converged)


@dataclasses.dataclass(frozen=True)
class _Masked:
  """matvec of x ↦ P H Pᵀ x (P = diag(m)); operands (H's operands, m). Hashable, so jit caches it per H."""

  inner: Callable

  def __call__(self, ops, v):
    return ops[1] * self.inner(ops[0], ops[1] * v)


@dataclasses.dataclass(frozen=True)
class _NormalMasked:
  """matvec of x ↦ P H H Pᵀ x = H[:,T]ᵀ H[:,T] x; operands (H's operands, m)."""

  inner: Callable

  def __call__(self, ops, v):
    return ops[1] * self.inner(ops[0], self.inner(ops[0], ops[1] * v))


@dataclasses.dataclass(frozen=True)
class _Squared:
  """matvec of x ↦ A A x (positive semi-definite for symmetric A)."""

  inner: Callable

  def __call__(self, ops, v):
    return self.inner(ops, self.inner(ops, v))


def _masked(hessian, m):
  return hessian.replace(matvec=_Masked(hessian.matvec), operands=(hessian.operands, m))


def _squared(op):
  return op.replace(matvec=_Squared(op.matvec))


def _solve(op, rhs, solver, tol, max_iters):
  """Solves op x = rhs by CG ("cg", op positive definite) or CG on op² x = op rhs ("normal")."""
  if solver == "cg":
    return solvers.conjugate_gradient(op, rhs, tol=tol, max_iters=max_iters)
  if solver == "normal":
    return solvers.conjugate_gradient(_squared(op), op(rhs), tol=tol, max_iters=max_iters)
  raise ValueError(f"Unknown solver {solver!r}; expected 'normal' or 'cg'.")


def gif_update(hessian, g: Params, mask: Params, *, tol: float = 1e-6, max_iters: Optional[int] = None) -> InfluenceUpdate:
  """Returns the GIF edit: Δ_T = argmin_Δ ‖H[:,T] Δ − g‖, zero outside T (add it to θ).

  Solved by CG on the normal equations P H H Pᵀ x = P H g (two products with
  H an iteration; positive semi-definite even when H is indefinite), stopping
  at relative normal-equation residual `tol` or after `max_iters` (default: p).
  In blocks: (H_TT² + H_TF H_FT) Δ_T = H_TT g_T + H_TF g_F. With T = all it is
  H⁻¹ g. The reported residual is ‖H[:,T]Δ − g‖ over all coordinates.
  """
  g_flat, m, unravel = _flatten(hessian, g, mask)
  op = hessian.replace(matvec=_NormalMasked(hessian.matvec), operands=(hessian.operands, m))
  res = solvers.conjugate_gradient(op, m * hessian(g_flat), tol=tol, max_iters=max_iters)
  return _finish(hessian, g_flat, m, unravel, res)


def fif_update(
    hessian, g: Params, mask: Params, *, solver: str = "normal", tol: float = 1e-6, max_iters: Optional[int] = None,
) -> InfluenceUpdate:
  """Returns the FIF edit Δ_T = H_TT⁻¹ g_T (the other parameters treated as frozen), zero outside T.

  H_TT may be indefinite for a non-convex model. solver="normal" (default)
  runs CG on H_TT² Δ = H_TT g_T, positive semi-definite: the exact H_TT⁻¹ g_T
  when H_TT is nonsingular, the least-squares solution of H_TT Δ = g_T
  otherwise. solver="cg" runs plain CG on H_TT (half the products): only for
  H_TT positive definite, e.g. with enough damping in the operator
  (curvature_operator(..., damping=δ) makes it (H + δI)_TT); it stops with
  converged=False on non-positive curvature.
  """
  g_flat, m, unravel = _flatten(hessian, g, mask)
  res = _solve(_masked(hessian, m), m * g_flat, solver, tol, max_iters)
  return _finish(hessian, g_flat, m, unravel, res)


def pif_update(
    hessian, g: Params, mask: Params, *, solver: str = "normal", tol: float = 1e-6, max_iters: Optional[int] = None,
) -> InfluenceUpdate:
  """Returns the PIF edit Δ_T = (H⁻¹ g)_T: the full influence update with the coordinates outside T zeroed.

  The full solve H x = g uses CG on H² x = H g (solver="normal", default; H may
  be indefinite) or plain CG on H (solver="cg", H positive definite).
  """
  g_flat, m, unravel = _flatten(hessian, g, mask)
  res = _solve(hessian, g_flat, solver, tol, max_iters)
  return _finish(hessian, g_flat, m, unravel, res)


def if_update(
    hessian, g: Params, *, solver: str = "normal", tol: float = 1e-6, max_iters: Optional[int] = None,
) -> InfluenceUpdate:
  """Returns the classic influence edit Δ = H⁻¹ g on every parameter (θ + Δ ≈ the retrained θ)."""
  return pif_update(hessian, g, full_mask(g), solver=solver, tol=tol, max_iters=max_iters)


def apply_update(params: Params, update, scale: float = 1.0) -> Params:
  """Returns θ + scale · Δ (`update` an InfluenceUpdate or a params-shaped Δ)."""
  delta = update.delta if isinstance(update, InfluenceUpdate) else update
  return jax.tree.map(lambda p, d: p + scale * jnp.asarray(d, jnp.result_type(p)), params, delta)
