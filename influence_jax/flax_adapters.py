"""Flax Linen and NNX models → `loss_fn(params, batch)` and `per_example_loss_fn(params, batch)`.

The influence library works on a params pytree and two functions of it. These
adapters make them from a Flax model:

- params are only the *trainable* variables (Linen: variables["params"];
  NNX: the nnx.Param state). Everything else (BatchNorm statistics, RNG state,
  other collections) is closed over as a constant.
- The model runs in evaluation mode (Linen: `train=False`,
  `deterministic=True`, `use_running_average=True` for whichever of these the
  called method accepts; NNX: the same attributes set with nnx.view), so each
  example's loss depends on that example only.
- loss_fn(params, batch) = mean_i per_example_loss(z_i) + (l2/2)‖params‖²,
  the objective L of docs/design.md, "What a score means" whose Hessian influence inverts.

Example: influence inside a Flax training loop (runnable version:
influence_jax/examples/flax_training_loop.py)::

  model = models.MLP(features=(8,))
  fns = linen_loss_fns(model, model.init(key, x[:1]), models.softmax_cross_entropy, l2=1e-3)
  params, opt_state = fns.params, tx.init(fns.params)
  for epoch in range(num_epochs):
    grads = jax.grad(fns.loss_fn)(params, train)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    g = solvers.gradient_matrix(fns.per_example_loss_fn, params, [train])  # (N, p)
    s = solvers.exact_influence(fns.loss_fn, fns.per_example_loss_fn, params,
                                [probe], [probe], damping=1e-2)               # score(z, x)
    print(epoch, jnp.linalg.norm(g, axis=1).mean(), jnp.diag(s))            # self-influence ≥ 0

  # NNX: the same, with params = the nnx.Param state, written back with nnx_update.
  fns = nnx_loss_fns(nnx_model, models.softmax_cross_entropy, l2=1e-3)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from influence_jax import curvature, traced
from influence_jax.types import LossFn, OutputsFn, Params, PerExampleLossFn


# Module-call keywords and attribute values that select evaluation behaviour.
EVAL_KWARGS = {"train": False, "training": False, "deterministic": True, "use_running_average": True}


class ModelFns(NamedTuple):
  """What the adapters return.

  params: the trainable parameters (a pytree) at which the model was given.
  loss_fn(params, batch) -> scalar: mean per-example loss + (l2/2)‖params‖²; a
    curvature.SplitLoss, so curvature="gauss_newton" works with it as well.
  per_example_loss_fn(params, batch) -> (B,): per-example losses, no L2 term
    that also projects layer by layer: Linen, a layerwise.LayerwiseLoss (module
    interception); NNX, a traced.TracedLayerwiseLoss (layers found from the jaxpr).
  outputs_fn(params, batch) -> model outputs (e.g. (B, C) logits), eval mode.
  merge(params) -> the model with these params: Linen, the full variables
    dict {"params": params, **other collections}; NNX, a new module
    (nnx.merge of graphdef, params and the other state; the given module is
    not modified: use nnx_update for that).
  """

  params: Params
  loss_fn: LossFn
  per_example_loss_fn: PerExampleLossFn
  outputs_fn: OutputsFn
  merge: Callable[[Params], Any]


def l2_penalty(params: Params) -> jax.Array:
  """Returns ½‖params‖² summed over all leaves."""
  return 0.5 * sum(jnp.vdot(x, x).real for x in jax.tree.leaves(params))


def _input_getter(input_key: str | Sequence[str], label_key: str) -> tuple[Callable, Callable]:
  keys = (input_key,) if isinstance(input_key, str) else tuple(input_key)
  if not keys:
    raise ValueError("input_key must name at least one batch key.")

  def get(batch, key, what, arg):
    if not isinstance(batch, Mapping):
      raise TypeError(f"the batch must be a dict of arrays; got {type(batch).__name__}.")
    if key not in batch:
      raise KeyError(
          f"the batch has no {what} key {key!r} (its keys are {sorted(batch)}); set {arg}= accordingly.")
    return batch[key]

  inputs = lambda batch: tuple(get(batch, k, "input", "input_key") for k in keys)
  labels = lambda batch: get(batch, label_key, "label", "label_key")
  return inputs, labels


def _make_fns(params, outputs_fn, per_example_loss, labels, l2, merge) -> ModelFns:
  if l2 < 0:
    raise ValueError(f"l2 must be non-negative; got {l2}.")

  def per_example_loss_fn(params, batch):
    return per_example_loss(outputs_fn(params, batch), labels(batch))

  # The mean loss, written as outputs → loss (+ L2) so that curvature="gauss_newton" can use it too.
  loss_fn = curvature.SplitLoss(
      outputs_fn=outputs_fn,
      output_loss_fn=lambda outputs, batch: jnp.mean(per_example_loss(outputs, labels(batch))),
      regularizer=(lambda params: l2 * l2_penalty(params)) if l2 else None)
  return ModelFns(params, loss_fn, per_example_loss_fn, outputs_fn, merge)


def _eval_kwargs(fn: Callable) -> dict[str, Any]:
  """Returns the EVAL_KWARGS that `fn` accepts as keyword arguments."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return {}
  ok = {n for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
  return {k: v for k, v in EVAL_KWARGS.items() if k in ok}


def linen_loss_fns(
    module,
    variables: Mapping[str, Any],
    per_example_loss: Callable[[Any, jax.Array], jax.Array],
    *,
    input_key: str | Sequence[str] = "x",
    label_key: str = "y",
    l2: float = 0.0,
    method: Callable | str | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> ModelFns:
  """Returns ModelFns for a Linen `module` with `variables` (the dict module.init returned).

  params = variables["params"]; every other collection (e.g. "batch_stats") is
  a closed-over constant. The module is applied as
  module.apply({"params": params, **rest}, *[batch[k] for k in input_key],
  method=method, **eval kwargs, **apply_kwargs) with nothing mutable; eval
  kwargs are train=False / deterministic=True / use_running_average=True for
  those the method's signature accepts. per_example_loss(outputs, labels)
  -> (B,) with labels = batch[label_key]; per_example_loss_fn is a
  layerwise.LayerwiseLoss, so projections are layer-wise by default. Raises
  ValueError when `variables` has no "params" collection.
  """
  if not isinstance(variables, Mapping):
    raise TypeError(f"variables must be the dict returned by module.init; got {type(variables).__name__}.")
  if "params" not in variables:
    raise ValueError(
        f"variables has no 'params' collection (its top-level keys are {sorted(variables)}); pass the "
        "whole dict returned by module.init (e.g. {'params': ..., 'batch_stats': ...}), not params alone.")
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  if isinstance(method, str):
    fn = getattr(module, method)
  else:
    fn = method if method is not None else module.__call__
  kwargs = {**_eval_kwargs(fn), **dict(apply_kwargs or {})}
  inputs, labels = _input_getter(input_key, label_key)

  def outputs_fn(params, batch):
    return module.apply({"params": params, **rest}, *inputs(batch), method=method, mutable=False, **kwargs)

  merge = lambda params: {"params": params, **rest}
  fns = _make_fns(params, outputs_fn, per_example_loss, labels, l2, merge)
  from influence_jax import layerwise  # noqa: PLC0415 (imports flax.linen, for Linen users only)

  return fns._replace(per_example_loss_fn=layerwise.LayerwiseLoss(fns.per_example_loss_fn))


def nnx_eval_view(model: nnx.Module) -> nnx.Module:
  """Returns a view of `model` (sharing its variables) with the eval attributes that exist set.

  Sets deterministic=True and use_running_average=True (nnx.view) on the
  sub-modules that have them; the given module is not modified.
  """
  from flax import nnx  # noqa: PLC0415 (NNX is imported only by NNX users)

  if not hasattr(nnx, "view"):  # Older Flax: an eval-mode copy (variables copied, not shared).
    view = nnx.clone(model)
    view.eval()
    return view
  view = model
  for name in ("deterministic", "use_running_average"):
    try:
      view = nnx.view(view, **{name: EVAL_KWARGS[name]})
    except ValueError as e:  # No sub-module has this attribute.
      if "Unused keys" not in str(e):
        raise
  return view


def nnx_loss_fns(
    model: nnx.Module,
    per_example_loss: Callable[[Any, jax.Array], jax.Array],
    *,
    input_key: str | Sequence[str] = "x",
    label_key: str = "y",
    l2: float = 0.0,
    params_filter: Any = None,
    eval_mode: bool = True,
) -> ModelFns:
  """Returns ModelFns for an NNX `model`: params = its nnx.Param state (an nnx.State pytree).

  graphdef, params, rest = nnx.split(view, params_filter, ...), where view is
  nnx_eval_view(model) when `eval_mode`; `rest` (BatchStat, RNG state, ...)
  is closed over. Outputs are nnx.merge(graphdef, params, rest)(*[batch[k]
  for k in input_key]); per_example_loss(outputs, batch[label_key]) -> (B,).
  `model` is not modified; write trained params back with nnx_update(model, params).
  params_filter defaults to nnx.Param. per_example_loss_fn is a traced.TracedLayerwiseLoss, so
  projections are layer-wise (its Linear layers' contractions found from the jaxpr).
  """
  from flax import nnx  # noqa: PLC0415

  params_filter = nnx.Param if params_filter is None else params_filter
  if not isinstance(model, nnx.Module):
    raise TypeError(f"nnx_loss_fns needs an nnx.Module; got {type(model).__name__}.")
  view = nnx_eval_view(model) if eval_mode else model
  graphdef, params, rest = nnx.split(view, params_filter, ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"the model has no variables matching params_filter={params_filter!r}.")
  inputs, labels = _input_getter(input_key, label_key)

  def outputs_fn(params, batch):
    return nnx.merge(graphdef, params, rest)(*inputs(batch))

  merge = lambda params: nnx.merge(graphdef, params, rest)
  fns = _make_fns(params, outputs_fn, per_example_loss, labels, l2, merge)
  return fns._replace(per_example_loss_fn=traced.TracedLayerwiseLoss(fns.per_example_loss_fn))


def nnx_update(model: nnx.Module, params: Params) -> nnx.Module:
  """Writes `params` (an nnx.Param state, e.g. from nnx_loss_fns after training) into `model`; returns it."""
  from flax import nnx  # noqa: PLC0415

  nnx.update(model, params)
  return model
