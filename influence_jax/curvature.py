"""Curvature operators: Hessian- and Gauss-Newton-vector products over fixed batches.

The operator is the curvature of the *mean* loss over a fixed list of batches,
chosen once (docs/design.md, "Arnoldi influence and the spectral tail"), so it is one deterministic symmetric matrix. It acts
on flat parameter vectors (the order of `jax.flatten_util.ravel_pytree`), which
is the layout the Arnoldi basis uses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib
from influence_jax import sharding as sharding_lib
from influence_jax.types import Batch, LossFn, OutputsFn, Params


@dataclasses.dataclass(frozen=True)
class SplitLoss:
  """A loss written as output_loss_fn(outputs_fn(params, batch), batch) + regularizer(params).

  Callable like any `loss_fn(params, batch) -> scalar`; the split is what the
  Gauss-Newton product needs (J = ∂outputs/∂params, H_out = ∂²loss/∂outputs²).
  The regularizer's exact Hessian is added to the Gauss-Newton product.
  A frozen dataclass: hashable and weakly referenceable, so jit can take it as
  a static argument like any function.
  """

  outputs_fn: OutputsFn
  output_loss_fn: Callable[[Any, Batch], jax.Array]
  regularizer: Optional[Callable[[Params], jax.Array]] = None

  def __call__(self, params: Params, batch: Batch) -> jax.Array:
    loss = self.output_loss_fn(self.outputs_fn(params, batch), batch)
    if self.regularizer is not None:
      loss = loss + self.regularizer(params)
    return loss


def hvp(loss_fn: LossFn, params: Params, batch: Batch, v: Params) -> Params:
  """Returns H v, H = ∇²_params loss_fn(params, batch), forward-over-reverse (a pytree like params)."""
  grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
  return jax.jvp(grad_fn, (params,), (v,))[1]


def gnvp(loss_fn: SplitLoss, params: Params, batch: Batch, v: Params) -> Params:
  """Returns G v, G = Jᵀ H_out J (+ regularizer Hessian): positive semi-definite for convex output losses."""
  _check_split(loss_fn)
  f = lambda p: loss_fn.outputs_fn(p, batch)
  outputs, jv = jax.jvp(f, (params,), (v,))
  out_grad = lambda o: jax.grad(loss_fn.output_loss_fn)(o, batch)
  h_jv = jax.jvp(out_grad, (outputs,), (jv,))[1]
  _, vjp_fn = jax.vjp(f, params)
  (gv,) = vjp_fn(h_jv)
  if loss_fn.regularizer is not None:
    reg_hv = jax.jvp(jax.grad(loss_fn.regularizer), (params,), (v,))[1]
    gv = jax.tree.map(jnp.add, gv, reg_hv)
  return gv


def _check_split(loss_fn) -> None:
  if not isinstance(loss_fn, SplitLoss):
    raise TypeError(
        "curvature='gauss_newton' needs the loss as a SplitLoss(outputs_fn, output_loss_fn) "
        f"so that the model Jacobian is available; got {type(loss_fn).__name__}.")


PRODUCTS = {"hessian": hvp, "gauss_newton": gnvp}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["operands"],
                   meta_fields=["matvec", "dim", "dtype", "mesh"])
@dataclasses.dataclass(frozen=True)
class LinearOperator:
  """A symmetric linear map on flat (dim,) parameter vectors, laid out on a device mesh.

  `matvec(operands, v)` is pure and traceable, so it can be fused into a jitted
  Arnoldi or CG step; `operands` (a pytree of arrays: params, fixed batches)
  is passed in explicitly rather than baked into the compiled program. As a
  pytree only `operands` are leaves; `matvec` (hashable), `dim`, `dtype` and
  `mesh` are static. `mesh`: the mesh the operands are laid out on (default:
  the single-device mesh, `sharding.single_device_mesh`).
  """

  matvec: Callable[[Any, jax.Array], jax.Array]
  operands: Any
  dim: int
  dtype: Any
  mesh: Optional[jax.sharding.Mesh] = None

  def __post_init__(self):
    if self.mesh is None:
      object.__setattr__(self, "mesh", sharding_lib.single_device_mesh())

  def __call__(self, v: jax.Array) -> jax.Array:
    return _apply_jit(self.matvec, self.operands, v)

  def replace(self, **changes) -> "LinearOperator":
    """Returns a copy with the given fields replaced."""
    return dataclasses.replace(self, **changes)


@functools.partial(jax.jit, static_argnums=0)
def _apply_jit(matvec, operands, v):
  return matvec(operands, v)


def curvature_operator(
    loss_fn: LossFn,
    params: Params,
    batches,
    *,
    curvature: str = "hessian",
    damping: float = 0.0,
    microbatch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> LinearOperator:
  """Returns v ↦ (C + damping·I) v, C the curvature of the example-weighted mean loss over `batches`.

  Vectors are of `vector_dtype` (float32 for a bfloat16 model).

  `curvature` is "hessian" (exact, possibly indefinite) or "gauss_newton"
  (needs a `SplitLoss`). `batches` are fixed once: every product sums over
  the same examples, in micro-batches of at most `microbatch_size` examples (default:
  `default_microbatch_size`; a size down to half of it that divides the examples is preferred,
  `dividing_microbatch`) so memory does not grow with the batch.

  The operator lives on `mesh` ('data', 'model'; see `sharding.make_mesh`;
  default: one device, the 1 × 1 mesh): every micro-batch is split over
  'data' (its size rounded down to a multiple of the 'data' size; the few
  left-over examples are processed replicated), and params keep an existing
  sharding on that mesh (others are replicated). `batches` are host data
  (numpy), the same on every process.
  """
  if curvature not in PRODUCTS:
    raise ValueError(f"Unknown curvature {curvature!r}; expected one of {sorted(PRODUCTS)}.")
  if curvature == "gauss_newton":
    _check_split(loss_fn)
  mesh = sharding_lib.mesh_or_default(mesh)
  batches = data_lib.materialize(batches, "batches")
  everything = data_lib.concatenate(batches)
  total = data_lib.batch_size(everything)
  micro = microbatch_size or default_microbatch_size(loss_fn, params, everything,
                                                     max(data_lib.batch_size(b) for b in batches))
  data_size = sharding_lib.axis_size(mesh, sharding_lib.DATA)
  if micro >= data_size:
    micro -= micro % data_size
  micro = dividing_microbatch(total, micro, data_size)
  stacked, remainder = data_lib.stack_microbatches(everything, micro)
  micro = data_lib.batch_size(jax.tree.map(lambda x: x[0], stacked))
  matvec = _AveragedProduct(loss_fn, curvature, float(damping), micro, total)
  flat, _ = ravel_pytree(params)
  operands = (sharding_lib.place_params(params, mesh), _place_examples(stacked, 1, mesh),
              None if remainder is None else _place_examples(remainder, 0, mesh))
  return LinearOperator(matvec=matvec, operands=operands, dim=flat.size, dtype=vector_dtype(flat.dtype), mesh=mesh)


# What one micro-batch's intermediate values may take (`default_microbatch_size`).
MICROBATCH_ACTIVATION_BYTES = 1 << 30


def default_microbatch_size(loss_fn: LossFn, params: Params, examples: Batch, largest_batch: int) -> int:
  """Returns the micro-batch size of a curvature product when none is given: the largest batch, or fewer
  examples when their intermediate values would exceed MICROBATCH_ACTIVATION_BYTES
  (`activation_bytes_per_example`; a 3.4M-parameter Transformer LM on 64 tokens: 20 MB an example, 53 a
  micro-batch, where a whole batch of 256 made one product hold 4.4 GB)."""
  per_example = activation_bytes_per_example(loss_fn, params, examples)
  return int(max(1, min(largest_batch, MICROBATCH_ACTIVATION_BYTES // max(per_example, 1))))


def activation_bytes_per_example(loss_fn: LossFn, params: Params, examples: Batch) -> int:
  """Returns the bytes of intermediate values `loss_fn` computes per example: how much the sum of every
  intermediate's size in its jaxpr grows from a batch of one of `examples` to a batch of two (traced on
  shapes only, nothing runs; scanned bodies count once per step). An estimate of what a curvature
  product holds per example (measured on a Transformer LM: 20 MB traced, 17 MB in XLA's own analysis)."""
  shapes = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") and hasattr(x, "dtype") else x, tree)
  abstract = shapes(params)
  total = data_lib.batch_size(examples)
  sizes = [_intermediate_bytes(jax.make_jaxpr(loss_fn)(abstract, shapes(jax.tree.map(lambda x: x[:n], examples))).jaxpr)
           for n in (1, min(2, total))]
  return max(sizes[1] - sizes[0], 0) if total > 1 else sizes[0]


def _intermediate_bytes(jaxpr) -> int:
  """Returns the summed size of every value a jaxpr's equations produce, inner jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += sum(int(np.prod(v.aval.shape, dtype=np.int64)) * v.aval.dtype.itemsize
                 for v in eqn.outvars if hasattr(getattr(v, "aval", None), "shape"))
    steps = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for inner in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          total += steps * _intermediate_bytes(inner)
  return total


def vector_dtype(param_dtype) -> jnp.dtype:
  """Returns the dtype of the operator's vectors (the Arnoldi basis, the eigenvectors) for parameters of
  `param_dtype`: at least float32. A bfloat16/float16 model's products are evaluated in its own dtype and
  summed over micro-batches in float32; the recurrence's orthogonalisation needs float32's precision."""
  return jnp.promote_types(param_dtype, jnp.float32)


def dividing_microbatch(total: int, micro: int, multiple: int = 1) -> int:
  """Returns the largest multiple of `multiple` in [micro/2, micro] that divides `total`, or `micro` if none.

  A micro-batch that divides the examples leaves no remainder batch, so the compiled product holds
  one copy of the curvature product (the scan's body) instead of two: half the compilation.
  """
  for size in range(micro - micro % multiple, max(micro // 2, 1) - 1, -multiple):
    if size > 0 and total % size == 0:
      return size
  return micro


@dataclasses.dataclass(frozen=True)
class _AveragedProduct:
  """The matvec of `curvature_operator`: hashable by value, so jitted steps that take it as a
  static argument compile once per (loss_fn, curvature, sizes), not once per operator."""

  loss_fn: LossFn
  curvature: str
  damping: float
  micro: int
  total: int

  def __call__(self, operands, v):
    params, stacked, remainder = operands
    product = PRODUCTS[self.curvature]
    flat, unravel = ravel_pytree(params)
    vt = unravel(v.astype(flat.dtype))

    def body(acc, mb):
      return acc + ravel_pytree(product(self.loss_fn, params, mb, vt))[0], None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(v), stacked)
    num_micro = jax.tree.leaves(stacked)[0].shape[0]
    out = acc * (self.micro / self.total)
    if remainder is not None:
      rem_n = self.total - num_micro * self.micro
      out = out + ravel_pytree(product(self.loss_fn, params, remainder, vt))[0] * (rem_n / self.total)
    if self.damping:
      out = out + self.damping * v
    return out


def _place_examples(tree, axis: int, mesh):
  """Returns `tree` with its example `axis` split over 'data' when divisible, else replicated."""
  n = np.shape(jax.tree.leaves(tree)[0])[axis]
  d = sharding_lib.axis_size(mesh, sharding_lib.DATA)
  spec = sharding_lib.MICROBATCHES_SPEC if axis == 1 else sharding_lib.BATCH_SPEC
  target = sharding_lib.named(mesh, spec if n % d == 0 else sharding_lib.REPLICATED)
  return sharding_lib.put_tree(tree, target)
