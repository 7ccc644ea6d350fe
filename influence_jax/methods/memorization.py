"""Memorization vs generalization of training points, and selective removal (docs/design.md, "The papers' methods").

The toolkit's own formalisation, in the spirit of Kounavis, Dia & Ramazanli
(2023), of whom only the abstract is public: these definitions are ours, not
the paper's.

Quantities. θ the trained parameters, H the Hessian of the training objective
L (docs/design.md, "What a score means"), R a held-out *reference* set with its true labels, m(x) the
margin logit_y(x) − max_{c≠y} logit_c(x) and cls(z, x) = −∇m(x)ᵀ H⁻¹ ∇ℓ(z)
the classification influence (classification.py: dm(x)/dε when z is
upweighted by ε). For every training point z (with the label it was trained
on, right or wrong):

    A(z)  = (1/|R|) Σ_{x∈R} cls(z, x) = −ḡ_Rᵀ H⁻¹ ∇ℓ(z),   ḡ_R = (1/|R|) Σ_{x∈R} ∇m(x),

the rate at which upweighting z raises the *mean held-out margin*. A is linear
in R, so it costs one inverse-Hessian product (of ḡ_R) and one dot product
per training point, whatever |R|. Beside it:

    m(z)  own margin, at z's training label (> 0: the model fits z),
    s(z)  self-influence ∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z) ≥ 0 (loss scale, docs/design.md, "What a score means").

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
s(z) ≥ min_self_influence to the MEMORIZED condition (docs/design.md, "The papers' methods": "its
self-influence high"); points it excludes become NEITHER. It never changes A,
its sign or the order of `selective_removal.removal_ranking` among the points
still labelled MEMORIZED. The jobs (jobs.papers.memorization_job) set it to a quantile
of s over the training set, by default the median, which raised the precision
of MEMORIZED for flipped labels on digits (docs/memorization_results.md).

Damping. With a small L2 the last-layer H is nearly singular along
directions the data barely constrain, and H⁻¹ amplifies them: A then ranks
flipped labels poorly; inverting H + δI with δ a few percent of H's largest
eigenvalue ranks them much better (figures in docs/memorization_results.md).

Two ways to get H⁻¹:
- `last_layer_memorization`: exact closed form over the last Dense layer with
  the body frozen (last_layer.py, Cholesky when l2 + damping > 0);
  `split_linen_last_layer` gives a Linen model's body features and its last
  Dense kernel/bias. The default.
- `eigenspace_memorization`: a fitted Arnoldi eigenspace over all parameters,
  H⁻¹ ≈ Uᵀ(Λ+δ)⁻¹U (optionally + the spectral tail (I − UᵀU)/c, docs/design.md, "Arnoldi influence and the spectral tail"),
  so that A(z) = −G_m(R)ᵀ(Λ+δ)⁻¹G(z) with G_m(R) = U ḡ_R, G(z) = U ∇ℓ(z).

Selective removal, which ranks points by these labels during training, is in
selective_removal.py.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from influence_jax import data as data_lib
from influence_jax import flax_adapters
from influence_jax import projection
from influence_jax import scoring
from influence_jax import validation
from influence_jax.eigenspace import Eigenspace, check_params, inverse_eigenvalues, tail_constant_or_default
from influence_jax.methods import classification as cl
from influence_jax.methods import last_layer as ll
from influence_jax.types import OutputsFn, PerExampleLossFn

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
  # The adapter applies the model in eval mode; its loss is not used here.
  outputs_fn = flax_adapters.linen_loss_fns(module, variables, lambda outputs, labels: outputs).outputs_fn

  @jax.jit
  def features_fn(x):
    captured = {}

    def grab(next_fun, args, kw, context):
      if context.module.name == layer and context.method_name == "__call__":
        captured["h"] = args[0]
      return next_fun(*args, **kw)

    with nn.intercept_methods(grab):
      outputs_fn(params, {"x": x})
    h = captured["h"]
    return h.reshape(h.shape[0], -1)

  return LastLayerSplit(features_fn, dense["kernel"], dense["bias"])


def _rows(fn, x, chunk):
  return jnp.concatenate([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def last_layer_memorization(
    train_features, train_labels, reference_features, reference_labels, kernel, bias, *,
    l2: float, damping: float = 0.0, min_self_influence: Optional[float] = None,
    curvature: Optional[ll.LastLayerCurvature] = None, chunk_size: int = 4096,
) -> Memorization:
  """Returns the Memorization of each training point with H the exact last-layer Hessian.

  H = the Hessian of the mean softmax cross-entropy of the last Dense layer
  over the training features + (l2 + damping)·I, from
  last_layer.fit_last_layer (Cholesky when l2 + damping > 0, else the
  pseudo-inverse), or the given `curvature` (fit_last_layer's). A(z) =
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
  if curvature is None:
    curvature = ll.fit_last_layer(train_features, train_labels, kernel, bias, l2=l2, damping=damping)
  v = ll.last_layer_inverse_hvp(curvature, jnp.mean(g_ref, axis=0, keepdims=True))[0]
  train_features, train_labels = jnp.asarray(train_features), jnp.asarray(train_labels)
  a, s = [], []
  for i in range(0, train_features.shape[0], chunk_size):
    g = ll.last_layer_gradients(train_features[i:i + chunk_size], train_labels[i:i + chunk_size], kernel, bias)
    a.append(-(g @ v.astype(g.dtype)))
    s.append(ll.last_layer_self_influence(curvature, g))
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


def mean_margin_gradient(outputs_fn: OutputsFn, params: Any, reference_batches, *, label_key: str = "y") -> jax.Array:
  """Returns ḡ_R = (1/|R|) Σ_{x∈R} ∇m(x), flat in ravel_pytree(params) order (p,)."""
  batches = data_lib.materialize(reference_batches, "reference_batches")
  flat, unravel = ravel_pytree(params)
  total_fn = jax.jit(jax.grad(lambda f, b: jnp.sum(cl.margin(outputs_fn(unravel(f), b), b[label_key]))))
  total = sum(total_fn(flat, jax.tree.map(jnp.asarray, b)) for b in batches)
  return total / sum(data_lib.batch_size(b) for b in batches)


def eigenspace_memorization(
    eigenspace: Eigenspace,
    per_example_loss_fn: PerExampleLossFn,
    outputs_fn: OutputsFn,
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
  −(ḡ_Rᵀ∇ℓ(z) − G_m(R)ᵀG(z))/c (docs/design.md, "Arnoldi influence and the spectral tail"; c defaults to λ_k + δ), and s(z)
  gets its tail too. One pass over the training set projects each ∇ℓ(z) on
  the k eigenvectors and on v = H̃⁻¹ḡ_R (A(z) = −⟨∇ℓ(z), v⟩).
  `outputs_fn(params, batch)` gives (B, C) logits; batch[label_key] the labels.
  """
  check_params(eigenspace, params)
  u = jnp.asarray(eigenspace.host_eigenvectors())
  g_bar = mean_margin_gradient(outputs_fn, params, reference_batches, label_key=label_key).astype(u.dtype)
  coords = u @ g_bar
  v = u.T @ (inverse_eigenvalues(eigenspace, damping).astype(u.dtype) * coords)
  c = None
  if tail:
    c = tail_constant_or_default(eigenspace, damping, tail_constant)
    v = v + (g_bar - u.T @ coords) / c
  train_batches = data_lib.materialize(train_batches, "train_batches")
  proj = projection.project_on(jnp.concatenate([u, v[None]]), per_example_loss_fn, params, train_batches,
                               method="vjp", microbatch_size=microbatch_size, with_sq_norms=tail)
  g_train, a = proj.values[:, :-1], -proj.values[:, -1]
  s = scoring.self_influence(eigenspace, g_train, damping=damping, sq_norms=proj.sq_norms, tail_constant=c)
  own = jnp.concatenate([cl.margin(outputs_fn(params, b), jnp.asarray(b[label_key])) for b in train_batches])
  return memorization_labels(np.asarray(a), np.asarray(own), np.asarray(s), min_self_influence=min_self_influence)
