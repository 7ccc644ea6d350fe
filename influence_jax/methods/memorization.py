"""Memorization vs generalization of training points, and selective removal (DESIGN §5).

The toolkit's own formalisation, in the spirit of Kounavis, Dia & Ramazanli
(2023), of whom only the abstract is public: these definitions are ours, not
the paper's.

Quantities. θ the trained parameters, H the Hessian of the training objective
L (DESIGN §1), R a held-out *reference* set with its true labels, m(x) the
margin logit_y(x) − max_{c≠y} logit_c(x) and cls(z, x) = −∇m(x)ᵀ H⁻¹ ∇ℓ(z)
the classification influence (classification.py: dm(x)/dε when z is
upweighted by ε). For every training point z (with the label it was trained
on, right or wrong):

    A(z)  = (1/|R|) Σ_{x∈R} cls(z, x) = −ḡ_Rᵀ H⁻¹ ∇ℓ(z),   ḡ_R = (1/|R|) Σ_{x∈R} ∇m(x),

the rate at which upweighting z raises the *mean held-out margin*. A is linear
in R, so it costs one inverse-Hessian product (of ḡ_R) and one dot product
per training point, whatever |R|. Beside it:

    m(z)  own margin, at z's training label (> 0: the model fits z),
    s(z)  self-influence ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) ≥ 0 (loss scale, DESIGN §1).

Labels (`LABEL_NAMES`):
    GENERALIZES (0)  A(z) > 0: z helps held-out predictions.
    MEMORIZED   (1)  A(z) ≤ 0 and m(z) > 0 and s(z) ≥ min_self_influence:
                     z is fitted, yet helps no held-out prediction on average
                     (it helps only itself).
    NEITHER     (2)  A(z) ≤ 0 but not memorized: not fitted (m(z) ≤ 0), or
                     s(z) below `min_self_influence`.
    strength = |A(z)|.

How self-influence enters. Only through the optional threshold: with
min_self_influence=None (the library default) it is *reported* beside A and
changes no label, "fitted and A ≤ 0" is the whole criterion. A threshold adds
s(z) ≥ min_self_influence to the MEMORIZED condition (DESIGN §5's "its
self-influence high"); points it excludes become NEITHER. It never changes A,
its sign or the order of `removal_ranking` among the points still labelled
MEMORIZED. The jobs (memorization_pipeline) set it to a quantile of s over the
training set, by default the median: on digits with 20% flipped labels this
raised the precision of MEMORIZED for the flipped points from 0.80 to 0.90
for a recall of 0.85 instead of 0.87 (5 seeds, see the README section).

Damping. With a small L2 the last-layer H is nearly singular along
directions the data barely constrain, and H⁻¹ amplifies them: A then ranks
flipped labels poorly (ROC AUC 0.74 on digits, L2 = 1e-4, no damping).
Inverting H + δI with δ = 1e-2, about 3% of H's largest eigenvalue (0.38),
gave AUC 0.92 ± 0.01 over 5 seeds; δ between 1e-2 and 1e-1 did about as well.

Two ways to get H⁻¹:
- `last_layer_memorization`: exact closed form over the last Dense layer with
  the body frozen (last_layer.py); `split_linen_last_layer` gives a Linen
  model's body features and its last Dense kernel/bias. The default.
- `eigenspace_memorization`: a fitted Arnoldi eigenspace over all parameters,
  H⁻¹ ≈ Uᵀ(Λ+δ)⁻¹U (optionally + the spectral tail (I − UᵀU)/c, DESIGN §2),
  so that A(z) = −G_m(R)ᵀ(Λ+δ)⁻¹G(z) with G_m(R) = U ḡ_R, G(z) = U ∇ℓ(z).

Selective removal (`select_removals`, `train_with_removal`): at chosen epochs,
rank the still-kept training points (`removal_ranking`: the MEMORIZED ones,
most negative A first), drop up to a budget of them, continue training on the
rest. Measured on digits (README): it beats removing as many random points,
but not ranking *all* kept points by A or by self-influence, because points
not yet fitted at the removal epoch (many flipped labels early in training)
are by definition not MEMORIZED and so are never candidates.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.scipy.linalg
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from influence_jax.methods import classification as cl
from influence_jax import data as data_lib
from influence_jax import flax_adapters
from influence_jax.methods import last_layer as ll
from influence_jax import projection
from influence_jax import scoring
from influence_jax.examples import training
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace, check_params

GENERALIZES, MEMORIZED, NEITHER = 0, 1, 2
LABEL_NAMES = ("generalizes", "memorized", "neither")


class Memorization(NamedTuple):
  """Per training point z (all (N,) arrays, in the order of the training set).

  influence: A(z) = mean over the reference set R of cls(z, x) = −ḡ_Rᵀ H⁻¹ ∇ℓ(z).
    Positive: upweighting z raises the mean held-out margin.
  label: int8 GENERALIZES (A > 0), MEMORIZED (A ≤ 0, own margin > 0, and
    self-influence ≥ the threshold when one is given) or NEITHER (the rest);
    names in LABEL_NAMES.
  strength: |A(z)|.
  own_margin: m(z) at z's training label (> 0: fitted).
  self_influence: s(z) = ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) ≥ 0 (reported; used only with a threshold).
  """

  influence: np.ndarray
  label: np.ndarray
  strength: np.ndarray
  own_margin: np.ndarray
  self_influence: np.ndarray


def memorization_labels(influence, own_margin, self_influence, *,
                        min_self_influence: Optional[float] = None) -> Memorization:
  """Returns the Memorization of per-point A(z), m(z) and s(z) (module docstring for the rule)."""
  a = np.asarray(influence)
  m = np.asarray(own_margin)
  s = np.asarray(self_influence)
  if a.ndim != 1 or m.shape != a.shape or s.shape != a.shape:
    raise ValueError(f"influence, own_margin and self_influence must be (N,) arrays of one length; "
                     f"got shapes {a.shape}, {m.shape}, {s.shape}.")
  for x, name in ((a, "influence"), (m, "own_margin"), (s, "self_influence")):
    validation.check_finite(x, name)
  memorized = (a <= 0) & (m > 0)
  if min_self_influence is not None:
    validation.check_finite_scalar(min_self_influence, "min_self_influence")
    memorized &= s >= min_self_influence
  label = np.where(a > 0, GENERALIZES, np.where(memorized, MEMORIZED, NEITHER)).astype(np.int8)
  return Memorization(a, label, np.abs(a), m, s)


# ----------------------------------------------------------------------------- last layer (default)


class LastLayerSplit(NamedTuple):
  """A Linen model split at its last Dense layer.

  features_fn(x) -> (B, d): the frozen body, the inputs the last layer receives.
  kernel: (d, C), bias: (C,): the last Dense layer, logits = features_fn(x) @ kernel + bias.
  """

  features_fn: Callable[[jax.Array], jax.Array]
  kernel: jax.Array
  bias: jax.Array


def split_linen_last_layer(module: nn.Module, variables: Any, *, layer: str = "output") -> LastLayerSplit:
  """Returns the LastLayerSplit of a Linen model whose last layer is the Dense named `layer`.

  The features are what the model passes to that layer (captured with
  nn.intercept_methods, so any architecture works, e.g. models.MLP and
  models.CNN whose head is "output"). `variables` is the dict module.init
  returned; the model is applied with train=False when it takes that argument.
  """
  if "params" not in variables:
    raise ValueError(
        f"variables has no 'params' collection (keys {sorted(variables)}); pass what module.init returned.")
  params = variables["params"]
  if layer not in params:
    raise ValueError(f"the model has no top-level layer {layer!r}; its layers are {sorted(params)}.")
  dense = params[layer]
  if set(dense) != {"kernel", "bias"} or np.ndim(dense["kernel"]) != 2:
    raise ValueError(f"layer {layer!r} is not a Dense layer with a (d, C) kernel and a bias; "
                     f"it holds {jax.tree.map(np.shape, dict(dense))}.")
  kwargs = flax_adapters._eval_kwargs(module.__call__)

  @jax.jit
  def features_fn(x):
    captured = {}

    def grab(next_fun, args, kw, context):
      if context.module.name == layer and context.method_name == "__call__":
        captured["h"] = args[0]
      return next_fun(*args, **kw)

    with nn.intercept_methods(grab):
      module.apply(variables, x, **kwargs)
    h = captured["h"]
    return h.reshape(h.shape[0], -1)

  return LastLayerSplit(features_fn, dense["kernel"], dense["bias"])


def _rows(fn, x, chunk):
  return jnp.concatenate([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def last_layer_memorization(
    train_features,
    train_labels,
    reference_features,
    reference_labels,
    kernel,
    bias,
    *,
    l2: float,
    damping: float = 0.0,
    min_self_influence: Optional[float] = None,
    curvature: Optional[ll.LastLayerCurvature] = None,
    chunk_size: int = 4096,
) -> Memorization:
  """Returns the Memorization of each training point with H the exact last-layer Hessian.

  H = the Hessian of the mean softmax cross-entropy of the last Dense layer
  over the training features + (l2 + damping)·I (last_layer.py), factored by
  Cholesky when l2 + damping > 0, else the pseudo-inverse of
  last_layer.fit_last_layer; or the given `curvature` (fit_last_layer's). A(z) =
  −ḡ_Rᵀ H⁻¹ ∇ℓ(z) with ḡ_R the mean last-layer margin gradient of the
  reference set (true labels); exact mean over R of
  classification.last_layer_classification_influence. Training gradients are
  formed `chunk_size` rows at a time.
  """
  ll.check_last_layer_inputs(train_features, train_labels, kernel, bias)
  ll.check_last_layer_inputs(reference_features, reference_labels, kernel, bias)
  if np.shape(reference_features)[0] == 0:
    raise ValueError("the reference set holds no examples; A(z) is a mean over at least one.")
  g_ref = cl.last_layer_margin_gradients(reference_features, reference_labels, kernel, bias)
  g_bar = jnp.mean(g_ref, axis=0)
  if curvature is None and l2 + damping > 0:
    # Positive definite: a Cholesky factor is exact and ~10x cheaper than fit_last_layer's eigh.
    hess = ll.last_layer_hessian(train_features, train_labels, kernel, bias, l2=l2 + damping)
    factor = jax.scipy.linalg.cho_factor(hess, lower=True)
    v = jax.scipy.linalg.cho_solve(factor, g_bar)
    self_fn = lambda g: jnp.sum(jax.scipy.linalg.solve_triangular(factor[0], g.T, lower=True) ** 2, axis=0)
  else:
    if curvature is None:
      curvature = ll.fit_last_layer(train_features, train_labels, kernel, bias, l2=l2, damping=damping)
    v = ll.last_layer_inverse_hvp(curvature, g_bar[None])[0]
    self_fn = lambda g: ll.last_layer_self_influence(curvature, g)
  train_features, train_labels = jnp.asarray(train_features), jnp.asarray(train_labels)
  a, s = [], []
  for i in range(0, train_features.shape[0], chunk_size):
    g = ll.last_layer_gradients(train_features[i:i + chunk_size], train_labels[i:i + chunk_size], kernel, bias)
    a.append(-(g @ v.astype(g.dtype)))
    s.append(self_fn(g))
  logits = train_features @ jnp.asarray(kernel) + jnp.asarray(bias)
  own = cl.margin(logits, train_labels)
  return memorization_labels(np.asarray(jnp.concatenate(a)), np.asarray(own), np.asarray(jnp.concatenate(s)),
                             min_self_influence=min_self_influence)


def linen_memorization(
    module: nn.Module,
    variables: Any,
    train_batch: dict,
    reference_batch: dict,
    *,
    l2: float,
    damping: float = 0.0,
    input_key: str = "x",
    label_key: str = "y",
    layer: str = "output",
    min_self_influence: Optional[float] = None,
) -> Memorization:
  """Returns `last_layer_memorization` of a Linen classifier split at its last Dense `layer`.

  `l2` is the L2 coefficient of the training objective on those parameters
  (flax_adapters' l2); batches are dicts with `input_key` and integer `label_key`.
  """
  split = split_linen_last_layer(module, variables, layer=layer)
  feats = lambda b: _rows(split.features_fn, jnp.asarray(b[input_key]), 1024)
  return last_layer_memorization(
      feats(train_batch), jnp.asarray(train_batch[label_key]), feats(reference_batch),
      jnp.asarray(reference_batch[label_key]), split.kernel, split.bias, l2=l2, damping=damping,
      min_self_influence=min_self_influence)


# ----------------------------------------------------------------------------- full eigenspace (option)


def mean_margin_gradient(outputs_fn: Callable, params: Any, reference_batches, *, label_key: str = "y") -> jax.Array:
  """Returns ḡ_R = (1/|R|) Σ_{x∈R} ∇m(x), flat in ravel_pytree(params) order (p,)."""
  batches = data_lib.materialize(reference_batches, "reference_batches")
  flat, unravel = ravel_pytree(params)
  total_fn = jax.jit(jax.grad(lambda f, b: jnp.sum(cl.margin(outputs_fn(unravel(f), b), b[label_key]))))
  total = sum(total_fn(flat, jax.tree.map(jnp.asarray, b)) for b in batches)
  return total / sum(data_lib.batch_size(b) for b in batches)


def eigenspace_memorization(
    eigenspace: Eigenspace,
    per_example_loss_fn: Callable,
    outputs_fn: Callable,
    params: Any,
    train_batches,
    reference_batches,
    *,
    label_key: str = "y",
    damping: Optional[float] = None,
    tail: bool = False,
    tail_constant: Optional[float] = None,
    min_self_influence: Optional[float] = None,
    microbatch_size: Optional[int] = None,
) -> Memorization:
  """Returns the Memorization of each training point with H⁻¹ from a fitted eigenspace.

  A(z) = −G_m(R)ᵀ(Λ+δ)⁻¹G(z), G_m(R) = U ḡ_R (the projected mean reference
  margin gradient), G(z) = U ∇ℓ(z); with `tail`, + the spectral tail
  −(ḡ_Rᵀ∇ℓ(z) − G_m(R)ᵀG(z))/c (DESIGN §2; c defaults to λ_k + δ), and s(z)
  gets its tail too. One pass over the training set projects each ∇ℓ(z) on
  the k eigenvectors and on v = H̃⁻¹ḡ_R (A(z) = −⟨∇ℓ(z), v⟩).
  `outputs_fn(params, batch)` gives (B, C) logits; batch[label_key] the labels.
  """
  check_params(eigenspace, params)
  u = jnp.asarray(eigenspace.host_eigenvectors())
  g_bar = mean_margin_gradient(outputs_fn, params, reference_batches, label_key=label_key).astype(u.dtype)
  coords = u @ g_bar
  v = u.T @ (scoring.inverse_eigenvalues(eigenspace, damping).astype(u.dtype) * coords)
  c = None
  if tail:
    c = scoring.default_tail_constant(eigenspace, damping) if tail_constant is None else float(tail_constant)
    if not c > 0:
      raise ValueError(f"the tail constant must be positive; got {c}.")
    v = v + (g_bar - u.T @ coords) / c
  train_batches = data_lib.materialize(train_batches, "train_batches")
  proj = projection.project_on(jnp.concatenate([u, v[None]]), per_example_loss_fn, params, train_batches,
                               method="vjp", microbatch_size=microbatch_size, with_sq_norms=tail)
  g_train, a = proj.values[:, :-1], -proj.values[:, -1]
  s = scoring.self_influence(eigenspace, g_train, damping=damping, sq_norms=proj.sq_norms, tail_constant=c)
  own = jnp.concatenate([cl.margin(outputs_fn(params, b), jnp.asarray(b[label_key])) for b in train_batches])
  return memorization_labels(np.asarray(a), np.asarray(own), np.asarray(s), min_self_influence=min_self_influence)


# ----------------------------------------------------------------------------- selective removal


def removal_ranking(mem: Memorization, indices=None) -> np.ndarray:
  """Returns the MEMORIZED points, most negative A first (ties: lower index first).

  `indices` maps the rows of `mem` to training-set indices (default: 0..N−1);
  the result is in those indices.
  """
  idx = np.arange(mem.label.size) if indices is None else np.asarray(indices)
  if idx.shape != mem.label.shape:
    raise ValueError(f"indices must have shape {mem.label.shape} like the labels; got {idx.shape}.")
  rows = np.flatnonzero(mem.label == MEMORIZED)
  order = np.lexsort((idx[rows], mem.influence[rows]))
  return idx[rows[order]]


def select_removals(ranking, budget: int, removed) -> np.ndarray:
  """Returns the first `budget` entries of `ranking` not yet in `removed` (a bool mask), in order.

  Raises ValueError on a negative budget or when `ranking` repeats an index.
  """
  ranking = np.asarray(ranking, np.int64)
  removed = np.asarray(removed, bool)
  if budget < 0:
    raise ValueError(f"budget must be ≥ 0; got {budget}.")
  if np.unique(ranking).size != ranking.size:
    raise ValueError("ranking repeats a training index.")
  if ranking.size and (ranking.min() < 0 or ranking.max() >= removed.size):
    raise ValueError(f"ranking has indices outside [0, {removed.size}).")
  return ranking[~removed[ranking]][:budget]


class RemovalHistory(NamedTuple):
  """What `train_with_removal` did.

  removed: one int array per removal event, the training indices dropped then (in ranking order).
  kept: (N,) bool, the points still trained on at the end.
  kept_per_epoch: (num_epochs,) how many points each epoch trained on.
  example_epochs: Σ over epochs of the points trained on (the training cost).
  losses: (steps,) minibatch losses.
  """

  removed: list
  kept: np.ndarray
  kept_per_epoch: np.ndarray
  example_epochs: int
  losses: np.ndarray


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "batch_size", "num_steps"))
def _segment(loss_fn, optimizer, params, opt_state, batch, key, *, batch_size, num_steps):
  n = data_lib.batch_size(batch)
  idx = training._epoch_indices(key, n, batch_size, num_steps)

  def step(carry, i):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, jax.tree.map(lambda x: x[idx[i]], batch))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(num_steps))
  return params, opt_state, losses


def train_with_removal(
    loss_fn: Callable,
    params: Any,
    train_batch: dict,
    *,
    optimizer: optax.GradientTransformation,
    num_epochs: int,
    batch_size: int,
    removal_epochs: Sequence[int] = (),
    rank_fn: Optional[Callable[[Any, np.ndarray, int], np.ndarray]] = None,
    budgets: int | Sequence[int] = 0,
    seed: int = 0,
) -> tuple[Any, RemovalHistory]:
  """Returns (params, RemovalHistory): minibatch training that drops points at chosen epochs.

  Before epoch e for each e in `removal_epochs` (0 < e < num_epochs),
  rank_fn(params, kept_indices, event) returns training indices to drop in
  priority order (e.g. `removal_ranking` of the kept points' Memorization, or
  a random permutation); the first budgets[event] of them not already
  removed are dropped (`select_removals`), so no point is dropped twice.
  Training goes on with the optimizer state carried over; each epoch is a
  fresh permutation of the kept points in batches of min(batch_size, kept)
  (remainder dropped). Deterministic given `seed`.
  """
  n = data_lib.batch_size(train_batch)
  events = [int(e) for e in removal_epochs]
  if any(not 0 < e < num_epochs for e in events) or events != sorted(set(events)):
    raise ValueError(f"removal_epochs must be increasing epochs in (0, {num_epochs}); got {tuple(removal_epochs)}.")
  budgets = [int(budgets)] * len(events) if np.ndim(budgets) == 0 else [int(b) for b in budgets]
  if len(budgets) != len(events):
    raise ValueError(f"budgets has {len(budgets)} entries for {len(events)} removal epochs.")
  if events and rank_fn is None:
    raise ValueError("removal_epochs given without a rank_fn.")
  train_batch = jax.tree.map(jnp.asarray, train_batch)
  opt_state = optimizer.init(params)
  kept = np.ones(n, bool)
  removed, kept_per_epoch, losses = [], [], []
  keys = jax.random.split(jax.random.key(seed), len(events) + 1)
  bounds = [0, *events, num_epochs]
  for seg in range(len(bounds) - 1):
    if seg > 0:
      ranking = rank_fn(params, np.flatnonzero(kept), seg - 1)
      drop = select_removals(ranking, budgets[seg - 1], ~kept)
      kept[drop] = False
      removed.append(drop)
    idx = np.flatnonzero(kept)
    if idx.size == 0:
      raise ValueError("every training point was removed; lower the budgets.")
    bs = min(batch_size, idx.size)
    epochs = bounds[seg + 1] - bounds[seg]
    subset = jax.tree.map(lambda x: x[idx], train_batch)
    params, opt_state, seg_losses = _segment(loss_fn, optimizer, params, opt_state, subset, keys[seg],
                                             batch_size=bs, num_steps=epochs * (idx.size // bs))
    losses.append(np.asarray(seg_losses))
    kept_per_epoch += [idx.size] * epochs
  kpe = np.asarray(kept_per_epoch)
  return params, RemovalHistory(removed, kept, kpe, int(kpe.sum()), np.concatenate(losses))
