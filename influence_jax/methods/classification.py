"""Classification influence: influence on the margin instead of the loss (docs/design.md, "The papers' methods").

The toolkit's own definition, in the spirit of Kounavis, Dia & Ramazanli (2023),
of whom only the abstract is public. The test quantity is the margin

    m(x) = logit_y(x) − max_{c≠y} logit_c(x),

and the classification influence of training example z on x is

    cls(z, x) = −∇m(x)ᵀ H⁻¹ ∇ℓ(z) = dm(x)/dε   when z is upweighted by ε (docs/design.md, "What a score means").

Positive: upweighting z makes x more correctly classified (its margin grows),
the same sense as a positive loss score. Since cls is the loss score with the
test loss replaced by −m, `classification_test_loss` plugs into any scorer.
At a tie among the other classes the gradient follows the first maximiser
(`jnp.argmax`); m is not differentiable there.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import data as data_lib
from influence_jax import projection
from influence_jax import solvers
from influence_jax.methods import last_layer as ll
from influence_jax.types import LossFn, OutputsFn, PerExampleLossFn


def _check_logits(logits, labels) -> None:
  ls, ys = np.shape(logits), np.shape(labels)
  if len(ls) != 2:
    raise ValueError(f"logits must have shape (B, C); got {ls}.")
  if ls[1] < 2:
    raise ValueError(f"logits have {ls[1]} class(es); a margin needs C ≥ 2.")
  if ys != ls[:1]:
    raise ValueError(f"labels must have shape (B,) = ({ls[0]},) to match logits {ls}; got {ys}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"labels must be integer class indices; got dtype {jnp.result_type(labels)}.")


def runner_up(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Returns (B,) the index of the largest logit other than the label's (first one at a tie)."""
  _check_logits(logits, labels)
  mask = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.argmax(jnp.where(mask, -jnp.inf, logits), axis=-1)


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Returns (B,) m = logit_y − max_{c≠y} logit_c: positive iff the example is correctly classified."""
  other = runner_up(logits, labels)
  take = lambda idx: jnp.take_along_axis(logits, idx[:, None], axis=-1)[:, 0]
  return take(labels) - take(other)


def margin_logit_gradients(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Returns (B, C) ∂m/∂logits = onehot(y) − onehot(runner-up)."""
  c = logits.shape[-1]
  dt = jnp.result_type(logits, jnp.float32)
  return jax.nn.one_hot(labels, c, dtype=dt) - jax.nn.one_hot(runner_up(logits, labels), c, dtype=dt)


def per_example_margin_fn(outputs_fn: OutputsFn, label_key: str = "y") -> Callable:
  """Returns fn(params, batch) -> (B,) margins of outputs_fn(params, batch) (logits (B, C)) at batch[label_key]."""

  def fn(params, batch):
    return margin(outputs_fn(params, batch), batch[label_key])

  return fn


def classification_test_loss(outputs_fn: OutputsFn, label_key: str = "y") -> Callable:
  """Returns fn(params, batch) -> (B,) the negative margin −m.

  Used as the *test-side* per-example loss of any scorer, the loss score
  ∇(−m)(x)ᵀ H⁻¹ ∇ℓ(z) is exactly cls(z, x) (positive: z helps classify x).
  """
  margin_fn = per_example_margin_fn(outputs_fn, label_key)
  return lambda params, batch: -margin_fn(params, batch)


def per_example_margin_gradients(outputs_fn: OutputsFn, params: Any, batches, label_key: str = "y") -> jax.Array:
  """Returns the (N, p) matrix of flat ∇m(x) (order of ravel_pytree(params); N × p must fit in memory)."""
  batches = data_lib.materialize(batches, "batches")
  return projection.gradients(per_example_margin_fn(outputs_fn, label_key), params, batches)


# Marks the test batches inside exact_classification_influence: their per-example loss is −m.
_TEST_SIDE_KEY = "__classification_test_side__"


def exact_classification_influence(
    loss_fn: LossFn,
    per_example_loss_fn: PerExampleLossFn,
    outputs_fn: OutputsFn,
    params: Any,
    test_batches,
    train_batches,
    *,
    damping: float = 0.0,
    label_key: str = "y",
) -> jax.Array:
  """Returns the (T, N) matrix cls(z, x) = −∇m(x)ᵀ (H + damping·I)⁻¹ ∇ℓ(z), H dense (tiny models only).

  Positive: upweighting z raises the margin of x. H is the Hessian of the mean
  of `loss_fn` over `train_batches`; `outputs_fn(params, batch)` gives logits.
  This is solvers.exact_influence with the test-side loss −m
  (`classification_test_loss`); batches are dicts. Raises if H + damping·I is singular.
  """
  test_loss = classification_test_loss(outputs_fn, label_key)

  def either_loss(params, batch):
    if _TEST_SIDE_KEY in batch:
      return test_loss(params, {k: v for k, v in batch.items() if k != _TEST_SIDE_KEY})
    return per_example_loss_fn(params, batch)

  tagged = [dict(b, **{_TEST_SIDE_KEY: np.ones(data_lib.batch_size(b), bool)})
            for b in data_lib.materialize(test_batches, "test_batches")]
  train_batches = data_lib.materialize(train_batches, "train_batches")
  return solvers.exact_influence(loss_fn, either_loss, params, tagged, train_batches, damping=damping)


@jax.jit
def _last_layer_margin_gradients(features, labels, kernel, bias):
  dt = jnp.result_type(features, kernel, bias, jnp.float32)
  features, kernel, bias = (x.astype(dt) for x in (features, kernel, bias))
  dm = margin_logit_gradients(features @ kernel + bias, labels)
  return ll.kron_rows(ll.augment(features), dm)


def last_layer_margin_gradients(features, labels, kernel, bias) -> jax.Array:
  """Returns (B, (d+1)·C) ∇m(x) w.r.t. the last Dense layer: [1, h] ⊗ (onehot(y) − onehot(runner-up)).

  Flat order as `last_layer.last_layer_gradients` (bias first, then kernel row-major).
  """
  ll.check_last_layer_inputs(features, labels, kernel, bias)
  return _last_layer_margin_gradients(features, labels, kernel, bias)


def last_layer_classification_influence(curv: ll.LastLayerCurvature, test_margin_grads, train_grads) -> jax.Array:
  """Returns the (T, N) matrix cls(z, x) = −∇m(x)ᵀ H⁻¹ ∇ℓ(z) for the last Dense layer.

  `test_margin_grads` from `last_layer_margin_gradients`, `train_grads` from
  `last_layer.last_layer_gradients`. Positive: upweighting z makes x more
  correctly classified (dm(x)/dε > 0).
  """
  return -ll.last_layer_influence(curv, test_margin_grads, train_grads)
